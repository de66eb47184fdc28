"""Where the Accumulator tells split-invariant layers which samples they see.

A layer such as :class:`truebatch.nn.SplitInvariantDropout` must draw the same
random numbers for a sample whether that sample arrives in the full batch or in
a micro-batch. It therefore needs the *global* index of the first sample of the
current micro-batch within the effective batch (over all ranks) and the index
of the window. The Accumulator sets both here around every micro-batch; the
layers read them. Outside an Accumulator, :func:`current` returns ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar


class SampleContext:
    """Position of the current micro-batch.

    Attributes:
        window: index of the window (effective batch) being processed, 0-based.
        offset: global index, within the effective batch over all ranks, of the
            first sample of the current micro-batch.

    Under torch.distributed the samples of lower ranks come first, and their
    number travels in a collective that may still be in flight when the pass
    starts: ``rank_offset`` then waits for it, on the first read of
    ``offset`` (only a layer that needs the global index pays the wait).
    """

    __slots__ = ("_local", "_rank_offset", "window")

    def __init__(
        self, window: int, offset: int, rank_offset: Callable[[], int] | None = None
    ) -> None:
        self.window = window
        self._local = offset
        self._rank_offset = rank_offset

    @property
    def offset(self) -> int:
        if self._rank_offset is None:
            return self._local
        return self._local + self._rank_offset()

    def __repr__(self) -> str:
        return f"SampleContext(window={self.window}, offset={self.offset})"


_current: ContextVar[SampleContext | None] = ContextVar("truebatch_sample_context", default=None)


def current() -> SampleContext | None:
    """The context of the micro-batch being run, or ``None`` outside a window."""
    return _current.get()


class micro_batch:
    """Declare that the code inside runs the micro-batch starting at ``offset``
    (plus ``rank_offset()``, the samples of lower ranks, when given).

    A class rather than a generator: it is entered once per micro-batch, and
    this costs a third of ``contextlib.contextmanager``'s overhead.
    """

    __slots__ = ("context", "token")

    def __init__(
        self, window: int, offset: int, rank_offset: Callable[[], int] | None = None
    ) -> None:
        self.context = SampleContext(window, offset, rank_offset)

    def __enter__(self) -> SampleContext:
        self.token = _current.set(self.context)
        return self.context

    def __exit__(self, *_: object) -> None:
        _current.reset(self.token)
