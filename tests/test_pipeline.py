"""Pipeline parallelism: one schedule run is one exact window (``tb.PipelineAccumulator``).

The multi-process scenarios (``pipeline_workers.py``: 2 stages x 4 micro-batches of
variable-length token sequences, GPipe and 1F1B, and DP2 x PP2 on 4 processes) are
compared with a reference written out here: one process, the whole model, the
concatenated global batch of every window, the mean token loss over its N tokens,
``backward``, ``clip_grad_norm_`` and an SGD step. The in-process tests run a
one-stage pipeline in a one-rank gloo group: failures, refusals, the schedule's
scaling.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

import truebatch as tb
from dist_workers import launch
from models import IGNORE_INDEX
from pipeline_workers import (
    COUNT,
    LENGTH,
    MICRO_BATCHES,
    STAGES,
    WINDOWS,
    PipelineScenario,
    build_optimizer,
    build_stages,
    loss_sum,
    replica_batch,
    run,
)
from scripts import EXAMPLES, run_torchrun

pytestmark = pytest.mark.processes

EXACT = 1e-12

ONE_PIPELINE = {
    "gpipe": PipelineScenario("gpipe"),
    "1f1b": PipelineScenario("1f1b"),
    "gpipe-clip": PipelineScenario("gpipe", max_grad_norm=0.05),
    "1f1b-scale_grads_false": PipelineScenario("1f1b", scale_grads=False),
    "1f1b-nan": PipelineScenario("1f1b", nan_window=1),
    "own-scaling": PipelineScenario("gpipe", truebatch=False),
}
TWO_REPLICAS = {
    "dp2-pp2-gpipe": PipelineScenario("gpipe", replicas=2),
    "dp2-pp2-1f1b-clip": PipelineScenario("1f1b", replicas=2, max_grad_norm=0.05),
    "dp2-pp2-ddp-1f1b": PipelineScenario("1f1b", replicas=2, ddp=True),
}
ALL = {**ONE_PIPELINE, **TWO_REPLICAS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every scenario's record per (name, rank), from one launch of 4 processes."""
    out_dir = tmp_path_factory.mktemp("pipeline")
    launch(ALL, out_dir, timeout=240, run=run, world_size=2 * STAGES)
    return {
        (name, rank): torch.load(out_dir / f"{name}-{rank}.pt", weights_only=False)
        for name in ALL
        for rank in range(2 * STAGES)
    }


def reference(scenario: PipelineScenario) -> tuple[list[list[list[torch.Tensor]]], list[dict]]:
    """One process on the global batch: per window, each stage's parameters, and the
    window's loss, N and gradient norm."""
    stages = build_stages()
    model = nn.Sequential(*stages)
    optimizer = build_optimizer(model.parameters())
    params, numbers = [], []
    for window in range(WINDOWS):
        batches = [replica_batch(window, replica) for replica in range(scenario.replicas)]
        input_ids = torch.cat([ids for ids, _ in batches])
        target = torch.cat([t for _, t in batches])
        n_items = int((target != IGNORE_INDEX).sum())
        loss = loss_sum(model(input_ids), target) / n_items
        loss.backward()
        if window == scenario.nan_window:
            stages[0][1].weight.grad.fill_(float("nan"))
        norm = nn.utils.clip_grad_norm_(model.parameters(), scenario.max_grad_norm or float("inf"))
        if window != scenario.nan_window:
            optimizer.step()
        optimizer.zero_grad()
        params.append([[p.detach().clone() for p in stage.parameters()] for stage in stages])
        numbers.append({"loss": loss.item(), "count": n_items, "grad_norm": norm.item()})
    return params, numbers


def updates(after: list[torch.Tensor], before: list[torch.Tensor]) -> list[torch.Tensor]:
    return [a - b for a, b in zip(after, before, strict=True)]


