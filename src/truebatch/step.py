"""The once-per-window step: unscale, check, clip, step, update, schedule, zero.

After a window's passes have left its gradient in ``.grad``, :class:`WindowStep`
does exactly one of each, in this order: unscale (GradScaler) -> non-finite
check -> clip -> optimizer step -> scaler update -> scheduler step ->
zero_grad(set_to_none=True). The norm, the clip, the check and the step cover
the parameters the optimizer holds. The clip is that of
``torch.nn.utils.clip_grad_norm_``:

    g <- g * min(1, max_grad_norm / (||g|| + 1e-6))

Whether to step is decided with no host read when nothing can make the window
skip; on the device with ``host_sync=False`` (a masked step); else on the host
after the window's one read (``truebatch.readout``). If any of it raises,
:class:`~truebatch.snapshot.StepRollback` and the window start put back what
the window changed.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Protocol

import torch

from truebatch.gradients import (
    MaskedStep,
    ParameterSets,
    clear_gradients,
    clip_gradients,
    gradient_norms,
    present_gradients,
    total_norm_of,
)
from truebatch.readout import Readout
from truebatch.result import StepResult, read_outcome
from truebatch.snapshot import StepRollback, WindowStart
from truebatch.totals import WindowTotals
from truebatch.window import WindowHistory

__all__ = ["StepOptions", "WindowStep"]


class StepOptions(Protocol):
    """What the step reads from its owner (the Accumulator) at every window, so that an
    option changed between windows (``acc.scheduler = ...``) takes effect."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    max_grad_norm: float | None
    skip_nonfinite: bool
    atomic_step: bool
    host_sync: bool


