"""Final accuracy against effective batch size, with and without learning-rate scaling.

A small MLP learns the digits bundled with scikit-learn (1797 8x8 images) for a
fixed number of epochs. Every run goes through tb.Accumulator with micro-batches
of at most 64 samples; since accumulation is exact, the micro-batch size does not
change the result, and only the effective batch differs between runs. Two
optimizers, each tuned once at batch 16:

- SGD with momentum: the same rate at every batch, or tb.scale_lr(rule="linear")
  with a linear warmup over the first epochs (sized with tb.windows_per_epoch);
- Adam: the same rate at every batch, or tb.scale_lr(rule="sqrt").

Prints a table (mean and standard deviation of test accuracy over seeds) and
saves a plot to the printed path; ``--out`` chooses it (default
docs/img/lr_scaling.png). ``--quick`` is a smoke run (2 epochs, 2 seeds, 2
batch sizes) whose plot goes to the temporary directory unless ``--out`` says
otherwise, so it never replaces the documentation's figure.

    python benchmarks/lr_scaling.py            # the figure of docs/learning-rate.md
    python benchmarks/lr_scaling.py --quick    # seconds, to check the script runs
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import truebatch as tb

MICRO_BATCH = 64
BASE_BATCH = 16
BATCHES = (16, 32, 64, 128, 256, 512)
QUICK_BATCHES = (16, 128)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "lr_scaling.png"
QUICK_OUT = Path(tempfile.gettempdir()) / "lr_scaling_quick.png"


@dataclass(frozen=True)
class Recipe:
    """An optimizer tuned at BASE_BATCH, and the rule that moves its rate (None: keep it)."""

    optimizer: str
    base_lr: float
    rule: str | None
    warmup_epochs: int

    @property
    def label(self) -> str:
        how = f"tb.scale_lr(rule={self.rule!r})" if self.rule else "same rate"
        warmup = f" + {self.warmup_epochs}-epoch warmup" if self.rule and self.warmup_epochs else ""
        return f"{self.optimizer}, {how}{warmup}"


RECIPES = (
    Recipe("SGD", 0.02, None, 0),
    Recipe("SGD", 0.02, "linear", 2),
    Recipe("Adam", 1e-3, None, 0),
    Recipe("Adam", 1e-3, "sqrt", 0),
)


def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Standardized train and test splits of the bundled digits (no download)."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6

    def features(a):
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    return (features(x_train), torch.tensor(y_train)), (features(x_test), torch.tensor(y_test))


def loss_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def train(recipe: Recipe, batch: int, epochs: int, seed: int, data) -> float:
    """Test accuracy after ``epochs`` epochs at effective batch ``batch``."""
    (x, y), (x_test, y_test) = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    lr = (
        tb.scale_lr(recipe.base_lr, BASE_BATCH, batch, recipe.rule)
        if recipe.rule
        else recipe.base_lr
    )
    if recipe.optimizer == "SGD":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = recipe.warmup_epochs * tb.windows_per_epoch(len(x), batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    acc = tb.Accumulator(model, optimizer, scheduler, micro_batch_size=MICRO_BATCH)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        permutation = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), batch):
            index = permutation[start : start + batch]
            acc.step((x[index], y[index]), loss_sum)
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def plot(
    results: dict[tuple[Recipe, int], list[float]], batches: tuple[int, ...], epochs: int, out: Path
) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, name in zip(axes, ("SGD", "Adam"), strict=True):
        for recipe in (r for r in RECIPES if r.optimizer == name):
            means = [statistics.mean(results[recipe, b]) for b in batches]
            spreads = [statistics.stdev(results[recipe, b]) for b in batches]
            axis.errorbar(batches, means, yerr=spreads, marker="o", capsize=3, label=recipe.label)
        axis.set_xscale("log", base=2)
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.set_xlabel("effective batch (samples per optimizer step)")
        axis.set_title(f"{name}, rate tuned at batch {BASE_BATCH}, {epochs} epochs")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower left", fontsize=8)
    axes[0].set_ylabel("test accuracy (digits)")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, 2 seeds")
    parser.add_argument("--epochs", type=int, help="default: 20 (2 with --quick)")
    parser.add_argument("--seeds", type=int, help="default: 3 (2 with --quick)")
    parser.add_argument(
        "--out", type=Path, help=f"default: {DEFAULT_OUT} ({QUICK_OUT} with --quick)"
    )
    args = parser.parse_args()
    epochs = args.epochs or (2 if args.quick else 20)
    seeds = args.seeds or (2 if args.quick else 3)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    batches = QUICK_BATCHES if args.quick else BATCHES
    if seeds < 2:
        parser.error("--seeds must be 2 or more (the plot shows the spread over seeds)")
    torch.set_num_threads(1)
    data = digits()
    runs = [(r, b, s) for r in RECIPES for b in batches for s in range(seeds)]
    results: dict[tuple[Recipe, int], list[float]] = {}
    for recipe, batch, seed in tqdm(runs, desc="training runs", disable=None):
        results.setdefault((recipe, batch), []).append(train(recipe, batch, epochs, seed, data))
    print(f"test accuracy after {epochs} epochs, mean ± std over {seeds} seeds")
    print(f"{'recipe':<52}" + "".join(f"{b:>15}" for b in batches))
    for recipe in RECIPES:
        cells = (
            f"{statistics.mean(accuracies):.3f} ± {statistics.stdev(accuracies):.3f}"
            for accuracies in (results[recipe, b] for b in batches)
        )
        print(f"{recipe.label:<52}" + "".join(f"{c:>15}" for c in cells))
    plot(results, batches, epochs, out)
    print(f"plot saved to {out}")


if __name__ == "__main__":
    main()
