"""Loss terms on two gloo ranks with uneven data: the worker processes.

``dist_workers.launch_once(..., SCENARIOS, run_scenario)`` spawns two processes that
run every scenario (a case of ``terms_cases`` under DDP or FSDP2) for
:data:`LAYOUT`'s windows and save, per scenario and rank, the parameters after
each window and the StepResults. ``test_terms.py`` compares them with one
process stepping on each window's global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import dist_workers
import truebatch as tb
from terms_cases import Batch, case, seeded

WORLD_SIZE = 2
MICRO_BATCH_SIZE = 2
# Samples per window on (rank 0, rank 1): uneven, and rank 1 empty in the last window.
LAYOUT = [(5, 2), (1, 4), (3, 0)]
SCENARIOS = {
    "policy_kl-ddp": ("policy_kl", "ddp", MICRO_BATCH_SIZE),
    "policy_kl-fsdp2": ("policy_kl", "fsdp2", MICRO_BATCH_SIZE),
    "token_mean-ddp": ("token_mean", "ddp", MICRO_BATCH_SIZE),
    "seq_mean_token_mean-ddp": ("seq_mean_token_mean", "ddp", MICRO_BATCH_SIZE),
    "seq_mean_token_sum_norm-fsdp2": ("seq_mean_token_sum_norm", "fsdp2", MICRO_BATCH_SIZE),
    "moe_sequence-ddp": ("moe_sequence", "ddp", MICRO_BATCH_SIZE),
    "moe_batch-ddp": ("moe_batch", "ddp", MICRO_BATCH_SIZE),
    # "auto" under DDP: the passes that share an out-of-memory error (one more exchange)
    "policy_kl-ddp-auto": ("policy_kl", "ddp", "auto"),
}


def window_batch(name: str, window: int) -> Batch:
    """The global batch of ``window``: rank 0's samples, then rank 1's."""
    return case(name).batch(sum(LAYOUT[window]), 100 + window)


def rank_batch(name: str, window: int, rank: int) -> Batch:
    start = sum(LAYOUT[window][:rank])
    return {
        k: v[start : start + LAYOUT[window][rank]] for k, v in window_batch(name, window).items()
    }


def run_scenario(scenario: tuple[str, str, int | str], rank: int) -> dict[str, list]:
    """One scenario ``(case, wrapper, micro_batch_size)`` on this rank, all windows."""
    return _run(*scenario[:2], rank, scenario[2])


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
        before = dist_workers.collective_calls()
        result = accumulator.step(batch, this.loss_fn, this.count)
        record["results"].append(
            {"loss": result.loss, "terms": result.terms, "counts": result.counts}
        )
        after = dist_workers.collective_calls()
        record["collectives"].append({k: after[k] - before[k] for k in COUNTED})
        record["params"].append([_full(p) for p in model.parameters()])
    return record


# truebatch exchanges the counts with all_gather and sums the loss totals with all_reduce.
COUNTED = ("all_gather", "all_reduce")


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
