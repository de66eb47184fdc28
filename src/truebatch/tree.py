"""The structure of a batch: its tensors, its per-sample values, and how to rebuild it.

A *batch* is a tensor or a nested container of them whose tensor leaves share
the leading (batch) dimension B. Containers are tuples, lists, namedtuples,
dataclasses and any ``collections.abc.Mapping`` (``dict``, ``OrderedDict``,
``defaultdict``, ``UserDict`` and its subclasses such as ``transformers``'
``BatchEncoding``). Cutting samples ``start:stop`` out of a batch rebuilds every
container with its own type and slices

- every tensor leaf along dim 0 (a view, no copy), and
- every *per-sample sequence*: a list or tuple that holds no tensor, whose
  length is B, and whose items are not all numbers (the default
  ``collate_fn`` turns a string field into such a list of B strings, and
  ``tuple(zip(*samples))`` into such tuples), or a numpy array of B rows
  that are not numbers (strings, objects).

Everything else is *shared*: passed to every micro-batch unchanged (strings,
numbers, ``None``, other objects, and lists or tuples of another length).

The rule decides every batch a loader produces, except one case it refuses
rather than guess: a list, tuple or numpy array of B **numbers** is a
per-sample value or a setting that happens to have B entries
(``betas=(0.9, 0.999)`` in a batch of 2). Cutting such a batch raises a
``ValueError`` naming the field; make per-sample numbers a tensor
(``torch.as_tensor(values)``), and mark a setting with :func:`shared`, which
also marks a list of B strings that is not per sample.
A namedtuple is always a container (its fields are named), never a value.

A ``BatchEncoding`` from a fast tokenizer also carries one ``tokenizers.Encoding``
per sample outside its mapping (``batch.encodings``); it is cut with the samples.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, MutableMapping
from numbers import Number
from typing import Any

import numpy as np
import torch

Batch = Any

__all__ = [
    "Batch",
    "batch_size",
    "is_dataclass_instance",
    "map_tensors",
    "shared",
    "slice_samples",
    "tensor_leaves",
]

# Instance attributes of a Mapping that hold one entry per sample: the fast
# tokenizer's encodings of a transformers.BatchEncoding.
_PER_SAMPLE_ATTRIBUTES = ("_encodings",)


class _SharedList(list):
    """A list the splitter gives whole to every micro-batch (see :func:`shared`)."""

    __slots__ = ()


class _SharedTuple(tuple):
    """A tuple the splitter gives whole to every micro-batch (see :func:`shared`)."""

    __slots__ = ()


class _SharedArray(np.ndarray):
    """A numpy array the splitter gives whole to every micro-batch (see :func:`shared`)."""


_SHARED = (_SharedList, _SharedTuple, _SharedArray)


def shared(value: list | tuple | np.ndarray) -> list | tuple | np.ndarray:
    """Mark a list, tuple or numpy array of a batch as shared: every micro-batch gets all of it.

    A list or tuple without tensors (or a numpy array) whose length equals the
    batch size is taken as one value per sample and cut with the tensors
    (module docstring). Wrap a setting that happens to have that length, so it
    is not cut. A shared list may hold tensors (class prototypes, say): they
    are given whole too, and have no batch dimension to agree on. The result
    equals ``value`` and is a ``list`` (``tuple``, ``numpy.ndarray`` view);
    ``loss_fn`` uses it unchanged.

    Args:
        value: the list, tuple or array to pass whole.

    Returns:
        A list (tuple, array) subclass holding the same items.

    Raises:
        TypeError: ``value`` is not a list, a tuple or a numpy array (other
            values are always shared).

    Example:
        >>> import truebatch as tb
        >>> batch = {"x": torch.zeros(2, 3), "betas": tb.shared((0.9, 0.999))}
        >>> all(mb["betas"] == (0.9, 0.999) for mb in tb.split(batch, 1))
        True
    """
    if isinstance(value, np.ndarray):
        return value.view(_SharedArray)
    if is_namedtuple(value) or not isinstance(value, list | tuple):
        raise TypeError(
            f"`value` got {type(value).__name__}; expected a list, a tuple or a numpy array. "
            "Fix: pass other values as they are, they are always given whole."
        )
    return _SharedList(value) if isinstance(value, list) else _SharedTuple(value)


def is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, list | tuple):
        return any(map(_holds_tensor, obj))
    if isinstance(obj, Mapping):
        return any(map(_holds_tensor, obj.values()))
    if is_dataclass_instance(obj):
        return any(_holds_tensor(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return False


def _is_container(obj: Any) -> bool:
    """A namedtuple, a mapping, a dataclass, or a list/tuple with a tensor inside."""
    if is_namedtuple(obj) or isinstance(obj, Mapping) or is_dataclass_instance(obj):
        return True
    return isinstance(obj, list | tuple) and _holds_tensor(obj)


def tensor_leaves(
    batch: Batch, path: str | None = "batch"
) -> list[tuple[str | None, torch.Tensor]]:
    """Every tensor leaf with its path, like ``batch['x'][0]``.

    ``path=None`` leaves the paths out (``None``), which halves the cost: the
    Accumulator measures every micro-batch, and only an error needs them.
    """
    leaves: list[tuple[Any, torch.Tensor]] = []
    _collect_leaves(batch, path, leaves)
    return leaves


def _collect_leaves(batch: Batch, path: str | None, leaves: list[tuple[Any, torch.Tensor]]) -> None:
    if isinstance(batch, torch.Tensor):
        leaves.append((path, batch))
    elif isinstance(batch, _SHARED):
        return  # given whole: its tensors have no batch dimension to agree on
    elif is_namedtuple(batch):
        for name in batch._fields:
            _collect_leaves(getattr(batch, name), path and f"{path}.{name}", leaves)
    elif isinstance(batch, tuple | list):
        for i, item in enumerate(batch):
            _collect_leaves(item, path and f"{path}[{i}]", leaves)
    elif isinstance(batch, Mapping):
        for key, item in batch.items():
            _collect_leaves(item, path and f"{path}[{key!r}]", leaves)
    elif is_dataclass_instance(batch):
        for field in dataclasses.fields(batch):
            _collect_leaves(getattr(batch, field.name), path and f"{path}.{field.name}", leaves)


def _rebuild_mapping(batch: Mapping, items: dict[Any, Any]) -> Mapping:
    """A mapping of ``batch``'s type holding ``items``.

    A mutable mapping is copied (``copy.copy`` keeps a defaultdict's factory, a
    UserDict subclass's attributes) and its values replaced; an immutable one is
    built from a dict.
    """
    if type(batch) is dict:
        return items
    if isinstance(batch, MutableMapping):
        rebuilt = copy.copy(batch)
        for key, value in items.items():
            rebuilt[key] = value
        return rebuilt
    try:
        return type(batch)(items)
    except TypeError as error:
        raise TypeError(
            f"`batch` got a {type(batch).__name__}, a read-only mapping that "
            f"{type(batch).__name__}(dict) cannot build ({error}); expected a mapping truebatch "
            "can rebuild. Fix: collate into a dict, or give the type a constructor from a dict."
        ) from None


def map_tensors(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """Rebuild ``batch`` with ``fn`` applied to every tensor leaf, keeping container types.

    Non-tensor leaves, per-sample sequences included, are kept as they are.
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if is_namedtuple(batch):
        return type(batch)(*(map_tensors(item, fn) for item in batch))
    if isinstance(batch, tuple | list):
        if isinstance(batch, _SHARED) or not _holds_tensor(batch):
            return batch
        return type(batch)(map_tensors(item, fn) for item in batch)
    if isinstance(batch, Mapping):
        return _rebuild_mapping(batch, {key: map_tensors(v, fn) for key, v in batch.items()})
    if is_dataclass_instance(batch):
        changes = {
            f.name: map_tensors(getattr(batch, f.name), fn)
            for f in dataclasses.fields(batch)
            if f.init
        }
        return dataclasses.replace(batch, **changes)
    return batch


def batch_size(batch: Batch) -> int:
    """Number of samples in ``batch``: the leading dimension shared by its tensors.

    Raises:
        ValueError: if the batch holds no tensor, a 0-dim tensor, or tensors whose
            leading dimensions differ (the message names every offending leaf).
    """
    sizes = {t.shape[0] if t.dim() else None for _, t in tensor_leaves(batch, None)}
    if len(sizes) == 1 and None not in sizes:
        return sizes.pop()
    leaves = tensor_leaves(batch)
    if not leaves:
        raise ValueError(
            f"`batch` got a {type(batch).__name__} that holds no tensor; expected a tensor or "
            "a tuple/list/mapping/dataclass of tensors that share the leading batch dimension. "
            "Fix: collate the samples into tensors (torch.utils.data.default_collate)."
        )
    scalars = [path for path, t in leaves if t.dim() == 0]
    if scalars:
        raise ValueError(
            f"batch leaves {scalars} got 0-dim tensors; expected a leading batch dimension. "
            "Fix: give them one row per sample, or pass them as Python numbers."
        )
    listing = ", ".join(f"{path}: {t.shape[0]}" for path, t in leaves)
    raise ValueError(
        f"batch tensors got different leading (batch) dimensions ({listing}); expected one "
        "row per sample in every tensor leaf. Fix: the leaves whose size differs."
    )


def slice_samples(batch: Batch, start: int, stop: int, *, size: int) -> Batch:
    """Samples ``start:stop`` of ``batch`` (of ``size`` samples), containers rebuilt.

    Tensor leaves become views ``t[start:stop]``; per-sample sequences are
    sliced; shared values are kept (module docstring).

    Raises:
        ValueError: a list or tuple of ``size`` numbers, which could be either
            (the message names it and says how to mark it).
    """
    return _slice(batch, slice(start, stop), size, "batch")


def _slice(batch: Batch, part: slice, size: int, path: str) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch[part]
    if is_namedtuple(batch):
        return type(batch)(
            *(_slice(getattr(batch, n), part, size, f"{path}.{n}") for n in batch._fields)
        )
    if isinstance(batch, tuple | list):
        if _holds_tensor(batch) and not isinstance(batch, _SHARED):
            items = (_slice(item, part, size, f"{path}[{i}]") for i, item in enumerate(batch))
            return type(batch)(items)
        return _slice_values(batch, part, size, path)
    if isinstance(batch, Mapping):
        items = {k: _slice(v, part, size, f"{path}[{k!r}]") for k, v in batch.items()}
        rebuilt = _rebuild_mapping(batch, items)
        for name in _PER_SAMPLE_ATTRIBUTES:
            values = getattr(rebuilt, "__dict__", {}).get(name)
            if isinstance(values, list | tuple) and len(values) == size:
                rebuilt.__dict__[name] = values[part]
        return rebuilt
    if is_dataclass_instance(batch):
        changes = {
            f.name: _slice(getattr(batch, f.name), part, size, f"{path}.{f.name}")
            for f in dataclasses.fields(batch)
            if f.init
        }
        return dataclasses.replace(batch, **changes)
    if isinstance(batch, np.ndarray):
        return _slice_array(batch, part, size, path)
    return batch


def _slice_array(values: np.ndarray, part: slice, size: int, path: str) -> np.ndarray:
    """A numpy array: its rows per sample (cut), shared (kept) or refused, like a list."""
    if isinstance(values, _SharedArray) or values.ndim == 0 or values.shape[0] != size:
        return values
    if values.dtype.kind in "biufc":
        _refuse_numbers(path, "numpy array", size)
    return values[part]


def _refuse_numbers(path: str, kind: str, size: int) -> None:
    raise ValueError(
        f"`{path}` got a {kind} of {size} numbers in a batch of {size} samples; expected a "
        "tensor for per-sample numbers, or a value marked shared. Fix: "
        f"torch.as_tensor({path}) to cut it with the samples, or tb.shared({path}) to give "
        "all of it to every micro-batch."
    )


def _slice_values(values: list | tuple, part: slice, size: int, path: str) -> list | tuple:
    """A list or tuple without tensors: per-sample (cut), shared (kept) or refused."""
    if isinstance(values, _SHARED) or len(values) != size:
        return values
    if all(isinstance(v, Number | np.number) for v in values):
        _refuse_numbers(path, type(values).__name__, size)
    return values[part] if type(values) in (list, tuple) else type(values)(values[part])
