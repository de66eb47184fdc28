"""What one window did: :class:`StepResult`, whose numbers may still be on the device.

A window's loss, count and gradient norm are computed on the device. The
Accumulator reads them to the host in one read when it decides there whether
to step (the default), or leaves them on the device (``host_sync=False``):
then the first access of ``loss``, ``count``, ``grad_norm``, ``stepped``,
``skip_reason``, ``terms`` or ``counts`` reads them all, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from truebatch.gradients import combine_norms
from truebatch.readout import Pending, Readout, deferred

__all__ = ["StepResult", "read_outcome"]

NO_ITEMS = "the window holds no items (N == 0)"
NO_TERM_ITEMS = "no loss term has items in the window (every N_t == 0)"


@dataclass(frozen=True)
class StepResult:
    """What one window did.

    With ``Accumulator(host_sync=False)`` the fields ``loss`` to ``counts``
    (all but the three plan fields) are read from the device on the first
    access of any of them; the values and types are the same.

    Attributes:
        loss: mean loss over the N items of the window, all ranks
            (``sum of loss sums / N``); ``nan`` when N == 0.
        count: N, the item count of the window over all ranks.
        grad_norm: global L2 norm of the gradient before clipping (after
            unscaling); ``nan`` when no gradient was computed.
        stepped: whether the optimizer stepped.
        skip_reason: why it did not, else ``None``.
        micro_batches: micro-batches run on this rank.
        micro_batch_size: largest micro-batch run on this rank (the size
            ``"auto"`` settled on).
        step: windows completed so far, this one included.
        terms: with loss terms (``count`` a mapping), each term's mean over
            the window and all ranks, ``S_t / N_t`` (``nan`` when N_t == 0);
            ``loss`` is then ``sum_t w_t * S_t / N_t`` and ``count`` the sum
            of the terms' counts. ``None`` for a single loss.
        counts: with loss terms, each term's count N_t over all ranks.
    """

    loss: float = deferred()
    count: int | float = deferred()
    grad_norm: float = deferred()
    stepped: bool = deferred()
    skip_reason: str | None = deferred()
    micro_batches: int
    micro_batch_size: int
    step: int
    terms: dict[str, float] | None = deferred(None)  # noqa: RUF009 (a descriptor, shared on purpose)
    counts: dict[str, int | float] | None = deferred(None)  # noqa: RUF009 (a descriptor, shared on purpose)

    # The fields read from the device (the others are known on the host).
    READ: ClassVar[tuple[str, ...]] = (
        "loss",
        "count",
        "grad_norm",
        "stepped",
        "skip_reason",
        "terms",
        "counts",
    )

    @classmethod
    def pending(
        cls, readout: Readout, *, micro_batches: int, micro_batch_size: int, step: int
    ) -> StepResult:
        """A result whose numbers are read from ``readout`` (see :func:`read_outcome`)."""
        return cls(
            **{name: Pending(readout, name) for name in cls.READ},
            micro_batches=micro_batches,
            micro_batch_size=micro_batch_size,
            step=step,
        )


def read_outcome(totals: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The result's fields from the window's read totals and the step's read ``values``:
    ``grad_norm`` (``nan``: none computed), ``skipped`` (the device's decision, or
    ``None`` where the host decides by the rule below) and ``scale`` (GradScaler's
    scale after its update, or ``None``).

    The rule: a window without items does not step; nor does one whose
    gradient norm is not finite when ``skip_nonfinite`` (``values``).
    """
    count = totals["count"]
    term_counts = totals["term_counts"]
    norm = combine_norms(values["grad_norm"])
    reason = None
    if not count:
        reason = NO_ITEMS if term_counts is None else NO_TERM_ITEMS
    elif (
        values["skipped"]
        if values["skipped"] is not None
        else (values["skip_nonfinite"] and not math.isfinite(norm))
    ):
        reason = f"non-finite gradient (norm {norm})"
        if values["scale"] is not None:
            reason += f"; GradScaler lowered its scale to {values['scale']:g}"
    if term_counts is None:
        loss = totals["loss_sum"] / count if count else math.nan
        terms = counts = None
    else:
        loss = totals["loss_sum"] if count else math.nan
        terms = {
            name: total / term_counts[name] if term_counts[name] else math.nan
            for name, total in totals["term_sums"].items()
        }
        counts = {name: as_number(n) for name, n in term_counts.items()}
    return {
        **totals,
        "loss": loss,
        "count": as_number(count),
        "grad_norm": norm,
        "stepped": reason is None,
        "skip_reason": reason,
        "terms": terms,
        "counts": counts,
    }


def as_number(count: float) -> int | float:
    """An item count as an int when it is whole (as counted), else as given."""
    return int(count) if float(count).is_integer() else count
