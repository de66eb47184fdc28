"""Accelerate's gradient accumulation vs truebatch on variable-length token batches.

A tiny GPT-2 (float64, random weights, no dropout) trains for one epoch on
byte-tokenized standard-library docstrings, micro-batches of a few sequences
each padded on its own, several micro-batches per optimizer step, the last
step shorter. Three training loops run from the same weights:

- ``accelerate accumulate()``: the loop of Accelerate's gradient-accumulation
  guide, with a loss averaged over each micro-batch's tokens;
- ``accelerate token recipe``: the guide's section for samples of variable
  size: count the window's tokens first, backward ``sum * steps / N``;
- ``truebatch``: ``acc.step_window(window, causal_lm_loss, count=tb.count_tokens())``.

At every optimizer step the gradient handed to the optimizer is compared
with the gradient of the big batch (the window's sequences in one batch, loss
averaged over all its scored tokens) at the same weights; the script prints
the largest relative difference ``|g - g_big| / |g_big|`` over parameter
tensors, for the full windows and for the shorter last one, then the time of
an epoch of each loop relative to the first (warm-up, then alternating
repeats)::

    python benchmarks/accelerate_compare.py
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

import truebatch as tb
from truebatch.integrations.transformers import causal_lm_loss, token_loss_sum

Loop = Callable[[Accelerator, nn.Module, torch.optim.Optimizer, DataLoader], None]


def _example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the model and data of the Transformers example)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


lm = _example("transformers_causal_lm")


def mean_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy averaged over the scored (shifted, not -100) tokens of ``batch``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=lm.IGNORE_INDEX,
    )


def accelerate_accumulate(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, loader
) -> None:
    """Accelerate's documented ``accumulate()`` loop, mean loss per micro-batch."""
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(mean_token_loss(model, batch))
            optimizer.step()
            optimizer.zero_grad()


def accelerate_token_recipe(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, loader
) -> None:
    """Accelerate's recipe for variable-size samples: divide token sums by the window's N."""
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps = accelerator.gradient_accumulation_steps
    for window in tb.windows(loader, steps):
        local = sum((mb["labels"][:, 1:] != lm.IGNORE_INDEX).sum() for mb in window)
        n_items = accelerator.gather(local).sum()
        for micro_batch in window:
            logits = model(
                input_ids=micro_batch["input_ids"], attention_mask=micro_batch["attention_mask"]
            ).logits
            loss_sum = token_loss_sum(logits, micro_batch["labels"])
            # accelerator.backward divides by `steps`; DDP averages over processes.
            accelerator.backward(loss_sum * steps * accelerator.num_processes / n_items)
        optimizer.step()
        optimizer.zero_grad()


def truebatch_loop(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, loader
) -> None:
    """truebatch with Accelerate's device placement: prepare the model and data only."""
    model, loader = accelerator.prepare(model, loader)
    acc = tb.Accumulator(model, optimizer)
    for window in tb.windows(loader, accelerator.gradient_accumulation_steps):
        acc.step_window(window, causal_lm_loss, count=tb.count_tokens())


LOOPS: dict[str, Loop] = {
    "accelerate accumulate(), mean loss": accelerate_accumulate,
    "accelerate token recipe": accelerate_token_recipe,
    "truebatch step_window": truebatch_loop,
}


class GradientRecorder:
    """At each optimizer step, compares the gradient with the big batch's at the same weights."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, windows: list[list[torch.Tensor]]
    ) -> None:
        self.model = model
        self.reference = copy.deepcopy(model)
        self.windows = windows
        self.differences: list[float] = []
        optimizer.register_step_pre_hook(self._record)

    def _record(self, *_: object) -> None:
        self.reference.load_state_dict(self.model.state_dict())
        self.reference.zero_grad(set_to_none=True)
        window = self.windows[len(self.differences)]
        mean_token_loss(self.reference, lm.collate(window)).backward()
        self.differences.append(
            max(
                float(torch.linalg.vector_norm(p.grad - r.grad) / torch.linalg.vector_norm(r.grad))
                for p, r in zip(self.model.parameters(), self.reference.parameters(), strict=True)
            )
        )


def run(
    loop: Loop,
    accelerator: Accelerator,
    initial: nn.Module,
    sequences: list[torch.Tensor],
    args: argparse.Namespace,
    windows: list[list[torch.Tensor]] | None = None,
) -> GradientRecorder | None:
    """One epoch of ``loop`` from ``initial``'s weights; records gradients if ``windows``."""
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    recorder = GradientRecorder(model, optimizer, windows) if windows else None
    loader = DataLoader(sequences, batch_size=args.micro_batch_size, collate_fn=lm.collate)
    loop(accelerator, model, optimizer, loader)
    return recorder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--micro-batches", type=int, default=10, help="micro-batches per epoch")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per loop")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accumulation)
    sequences = lm.token_sequences()[: args.micro_batch_size * args.micro_batches]
    per_window = args.micro_batch_size * args.accumulation
    windows = [sequences[i : i + per_window] for i in range(0, len(sequences), per_window)]
    initial = lm.build_model(torch.float64)
    tokens = [int((lm.collate(w)["labels"][:, 1:] != lm.IGNORE_INDEX).sum()) for w in windows]
    print(
        f"{len(sequences)} sequences, micro-batches of {args.micro_batch_size}, "
        f"{args.accumulation} per step: {len(windows)} steps, scored tokens per step {tokens}"
    )
    print("max relative gradient difference from the big batch (float64):")
    print(f"  {'loop':36s} {'full steps':>11s} {'last step':>10s}")
    for name, loop in LOOPS.items():
        differences = run(loop, accelerator, initial, sequences, args, windows).differences
        print(f"  {name:36s} {max(differences[:-1]):11.1e} {differences[-1]:10.1e}")

    seconds: dict[str, list[float]] = {name: [] for name in LOOPS}
    for loop in LOOPS.values():  # warm-up
        run(loop, accelerator, initial, sequences, args)
    for _ in range(args.repeats):
        for name, loop in LOOPS.items():
            start = time.perf_counter()
            run(loop, accelerator, initial, sequences, args)
            seconds[name].append(time.perf_counter() - start)
    baseline = statistics.median(seconds[next(iter(LOOPS))])
    print(f"time per epoch relative to the first loop (median of {args.repeats}):")
    for name, times in seconds.items():
        print(f"  {name:36s} {statistics.median(times) / baseline:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
