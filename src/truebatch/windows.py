"""Windows: consecutive micro-batches grouped into one effective batch each, resumably.

A pass over the loader is one epoch. Epoch ``e`` yields windows
``w = 0, 1, ...``; window ``w`` holds micro-batches ``w * size .. w * size + size - 1``
of the epoch (the last window may be shorter). The position after a window is
``(epoch, window, micro_batch)`` = ``(e, w + 1, (w + 1) * size)``, which is what
:meth:`Windows.state_dict` records; a window counts as done once it is handed
out, so save after stepping it. A run that dies inside a window resumes at that
window's start, from the position saved after the window before.

How the position is restored:

- a loader with its own state (``state_dict`` / ``load_state_dict``, e.g.
  torchdata's ``StatefulDataLoader``) restores it itself;
- any other loader is re-iterated: the random state at the start of the epoch
  (torch's, Python's, NumPy's, and the ``generator`` of the loader and its
  sampler) is put back, the loader is iterated from its start and the first
  ``micro_batch`` micro-batches are read and dropped, then the random state of
  the resumed run is put back. This is exact for a loader whose order is a
  function of that random state and the epoch (``shuffle=True``, a seeded
  generator, ``DistributedSampler``), and costs reading the skipped data once.

At the start of every epoch, ``set_epoch(epoch)`` is called on the loader and
its samplers that have one (``DistributedSampler``), so their order changes
per epoch and is the same in a resumed run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from truebatch import rng

__all__ = ["Windows", "windows"]

T = TypeVar("T")
_KEYS = ("size", "epoch", "window", "micro_batch", "loader", "rng")


def windows(iterable: Iterable[T], size: int) -> Windows[T]:
    """Group consecutive micro-batches into windows (lists) of ``size``, resumably.

    The last window of a pass may be shorter; the Accumulator normalizes it by
    its own item count, so it is still exact. Each pass over the result is one
    epoch of ``iterable`` (iterate it again for the next epoch, like a
    DataLoader); :meth:`Windows.state_dict` records where it is.

    Args:
        iterable: the micro-batches, e.g. a DataLoader (any iterable works;
            resuming needs one that yields the same micro-batches again, see
            :class:`Windows`).
        size: micro-batches per window, a positive int.

    Returns:
        A :class:`Windows` iterator over lists of micro-batches.

    Raises:
        ValueError: ``size`` is not a positive int.

    Examples:
        >>> list(windows(range(5), 2))
        [[0, 1], [2, 3], [4]]
    """
    return Windows(iterable, size)


class Windows(Iterator[list[T]], Generic[T]):
    """Windows of ``size`` micro-batches over ``iterable``; see :func:`windows`.

    Iterating it runs one epoch; iterating it again runs the next. A window
    shorter than ``size`` (the loader ran out) ends the epoch.

    Attributes:
        epoch: the epoch being iterated (0-based): the number of passes over
            the loader completed so far.

    Examples:
        >>> windows = tb.windows(range(5), 2)
        >>> next(windows), windows.state_dict()["micro_batch"]
        ([0, 1], 2)
        >>> resumed = tb.windows(range(5), 2)
        >>> resumed.load_state_dict(windows.state_dict())
        >>> list(resumed), resumed.epoch
        ([[2, 3], [4]], 1)
    """

    def __init__(self, iterable: Iterable[T], size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(
                f"`windows(size)` got {size!r}; expected a positive int. Fix: pass e.g. size=4."
            )
        self.iterable = iterable
        self.size = size
        self.epoch = 0
        self._window = 0
        self._micro_batch = 0
        self._pass: Iterator[T] | None = None
        # Re-iterated loaders: the random state at the start of this epoch (mid-epoch), and
        # a loaded state the next pass starts from.
        self._epoch_rng: dict[str, Any] | None = None
        self._resume_rng: dict[str, Any] | None = None
        # A short window was read: the loader is exhausted, the epoch is over.
        self._finished = False
        self._stateful = callable(getattr(iterable, "state_dict", None)) and callable(
            getattr(iterable, "load_state_dict", None)
        )

    def __iter__(self) -> Windows[T]:
        return self

    def __next__(self) -> list[T]:
        if self._pass is None and not self._finished:
            self._pass = self._start_pass()
        window = [] if self._finished else list(itertools.islice(self._pass, self.size))
        if not window:
            self._pass, self._epoch_rng, self._finished = None, None, False
            self.epoch, self._window, self._micro_batch = self.epoch + 1, 0, 0
            raise StopIteration
        self._window += 1
        self._micro_batch += len(window)
        self._finished = len(window) < self.size
        return window

    def state_dict(self) -> dict[str, Any]:
        """The position after the last window handed out.

        Returns:
            ``{"size", "epoch", "window", "micro_batch", "loader", "rng"}``.
            Mid-epoch, ``loader`` is the loader's own state, or else ``rng`` the
            random state at the start of the epoch (to replay it). Between
            epochs (``micro_batch == 0``), ``rng`` holds the state of the
            loader's ``torch.Generator`` objects, which the next epoch draws from.
        """
        epoch, window, micro_batch = self.epoch, self._window, self._micro_batch
        exact_end = not self._stateful and micro_batch and micro_batch == _length(self.iterable)
        if self._finished or exact_end:
            # The epoch is over (its end may not be read yet): resume at the next one.
            epoch, window, micro_batch = epoch + 1, 0, 0
        loader, state = None, self._resume_rng
        if not micro_batch and state is None:
            state = rng.get_state(devices=False, generators=_generators(self.iterable))
        elif micro_batch and self._stateful:
            loader = self._loader_state()
        elif micro_batch and state is None:
            state = self._epoch_rng
        return {
            "size": self.size,
            "epoch": epoch,
            "window": window,
            "micro_batch": micro_batch,
            "loader": loader,
            "rng": state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from the position :meth:`state_dict` recorded.

        The next window is the one after that position (the loader is
        fast-forwarded when the next pass starts).

        Raises:
            ValueError: the state is not a windows state, or comes from windows
                of another size, or mid-epoch from a loader with (or without) its
                own state where this one has none (or has one). Nothing is changed.
        """
        generators = len(_generators(self.iterable))
        _check_state(state, size=self.size, stateful=self._stateful, generators=generators)
        if state["loader"] is not None:
            self.iterable.load_state_dict(state["loader"])  # type: ignore[attr-defined]
        self._pass, self._epoch_rng, self._resume_rng = None, None, state["rng"]
        self._finished = False
        self.epoch, self._window = int(state["epoch"]), int(state["window"])
        self._micro_batch = int(state["micro_batch"])

    def _start_pass(self) -> Iterator[T]:
        for target in _epoch_targets(self.iterable):
            target.set_epoch(self.epoch)
        generators = _generators(self.iterable)
        resume, self._resume_rng = self._resume_rng, None
        if self._micro_batch and self._stateful:
            # Resumed mid-epoch: what starting the epoch drew (a DataLoader's base seed) was
            # drawn before the save, so the random state after it is the run's own.
            run_rng = rng.get_state(devices=False)
            micro_batches = iter(self.iterable)
            rng.set_state(run_rng)
            return micro_batches
        if self._micro_batch:
            assert resume is not None  # checked by load_state_dict
            return self._replay(resume, generators)
        if resume is not None:
            # Between epochs the run's own random state is the right one; the loader's
            # generators are not part of it.
            rng.set_state(resume, generators=generators, host=False)
        self._epoch_rng = rng.get_state(devices=False, generators=generators)
        return iter(self.iterable)

    def _loader_state(self) -> Any:
        """The loader's own state; a loader that creates its iterator to answer (torchdata's,
        before the first window) must not draw from the run's random numbers."""
        run_rng = rng.get_state(devices=False, generators=_generators(self.iterable))
        state = self.iterable.state_dict()  # type: ignore[attr-defined]
        rng.set_state(run_rng, generators=_generators(self.iterable))
        return state

    def _replay(self, epoch_rng: dict[str, Any], generators: list[torch.Generator]) -> Iterator[T]:
        """A resumed epoch: its start with the random state it had, then the run's own."""
        run_rng = rng.get_state(devices=False)
        rng.set_state(epoch_rng, generators=generators)
        micro_batches = iter(self.iterable)
        skipped = sum(1 for _ in itertools.islice(micro_batches, self._micro_batch))
        rng.set_state(run_rng)
        if skipped < self._micro_batch:
            raise ValueError(
                f"`windows` got a loader of {skipped} micro-batches in epoch {self.epoch}; "
                f"expected at least the {self._micro_batch} the saved position had read. "
                "Fix: resume with the same data and loader settings."
            )
        self._epoch_rng = epoch_rng
        return micro_batches


