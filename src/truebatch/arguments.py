"""The Accumulator's arguments, checked once at construction: what cannot work is refused.

Each check raises with the fix in the message, in the package's one format:
"`argument` got V; expected E. Fix: F."
"""

from __future__ import annotations

import bisect
import inspect
from typing import Any, Literal

import torch
from torch import nn

from truebatch.batching import check_micro_batch_size

__all__ = [
    "check_accumulator_micro_batch_size",
    "check_dtype",
    "check_flag",
    "check_max_grad_norm",
    "check_model_and_optimizer",
    "check_scaler",
    "check_scheduler",
    "check_scheduler_has_a_step_left",
]


def check_model_and_optimizer(model: Any, optimizer: Any) -> None:
    """A module, and an optimizer stepped without a closure (its parameters are checked
    against the model's every window, by ``truebatch.gradients.ParameterSets``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` got {type(model).__name__}; expected a torch.nn.Module. Fix: pass the "
            "model (wrapped in DDP/FSDP if distributed)."
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"`optimizer` got {type(optimizer).__name__}; expected a torch.optim.Optimizer. "
            "Fix: build one from model.parameters()."
        )
    if required_arguments(optimizer.step):
        raise ValueError(
            f"`optimizer` got {type(optimizer).__name__}, whose step() needs a closure; "
            "expected an optimizer stepped once per window without arguments. Fix: use one "
            "that steps on .grad (SGD, Adam, AdamW...), or run acc.accumulate(...) and step "
            "it yourself."
        )


def check_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """A scheduler of ``optimizer`` that steps once per window without arguments."""
    if scheduler is None:
        return
    if not callable(getattr(scheduler, "step", None)):
        raise TypeError(
            f"`scheduler` got {type(scheduler).__name__}; expected an object with a step() "
            "method. Fix: pass a torch.optim.lr_scheduler scheduler, or None."
        )
    needed = required_arguments(scheduler.step)
    if needed:
        raise ValueError(
            f"`scheduler` got {type(scheduler).__name__}, whose step() needs "
            f"{', '.join(needed)}; expected a scheduler stepped once per window without "
            "arguments. Fix: pass scheduler=None and call scheduler.step(metric) yourself, "
            "e.g. after each validation."
        )
    # Compare param groups, not objects: wrappers such as Lightning's optimizer share
    # the param groups of the optimizer the scheduler was built for.
    bound = getattr(scheduler, "optimizer", optimizer)
    if getattr(bound, "param_groups", None) is not optimizer.param_groups:
        raise ValueError(
            "`scheduler` got a scheduler built for another optimizer; expected one of the "
            "optimizer given. Fix: create it from the optimizer passed to the Accumulator."
        )


def check_scheduler_has_a_step_left(scheduler: Any) -> None:
    """A OneCycleLR raises in step() past its total_steps, after the optimizer stepped:
    the window is refused before it runs, also for one that a SequentialLR or a
    ChainedScheduler steps."""
    for one_cycle in stepped_one_cycles(scheduler):
        if one_cycle.last_epoch + 1 > one_cycle.total_steps:
            raise ValueError(
                f"`scheduler` got a OneCycleLR at step {one_cycle.last_epoch} of "
                f"total_steps={one_cycle.total_steps}; expected a step left for this window. "
                "Fix: build it with total_steps = windows per epoch (tb.windows_per_epoch) x "
                "epochs: it steps once per window."
            )


def stepped_one_cycles(scheduler: Any) -> list[torch.optim.lr_scheduler.OneCycleLR]:
    """The OneCycleLRs that ``scheduler.step()`` steps on (not those it restarts at 0)."""
    schedulers = torch.optim.lr_scheduler
    if isinstance(scheduler, schedulers.OneCycleLR):
        return [scheduler]
    if isinstance(scheduler, schedulers.ChainedScheduler):
        return [s for inner in scheduler._schedulers for s in stepped_one_cycles(inner)]
    if isinstance(scheduler, schedulers.SequentialLR):
        # SequentialLR.step: the scheduler of the next epoch steps, or restarts at 0 when
        # the epoch is its milestone.
        epoch = scheduler.last_epoch + 1
        index = bisect.bisect_right(scheduler._milestones, epoch)
        if index > 0 and scheduler._milestones[index - 1] == epoch:
            return []
        return stepped_one_cycles(scheduler._schedulers[index])
    return []


def required_arguments(method: Any) -> list[str]:
    """The arguments ``method`` cannot be called without (``self`` aside)."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume it needs none
        return []
    return [
        p.name
        for p in parameters
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.name != "self"
    ]


