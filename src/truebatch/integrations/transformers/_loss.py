"""The loss of Hugging Face causal language models, in the form truebatch takes.

Transformers' causal LMs score the logits at position ``t`` against the label
at ``t + 1`` (the labels are shifted inside the model), skip labels equal to
``-100``, and average over the scored tokens of the batch they are given.
Over a window of micro-batches the average must run over the scored tokens of
the whole window, N:

    loss = (1 / N) * sum over micro-batches j, sequences b, positions t with
           labels[b, t + 1] != -100  of  -log softmax(logits[b, t])[labels[b, t + 1]]

:func:`causal_lm_loss` returns the inner sum for one micro-batch;
``tb.count_tokens()`` (key ``"labels"``, ``ignore_index=-100``, ``shift=True``:
Transformers' conventions) counts the same positions from the labels alone,
before any backward, so the Accumulator scales every backward by ``1 / N``
before it runs, which keeps float16 gradients in range::

    import truebatch as tb
    from truebatch.integrations.transformers import causal_lm_loss

    acc = tb.Accumulator(model, optimizer, micro_batch_size=8)
    result = acc.step(batch, causal_lm_loss, count=tb.count_tokens())

This is the normalization the Trainer applies through ``num_items_in_batch``
(transformers >= 4.46), for any training loop; the Trainer counts the shifted
labels only for models whose ``loss_type`` is ``"ForCausalLM"`` (not, for
example, ``GPT2LMHeadModel``). The module imports nothing from
``transformers``: it only reads the logits the model returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["causal_lm_loss", "token_loss_sum"]


def token_loss_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
) -> torch.Tensor:
    """SUM of the cross-entropy over the label positions a token-level loss scores.

    With ``shift=True`` (causal LMs) the logits at position ``t`` predict the
    label at ``t + 1``::

        sum over b, t < T - 1 with labels[b, t + 1] != ignore_index of
            -log softmax(logits[b, t])[labels[b, t + 1]]

    With ``shift=False`` the logits at ``t`` predict the label at ``t`` (labels
    already aligned, e.g. a collator's ``shift_labels``). The number of terms
    is what ``tb.count_tokens(ignore_index=..., shift=...)`` counts. Logits
    narrower than float32 (float16, bfloat16) are upcast to float32 before the
    softmax; float32 and float64 logits keep their dtype (Transformers' own
    loss rounds float64 logits down to float32).

    Args:
        logits: ``(batch, seq, vocab)``.
        labels: ``(batch, seq)`` class indices, ``ignore_index`` where unscored.
        ignore_index: label value that is not scored.
        shift: whether ``labels[:, t + 1]`` is the target of ``logits[:, t]``.

    Examples:
        >>> logits = torch.zeros(1, 3, 4)                  # uniform over 4 tokens
        >>> labels = torch.tensor([[2, 1, -100]])          # one scored position
        >>> round(float(token_loss_sum(logits, labels)), 4)   # log(4)
        1.3863
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"token_loss_sum expects logits of shape (batch, seq, vocab) and labels of shape "
            f"(batch, seq), got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}; "
            "return logits for every position (no logits_to_keep) and pass the label tensor "
            "of the same micro-batch"
        )
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index) if shift else labels
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(
        wide.reshape(-1, wide.shape[-1]),
        targets.reshape(-1).to(wide.device),
        ignore_index=ignore_index,
        reduction="sum",
    )


def causal_lm_loss(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    key: str = "labels",
    ignore_index: int = -100,
    shift: bool = True,
) -> torch.Tensor:
    """A ``loss_fn`` for the Accumulator: the SUM of a causal LM's token losses.

    Runs ``model(**inputs)``, where ``inputs`` is ``batch`` without ``key`` and
    without ``"labels"`` (so the model does not also compute its own mean
    loss), and returns ``token_loss_sum(logits, batch[key], ...)``. Pair it
    with ``count=tb.count_tokens(key, ignore_index, shift)``; with the
    defaults, ``tb.count_tokens()``. For other conventions bind the keywords:
    ``functools.partial(causal_lm_loss, key="shift_labels", shift=False)``.

    Args:
        model: a model that returns its logits as ``output.logits`` (Transformers),
            as the first item of a tuple, or as a tensor.
        batch: a dict-like micro-batch, e.g. ``input_ids``, ``attention_mask``,
            ``labels`` as a Transformers data collator makes it.
        key: the entry of ``batch`` that holds the labels.
        ignore_index: label value that is not scored.
        shift: whether ``labels[:, t + 1]`` is the target of the logits at ``t``.

    Examples:
        >>> acc = tb.Accumulator(model, optimizer, micro_batch_size=8)
        >>> result = acc.step(batch, causal_lm_loss, count=tb.count_tokens())
        >>> result.loss   # mean token loss of the whole batch
    """
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"causal_lm_loss expects a dict-like micro-batch (input_ids, attention_mask, "
            f"labels, ...), got {type(batch).__name__}; for other batches write a loss_fn "
            "that calls token_loss_sum(logits, labels)"
        )
    if key not in batch:
        raise KeyError(
            f"causal_lm_loss(key={key!r}) found no such entry in the micro-batch (keys: "
            f"{sorted(batch)}); pass key= naming the label tensor"
        )
    inputs = {name: value for name, value in batch.items() if name not in (key, "labels")}
    logits = logits_of(model(**inputs))
    return token_loss_sum(logits, batch[key], ignore_index=ignore_index, shift=shift)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: ``.logits``, a tuple's first item, or the tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple | list) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"causal_lm_loss could not find logits in the model's output "
            f"({type(output).__name__}); the model must return an object with .logits, a "
            "tuple whose first item is the logits, or the logits tensor"
        )
    return logits
