"""Tokens: counting the labels a loss scores, and cutting batches by a token budget.

A token-level loss is a sum over the scored label positions divided by their
number N over the whole window. :func:`count_tokens` counts them; a causal LM
scores position ``t + 1`` from position ``t`` (``shift=True``), so the first
token of every sequence is not scored. Rows that hold several documents
(packed sequences) start a document wherever ``position_ids`` is 0, or at the
offsets ``cu_seqlens[:-1]`` of the flattened tokens; the first token of each
document is then not scored either: no label is predicted across a document
boundary.

A token budget T cuts a batch into consecutive micro-batches of at most T
tokens each, in sample order (:func:`token_budget_sizes`). Because the window
is normalized by N whatever the split, the update does not depend on the
budget: exact by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from truebatch.tree import Batch, batch_size, is_dataclass_instance, is_namedtuple, slice_samples

Counter = Callable[[Batch], "int | torch.Tensor"]
TokenCounter = str | Callable[[Batch], "torch.Tensor | Sequence[int]"]

__all__ = [
    "count_documents",
    "count_tokens",
    "scored_labels",
    "split_by_tokens",
    "token_budget_sizes",
    "tokens_per_sample",
]


def select(batch: Batch, key: str | int, what: str, *, as_tensor: bool = False) -> torch.Tensor:
    """``batch[key]`` (a field of a dataclass or namedtuple), which must be a tensor, or
    with ``as_tensor`` anything ``torch.as_tensor`` takes (a list of ints)."""
    by_name = is_dataclass_instance(batch) or (is_namedtuple(batch) and isinstance(key, str))
    try:
        value = getattr(batch, key) if by_name else batch[key]
    except (KeyError, IndexError, TypeError, AttributeError):
        raise KeyError(
            f"`{what}` got {key!r}, which the micro-batch ({type(batch).__name__}) does not "
            f"hold; expected the key or index of a tensor. Fix: pass {what}= the right key."
        ) from None
    if as_tensor and isinstance(value, list | tuple):
        value = torch.as_tensor(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"`{what}` got {key!r}, a {type(value).__name__}; expected a tensor. "
            f"Fix: pass {what}= the key of a tensor."
        )
    return value


def _document_starts(
    batch: Batch, labels: torch.Tensor, position_ids: str | None, cu_seqlens: str | None
) -> torch.Tensor | None:
    """Where a document starts, shaped like ``labels`` (None: one document per row)."""
    if position_ids is not None:
        positions = select(batch, position_ids, "position_ids")
        if positions.shape != labels.shape:
            raise ValueError(
                f"`position_ids` got shape {tuple(positions.shape)}; expected the labels' shape "
                f"{tuple(labels.shape)}. Fix: pass the position ids of the label positions."
            )
        return positions == 0
    if cu_seqlens is not None:
        offsets = select(batch, cu_seqlens, "cu_seqlens", as_tensor=True).flatten()
        total = labels.numel()
        if offsets.numel() < 2 or int(offsets[0]) != 0 or int(offsets[-1]) != total:
            raise ValueError(
                f"`cu_seqlens` got {offsets.tolist()}; expected cumulative document lengths "
                f"from 0 to the number of label positions ({total}). Fix: pass the offsets "
                "of the documents in the flattened labels."
            )
        starts = torch.zeros(total, dtype=torch.bool, device=labels.device)
        starts[offsets[:-1].to(labels.device).clamp(max=max(total - 1, 0))] = True
        return starts.view(labels.shape)
    return None


def _markers(position_ids: str | None, cu_seqlens: str | None) -> str:
    """The document markers as a counter's name shows them; at most one may be given."""
    if position_ids is not None and cu_seqlens is not None:
        raise ValueError(
            f"`position_ids` got {position_ids!r} and `cu_seqlens` {cu_seqlens!r}; expected "
            "one of them. Fix: name one marker of the documents."
        )
    if position_ids is not None:
        return f", position_ids={position_ids!r}"
    return "" if cu_seqlens is None else f", cu_seqlens={cu_seqlens!r}"


