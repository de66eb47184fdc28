"""Helpers for users of Hugging Face Transformers, Lightning and Accelerate.

Each integration is a submodule, imported on its own; importing ``truebatch``
or ``truebatch.integrations`` imports none of those libraries:

- :mod:`truebatch.integrations.transformers`: a drop-in ``Trainer`` with exact
  accumulation, split-invariant attention dropout (``convert_attention_dropout``),
  and the token-sum loss of causal language models, for
  ``acc.step(batch, causal_lm_loss, count=tb.count_tokens())``.
- :mod:`truebatch.integrations.lightning`: an Accumulator for a
  LightningModule that uses manual optimization.

Accelerate needs no helper: give the Accumulator the prepared model and data
loader, and drop ``accelerator.accumulate`` and ``accelerator.backward`` (see
``docs/how-to/accelerate.md``).
"""
