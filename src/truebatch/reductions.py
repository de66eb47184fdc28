"""The named RL loss reductions, exact under accumulation and over ranks.

RL trainers (PPO, GRPO, Dr. GRPO) reduce a per-token loss ``l[s, t]`` with a
mask ``m[s, t]`` (1 on the response tokens that are scored) in one of a few
named ways. Each means something different, and each is a SUM over some
items divided by the COUNT of those items over the whole batch, so each is
one loss term: a :class:`Reduction` gives the term's sum for a micro-batch
(:meth:`Reduction.sum`) and is itself the term's counter.

| reduction | window value | N counts |
|---|---|---|
| ``token_mean`` | ``sum_{s,t} m l / sum_{s,t} m`` | tokens |
| ``seq_mean_token_mean`` | ``(1/N_seq) sum_s (sum_t m l / sum_t m)`` | sequences |
| ``seq_mean_token_sum_norm`` | ``(1/(N_seq * L)) sum_s sum_t m l`` (Dr. GRPO) | sequences |

A *sequence* is a row of the mask with at least one scored token; a row
without any (padding) adds nothing to a sum and is not counted.

Computed per micro-batch and averaged (what ``loss.mean()`` per micro-batch
does), each of them drifts with the split; as truebatch terms they give the
big batch's value at any micro-batch size and number of ranks.

Under sequence packing (several sequences in one row), ``token_mean`` stays
the same: it never needs to know where a sequence ends. The two ``seq_mean``
reductions need one mask row per sequence: for packed rows, pass a mask of
shape ``(sequences, tokens)`` (one row per packed sequence, e.g. built from
the segment ids) and the per-token losses laid out the same way; a packed
row's mask taken as one sequence silently changes their value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from truebatch.batching import Batch

__all__ = ["Reduction", "seq_mean_token_mean", "seq_mean_token_sum_norm", "token_mean"]

MaskSource = str | int | Callable[[Batch], torch.Tensor]
_Kind = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


@dataclass(frozen=True)
class Reduction:
    """A named reduction of per-token losses: the term's sum, and its counter.

    Made by :func:`token_mean`, :func:`seq_mean_token_mean` and
    :func:`seq_mean_token_sum_norm`. Calling it on a micro-batch counts the
    term's items there, so it goes straight into ``count=``.

    Attributes:
        kind: the reduction's name.
        mask: where the counter finds the mask in a micro-batch: a key, an
            index, or a function of the micro-batch.
        constant: Dr. GRPO's ``L`` (``None`` for the others).
    """

    kind: _Kind
    mask: MaskSource
    constant: float | None = None

    def sum(self, losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The term's sum over one micro-batch (a 0-dim tensor).

        Args:
            losses: per-token losses, shape ``(sequences, tokens)``.
            mask: 1 (or True) on the scored tokens, same shape.

        Returns:
            ``sum m l`` (token_mean), ``sum_s (sum_t m l / sum_t m)``
            (seq_mean_token_mean) or ``sum m l / L`` (seq_mean_token_sum_norm).

        Raises:
            ValueError: ``losses`` and ``mask`` differ in shape or are not 2-D.
        """
        if losses.dim() != 2 or mask.shape != losses.shape:
            raise ValueError(
                f"`losses` got shape {tuple(losses.shape)} with a mask of shape "
                f"{tuple(mask.shape)}; expected both (sequences, tokens). Fix: pass the "
                "per-token losses and the mask aligned, one row per sequence."
            )
        mask = mask.to(losses.dtype)
        token_sums = (losses * mask).sum(dim=-1)
        if self.kind == "token_mean":
            return token_sums.sum()
        if self.kind == "seq_mean_token_sum_norm":
            assert self.constant is not None
            return token_sums.sum() / self.constant
        tokens = mask.sum(dim=-1)
        return (token_sums / tokens.clamp(min=1)).sum()

    def __call__(self, micro_batch: Batch) -> torch.Tensor:
        """The term's item count in ``micro_batch``: scored tokens, or sequences."""
        mask = self._mask_of(micro_batch)
        if mask.dim() != 2:
            raise ValueError(
                f"`mask` got a tensor of shape {tuple(mask.shape)}; expected (sequences, "
                "tokens). Fix: point mask= at the per-token mask of the micro-batch."
            )
        if self.kind == "token_mean":
            return (mask != 0).sum()
        return (mask != 0).any(dim=-1).sum()

    def _mask_of(self, micro_batch: Batch) -> torch.Tensor:
        source = self.mask
        if callable(source):
            mask = source(micro_batch)
        elif isinstance(micro_batch, Mapping | Sequence):
            mask = micro_batch[source]  # type: ignore[index]
        else:
            mask = getattr(micro_batch, str(source))
        if not isinstance(mask, torch.Tensor):
            raise TypeError(
                f"`mask` got {type(mask).__name__} from the micro-batch; expected a tensor. "
                "Fix: pass the key or index of the mask tensor, or a function returning it."
            )
        return mask