@pytest.mark.parametrize(
    "name", [name for name, scenario in ALL.items() if scenario.truebatch], ids=str
)
def test_same_update_as_one_process_on_the_global_batch(runs: dict, name: str) -> None:
    scenario = ALL[name]
    expected, _ = reference(scenario)
    initial = [list(stage.parameters()) for stage in build_stages()]
    for rank in range(STAGES * scenario.replicas):
        stage = rank % STAGES
        for window in range(WINDOWS):
            actual = runs[name, rank]["params"][window]
            difference = tb.max_relative_difference(
                updates(actual, initial[stage]), updates(expected[window][stage], initial[stage])
            )
            assert difference <= EXACT, (rank, window, difference)


@pytest.mark.parametrize("name", ["gpipe", "dp2-pp2-1f1b-clip", "dp2-pp2-ddp-1f1b", "1f1b-nan"])
def test_every_stage_reports_the_global_loss_count_and_norm(runs: dict, name: str) -> None:
    scenario = ALL[name]
    _, expected = reference(scenario)
    for rank in range(STAGES * scenario.replicas):
        for window, result in enumerate(runs[name, rank]["results"]):
            numbers = expected[window]
            assert result["count"] == numbers["count"]
            assert result["loss"] == pytest.approx(numbers["loss"], rel=EXACT)
            assert result["micro_batches"] == MICRO_BATCHES
            if window == scenario.nan_window:
                assert not result["stepped"]
                assert "non-finite" in result["skip_reason"]
            else:
                assert result["stepped"], result
                assert result["grad_norm"] == pytest.approx(numbers["grad_norm"], rel=EXACT)


def test_a_non_finite_gradient_on_the_first_stage_skips_the_step_on_every_stage(
    runs: dict,
) -> None:
    for rank in range(STAGES):
        params = runs["1f1b-nan", rank]["params"]
        assert all(torch.equal(a, b) for a, b in zip(params[0], params[1], strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(params[1], params[2], strict=True))


def test_the_schedules_own_scaling_is_not_the_big_batch(runs: dict) -> None:
    """The motivating bug: a mean per micro-batch, divided by k by the schedule, is the mean
    of the micro-batches' means; their token counts differ, so the update is not exact."""
    expected, _ = reference(ALL["own-scaling"])
    initial = [list(stage.parameters()) for stage in build_stages()]
    differences = [
        tb.max_relative_difference(
            updates(runs["own-scaling", stage]["params"][0], initial[stage]),
            updates(expected[0][stage], initial[stage]),
        )
        for stage in range(STAGES)
    ]
    assert min(differences) > 1e-3, differences


# ---------------------------------------------------------------- in one process


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of one rank, in this process: a one-stage pipeline."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def one_stage(
    schedule_type: Any = ScheduleGPipe, *, scale_grads: bool = True, loss_fn: Any = loss_sum
) -> tuple[nn.Module, Any]:
    model = nn.Sequential(*build_stages())
    stage = PipelineStage(model, 0, 1, torch.device("cpu"))
    return model, schedule_type(
        stage, n_microbatches=MICRO_BATCHES, loss_fn=loss_fn, scale_grads=scale_grads
    )


