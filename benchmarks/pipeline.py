"""Pipeline parallelism: truebatch against the schedule's own loss scaling, 2 gloo processes.

A 2-stage pipeline (stage 0: embedding and a tanh layer, stage 1: a tanh layer
and the vocabulary head) on CPU, one process per stage, trains on batches of
variable-length token sequences padded to one length, ``--k`` micro-batches
per schedule run, one SGD step per run. Three methods, each on its own copy of
the model (same initial weights) and its own schedule:

- ``truebatch``: ``tb.PipelineAccumulator(schedule, optimizer).step(...)``, the
  schedule built with a loss_fn returning the SUM of the token losses: N counted
  on the last stage before the run, one all-reduce of the norm, loss and N over
  the two stages after it;
- ``own_scaling``: ``schedule.step(...)`` with a loss_fn returning each
  micro-batch's MEAN token loss and the schedule's ``scale_grads=True`` (it divides
  the gradient by k), then ``optimizer.step()`` and ``zero_grad()``: the usual loop;
- ``own_scaling_clip``: the same loop with what truebatch also computes, the
  gradient norm over both stages (one all-reduce of the squared norms) for
  ``clip_grads_with_norm_``, as pipeline trainers clip.

truebatch clips with ``max_grad_norm=MAX_NORM`` too, a norm no window reaches:
both compute the global norm and never change the gradient.

Timing: rounds of ``--windows`` windows per method, interleaved window by
window, the order rotating from round to round; both ranks start every window
together (a barrier) and a window's time is the slower rank's. Prints the
median ms per window of each method and the medians of the per-round ratios
truebatch / each loop (the same within noise is the target).

Gradients: from the same weights and batch, in float64, the first window's
gradient of each method against one process on the whole model and batch (the
mean over all N tokens), per tensor (``tb.max_relative_difference``):
truebatch's is the big batch's up to rounding (1e-12, the contract), the
schedule's own scaling is the mean of the micro-batches' means, which differs
as soon as their token counts do. The timed windows run in float32.

    python benchmarks/pipeline.py [--rounds 20] [--k 4] [--rows 32] [--length 64]
    python benchmarks/pipeline.py --quick   (a smoke run, too short to judge)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import multiprocessing
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

import truebatch as tb

VOCAB, HIDDEN, IGNORE = 256, 128, -100
MAX_NORM = 1e9  # clipping computes the global norm; no window is actually clipped
METHODS = ("truebatch", "own_scaling", "own_scaling_clip")


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(VOCAB, HIDDEN),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, VOCAB),
    )


def stage_module(model: nn.Sequential, stage: int) -> nn.Module:
    return model[:3] if stage == 0 else model[3:]


def batch(args: argparse.Namespace, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and next-token targets, each row of a random length, padding ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (args.rows, args.length), generator=g)
    lengths = torch.randint(2, args.length + 1, (args.rows,), generator=g)
    target = torch.full_like(ids, IGNORE)
    target[:, :-1] = ids[:, 1:]
    target[torch.arange(args.length) >= lengths[:, None] - 1] = IGNORE
    return ids, target


def loss_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def loss_mean(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE)


def worker(rank: int, port: int, args: argparse.Namespace, results: Any) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120)
    )
    count = tb.count_tokens("target", shift=False)

    def build_methods(model: nn.Sequential) -> dict[str, Any]:
        """Each method's stage module (a copy of ``model``'s), schedule, optimizer."""
        methods = {}
        for name in METHODS:
            module = stage_module(copy.deepcopy(model), rank)
            stage = PipelineStage(module, rank, 2, torch.device("cpu"))
            own = name != "truebatch"
            schedule = ScheduleGPipe(
                stage, n_microbatches=args.k, loss_fn=loss_mean if own else loss_sum
            )
            optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
            acc = (
                None if own else tb.PipelineAccumulator(schedule, optimizer, max_grad_norm=MAX_NORM)
            )
            methods[name] = (module, schedule, optimizer, acc, name == "own_scaling_clip")
        return methods

    def window(method: tuple, seed: int) -> None:
        module, schedule, optimizer, acc, clip = method
        ids, target = batch(args, seed)
        inputs = (ids,) if rank == 0 else ()
        targets = target if rank == 1 else None
        if acc is not None:
            acc.step(*inputs, target=targets, count=count)
            return
        schedule.step(*inputs, target=targets)
        if clip:  # the norm of the whole model: the stages' squared norms, summed
            grads = [p.grad for p in module.parameters()]
            squared = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) ** 2
            dist.all_reduce(squared)
            nn.utils.clip_grads_with_norm_(grads, MAX_NORM, squared.sqrt())
        optimizer.step()
        optimizer.zero_grad()

    # The first window's gradient in float64, as the optimizer sees it (a step pre-hook),
    # so that only the methods differ, not float32 rounding.
    model = build_model().double()
    ids, target = batch(args, 0)
    (loss_sum(model(ids), target) / (target != IGNORE).sum()).backward()
    exact = [p.grad for p in stage_module(model, rank).parameters()]
    differences = {}
    for name, method in build_methods(model).items():
        seen: list[torch.Tensor] = []

        def capture(optimizer: Any, *_: Any, seen: list = seen) -> None:
            seen.extend(p.grad.clone() for group in optimizer.param_groups for p in group["params"])

        method[2].register_step_pre_hook(capture)
        window(method, 0)
        differences[name] = tb.max_relative_difference(seen, exact)

    methods = build_methods(build_model())
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for round_index in range(args.warmup + args.rounds):
        shift = round_index % len(METHODS)
        order = METHODS[shift:] + METHODS[:shift]
        spent = dict.fromkeys(METHODS, 0.0)
        for w in range(args.windows):
            for name in order:
                dist.barrier()
                start = time.perf_counter()
                window(methods[name], 1 + w)
                elapsed = torch.tensor([time.perf_counter() - start])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                spent[name] += float(elapsed)
        if round_index >= args.warmup:
            for name in METHODS:
                times[name].append(spent[name] / args.windows)
    results.put((rank, differences, times))
    methods.clear()  # what holds the process group goes before it is destroyed
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--k", type=int, default=4, help="micro-batches per schedule run")
    parser.add_argument("--rows", type=int, default=32, help="sequences per window")
    parser.add_argument("--length", type=int, default=64, help="padded sequence length")
    parser.add_argument("--quick", action="store_true", help="3 short rounds (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.windows, args.rows, args.length = 3, 1, 1, 8, 16
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=worker, args=(r, port, args, results)) for r in range(2)]
    for process in processes:
        process.start()
    rows = [results.get(timeout=900) for _ in processes]
    for process in processes:
        process.join(60)
    by_rank = {rank: (differences, times) for rank, differences, times in rows}
    with open("/proc/loadavg") as load:
        print(f"load average: {load.read().split()[0]} (2 processes, one thread each)")
    print(f"{args.k} micro-batches of {args.rows // args.k} sequences of {args.length} tokens")
    times = by_rank[0][1]  # every window's time is already the slower rank's
    median = {name: statistics.median(times[name]) for name in METHODS}
    for name in METHODS:
        print(f"  {name:<18}{1000 * median[name]:8.2f} ms per window")
    for baseline in METHODS[1:]:
        ratios = [a / b for a, b in zip(times["truebatch"], times[baseline], strict=True)]
        ratio = statistics.median(ratios)
        print(f"truebatch / {baseline} = {ratio:.3f}  (median of {len(ratios)} rounds)")
    print("first window's gradient (float64) vs one process on the whole batch, max over tensors:")
    for name in METHODS:
        worst = max(by_rank[rank][0][name] for rank in by_rank)
        print(f"  {name:<18}{worst:.1e}")


if __name__ == "__main__":
    main()
