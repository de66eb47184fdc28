"""Context parallelism: each rank holds one contiguous part of every sequence.

A causal LM scores position t with the label of position t + 1. Split a
sequence of length L across R context-parallel ranks *before* shifting and
the label of each part's last position lives on the next rank: the shift
inside a part (``count_tokens(shift=True)``) drops those R - 1 labels and the
count disagrees with the big batch's. :func:`split_sequences` shifts first,
over the whole sequence, then cuts: rank r gets positions
``r * L / R .. (r + 1) * L / R`` of every sequence tensor, with labels that
already name the next token, so

    loss = sum over ranks r, positions t of part r of  CE(logits_t, shifted_label_t) / N,
    N = sum over ranks of  count_tokens(shift=False)(part r)

is the big batch's mean over its scored tokens, each counted once. N is
exchanged over the ranks the wrapper averages gradients over, which must
include the context-parallel ones (torchtitan's ``dp_shard_cp`` mesh): their
token counts then add up (``truebatch.distributed``).
"""

from __future__ import annotations

import torch

from truebatch.tokens import select
from truebatch.tree import Batch, map_tensors

__all__ = ["split_sequences"]


def split_sequences(
    batch: Batch,
    *,
    rank: int,
    ranks: int,
    labels: str = "labels",
    ignore_index: int = -100,
    dim: int = 1,
) -> Batch:
    """This context-parallel rank's part of every sequence, labels shifted before the cut.

    Args:
        batch: a batch holding ``batch[labels]`` of shape ``(B, L, ...)``
            (unshifted: the label of position t is token t); every tensor
            with L entries along ``dim`` is cut, every other leaf is kept.
        rank: this rank's index among the context-parallel ranks.
        ranks: the number of context-parallel ranks R; L must be a multiple.
        labels: the key of the labels.
        ignore_index: the label of positions the loss skips (the last
            position of every sequence after the shift).
        dim: the sequence dimension.

    Returns:
        The same structure; ``labels`` shifted by one (position t holds
        label t + 1) and every sequence tensor cut to positions
        ``rank * L / R .. (rank + 1) * L / R``. Count its tokens with
        ``tb.count_tokens(shift=False)``.

    Raises:
        ValueError: ``rank`` outside ``0..ranks - 1``, or L not a multiple of
            ``ranks``.

    Example:
        >>> batch = {"input_ids": ids, "labels": ids.clone()}   # (B, L)
        >>> part = tb.split_sequences(batch, rank=cp_rank, ranks=cp_size)
        >>> acc.step(part, loss_fn, count=tb.count_tokens(shift=False))
    """
    if not 0 <= rank < ranks:
        raise ValueError(
            f"`rank` got {rank}; expected 0 <= rank < ranks = {ranks}. Fix: pass the rank's "
            "index in the context-parallel group (mesh['cp'].get_local_rank())."
        )
    target = select(batch, labels, "labels")
    length = target.shape[dim]
    if length % ranks:
        raise ValueError(
            f"`batch` got sequences of length {length}; expected a multiple of ranks = {ranks}. "
            f"Fix: pad them to {length + ranks - length % ranks} (labels with {ignore_index})."
        )
    part = length // ranks
    shifted = torch.full_like(target, ignore_index)
    shifted.narrow(dim, 0, length - 1).copy_(target.narrow(dim, 1, length - 1))

    def cut(tensor: torch.Tensor) -> torch.Tensor:
        if tensor is target:
            tensor = shifted
        if tensor.dim() <= dim or tensor.shape[dim] != length:
            return tensor
        return tensor.narrow(dim, rank * part, part)

    return map_tensors(batch, cut)
