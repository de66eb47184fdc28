"""Hugging Face Transformers with exact gradient accumulation.

- :class:`Trainer`: a drop-in ``transformers.Trainer`` whose accumulation
  gives the update of the big batch (``from truebatch.integrations.transformers
  import Trainer`` is the one-line change); :class:`ExactAccumulation` is the
  same for other Trainer subclasses (``class SFT(ExactAccumulation, trl.SFTTrainer)``).
- :func:`convert_attention_dropout`: makes the dropout a Transformers model
  applies to its attention probabilities split-invariant, like
  :func:`truebatch.nn.convert_dropout` does for ``nn.Dropout`` modules.
- :func:`model_loss`: ``(loss_fn, count)`` of a Transformers model as the
  Trainer computes them, for ``tb.check`` and ``truebatch check`` (a factory
  may return ``(model, batch)`` for a Transformers model).
- :func:`causal_lm_loss` / :func:`token_loss_sum`: the token-sum loss of a
  causal LM, for a hand-written loop:
  ``acc.step(batch, causal_lm_loss, count=tb.count_tokens())``.

The loss helpers import nothing from ``transformers``; ``Trainer``,
``model_loss`` and ``convert_attention_dropout`` import it when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from truebatch.integrations.transformers._loss import causal_lm_loss, token_loss_sum

if TYPE_CHECKING:
    from truebatch.integrations.transformers._attention import convert_attention_dropout
    from truebatch.integrations.transformers._trainer import (
        ExactAccumulation,
        Trainer,
        model_loss,
    )

__all__ = [
    "ExactAccumulation",
    "Trainer",
    "causal_lm_loss",
    "convert_attention_dropout",
    "model_loss",
    "token_loss_sum",
]

_LAZY = {
    "ExactAccumulation": "truebatch.integrations.transformers._trainer",
    "Trainer": "truebatch.integrations.transformers._trainer",
    "convert_attention_dropout": "truebatch.integrations.transformers._attention",
    "model_loss": "truebatch.integrations.transformers._trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