def check_accumulator_micro_batch_size(size: Any, max_size: Any) -> int | Literal["auto"] | None:
    """``None``, ``"auto"`` (with an optional positive ``max_size``) or a positive int."""
    if max_size is not None and size != "auto":
        raise ValueError(
            f"`max_micro_batch_size` got {max_size!r} with micro_batch_size={size!r}; it only "
            "applies with micro_batch_size='auto'. Fix: drop it or set micro_batch_size='auto'."
        )
    if size is None or size == "auto":
        if max_size is not None:
            try:
                check_micro_batch_size(max_size)
            except (TypeError, ValueError):
                raise ValueError(
                    f"`max_micro_batch_size` got {max_size!r}; expected a positive int. Fix: "
                    "pass the first size 'auto' should try, or None for the whole batch."
                ) from None
        return size
    if isinstance(size, str):
        raise ValueError(
            f"`micro_batch_size` got {size!r}; expected a positive int, 'auto' or None. Fix: "
            "pass a number of samples, or 'auto' to find the largest that fits."
        )
    return check_micro_batch_size(size)


def check_max_tokens(
    value: Any, *, micro_batch_size: Any, unit: int
) -> int | Literal["auto"] | None:
    """``None``, ``"auto"`` or a positive int, given without ``micro_batch_size`` and for
    a model whose micro-batches need not hold whole ghost batches (``unit`` 1)."""
    if value is None:
        return None
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(
            f"`max_tokens` got {value!r}; expected a positive int, 'auto' or None. Fix: pass "
            "the tokens one micro-batch may hold, or 'auto' to find the largest that fits."
        )
    if micro_batch_size is not None:
        raise ValueError(
            f"`micro_batch_size` got {micro_batch_size!r} and `max_tokens` {value!r}; expected "
            "one of them. Fix: cut the window by samples or by tokens."
        )
    if unit > 1:
        raise ValueError(
            f"`max_tokens` got {value!r} for a model whose micro-batches must hold multiples "
            f"of {unit} samples (ghost BatchNorm); expected micro_batch_size. Fix: cut by "
            "samples, a multiple of the ghost batch size."
        )
    return value


def check_flag(value: Any, name: str) -> bool:
    """``value`` if it is a bool, else ``TypeError`` naming the option."""
    if not isinstance(value, bool):
        raise TypeError(
            f"`{name}` got {value!r}; expected True or False. Fix: pass {name}=True or "
            f"{name}=False."
        )
    return value


def check_max_grad_norm(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(
            f"`max_grad_norm` got {value!r}; expected a positive number or None. Fix: pass "
            "e.g. 1.0, or None to disable clipping."
        )
    return float(value)


def check_scaler(scaler: Any, optimizer: torch.optim.Optimizer, *, skip_nonfinite: bool) -> Any:
    """A GradScaler, whose overflowing windows are skipped (GradScaler.step skips a step
    whose scaled gradient holds inf or NaN, so ``skip_nonfinite=False`` would step on it),
    for float32 parameters (GradScaler.unscale_ refuses float16 gradients)."""
    if scaler is None:
        return None
    required = ("scale", "unscale_", "step", "update", "state_dict")
    missing = [name for name in required if not hasattr(scaler, name)]
    if missing:
        raise TypeError(
            f"`scaler` got {type(scaler).__name__} (missing {missing}); expected a "
            "torch.amp.GradScaler. Fix: pass torch.amp.GradScaler(device_type), or None."
        )
    enabled = getattr(scaler, "is_enabled", lambda: True)()
    if enabled and not skip_nonfinite:
        raise ValueError(
            "`skip_nonfinite` got False with an enabled GradScaler; expected True: a window "
            "whose scaled gradient overflows must not step (GradScaler.step skips it and "
            "lowers the scale). Fix: drop skip_nonfinite=False, or the scaler."
        )
    half = sum(p.dtype == torch.float16 for g in optimizer.param_groups for p in g["params"])
    if enabled and half:
        raise ValueError(
            f"`scaler` got a GradScaler for an optimizer holding {half} float16 parameter(s); "
            "expected float32 parameters: GradScaler cannot unscale float16 gradients. Fix: "
            "keep the parameters in float32 and pass autocast=torch.float16."
        )
    return scaler


def check_dtype(
    dtype: Any, name: str, allowed: tuple[torch.dtype, ...] | None
) -> torch.dtype | None:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"`{name}` got {dtype!r}; expected a floating torch.dtype. Fix: pass e.g. "
            "torch.float32, or None."
        )
    if allowed is not None and dtype not in allowed:
        raise ValueError(
            f"`{name}` got {dtype}; expected one of {allowed}. Fix: pass one of those, or None."
        )
    return dtype
