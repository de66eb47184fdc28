"""Loss terms on two gloo ranks with uneven data: the worker processes.

:func:`launch` spawns two processes that run every scenario (a case of
``terms_cases`` under DDP or FSDP2) for :data:`LAYOUT`'s windows and save,
per scenario and rank, the parameters after each window and the StepResults.
``test_terms.py`` compares them with one process stepping on each window's
global batch.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import truebatch as tb
from terms_cases import Batch, case, seeded

WORLD_SIZE = 2
MICRO_BATCH_SIZE = 2
# Samples per window on (rank 0, rank 1): uneven, and rank 1 empty in the last window.
LAYOUT = [(5, 2), (1, 4), (3, 0)]
SCENARIOS = {
    "policy_kl-ddp": ("policy_kl", "ddp"),
    "policy_kl-fsdp2": ("policy_kl", "fsdp2"),
    "token_mean-ddp": ("token_mean", "ddp"),
    "seq_mean_token_mean-ddp": ("seq_mean_token_mean", "ddp"),
    "seq_mean_token_sum_norm-fsdp2": ("seq_mean_token_sum_norm", "fsdp2"),
    "moe_sequence-ddp": ("moe_sequence", "ddp"),
    "moe_batch-ddp": ("moe_batch", "ddp"),
    # "auto" under DDP: the passes that share an out-of-memory error (one more exchange)
    "policy_kl-ddp-auto": ("policy_kl", "ddp"),
}


def window_batch(name: str, window: int) -> Batch:
    """The global batch of ``window``: rank 0's samples, then rank 1's."""
    return case(name).batch(sum(LAYOUT[window]), 100 + window)


def rank_batch(name: str, window: int, rank: int) -> Batch:
    start = sum(LAYOUT[window][:rank])
    return {
        k: v[start : start + LAYOUT[window][rank]] for k, v in window_batch(name, window).items()
    }


def launch(out_dir: Path, timeout: float) -> None:
    """Run every scenario on two spawned gloo processes; fail if they hang or raise."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_main, args=(rank, port, str(out_dir)), daemon=True)
        for rank in range(WORLD_SIZE)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(10)
    errors = "".join(path.read_text() for path in sorted(out_dir.glob("error-*.txt")))
    if hung:
        raise AssertionError(f"ranks {hung} still ran after {timeout} s (a hang?)\n{errors}")
    failed = {rank: p.exitcode for rank, p in enumerate(processes) if p.exitcode != 0}
    if failed:
        raise AssertionError(f"ranks exited with codes {failed}\n{errors}")


def _main(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on two shared cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    for name in CALLS:  # count truebatch's collectives (DDP and FSDP2 call neither function)
        setattr(dist, name, _counting(name, getattr(dist, name)))
    try:
        for scenario, (name, wrapper) in SCENARIOS.items():
            try:
                size = "auto" if scenario.endswith("-auto") else MICRO_BATCH_SIZE
                record = _run(name, wrapper, rank, size)
            except BaseException:
                Path(out_dir, f"error-{scenario}-{rank}.txt").write_text(
                    f"rank {rank}, scenario {scenario}:\n{traceback.format_exc()}"
                )
                raise
            torch.save(record, Path(out_dir, f"{scenario}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(name: str, wrapper: str, rank: int, micro_batch_size: int | str) -> dict[str, list]:
    model = seeded(case(name).model)
    if wrapper == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
        module = model.module
    else:
        from torch.distributed.fsdp import fully_shard

        module = fully_shard(model)
    accumulator = tb.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=micro_batch_size
    )
    fractions: list[torch.Tensor] = []
    this = case(name, fractions)
    record: dict[str, list] = {"params": [], "results": [], "collectives": []}
    for window in range(len(LAYOUT)):
        batch = rank_batch(name, window, rank)
        if name == "moe_batch":
            fractions[:] = [_global_switch_fractions(module, batch)]
        before = dict(CALLS)
        result = accumulator.step(batch, this.loss_fn, this.count)
        record["results"].append(
            {"loss": result.loss, "terms": result.terms, "counts": result.counts}
        )
        record["collectives"].append({k: CALLS[k] - before[k] for k in CALLS})
        record["params"].append([_full(p) for p in model.parameters()])
    return record


# Calls so far in this process: truebatch exchanges the counts with all_gather and sums the
# loss totals with all_reduce.
CALLS = {"all_gather": 0, "all_reduce": 0}


def _counting(name: str, original: Any) -> Any:
    def counting(*args: Any, **kwargs: Any) -> Any:
        CALLS[name] += 1
        return original(*args, **kwargs)

    return counting


def _global_switch_fractions(module: nn.Module, batch: Batch) -> torch.Tensor:
    """f_e over every rank's tokens: local sums, one all_reduce, a division (no gradient)."""
    with torch.no_grad():
        _, probs = module(batch["x"])
        chosen = nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
        sums = torch.cat(
            [(chosen * batch["mask"][..., None]).sum((0, 1)), batch["mask"].sum()[None]]
        )
        dist.all_reduce(sums)
        return sums[:-1] / sums[-1]


def _full(parameter: Any) -> torch.Tensor:
    value = parameter.detach()
    return value.full_tensor() if hasattr(value, "full_tensor") else value.clone()
