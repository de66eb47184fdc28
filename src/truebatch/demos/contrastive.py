"""``truebatch demo --task contrastive``: in-batch negatives, accumulated three ways.

A small encoder learns embeddings of scikit-learn's bundled digits with
NT-Xent (SimCLR): two augmented views of every image (a random shift of up
to one pixel and Gaussian noise, drawn once per epoch from a fixed seed),
each view against all 2B - 1 other views of the window. Trained from the same
initial weights on the same windows, in float64:

1. the big batch: the loss on all B images of the window at once;
2. plain accumulation: the same loss per micro-batch of m images, normalized
   by the window's count (``step_window``): every image sees only the
   negatives of its micro-batch, another (weaker) objective;
3. ``step_cached``: the loss on the window's representations, the
   micro-batches encoded twice (gradient caching): the big batch's gradient.

At every step, each method's gradient is compared with the big batch's
gradient on the same window at the same weights (the method's own). The
metric is top-1 retrieval on the held-out images: for each test image's
first view, is its nearest second view (cosine) its own?
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import truebatch as tb
from truebatch.demos import data
from truebatch.demos.console import table
from truebatch.demos.runs import SEED, deterministic

BATCH, MICRO, TEMPERATURE, LR = 128, 16, 0.2, 3e-3
FLOAT64_TOLERANCE = tb.compare.TOLERANCES[torch.float64]
Views = dict[str, torch.Tensor]


class Encoder(nn.Module):
    """``64 -> 128 -> 64 -> 32`` with tanh: an 8x8 digit to a 32-d embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh()
        )
        self.head = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to one pixel in each direction, plus noise (std 0.3)."""
    shifts = torch.randint(-1, 2, (len(images), 2), generator=generator)
    moved = torch.stack(
        [
            torch.roll(image, (int(dy), int(dx)), dims=(-2, -1))
            for image, (dy, dx) in zip(images, shifts, strict=True)
        ]
    )
    return moved + 0.3 * torch.randn(moved.shape, generator=generator, dtype=moved.dtype)


def views_of(images: torch.Tensor, seed: int) -> Views:
    generator = torch.Generator().manual_seed(seed)
    return {"a": augment(images, generator), "b": augment(images, generator)}


def encode(model: nn.Module, batch: Views) -> Views:
    return {"a": model(batch["a"]), "b": model(batch["b"])}


def nt_xent(reps: Views, _: Any = None) -> tuple[torch.Tensor, int]:
    """NT-Xent over the 2B views: (sum of the 2B cross-entropies, 2B)."""
    z = F.normalize(torch.cat([reps["a"], reps["b"]]), dim=-1)
    n = len(reps["a"])
    logits = (z @ z.T / TEMPERATURE).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, targets, reduction="sum"), 2 * n


def retrieval_accuracy(model: nn.Module, views: Views, labels: torch.Tensor) -> float:
    """Share of first views whose nearest second view of another image (cosine) shows
    the same digit."""
    with torch.no_grad():
        reps = encode(model, views)
        similarity = F.normalize(reps["a"], dim=-1) @ F.normalize(reps["b"], dim=-1).T
    similarity.fill_diagonal_(float("-inf"))
    return (labels[similarity.argmax(dim=1)] == labels).double().mean().item()


def big_batch_gradient(model: nn.Module, window: Views) -> list[torch.Tensor]:
    """The reference at the model's current weights: NT-Xent on the whole window / 2B."""
    loss, count = nt_xent(encode(model, window))
    return list(torch.autograd.grad(loss / count, list(model.parameters())))


# ------------------------------------------------------------------ the methods

Method = Callable[[tb.Accumulator, Views], tb.StepResult]


def big_batch(acc: tb.Accumulator, window: Views) -> tb.StepResult:
    return acc.step_window([window], lambda model, batch: nt_xent(encode(model, batch)))


def plain_accumulation(acc: tb.Accumulator, window: Views) -> tb.StepResult:
    return acc.step_window(
        tb.split(window, MICRO), lambda model, batch: nt_xent(encode(model, batch))
    )


def step_cached(acc: tb.Accumulator, window: Views) -> tb.StepResult:
    return acc.step_cached(tb.split(window, MICRO), encode, nt_xent)


METHODS: dict[str, tuple[str, Method]] = {
    "1": (f"big batch ({BATCH} images per step)", big_batch),
    "2": (f"plain accumulation, {BATCH // MICRO} x {MICRO}", plain_accumulation),
    "3": (f"step_cached, {BATCH // MICRO} x {MICRO}", step_cached),
}


@dataclass
class Run:
    """One method's training: per step its loss and gradient difference from the big batch."""

    label: str
    text: str
    losses: list[float] = field(default_factory=list)
    differences: list[float] = field(default_factory=list)
    accuracy: float = math.nan
    seconds: float = 0.0


