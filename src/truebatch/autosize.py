"""``micro_batch_size="auto"``: halve on out-of-memory and redo the window from its start.

The first attempt runs the whole batch (or ``max_micro_batch_size``); on
``torch.OutOfMemoryError`` the window's buffers and RNG go back to its start
(so the retry draws the same random numbers) and it runs again at half the
size, keeping whole ghost batches (``tb.batch_unit``). The size that worked
is remembered for the next windows (and saved in ``Accumulator.state_dict``).
Under torch.distributed the ranks share every attempt's outcome, so all retry
at one size (``truebatch.window.Window.passes_sharing_out_of_memory``).
Tested in ``tests/test_memory_precision.py`` with injected errors.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence

import torch

from truebatch.snapshot import WindowStart
from truebatch.window import OutOfMemoryError, OutOfMemoryOnSomeRank, WindowTotals

__all__ = ["AutoSize"]

log = logging.getLogger("truebatch")


class AutoSize:
    """The micro-batch size ``"auto"`` found, and the loop that finds it.

    Attributes:
        size: the size that last worked, or ``None`` before the first window.
        first: the size to try first (``max_micro_batch_size``); ``None``: the batch.
    """

    def __init__(self, first: int | None) -> None:
        self.first = first
        self.size: int | None = None

    def run(
        self,
        sizes: list[int],
        attempt: Callable[[int], WindowTotals],
        start: WindowStart,
        *,
        unit: int,
        log_size: bool,
    ) -> WindowTotals:
        """``attempt(size)`` until it fits; ``unit`` is the model's batch unit."""
        largest = max(sizes, default=1)
        size = min(self.size or self.first or largest, largest)
        retried = False
        while True:
            try:
                totals = attempt(size)
            except (OutOfMemoryError, OutOfMemoryOnSomeRank) as error:
                # The failed attempt leaves no trace, for the retry and for a caller who
                # catches the error below.
                start.restore()
                failed = error.size if isinstance(error, OutOfMemoryOnSomeRank) else size
                if failed <= unit:
                    smallest, smaller = (
                        ("1 sample", "the model or sequence size")
                        if unit == 1
                        else (f"one ghost batch ({unit} samples)", "the ghost_batch_size")
                    )
                    raise RuntimeError(
                        f"micro_batch_size='auto': a micro-batch of {smallest} still runs out of "
                        f"memory; reduce {smaller}, use autocast=torch.bfloat16, or shard the "
                        "model (FSDP2)"
                    ) from error
            else:
                if log_size or retried:
                    log.info("truebatch: micro_batch_size='auto' runs %d samples per pass", size)
                return totals
            # Retry outside the except block, so the traceback and its activations are freed.
            size = self.size = max(unit, failed // 2 // unit * unit)
            retried = True
            log.info(
                "truebatch: out of memory at micro-batch size %d, retrying at %d", failed, size
            )
            _free_memory(start.devices)


def _free_memory(devices: Sequence[torch.device]) -> None:
    gc.collect()
    if any(d.type == "cuda" for d in devices):
        torch.cuda.empty_cache()
