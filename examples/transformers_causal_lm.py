"""Train a tiny GPT-2 with truebatch on variable-length, padded text batches.

Nothing is downloaded: the model is built from a ``GPT2Config`` with random
weights, and the text is the docstrings of standard-library modules, encoded
as UTF-8 bytes (a 256-token vocabulary, no tokenizer). Every micro-batch is
padded to its own longest sequence, so micro-batches hold different numbers of
scored tokens; truebatch averages the loss over the scored tokens of the whole
window, which is the gradient of the big batch.

    python examples/transformers_causal_lm.py --micro-batch-size 4 --accumulation 8

The pieces a training script needs:

    acc = tb.Accumulator(model, optimizer, max_grad_norm=1.0)
    for window in tb.windows(micro_batches, size=8):
        result = acc.step_window(window, causal_lm_loss, count=tb.count_tokens())
"""

from __future__ import annotations

import argparse
import importlib
import itertools
from collections.abc import Sequence

import torch
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

import truebatch as tb
from truebatch.integrations.transformers import causal_lm_loss

IGNORE_INDEX = -100
PAD_ID = 0  # the NUL byte, which no docstring contains; padded labels are IGNORE_INDEX
VOCAB = 256  # one token per byte
MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "decimal", "difflib",
    "fractions", "functools", "heapq", "inspect", "json", "logging", "pathlib", "pickle",
    "random", "shutil", "statistics", "string", "textwrap", "typing", "unittest", "zipfile",
)  # fmt: skip


def token_sequences(max_length: int = 48) -> list[torch.Tensor]:
    """The paragraphs of standard-library docstrings as byte-token tensors.

    Each paragraph (text between blank lines) becomes one sequence of at most
    ``max_length`` UTF-8 bytes; lengths vary from a few bytes to ``max_length``.
    """
    sequences = []
    for name in MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        for paragraph in doc.split("\n\n"):
            data = " ".join(paragraph.split()).encode("utf-8")[:max_length]
            if data:
                sequences.append(torch.tensor(list(data), dtype=torch.long))
    return sequences


def collate(sequences: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-pad sequences to the longest one: ``input_ids``, ``attention_mask``, ``labels``.

    ``labels`` are the input ids (the model shifts them) with ``IGNORE_INDEX``
    on padding, as Transformers' causal-LM collators make them.
    """
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 with random weights and no dropout (so any split is exact)."""
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=PAD_ID,
        eos_token_id=PAD_ID,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(dtype)


def micro_batches(
    sequences: Sequence[torch.Tensor], micro_batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of ``micro_batch_size`` sequences, each padded on its own."""
    it = iter(sequences)
    chunks = iter(lambda: list(itertools.islice(it, micro_batch_size)), [])
    return [collate(chunk) for chunk in chunks]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=8, help="micro-batches per step")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps-per-epoch", type=int, default=None, help="stop each epoch early (a quick run)"
    )
    args = parser.parse_args(argv)

    sequences = token_sequences()
    model = build_model(seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    acc = tb.Accumulator(model, optimizer, max_grad_norm=1.0)
    data = micro_batches(sequences, args.micro_batch_size)
    print(
        f"{len(sequences)} sequences, {len(data)} micro-batches of {args.micro_batch_size}, "
        f"{args.accumulation} per optimizer step"
    )
    model.train()
    for epoch in range(args.epochs):
        windows = list(tb.windows(data, args.accumulation))[: args.steps_per_epoch]
        losses = []
        for window in tqdm(windows, desc=f"epoch {epoch}", leave=False, disable=None):
            result = acc.step_window(window, causal_lm_loss, count=tb.count_tokens())
            losses.append(result.loss)
        mean = sum(losses) / len(losses)
        print(f"epoch {epoch}: mean token loss {mean:.4f} over {len(windows)} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