class WindowStep:
    """The step of every window of one Accumulator (see the module docstring).

    Args:
        options: the Accumulator, whose options are read at every step.
        parameters: the model's and the optimizer's parameters, as of the window.
        history: the window count, advanced by a window that completes.
    """

    def __init__(
        self, options: StepOptions, parameters: ParameterSets, history: WindowHistory
    ) -> None:
        self.options = options
        self.parameters = parameters
        self.history = history

    def apply(self, window: WindowTotals, start: WindowStart) -> StepResult:
        """Unscale, check, clip, step, update, schedule and zero, once; if any of it
        raises, what :class:`~truebatch.snapshot.StepRollback` saved and the window
        start are restored.

        Whether to step is decided, in this order of preference, with no read (nothing
        can make the window skip), on the device (``host_sync=False``: a masked step),
        or on the host after the window's one read.
        """
        options = self.options
        params = self.parameters
        readout = window.readout
        totals_convert = readout.convert
        readout.convert = lambda values: read_outcome(totals_convert(values), values)
        readout.add(skipped=None, skip_nonfinite=options.skip_nonfinite, scale=None)
        n_items = readout.parts["n_items"]
        self.history.index += 1
        if not isinstance(n_items, torch.Tensor) and n_items == 0:
            clear_gradients(params.model)
            readout.add(grad_norm=math.nan)
            return self.result(window)
        rollback = StepRollback(
            options.optimizer,
            options.scheduler,
            options.scaler,
            updated=params.updated if options.atomic_step else None,
        )
        try:
            self.history.stepping = True
            self.step_once(readout, rollback, n_items)
        except BaseException as error:
            self.history.index -= 1
            rollback.restore(error)
            start.restore()
            clear_gradients(params.model)
            raise
        finally:
            self.history.stepping = False
        clear_gradients(params.model)
        result = self.result(window)
        scale_unknown = (
            options.scaler is not None
            and getattr(options.scaler, "is_enabled", lambda: True)()
            and readout.parts["scale"] is None
        )
        if scale_unknown and not readout.pending and not result.stepped and result.count:
            # The scale the update lowered: read only in a skipped window.
            reason = f"{result.skip_reason}; GradScaler lowered its scale to "
            result = replace(result, skip_reason=reason + f"{options.scaler.get_scale():g}")
        return result

    def step_once(
        self, readout: Readout, rollback: StepRollback, n_items: float | torch.Tensor
    ) -> None:
        options = self.options
        if options.scaler is not None:
            options.scaler.unscale_(options.optimizer)
        grads = present_gradients(self.parameters.updated)
        # The norm as one fused kernel's per-tensor norms, combined when read.
        norms = gradient_norms(grads)
        readout.add(grad_norm=math.nan if norms is None else norms)
        counted_on_device = isinstance(n_items, torch.Tensor)
        can_skip = counted_on_device or (options.skip_nonfinite and norms is not None)
        if not can_skip and options.max_grad_norm is None:  # nothing to decide: no read
            readout.add(skipped=False)
            stepped = True
        else:
            updated = self.parameters.updated
            masked = MaskedStep.when(self.can_mask(readout), options.optimizer, updated)
            if masked is not None:
                empty = n_items == 0 if counted_on_device else None
                self.masked_step(readout, rollback, masked, norms, empty)
                return
            stepped = readout.get("stepped")  # the window's one read
            norm = readout.get("grad_norm")
            if options.max_grad_norm is not None and math.isfinite(norm):
                clip_gradients(grads, options.max_grad_norm / (norm + 1e-6))
        if self.scaler_steps_itself():
            # A scaler with its own step() gets it, as documented; it skips non-finite.
            rollback.optimizer_stage = "stepping"
            options.scaler.step(options.optimizer)
            rollback.optimizer_stage = "stepped" if stepped else "before"
        elif stepped:
            self.optimizer_step(rollback)
        if options.scaler is not None:
            options.scaler.update()
        if stepped and options.scheduler is not None:
            options.scheduler.step()

    def scaler_steps_itself(self) -> bool:
        """Whether the scaler overrides ``GradScaler.step``. GradScaler's own step would
        read its ``found_inf`` to the host again; truebatch has decided already (a
        non-finite gradient makes the norm non-finite) and steps the optimizer itself."""
        options = self.options
        step = getattr(type(options.scaler), "step", None)
        return options.scaler is not None and step is not torch.amp.GradScaler.step

    def can_mask(self, readout: Readout) -> bool:
        """Whether the step may be decided on the device: ``host_sync=False``, and nothing
        only the host can do (step a scheduler, check counts, restore another scaler)."""
        options = self.options
        scaler_tensors = options.scaler is None or (
            isinstance(getattr(options.scaler, "_scale", None), torch.Tensor)
            and isinstance(getattr(options.scaler, "_growth_tracker", None), torch.Tensor)
        )
        return (
            not options.host_sync
            and options.scheduler is None
            and not self.scaler_steps_itself()
            and not readout.unchecked
            and scaler_tensors
        )

    def masked_step(
        self,
        readout: Readout,
        rollback: StepRollback,
        masked: MaskedStep,
        norms: list[torch.Tensor] | torch.Tensor | None,
        empty: torch.Tensor | None,
    ) -> None:
        """``host_sync=False``: clip, step, and undo the step on the device where the
        window has no items or (``skip_nonfinite``) a non-finite gradient norm."""
        options = self.options
        norm = None if norms is None else total_norm_of(norms)
        if norm is not None and options.max_grad_norm is not None:
            clip_gradients(
                masked.grads,
                torch.where(torch.isfinite(norm), options.max_grad_norm / (norm + 1e-6), 1.0),
            )
        device = masked.device
        skip = torch.zeros((), dtype=torch.bool, device=device)
        if empty is not None:
            skip = skip | empty.to(device)
        if options.skip_nonfinite and norm is not None:
            skip = skip | ~torch.isfinite(norm).to(device)
        readout.add(skipped=skip)
        self.optimizer_step(rollback)
        if not masked.finish(skip) and not readout.get("stepped"):
            masked.undo()  # only the host could: one read
            rollback.optimizer_stage = "before"
        if options.scaler is not None:
            scale, growth = options.scaler._scale.clone(), options.scaler._growth_tracker.clone()
            options.scaler.update()
            if empty is not None:
                # An empty window leaves the scaler as it was; a non-finite one lowers it.
                empty = empty.to(scale.device)
                options.scaler._scale.copy_(torch.where(empty, scale, options.scaler._scale))
                tracker = options.scaler._growth_tracker
                tracker.copy_(torch.where(empty, growth, tracker))
            if readout.values is None:
                readout.add(scale=options.scaler._scale.clone())
        if options.scheduler is not None:
            options.scheduler.step()  # _can_mask: only when nothing can skip the window

    def optimizer_step(self, rollback: StepRollback) -> None:
        options = self.options
        rollback.optimizer_stage = "stepping"
        options.optimizer.step()
        rollback.optimizer_stage = "stepped"

    def result(self, window: WindowTotals) -> StepResult:
        plan = {
            "micro_batches": window.micro_batches,
            "micro_batch_size": window.micro_batch_size,
            "step": self.history.index,
        }
        readout = window.readout
        if readout.values is None:
            return StepResult.pending(readout, **plan)
        return StepResult(**{name: readout.values[name] for name in StepResult.READ}, **plan)
