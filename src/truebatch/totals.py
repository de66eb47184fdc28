"""A window's totals: its loss sums and item counts, read from the device once.

:class:`WindowTotals` is what :meth:`Accumulator.accumulate` returns and what
the step reads; :func:`read_totals` turns the read parts of a window's
:class:`~truebatch.readout.Readout` into them, and checks the counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from truebatch.readout import Pending, Readout, deferred

__all__ = ["WindowTotals", "read_totals"]


@dataclass(frozen=True)
class WindowTotals:
    """What :meth:`Accumulator.accumulate` returns; the window's gradient is in ``.grad``.

    The sums and counts may still be on the device: the first access of any
    of them reads them all to the host, in one read (``truebatch.readout``).

    Attributes:
        loss_sum: sum of the loss sums over all micro-batches and ranks; with
            loss terms, the window's loss ``sum_t w_t * S_t / N_t`` (over the
            terms with N_t > 0).
        count: N, the window's item count over all ranks; with loss terms,
            the sum of the terms' counts.
        micro_batches: micro-batches run on this rank.
        micro_batch_size: largest micro-batch run on this rank.
        term_sums: with loss terms, each term's sum S_t over all
            micro-batches and ranks; else ``None``.
        term_counts: with loss terms, each term's count N_t; else ``None``.
        readout: the device values behind the fields above.
    """

    loss_sum: float = deferred()
    count: float = deferred()
    micro_batches: int
    micro_batch_size: int
    term_sums: dict[str, float] | None = deferred(None)  # noqa: RUF009 (a descriptor, shared on purpose)
    term_counts: dict[str, float] | None = deferred(None)  # noqa: RUF009 (a descriptor, shared on purpose)
    readout: Readout | None = field(default=None, repr=False, compare=False)

    @classmethod
    def pending(cls, readout: Readout, micro_batches: int, micro_batch_size: int) -> WindowTotals:
        """Totals whose sums and counts are read from ``readout`` on first access."""
        names = ("loss_sum", "count", "term_sums", "term_counts")
        fields = {name: Pending(readout, name) for name in names}
        return cls(
            **fields,
            micro_batches=micro_batches,
            micro_batch_size=micro_batch_size,
            readout=readout,
        )

    @property
    def loss(self) -> float:
        """The window's loss: ``loss_sum / count``, or with terms ``loss_sum``;
        ``nan`` when the window has no items."""
        if self.term_sums is not None:
            return self.loss_sum if self.count else math.nan
        return self.loss_sum / self.count if self.count else math.nan

    @property
    def term_means(self) -> dict[str, float] | None:
        """With loss terms, each term's mean ``S_t / N_t`` (``nan`` when N_t == 0)."""
        if self.term_sums is None or self.term_counts is None:
            return None
        return {
            name: total / self.term_counts[name] if self.term_counts[name] else math.nan
            for name, total in self.term_sums.items()
        }


def read_totals(
    values: dict[str, Any], names: tuple[str, ...] | None, weights: tuple[float, ...] | None
) -> dict[str, Any]:
    """The window's totals from its read parts: ``sums`` (loss sum per term, then the
    returned count, the number of negative returned counts, and whether counts were
    returned) or, on one process, ``losses`` (every pass's loss per term), ``counts``
    (N_t per term, as counted before the passes) and ``n_items``.

    Raises:
        ValueError: a count was negative (``loss_fn``'s, or a tensor from ``count``).
    """
    if "losses" in values:  # one process: the loss of every pass and term, summed here
        losses, terms = values["losses"], 1 if names is None else len(names)
        sums, negative = [math.fsum(losses[t::terms]) for t in range(terms)], 0
    else:
        *sums, _, negative, _ = values["sums"]
    n_items = values["n_items"]
    if negative:
        raise ValueError(
            f"`loss_fn` returned a negative count for {int(negative)} micro-batch(es); "
            "expected a number of items (samples, tokens), 0 or more. Fix: return "
            "(loss_sum, n_items)."
        )
    if n_items != n_items:  # nan: a counter's tensor held a negative count
        raise ValueError(
            "`count(micro_batch)` returned a negative count; expected a number of items "
            "(samples, tokens), 0 or more. Fix: count the items the loss sums over."
        )
    if names is None or weights is None:
        return {"loss_sum": sums[0], "count": n_items, "term_sums": None, "term_counts": None}
    counts = values["counts"]
    counts = counts if isinstance(counts, list) else [counts]
    loss = math.fsum(w * s / n for w, s, n in zip(weights, sums, counts, strict=True) if n)
    return {
        "loss_sum": loss,
        "count": n_items,
        "term_sums": dict(zip(names, sums, strict=True)),
        "term_counts": dict(zip(names, counts, strict=True)),
    }
