"""Loss terms with their own denominators.

A loss may add terms normalized by different counts: a policy term averaged
over tokens plus a KL term averaged over sequences, a per-token loss plus a
per-sequence auxiliary loss. ``loss_fn`` then returns a mapping of the terms'
SUMS, ``{"policy": S_policy, "kl": S_kl}``, and ``count`` is a mapping with the
same keys, one counter per term. The window's loss, over all ranks, is

    loss = sum over terms t of  w_t * S_t / N_t

where ``S_t`` is the term's sum over the window and ``N_t`` its item count
over the window (counted before any backward, exchanged with the other
counts). Every backward is weighted per term as it runs:

    weight_t = world_size * w_t / N_t        (0 when N_t == 0)

so the gradient is the big batch's. A term with no items in the window
(``N_t == 0``) contributes nothing: its mean is undefined, so it is left out
of the loss and reported as ``nan``. A window in which no term has items
does not step.

Why the weight sits with the counter (``tb.term(counter, weight=0.1)``) and
not in a second ``weights=`` mapping: a term is one thing, its sum divided by
its count and scaled by its coefficient; keeping the two together means no
second set of keys that must match, and a term without ``tb.term`` has
weight 1. Multiplying the sum by the coefficient inside ``loss_fn`` gives
the same gradient, but then ``StepResult.terms`` reports the weighted mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from truebatch.batching import Counter

__all__ = ["Counts", "Term", "TermSpec", "term", "term_spec"]


@dataclass(frozen=True)
class Term:
    """One loss term's counter and coefficient (made by :func:`term`).

    Attributes:
        count: ``count(micro_batch)`` gives the term's item count;
            ``None`` counts samples.
        weight: the coefficient ``w_t`` of the term's mean in the loss.
    """

    count: Counter | None
    weight: float


# What ``count=`` accepts: one counter (None: samples), or one per loss term.
Counts = Counter | Mapping[str, "Counter | Term | None"] | None


def term(count: Counter | None = None, *, weight: float = 1.0) -> Term:
    """A loss term normalized by its own count, with a coefficient.

    The term contributes ``weight * S_t / N_t`` to the window's loss, where
    ``S_t`` is the sum ``loss_fn`` returns for it over the window and ``N_t``
    is ``count`` summed over the window and all ranks.

    Args:
        count: ``count(micro_batch)`` -> the term's item count (e.g.
            ``tb.count_tokens()``); ``None`` counts samples.
        weight: the term's coefficient (finite; negative for a bonus such
            as an entropy term).

    Returns:
        the term, to put in the ``count`` mapping of :meth:`Accumulator.step`.

    Raises:
        TypeError, ValueError: ``count`` is not callable or ``weight`` is not
            a finite number.

    Example:
        >>> count = {"policy": tb.count_tokens(), "kl": tb.term(tb.count_samples, weight=0.1)}
        >>> result = acc.step(batch, loss_fn, count)   # loss_fn returns {"policy": ..., "kl": ...}
    """
    if count is not None and not callable(count):
        raise TypeError(
            f"`count` got {type(count).__name__}; expected a function count(micro_batch) or "
            "None. Fix: use tb.count_samples or tb.count_tokens(...)."
        )
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise ValueError(
            f"`weight` got {weight!r}; expected a finite number. Fix: pass the term's "
            "coefficient, e.g. weight=0.1."
        )
    return Term(count, float(weight))


@dataclass(frozen=True)
class TermSpec:
    """The terms of one window: names in the order of ``count``, counters, weights."""

    names: tuple[str, ...]
    counters: tuple[Counter | None, ...]
    weights: tuple[float, ...]


def term_spec(count: Any) -> TermSpec | None:
    """The terms ``count`` names if it is a mapping (validated), else ``None``.

    Raises:
        TypeError, ValueError: an empty mapping, a key that is not a string, or a
            value that is neither a counter, ``None`` nor a :class:`Term`.
    """
    if not isinstance(count, Mapping):
        return None
    if not count:
        raise ValueError(
            "`count` got an empty mapping; expected one counter per loss term. Fix: name "
            'every term, e.g. {"policy": tb.count_tokens(), "kl": tb.count_samples}.'
        )
    names, counters, weights = [], [], []
    for name, value in count.items():
        if not isinstance(name, str):
            raise TypeError(
                f"`count` got the key {name!r}; expected term names that are strings. Fix: "
                'name the terms, e.g. {"policy": ..., "kl": ...}.'
            )
        if not isinstance(value, Term):
            value = term(value) if value is None or callable(value) else _bad_counter(name, value)
        names.append(name)
        counters.append(value.count)
        weights.append(value.weight)
    return TermSpec(tuple(names), tuple(counters), tuple(weights))


def _bad_counter(name: str, value: Any) -> Term:
    raise TypeError(
        f"`count[{name!r}]` got {type(value).__name__}; expected a counter, None or "
        "tb.term(counter, weight=...). Fix: use tb.count_samples or tb.count_tokens(...)."
    )
