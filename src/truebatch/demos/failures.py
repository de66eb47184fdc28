"""The five classic accumulation failures the demos reproduce, by name.

Each is a mistake people make in hand-written accumulation loops and report in
forums; the docs page "Five classic failures" (``docs/classic-failures.md``)
tells each story with its fix. The demo and bench tables label their rows with
these names, so that a row says what goes wrong.
"""

from __future__ import annotations

ZERO_GRAD = "zero_grad every micro-batch"
"""A step applies only the window's last micro-batch's gradient, divided by k."""

BATCHNORM_DROPOUT = "BatchNorm and dropout per micro-batch"
"""BatchNorm normalizes each micro-batch with its own statistics; dropout draws other masks."""

TOKEN_MEAN = "mean loss / k on variable-length tokens"
"""Tokens of short micro-batches weigh more than tokens of long ones."""

UNEQUAL_MEANS = "mean loss / k on unequal micro-batches"
"""Samples of small micro-batches weigh more than samples of large ones."""

SHORT_WINDOW = "short last window divided by k"
"""An epoch's last window, with fewer than k micro-batches, gets a fraction of its gradient."""

FAILURES = (ZERO_GRAD, BATCHNORM_DROPOUT, TOKEN_MEAN, UNEQUAL_MEANS, SHORT_WINDOW)
