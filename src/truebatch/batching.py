"""Splitting effective batches into micro-batches and counting their items.

A *batch* is a tensor or a nested tuple / list / dict / namedtuple / dataclass
whose tensor leaves share the leading (batch) dimension. Non-tensor leaves
(strings, ints, ``None``...) are passed to every micro-batch unchanged.

The splitter and the counters here are the only ones in truebatch: the
Accumulator, the checker and the demos all call them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

Batch = Any
Count = int | torch.Tensor
Counter = Callable[[Batch], Count]

__all__ = ["batch_size", "batch_unit", "count_samples", "count_tokens", "split"]


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


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
    elif _is_namedtuple(batch):
        for name in batch._fields:
            _collect_leaves(getattr(batch, name), path and f"{path}.{name}", leaves)
    elif isinstance(batch, tuple | list):
        for i, item in enumerate(batch):
            _collect_leaves(item, path and f"{path}[{i}]", leaves)
    elif isinstance(batch, dict):
        for key, item in batch.items():
            _collect_leaves(item, path and f"{path}[{key!r}]", leaves)
    elif _is_dataclass_instance(batch):
        for field in dataclasses.fields(batch):
            _collect_leaves(getattr(batch, field.name), path and f"{path}.{field.name}", leaves)


def map_tensors(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """Rebuild ``batch`` with ``fn`` applied to every tensor leaf, keeping container types."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if _is_namedtuple(batch):
        return type(batch)(*(map_tensors(item, fn) for item in batch))
    if isinstance(batch, tuple | list):
        return type(batch)(map_tensors(item, fn) for item in batch)
    if isinstance(batch, dict):
        mapped = {key: map_tensors(item, fn) for key, item in batch.items()}
        return mapped if type(batch) is dict else type(batch)(mapped)
    if _is_dataclass_instance(batch):
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
            f"batch holds no tensor (got {type(batch).__name__}); pass a tensor or a "
            "tuple/list/dict/dataclass of tensors that share the leading batch dimension"
        )
    scalars = [path for path, t in leaves if t.dim() == 0]
    if scalars:
        raise ValueError(
            f"batch leaves {scalars} are 0-dim tensors and have no batch dimension; "
            "give them a leading dimension or pass them as Python numbers"
        )
    listing = ", ".join(f"{path}: {t.shape[0]}" for path, t in leaves)
    raise ValueError(
        f"batch tensors disagree on the leading (batch) dimension ({listing}); every "
        "tensor leaf must hold one row per sample, so fix the leaves whose size differs"
    )


def check_micro_batch_size(micro_batch_size: object) -> int:
    """``micro_batch_size`` if it is a positive int, else the error (the one check of it)."""
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int):
        raise TypeError(
            f"micro_batch_size must be a positive int, got {micro_batch_size!r} "
            f"({type(micro_batch_size).__name__})"
        )
    if micro_batch_size <= 0:
        raise ValueError(
            f"micro_batch_size must be a positive int, got {micro_batch_size}; "
            "use 1 or more samples per micro-batch"
        )
    return micro_batch_size


def split(batch: Batch, micro_batch_size: int | None) -> list[Batch]:
    """Split ``batch`` along its leading dimension into micro-batches.

    Micro-batches hold ``micro_batch_size`` samples each, in order; the last one
    holds the remainder ``B mod micro_batch_size`` when that is not zero. Tensor
    leaves are views (no copy); non-tensor leaves are shared. ``None`` returns
    ``[batch]``.

    Examples:
        >>> x = torch.arange(10)
        >>> [m.tolist() for m in split(x, 4)]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """
    size = batch_size(batch)
    if micro_batch_size is None:
        return [batch]
    return [mb for mb, _ in split_sized(batch, size, check_micro_batch_size(micro_batch_size))]


def split_sized(batch: Batch, size: int, step: int) -> list[tuple[Batch, int]]:
    """:func:`split` of a batch of known ``size``: ``(micro_batch, its size)`` pairs."""
    if step >= size:
        return [(batch, size)]
    return [
        (
            map_tensors(batch, lambda t, start=start: t[start : start + step]),
            min(step, size - start),
        )
        for start in range(0, size, step)
    ]


def batch_unit(model: torch.nn.Module) -> int:
    """The number of samples every micro-batch must be a multiple of, for ``model``.

    A layer that normalizes over fixed groups of samples (``tb.nn.GhostBatchNorm``)
    declares its group through an integer attribute ``batch_unit``; the unit of
    the model is the least common multiple over its modules (1 when none declares
    one). The Accumulator's ``"auto"`` and the checker read it; the core imports
    no layer.
    """
    unit = 1
    for module in model.modules():
        declared = getattr(module, "batch_unit", None)
        if isinstance(declared, int) and declared > 0:
            unit = math.lcm(unit, declared)
    return unit


def count_samples(batch: Batch) -> int:
    """Item count of a batch whose loss is a sum over samples: its leading dimension."""
    return batch_size(batch)


def _select(batch: Batch, key: str | int) -> torch.Tensor:
    try:
        labels = batch[key] if not _is_dataclass_instance(batch) else getattr(batch, key)
    except (KeyError, IndexError, TypeError, AttributeError):
        raise KeyError(
            f"count_tokens(key={key!r}) found no such entry in the micro-batch "
            f"({type(batch).__name__}); pass the key or index of the label tensor"
        ) from None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"count_tokens(key={key!r}) expected a tensor, got {type(labels).__name__}")
    return labels


def count_tokens(
    key: str | int = "labels", ignore_index: int = -100, shift: bool = True
) -> Counter:
    """A counter of the label positions a token-level loss actually scores.

    Returns ``count(batch)`` = the number of entries of ``batch[key]`` that are not
    ``ignore_index``. With ``shift=True`` (causal language models, where position
    ``t`` predicts label ``t+1``) the first position of every sequence is not
    counted: ``(labels[:, 1:] != ignore_index).sum()``. This matches a loss that is
    ``cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=..., reduction="sum")``.

    Examples:
        >>> labels = torch.tensor([[5, 6, 7, -100], [1, 2, -100, -100]])
        >>> int(count_tokens()({"labels": labels}))
        3
    """

    def count(batch: Batch) -> torch.Tensor:
        labels = _select(batch, key)
        if shift:
            if labels.dim() < 2:
                raise ValueError(
                    f"count_tokens(shift=True) needs labels of shape (batch, seq), got "
                    f"{tuple(labels.shape)}; pass shift=False for unshifted labels"
                )
            labels = labels[:, 1:]
        return (labels != ignore_index).sum()

    count.__name__ = f"count_tokens(key={key!r}, ignore_index={ignore_index}, shift={shift})"
    return count