def _check_state(state: Any, *, size: int, stateful: bool, generators: int) -> None:
    """``generators``: how many ``torch.Generator`` objects this windows' loader has."""
    if not isinstance(state, dict) or set(state) != set(_KEYS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"`state` got {got}; expected the keys {sorted(_KEYS)}. "
            "Fix: pass what Windows.state_dict() returned."
        )
    if state["size"] != size:
        raise ValueError(
            f"`state` got windows of size {state['size']}; expected {size}, this windows' size. "
            f"Fix: build it with tb.windows(loader, {state['size']})."
        )
    if state["micro_batch"] and (state["loader"] is not None) != stateful:
        saved = "has its own state" if state["loader"] is not None else "has no state"
        raise ValueError(
            f"`state` got a position over a loader that {saved}; expected the same kind of "
            "loader as this one. Fix: resume with the loader the run was saved with."
        )
    if state["loader"] is not None:
        return
    if not isinstance(state["rng"], dict):
        raise ValueError(
            f"`state` got rng={state['rng']!r}; expected the random state of the epoch. "
            "Fix: pass what Windows.state_dict() returned."
        )
    if len(state["rng"]["generators"]) != generators:
        raise ValueError(
            f"`state` got a loader with {len(state['rng']['generators'])} torch.Generator(s); "
            f"expected {generators}, as this loader has. Fix: build the loader as the run did."
        )


def _samplers(iterable: Any) -> list[Any]:
    batch_sampler = getattr(iterable, "batch_sampler", None)
    found = [iterable, getattr(iterable, "sampler", None), batch_sampler]
    found.append(getattr(batch_sampler, "sampler", None))
    unique: list[Any] = []
    for item in found:
        if item is not None and all(item is not seen for seen in unique):
            unique.append(item)
    return unique


def _epoch_targets(iterable: Any) -> list[Any]:
    """The loader and samplers with ``set_epoch`` (``DistributedSampler``)."""
    return [item for item in _samplers(iterable) if callable(getattr(item, "set_epoch", None))]


def _generators(iterable: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that decide the loader's order, each once."""
    found: list[torch.Generator] = []
    for item in _samplers(iterable):
        generator = getattr(item, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _length(iterable: Any) -> int | None:
    """The number of micro-batches a pass yields, when that number is exact."""
    if isinstance(iterable, Sequence):
        return len(iterable)
    if (
        isinstance(iterable, DataLoader)
        and not isinstance(iterable.dataset, IterableDataset)
        and (iterable.batch_size is None or type(iterable.batch_sampler) is BatchSampler)
    ):
        return len(iterable)
    return None