def scored_labels(
    batch: Batch,
    key: str | int,
    ignore_index: int,
    shift: bool,
    position_ids: str | None,
    cu_seqlens: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which label positions a token-level loss scores, and the document of each.

    Returns ``(scored, document)``, both shaped like the labels: ``scored`` is
    False for ignored labels and for labels predicted across a document
    boundary (see :func:`count_tokens`); ``document`` numbers the documents in
    row-major order (every row starts one).
    """
    labels = select(batch, key, "key")
    scored = labels != ignore_index
    starts = _document_starts(batch, labels, position_ids, cu_seqlens)
    if shift and labels.dim() < 2:
        raise ValueError(
            f"`labels` got shape {tuple(labels.shape)} with shift=True; expected "
            "(batch, seq). Fix: pass shift=False for labels already aligned."
        )
    marks = torch.zeros_like(scored) if starts is None else starts.clone()
    if marks.numel():
        marks[..., 0] = True
    if shift:
        # Position t + 1 is predicted from t: a document's first label has no t.
        scored = scored & ~marks
    elif starts is not None:
        # Aligned labels: position t holds the token after t; a document's last
        # position would predict the next document's first token.
        ends = torch.zeros_like(starts)
        ends[..., :-1] = starts[..., 1:]
        scored = scored & ~ends
    return scored, marks.flatten().cumsum(0).view(labels.shape)


def count_tokens(
    key: str | int = "labels",
    ignore_index: int = -100,
    shift: bool = True,
    *,
    position_ids: str | None = None,
    cu_seqlens: str | None = None,
) -> Counter:
    """A counter of the label positions a token-level loss actually scores.

    Returns ``count(batch)`` = the number of entries of ``batch[key]`` that are not
    ``ignore_index`` and are predicted from a token of the same document. With
    ``shift=True`` (causal language models, where position ``t`` predicts label
    ``t+1``) the first position of every sequence is not counted:
    ``(labels[:, 1:] != ignore_index).sum()``, matching a loss
    ``cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=..., reduction="sum")``.

    Packed rows (several documents per row) name where documents start:
    ``position_ids="position_ids"`` (a document starts where it is 0) or
    ``cu_seqlens="cu_seqlens"`` (offsets of the documents in the flattened
    labels, a tensor or a list: a list of another length than the batch is
    shared by the splitter, where a tensor would be taken for per-sample rows).
    Then no label is counted across a boundary: under ``shift=True``
    the first token of each document is not scored; under ``shift=False``
    (labels already aligned with the logits) the last one is not. The loss must
    skip the same labels (e.g. ``labels.masked_fill(position_ids == 0, -100)``).

    Args:
        key: key, index or dataclass field of the label tensor.
        ignore_index: the label value the loss ignores.
        shift: whether the loss shifts the labels by one position.
        position_ids: key of the position ids of packed rows.
        cu_seqlens: key of the cumulative document lengths of packed rows.

    Returns:
        ``count(batch) -> 0-dim tensor``.

    Raises:
        ValueError: both ``position_ids`` and ``cu_seqlens`` given; at call time,
            labels that are not ``(batch, seq)`` under ``shift=True``, or document
            markers that do not fit the labels.

    Examples:
        >>> labels = torch.tensor([[5, 6, 7, -100], [1, 2, -100, -100]])
        >>> int(count_tokens()({"labels": labels}))
        3
        >>> packed = {"labels": torch.tensor([[5, 6, 7, 1, 2]]),
        ...           "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
        >>> int(count_tokens(position_ids="position_ids")(packed))
        3
    """
    markers = _markers(position_ids, cu_seqlens)

    def count(batch: Batch) -> torch.Tensor:
        scored, _ = scored_labels(batch, key, ignore_index, shift, position_ids, cu_seqlens)
        return scored.sum()

    count.__name__ = (
        f"count_tokens(key={key!r}, ignore_index={ignore_index}, shift={shift}{markers})"
    )
    return count


def count_documents(
    key: str | int = "labels",
    ignore_index: int = -100,
    shift: bool = True,
    *,
    position_ids: str | None = None,
    cu_seqlens: str | None = None,
) -> Counter:
    """A counter of the documents a per-document loss averages over.

    For a loss that is the sum over documents of each document's mean token
    loss, N is the number of documents with at least one scored label (as
    :func:`count_tokens` scores them). A document is a row, or with
    ``position_ids`` / ``cu_seqlens`` each run of a packed row (see
    :func:`count_tokens`); a row's padding is no document as long as its labels
    are ignored.

    Returns:
        ``count(batch) -> 0-dim tensor`` (no host synchronization).

    Raises:
        ValueError: as :func:`count_tokens`.

    Example:
        >>> packed = {"labels": torch.tensor([[5, 6, 7, 1, 2, -100]]),
        ...           "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}
        >>> int(count_documents(position_ids="position_ids")(packed))
        2
    """
    markers = _markers(position_ids, cu_seqlens)

    def count(batch: Batch) -> torch.Tensor:
        scored, document = scored_labels(batch, key, ignore_index, shift, position_ids, cu_seqlens)
        # One slot per possible document id: no host read of the number of documents.
        has_scored = scored.new_zeros(scored.numel() + 1, dtype=torch.long)
        has_scored.scatter_reduce_(0, document.flatten(), scored.flatten().long(), "amax")
        return has_scored.sum()

    count.__name__ = (
        f"count_documents(key={key!r}, ignore_index={ignore_index}, shift={shift}{markers})"
    )
    return count


def tokens_per_sample(batch: Batch, tokens: TokenCounter = "attention_mask") -> list[int]:
    """The number of tokens of every sample of ``batch``, padding excluded.

    Args:
        batch: the batch.
        tokens: the key of a mask whose nonzero entries are tokens (by default
            ``"attention_mask"``, as tokenizers and collators return it), or a
            function ``tokens(batch)`` returning one count per sample (from a
            lengths field, say).

    Returns:
        One count per sample, in order.

    Raises:
        KeyError, TypeError, ValueError: the mask is missing, or the counts are
            not one non-negative integer per sample.

    Example:
        >>> tokens_per_sample({"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])})
        [2, 1]
    """
    size = batch_size(batch)
    if isinstance(tokens, str):
        mask = select(batch, tokens, "tokens")
        counts = mask.reshape(size, -1).ne(0).sum(1) if size else mask.new_zeros(0)
    elif callable(tokens):
        counts = tokens(batch)
    else:
        raise TypeError(
            f"`tokens` got {type(tokens).__name__}; expected the key of a mask or a function "
            "batch -> tokens per sample. Fix: tokens='attention_mask' or tokens=lambda b: ..."
        )
    values = torch.as_tensor(counts).flatten().tolist()
    if len(values) != size or any(not float(v).is_integer() or v < 0 for v in values):
        raise ValueError(
            f"`tokens` got {values[:8]}{'...' if len(values) > 8 else ''} for a batch of {size} "
            "samples; expected one non-negative integer per sample. Fix: count each "
            "sample's tokens."
        )
    return [int(v) for v in values]


def token_budget_sizes(
    lengths: Sequence[int], max_tokens: int, *, padded: bool = False
) -> list[int]:
    """Sizes of consecutive micro-batches of at most ``max_tokens`` tokens, in order.

    Samples are taken in order; a micro-batch is closed when the next sample
    would take it over the budget. Its cost is the sum of its samples' lengths
    (padding excluded, as packed or variable-length attention sees it), or with
    ``padded=True`` its samples times its longest one (as a micro-batch padded
    to its own longest sequence sees it).

    Args:
        lengths: tokens of every sample.
        max_tokens: the budget T of one micro-batch.
        padded: count a micro-batch as ``samples * longest`` instead of the sum.

    Returns:
        The micro-batch sizes, which add up to ``len(lengths)``.

    Raises:
        ValueError: ``max_tokens`` is not a positive int, or one sample alone is
            longer than ``max_tokens`` (the message names it).

    Example:
        >>> token_budget_sizes([3, 5, 2, 6, 1], 8)
        [2, 2, 1]
        >>> token_budget_sizes([3, 5, 2, 6, 1], 8, padded=True)
        [1, 1, 1, 1, 1]
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(
            f"`max_tokens` got {max_tokens!r}; expected a positive int. "
            "Fix: pass the tokens one micro-batch may hold."
        )
    lengths = [int(length) for length in lengths]
    negative = [i for i, length in enumerate(lengths) if length < 0]
    if negative:
        raise ValueError(
            f"`lengths` got negative lengths at samples {negative[:8]}; expected token counts. "
            "Fix: count each sample's tokens, 0 or more."
        )
    sizes: list[int] = []
    count = total = longest = 0
    for index, length in enumerate(lengths):
        if length > max_tokens:
            raise ValueError(
                f"`max_tokens` got {max_tokens}; expected at least the tokens of every sample, "
                f"but sample {index} has {length}. Fix: max_tokens >= {length}, or truncate "
                "that sample."
            )
        widest = max(longest, length)
        cost = (count + 1) * widest if padded else total + length
        if count and cost > max_tokens:
            sizes.append(count)
            count = total = longest = 0
            widest = length
        count, total, longest = count + 1, total + length, widest
    if count:
        sizes.append(count)
    return sizes


def split_by_tokens(
    batch: Batch,
    max_tokens: int,
    *,
    tokens: TokenCounter = "attention_mask",
    lengths: Sequence[int] | None = None,
) -> list[tuple[Batch, int]]:
    """``batch`` cut into consecutive micro-batches of at most ``max_tokens`` tokens.

    The Accumulator's token budget: ``(micro_batch, its samples)`` pairs, the
    batch itself when it fits. Tokens per sample come from ``tokens``
    (:func:`tokens_per_sample`), or from ``lengths`` when they were read
    already; a micro-batch holds the sum of its samples'.

    Raises:
        ValueError: one sample is longer than ``max_tokens`` (named).
    """
    size = batch_size(batch)
    if lengths is None:
        lengths = tokens_per_sample(batch, tokens)
    sizes = token_budget_sizes(lengths, max_tokens)
    if len(sizes) <= 1:
        return [(batch, size)]
    pieces: list[tuple[Any, int]] = []
    start = 0
    for n in sizes:
        pieces.append((slice_samples(batch, start, start + n, size=size), n))
        start += n
    return pieces
