"""One rank of tests/test_trainer.py's 2-process run (started by torchrun, gloo on CPU).

Trains the float64 GPT-2 of ``hf_setups`` with the truebatch Trainer, 2 samples
per batch, 2 batches per window, on 13 sequences that accelerate shares out
unevenly (``even_batches=False``: rank 0 gets 4 batches, rank 1 gets 3, the
last one with a single sequence), and rank 0 saves the parameters, the logged
losses and the gradient of every step to ``argv[1]/result.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import hf_setups as S
from truebatch.integrations.transformers import Trainer

SAMPLES = 13


def main(out: Path) -> None:
    torch.set_num_threads(1)
    args = S.arguments(out, 2, 2, ddp_backend="gloo", accelerator_config={"even_batches": False})
    grads = S.Gradients()
    params, losses = S.train(
        Trainer, S.gpt2(), args, S.lm_dataset(SAMPLES), S.lm_collator(), callbacks=[grads]
    )
    if int(os.environ["RANK"]) == 0:
        torch.save({"params": params, "losses": losses, "grads": grads.steps}, out / "result.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
