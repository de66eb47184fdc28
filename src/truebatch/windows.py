"""Windows: consecutive micro-batches grouped into one effective batch each."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["windows"]

T = TypeVar("T")


def windows(iterable: Iterable[T], size: int) -> Iterator[list[T]]:
    """Group consecutive micro-batches into windows (lists) of ``size``.

    The last window may be shorter; the Accumulator normalizes it by its own item
    count, so it is still exact.

    Examples:
        >>> list(windows(range(5), 2))
        [[0, 1], [2, 3], [4]]
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"windows(size=...) must be a positive int, got {size!r}")
    window: list[T] = []
    for item in iterable:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window
