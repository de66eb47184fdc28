"""truebatch: gradient accumulation that gives exactly the update of the big batch.

import truebatch as tb
acc = tb.Accumulator(model, optimizer, micro_batch_size=16)
result = acc.step(batch, loss_fn)        # loss_fn returns the SUM of item losses
"""

from truebatch import (  # tb.nn layers, tb.testing.assert_accumulation_equivalent
    nn,
    reductions,
    testing,
)
from truebatch.accumulator import Accumulator, StepResult
from truebatch.batching import (
    batch_size,
    batch_unit,
    count_documents,
    count_samples,
    count_tokens,
    shared,
    split,
    token_budget_sizes,
)
from truebatch.check import Finding, Report, check
from truebatch.checkpoint import load_checkpoint, save_checkpoint
from truebatch.compare import max_relative_difference, relative_differences
from truebatch.pipeline import PipelineAccumulator
from truebatch.schedule import scale_lr, windows_per_epoch
from truebatch.sequences import split_sequences
from truebatch.terms import Term, term
from truebatch.windows import Windows, windows

__all__ = [
    "Accumulator",
    "Finding",
    "PipelineAccumulator",
    "Report",
    "StepResult",
    "Term",
    "Windows",
    "batch_size",
    "batch_unit",
    "check",
    "count_documents",
    "count_samples",
    "count_tokens",
    "load_checkpoint",
    "max_relative_difference",
    "nn",
    "reductions",
    "relative_differences",
    "save_checkpoint",
    "scale_lr",
    "shared",
    "split",
    "split_sequences",
    "term",
    "testing",
    "token_budget_sizes",
    "windows",
    "windows_per_epoch",
]

__version__ = "0.1.0"