def train(label: str, epochs: list[list[Views]], test: Views, labels: torch.Tensor) -> Run:
    """Train a fresh encoder (seed ``SEED``) with method ``label`` over ``epochs``."""
    text, method = METHODS[label]
    torch.manual_seed(SEED)
    model = Encoder().to(torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    applied: list[list[torch.Tensor]] = []
    optimizer.register_step_pre_hook(
        lambda *_: applied.append([p.grad.clone() for p in model.parameters()])
    )
    acc = tb.Accumulator(model, optimizer)
    run = Run(label, text)
    start = time.perf_counter()
    for windows in epochs:
        for window in windows:
            expected = big_batch_gradient(model, window)
            result = method(acc, window)
            run.losses.append(result.loss)
            run.differences.append(tb.max_relative_difference(applied[-1], expected))
    run.seconds = time.perf_counter() - start
    run.accuracy = retrieval_accuracy(model, test, labels)
    return run


def run_demo(epochs: int, train_size: int | None = None) -> tuple[list[Run], str]:
    """Train the three methods; returns the runs and the title."""
    digits = data.load_digits(torch.float64, train_size)
    orders = data.epoch_orders(len(digits.train_y), epochs, seed=1)
    schedule = [
        tb.split(views_of(digits.train_x[order], seed=100 + epoch), BATCH)
        for epoch, order in enumerate(orders)
    ]
    test = views_of(digits.test_x, seed=0)
    with deterministic():
        runs = [train(label, schedule, test, digits.test_y) for label in METHODS]
    title = (
        f"NT-Xent (SimCLR) on scikit-learn's digits: {len(digits.train_y)} training images, "
        f"{epochs} epochs of {len(schedule[0])} steps; window {BATCH} images = "
        f"{BATCH // MICRO} micro-batches of {MICRO}; Adam; retrieval among "
        f"{len(digits.test_y)} test images"
    )
    return runs, title


# ------------------------------------------------------------------ output


def format_runs(runs: list[Run]) -> str:
    lines = [
        (
            "#",
            "method",
            "negatives per view",
            "test retrieval top-1",
            "max rel. grad diff vs 1",
            f"<= {FLOAT64_TOLERANCE:g}",
            "time (s)",
        )
    ]
    negatives = {"1": 2 * BATCH - 2, "2": 2 * MICRO - 2, "3": 2 * BATCH - 2}
    for run in runs:
        worst = max(run.differences)
        lines.append(
            (
                run.label,
                run.text,
                str(negatives[run.label]),
                f"{run.accuracy:.4f}",
                "(reference)" if run.label == "1" else f"{worst:.1e}",
                "" if run.label == "1" else ("yes" if worst <= FLOAT64_TOLERANCE else "no"),
                f"{run.seconds:.1f}",
            )
        )
    return table(lines)


def plot(runs: list[Run], title: str, path: Path) -> Path:
    """Two panels: training loss per step, and the gradient difference from the big batch."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5.2))
    losses, differences = figure.subplots(1, 2)
    for index, run in enumerate(runs):
        steps = range(1, len(run.losses) + 1)
        label = f"{run.label}: {run.text}"
        losses.plot(
            steps, run.losses, "--" if run.label == "1" else "-", color=f"C{index}", label=label
        )
        # Exact zeros cannot sit on a log axis; they are drawn at 1e-18.
        values = [max(value, 1e-18) for value in run.differences]
        differences.plot(steps, values, color=f"C{index}", label=label)
    losses.set(
        xlabel="optimizer step",
        ylabel="training loss (window mean; row 2: within micro-batches)",
        title="Loss",
    )
    losses.legend(fontsize="small")
    differences.axhline(FLOAT64_TOLERANCE, color="black", linestyle="--", linewidth=0.8)
    differences.annotate(
        f"contract: {FLOAT64_TOLERANCE:g}", (1, FLOAT64_TOLERANCE), va="bottom", fontsize="small"
    )
    differences.set(
        xlabel="optimizer step",
        ylabel="relative gradient difference",
        title="Gradient vs the big batch's, same window and weights",
        yscale="log",
    )
    differences.legend(fontsize="small")
    figure.suptitle(title, fontsize="medium", wrap=True)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def main(args: argparse.Namespace) -> int:
    """Run the demo (``--quick``: 301 images, 2 epochs), save its plot, print its table."""
    epochs = args.epochs or (2 if args.quick else 4)
    runs, title = run_demo(epochs, 301 if args.quick else None)
    path = plot(runs, title, args.out or Path("truebatch-output") / "demo-contrastive.png")
    print(
        "\n\n".join(
            [
                title,
                "dtype: float64 throughout; a gradient difference above 1e-12 is a different "
                "gradient, never rounding. Row 2 normalizes exactly but gives each view only "
                "its micro-batch's negatives: another objective, whatever the normalization.",
                format_runs(runs),
                f"Plot of loss and gradient difference per step: {path}",
            ]
        )
    )
    return 0
