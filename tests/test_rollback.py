"""A failure leaves no trace: buffers, RNG, optimizer, scheduler, scaler, gradients.

The model has BatchNorm and dropout (both change state in every forward: the
running statistics and the global RNG). An exception, ``KeyboardInterrupt``
included, raised at any pass of a window or in its step must leave all of it
as it was before the window, and the window run again must give bitwise what
it gives when it never failed. What cannot work per window at all is refused
at construction, with the fix in the message.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import truebatch as tb
from models import CLASSES, FEATURES, GroupStateSGD, assert_bitwise_equal, seeded, vector_batch

WINDOW = 12
MICRO_BATCH = 3  # four passes per window


def batchnorm_dropout() -> nn.Module:
    return nn.Sequential(
        nn.Linear(FEATURES, 10),
        nn.BatchNorm1d(10),
        nn.Dropout(0.3),
        nn.Tanh(),
        nn.Linear(10, CLASSES),
    )


def loss_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


class Training:
    """Model, AdamW, StepLR and the Accumulator; ``state()`` is all a window may change."""

    def __init__(self, scaler: bool = False, **options: Any) -> None:
        self.model = seeded(batchnorm_dropout)
        if scaler:
            self.model = self.model.float()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.5)
        self.acc = tb.Accumulator(
            self.model,
            self.optimizer,
            self.scheduler,
            micro_batch_size=MICRO_BATCH,
            scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaler else None,
            **options,
        )

    def batch(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = vector_batch(WINDOW, seed)
        return x.to(next(self.model.parameters()).dtype), y

    def state(self) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),  # parameters and BatchNorm buffers
                "grads": [p.grad for p in self.model.parameters()],
                "accumulator": self.acc.state_dict(),  # optimizer, scheduler, scaler, RNG
                "lr": [g["lr"] for g in self.optimizer.param_groups],
            }
        )


def failing_at(call: int, error: BaseException) -> Callable[[nn.Module, Any], torch.Tensor]:
    """loss_fn that raises ``error`` on its ``call``-th call, after the forward ran."""
    calls = 0

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = loss_sum(model, batch)
        if calls == call:
            raise error
        return loss

    return loss_fn


def assert_the_failure_left_no_trace(training: Training, fail: Callable[[], Any]) -> None:
    """``fail()`` raises; then the state is the one before it, and the next window is
    bitwise the window of a run that never failed."""
    torch.manual_seed(3)
    training.acc.step(training.batch(1), loss_sum)
    untouched = copy.deepcopy(training)
    before = training.state()

    fail()

    assert_bitwise_equal(training.state(), before)
    assert all("zero_grad" not in vars(o) for o in (training.model, training.optimizer))
    rng = torch.get_rng_state()
    training.acc.step(training.batch(2), loss_sum)
    torch.set_rng_state(rng)  # the global RNG the run that never failed continues from
    untouched.acc.step(untouched.batch(2), loss_sum)
    assert_bitwise_equal(training.state(), untouched.state())


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=type)
@pytest.mark.parametrize("call", [1, 2, 3, 4])
def test_an_exception_at_any_pass_restores_batchnorm_statistics_and_the_rng(
    call: int, error: BaseException
) -> None:
    """Regression (issue 15, defect 6): BatchNorm's running statistics and the RNG
    (dropout) kept what the passes before the failure had done."""
    training = Training()

    def fail() -> None:
        with pytest.raises(type(error)):
            training.acc.step(training.batch(2), failing_at(call, error))

    assert_the_failure_left_no_trace(training, fail)


def test_an_exception_in_accumulate_restores_the_window_start() -> None:
    training = Training()

    def fail() -> None:
        with pytest.raises(RuntimeError, match="boom"):
            training.acc.accumulate([training.batch(2)], failing_at(3, RuntimeError("boom")))

    assert_the_failure_left_no_trace(training, fail)


@pytest.mark.parametrize("scaler", [False, True], ids=["no_scaler", "gradscaler"])
def test_an_optimizer_that_raises_before_its_update_leaves_no_trace(scaler: bool) -> None:
    training = Training(scaler=scaler)
    raising = [False]

    def refuse(*_: Any) -> None:
        if raising[0]:
            raise RuntimeError("optimizer refused")

    training.optimizer.register_step_pre_hook(refuse)

    def fail() -> None:
        raising[0] = True
        with pytest.raises(RuntimeError, match="optimizer refused"):
            training.acc.step(training.batch(2), loss_sum)
        raising[0] = False

    assert_the_failure_left_no_trace(training, fail)


class FailsInTheSecondWindow(torch.optim.lr_scheduler.StepLR):
    def step(self, epoch: int | None = None) -> None:
        if self._step_count == 2:
            raise RuntimeError("scheduler failed")
        super().step(epoch)


def test_a_scheduler_that_raises_after_the_update_restores_all_but_the_update() -> None:
    """What a step cannot undo without a copy of the parameters and the optimizer's
    moments (too costly per window): the exception says so; all the rest is restored."""
    training = Training()
    training.scheduler = FailsInTheSecondWindow(training.optimizer, step_size=1, gamma=0.5)
    training.acc.scheduler = training.scheduler
    training.acc.step(training.batch(1), loss_sum)
    before = training.state()

    with pytest.raises(RuntimeError, match="scheduler failed") as info:
        training.acc.step(training.batch(2), loss_sum)

    after = training.state()
    assert any(
        "parameters and the optimizer's moments are those after" in n for n in info.value.__notes__
    )
    for key in ("grads", "lr"):
        assert_bitwise_equal(after[key], before[key])
    assert_bitwise_equal(after["accumulator"]["scheduler"], before["accumulator"]["scheduler"])
    assert_bitwise_equal(after["accumulator"]["rng"], before["accumulator"]["rng"])
    assert after["accumulator"]["window"] == before["accumulator"]["window"] == 1
    buffers = [k for k in before["model"] if "running" in k or "num_batches" in k]
    assert_bitwise_equal(
        [after["model"][k] for k in buffers], [before["model"][k] for k in buffers]
    )


class RaisesAfterItsUpdate(torch.optim.lr_scheduler.StepLR):
    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        if self._step_count == 3:
            raise RuntimeError("scheduler failed after its update")


def test_a_tensor_learning_rate_the_scheduler_changed_in_place_is_put_back() -> None:
    """A learning rate given as a tensor is set in place by the scheduler; a scheduler
    that raises after that leaves the same tensor in the group, with its value before."""
    model = seeded(batchnorm_dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01, dtype=torch.float64))
    scheduler = RaisesAfterItsUpdate(optimizer, step_size=1, gamma=0.5)
    acc = tb.Accumulator(model, optimizer, scheduler, micro_batch_size=MICRO_BATCH)
    acc.step(vector_batch(WINDOW, 1), loss_sum)
    lr = optimizer.param_groups[0]["lr"]
    before = lr.clone()

    with pytest.raises(RuntimeError, match="scheduler failed after its update"):
        acc.step(vector_batch(WINDOW, 2), loss_sum)

    assert optimizer.param_groups[0]["lr"] is lr
    assert_bitwise_equal(lr, before)
    assert_bitwise_equal(scheduler.state_dict(), acc.state_dict()["scheduler"])


def test_atomic_step_restores_the_state_an_optimizer_keeps_in_its_param_groups() -> None:
    """Regression: with ``atomic_step=True`` and no scheduler, an optimizer that raised
    after its update left the entries it keeps in its param groups (schedule-free's step
    count, Prodigy's estimates) advanced, while its parameters and moments went back."""
    model = seeded(batchnorm_dropout)
    optimizer = GroupStateSGD(model.parameters(), lr=0.1, momentum=0.9)
    acc = tb.Accumulator(model, optimizer, micro_batch_size=MICRO_BATCH, atomic_step=True)
    batch = vector_batch(WINDOW, 1)
    acc.step(batch, loss_sum)
    before = copy.deepcopy((model.state_dict(), acc.state_dict()))

    def raise_after_the_update(*_: Any) -> None:
        raise RuntimeError("after the update")

    handle = optimizer.register_step_post_hook(raise_after_the_update)
    with pytest.raises(RuntimeError, match="after the update"):
        acc.step(vector_batch(WINDOW, 2), loss_sum)
    handle.remove()

    assert_bitwise_equal(copy.deepcopy((model.state_dict(), acc.state_dict())), before)


def test_a_one_cycle_schedule_past_its_end_is_refused_before_the_window_runs() -> None:
    """OneCycleLR raises in step() once past total_steps, after the optimizer stepped;
    the Accumulator refuses that window before it changes anything."""
    training = Training()
    training.scheduler = torch.optim.lr_scheduler.OneCycleLR(
        training.optimizer, max_lr=0.1, total_steps=2
    )
    training.acc.scheduler = training.scheduler
    for seed in (0, 1):
        assert training.acc.step(training.batch(seed), loss_sum).stepped
    before = training.state()

    with pytest.raises(
        ValueError, match=r"`scheduler` got a OneCycleLR at step 2 of total_steps=2"
    ):
        training.acc.step(training.batch(2), loss_sum)

    assert_bitwise_equal(training.state(), before)


def one_cycle_inside(kind: str, optimizer: torch.optim.Optimizer) -> Any:
    """A OneCycleLR of 2 steps inside a SequentialLR (after 1 constant window) or a
    ChainedScheduler: its end is reached after 3 and 2 windows."""
    schedulers = torch.optim.lr_scheduler
    one_cycle = schedulers.OneCycleLR(optimizer, max_lr=0.1, total_steps=2)
    if kind == "sequential":
        constant = schedulers.ConstantLR(optimizer, factor=0.5, total_iters=1)
        return schedulers.SequentialLR(optimizer, [constant, one_cycle], milestones=[1])
    return schedulers.ChainedScheduler([schedulers.ExponentialLR(optimizer, 0.9), one_cycle])


@pytest.mark.parametrize(("kind", "windows"), [("sequential", 3), ("chained", 2)])
def test_a_one_cycle_schedule_inside_another_is_refused_past_its_end(
    kind: str, windows: int
) -> None:
    """Regression: a OneCycleLR inside a SequentialLR or ChainedScheduler raised in
    scheduler.step() after the optimizer's update, which stayed."""
    training = Training()
    training.scheduler = one_cycle_inside(kind, training.optimizer)
    training.acc.scheduler = training.scheduler
    for seed in range(windows):
        assert training.acc.step(training.batch(seed), loss_sum).stepped
    before = training.state()

    with pytest.raises(ValueError, match=r"`scheduler` got a OneCycleLR at step 2 of total_st"):
        training.acc.step(training.batch(windows), loss_sum)

    assert_bitwise_equal(training.state(), before)


# ------------------------------------------------------- refused at construction


def test_an_optimizer_that_needs_a_closure_is_refused() -> None:
    """Regression (issue 15, defect 3): LBFGS failed only after every pass of the window."""
    model = seeded(batchnorm_dropout)
    with pytest.raises(
        ValueError, match=r"`optimizer` got LBFGS, whose step\(\) needs a closure.*Fix:"
    ):
        tb.Accumulator(model, torch.optim.LBFGS(model.parameters()))


def test_a_scheduler_that_needs_a_metric_is_refused() -> None:
    """Regression (issue 15, defect 3): ReduceLROnPlateau raised in scheduler.step()
    after optimizer.step() had changed the parameters and the momentum."""
    model = seeded(batchnorm_dropout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(
        ValueError,
        match=r"`scheduler` got ReduceLROnPlateau, whose step\(\) needs metrics.*Fix: pass sch",
    ):
        tb.Accumulator(model, optimizer, plateau)
    tb.Accumulator(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1))