@pytest.mark.parametrize("schedule_type", [ScheduleGPipe, Schedule1F1B])
@pytest.mark.parametrize("scale_grads", [True, False])
def test_one_stage_gradient_is_the_big_batchs_with_either_scale_grads(
    one_rank_group: None, schedule_type: Any, scale_grads: bool
) -> None:
    model, schedule = one_stage(schedule_type, scale_grads=scale_grads)
    plain = copy.deepcopy(model)
    acc = tb.PipelineAccumulator(schedule, torch.optim.SGD(model.parameters(), lr=1.0))
    input_ids, target = replica_batch(0, 0)
    before = [p.detach().clone() for p in model.parameters()]
    result = acc.step(input_ids, target=target, count=COUNT)
    n_items = int((target != IGNORE_INDEX).sum())
    loss = loss_sum(plain(input_ids), target) / n_items
    loss.backward()
    # lr = 1: the update is minus the gradient.
    update = [b - a for a, b in zip(model.parameters(), before, strict=True)]
    assert tb.max_relative_difference(update, [p.grad for p in plain.parameters()]) <= EXACT
    assert result.count == n_items and result.stepped
    assert result.loss == pytest.approx(loss.item(), rel=EXACT)


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    k=st.integers(1, 4),
    rows_per_micro_batch=st.integers(1, 3),
    lengths=st.lists(st.integers(0, LENGTH), min_size=12, max_size=12),
    gpipe=st.booleans(),
)
def test_any_split_and_any_token_counts_give_the_big_batchs_gradient(
    one_rank_group: None, k: int, rows_per_micro_batch: int, lengths: list[int], gpipe: bool
) -> None:
    """k not a power of two included: the schedule's division by k is then undone with
    one rounding; micro-batches may hold no scored token at all. (The one-rank group is
    the same for every example: nothing of it changes.)"""
    rows = k * rows_per_micro_batch
    model = nn.Sequential(*build_stages())
    plain = copy.deepcopy(model)
    stage = PipelineStage(model, 0, 1, torch.device("cpu"))
    schedule_type = ScheduleGPipe if gpipe else Schedule1F1B
    schedule = schedule_type(stage, n_microbatches=k, loss_fn=loss_sum)
    acc = tb.PipelineAccumulator(schedule, torch.optim.SGD(model.parameters(), lr=1.0))
    batches = [replica_batch(window, 0) for window in range(2)]  # 16 rows
    input_ids = torch.cat([ids for ids, _ in batches])[:rows]
    target = torch.cat([t for _, t in batches])[:rows]
    for row, length in enumerate(lengths[:rows]):
        target[row, length:] = IGNORE_INDEX  # length 0: a row without scored tokens
    n_items = int((target != IGNORE_INDEX).sum())
    assume(n_items > 0)
    seen = []
    acc.optimizer.register_step_pre_hook(
        lambda optimizer, *_: seen.extend(p.grad.clone() for p in model.parameters())
    )
    result = acc.step(input_ids, target=target, count=COUNT)
    (loss_sum(plain(input_ids), target) / n_items).backward()
    assert tb.max_relative_difference(seen, [p.grad for p in plain.parameters()]) <= EXACT
    assert result.count == n_items


