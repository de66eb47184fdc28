"""truebatch inside a LightningModule, with manual optimization.

Lightning's ``accumulate_grad_batches`` divides every micro-batch's loss by
the number of micro-batches k, so a loss averaged within each micro-batch
gives ``(1/k) * sum_j mean_j``: not the big batch's mean when micro-batches
hold different numbers of items, and too small on an epoch's shorter last
window. truebatch instead divides the SUM of the item losses by the item count
N of the whole window. In a LightningModule, switch to manual optimization and
let an Accumulator do the backward passes and the step::

    import truebatch as tb
    from truebatch.integrations.lightning import accumulator

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False   # truebatch runs backward and steps
            self.net = ...

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def on_fit_start(self):
            self.accumulator = accumulator(self, micro_batch_size=16)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss_sum = lambda model, mb: F.cross_entropy(model(mb[0]), mb[1], reduction="sum")
            result = self.accumulator.step(batch, loss_sum)   # one whole batch = one step
            self.log("train_loss", result.loss)

A dataloader that yields lists of micro-batches goes to
``self.accumulator.step_window(batch, loss_sum)`` instead. Only Lightning
objects are touched (no import of ``lightning`` here), so modules written
against ``lightning.pytorch`` and ``pytorch_lightning`` both work.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from truebatch.accumulator import Accumulator

__all__ = ["accumulator"]


def accumulator(module: nn.Module, **kwargs: Any) -> Accumulator:
    """An Accumulator over a LightningModule and the optimizer of its Trainer.

    The Accumulator steps the optimizer through Lightning's wrapper (what
    ``module.optimizers()`` returns), as ``opt.step()`` does in manual
    optimization: ``trainer.global_step`` advances once per window and the
    ``on_before_optimizer_step`` hooks run. The scheduler returned by
    ``configure_optimizers`` is stepped once per window, after a real step,
    whatever its ``interval``; pass ``scheduler=None`` to step it yourself.
    Lightning keeps checkpointing the model, optimizer and scheduler; do not
    use ``Accumulator.state_dict()`` / ``load_state_dict()`` here.

    Call it once the Trainer has set up the optimizers: in ``on_fit_start``,
    ``on_train_start`` or the first ``training_step``.

    Args:
        module: a LightningModule attached to a Trainer, with
            ``self.automatic_optimization = False``.
        **kwargs: keyword arguments of :class:`truebatch.Accumulator`
            (``micro_batch_size``, ``max_grad_norm``, ``scheduler``, ...).

    Raises:
        RuntimeError: automatic optimization is on; the Trainer runs on more
            than one process; or its precision plugin owns a GradScaler
            (``precision="16-mixed"``).
        ValueError: the module has no optimizer yet, several optimizers or
            schedulers, or a ReduceLROnPlateau scheduler.

    Examples:
        >>> def on_fit_start(self):
        ...     self.accumulator = accumulator(self, micro_batch_size=16, max_grad_norm=1.0)
    """
    if "optimizer" in kwargs:
        raise TypeError(
            "accumulator(module, optimizer=...) takes the optimizer from the module's "
            "Trainer; return it from configure_optimizers instead of passing it"
        )
    if getattr(module, "automatic_optimization", None) is not False:
        raise RuntimeError(
            "truebatch needs manual optimization in a LightningModule: with automatic "
            "optimization Lightning runs its own backward and step as well; set "
            "self.automatic_optimization = False in __init__"
        )
    trainer = module.trainer
    if trainer.world_size > 1:
        raise RuntimeError(
            f"accumulator(module) runs on a single process, but the Trainer has "
            f"world_size={trainer.world_size}: Lightning's DDP wrapper would reduce gradients "
            "after every micro-batch's backward; use devices=1, or run truebatch with "
            "torchrun and tb.Accumulator on a DistributedDataParallel model"
        )
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise RuntimeError(
            "the Trainer's precision plugin owns a GradScaler (precision='16-mixed') and "
            "would unscale the gradients a second time inside optimizer.step(); use "
            "precision='32-true' and pass scaler=torch.amp.GradScaler() and "
            "autocast=torch.float16 here, or use precision='bf16-mixed'"
        )
    kwargs.setdefault("scheduler", _scheduler(module))
    return Accumulator(module, _optimizer(module), **kwargs)


def _optimizer(module: Any) -> torch.optim.Optimizer:
    """The single optimizer of the module, in Lightning's wrapper."""
    optimizers = module.optimizers()
    if isinstance(optimizers, list):
        raise ValueError(
            f"accumulator(module) needs exactly one optimizer, found {len(optimizers)}; "
            "return one optimizer from configure_optimizers, and build the accumulator in "
            "on_fit_start or later, once the Trainer has set it up"
        )
    return optimizers


def _scheduler(module: Any) -> Any:
    """The single scheduler from configure_optimizers, or None."""
    scheduler = module.lr_schedulers()
    if isinstance(scheduler, list):
        raise ValueError(
            f"accumulator(module) steps one scheduler, found {len(scheduler)}; combine them "
            "(torch.optim.lr_scheduler.SequentialLR / ChainedScheduler) or pass "
            "scheduler=None and step them yourself"
        )
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(
            "ReduceLROnPlateau needs the monitored metric at each step, which the "
            "Accumulator does not have; pass scheduler=None and call "
            "scheduler.step(metric) yourself, e.g. in on_validation_epoch_end"
        )
    return scheduler
