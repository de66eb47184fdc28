"""Inside a window, user code may not step, zero the gradients or run backward.

The Accumulator runs backward with the window's weight and steps once per
window; a call from ``loss_fn`` would silently break that. :class:`WindowGuard`
shadows ``step`` and ``zero_grad`` on the optimizer and ``zero_grad`` on the
model (and on the module a DDP wrapper holds) for the window's duration.
What it cannot shadow, a ``zero_grad`` on a submodule or a backward inside
``loss_fn``, shows in the gradients: :func:`check_gradients_unchanged` compares
them (identity and version counter) before and after ``loss_fn``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

__all__ = ["GradientsSeen", "WindowGuard", "check_gradients_unchanged", "gradients_seen"]


def refuse_step(*_: Any, **__: Any) -> None:
    raise RuntimeError(
        "optimizer.step() was called inside a truebatch window (from loss_fn?); the "
        "Accumulator steps once per window itself. Fix: remove the call from loss_fn."
    )


def refuse_zero_grad(*_: Any, **__: Any) -> None:
    raise RuntimeError(
        "zero_grad() was called inside a truebatch window (from loss_fn?); it would erase "
        "the gradient accumulated so far, and the Accumulator zeroes gradients once per "
        "window itself. Fix: remove the call from loss_fn."
    )


class WindowGuard:
    """Shadows the calls a window refuses, as instance attributes; leaving restores what
    the instances had (an LR scheduler wraps ``optimizer.step`` there).

    ``object.__setattr__`` skips nn.Module's bookkeeping, which has nothing to
    track for a method.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, inner: nn.Module
    ) -> None:
        self.shadows = [
            (optimizer, "step", refuse_step),
            (optimizer, "zero_grad", refuse_zero_grad),
            (model, "zero_grad", refuse_zero_grad),
        ]
        if inner is not model:
            self.shadows.append((inner, "zero_grad", refuse_zero_grad))

    def __enter__(self) -> None:
        self.saved = [vars(owner).get(name) for owner, name, _ in self.shadows]
        for owner, name, refuse in self.shadows:
            object.__setattr__(owner, name, refuse)

    def __exit__(self, *_: object) -> None:
        for (owner, name, _), own in zip(self.shadows, self.saved, strict=True):
            if own is None:
                object.__delattr__(owner, name)
            else:
                object.__setattr__(owner, name, own)


_grad_of = operator.attrgetter("grad")
GradientsSeen = tuple[list["torch.Tensor | None"], list[int]]


def gradients_seen(params: list[nn.Parameter]) -> GradientsSeen:
    """The parameters' gradients (held, so no id is reused) and their version counters."""
    grads = list(map(_grad_of, params))
    return grads, [-1 if g is None else g._version for g in grads]


def check_gradients_unchanged(params: list[nn.Parameter], before: GradientsSeen) -> None:
    """Raise if ``loss_fn`` changed the gradients since ``before``.

    A gradient that went to None, or to zeros in place, is a ``zero_grad`` on
    some handle of the model; a new ``.grad`` or a sum into one is a backward.
    """
    grads, versions = before
    now = list(map(_grad_of, params))
    replaced = any(map(operator.is_not, now, grads))
    if not replaced and versions == [-1 if g is None else g._version for g in now]:
        return
    if any(old is not None and new is None for old, new in zip(grads, now, strict=True)):
        refuse_zero_grad()
    bumped = [g for g, v in zip(now, versions, strict=True) if g is not None and g._version != v]
    if not replaced and all(not g.any() for g in bumped):
        refuse_zero_grad()
    raise RuntimeError(
        "backward() was called inside loss_fn; loss_fn must *return* the loss sum and the "
        "Accumulator runs backward with the right scale. Fix: replace "
        "`loss.backward(); return loss` by `return loss`."
    )
