"""Host reads per window, and the device-decided skip of ``host_sync=False``.

Every read of a device tensor by the host stalls an accelerator's launch
queue. :class:`host_reads.HostReads` counts truebatch's reads on the CPU; the
table of docs/how-to/speed.md states them per feature, and
``test_reads_per_window_are_the_documented_ones`` fails if a read is added
(or removed) without the table. With ``host_sync=False`` the non-finite skip
is decided on the device: these tests compare it, bitwise, with the host's
decision and with the state before the window.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import truebatch as tb
from dist_workers import launch
from host_reads import HostReads
from models import TASKS, GroupStateSGD, assert_bitwise_equal, seeded

DOCS = Path(__file__).parents[1] / "docs" / "how-to" / "speed.md"
WINDOWS = 3


@dataclass(frozen=True)
class Feature:
    """One row of the docs table: how the Accumulator and the window are set up."""

    task: str = "mlp"
    options: tuple[tuple[str, Any], ...] = ()
    loss: str = "sum"  # "sum", "pair" or "terms"
    count: str = "default"  # "default", "tokens" or "terms"


FEATURES: dict[str, Feature] = {
    "plain": Feature(),
    "clipping": Feature(options=(("max_grad_norm", 1.0),)),
    "scaler": Feature(options=(("scaler", "GradScaler"),)),
    "scheduler": Feature(options=(("scheduler", "StepLR"),)),
    "pair mode": Feature(loss="pair"),
    "auto": Feature(options=(("micro_batch_size", "auto"),)),
    "terms": Feature(loss="terms", count="terms"),
    "count_tokens": Feature(task="gru_lm", count="tokens"),
    "skip_nonfinite=False": Feature(options=(("skip_nonfinite", False),)),
}


def build(feature: Feature, *, host_sync: bool, model: nn.Module | None = None) -> Any:
    """(accumulator, loss_fn, count, batch(seed)) for ``feature``; Adam over the model."""
    task = TASKS[feature.task]
    model = model if model is not None else seeded(task.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    options: dict[str, Any] = {"micro_batch_size": 3, "host_sync": host_sync}
    scheduler = None
    for name, value in feature.options:
        if name == "scaler":
            value = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)
        if name == "scheduler":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
            continue
        options[name] = value
    acc = tb.Accumulator(model, optimizer, scheduler, **options)
    loss_fn: Callable[[nn.Module, Any], Any] = task.loss_sum
    count: Any = None
    if feature.loss == "pair":

        def loss_fn(model: nn.Module, batch: Any) -> Any:
            return task.loss_sum(model, batch), len(batch[0])

    if feature.loss == "terms":

        def loss_fn(model: nn.Module, batch: Any) -> Any:
            loss = task.loss_sum(model, batch)
            return {"main": loss, "aux": 0.5 * loss}

        count = {"main": None, "aux": tb.term(weight=0.1)}
    if feature.count == "tokens":
        count = tb.count_tokens()
    return acc, loss_fn, count, lambda seed: task.batch(12, seed)


def reads_per_window(feature: Feature, *, host_sync: bool) -> float:
    """truebatch's host reads per window, after a first window (the optimizer's state)."""
    acc, loss_fn, count, batch = build(feature, host_sync=host_sync)
    acc.step(batch(0), loss_fn, count)
    with HostReads() as reads:
        for seed in range(1, WINDOWS + 1):
            acc.step(batch(seed), loss_fn, count)
    return reads.count / WINDOWS


def documented() -> dict[str, tuple[float, float]]:
    """The docs table: feature -> (reads by default, reads with host_sync=False)."""
    rows = re.findall(r"^\| `?([^|`]+?)`? \| (\d+) \| (\d+) \|", DOCS.read_text(), re.MULTILINE)
    return {name: (float(default), float(no_sync)) for name, default, no_sync in rows}


@pytest.mark.parametrize("name", FEATURES)
def test_reads_per_window_are_the_documented_ones(name: str) -> None:
    table = documented()
    assert name in table, f"docs/how-to/speed.md has no row for {name!r}"
    measured = (
        reads_per_window(FEATURES[name], host_sync=True),
        reads_per_window(FEATURES[name], host_sync=False),
    )
    assert measured == table[name]
    assert measured[0] <= 1


def ddp_reads(feature: Feature, rank: int) -> dict[str, list]:
    """Under 2 gloo ranks with DDP: the reads per window of both settings."""
    record: dict[str, list] = {}
    for host_sync in (True, False):
        model = nn.parallel.DistributedDataParallel(seeded(TASKS[feature.task].model))
        acc, loss_fn, count, batch = build(feature, host_sync=host_sync, model=model)
        acc.step(batch(rank), loss_fn, count)
        with HostReads() as reads:
            for seed in range(1, WINDOWS + 1):
                acc.step(batch(10 * seed + rank), loss_fn, count)
        record[str(host_sync)] = [reads.count / WINDOWS]
    return record


@pytest.mark.processes
def test_reads_per_window_under_ddp_are_the_documented_ones(tmp_path: Path) -> None:
    launch({"ddp": FEATURES["plain"]}, tmp_path, timeout=240, run=ddp_reads)
    table = documented()
    for rank in range(2):
        record = torch.load(tmp_path / f"ddp-{rank}.pt")
        assert (record["True"][0], record["False"][0]) == table["DDP"], f"rank {rank}"


# ----------------------------------------------------- the device-decided skip


def poisoned(loss_fn: Callable[..., Any], value: float) -> Callable[..., Any]:
    """``loss_fn`` whose first call multiplies its loss (or every term) by ``value``."""
    calls = 0

    def poisoned_loss_fn(model: nn.Module, batch: Any) -> Any:
        nonlocal calls
        calls += 1
        output = loss_fn(model, batch)
        if calls != 1:
            return output
        if isinstance(output, dict):
            return {name: loss * value for name, loss in output.items()}
        if isinstance(output, tuple):
            return output[0] * value, output[1]
        return output * value

    return poisoned_loss_fn


def state_of(acc: tb.Accumulator) -> dict[str, Any]:
    """Everything a skipped window must leave as it was, copied."""
    return copy.deepcopy(
        {
            "model": acc.model.state_dict(),
            "optimizer": acc.optimizer.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "scheduler": acc.scheduler.state_dict() if acc.scheduler is not None else None,
        }
    )


SKIPPABLE = [name for name in FEATURES if name != "skip_nonfinite=False"]


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", SKIPPABLE)
def test_nonfinite_window_without_host_sync_leaves_everything_as_it_was(
    name: str, value: float
) -> None:
    feature = FEATURES[name]
    acc, loss_fn, count, batch = build(feature, host_sync=False)
    acc.step(batch(0), loss_fn, count)
    before = state_of(acc)

    result = acc.step(batch(1), poisoned(loss_fn, value), count)

    after = state_of(acc)
    if acc.scaler is not None:
        # GradScaler lowers its scale after a non-finite gradient, as with a host decision.
        assert after["scaler"]["scale"] == before["scaler"]["scale"] * 0.5
        after["scaler"], before["scaler"] = None, None
    assert_bitwise_equal(after, before, nan_equal=True)
    assert all(p.grad is None for p in acc.model.parameters())
    assert result.stepped is False
    assert result.skip_reason.startswith("non-finite gradient (norm ")
    assert not math.isfinite(result.grad_norm)
    assert result.step == 2


@pytest.mark.parametrize("name", [name for name in FEATURES if name != "clipping"])
def test_without_host_sync_the_training_is_bitwise_the_host_decided_one(name: str) -> None:
    """Good and non-finite windows alternate; both settings give the same bits."""
    feature = FEATURES[name]
    runs = [build(feature, host_sync=host_sync) for host_sync in (True, False)]
    results: list[list[dict[str, Any]]] = [[], []]
    for seed in range(5):
        for (acc, loss_fn, count, batch), out in zip(runs, results, strict=True):
            fn = poisoned(loss_fn, math.nan) if seed == 2 else loss_fn
            out.append(asdict(acc.step(batch(seed), fn, count)))
        assert_bitwise_equal(
            state_of(runs[1][0]), state_of(runs[0][0]), f"window {seed}", nan_equal=True
        )
    assert_bitwise_equal(results[1], results[0], "results", nan_equal=True)


def test_without_host_sync_clipping_is_the_host_decided_one() -> None:
    """The clip coefficient is computed on the device instead of the host: the same
    float64 arithmetic, possibly summed in another order."""
    runs = [build(FEATURES["clipping"], host_sync=host_sync) for host_sync in (True, False)]
    for seed in range(5):
        for acc, loss_fn, count, batch in runs:
            fn = poisoned(loss_fn, math.nan) if seed == 2 else loss_fn
            assert acc.step(batch(seed), fn, count).stepped == (seed != 2)
        models = [acc.model.parameters() for acc, *_ in runs]
        assert tb.max_relative_difference(*models) <= 1e-14


def test_first_window_without_optimizer_state_is_skipped_with_one_read() -> None:
    """The optimizer's first step creates its state, which the device cannot take back:
    that window reads once, and a non-finite one leaves the state empty."""
    acc, loss_fn, count, batch = build(FEATURES["plain"], host_sync=False)
    with HostReads() as reads:
        result = acc.step(batch(0), poisoned(loss_fn, math.nan), count)
    assert reads.count == 1
    assert not result.stepped
    assert acc.optimizer.state_dict()["state"] == {}


def tokens_without_labels(seed: int) -> dict[str, torch.Tensor]:
    batch = TASKS["gru_lm"].batch(12, seed)
    return {**batch, "labels": torch.full_like(batch["labels"], -100)}


def test_window_without_items_is_skipped_on_the_device() -> None:
    """count_tokens counts on the device: an empty window is found there, and leaves the
    parameters, optimizer and scaler as they were."""
    feature = Feature(task="gru_lm", count="tokens", options=(("scaler", "GradScaler"),))
    acc, loss_fn, count, batch = build(feature, host_sync=False)
    acc.step(batch(0), loss_fn, count)
    before = state_of(acc)
    with HostReads() as reads:
        result = acc.step(tokens_without_labels(1), loss_fn, count)
    assert reads.count == 0
    assert_bitwise_equal(state_of(acc), before, nan_equal=True)
    assert not result.stepped
    assert result.skip_reason == "the window holds no items (N == 0)"
    assert result.count == 0 and math.isnan(result.loss)


def test_result_is_read_once_on_first_access_with_the_same_types() -> None:
    acc, loss_fn, count, batch = build(FEATURES["plain"], host_sync=False)
    acc.step(batch(0), loss_fn, count)
    with HostReads() as reads:
        result = acc.step(batch(1), loss_fn, count)
        assert reads.count == 0
        loss = result.loss
        assert reads.count == 1
        values = asdict(result)
        assert reads.count == 1
    assert type(loss) is float and math.isfinite(loss)
    assert type(result.count) is int and result.count == 12
    assert type(result.grad_norm) is float and result.grad_norm > 0
    assert result.stepped is True and result.skip_reason is None
    assert values["loss"] == loss and values["step"] == 2


def test_host_sync_must_be_a_bool() -> None:
    model = seeded(TASKS["mlp"].model)
    with pytest.raises(TypeError, match="`host_sync` got 0; expected True or False"):
        tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), host_sync=0)


def test_a_skipped_window_without_host_sync_leaves_the_state_optimizers_keep_in_groups() -> None:
    """Regression: the device's undo restored the parameters and ``optimizer.state`` but
    not the param groups, where schedule-free optimizers and Prodigy keep a step count
    or an estimate: a skipped window advanced (or poisoned with NaN) them for good."""
    model = seeded(TASKS["mlp"].model)
    optimizer = GroupStateSGD(model.parameters(), lr=0.1, momentum=0.9)
    acc = tb.Accumulator(model, optimizer, micro_batch_size=3, host_sync=False)
    task = TASKS["mlp"]
    acc.step(task.batch(12, 0), task.loss_sum)
    before = state_of(acc)

    result = acc.step(task.batch(12, 1), poisoned(task.loss_sum, math.nan))

    assert result.stepped is False
    assert_bitwise_equal(state_of(acc), before, nan_equal=True)
