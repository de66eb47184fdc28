"""Assertions for users' test suites: ``tb.testing.assert_accumulation_equivalent``.

Put one in a pytest test next to the model, so that a change that breaks exact
accumulation (a new BatchNorm, a mean-reduced loss) fails the suite with the
checker's report as the message.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from truebatch.accumulator import LossFn
from truebatch.batching import Batch, Counter
from truebatch.check import Report, check

__all__ = ["assert_accumulation_equivalent"]


def assert_accumulation_equivalent(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    micro_batch_sizes: Iterable[int] | None = None,
    count: Counter | None = None,
    dtype: torch.dtype = torch.float64,
) -> Report:
    """Assert that accumulating ``batch`` in micro-batches gives the full batch's update.

    Runs :func:`truebatch.check` with the same arguments: every split's
    gradient must match the full batch's within 1e-12 (float64) or 1e-5
    (float32) relative per parameter tensor, with no finding.

    Returns:
        the :class:`~truebatch.check.Report` when the check passes.

    Raises:
        AssertionError: otherwise; its message is the printed report, which
            names each culprit module, its effect and its fix.
        TypeError, ValueError: the check cannot run (see :func:`truebatch.check`),
            e.g. ``count`` gives the batch 0 items: nothing would be compared,
            so the assertion refuses rather than passes.

    Examples:
        >>> tb.testing.assert_accumulation_equivalent(model, loss_fn, (x, y))
    """
    report = check(model, loss_fn, batch, micro_batch_sizes, count=count, dtype=dtype)
    if not report.equivalent:
        raise AssertionError(f"accumulation is not equivalent to the full batch\n\n{report}")
    return report
