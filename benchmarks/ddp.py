"""DDP: truebatch against hand-written accumulation loops, 2 gloo processes on CPU.

Ways to train the same DDP-wrapped MLP on the same data, k micro-batches of
equal size per window and one SGD step per window:

- ``truebatch``: ``tb.Accumulator(ddp, optimizer).step_window(window, loss_fn)``
  (one exchange of item counts that travels during the passes, gradients
  all-reduced on the last pass only, one all-reduce of the loss that travels
  during the last backward, the global gradient norm);
- ``no_sync``: the usual hand-written loop, ``(mean loss / k).backward()``
  under ``ddp.no_sync()`` except for the last micro-batch, then step and zero;
- ``no_sync_again``: the ``no_sync`` loop once more, timed as a method of its
  own: its ratio to ``no_sync`` shows how far apart two identical methods land
  in a run (the noise floor of the ratios);
- ``sync_every``: the same loop without ``no_sync``: DDP all-reduces the
  gradients after every micro-batch;

and, for the cost of FSDP2's two modes, truebatch on the same MLP sharded with
``fully_shard`` (each Linear, then the whole):

- ``fsdp2_micro_batch`` (``gradient_sync="micro_batch"``, FSDP2's default):
  a reduce-scatter after every pass, each rank keeps only its gradient shard;
- ``fsdp2_window`` (``gradient_sync="window"``): one reduce-scatter per window,
  but each rank keeps the whole unsharded gradient until the window's last pass.

First every method trains its own copy of the model on the data, and the final
parameters are compared. Then, for timing, the DDP methods share one DDP model
and optimizer (and the FSDP2 methods one sharded model), so that they differ
only in their loops: two copies of one model can differ by a few percent in
speed, from where their tensors lie in memory. Each round runs ``--windows``
windows of every method, interleaved: window 1 of every method, then window 2
of every method, and so on, the order of the methods rotating from round to
round, so that a slow moment of the shared machine hits all of them alike.
Both ranks start every timed window together (a barrier), and a window's time
is the slower rank's; a method's time in a round is the sum over its windows. The time
truebatch spends in its own two small collectives per window (rank 0) is
reported too. Prints the median per-window times and the medians of the
per-round ratios truebatch / no_sync (target <= 1.03: PASS/FAIL), no_sync_again
/ no_sync, truebatch / sync_every and fsdp2_window / fsdp2_micro_batch, and how
far every method's final parameters are from truebatch's (float32 summation
order).

    python benchmarks/ddp.py [--rounds 20] [--k 8] [--micro-batch-size 32]
    python benchmarks/ddp.py --quick   (3 short rounds: a smoke run, exit 0
                                        whatever the ratios, too noisy to judge)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import multiprocessing
import os
import queue
import socket
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

import truebatch as tb
from truebatch.distributed import GradientSync

WORLD_SIZE = 2
METHODS = (
    "truebatch",
    "no_sync",
    "no_sync_again",
    "sync_every",
    "fsdp2_micro_batch",
    "fsdp2_window",
)
TARGET = 1.03
FEATURES, HIDDEN, CLASSES = 256, 1024, 10

Batch = tuple[torch.Tensor, torch.Tensor]
Window = list[Batch]


def build_model() -> nn.Module:
    """The same float32 MLP on every rank and for every method."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    )


def make_windows(rank: int, count: int, k: int, micro_batch_size: int) -> list[Window]:
    """``count`` windows of ``k`` micro-batches for ``rank`` (different data per rank)."""
    generator = torch.Generator().manual_seed(1000 + rank)

    def micro_batch() -> Batch:
        x = torch.randn(micro_batch_size, FEATURES, generator=generator)
        return x, torch.randint(0, CLASSES, (micro_batch_size,), generator=generator)

    return [[micro_batch() for _ in range(k)] for _ in range(count)]


