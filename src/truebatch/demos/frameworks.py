"""Accumulation as HF Accelerate and Lightning users write it, for ``truebatch bench``.

Each function trains ``model`` with ``optimizer`` on the CPU (like every
method of the bench) on every epoch of a task, micro-batches of
``task.micro_batch_size``, k = ``task.accumulation_steps`` micro-batches per
optimizer step. Both frameworks divide the loss of each micro-batch by k and
step after k micro-batches or at the end of an epoch, so with their default
loss handling (the micro-batch's mean loss) a step applies
``sum_j grad(mean_j) / k``, not the big batch's ``sum_j n_j grad(mean_j) / N``:
different whenever micro-batches hold different item counts ``n_j`` or a
window holds fewer than k micro-batches.

The frameworks are imported inside the functions: they are optional
(``pip install truebatch[bench]``); :func:`available` says which are installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from truebatch.batching import Batch
from truebatch.demos.data import micro_batches_of
from truebatch.demos.tasks import Task
from truebatch.windows import windows

if TYPE_CHECKING:
    from accelerate import Accelerator


def available(framework: str) -> bool:
    """Whether ``framework`` (``"accelerate"`` or ``"lightning"``) can be imported."""
    return importlib.util.find_spec(framework) is not None


def _first(items: list[Batch]) -> Batch:
    return items[0]


def _loader(micro_batches: list[Batch]) -> DataLoader:
    """A DataLoader yielding ``micro_batches`` unchanged, in order (what Accelerate prepares)."""
    return DataLoader(micro_batches, batch_size=1, collate_fn=_first)


def _accelerator(task: Task) -> Accelerator:
    from accelerate import Accelerator

    return Accelerator(cpu=True, gradient_accumulation_steps=task.accumulation_steps)


def accelerate_accumulate(task: Task, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The loop of Accelerate's gradient-accumulation guide, mean loss per micro-batch.

    ``accelerator.backward`` divides the loss by k; the prepared optimizer
    steps only when ``accumulate`` syncs: after k micro-batches or at the end
    of the loader.
    """
    accelerator = _accelerator(task)
    model, optimizer = accelerator.prepare(model, optimizer)
    for batches in task.epochs:
        loader = accelerator.prepare(_loader(micro_batches_of(batches, task.micro_batch_size)))
        for micro_batch in loader:
            with accelerator.accumulate(model):
                loss = task.mean_loss(model, micro_batch)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()


def accelerate_token_recipe(task: Task, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Accelerate's guide for samples of variable size: count the window's items first.

    Each backward gets ``sum_j * k * processes / N``, where ``N`` is the
    window's item count gathered over processes: ``accelerator.backward``
    divides by k and DDP averages over processes, leaving ``sum_j / N``.
    """
    accelerator = _accelerator(task)
    model, optimizer = accelerator.prepare(model, optimizer)
    k = accelerator.gradient_accumulation_steps
    for batches in task.epochs:
        loader = accelerator.prepare(_loader(micro_batches_of(batches, task.micro_batch_size)))
        for window in windows(loader, k):
            local = sum(task.count(micro_batch) for micro_batch in window)
            items = accelerator.gather(torch.as_tensor(local).reshape(1)).sum()
            for micro_batch in window:
                loss_sum = task.sum_loss(model, micro_batch)
                accelerator.backward(loss_sum * k * accelerator.num_processes / items)
            optimizer.step()
            optimizer.zero_grad()


class _EpochOrder(Sampler[int]):
    """Indices of the micro-batches of the current epoch (Lightning calls ``set_epoch``)."""

    def __init__(self, per_epoch: list[int]) -> None:
        self.starts = [sum(per_epoch[:epoch]) for epoch in range(len(per_epoch))]
        self.per_epoch = per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_epoch[self.epoch]

    def __iter__(self) -> Iterator[int]:
        start = self.starts[self.epoch]
        return iter(range(start, start + self.per_epoch[self.epoch]))


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info logs and its own warnings (hardware, tips, deprecations).

    They say nothing about accumulation and would bury the benchmark's table.
    """
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"lightning\.")
            yield
    finally:
        logger.setLevel(level)


def lightning_accumulate(task: Task, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A LightningModule returning the mean loss, ``Trainer(accumulate_grad_batches=k)``.

    Lightning divides each micro-batch's loss by k and steps after k
    micro-batches or on the epoch's last one. One ``fit`` runs all epochs.
    """
    import lightning

    per_epoch = [micro_batches_of(batches, task.micro_batch_size) for batches in task.epochs]
    flat = [micro_batch for epoch in per_epoch for micro_batch in epoch]
    sampler = _EpochOrder([len(epoch) for epoch in per_epoch])

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            return task.mean_loss(self.model, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer

    with _quiet_lightning():
        trainer = lightning.Trainer(
            max_epochs=len(task.epochs),
            accumulate_grad_batches=task.accumulation_steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
        )
        trainer.fit(Module(), DataLoader(flat, batch_size=None, sampler=sampler))
