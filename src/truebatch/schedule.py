"""Learning rate and schedule length when the effective batch changes.

Accumulating k micro-batches per step changes two things a training recipe
was tuned for: the batch the learning rate was chosen for, and the number of
optimizer steps per epoch. :func:`scale_lr` moves a learning rate from one
effective batch to another by a named rule; :func:`windows_per_epoch` counts
the optimizer steps (windows) an epoch really takes, which is the length to
give a learning-rate schedule, since the Accumulator steps it once per window.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

__all__ = ["scale_lr", "windows_per_epoch"]

Rule = Literal["linear", "sqrt"]
_RULES = ("linear", "sqrt")


def scale_lr(lr: float, from_batch: float, to_batch: float, rule: Rule = "linear") -> float:
    """The learning rate for effective batch ``to_batch``, given one tuned at ``from_batch``.

    With ``r = to_batch / from_batch``:

    - ``"linear"``: ``lr * r``. For SGD (with or without momentum): the
      update of one big step then roughly matches ``r`` small steps. Pair it
      with a few epochs of warmup when ``r`` is large.
    - ``"sqrt"``: ``lr * sqrt(r)``. Keeps the variance of the update
      constant; the usual choice for adaptive optimizers (Adam, AdamW), whose
      update size does not grow with the gradient's size.

    The effective batch is what one optimizer step sees: micro-batch size x
    micro-batches per window x data-parallel ranks (or the item count, e.g.
    tokens, if that is what the loss is averaged over). Both batches must be
    counted the same way. These rules are starting points for a search, not
    guarantees: past some batch size (task dependent) no rate recovers the
    small-batch result in the same number of epochs.

    Examples:
        >>> scale_lr(0.1, from_batch=256, to_batch=1024)
        0.4
        >>> scale_lr(1e-3, from_batch=32, to_batch=128, rule="sqrt")
        0.002
    """
    lr = _positive_number(lr, "lr", "the learning rate tuned at from_batch")
    ratio = _positive_number(to_batch, "to_batch", _BATCH_MEANING) / _positive_number(
        from_batch, "from_batch", _BATCH_MEANING
    )
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(
        f"scale_lr: rule={rule!r} is not a known rule; expected 'linear' (lr * to/from, for "
        "SGD with warmup) or 'sqrt' (lr * sqrt(to/from), for Adam/AdamW); pass one of "
        f"{_RULES}"
    )


def windows_per_epoch(length: int, size: int) -> int:
    """Optimizer steps per epoch: the number of windows of ``size`` in ``length``.

    Returns ``ceil(length / size)``, the number of lists
    ``tb.windows(loader, size)`` yields from ``length = len(loader)``
    micro-batches: the short last window is a step too. Samples work the same
    way: ``windows_per_epoch(num_samples, effective_batch)`` gives the same
    number, because ``ceil(ceil(n / m) / k) == ceil(n / (m * k))``.

    Size a learning-rate schedule with it, since the Accumulator steps the
    scheduler once per window (after a real optimizer step)::

        total_steps = epochs * tb.windows_per_epoch(len(loader), k)
        scheduler = OneCycleLR(optimizer, max_lr=0.1, total_steps=total_steps)

    Examples:
        >>> windows_per_epoch(63, 4)   # 63 micro-batches, 4 per window
        16
    """
    length = _count(length, "length", 0, "the number of micro-batches (or samples) in an epoch")
    size = _count(size, "size", 1, _SIZE_MEANING)
    return -(-length // size)


_BATCH_MEANING = "an effective batch size: micro-batch size x micro-batches per window x ranks"
_SIZE_MEANING = (
    "micro-batches per window, as passed to tb.windows; or the effective batch size when "
    "length counts samples"
)


def _positive_number(value: object, name: str, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"scale_lr: {name} must be a number ({meaning}), got {type(value).__name__}; "
            "pass a Python int or float (use .item() on a tensor)"
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale_lr: {name} must be positive and finite ({meaning}), got {value}")
    return float(value)


def _count(value: object, name: str, minimum: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"windows_per_epoch: {name} must be an int ({meaning}), got {value!r}; "
            "pass len(loader) or the sample count as an int"
        )
    if value < minimum:
        raise ValueError(
            f"windows_per_epoch: {name} must be {minimum} or more ({meaning}), got {value}"
        )
    return int(value)