def test_a_failure_in_the_schedule_leaves_no_trace_and_the_next_run_is_exact(
    one_rank_group: None,
) -> None:
    calls = [0]

    def failing(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected in micro-batch 3")
        return loss_sum(logits, target)

    model, schedule = one_stage(Schedule1F1B, loss_fn=failing)
    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    acc = tb.PipelineAccumulator(schedule, optimizer, scheduler, atomic_step=True)
    input_ids, target = replica_batch(0, 0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="injected in micro-batch 3"):
        acc.step(input_ids, target=target, count=COUNT)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.state_dict()["state"] == {} and scheduler.last_epoch == 0
    # The failed run's losses of micro-batches 1 and 2 must not be taken for the next run's.
    result = acc.step(input_ids, target=target, count=COUNT)
    n_items = int((target != IGNORE_INDEX).sum())
    (loss_sum(plain(input_ids), target) / n_items).backward()
    update = [b - a for a, b in zip(model.parameters(), before, strict=True)]
    assert tb.max_relative_difference(update, [p.grad for p in plain.parameters()]) <= EXACT
    assert result.step == 1 and optimizer.param_groups[0]["lr"] == 0.5


def test_running_the_schedule_outside_the_accumulator_is_refused_but_eval_works(
    one_rank_group: None,
) -> None:
    model, schedule = one_stage()
    tb.PipelineAccumulator(schedule, torch.optim.SGD(model.parameters(), lr=1.0))
    input_ids, target = replica_batch(0, 0)
    with pytest.raises(RuntimeError, match=r"Fix: call acc\.step"):
        schedule.step(input_ids, target=target)
    losses: list[torch.Tensor] = []
    schedule.eval(input_ids, target=target, losses=losses)
    # eval gets the loss SUMS of the micro-batches, as loss_fn returns them.
    chunks = zip(
        input_ids.tensor_split(MICRO_BATCHES), target.tensor_split(MICRO_BATCHES), strict=True
    )
    expected = [loss_sum(model(ids), t) for ids, t in chunks]
    assert torch.allclose(torch.stack(losses), torch.stack(expected))


def test_what_cannot_work_is_refused_before_anything_changes(one_rank_group: None) -> None:
    model, schedule = one_stage()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(TypeError, match="expected a single-stage schedule"):
        tb.PipelineAccumulator(model, optimizer)
    _, no_loss = one_stage(loss_fn=None)
    with pytest.raises(TypeError, match="without loss_fn"):
        tb.PipelineAccumulator(no_loss, optimizer)
    acc = tb.PipelineAccumulator(schedule, optimizer)
    with pytest.raises(TypeError, match="already wraps"):
        tb.PipelineAccumulator(schedule, optimizer)
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
    wrapped = ScheduleGPipe(PipelineStage(ddp, 0, 1, torch.device("cpu")), 2, loss_fn=loss_sum)
    with pytest.raises(ValueError, match="other than the DDP stage's process group"):
        tb.PipelineAccumulator(
            wrapped, torch.optim.SGD(ddp.parameters()), data_parallel_group=dist.new_group([0])
        )
    sharded = nn.Linear(2, 2)
    fully_shard(sharded)
    on_fsdp2 = ScheduleGPipe(PipelineStage(sharded, 0, 1, torch.device("cpu")), 2, loss_fn=loss_sum)
    with pytest.raises(ValueError, match="sharded with FSDP2"):
        tb.PipelineAccumulator(on_fsdp2, torch.optim.SGD(sharded.parameters()))
    input_ids, target = replica_batch(0, 0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="multiple of n_microbatches=4"):
        acc.step(input_ids[:6], target=target[:6])
    with pytest.raises(TypeError, match="`count` got int"):
        acc.step(input_ids, target=target, count=3)
    other, no_target = one_stage()
    with pytest.raises(ValueError, match="`target` got None"):
        tb.PipelineAccumulator(no_target, torch.optim.SGD(other.parameters())).step(input_ids)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    acc.step(input_ids, target=target, count=COUNT)
    with pytest.raises(ValueError, match="expected the first window's"):
        acc.step(input_ids[:, :6], target=target[:, :6])


def test_a_window_without_items_does_not_step(one_rank_group: None) -> None:
    model, schedule = one_stage()
    acc = tb.PipelineAccumulator(schedule, torch.optim.SGD(model.parameters(), lr=1.0))
    input_ids, target = replica_batch(0, 0)
    before = [p.detach().clone() for p in model.parameters()]
    result = acc.step(input_ids, target=torch.full_like(target, IGNORE_INDEX), count=COUNT)
    assert (result.stepped, result.count, result.skip_reason) == (
        False,
        0,
        "the window holds no items (N == 0)",
    )
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_round_trip(one_rank_group: None) -> None:
    model, schedule = one_stage()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    acc = tb.PipelineAccumulator(schedule, optimizer)
    input_ids, target = replica_batch(0, 0)
    acc.step(input_ids, target=target, count=COUNT)
    state = acc.state_dict()
    assert state["window"] == 1 and state["optimizer"]["state"]
    with pytest.raises(KeyError, match="no keys"):
        acc.load_state_dict({"window": 3})
    scheduler = {"last_epoch": 0}
    with pytest.raises(ValueError, match="`state` got a scheduler; expected none"):
        acc.load_state_dict({**state, "window": 7, "scheduler": scheduler})
    assert acc.windows == 1
    acc.load_state_dict({**state, "window": 5})
    assert acc.windows == 5


@pytest.mark.slow
def test_torchrun_example_trains_two_replicas_of_a_two_stage_pipeline(tmp_path: Path) -> None:
    out = run_torchrun(EXAMPLES / "pipeline.py", 4, "--windows", "6", cwd=tmp_path)
    assert out.startswith("2 replica(s) x 2 stages, 1f1b, 4 micro-batches"), out
    rows = re.findall(r"^window +(\d+) loss ([\d.]+) tokens (\d+) grad_norm", out, re.M)
    assert [int(step) for step, _, _ in rows] == list(range(1, 7)), out
    assert float(rows[-1][1]) < float(rows[0][1]), out