def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """truebatch's loss_fn: the SUM of the per-sample losses."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def hand_written(
    ddp: nn.Module, optimizer: torch.optim.Optimizer, no_sync: bool
) -> Callable[[Window], None]:
    """The hand-written window: mean loss / k per micro-batch, one step at the end."""

    def run(window: Window) -> None:
        for index, (x, y) in enumerate(window):
            last = index == len(window) - 1
            with nullcontext() if last or not no_sync else ddp.no_sync():
                (F.cross_entropy(ddp(x), y) / len(window)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def sharded_model() -> nn.Module:
    """:func:`build_model` sharded with FSDP2: every Linear, then the whole."""
    model = build_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def window_runners(
    shared: bool,
) -> tuple[dict[str, Callable[[Window], Any]], dict[str, nn.Module], GradientSync]:
    """Per method, a function that trains one window, and the method's model; and the
    GradientSync of truebatch's DDP Accumulator (its collectives are timed).

    With ``shared`` the DDP methods train one DDP model with one optimizer, and
    the FSDP2 methods one sharded model: timed on the same tensors, the methods
    differ only in their loops (two copies of one model can differ by a few
    percent in speed here, from where their tensors happen to lie in memory).
    Without it every method trains its own copy of the same initial model, so
    that their parameters can be compared afterwards.
    """
    one_ddp = nn.parallel.DistributedDataParallel(build_model()) if shared else None
    one_fsdp2 = sharded_model() if shared else None
    models: dict[str, nn.Module] = {
        name: (one_fsdp2 or sharded_model())
        if name.startswith("fsdp2")
        else (one_ddp or nn.parallel.DistributedDataParallel(build_model()))
        for name in METHODS
    }
    by_model: dict[int, torch.optim.Optimizer] = {}
    for model in models.values():
        if id(model) not in by_model:
            by_model[id(model)] = torch.optim.SGD(model.parameters(), lr=0.05)
    optimizers = {name: by_model[id(model)] for name, model in models.items()}
    accumulators = {
        name: tb.Accumulator(models[name], optimizers[name], gradient_sync=mode)
        for name, mode in (
            ("truebatch", None),
            ("fsdp2_micro_batch", "micro_batch"),
            ("fsdp2_window", "window"),
        )
    }
    runners: dict[str, Callable[[Window], Any]] = {
        name: functools.partial(accumulator.step_window, loss_fn=loss_sum)
        for name, accumulator in accumulators.items()
    }
    for name in ("no_sync", "no_sync_again", "sync_every"):
        runners[name] = hand_written(models[name], optimizers[name], no_sync=name != "sync_every")
    return runners, models, accumulators["truebatch"].sync


def time_collectives(sync: GradientSync) -> list[float]:
    """Make ``sync``'s own collectives add their seconds to the returned 1-element list:
    the count exchange, and both the start of the loss all-reduce and the wait for it."""
    spent = [0.0]

    def timed(method: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                result = method(*args)
            finally:
                spent[0] += time.perf_counter() - start
            return timed(result) if callable(result) else result

        return run

    sync.exchange = timed(sync.exchange)
    sync.all_reduce = timed(sync.all_reduce)
    return spent


def parameter_differences(data: list[Window]) -> dict[str, float]:
    """Every method trains its own copy on ``data``: how far each ends from truebatch."""
    runners, models, _ = window_runners(shared=False)
    for name in METHODS:
        for window in data:
            runners[name](window)
    reference = full_parameters(models["truebatch"])
    return {
        name: tb.max_relative_difference(full_parameters(models[name]), reference)
        for name in METHODS[1:]
    }


def full_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters, whole (FSDP2's shards gathered)."""
    return [
        p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
        for p in model.parameters()
    ]


def worker(rank: int, port: int, args: argparse.Namespace, results: Any) -> None:
    """One rank: time every method, round after round; rank 0 sends the times back."""
    # Two processes on two cores: one intra-op thread each, as torchrun would set.
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120)
    )
    try:
        data = make_windows(rank, args.windows, args.k, args.micro_batch_size)
        differences = parameter_differences(data)
        runners, _, sync = window_runners(shared=True)
        collective_seconds = time_collectives(sync)
        times: dict[str, list[float]] = {name: [] for name in METHODS}
        collectives: list[float] = []
        for round_index in range(args.warmup + args.rounds):
            shift = round_index % len(METHODS)
            order = METHODS[shift:] + METHODS[:shift]
            # Seconds per (window, method) on this rank; then the slower rank's.
            elapsed = torch.zeros(len(data), len(METHODS), dtype=torch.float64)
            spent_before = collective_seconds[0]
            for index, window in enumerate(data):
                for name in order:
                    dist.barrier()
                    start = time.perf_counter()
                    runners[name](window)
                    elapsed[index, METHODS.index(name)] = time.perf_counter() - start
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if round_index >= args.warmup:
                for name, seconds in zip(METHODS, elapsed.sum(0).tolist(), strict=True):
                    times[name].append(seconds / len(data))
                collectives.append((collective_seconds[0] - spent_before) / len(data))
        if rank == 0:
            results.put({"times": times, "collectives": collectives, "differences": differences})
    finally:
        dist.destroy_process_group()


