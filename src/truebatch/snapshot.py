"""What a failed window must undo, saved cheaply before it can change.

A window changes, besides the gradients, the buffers its forwards update
(BatchNorm running statistics) and the random number generators its layers
draw from (dropout): :class:`WindowStart` saves both as the window starts, so
an exception in any pass (``KeyboardInterrupt`` and out-of-memory included),
or in the step, puts them back, and ``micro_batch_size="auto"`` retries from
the same state.

The once-per-window step then changes the scaler, the parameters and the
optimizer state, and the scheduler with the param groups' hyperparameters:
:class:`StepRollback` saves, before it, what is cheap to save (the scaler's
scale and growth tracker, the scheduler's state and the groups'
hyperparameters) and puts it back if the step raises. A copy of the
parameters and of the optimizer's moments is not taken: it would cost a
second copy of the optimizer's memory and, measured with
``benchmarks/overhead.py``'s AdamW MLP, 0.8 ms of a 22 ms window. Instead,
what is known to fail is refused before the step (at construction: closure
optimizers, metric schedulers; before the window: a ``OneCycleLR`` past its
``total_steps``), and an exception raised by or after the optimizer's update
says so in a note.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "GroupEntries",
    "RNGState",
    "StepRollback",
    "WindowStart",
    "clone_buffers",
    "copy_into",
    "restore_buffers",
    "rng_state",
    "same_rng_state",
    "set_rng_state",
]

# The generators' states by device ("cpu", "cuda:0", ...), as rng_state records them.
RNGState = dict[str, Any]


def rng_state(devices: Sequence[torch.device]) -> RNGState:
    """The CPU generator's state and that of every CUDA device in ``devices``."""
    state: RNGState = {"cpu": torch.get_rng_state()}
    for device in devices:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            state[f"cuda:{index}"] = torch.cuda.get_rng_state(index)
    return state


def set_rng_state(state: RNGState, devices: Sequence[torch.device]) -> None:
    """Restore what :func:`rng_state` saved (a ``"cuda"`` key: the first CUDA device)."""
    torch.set_rng_state(state["cpu"])
    cuda = [d for d in devices if d.type == "cuda"]
    for key, value in state.items():
        if key.startswith("cuda:"):
            torch.cuda.set_rng_state(value, int(key.split(":")[1]))
        elif key == "cuda" and cuda:
            torch.cuda.set_rng_state(value, cuda[0])


def same_rng_state(first: RNGState, second: RNGState) -> bool:
    """Whether two :func:`rng_state` records hold the same generators in the same state
    (no random number was drawn between them)."""
    return first.keys() == second.keys() and all(
        torch.equal(value, second[key]) for key, value in first.items()
    )


def clone_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def restore_buffers(model: nn.Module, saved: list[torch.Tensor]) -> None:
    copy_into(list(model.buffers()), saved)


