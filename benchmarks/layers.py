"""Split-invariant layers against their native counterparts: forward + backward time.

Each case builds a native layer and its truebatch replacement, warms both up,
then alternates them (native, truebatch, truebatch, native, ...) so that a
slow moment of the machine hits both, and prints the median of the per-round
time ratios truebatch / native, with PASS/FAIL for the cases that have a target:

- GhostBatchNorm2d (ghost size 32) vs nn.BatchNorm2d, batch 256x64x16x16: <= 1.3
- SplitInvariantDropout vs nn.Dropout, 256x4096 float32:                    <= 1.5

Run: python benchmarks/layers.py [--repeats 30] [--threads 2]
     python benchmarks/layers.py --quick   (3 rounds per case: a smoke run, exit 0 whatever
                                            the ratios, which are too noisy to judge)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import truebatch.nn as tnn


@dataclass(frozen=True)
class Case:
    name: str
    native: nn.Module
    ours: nn.Module
    shape: tuple[int, ...]
    target: float | None  # max allowed ratio; None: reported only


def cases() -> list[Case]:
    return [
        Case(
            "GhostBatchNorm2d(g=32) / BatchNorm2d, 256x64x16x16",
            nn.BatchNorm2d(64),
            tnn.GhostBatchNorm2d(64, ghost_batch_size=32),
            (256, 64, 16, 16),
            1.3,
        ),
        Case(
            "SplitInvariantDropout / Dropout (p=0.5), 256x4096",
            nn.Dropout(0.5),
            tnn.SplitInvariantDropout(0.5),
            (256, 4096),
            1.5,
        ),
        Case(
            "GhostBatchNorm1d(g=8) / BatchNorm1d, 4096x256 (512 ghost batches)",
            nn.BatchNorm1d(256),
            tnn.GhostBatchNorm1d(256, ghost_batch_size=8),
            (4096, 256),
            None,
        ),
        Case(
            "SplitInvariantDropout(channelwise) / Dropout2d, 256x64x16x16",
            nn.Dropout2d(0.5),
            tnn.SplitInvariantDropout(0.5, channelwise=True),
            (256, 64, 16, 16),
            None,
        ),
    ]


def step_timer(layer: nn.Module, shape: tuple[int, ...]) -> Callable[[], float]:
    """A function that runs one train-mode forward + backward and returns its seconds."""
    layer.train()
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)

    def step() -> float:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        layer(x).backward(grad)
        return time.perf_counter() - start

    return step


def measure(case: Case, repeats: int, warmup: int) -> tuple[float, float, float]:
    """(median native seconds, median truebatch seconds, median per-round ratio)."""
    native, ours = step_timer(case.native, case.shape), step_timer(case.ours, case.shape)
    for _ in range(warmup):
        native(), ours()
    native_times, our_times = [], []
    for i in range(repeats):
        if i % 2:
            our_times.append(ours())
            native_times.append(native())
        else:
            native_times.append(native())
            our_times.append(ours())
    ratios = [o / n for o, n in zip(our_times, native_times, strict=True)]
    return statistics.median(native_times), statistics.median(our_times), statistics.median(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds per case")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds, 1 warm-up: check that it runs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (ratios are only "
        "meaningful when it is below the CPU count: each ghost batch is its own kernel call, "
        "which a busy machine delays more than one call)"
    )
    failed = False
    for case in cases():
        native, ours, ratio = measure(case, args.repeats, args.warmup)
        if case.target is None:
            verdict = "(info)"
        else:
            passed = ratio <= case.target
            failed |= not passed
            verdict = f"{'PASS' if passed else 'FAIL'} (target <= {case.target})"
        print(
            f"{case.name}: native {native * 1e3:.2f} ms, truebatch {ours * 1e3:.2f} ms, "
            f"ratio {ratio:.2f} {verdict}"
        )
    if args.quick:
        print("quick run: too few rounds to judge the targets (run without --quick)")
        return 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