def run_ranks(
    args: argparse.Namespace,
    worker: Callable[..., None] = worker,
    world_size: int = WORLD_SIZE,
) -> dict[str, Any]:
    """Start ``world_size`` processes running ``worker(rank, port, args, results)``
    (default: this benchmark's); rank 0's results, or an error if one fails or hangs.
    ``benchmarks/hsdp.py`` runs its own worker through it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=worker, args=(rank, port, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    try:
        outcome = results.get(timeout=args.timeout)
    except queue.Empty:
        outcome = None
    for process in processes:
        process.join(30)
        if process.is_alive():
            process.terminate()
    codes = [process.exitcode for process in processes]
    if outcome is None or any(code != 0 for code in codes):
        raise RuntimeError(
            f"the benchmark's ranks did not finish within {args.timeout} s or failed (exit "
            f"codes {codes}); their tracebacks are printed above"
        )
    return outcome


def report(args: argparse.Namespace, outcome: dict[str, Any]) -> bool:
    """Print times and ratios; whether truebatch met the target against the no_sync loop."""
    times = outcome["times"]
    parameters = sum(p.numel() for p in build_model().parameters())
    print(
        f"torch {torch.__version__}, {WORLD_SIZE} gloo processes x 1 thread, CPU, float32; "
        f"MLP {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES} ({parameters:,} parameters)"
    )
    print(
        f"window: k={args.k} micro-batches of {args.micro_batch_size} per rank; "
        f"{args.rounds} rounds of {args.windows} windows per method, interleaved, order rotating"
    )
    for name in METHODS:
        print(f"  {name:<17} {statistics.median(times[name]) * 1e3:8.2f} ms per window")
        if name == "truebatch":
            print(
                "    of which in its own collectives (N exchange, loss all-reduce), rank 0: "
                f"{statistics.median(outcome['collectives']) * 1e3:.2f} ms"
            )

    def ratio(ours: str, baseline: str) -> float:
        pairs = zip(times[ours], times[baseline], strict=True)
        return statistics.median(a / b for a, b in pairs)

    no_sync = ratio("truebatch", "no_sync")
    passed = no_sync <= TARGET
    print(f"truebatch / no_sync    = {no_sync:.3f}  (<= {TARGET}: {'PASS' if passed else 'FAIL'})")
    print(
        f"no_sync_again / no_sync = {ratio('no_sync_again', 'no_sync'):.3f}  (the same loop "
        "twice: how far apart two identical methods land in this run)"
    )
    print(f"truebatch / sync_every = {ratio('truebatch', 'sync_every'):.3f}")
    print(f"fsdp2_window / fsdp2_micro_batch = {ratio('fsdp2_window', 'fsdp2_micro_batch'):.3f}")
    mib = parameters * 4 / 2**20
    print(
        f"gradient held per rank between passes (float32, from the parameter count): "
        f"fsdp2_micro_batch {mib / WORLD_SIZE:.1f} MiB (its shard), fsdp2_window {mib:.1f} MiB"
    )
    print("final parameters, max relative difference to truebatch's (float32 summation order):")
    for name, difference in outcome["differences"].items():
        print(f"  {name:<17} {difference:.1e}")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--windows", type=int, default=3, help="windows per method and round")
    parser.add_argument("--k", type=int, default=8, help="micro-batches per window")
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=900, help="seconds before giving up")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 rounds of 1 window of 2 micro-batches of 8, 1 warm-up: check that it runs",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.windows, args.k, args.micro_batch_size = 3, 1, 1, 2, 8
    for name in ("rounds", "windows", "k", "micro_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    passed = report(args, run_ranks(args))
    if args.quick:
        print("quick run: too few rounds to judge the target (run without --quick)")
        return 0
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
