"""Gradient error of bfloat16 accumulation against accumulate_dtype=torch.float32.

A bfloat16 MLP (32 -> 64 -> 10, tanh) gets one window of k micro-batches of 8
samples through ``tb.Accumulator`` twice: summing the micro-batch gradients in
bf16 ``.grad`` (plain accumulation) and with ``accumulate_dtype=torch.float32``
(float32 sums, rounded to bf16 once per window). Both are compared with two
float64 references:

- *accumulation error*: against the float64 sum of the very same bf16
  micro-batch gradients, i.e. the error that the summation alone adds;
- *total error*: against the gradient of the same weights and data in float64,
  which also holds the rounding of bf16 forward and backward passes, common
  to both ways of accumulating.

Error = ||g - reference|| / ||reference|| over all parameters; median over
``--seeds`` seeds (data and weights). Prints a table for k = 1, 4, 16, 64 and
saves a plot of error against k (``--out``; default docs/img/precision.png).

    python benchmarks/precision.py [--seeds 5] [--out PATH]
    python benchmarks/precision.py --quick      (k = 1, 4, 16; 2 seeds)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import truebatch as tb

MICRO_BATCH = 8
KS = (1, 4, 16, 64)
QUICK_KS = (1, 4, 16)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "precision.png"
QUICK_OUT = Path(tempfile.gettempdir()) / "precision_quick.png"
METHODS = {"bf16 accumulation": None, "accumulate_dtype=float32": torch.float32}
Batch = tuple[torch.Tensor, torch.Tensor]


def model_and_data(k: int, seed: int) -> tuple[nn.Module, Batch]:
    """A bf16 MLP and k * MICRO_BATCH bf16 samples, both drawn from ``seed``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).to(torch.bfloat16)
    x = torch.randn(k * MICRO_BATCH, 32).to(torch.bfloat16)
    return model, (x, torch.randint(0, 10, (k * MICRO_BATCH,)))


def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy SUMMED over the micro-batch (computed in float32 from bf16 logits)."""
    x, y = batch
    return F.cross_entropy(model(x).float(), y, reduction="sum")


def window_gradient(model: nn.Module, batch: Batch, dtype: torch.dtype | None) -> list:
    """The gradient tb.Accumulator hands to the optimizer for one window over ``batch``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = tb.Accumulator(model, optimizer, micro_batch_size=MICRO_BATCH, accumulate_dtype=dtype)
    acc.accumulate([batch], loss_sum, None)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def summed_micro_gradients(model: nn.Module, batch: Batch) -> list[torch.Tensor]:
    """sum_j (1/N) d loss_j / d params in float64, of the bf16 micro-batch gradients."""
    n = tb.batch_size(batch)
    params = list(model.parameters())
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for micro_batch in tb.split(batch, MICRO_BATCH):
        parts = torch.autograd.grad(loss_sum(model, micro_batch) * (1 / n), params)
        for into, part in zip(total, parts, strict=True):
            into += part.double()
    return total


def float64_gradient(model: nn.Module, batch: Batch) -> list[torch.Tensor]:
    """(1/N) d loss / d params of the whole batch, weights and data in float64."""
    wide = copy.deepcopy(model).double()
    x, y = batch
    loss = F.cross_entropy(wide(x.double()), y, reduction="mean")
    return list(torch.autograd.grad(loss, list(wide.parameters())))


def relative_error(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """||grads - reference|| / ||reference||, all parameters as one vector (one tensor for
    :func:`truebatch.max_relative_difference`)."""
    whole = [torch.cat([g.double().flatten() for g in grads])]
    return tb.max_relative_difference(whole, [torch.cat([r.flatten() for r in reference])])


def errors(k: int, seed: int) -> dict[tuple[str, str], float]:
    """(method, reference) -> relative error of the window gradient, for one k and seed."""
    model, batch = model_and_data(k, seed)
    references = {
        "accumulation": summed_micro_gradients(model, batch),
        "total": float64_gradient(model, batch),
    }
    found = {}
    for method, dtype in METHODS.items():
        grads = window_gradient(model, batch, dtype)
        for name, reference in references.items():
            found[method, name] = relative_error(grads, reference)
    return found


def plot(table: dict[tuple[int, str, str], float], ks: tuple[int, ...], out: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    titles = {
        "accumulation": "vs float64 sum of the same bf16 micro-gradients\n(k = 1 sums nothing)",
        "total": "vs float64 gradient of the whole batch",
    }
    for axis, (reference, title) in zip(axes, titles.items(), strict=True):
        for method in METHODS:
            axis.plot(ks, [table[k, method, reference] for k in ks], marker="o", label=method)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log", nonpositive="mask")  # k = 1 sums nothing: error 0
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.set_xlabel(f"k (micro-batches of {MICRO_BATCH} per window)")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    axes[0].set_ylabel("relative gradient error (median over seeds)")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k = 1, 4, 16 and 2 seeds")
    parser.add_argument("--seeds", type=int, help="default: 5 (2 with --quick)")
    parser.add_argument(
        "--out", type=Path, help=f"default: {DEFAULT_OUT} ({QUICK_OUT} with --quick)"
    )
    args = parser.parse_args()
    seeds = args.seeds or (2 if args.quick else 5)
    if seeds < 1:
        parser.error(f"--seeds must be 1 or more, got {seeds}")
    ks = QUICK_KS if args.quick else KS
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    torch.set_num_threads(1)
    runs: dict[tuple[int, str, str], list[float]] = {}
    for k, seed in tqdm([(k, s) for k in ks for s in range(seeds)], desc="windows", disable=None):
        for (method, reference), value in errors(k, seed).items():
            runs.setdefault((k, method, reference), []).append(value)
    table = {key: statistics.median(values) for key, values in runs.items()}

    print(
        f"bf16 MLP 32-64-10, micro-batches of {MICRO_BATCH}; relative gradient error, "
        f"median over {seeds} seeds"
    )
    print(
        f"{'k':>4}  {'reference':<13}{'bf16 accumulation':>19}{'float32 accumulation':>22}"
        f"{'ratio':>8}"
    )
    for k in ks:
        for reference in ("accumulation", "total"):
            bf16 = table[k, "bf16 accumulation", reference]
            fp32 = table[k, "accumulate_dtype=float32", reference]
            ratio = f"{fp32 / bf16:.2f}" if bf16 else "-"  # k = 1: nothing is summed
            print(f"{k:>4}  {reference:<13}{bf16:>19.2e}{fp32:>22.2e}{ratio:>8}")
    plot(table, ks, out)
    print(f"plot saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
