"""Split-invariant layers against their native counterparts: forward + backward time.

A grid of cells, each one truebatch layer against the native layer it replaces,
in the same run:

- GhostBatchNorm1d/2d/3d with ghost sizes 2, 8, 32, 128 vs nn.BatchNorm1d/2d/3d
  (target: ratio <= 1.3);
- SplitInvariantDropout vs nn.Dropout (element-wise) and nn.Dropout2d
  (channel-wise), eager and under torch.compile (target: ratio <= 1.0);

each in float32 and bfloat16, with 1 and 2 threads. In every cell the two
layers alternate (native, truebatch, truebatch, native, ...) so that a slow
moment of the machine hits both; the cell prints the median of the per-round
time ratios truebatch / native, the native time, and the 1-minute load average
when the cell ran. A load above the number of CPUs means other processes took
the cores during the cell: its ratio is then unreliable, and the line says so.

Run: python benchmarks/layers.py [--repeats 15] [--threads 1,2] [--no-compile]
     python benchmarks/layers.py --quick   (2 rounds per cell, no compiled cells: a smoke
                                            run, exit 0 whatever the ratios)
     python benchmarks/layers.py --only "GhostBatchNorm1d"   (the cells whose name has it)
     python benchmarks/layers.py --cpu-time --threads 1   (CPU time, for a loaded machine)
     python benchmarks/layers.py --compiled-batchnorm   (adds GhostBatchNorm under
                                            torch.compile vs compiled BatchNorm)
The default grid takes about a minute on 2 idle CPUs once the compiled dropout
cells are in torch's compile cache (the first run compiles them); --compiled-batchnorm
adds 48 compilations. On CPU the truebatch layers run on truebatch's C++ kernel,
built on first use (truebatch/nn/cpu_kernels.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

import truebatch.nn as tnn

GHOST_SIZES = (2, 8, 32, 128)
BATCHNORM_TARGET = 1.3
DROPOUT_TARGET = 1.0
# (name, native class, ghost class, input shape): 256 samples (4096 rows for 1d)
BATCHNORMS = (
    ("1d", nn.BatchNorm1d, tnn.GhostBatchNorm1d, (4096, 256)),
    ("2d", nn.BatchNorm2d, tnn.GhostBatchNorm2d, (256, 32, 16, 16)),
    ("3d", nn.BatchNorm3d, tnn.GhostBatchNorm3d, (256, 16, 4, 8, 8)),
)
# (name, native layer, channelwise, input shape)
DROPOUTS = (
    ("element-wise", lambda: nn.Dropout(0.1), False, (256, 4096)),
    ("element-wise tokens", lambda: nn.Dropout(0.1), False, (16, 128, 768)),
    ("channel-wise", lambda: nn.Dropout2d(0.1), True, (256, 32, 16, 16)),
)


@dataclass(frozen=True)
class Cell:
    family: str  # "GhostBatchNorm" or "SplitInvariantDropout"
    name: str
    native: nn.Module
    ours: nn.Module
    shape: tuple[int, ...]
    dtype: torch.dtype
    target: float


def cells(
    dtypes: list[torch.dtype], *, compiled: bool, compiled_batchnorm: bool = False
) -> Iterator[Cell]:
    for dtype in dtypes:
        for mode in ("eager", "compiled") if compiled_batchnorm else ("eager",):
            for kind, native_cls, ghost_cls, shape in BATCHNORMS:
                for ghost in GHOST_SIZES:
                    ours: nn.Module = ghost_cls(shape[1], ghost).to(dtype)
                    theirs: nn.Module = native_cls(shape[1]).to(dtype)
                    if mode == "compiled":
                        torch._dynamo.reset()
                        ours, theirs = torch.compile(ours), torch.compile(theirs)
                    yield Cell(
                        "GhostBatchNorm",
                        f"GhostBatchNorm{kind}(g={ghost})"
                        + (" compiled" if mode == "compiled" else "")
                        + f" {'x'.join(map(str, shape))}",
                        theirs,
                        ours,
                        shape,
                        dtype,
                        BATCHNORM_TARGET,
                    )
        for mode in ("eager", "compiled") if compiled else ("eager",):
            for kind, native, channelwise, shape in DROPOUTS:
                ours = tnn.SplitInvariantDropout(0.1, channelwise=channelwise)
                theirs = native()
                if mode == "compiled":
                    torch._dynamo.reset()  # each cell compiles afresh, within the recompile limit
                    ours, theirs = torch.compile(ours), torch.compile(theirs)
                yield Cell(
                    "SplitInvariantDropout",
                    f"SplitInvariantDropout {kind} {mode} {'x'.join(map(str, shape))}",
                    theirs,
                    ours,
                    shape,
                    dtype,
                    DROPOUT_TARGET,
                )


def step_timer(
    layer: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    clock: Callable[[], float] = time.perf_counter,
) -> Callable[[], float]:
    """A function that runs one train-mode forward + backward and returns its seconds."""
    layer.train()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(shape, generator=generator).to(dtype)

    def step() -> float:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        start = clock()
        layer(x).backward(grad)
        return clock() - start

    return step


def measure(
    cell: Cell, repeats: int, warmup: int, clock: Callable[[], float]
) -> tuple[float, float]:
    """(median native seconds, median per-round ratio truebatch / native), interleaved."""
    native, ours = (
        step_timer(cell.native, cell.shape, cell.dtype, clock),
        step_timer(cell.ours, cell.shape, cell.dtype, clock),
    )
    for _ in range(warmup):
        native(), ours()
    native_times, ratios = [], []
    for i in range(repeats):
        if i % 2:
            o, n = ours(), native()
        else:
            n, o = native(), ours()
        native_times.append(n)
        ratios.append(o / n)
    return statistics.median(native_times), statistics.median(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per cell")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per cell")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile cells")
    parser.add_argument("--only", default="", help="run only the cells whose name contains this")
    parser.add_argument(
        "--compiled-batchnorm",
        action="store_true",
        help="add GhostBatchNorm cells under torch.compile (vs compiled BatchNorm; slow to run)",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the process's CPU time instead of the wall clock: on a loaded machine "
        "it leaves out the time other processes hold the cores (1 thread: with more, "
        "waiting threads may count)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds, 1 warm-up, no compile: check that it runs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.no_compile = 2, 1, True
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    threads = [int(t) for t in args.threads.split(",")]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    cpus = os.cpu_count() or 1
    print(
        f"torch {torch.__version__}, CPU, {cpus} CPUs, "
        f"{'process CPU time' if args.cpu_time else 'wall clock'}; ratio = truebatch / native "
        f"(median of {args.repeats} interleaved rounds); load = 1-minute load average"
    )
    worst: dict[str, tuple[float, str]] = {}
    failed, unreliable = False, 0
    for count in threads:
        torch.set_num_threads(count)
        for cell in cells(
            dtypes, compiled=not args.no_compile, compiled_batchnorm=args.compiled_batchnorm
        ):
            if args.only not in cell.name:
                continue
            clock = time.process_time if args.cpu_time else time.perf_counter
            native, ratio = measure(cell, args.repeats, args.warmup, clock)
            load = os.getloadavg()[0]
            passed = ratio <= cell.target
            failed |= not passed
            busy = load > cpus
            unreliable += busy
            where = f"{cell.name} {str(cell.dtype).removeprefix('torch.')} {count} thread(s)"
            print(
                f"{where}: native {native * 1e3:.2f} ms, ratio {ratio:.2f} "
                f"{'ok' if passed else 'ABOVE'} (<= {cell.target}), load {load:.1f}"
                + (f" > {cpus} CPUs: unreliable" if busy else "")
            )
            if ratio > worst.get(cell.family, (0.0, ""))[0]:
                worst[cell.family] = (ratio, f"{where}, load {load:.1f}")
    for family, (ratio, where) in worst.items():
        print(f"worst {family}: ratio {ratio:.2f} ({where})")
    if unreliable:
        print(
            f"{unreliable} cell(s) ran with the load above {cpus}: their ratios measure the "
            "other processes as much as the layers; rerun on an idle machine"
        )
    if args.quick:
        print("quick run: too few rounds to judge the targets (run without --quick)")
        return 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
