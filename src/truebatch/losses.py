"""What ``loss_fn`` and ``count`` return: checked, and summed over the window and ranks.

``loss_fn(model, micro_batch)`` returns the loss SUM of the micro-batch's items
(a 0-dim tensor that requires grad), or a pair ``(loss_sum, count)``; the
window's loss is ``sum of loss sums / N``. ``count(micro_batch)`` gives the
micro-batch's item count before any backward. With loss terms
(``truebatch.terms``), ``loss_fn`` returns a mapping of sums and ``count`` a
mapping of counters with the same keys. Both are validated here, once, for
the Accumulator and the checker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from truebatch.batching import Batch, Counter, count_samples
from truebatch.distributed import GradientSync
from truebatch.terms import TermSpec, term_spec

__all__ = [
    "LossFn",
    "LossTotals",
    "as_count",
    "check_loss",
    "check_loss_fn_and_count",
    "local_count",
    "local_counts",
    "trusted_counter",
]

LossFn = Callable[[nn.Module, Batch], "torch.Tensor | tuple[torch.Tensor, Any]"]


def check_loss_fn_and_count(loss_fn: Any, count: Any) -> None:
    """Raise ``TypeError`` unless ``loss_fn`` is callable and ``count`` is callable or None."""
    if not callable(loss_fn):
        raise TypeError(
            f"`loss_fn` got {type(loss_fn).__name__}; expected a function (loss_fn must be "
            "callable as loss_fn(model, micro_batch) -> loss_sum). Fix: pass a function that "
            "returns the SUM of the micro-batch's item losses."
        )
    if term_spec(count) is None and count is not None and not callable(count):
        raise TypeError(
            f"`count` got {type(count).__name__}; expected None or a function (count must be "
            "callable as count(micro_batch) -> int or tensor, or a mapping of them per loss "
            "term). Fix: use tb.count_samples or tb.count_tokens(...)."
        )


def check_loss(loss: Any, what: str = "loss_fn") -> torch.Tensor:
    """``loss`` if it is a 0-dim tensor that requires grad, else ``TypeError`` with the fix;
    ``what`` names it in the message (``loss_fn``, or a term of its mapping)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"`{what}` returned {type(loss).__name__}; expected a 0-dim tensor (the SUM of "
            "per-item losses). Fix: return the tensor itself, not .item() or a list."
        )
    if loss.dim() != 0:
        raise TypeError(
            f"`{what}` returned a tensor of shape {tuple(loss.shape)}; expected a 0-dim "
            "tensor (the SUM of per-item losses). Fix: return per_item_losses.sum() or use "
            "reduction='sum'."
        )
    if not loss.requires_grad:
        raise TypeError(
            f"`{what}` returned a tensor that does not require grad; expected the loss "
            "computed from the model's output. Fix: compute it without torch.no_grad(), "
            ".detach() or .item(), and from parameters that require grad."
        )
    return loss


def as_count(value: Any, what: str) -> torch.Tensor:
    """An item count as a 0-dim float64 tensor; ``what`` names its source in errors."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"`{what}` got a tensor of shape {tuple(value.shape)}; expected a number or a "
                "1-element tensor. Fix: return the item count, e.g. mask.sum()."
            )
        return value.detach().reshape(()).to(torch.float64)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(
        f"`{what}` got {type(value).__name__}; expected an int, a float or a 1-element "
        "tensor. Fix: return the number of items."
    )


def local_count(
    plan: list[tuple[Batch, int]], count: Counter | None, *, on_device: bool = False
) -> float | torch.Tensor:
    """This rank's item count: the sum of ``count(micro_batch)``, by default the samples.

    Counting samples needs no call: the plan holds every micro-batch's size.
    With ``on_device``, counts that ``count`` returns as tensors are summed on
    their device, without a host read; a negative count then makes the total
    ``nan``, which the window's readout reports as the error.
    """
    if count is None or count is count_samples:
        return float(sum(size for _, size in plan))
    if not plan:
        return 0.0
    raw = [count(mb) for mb, _ in plan]
    tensors = [v for v in raw if isinstance(v, torch.Tensor)]
    if on_device and tensors:
        device = tensors[0].device
        if len(tensors) == len(raw) and all(t.dim() == 0 and t.device == device for t in raw):
            values = torch.stack(raw)  # the common case (count_tokens): one op
        else:
            values = torch.stack(
                [as_count(v, "count(micro_batch)").to(device, non_blocking=True) for v in raw]
            )
        total = values.sum(dtype=torch.float64)
        if trusted_counter(count):
            return total
        return torch.where(values.min() < 0, math.nan, total)
    values = torch.stack([as_count(v, "count(micro_batch)").cpu() for v in raw])
    negative = torch.nonzero(values < 0).flatten().tolist()
    if negative:
        raise ValueError(
            f"`count(micro_batch)` returned a negative count for micro-batches {negative}; "
            "expected a number of items (samples, tokens), 0 or more. Fix: count the items "
            "the loss sums over."
        )
    return float(values.sum())


def trusted_counter(counter: Any) -> bool:
    """Whether ``counter`` is truebatch's own (``count_tokens``...): its counts are never
    negative, so a tensor it returns needs no check."""
    return counter is None or getattr(counter, "__module__", "").startswith("truebatch.")


def local_counts(
    plan: list[tuple[Batch, int]], count: Counter | TermSpec | None, *, on_device: bool = False
) -> list[float | torch.Tensor]:
    """This rank's item count per loss term (one entry without terms)."""
    if isinstance(count, TermSpec):
        return [local_count(plan, counter, on_device=on_device) for counter in count.counters]
    return [local_count(plan, count, on_device=on_device)]


