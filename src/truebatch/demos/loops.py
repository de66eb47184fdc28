"""The training loops the demos compare, one epoch each.

Every loop calls ``on_step(loss)`` after each optimizer step, with the mean
loss of the items the step's window saw. The big batch takes effective
batches; the others take the same data as a stream of micro-batches and an
accumulation count ``k`` (a micro-batch loader, as users write them): window
``w`` is micro-batches ``w*k .. w*k + k - 1``, and the last window of an epoch
may be shorter.

Two loops are written the way forum posts and tutorials write them, and go
wrong (the classic failures of :mod:`truebatch.demos.failures`):

- :func:`zero_grad_every_micro_batch` ("zero_grad every micro-batch") zeroes the
  gradient at the top of every iteration, so a step sees only the last
  micro-batch, divided by k.
- :func:`mean_loss_over_k` ("mean loss / k" on variable-length tokens, on
  unequal micro-batches, or on a short last window) adds ``mean_j / k``: right only
  when all k micro-batches hold the same number of items. A short last window
  (or a short last micro-batch, or micro-batches with different token counts)
  weights items unequally.

The correct hand-written loop divides each micro-batch's loss *sum* by the
item count ``N`` of its whole window, which is what truebatch's Accumulator
does (plus the safety and distributed bookkeeping).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from truebatch.accumulator import Accumulator, LossFn
from truebatch.batching import Batch, Counter
from truebatch.windows import windows

OnStep = Callable[[float], None]
MeanLoss = Callable[[nn.Module, Batch], torch.Tensor]


def big_batch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    mean_loss: MeanLoss,
    on_step: OnStep,
) -> None:
    """The reference: one forward, backward and step per effective batch (mean loss)."""
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = mean_loss(model, batch)
        loss.backward()
        optimizer.step()
        on_step(loss.item())


class _WindowLoss:
    """Mean loss of a window's items, from each micro-batch's mean and item count."""

    def __init__(self, count: Counter) -> None:
        self.count = count
        self.total = 0.0
        self.items = 0.0

    def add(self, mean: torch.Tensor, micro_batch: Batch) -> None:
        items = float(self.count(micro_batch))
        self.total += mean.item() * items
        self.items += items

    def pop(self) -> float:
        value = self.total / self.items
        self.total = self.items = 0.0
        return value


def zero_grad_every_micro_batch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[Batch],
    k: int,
    mean_loss: MeanLoss,
    count: Counter,
    on_step: OnStep,
) -> None:
    """The "zero_grad every micro-batch" loop: ``zero_grad()`` at every iteration's top.

    The step applies ``grad(mean_last) / k``: only the window's last micro-batch
    counts, scaled down k times.
    """
    seen = _WindowLoss(count)
    for i, micro_batch in enumerate(micro_batches):
        optimizer.zero_grad()
        loss = mean_loss(model, micro_batch)
        seen.add(loss, micro_batch)
        (loss / k).backward()
        if (i + 1) % k == 0 or i + 1 == len(micro_batches):
            optimizer.step()
            on_step(seen.pop())


def mean_loss_over_k(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[Batch],
    k: int,
    mean_loss: MeanLoss,
    count: Counter,
    on_step: OnStep,
) -> None:
    """The "mean loss / k" loop: each micro-batch's mean loss divided by a fixed k.

    The step applies ``sum_j grad(mean_j) / k``. The big batch applies
    ``sum_j n_j grad(mean_j) / N``; the two agree only when every window holds
    k micro-batches of equal item counts ``n_j = N / k``.
    """
    seen = _WindowLoss(count)
    optimizer.zero_grad()
    for i, micro_batch in enumerate(micro_batches):
        loss = mean_loss(model, micro_batch)
        seen.add(loss, micro_batch)
        (loss / k).backward()
        if (i + 1) % k == 0 or i + 1 == len(micro_batches):
            optimizer.step()
            optimizer.zero_grad()
            on_step(seen.pop())


def hand_written_exact(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[Batch],
    k: int,
    sum_loss: LossFn,
    count: Counter,
    on_step: OnStep,
) -> None:
    """A correct loop without truebatch: each loss sum divided by its window's item count.

    The step applies ``sum_j grad(loss_sum_j) / N`` with ``N = sum_j n_j`` over
    the window, the big batch's gradient.
    """
    for window in windows(micro_batches, k):
        items = sum(float(count(micro_batch)) for micro_batch in window)
        total = 0.0
        for micro_batch in window:
            loss = sum_loss(model, micro_batch)
            (loss / items).backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        on_step(total / items)


def truebatch(
    accumulator: Accumulator,
    micro_batches: list[Batch],
    k: int,
    sum_loss: LossFn,
    count: Counter,
    on_step: OnStep,
) -> None:
    """truebatch: every k micro-batches are one window, one exact step."""
    for window in windows(micro_batches, k):
        result = accumulator.step_window(window, sum_loss, count=count)
        on_step(result.loss)
