"""Time overhead of truebatch's Accumulator against a hand-written exact accumulation loop.

Both train the same float32 model on CPU, on the same windows of k micro-batches:

- ``hand-written``: for each window, ``(loss_sum / N).backward()`` per micro-batch,
  with N the sample count of the whole window, then one ``optimizer.step()`` and
  ``optimizer.zero_grad(set_to_none=True)``; the correct loop, written by hand;
- ``truebatch``: ``acc.step_window(window, loss_fn)`` with ``loss_fn`` returning
  the loss sum.

Each implementation trains its own copy of the model from the same initial
weights. A warm-up pass over the windows runs both first and checks that they
took the same steps (parameters within 1e-5 relative: float32 summation
order), so the two loops do the same work. Then timed rounds alternate the
order (hand-written first, then truebatch first, ...), one window each, so
that a slow moment of the shared machine hits both. Prints, per model and k,
the median time per window of each, their ratio truebatch / hand-written
(target <= 1.02), and the ratio of the fastest windows.

    python benchmarks/overhead.py [--repeats 40] [--windows 4] [--threads 1]
    python benchmarks/overhead.py --quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import truebatch as tb

TARGET = 1.02
CLASSES = 10
Window = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Case:
    name: str
    model: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    micro_batch_size: int


def mlp() -> nn.Module:
    """784 -> 512 -> 512 -> 10, ReLU: 670k parameters."""
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, CLASSES)
    )


def cnn() -> nn.Module:
    """Two 3x3 convolutions with pooling on 3x32x32 images, then a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, CLASSES),
    )


CASES = (Case("MLP", mlp, (784,), 64), Case("CNN", cnn, (3, 32, 32), 32))


def make_windows(case: Case, k: int, n_windows: int) -> list[Window]:
    """``n_windows`` windows of k micro-batches; the last micro-batch of each is shorter."""
    g = torch.Generator().manual_seed(0)
    sizes = [case.micro_batch_size] * (k - 1) + [case.micro_batch_size // 2]
    return [
        [
            (
                torch.randn(n, *case.sample_shape, generator=g),
                torch.randint(0, CLASSES, (n,), generator=g),
            )
            for n in sizes
        ]
        for _ in range(n_windows)
    ]


def loss_sum(model: nn.Module, micro_batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = micro_batch
    return F.cross_entropy(model(x), y, reduction="sum")


def hand_written(model: nn.Module) -> Callable[[Window], None]:
    """The correct loop by hand: every micro-batch's loss sum divided by the window's N."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train(window: Window) -> None:
        n = sum(len(y) for _, y in window)
        for micro_batch in window:
            (loss_sum(model, micro_batch) / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def with_truebatch(model: nn.Module) -> Callable[[Window], None]:
    acc = tb.Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-3))

    def train(window: Window) -> None:
        acc.step_window(window, loss_sum)

    return train


def timed(train: Callable[[Window], None], window: Window) -> float:
    start = time.perf_counter()
    train(window)
    return time.perf_counter() - start


def check_same_steps(ours: nn.Module, reference: nn.Module) -> None:
    for (name, p), q in zip(ours.named_parameters(), reference.parameters(), strict=True):
        error = (torch.linalg.vector_norm(p - q) / torch.linalg.vector_norm(q)).item()
        if error > 1e-5:
            raise RuntimeError(
                f"truebatch and the hand-written loop took different steps: {name} differs by "
                f"{error:.2e} relative (expected <= 1e-5); the comparison is not like for like"
            )


@dataclass(frozen=True)
class Timing:
    """Seconds per window of each loop over the timed rounds."""

    hand_written: list[float]
    truebatch: list[float]

    def ratio(self, statistic: Callable[[list[float]], float]) -> float:
        return statistic(self.truebatch) / statistic(self.hand_written)


def measure(case: Case, k: int, n_windows: int, repeats: int, progress: tqdm) -> Timing:
    """Warm up on every window, check both took the same steps, then time ``repeats``
    rounds: one window each, in alternating order, cycling through the windows."""
    torch.manual_seed(0)
    reference = case.model()
    ours = copy.deepcopy(reference)
    windows = make_windows(case, k, n_windows)
    baseline, truebatch = hand_written(reference), with_truebatch(ours)
    for window in windows:
        baseline(window)
        truebatch(window)
    check_same_steps(ours, reference)
    timing = Timing([], [])
    for round_index in range(repeats):
        window = windows[round_index % n_windows]
        if round_index % 2:
            timing.truebatch.append(timed(truebatch, window))
            timing.hand_written.append(timed(baseline, window))
        else:
            timing.hand_written.append(timed(baseline, window))
            timing.truebatch.append(timed(truebatch, window))
        progress.update()
    return timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds per case")
    parser.add_argument("--windows", type=int, default=4, help="distinct windows of data")
    parser.add_argument("--ks", default="4,8", help="micro-batches per window, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="k=4, 2 rounds: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.windows, args.ks = 2, 1, "4"
    ks = [int(k) for k in args.ks.split(",")]
    if args.repeats < 1 or args.windows < 1 or min(ks) < 1:
        parser.error("--repeats, --windows and every k must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, float32, {torch.get_num_threads()} thread(s)")
    rows = []
    with tqdm(total=len(CASES) * len(ks) * args.repeats, desc="rounds") as progress:
        for case in CASES:
            for k in ks:
                rows.append((case, k, measure(case, k, args.windows, args.repeats, progress)))
    print(
        f"\n{'model':<6}{'k':>3}{'hand-written':>16}{'truebatch':>14}{'ratio':>8}"
        f"{'ratio of minima':>18}"
    )
    for case, k, timing in rows:
        ratio = timing.ratio(statistics.median)
        verdict = "ok" if ratio <= TARGET else f"above target {TARGET}"
        print(
            f"{case.name:<6}{k:>3}{statistics.median(timing.hand_written) * 1e3:>13.2f} ms"
            f"{statistics.median(timing.truebatch) * 1e3:>11.2f} ms{ratio:>8.3f}"
            f"{timing.ratio(min):>18.3f}  {verdict}"
        )
    print(
        f"times: median per window over {args.repeats} alternating rounds; ratio = "
        f"truebatch / hand-written of the medians (target <= {TARGET}); the ratio of the "
        "fastest windows shows the cost without interference from other processes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
