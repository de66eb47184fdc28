"""What the processes spawned by ``test_pipeline.py`` run: 2-stage pipelines on gloo.

All scenarios run on 4 processes (one launch: starting processes costs more
than the scenarios). Ranks are laid out ``rank = replica * STAGES + stage``:
one pipeline runs on ranks 0 and 1 (the others skip the scenario); two
replicas (data parallel) of the 2-stage pipeline have the pipeline groups
``[0, 1], [2, 3]`` and the data-parallel groups ``[0, 2], [1, 3]``.
Every replica trains on its own batches of variable-length token sequences,
padded to one length (:func:`replica_batch`); the test process builds the very
same model (:func:`build_stages`) and batches for its single-process reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

import truebatch as tb
from models import IGNORE_INDEX, VOCAB, collate_tokens, seeded, token_sequences

STAGES = 2
MICRO_BATCHES = 4
ROWS = 8  # per replica and window: 2 rows per micro-batch
LENGTH = 12  # padded length: the schedule's activation buffers keep one shape
WINDOWS = 3
HIDDEN = 8
COUNT = tb.count_tokens("target", shift=False)


@dataclass(frozen=True)
class PipelineScenario:
    """One run of ``WINDOWS`` windows.

    Attributes:
        schedule: ``"gpipe"`` or ``"1f1b"``.
        replicas: data-parallel replicas of the pipeline (processes = 2 * replicas).
        truebatch: ``False`` runs the schedule with its own scaling and a loss_fn
            returning each micro-batch's mean, stepping by hand (the common loop).
        scale_grads: passed to the schedule.
        max_grad_norm: passed to the PipelineAccumulator.
        nan_window: the window in which stage 0's gradient turns NaN.
        ddp: wrap every stage in DDP over its data-parallel group (instead of
            passing ``data_parallel_group``).
    """

    schedule: str = "gpipe"
    replicas: int = 1
    truebatch: bool = True
    scale_grads: bool = True
    max_grad_norm: float | None = None
    nan_window: int | None = None
    ddp: bool = False


def build_stages() -> list[nn.Module]:
    """The float64 model, cut in two stages: embedding + tanh layer, then the head."""
    model = seeded(
        lambda: nn.Sequential(
            nn.Embedding(VOCAB, HIDDEN),
            nn.Linear(HIDDEN, HIDDEN),
            nn.Tanh(),
            nn.Linear(HIDDEN, VOCAB),
        )
    )
    return [model[:3], model[3:]]


def replica_batch(window: int, replica: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, target)`` of one replica in one window; ``target`` is the next token
    (aligned with the outputs), ignored after each sequence's end."""
    tokens = collate_tokens(token_sequences(ROWS, 1000 * window + 100 * replica), LENGTH)
    target = torch.full_like(tokens["labels"], IGNORE_INDEX)
    target[:, :-1] = tokens["labels"][:, 1:]
    return tokens["input_ids"], target


def loss_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The SUM of the token losses (truebatch normalizes)."""
    return F.cross_entropy(
        logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def loss_mean(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each micro-batch's mean token loss, as pipeline loops usually pass."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)


def build_optimizer(parameters: Any) -> torch.optim.Optimizer:
    """SGD with momentum: its update is linear in the gradient, so a wrong scale shows."""
    return torch.optim.SGD(parameters, lr=0.5, momentum=0.9)


def groups(replicas: int) -> tuple[Any, Any]:
    """This rank's pipeline group and data-parallel group (``None`` for one replica).

    Every rank creates every group, in the same order, as ``new_group`` requires.
    """
    rank = dist.get_rank()
    pipeline = data = None
    for replica in range(replicas):
        members = [replica * STAGES + stage for stage in range(STAGES)]
        group = dist.new_group(members)
        if rank in members:
            pipeline = group
    if replicas > 1:
        for stage in range(STAGES):
            members = [replica * STAGES + stage for replica in range(replicas)]
            group = dist.new_group(members)
            if rank in members:
                data = group
    return pipeline, data


def run(scenario: PipelineScenario, rank: int) -> dict[str, list]:
    """Train ``WINDOWS`` windows; record every result and this stage's parameters."""
    replica, stage_index = divmod(rank, STAGES)
    pipeline_group, data_group = groups(scenario.replicas)
    if replica >= scenario.replicas:
        return {}  # one pipeline on ranks 0 and 1: the others wait for the next scenario
    module = build_stages()[stage_index]
    wrapped = (
        nn.parallel.DistributedDataParallel(module, process_group=data_group)
        if scenario.ddp
        else module
    )
    stage = PipelineStage(wrapped, stage_index, STAGES, torch.device("cpu"), group=pipeline_group)
    schedule_type = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[scenario.schedule]
    schedule = schedule_type(
        stage,
        n_microbatches=MICRO_BATCHES,
        loss_fn=loss_sum if scenario.truebatch else loss_mean,
        scale_grads=scenario.scale_grads,
    )
    optimizer = build_optimizer(module.parameters())
    accumulator = (
        tb.PipelineAccumulator(
            schedule,
            optimizer,
            max_grad_norm=scenario.max_grad_norm,
            data_parallel_group=None if scenario.ddp else data_group,
        )
        if scenario.truebatch
        else None
    )
    poisoned = [False]
    if stage_index == 0:
        weight = module[1].weight
        weight.register_hook(lambda grad: grad * float("nan") if poisoned[0] else grad)
    record: dict[str, list] = {"results": [], "params": []}
    for window in range(WINDOWS):
        poisoned[0] = window == scenario.nan_window
        input_ids, target = replica_batch(window, replica)
        inputs = (input_ids,) if stage_index == 0 else ()
        targets = target if stage_index == STAGES - 1 else None
        if accumulator is not None:
            result = accumulator.step(*inputs, target=targets, count=COUNT)
            record["results"].append(asdict(result))
        else:
            schedule.step(*inputs, target=targets)
            optimizer.step()
            optimizer.zero_grad()
        record["params"].append([p.detach().clone() for p in module.parameters()])
    return record
