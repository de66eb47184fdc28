"""How long ``tb.check`` takes on a ~100k-parameter model, against one training step.

The model is an MLP 64 -> 256 -> 256 -> 64 -> 10 with BatchNorm1d and dropout
after each hidden layer (100,682 parameters), on a batch of 64 float32 samples.
Two cases, each checked with the default micro-batch sizes in float64:

- as written (BatchNorm and dropout in train mode): NOT equivalent, with
  findings, and the extra passes that localize them (eval mode, each culprit
  module alone);
- converted with ``tb.nn.convert_batchnorm(ghost_batch_size=8)`` and
  ``tb.nn.convert_dropout``: equivalent.

The baseline is one plain full-batch forward + backward of the same model in
float32, the step the user's training loop takes. After a warm-up, each round
times the baseline (median of 20 steps) and then one check of each case; the
ratio check / baseline is taken per round and its median printed.

Run: python benchmarks/check_speed.py [--repeats 5] [--threads 2]
     python benchmarks/check_speed.py --quick   (1 round, no warm-up: a smoke run)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import truebatch as tb
import truebatch.nn as tbnn

FEATURES, CLASSES, BATCH, GHOST = 64, 10, 64, 8
BASELINE_STEPS = 20


def mlp() -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU -> Dropout(0.1), three times, then Linear."""
    layers: list[nn.Module] = []
    widths = [FEATURES, 256, 256, 64]
    for inputs, outputs in itertools.pairwise(widths):
        layers += [nn.Linear(inputs, outputs), nn.BatchNorm1d(outputs), nn.ReLU(), nn.Dropout(0.1)]
    return nn.Sequential(*layers, nn.Linear(widths[-1], CLASSES))


def loss_sum(model: nn.Module, micro_batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed over the samples."""
    x, y = micro_batch
    return F.cross_entropy(model(x), y, reduction="sum")


def baseline_seconds(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Median seconds of one full-batch forward + backward, over ``BASELINE_STEPS``."""
    times = []
    for _ in range(BASELINE_STEPS):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        (loss_sum(model, batch) / BATCH).backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def timed_round(
    model: nn.Module, cases: dict[str, nn.Module], batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[dict[str, float], dict[str, tb.Report]]:
    """Seconds of the baseline step and of one check per case; the checks' reports."""
    seconds, reports = {"baseline": baseline_seconds(model, batch)}, {}
    for name, case in cases.items():
        start = time.perf_counter()
        reports[name] = tb.check(case, loss_sum, batch)
        seconds[name] = time.perf_counter() - start
    return seconds, reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="1 round, no warm-up: that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 0
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"need --repeats >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mlp()
    batch = (torch.randn(BATCH, FEATURES), torch.randint(0, CLASSES, (BATCH,)))
    converted = tbnn.convert_dropout(tbnn.convert_batchnorm(mlp(), ghost_batch_size=GHOST))
    cases: dict[str, nn.Module] = {
        "as written (BatchNorm, dropout)": model,
        f"converted (ghost BN g={GHOST}, split-invariant dropout)": converted,
    }
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; MLP with "
        f"{parameters:,} parameters, batch {BATCH}; check in float64, baseline step in float32"
    )
    for _ in range(args.warmup):
        timed_round(model, cases, batch)
    rounds = []
    for _ in range(args.repeats):
        times, reports = timed_round(model, cases, batch)
        rounds.append(times)
    for name, report in reports.items():
        kinds = sorted({f.kind for f in report.findings})
        print(
            f"{name}: {'equivalent' if report.equivalent else 'NOT equivalent'}, micro-batch "
            f"sizes {sorted(report.max_relative_difference)}, findings {kinds or 'none'}"
        )
    base = statistics.median(r["baseline"] for r in rounds)
    print(f"baseline: one full-batch forward + backward {base * 1e3:.2f} ms")
    for name in cases:
        seconds = statistics.median(r[name] for r in rounds)
        ratio = statistics.median(r[name] / r["baseline"] for r in rounds)
        print(f"check, {name}: {seconds:.2f} s, ratio {ratio:.0f}x the baseline step")
    if args.quick:
        print("quick run: one round without warm-up, too noisy to judge (run without --quick)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
