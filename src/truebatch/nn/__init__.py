"""Split-invariant layers: the same output for the full batch and for any split of it.

BatchNorm in train mode and dropout make a model's output depend on how its
batch is split into micro-batches, which breaks exact gradient accumulation.
This package provides drop-in replacements and converters:

- :class:`GhostBatchNorm1d` / ``2d`` / ``3d``: BatchNorm over fixed chunks of
  ``ghost_batch_size`` samples, with running statistics updated chunk by chunk;
- :class:`SplitInvariantDropout`: dropout whose mask is a hash of
  (seed, window, layer, global sample index, element index), or keyed by token
  (document id, position) inside :class:`token_keys`; exact under activation
  checkpointing and ``torch.compile``;
- :func:`convert_batchnorm`, :func:`convert_dropout`: swap them into a model;
- :func:`freeze_batchnorm` / :func:`unfreeze_batchnorm`: BatchNorm on running
  statistics, for fine-tuning.

Example::

    >>> model = truebatch.nn.convert_batchnorm(model, ghost_batch_size=32)
    >>> model = truebatch.nn.convert_dropout(model, seed=0)
"""

from truebatch.nn.batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from truebatch.nn.convert import (
    convert_batchnorm,
    convert_dropout,
    freeze_batchnorm,
    unfreeze_batchnorm,
)
from truebatch.nn.dropout import SplitInvariantDropout, token_keys

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "SplitInvariantDropout",
    "convert_batchnorm",
    "convert_dropout",
    "freeze_batchnorm",
    "token_keys",
    "unfreeze_batchnorm",
]
