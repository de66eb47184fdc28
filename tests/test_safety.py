"""A window either takes the exact step or leaves everything as it was, and says why.

Non-finite gradients, empty windows, exceptions in a micro-batch and misuse
from inside ``loss_fn`` must leave the parameters, the optimizer state and the
scheduler bitwise unchanged, with gradients cleared, and the next window must
still be exact. Every bad argument raises an error that names it and the fix.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import truebatch as tb
from models import (
    TASKS,
    Task,
    assert_bitwise_equal,
    max_relative_difference,
    reference_step,
    seeded,
)

TOL = 1e-12


@dataclass
class Run:
    """A model trained by truebatch next to its plain full-batch reference."""

    task: Task
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    acc: tb.Accumulator
    ref_model: nn.Module
    ref_optimizer: torch.optim.Optimizer
    ref_scheduler: torch.optim.lr_scheduler.LRScheduler

    @classmethod
    def start(cls, task: Task, warm_windows: int = 2, **options: Any) -> Run:
        """Adam + StepLR, a few good windows first so the optimizer has state."""
        model = seeded(task.model)
        ref_model = copy.deepcopy(model)
        optimizer, scheduler = _adam_and_step_lr(model)
        acc = tb.Accumulator(model, optimizer, scheduler, micro_batch_size=3, **options)
        run = cls(task, model, optimizer, scheduler, acc, ref_model, *_adam_and_step_lr(ref_model))
        for window in range(warm_windows):
            run.good_window(seed=100 + window)
        return run

    def good_window(self, seed: int) -> tb.StepResult:
        """One window on both; asserts truebatch matched the reference."""
        batch = self.task.batch(12, seed)
        result = self.acc.step(batch, self.task.loss_sum, count=self.task.count)
        reference_step(self.ref_model, self.ref_optimizer, batch, self.task.loss_mean)
        self.ref_scheduler.step()
        assert result.stepped, result.skip_reason
        assert max_relative_difference(self.model.parameters(), self.ref_model.parameters()) <= TOL
        return result

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
        )

    def assert_untouched(self, before: dict[str, Any]) -> None:
        """Bitwise the same state as ``before``, and no gradient left anywhere."""
        assert_bitwise_equal(self.snapshot(), before)
        assert all(p.grad is None for p in self.model.parameters())
        assert "zero_grad" not in vars(self.optimizer) and "zero_grad" not in vars(self.model)


def _adam_and_step_lr(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def poisoned(task: Task, value: float, on_call: int) -> Callable[[nn.Module, Any], torch.Tensor]:
    """loss_fn whose ``on_call``-th call (1-based) multiplies its loss by ``value``."""
    calls = 0

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = task.loss_sum(model, batch)
        return loss * value if calls == on_call else loss

    return loss_fn


# ------------------------------------------------------------ non-finite windows


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("task", [TASKS["mlp"], TASKS["gru_lm"]], ids=["mlp", "gru_lm"])
def test_nonfinite_window_does_not_step(task: Task, value: float) -> None:
    run = Run.start(task)
    before = run.snapshot()

    result = run.acc.step(task.batch(12, 7), poisoned(task, value, on_call=2), count=task.count)

    assert not result.stepped
    assert "non-finite gradient" in result.skip_reason
    assert not math.isfinite(result.grad_norm)
    assert result.step == 3
    run.assert_untouched(before)
    assert run.scheduler.last_epoch == 2
    run.good_window(seed=8)
    assert run.scheduler.last_epoch == 3


def test_skip_nonfinite_false_steps_anyway() -> None:
    task = TASKS["mlp"]
    run = Run.start(task, skip_nonfinite=False)

    result = run.acc.step(task.batch(12, 7), poisoned(task, math.nan, on_call=1))

    assert result.stepped and result.skip_reason is None
    assert run.scheduler.last_epoch == 3
    assert all(torch.isnan(p).all() for p in run.model.parameters())


def test_window_with_no_items_is_skipped_with_a_reason() -> None:
    """Every label ignored: count_tokens gives N == 0; nothing to average, no step."""
    task = TASKS["gru_lm"]
    run = Run.start(task)
    before = run.snapshot()
    batch = task.batch(6, 9)
    batch["labels"].fill_(-100)

    result = run.acc.step(batch, task.loss_sum, count=tb.count_tokens())

    assert not result.stepped and result.count == 0
    assert "no items (N == 0)" in result.skip_reason
    assert math.isnan(result.loss)
    run.assert_untouched(before)
    run.good_window(seed=10)


# ------------------------------------------------------- exceptions in a window


class Boom(Exception):
    pass


@pytest.mark.parametrize("task", [TASKS["mlp"], TASKS["gru_lm"]], ids=["mlp", "gru_lm"])
def test_exception_in_third_of_four_micro_batches_leaves_everything_as_before(task: Task) -> None:
    run = Run.start(task)
    before = run.snapshot()
    calls = 0

    def fails_third(model: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Boom("data error in micro-batch 3")
        return task.loss_sum(model, batch)

    with pytest.raises(Boom, match="micro-batch 3"):
        run.acc.step(task.batch(12, 11), fails_third, count=task.count)

    assert calls == 3
    run.assert_untouched(before)
    result = run.good_window(seed=12)
    assert result.step == 3 and run.scheduler.last_epoch == 3


def test_exception_in_count_leaves_everything_as_before() -> None:
    task = TASKS["mlp"]
    run = Run.start(task)
    before = run.snapshot()

    def count(batch: Any) -> int:
        raise Boom("cannot count")

    with pytest.raises(Boom):
        run.acc.step(task.batch(12, 13), task.loss_sum, count=count)
    run.assert_untouched(before)
    run.good_window(seed=14)


# ---------------------------------------------------- misuse from inside loss_fn


MISUSES: dict[str, Callable[[Run, torch.Tensor], None]] = {
    "optimizer.step": lambda run, loss: run.optimizer.step(),
    "optimizer.zero_grad": lambda run, loss: run.optimizer.zero_grad(),
    "model.zero_grad": lambda run, loss: run.model.zero_grad(),
    "loss.backward": lambda run, loss: loss.backward(),
}
MISUSE_MESSAGES = {
    "optimizer.step": r"optimizer\.step\(\) was called inside a truebatch window.*remove",
    "optimizer.zero_grad": r"zero_grad\(\) was called inside a truebatch window.*erase",
    "model.zero_grad": r"zero_grad\(\) was called inside a truebatch window.*erase",
    "loss.backward": r"backward\(\) was called inside loss_fn.*return loss",
}


@pytest.mark.parametrize("misuse", MISUSES)
@pytest.mark.parametrize("on_call", [1, 2])
def test_stepping_zeroing_or_backward_inside_loss_fn_is_refused(misuse: str, on_call: int) -> None:
    task = TASKS["mlp"]
    run = Run.start(task)
    before = run.snapshot()
    calls = 0

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = task.loss_sum(model, batch)
        if calls == on_call:
            MISUSES[misuse](run, loss)
        return loss

    with pytest.raises(RuntimeError, match=MISUSE_MESSAGES[misuse]):
        run.acc.step(task.batch(12, 15), loss_fn)

    run.assert_untouched(before)
    run.good_window(seed=16)
    run.optimizer.zero_grad()  # outside a window, the user's calls work again
    run.model.zero_grad()


OTHER_HANDLES: dict[str, Callable[[nn.Module], None]] = {
    "submodule": lambda model: model.net[0].zero_grad(),
    "submodule_to_zeros": lambda model: model.net[3].zero_grad(set_to_none=False),
    "parameters": lambda model: [p.grad.zero_() for p in model.parameters()],
}


@pytest.mark.parametrize("handle", OTHER_HANDLES)
@pytest.mark.parametrize("on_call", [2, 4])
def test_zero_grad_on_another_handle_of_the_model_is_reported_as_zero_grad(
    handle: str, on_call: int
) -> None:
    """Regression (issue 15, defect 12): a zero_grad on a submodule (or the gradients
    zeroed by hand) inside loss_fn was reported as "backward() inside loss_fn". (On the
    first call no gradient exists yet, so nothing is erased and nothing is reported.)"""
    task = TASKS["mlp"]
    run = Run.start(task)
    before = run.snapshot()
    calls = 0

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == on_call:
            OTHER_HANDLES[handle](model)
        return task.loss_sum(model, batch)

    with pytest.raises(RuntimeError, match=MISUSE_MESSAGES["model.zero_grad"]):
        run.acc.step(task.batch(12, 15), loss_fn)

    run.assert_untouched(before)
    run.good_window(seed=16)


# ------------------------------------------------------------ bad arguments


BAD_LOSSES = {
    "not_a_scalar": (
        lambda m, b: TASKS["mlp"].loss(m, b, reduction="none"),
        TypeError,
        r"`loss_fn` returned a tensor of shape \(3,\); expected a 0-dim.*reduction='sum'",
    ),
    "no_grad": (
        lambda m, b: TASKS["mlp"].loss_sum(m, b).detach(),
        TypeError,
        r"does not require grad.*Fix:.*\.detach\(\)",
    ),
    "not_a_tensor": (
        lambda m, b: TASKS["mlp"].loss_sum(m, b).item(),
        TypeError,
        r"`loss_fn` returned float; expected a 0-dim tensor",
    ),
    "pair_and_count": (
        lambda m, b: (TASKS["mlp"].loss_sum(m, b), 12),
        TypeError,
        r"count=\.\.\. was also given; expected one source of N",
    ),
    "triple": (
        lambda m, b: (TASKS["mlp"].loss_sum(m, b), 12, 0),
        TypeError,
        r"sequence of 3 items; expected.*pair \(loss_sum, count\)",
    ),
    "negative_returned_count": (
        lambda m, b: (TASKS["mlp"].loss_sum(m, b), -1),
        ValueError,
        r"negative count for 4 micro-batch\(es\); expected.*0 or more",
    ),
}


@pytest.mark.parametrize("case", BAD_LOSSES)
def test_bad_loss_fn_output(case: str) -> None:
    loss_fn, error, words = BAD_LOSSES[case]
    count = tb.count_samples if case == "pair_and_count" else None
    run = Run.start(TASKS["mlp"])
    before = run.snapshot()

    with pytest.raises(error, match=words):
        run.acc.step(TASKS["mlp"].batch(12, 17), loss_fn, count=count)

    run.assert_untouched(before)
    run.good_window(seed=18)


def test_pair_for_some_micro_batches_and_bare_loss_for_others() -> None:
    task = TASKS["mlp"]
    run = Run.start(task)
    before = run.snapshot()
    calls = 0

    def inconsistent(model: nn.Module, batch: Any) -> Any:
        nonlocal calls
        calls += 1
        loss = task.loss_sum(model, batch)
        return (loss, len(batch[0])) if calls == 1 else loss

    with pytest.raises(TypeError, match=r"pair.*for some micro-batches and a bare loss"):
        run.acc.step(task.batch(12, 19), inconsistent)
    run.assert_untouched(before)


@pytest.mark.parametrize(
    ("count", "error", "words"),
    [
        (lambda b: -1, ValueError, r"negative count for micro-batches \[0, 1, 2, 3\]"),
        (lambda b: "12", TypeError, r"`count\(micro_batch\)` got str; expected an int"),
        (
            lambda b: torch.ones(2),
            TypeError,
            r"got a tensor of shape \(2,\); expected a number or a 1-element tensor",
        ),
        (5, TypeError, r"`count` got int; expected.*Fix: use tb\.count_samples"),
    ],
    ids=["negative", "string", "vector", "not_callable"],
)
def test_bad_count(count: Any, error: type[Exception], words: str) -> None:
    run = Run.start(TASKS["mlp"])
    before = run.snapshot()
    with pytest.raises(error, match=words):
        run.acc.step(TASKS["mlp"].batch(12, 20), TASKS["mlp"].loss_sum, count=count)
    run.assert_untouched(before)


def test_bad_loss_fn_and_batches() -> None:
    task = TASKS["mlp"]
    run = Run.start(task)
    before = run.snapshot()
    x, y = task.batch(12, 21)
    with pytest.raises(TypeError, match=r"`loss_fn` got str; expected a function"):
        run.acc.step((x, y), "cross_entropy")
    with pytest.raises(ValueError, match=r"batch\[0\]: 12, batch\[1\]: 11"):
        run.acc.step((x, y[:11]), task.loss_sum)
    with pytest.raises(ValueError, match=r"batch\[1\]: 5"):
        run.acc.step_window([(x, y), (x[:4], y[:5])], task.loss_sum)
    with pytest.raises(ValueError, match="holds no tensor"):
        run.acc.step_window([(x, y), ["no", "tensor"]], task.loss_sum)
    run.assert_untouched(before)


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = seeded(TASKS["mlp"].model)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        (
            {"micro_batch_size": 0},
            ValueError,
            r"`micro_batch_size` got 0 \(int\); expected a positive int",
        ),
        (
            {"micro_batch_size": -2},
            ValueError,
            r"`micro_batch_size` got -2 .*expected a positive int",
        ),
        ({"micro_batch_size": 2.5}, TypeError, r"`micro_batch_size` got 2.5 \(float\); expected"),
        ({"micro_batch_size": True}, TypeError, r"`micro_batch_size` got True \(bool\); expected"),
        (
            {"micro_batch_size": "big"},
            ValueError,
            r"`micro_batch_size` got 'big'; expected a positive int, 'auto' or None",
        ),
        (
            {"micro_batch_size": "auto", "max_micro_batch_size": 0},
            ValueError,
            r"`max_micro_batch_size` got 0; expected a positive int",
        ),
        (
            {"max_micro_batch_size": 8},
            ValueError,
            r"`max_micro_batch_size` got 8.*only applies with micro_batch_size='auto'",
        ),
        (
            {"max_grad_norm": 0},
            ValueError,
            r"`max_grad_norm` got 0; expected a positive number or None",
        ),
        (
            {"max_grad_norm": -1.0},
            ValueError,
            r"`max_grad_norm` got .*; expected a positive number",
        ),
        ({"max_grad_norm": "1"}, ValueError, r"`max_grad_norm` got .*; expected a positive number"),
        (
            {"scaler": object()},
            TypeError,
            r"`scaler` got object .*expected a torch\.amp\.GradScaler",
        ),
        (
            {"autocast": torch.int8},
            TypeError,
            r"`autocast` got torch\.int8; expected a floating torch\.dtype",
        ),
        (
            {"autocast": torch.float64},
            ValueError,
            r"`autocast` got torch\.float64; expected one of",
        ),
    ],
    ids=lambda v: (
        ",".join(f"{k}={type(x).__name__ if k == 'scaler' else x!r}" for k, x in v.items())
        if isinstance(v, dict)
        else ""
    ),
)
def test_bad_accumulator_options(options: dict, error: type[Exception], words: str) -> None:
    model, optimizer = _model_and_optimizer()
    with pytest.raises(error, match=words):
        tb.Accumulator(model, optimizer, **options)


def test_optimizer_over_parameters_not_in_the_model() -> None:
    model, _ = _model_and_optimizer()
    other = seeded(TASKS["mlp"].model)
    optimizer = torch.optim.SGD([*model.parameters(), next(other.parameters())], lr=0.1)
    with pytest.raises(ValueError, match=r"1 parameter\(s\) that are not parameters of `model`"):
        tb.Accumulator(model, optimizer)
    with pytest.raises(ValueError, match="not parameters of `model`"):
        tb.Accumulator(model, torch.optim.SGD(other.parameters(), lr=0.1))


def test_scheduler_of_another_optimizer() -> None:
    model, optimizer = _model_and_optimizer()
    _, other = _model_and_optimizer()
    scheduler = torch.optim.lr_scheduler.StepLR(other, step_size=1)
    with pytest.raises(ValueError, match="`scheduler` got a scheduler built for another optimizer"):
        tb.Accumulator(model, optimizer, scheduler)
    with pytest.raises(
        TypeError, match=r"`scheduler` got float; expected an object with a step\(\) method"
    ):
        tb.Accumulator(model, optimizer, scheduler=0.1)


def test_model_and_optimizer_types() -> None:
    model, optimizer = _model_and_optimizer()
    with pytest.raises(TypeError, match=r"`model` got function; expected a torch\.nn\.Module"):
        tb.Accumulator(lambda x: x, optimizer)
    with pytest.raises(
        TypeError, match=r"`optimizer` got list; expected a torch\.optim\.Optimizer"
    ):
        tb.Accumulator(model, list(model.parameters()))
