"""``"auto"``: halve the micro-batches on out-of-memory and redo the window from its start.

``micro_batch_size="auto"`` searches over samples per micro-batch,
``max_tokens="auto"`` over the token budget of a micro-batch
(:func:`truebatch.split`); each attempt is a complete window. The first
attempt runs every piece of the window whole (or ``max_micro_batch_size``
samples); on ``torch.OutOfMemoryError`` the window's buffers and RNG go back
to its start (so the retry draws the same random numbers) and it runs again
at

    size = max(unit, failed // 2)

where ``unit`` is the smallest micro-batch there is: for samples the model's
batch unit (whole ghost batches, ``tb.batch_unit``; sizes are rounded down to
a multiple of it), for tokens the longest sample of the window, which is never
split. A failure at the unit is an error that says so. The size that worked is
remembered for the next windows (and saved in ``Accumulator.state_dict``); a
later window's longest sample can raise a remembered budget, never lower it.
The update does not depend on the cut (the window is normalized by its N), so
every attempt gives the same result: exact by construction.

Under torch.distributed the ranks share every attempt's outcome (one small
exchange, :meth:`truebatch.window.Window.passes_sharing_out_of_memory`), so
all retry together, or all raise when a rank that failed can go no smaller.
Tested in ``tests/test_memory_precision.py`` (samples) and
``tests/test_tokens.py`` (tokens) with injected errors.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from truebatch.snapshot import WindowStart
from truebatch.tokens import TokenCounter, tokens_per_sample
from truebatch.totals import WindowTotals
from truebatch.tree import Batch
from truebatch.window import Attempt, OutOfMemoryError, OutOfMemoryOnSomeRank

__all__ = ["AutoSize", "TokenLengths"]

log = logging.getLogger("truebatch")


class TokenLengths:
    """The tokens of every sample of a window's pieces, read once per window.

    Attributes:
        lengths: per piece, the tokens of each of its samples.
        largest: the tokens of the largest piece (a budget that runs every piece whole).
        longest: the tokens of the longest sample, at least 1: the smallest budget.
    """

    def __init__(self, pieces: Sequence[Batch], tokens: TokenCounter) -> None:
        self.lengths = [tokens_per_sample(piece, tokens) for piece in pieces]
        self.largest = max((sum(piece) for piece in self.lengths), default=1)
        self.longest = max((max(piece, default=1) for piece in self.lengths), default=1)
        self.longest = max(self.longest, 1)


class AutoSize:
    """The size ``"auto"`` found, and the loop that finds it.

    Attributes:
        over: ``"samples"`` (``micro_batch_size``) or ``"tokens"`` (``max_tokens``).
        size: the size that last worked, or ``None`` before the first failure.
        first: the size to try first (``max_micro_batch_size``); ``None``: the whole pieces.
    """

    def __init__(self, first: int | None, *, over: Literal["samples", "tokens"]) -> None:
        self.first = first
        self.over = over
        self.size: int | None = None

    @property
    def argument(self) -> str:
        """The Accumulator argument set to ``"auto"``."""
        return "micro_batch_size" if self.over == "samples" else "max_tokens"

    def run(
        self,
        largest: int,
        attempt: Callable[[Attempt], WindowTotals],
        start: WindowStart,
        *,
        unit: int,
        log_size: bool,
    ) -> WindowTotals:
        """``attempt(Attempt(size, smallest=...))`` until it fits.

        Args:
            largest: the size that runs every piece of the window whole.
            attempt: runs the window's passes at ``size``.
            start: the window start, restored after every failed attempt.
            unit: the smallest size there is (see the module docstring).
            log_size: log the size even if no attempt failed.
        """
        size = min(self.size or self.first or largest, largest)
        if self.over == "tokens":
            size = max(size, unit)  # the longest sample is never split
        retried = False
        while True:
            try:
                totals = attempt(Attempt(size, smallest=size <= unit))
            except (OutOfMemoryError, OutOfMemoryOnSomeRank) as error:
                # The failed attempt leaves no trace, for the retry and for a caller who
                # catches the error below.
                start.restore()
                shared = isinstance(error, OutOfMemoryOnSomeRank)
                failed = error.size if shared else size
                if error.smallest if shared else size <= unit:
                    raise RuntimeError(self.nothing_fits(failed, unit)) from error
            else:
                if log_size or retried:
                    runs = "%d samples" if self.over == "samples" else "at most %d tokens"
                    log.info(f"truebatch: {self.argument}='auto' runs {runs} per pass", size)
                return totals
            # Retry outside the except block, so the traceback and its activations are freed.
            smaller = failed // 2 if self.over == "tokens" else failed // 2 // unit * unit
            size = self.size = max(unit, smaller)
            retried = True
            log.info(
                "truebatch: out of memory at %s %d, retrying at %d", self.argument, failed, size
            )
            _free_memory(start.devices)

    def nothing_fits(self, failed: int, unit: int) -> str:
        """The error when a rank ran out of memory at the smallest size it has."""
        if self.over == "tokens":
            smallest = f"the longest sample alone ({failed} tokens)"
            fix = "truncate or drop the longest samples"
        elif unit == 1:
            smallest, fix = "a micro-batch of 1 sample", "reduce the model or sequence size"
        else:
            smallest = f"a micro-batch of one ghost batch ({unit} samples)"
            fix = "reduce the ghost_batch_size"
        return (
            f"`{self.argument}` got 'auto'; expected a micro-batch that fits in memory, but "
            f"{smallest} still runs out of memory. Fix: {fix}, use "
            "autocast=torch.bfloat16 or activation checkpointing, or shard the model (FSDP2)."
        )


def _free_memory(devices: Sequence[torch.device]) -> None:
    gc.collect()
    if any(d.type == "cuda" for d in devices):
        torch.cuda.empty_cache()
