"""tb.check tells a loss that compares samples with each other (fixed by step_cached)
from a mean loss (fixed by returning the sum) and from mixing inside the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import truebatch as tb


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()


X = torch.randn(12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def in_batch_negatives(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each sample's embedding against every other sample's (a contrastive sum)."""
    z = F.normalize(m(x), dim=-1)
    return F.cross_entropy(z @ z.T.flip(0) * 5, torch.arange(len(z)), reduction="sum")


def mean_loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x).pow(2).sum(-1).mean()


def kinds(report: tb.Report) -> dict[str, str]:
    return {f.module: f.kind for f in report.findings}


def test_a_contrastive_loss_is_found_and_its_fix_is_step_cached() -> None:
    report = tb.check(model(), in_batch_negatives, X, micro_batch_sizes=[4])
    assert kinds(report) == {"loss_fn": "loss_mixes_samples"}, report
    (finding,) = report.findings
    assert "step_cached" in finding.fix


def test_a_mean_loss_is_not_taken_for_mixing() -> None:
    report = tb.check(model(), mean_loss, X, micro_batch_sizes=[4, 5])
    assert kinds(report) == {"loss_fn": "loss_not_additive"}, report
    assert "step_cached" not in report.findings[0].fix


def test_a_mean_loss_with_returned_counts_is_not_taken_for_mixing() -> None:
    """Items are the counts loss_fn returns: the weights of the weighted mean."""

    def loss(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return mean_loss(m, x), 2 * len(x)

    report = tb.check(model(), loss, X, micro_batch_sizes=[5])
    assert kinds(report) == {"loss_fn": "loss_not_additive"}, report
