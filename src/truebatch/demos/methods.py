"""The ways of training the demos compare, each over all the epochs of a :class:`Task`.

A :data:`Method` trains ``model`` with ``optimizer`` on every epoch of the
task, in order, and calls ``on_step(loss)`` after each optimizer step. The
big batch takes each effective batch whole; every other method takes the same
batches split into micro-batches of ``task.micro_batch_size`` and groups them
k = ``task.accumulation_steps`` to a window (the per-epoch loops are in
:mod:`truebatch.demos.loops`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from truebatch.accumulator import Accumulator
from truebatch.demos import loops
from truebatch.demos.data import micro_batches_of
from truebatch.demos.loops import OnStep
from truebatch.demos.tasks import Task

Method = Callable[[Task, nn.Module, torch.optim.Optimizer, OnStep], None]
"""Trains ``model`` on all of ``task.epochs``, calling ``on_step(loss)`` after each step."""


def big_batch(
    task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, on_step: OnStep
) -> None:
    """The reference: one step per effective batch on its mean loss."""
    for batches in task.epochs:
        loops.big_batch(model, optimizer, batches, task.mean_loss, on_step)


def naive(loop: Callable[..., None]) -> Method:
    """A hand-written accumulation ``loop`` of :mod:`~truebatch.demos.loops` on the mean loss.

    ``loop`` is :func:`~truebatch.demos.loops.zero_grad_every_micro_batch` or
    :func:`~truebatch.demos.loops.mean_loss_over_k`: the loops of the classic failures.
    """

    def method(
        task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, on_step: OnStep
    ) -> None:
        for batches in task.epochs:
            micro_batches = micro_batches_of(batches, task.micro_batch_size)
            k = task.accumulation_steps
            loop(model, optimizer, micro_batches, k, task.mean_loss, task.count, on_step)

    return method


def hand_written_exact(
    task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, on_step: OnStep
) -> None:
    """The correct loop without truebatch: loss sums divided by each window's item count."""
    for batches in task.epochs:
        micro_batches = micro_batches_of(batches, task.micro_batch_size)
        k = task.accumulation_steps
        loops.hand_written_exact(
            model, optimizer, micro_batches, k, task.sum_loss, task.count, on_step
        )


def accumulator_windows(
    task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, on_step: OnStep
) -> None:
    """truebatch: an Accumulator stepping on windows of k micro-batches."""
    accumulator = Accumulator(model, optimizer)
    for batches in task.epochs:
        micro_batches = micro_batches_of(batches, task.micro_batch_size)
        k = task.accumulation_steps
        loops.truebatch(accumulator, micro_batches, k, task.sum_loss, task.count, on_step)


def accumulator_whole_batches(
    task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, on_step: OnStep
) -> None:
    """The Accumulator with each effective batch whole as its window: a big batch.

    The reference for models whose split-invariant layers need the window's
    context (the step and the sample offsets) that only the Accumulator gives.
    """
    accumulator = Accumulator(model, optimizer)
    for batches in task.epochs:
        loops.truebatch(accumulator, batches, 1, task.sum_loss, task.count, on_step)