class LossTotals:
    """The window's loss sums (one per loss term), and the counts ``loss_fn`` returns if any.

    :meth:`add` checks each pass's output; :meth:`start` begins summing the
    totals over ranks (just before the window's last backward, so the small
    collective travels while that backward computes); :meth:`finish` waits.
    Returned counts are checked once, on their sums, so no pass waits for the
    device and every rank raises together.

    Attributes:
        names: the loss terms' names, or ``None`` for a single loss.
        returns_pairs: whether ``loss_fn`` returns ``(loss_sum, count)``;
            ``None`` until the first pass.
    """

    def __init__(
        self,
        sync: GradientSync,
        *,
        count_given: bool,
        device: torch.device,
        names: tuple[str, ...] | None = None,
    ) -> None:
        self.sync = sync
        self.count_given = count_given
        self.device = device
        self.names = names
        self.returns_pairs: bool | None = None
        self.losses: list[torch.Tensor] = []  # per pass, one per term, in the order of names
        self.counts: list[torch.Tensor] = []
        self._wait: Callable[[], torch.Tensor | list[torch.Tensor]] | None = None

    def add(self, output: Any) -> list[torch.Tensor]:
        """Record one pass's ``loss_fn`` output; returns its loss sum(s), one per term."""
        if self.names is not None:
            return self.add_terms(output)
        pair = isinstance(output, tuple | list)
        if self.returns_pairs is None:
            self.returns_pairs = pair
        if pair != self.returns_pairs:
            raise TypeError(
                "`loss_fn` returned a (loss_sum, count) pair for some micro-batches and a bare "
                "loss for others; expected the same kind every time. Fix: return the same "
                "kind from every micro-batch."
            )
        if not isinstance(output, torch.Tensor) and isinstance(output, Mapping):
            raise TypeError(
                f"`loss_fn` returned a mapping of terms {sorted(output)}; expected one loss "
                "sum, as count=... is not a mapping. Fix: pass count={term: counter} with the "
                "same keys."
            )
        if pair:
            if self.count_given:
                raise TypeError(
                    "`loss_fn` returned (loss_sum, count) while count=... was also given; "
                    "expected one source of N, so choose one. Fix: drop count=... to normalize "
                    "by the counts loss_fn returns, or return the loss sum alone."
                )
            if len(output) != 2:
                raise TypeError(
                    f"`loss_fn` returned a sequence of {len(output)} items; expected the loss "
                    "sum alone or a pair (loss_sum, count). Fix: return one of the two."
                )
            output, count = output
            self.counts.append(as_count(count, "the count returned by loss_fn").to(self.device))
        loss = check_loss(output)
        self.losses.append(loss)  # as returned: start() stacks them without autograd
        return [loss]

    def add_terms(self, output: Any) -> list[torch.Tensor]:
        """One pass's mapping of term sums, checked against the names of ``count``.

        A term cannot return its own count: its backward must be weighted by
        its N before it runs, since once the terms' gradients are summed no
        later factor can rescale one term alone.
        """
        assert self.names is not None
        self.returns_pairs = False
        if not isinstance(output, Mapping):
            raise TypeError(
                f"`loss_fn` returned {type(output).__name__}; expected a mapping of term sums "
                f"with the keys of count, {list(self.names)}. Fix: return "
                '{"term": loss_sum, ...}, one entry per counter.'
            )
        if set(output) != set(self.names):
            raise KeyError(
                f"`loss_fn` returned the terms {sorted(output, key=str)}; expected the keys of "
                f"count, {sorted(self.names)}. Fix: return one sum per counter, with the "
                "same names."
            )
        losses = []
        for name in self.names:
            value = output[name]
            if isinstance(value, tuple | list):
                raise TypeError(
                    f"`loss_fn[{name!r}]` returned a (loss_sum, count) pair; expected the "
                    "term's sum alone: a term's N weights its backward, so it is counted "
                    "before the passes. Fix: give the term's counter in count=..."
                )
            losses.append(check_loss(value, f"loss_fn[{name!r}]"))
        self.losses.extend(losses)
        return losses

    def start(self) -> None:
        """Start summing (loss sum per term, returned count, negative counts, counts returned?)
        over ranks; on one process without returned counts there is nothing to start."""
        if self._wait is not None:
            return
        if not (self.counts or self.sync.distributed):
            # The per-pass losses themselves, summed on the host when read: no tensor op.
            losses = self.losses
            self._wait = lambda: losses
            return
        terms = 1 if self.names is None else len(self.names)
        with torch.no_grad():
            values = torch.zeros(terms + 3, dtype=torch.float64, device=self.device)
            if self.losses:
                losses = torch.stack(self.losses).reshape(-1, terms)
                values[:terms] = losses.sum(dim=0, dtype=torch.float64)
            if self.counts:
                counts = torch.stack(self.counts)
                values[terms:] = torch.stack(
                    [counts.sum(), (counts < 0).sum(dtype=torch.float64), counts.new_ones(())]
                )
        self._wait = self.sync.all_reduce_tensor(values)

    def finish(self) -> torch.Tensor | list[torch.Tensor]:
        """Over all ranks, on the device: the loss sum per term, the returned count, the
        number of negative returned counts, and whether any rank returned counts (1 or 0).
        On one process without returned counts: the loss of every pass and term, in order."""
        self.start()
        assert self._wait is not None
        return self._wait()
