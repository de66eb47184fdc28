"""HSDP: the cross-replica all-reduce once per window vs every micro-batch, 4 gloo processes.

One MLP sharded with FSDP2's ``fully_shard`` on a 2 x 2 (replicate, shard)
device mesh (HSDP), trained by truebatch with k micro-batches per rank and
window, in each of its gradient synchronization modes:

- ``hybrid`` (HSDP's default): every pass reduce-scatters its gradient within
  the replica (2 ranks); the all-reduce across the replicas runs once, on the
  window's last pass (``set_requires_all_reduce(False)`` before). Each rank
  keeps its gradient shard only, as in ``micro_batch``;
- ``hybrid_again``: the same, timed as a method of its own: its ratio to
  ``hybrid`` is the noise floor of the run;
- ``micro_batch``: the reduce-scatter and the cross-replica all-reduce after
  every pass;
- ``window``: one reduce-scatter and one all-reduce per window, but every rank
  keeps the whole unsharded gradient until the last pass.

Every method first trains its own copy on the same data and the final
parameters are compared with ``hybrid``'s. For timing, all methods share one
sharded model and optimizer; each round runs window 1 of every method, then
window 2, and so on, the methods' order rotating from round to round; every
timed window starts with a barrier on all ranks and counts the slowest rank.
Prints the median time per window and the medians of the per-round ratios.

    python benchmarks/hsdp.py [--rounds 10] [--k 8] [--micro-batch-size 16]
    python benchmarks/hsdp.py --quick   (a smoke run: too few rounds to judge)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from ddp import CLASSES, FEATURES, Window, full_parameters, loss_sum, make_windows, run_ranks
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import truebatch as tb

WORLD_SIZE = 4
MESH = (2, 2)  # (replicate, shard)
METHODS = ("hybrid", "hybrid_again", "micro_batch", "window")
HIDDEN = 512  # the data (FEATURES, CLASSES, make_windows) is ddp.py's


def sharded_model() -> nn.Module:
    """The same float32 MLP on every rank, every Linear and the whole sharded on HSDP."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    )
    mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def runners(model: nn.Module | None) -> tuple[dict[str, Callable[[Window], Any]], dict]:
    """Per method, a function that trains one window, and the method's model: all share
    ``model`` (and one optimizer) when it is given, else each has its own copy."""
    models = {name: model or sharded_model() for name in METHODS}
    optimizers: dict[int, torch.optim.Optimizer] = {}
    for each in models.values():
        optimizers.setdefault(id(each), torch.optim.SGD(each.parameters(), lr=0.05))
    run = {}
    for name in METHODS:
        mode = "hybrid" if name.startswith("hybrid") else name
        acc = tb.Accumulator(models[name], optimizers[id(models[name])], gradient_sync=mode)
        run[name] = functools.partial(acc.step_window, loss_fn=loss_sum)
    return run, models


def worker(rank: int, port: int, args: argparse.Namespace, results: Any) -> None:
    """One rank: train every method once, then time them round after round."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120)
    )
    try:
        data = make_windows(rank, args.windows, args.k, args.micro_batch_size)
        run, models = runners(None)
        for name in METHODS:
            for window in data:
                run[name](window)
        reference = full_parameters(models["hybrid"])
        differences = {
            name: tb.max_relative_difference(full_parameters(models[name]), reference)
            for name in METHODS[1:]
        }
        run, _ = runners(sharded_model())
        times: dict[str, list[float]] = {name: [] for name in METHODS}
        for round_index in range(args.warmup + args.rounds):
            shift = round_index % len(METHODS)
            order = METHODS[shift:] + METHODS[:shift]
            elapsed = torch.zeros(len(data), len(METHODS), dtype=torch.float64)
            for index, window in enumerate(data):
                for name in order:
                    dist.barrier()
                    start = time.perf_counter()
                    run[name](window)
                    elapsed[index, METHODS.index(name)] = time.perf_counter() - start
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if round_index >= args.warmup:
                for name, seconds in zip(METHODS, elapsed.sum(0).tolist(), strict=True):
                    times[name].append(seconds / len(data))
        if rank == 0:
            results.put({"times": times, "differences": differences})
    finally:
        dist.destroy_process_group()


def report(args: argparse.Namespace, outcome: dict[str, Any]) -> None:
    times = outcome["times"]
    parameters = FEATURES * HIDDEN + HIDDEN * HIDDEN + HIDDEN * CLASSES + 2 * HIDDEN + CLASSES
    print(
        f"torch {torch.__version__}, {WORLD_SIZE} gloo processes x 1 thread, CPU, float32; "
        f"HSDP mesh {MESH} (replicate, shard); MLP {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES} "
        f"({parameters:,} parameters)"
    )
    print(
        f"window: k={args.k} micro-batches of {args.micro_batch_size} per rank; "
        f"{args.rounds} rounds of {args.windows} windows per method, interleaved, order rotating"
    )
    for name in METHODS:
        print(f"  {name:<13} {statistics.median(times[name]) * 1e3:8.2f} ms per window")

    def ratio(ours: str, baseline: str) -> float:
        return statistics.median(a / b for a, b in zip(times[ours], times[baseline], strict=True))

    print(
        f"hybrid / micro_batch = {ratio('hybrid', 'micro_batch'):.3f}  (cross-replica "
        "all-reduce once per window vs every micro-batch)"
    )
    print(f"hybrid_again / hybrid = {ratio('hybrid_again', 'hybrid'):.3f}  (the noise floor)")
    print(f"window / hybrid = {ratio('window', 'hybrid'):.3f}")
    mib = parameters * 4 / 2**20
    shard = mib / MESH[1]
    print(
        f"gradient held per rank between passes (float32): hybrid {shard:.2f} MiB and "
        f"micro_batch {shard:.2f} MiB (the shard), window {mib:.2f} MiB (unsharded)"
    )
    print("final parameters, max relative difference to hybrid's (float32 summation order):")
    for name, difference in outcome["differences"].items():
        print(f"  {name:<13} {difference:.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--windows", type=int, default=2, help="windows per method and round")
    parser.add_argument("--k", type=int, default=8, help="micro-batches per window")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=900, help="seconds before giving up")
    parser.add_argument("--quick", action="store_true", help="2 short rounds: check that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.windows, args.k, args.micro_batch_size = 2, 0, 1, 2, 4
    for name in ("rounds", "windows", "k", "micro_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    report(args, run_ranks(args, worker, WORLD_SIZE))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
