"""Learning-rate scaling and schedule length: scale_lr, windows_per_epoch, and the
scheduler stepping once per window (never per micro-batch)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import truebatch as tb
from models import TASKS, max_relative_difference, parameters, seeded
from truebatch.schedule import scale_lr, windows_per_epoch

# ---------------------------------------------------------------- scale_lr


@pytest.mark.parametrize(
    ("lr", "from_batch", "to_batch", "rule", "expected"),
    [
        (0.1, 256, 1024, "linear", 0.4),
        (0.1, 1024, 256, "linear", 0.025),
        (0.05, 32, 32, "linear", 0.05),
        (1e-3, 32, 128, "sqrt", 2e-3),
        (1e-3, 128, 32, "sqrt", 5e-4),
        (3e-4, 16, 48, "sqrt", 3e-4 * 3**0.5),
    ],
)
def test_scale_lr_follows_its_rule(lr, from_batch, to_batch, rule, expected):
    assert scale_lr(lr, from_batch, to_batch, rule) == pytest.approx(expected, rel=1e-15)


@given(
    lr=st.floats(1e-6, 10.0),
    a=st.integers(1, 10_000),
    b=st.integers(1, 10_000),
    rule=st.sampled_from(["linear", "sqrt"]),
)
def test_scale_lr_there_and_back_is_the_identity(lr, a, b, rule):
    assert scale_lr(scale_lr(lr, a, b, rule), b, a, rule) == pytest.approx(lr, rel=1e-12)


def test_scale_lr_is_also_tb_scale_lr():
    assert tb.scale_lr is scale_lr
    assert tb.windows_per_epoch is windows_per_epoch


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rule": "cubic"}, ValueError, r"rule='cubic'.*'linear'.*'sqrt'"),
        ({"lr": 0.0}, ValueError, r"lr must be positive.*got 0\.0"),
        ({"lr": math.nan}, ValueError, r"lr must be positive and finite"),
        ({"to_batch": 0}, ValueError, r"to_batch must be positive.*micro-batch size x"),
        ({"from_batch": -8}, ValueError, r"from_batch must be positive.*got -8"),
        ({"from_batch": "64"}, TypeError, r"from_batch must be a number.*got str"),
        ({"lr": torch.tensor(0.1)}, TypeError, r"lr must be a number.*\.item\(\)"),
        ({"to_batch": True}, TypeError, r"to_batch must be a number.*got bool"),
    ],
)
def test_scale_lr_errors_say_what_and_how(kwargs, error, match):
    arguments = {"lr": 0.1, "from_batch": 64, "to_batch": 256} | kwargs
    with pytest.raises(error, match=match):
        scale_lr(**arguments)


# ------------------------------------------------------- windows_per_epoch


@given(length=st.integers(0, 300), size=st.integers(1, 40))
def test_windows_per_epoch_counts_what_tb_windows_yields(length, size):
    assert windows_per_epoch(length, size) == len(list(tb.windows(range(length), size)))


@given(samples=st.integers(1, 500), micro=st.integers(1, 32), k=st.integers(1, 16))
def test_windows_per_epoch_in_samples_equals_in_micro_batches(samples, micro, k):
    loader = torch.utils.data.DataLoader(range(samples), batch_size=micro)
    assert windows_per_epoch(samples, micro * k) == windows_per_epoch(len(loader), k)


@pytest.mark.parametrize(
    ("length", "size", "error", "match"),
    [
        (10, 0, ValueError, r"size must be 1 or more.*tb\.windows.*got 0"),
        (-1, 4, ValueError, r"length must be 0 or more.*got -1"),
        (10.0, 4, TypeError, r"length must be an int.*len\(loader\)"),
        (10, True, TypeError, r"size must be an int"),
    ],
)
def test_windows_per_epoch_errors_say_what_and_how(length, size, error, match):
    with pytest.raises(error, match=match):
        windows_per_epoch(length, size)


# ---------------------------------------------- the scheduler, once per window


def _decay(step: int) -> float:
    return 1.0 / (1.0 + 0.5 * step)


def test_scheduler_steps_once_per_window_like_the_big_batch_loop():
    """Three epochs of 7 micro-batches of 5 samples, 3 per window (the last window
    of each epoch is short), against the plain loop over the concatenated
    windows that steps the optimizer and the scheduler once per big batch."""
    task = TASKS["mlp"]
    x, y = task.batch(35, 1)
    micro_batches = tb.split((x, y), 5)
    epochs, k = 3, 3

    reference = seeded(task.model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _decay)
    for _ in range(epochs):
        for start in range(0, len(micro_batches), k):
            window = micro_batches[start : start + k]
            big = (torch.cat([mb[0] for mb in window]), torch.cat([mb[1] for mb in window]))
            optimizer.zero_grad()
            task.loss_mean(reference, big).backward()
            optimizer.step()
            scheduler.step()

    model = seeded(task.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _decay)
    acc = tb.Accumulator(model, optimizer, scheduler)
    for _ in range(epochs):
        for window in tb.windows(micro_batches, k):
            acc.step_window(window, task.loss_sum)

    steps = epochs * windows_per_epoch(len(micro_batches), k)
    assert steps == 9
    assert scheduler.last_epoch == steps
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3 * _decay(steps), rel=1e-15)
    assert max_relative_difference(parameters(model), parameters(reference)) <= 1e-12


def test_a_schedule_sized_in_windows_ends_with_the_training():
    """OneCycleLR sized with windows_per_epoch gives its final rate to the last
    window; sized in micro-batches (the common mistake) the training ends while
    the rate is still high, a third of the way through the schedule."""
    task = TASKS["mlp"]
    micro_batches = tb.split(task.batch(48, 2), 4)
    epochs, k = 2, 3

    def rates_used(total_steps: int) -> list[float]:
        model = seeded(task.model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=0.1, total_steps=total_steps, div_factor=10, final_div_factor=100
        )
        acc = tb.Accumulator(model, optimizer, scheduler)
        rates = []
        for _ in range(epochs):
            for window in tb.windows(micro_batches, k):
                rates.append(optimizer.param_groups[0]["lr"])
                acc.step_window(window, task.loss_sum)
        return rates

    final_lr = 0.1 / 10 / 100
    sized_in_windows = epochs * windows_per_epoch(len(micro_batches), k)
    rates = rates_used(sized_in_windows)
    assert len(rates) == sized_in_windows == 8
    assert rates[-1] == pytest.approx(final_lr, rel=1e-9)
    assert rates[0] == pytest.approx(0.1 / 10, rel=1e-9)

    rates = rates_used(epochs * len(micro_batches))
    assert len(rates) == 8
    assert rates[-1] > 50 * final_lr
