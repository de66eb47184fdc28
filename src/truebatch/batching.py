"""Splitting effective batches into micro-batches and counting their items.

A *batch* is a tensor or a nested tuple / list / mapping / namedtuple /
dataclass whose tensor leaves share the leading (batch) dimension B
(:mod:`truebatch.tree` says exactly what is cut and what is shared). A
micro-batch of samples ``start:stop`` holds the views ``t[start:stop]`` of the
tensors and the same slice of every per-sample list (a list or tuple of B
strings, say); other values are passed to every micro-batch unchanged.

A batch is cut either by samples (``micro_batch_size``) or by tokens
(``max_tokens``, :mod:`truebatch.tokens`); both keep the sample order, and the
window's normalization by its item count N makes the update independent of
the cut.

The splitter and the counters here are the only ones in truebatch: the
Accumulator, the checker and the demos all call them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from truebatch.tokens import (
    TokenCounter,
    count_documents,
    count_tokens,
    split_by_tokens,
    token_budget_sizes,
    tokens_per_sample,
)
from truebatch.tree import (
    Batch,
    batch_size,
    is_dataclass_instance,
    map_tensors,
    shared,
    slice_samples,
    tensor_leaves,
)

Count = int | torch.Tensor
Counter = Callable[[Batch], Count]

__all__ = [
    "Batch",
    "Counter",
    "batch_size",
    "batch_unit",
    "check_micro_batch_size",
    "count_documents",
    "count_samples",
    "count_tokens",
    "is_dataclass_instance",
    "map_tensors",
    "shared",
    "slice_samples",
    "split",
    "split_by_tokens",
    "split_sized",
    "split_window",
    "tensor_leaves",
    "token_budget_sizes",
    "tokens_per_sample",
]


def check_micro_batch_size(micro_batch_size: object) -> int:
    """``micro_batch_size`` if it is a positive int, else the error (the one check of it)."""
    if (
        isinstance(micro_batch_size, bool)
        or not isinstance(micro_batch_size, int)
        or micro_batch_size <= 0
    ):
        wrong_type = isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int)
        error = TypeError if wrong_type else ValueError
        raise error(
            f"`micro_batch_size` got {micro_batch_size!r} ({type(micro_batch_size).__name__}); "
            "expected a positive int. Fix: 1 or more samples per micro-batch, or None."
        )
    return micro_batch_size


def split(
    batch: Batch,
    micro_batch_size: int | None = None,
    *,
    max_tokens: int | None = None,
    tokens: TokenCounter = "attention_mask",
) -> list[Batch]:
    """Split ``batch`` along its leading dimension into micro-batches, in sample order.

    By samples, micro-batches hold ``micro_batch_size`` samples each; the last
    one holds the remainder ``B mod micro_batch_size`` when that is not zero.
    By tokens, each micro-batch holds as many consecutive samples as fit in
    ``max_tokens`` tokens (padding excluded), counted per sample by ``tokens``.
    Tensor leaves are views (no copy); per-sample lists are sliced; other
    values are shared. With neither size, or when the batch fits, the result
    is ``[batch]``.

    Args:
        batch: the batch to split.
        micro_batch_size: samples per micro-batch.
        max_tokens: tokens per micro-batch (instead of ``micro_batch_size``).
        tokens: where tokens are read from: the key of a mask whose nonzero
            entries are tokens (default ``"attention_mask"``), or a function
            ``tokens(batch)`` returning one count per sample.

    Returns:
        The micro-batches, in order.

    Raises:
        ValueError: sizes that are not positive ints, both sizes given, tensors
            of different leading dimensions, an ambiguous list (see
            :func:`truebatch.shared`), or a sample longer than ``max_tokens``.

    Examples:
        >>> x = torch.arange(10)
        >>> [m.tolist() for m in split(x, 4)]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        >>> mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
        >>> [len(m["attention_mask"]) for m in split({"attention_mask": mask}, max_tokens=4)]
        [2, 1, 1]
    """
    size = batch_size(batch)
    if micro_batch_size is not None:
        micro_batch_size = check_micro_batch_size(micro_batch_size)
    plan = split_window(
        [batch], [size], micro_batch_size=micro_batch_size, max_tokens=max_tokens, tokens=tokens
    )
    return [micro_batch for micro_batch, _ in plan]


def split_sized(batch: Batch, size: int, step: int) -> list[tuple[Batch, int]]:
    """:func:`split` of a batch of known ``size``: ``(micro_batch, its size)`` pairs."""
    if step >= size:
        return [(batch, size)]
    return [
        (slice_samples(batch, start, start + step, size=size), min(step, size - start))
        for start in range(0, size, step)
    ]


def split_window(
    pieces: list[Batch],
    sizes: list[int],
    *,
    micro_batch_size: int | None = None,
    max_tokens: int | None = None,
    tokens: TokenCounter = "attention_mask",
    lengths: list[list[int]] | None = None,
) -> list[tuple[Batch, int]]:
    """Every piece of a window (of ``sizes`` samples) cut by samples or by tokens.

    The Accumulator's plan of a window: ``(micro_batch, its samples)`` pairs, in
    order. A piece that fits is kept whole; neither size keeps every piece.
    ``lengths``: the tokens of every sample of every piece, if read already.

    Raises:
        ValueError: both sizes given, or a sample longer than ``max_tokens``.
    """
    if max_tokens is not None:
        if micro_batch_size is not None:
            raise ValueError(
                f"`micro_batch_size` got {micro_batch_size} and `max_tokens` {max_tokens}; "
                "expected one of them. Fix: cut by samples or by tokens."
            )
        per_piece = lengths if lengths is not None else [None] * len(pieces)
        return [
            pair
            for piece, piece_lengths in zip(pieces, per_piece, strict=True)
            for pair in split_by_tokens(piece, max_tokens, tokens=tokens, lengths=piece_lengths)
        ]
    if micro_batch_size is None:
        return list(zip(pieces, sizes, strict=True))
    return [
        pair
        for piece, size in zip(pieces, sizes, strict=True)
        for pair in split_sized(piece, size, micro_batch_size)
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
