"""What the 2 gloo processes of the distributed step_cached tests run.

:func:`launch` spawns ``WORLD_SIZE`` processes (``dist_workers.launch``); each
runs every scenario through :func:`run` and
saves, per window, the gradient its optimizer stepped on, the StepResult (or
the error), the DDP gradient synchronizations, the parameters and buffers.
The test process rebuilds the same model and data (``contrastive.py``) and
compares with one process on the global batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import dist_workers
import truebatch as tb
from contrastive import batch, build, clip_encode, clip_loss

WORLD_SIZE = dist_workers.WORLD_SIZE
GHOST_BATCH_SIZE = 2

# Samples per piece given to step_cached: per rank, per window.
LAYOUTS: dict[str, tuple[tuple[tuple[int, ...], ...], ...]] = {
    "even": (((4,), (4,)), ((4,), (4,))),
    # other numbers of micro-batches per rank; rank 1 has no data in the last window
    "uneven": (((4, 2), (2,), (2, 4)), ((2,), (4, 2, 2), ())),
    # rank 1 has no data in its first window: every rank raises, then goes on
    "first_empty": (((4,), (2,)), ((), (4,))),
}


@dataclass(frozen=True)
class Scenario:
    layout: str
    negatives: str = "global"
    pair: bool = False  # loss_fn returns (2 * loss_sum, 2 * samples)
    ghost: bool = False  # a GhostBatchNorm1d in the image tower


def model_of(scenario: Scenario) -> nn.Module:
    return build(
        dropout=0.3,
        converted=True,
        ghost_batch_size=GHOST_BATCH_SIZE if scenario.ghost else None,
    )


def rank_pieces(scenario: Scenario, rank: int) -> list[list[dict[str, torch.Tensor]]]:
    return [
        [batch(n, seed=1000 * window + 100 * rank + i) for i, n in enumerate(sizes)]
        for window, sizes in enumerate(LAYOUTS[scenario.layout][rank])
    ]


def loss_of(scenario: Scenario, model: nn.Module) -> Any:
    loss = clip_loss(model)
    if not scenario.pair:
        return loss
    return lambda reps, window: (2 * loss(reps, window), 2 * len(reps[0]))


def launch(scenarios: dict[str, Scenario], out_dir: Path, timeout: float) -> None:
    """Run ``scenarios`` on ``WORLD_SIZE`` spawned gloo processes; fail if they hang."""
    dist_workers.launch(scenarios, out_dir, timeout, run=run)


def run(scenario: Scenario, rank: int) -> dict[str, list]:
    model = model_of(scenario)
    syncs = [0]

    # No annotations: DDP compares them with dist.GradBucket.
    def counting_hook(state, bucket):
        syncs[0] += bucket.is_last()
        gradient = bucket.buffer().div_(WORLD_SIZE)
        work = dist.group.WORLD.allreduce([gradient])
        return work.get_future().then(lambda future: future.value()[0])

    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(None, counting_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    stepped_on: list[Any] = []
    optimizer.register_step_pre_hook(
        lambda *_: stepped_on.append([p.grad.clone() for p in model.parameters()])
    )
    acc = tb.Accumulator(ddp, optimizer, micro_batch_size=2)
    loss = loss_of(scenario, model)
    record: dict[str, list] = {key: [] for key in ("results", "grads", "syncs", "buffers")}
    for pieces in rank_pieces(scenario, rank):
        before, steps = syncs[0], len(stepped_on)
        try:
            result: Any = asdict(
                acc.step_cached(pieces, clip_encode, loss, negatives=scenario.negatives)
            )
        except RuntimeError as error:
            result = {"error": str(error)}
        record["results"].append(result)
        record["syncs"].append(syncs[0] - before)
        record["grads"].append(stepped_on[-1] if len(stepped_on) > steps else None)
        record["buffers"].append([b.clone() for b in model.buffers()])
    return record