def copy_into(targets: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """``target.copy_(value)`` for each pair, outside autograd (buffers, saved values)."""
    with torch.no_grad():
        for target, value in zip(targets, values, strict=True):
            target.copy_(value)


class WindowStart:
    """The model's buffers and the RNG of every device in use, as a window starts.

    ``buffers`` are the model's (``model.buffers()``, read by the caller); they
    are restored into the model's buffers of the moment, in the same order.
    """

    def __init__(
        self, model: nn.Module, devices: Sequence[torch.device], buffers: list[torch.Tensor]
    ) -> None:
        self.model = model
        self.devices = devices
        self.buffers = [b.detach().clone() for b in buffers]
        self.rng = rng_state(devices)

    def restore(self) -> None:
        if self.buffers:
            restore_buffers(self.model, self.buffers)
        set_rng_state(self.rng, self.devices)


class GroupEntries:
    """An optimizer's param-group entries but ``params``, as they are now: the learning
    rates a scheduler sets, and what some optimizers keep there (schedule-free's step
    count, Prodigy's estimates). A tensor entry is kept with a copy of its data and its
    version counter, which an in-place change bumps."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.saved = [
            {key: _entry(value) for key, value in group.items() if key != "params"}
            for group in optimizer.param_groups
        ]

    def changed(self) -> bool:
        """Whether an entry was added, removed, replaced or changed in place since."""
        for group, saved in zip(self.optimizer.param_groups, self.saved, strict=True):
            if group.keys() - {"params"} != saved.keys():
                return True
            for key, (value, _, version) in saved.items():
                now = group[key]
                if isinstance(value, torch.Tensor):
                    if now is not value or now._version != version:
                        return True
                elif now is not value and not (type(now) is type(value) and _equal(now, value)):
                    return True
        return False

    def restore(self) -> None:
        """Put every entry back: the same objects, a tensor's data as it was, and no
        entry added since."""
        with torch.no_grad():
            for group, saved in zip(self.optimizer.param_groups, self.saved, strict=False):
                for key in group.keys() - {"params"} - saved.keys():
                    del group[key]
                for key, (value, copied, version) in saved.items():
                    if copied is not None and value._version != version:
                        value.copy_(copied)
                    group[key] = value


def _entry(value: Any) -> tuple[Any, torch.Tensor | None, int | None]:
    if isinstance(value, torch.Tensor):
        return value, value.detach().clone(), value._version
    return value, None, None


def _equal(a: Any, b: Any) -> bool:
    """Equal plain values (a number the step wrote again); others count as changed."""
    return isinstance(a, int | float | str | bytes | type(None)) and a == b


class StepRollback:
    """The state the step may change; :meth:`restore` puts it back.

    The parameters and the optimizer's state are saved only with
    ``Accumulator(atomic_step=True)`` (``updated``): they are as large as the
    model, and a hand-written loop keeps no copy either.

    Saved only for what is there: the scheduler's state when there is a
    scheduler, the groups' entries when there is a scheduler or ``updated``,
    the scale and growth tracker when there is a scaler (device copies, no
    host read).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: Any,
        *,
        updated: Sequence[nn.Parameter] | None = None,
    ) -> None:
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        # atomic_step=True: the parameters the optimizer updates and its per-parameter
        # state, copied (one more copy of both in memory, for the step only).
        self.updated = updated
        if updated is not None:
            with torch.no_grad():
                self.values = torch._foreach_mul(list(updated), 1) if updated else []
            self.moments = {
                p: {k: _copied(v) for k, v in optimizer.state[p].items()}
                for p in updated
                if p in optimizer.state
            }
        # "before", "stepping" (inside optimizer.step) or "stepped": what a failure left.
        self.optimizer_stage = "before"
        self.scheduler_state = scheduler.state_dict() if scheduler is not None else None
        # The groups' entries: the scheduler's learning rates, and with atomic_step what an
        # optimizer keeps there (schedule-free's step count, Prodigy's estimates).
        self.groups = (
            GroupEntries(optimizer) if scheduler is not None or updated is not None else None
        )
        self.scale = self.growth = None
        if scaler is not None:
            # Copies of GradScaler's own tensors: its state_dict() would read them to the
            # host (a device sync every window); other scalers go through state_dict().
            scale, growth = (
                getattr(scaler, "_scale", None),
                getattr(scaler, "_growth_tracker", None),
            )
            if isinstance(scale, torch.Tensor) and isinstance(growth, torch.Tensor):
                self.scale, self.growth = scale.clone(), growth.clone()
            else:
                self.scaler_state = scaler.state_dict()

    def restore(self, error: BaseException) -> None:
        """Undo what can be undone; note on ``error`` what cannot."""
        if self.updated is not None:
            with torch.no_grad():
                if self.updated:
                    torch._foreach_copy_(list(self.updated), self.values)
            for p in self.updated:
                if p in self.moments:
                    self.optimizer.state[p] = self.moments[p]
                else:
                    self.optimizer.state.pop(p, None)
            self.optimizer_stage = "before"
        if self.scheduler is not None:
            self.scheduler.load_state_dict(self.scheduler_state)
        if self.groups is not None:
            self.groups.restore()
        if self.scaler is not None:
            if self.scale is not None:
                # update(new_scale=...) also forgets the window's unscale_.
                self.scaler.update(new_scale=self.scale)
                self.scaler._growth_tracker.copy_(self.growth)
            else:
                self.scaler.load_state_dict(self.scaler_state)
        if not hasattr(error, "add_note"):  # Python < 3.11
            return
        if self.optimizer_stage == "stepped":
            error.add_note(
                "truebatch: raised after the optimizer's update: the parameters and the "
                "optimizer's moments are those after it; gradients, buffers, RNG, scheduler "
                "and scaler are as before the window."
            )
        elif self.optimizer_stage == "stepping":
            error.add_note(
                "truebatch: raised by the optimizer's step, which may have updated some "
                "parameters and moments; gradients, buffers, RNG, scheduler and scaler are "
                "as before the window."
            )


def _copied(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value