def token_mean(mask: MaskSource = "mask") -> Reduction:
    """token-mean: every scored token of the window weighs the same.

    ``loss = sum_{s,t} m[s,t] l[s,t] / sum_{s,t} m[s,t]`` over the window and
    all ranks (GRPO as in DAPO, PPO in most trainers). Unchanged under
    sequence packing.

    Args:
        mask: key, index or function giving the micro-batch's mask.

    Returns:
        the reduction: ``.sum(losses, mask)`` in ``loss_fn``, itself as the counter.

    Example:
        >>> policy = tb.reductions.token_mean(mask="mask")
        >>> def loss_fn(model, mb):
        ...     return {"policy": policy.sum(per_token_loss(model, mb), mb["mask"])}
        >>> acc.step(batch, loss_fn, count={"policy": policy})
    """
    return Reduction("token_mean", mask)


def seq_mean_token_mean(mask: MaskSource = "mask") -> Reduction:
    """seq-mean-token-mean: each sequence's token mean, averaged over sequences.

    ``loss = (1/N_seq) sum_s (sum_t m[s,t] l[s,t] / sum_t m[s,t])``, where
    ``N_seq`` counts the sequences (rows with a scored token) of the window
    over all ranks (the original GRPO). Needs one mask row per sequence
    under packing.

    Args:
        mask: key, index or function giving the micro-batch's mask.

    Returns:
        the reduction: ``.sum(losses, mask)`` in ``loss_fn``, itself as the counter.

    Example:
        >>> policy = tb.reductions.seq_mean_token_mean(mask="mask")
        >>> acc.step(batch, loss_fn, count={"policy": policy})
    """
    return Reduction("seq_mean_token_mean", mask)


def seq_mean_token_sum_norm(constant: float, mask: MaskSource = "mask") -> Reduction:
    """seq-mean-token-sum-norm (Dr. GRPO): token sums over a constant, averaged over sequences.

    ``loss = (1/(N_seq * L)) sum_s sum_t m[s,t] l[s,t]`` with a constant
    ``L`` (typically the maximum response length), so no sequence's length
    scales its tokens' weight. Needs one mask row per sequence under packing.

    Args:
        constant: ``L``, a positive number fixed for the run.
        mask: key, index or function giving the micro-batch's mask.

    Returns:
        the reduction: ``.sum(losses, mask)`` in ``loss_fn``, itself as the counter.

    Raises:
        ValueError: ``constant`` is not a positive number.

    Example:
        >>> policy = tb.reductions.seq_mean_token_sum_norm(1024, mask="mask")
        >>> acc.step(batch, loss_fn, count={"policy": policy})
    """
    number = isinstance(constant, int | float) and not isinstance(constant, bool)
    if not number or not 0 < constant < math.inf:
        raise ValueError(
            f"`constant` got {constant!r}; expected a positive number (Dr. GRPO's L). Fix: "
            "pass the maximum response length, e.g. 1024."
        )
    return Reduction("seq_mean_token_sum_norm", mask, float(constant))
