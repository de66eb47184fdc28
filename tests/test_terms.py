"""Loss terms with their own denominators give the big batch's update (float64).

Each case (``terms_cases``) trains a copy of one model with truebatch at
micro-batch sizes 1, 2, 3 and the full batch, and a copy with the reference
written out there: the big batch's loss ``sum_t w_t * S_t / N_t`` on the whole
batch, one backward, the same optimizer. The gradients the optimizer
receives, the reported loss, each term's mean and count must agree.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import truebatch as tb
from dist_workers import launch_once
from models import record_grads
from terms_cases import (
    CASES,
    Batch,
    TinyCausalLM,
    case,
    kl_token,
    moe_batch,
    ppo_token_loss,
    rl_batch,
    seeded,
    switch_fractions,
)
from terms_workers import LAYOUT, SCENARIOS, run_scenario, window_batch
from truebatch.compare import max_relative_difference

TOL = 1e-12
WINDOW = 7  # samples per window: uneven splits at 2 and 3


def reference_step(name: str, model: nn.Module, batch: Batch, **clip: float):
    """The big batch's step, written out: loss on the whole batch, backward, clip, step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    holder = [switch_fractions(model, batch)] if name == "moe_batch" else None
    loss, means, counts = case(name, holder).reference(model, batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = nn.utils.clip_grad_norm_(model.parameters(), clip.get("max_grad_norm", math.inf))
    clipped = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    return loss.item(), means, counts, grads, clipped, float(norm)


def truebatch_step(name: str, model: nn.Module, batch: Batch, **options) -> tuple:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = record_grads(model, optimizer)
    holder = [switch_fractions(model, batch)] if name == "moe_batch" else None
    this = case(name, holder)
    result = tb.Accumulator(model, optimizer, **options).step(batch, this.loss_fn, this.count)
    return result, seen


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("micro_batch_size", [1, 2, 3, None])
def test_terms_give_the_big_batch_update(name: str, micro_batch_size: int | None) -> None:
    this = case(name)
    model = seeded(this.model)
    twin = copy.deepcopy(model)
    batch = this.batch(WINDOW, 1)
    loss, means, counts, grads, _, norm = reference_step(name, twin, batch)
    result, seen = truebatch_step(name, model, batch, micro_batch_size=micro_batch_size)
    assert result.stepped and result.skip_reason is None
    assert max_relative_difference(seen[0], grads) <= TOL
    assert max_relative_difference(list(model.parameters()), list(twin.parameters())) <= TOL
    assert result.loss == pytest.approx(loss, rel=TOL)
    assert result.grad_norm == pytest.approx(norm, rel=TOL)
    assert result.terms is not None and result.counts is not None
    assert set(result.terms) == set(means)
    for term, mean in means.items():
        assert result.terms[term] == pytest.approx(mean.item(), rel=TOL)
        assert result.counts[term] == int(counts[term])
    assert result.count == sum(result.counts.values())


@pytest.mark.parametrize("name", ["policy_kl", "moe_sequence"])
def test_terms_split_over_many_micro_batches_of_a_window(name: str) -> None:
    """step_window over pieces of different sizes (as a loader gives them) is the big batch."""
    this = case(name)
    model = seeded(this.model)
    twin = copy.deepcopy(model)
    batch = this.batch(WINDOW, 2)
    pieces = [{k: v[a:b] for k, v in batch.items()} for a, b in [(0, 3), (3, 4), (4, 7)]]
    _, _, _, grads, _, _ = reference_step(name, twin, batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = record_grads(model, optimizer)
    tb.Accumulator(model, optimizer, micro_batch_size=2).step_window(
        pieces, this.loss_fn, this.count
    )
    assert max_relative_difference(seen[0], grads) <= TOL


@settings(max_examples=15, deadline=None)
# Every token masked: no item in either term (counted on the device, N is 0 only after
# the passes).
@example(pieces=[1], micro_batch_size=None, weights=(0.0, 0.0), seed=27)
@given(
    pieces=st.lists(st.integers(0, 4), min_size=1, max_size=4).filter(any),
    micro_batch_size=st.one_of(st.none(), st.integers(1, 4)),
    weights=st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
    seed=st.integers(0, 1000),
)
def test_any_split_and_weights_give_the_big_batch_gradient(
    pieces: list[int], micro_batch_size: int | None, weights: tuple[float, float], seed: int
) -> None:
    """Windows given as pieces (some empty) of a drawn batch, split again by a drawn size,
    with drawn term weights: the gradient of sum_t w_t * S_t / N_t on the whole batch."""
    model = seeded(TinyCausalLM)
    twin = copy.deepcopy(model)
    batch = rl_batch(sum(pieces), seed)
    m = batch["mask"]
    rows = m.sum(-1) > 0
    policy_weight, kl_weight = weights
    reference = policy_weight * (ppo_token_loss(twin, batch) * m).sum() / m.sum()
    if rows.any():
        reference = reference + kl_weight * (kl_token(twin, batch) * m).sum() / rows.sum()
    reference.backward()
    this = case("policy_kl")
    count = {
        "policy": tb.term(this.count["policy"], weight=policy_weight),
        "kl": tb.term(this.count["kl"].count, weight=kl_weight),
    }
    ends = [sum(pieces[: i + 1]) for i in range(len(pieces))]
    window = [
        {k: v[end - n : end] for k, v in batch.items()} for n, end in zip(pieces, ends, strict=True)
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = tb.Accumulator(model, optimizer, micro_batch_size=micro_batch_size)
    totals = acc.accumulate(window, this.loss_fn, count)
    assert totals.term_counts == {"policy": float(m.sum()), "kl": float(rows.sum())}
    if m.sum() == 0:
        assert totals.count == 0 and all(p.grad is None for p in model.parameters())
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in twin.parameters()]
    assert max_relative_difference([p.grad for p in model.parameters()], grads) <= TOL


def test_terms_with_clipping_grad_scaler_and_auto() -> None:
    this = case("policy_kl")
    batch = this.batch(WINDOW, 3)
    model = seeded(this.model)
    twin = copy.deepcopy(model)
    _, _, _, _, clipped, norm = reference_step("policy_kl", twin, batch, max_grad_norm=0.05)
    assert norm > 0.05  # the clip acts
    for options in (
        {"micro_batch_size": 2, "max_grad_norm": 0.05},
        {"micro_batch_size": 3, "max_grad_norm": 0.05, "scaler": torch.amp.GradScaler("cpu")},
        {"micro_batch_size": "auto", "max_grad_norm": 0.05},
    ):
        copy_ = copy.deepcopy(model)
        optimizer = torch.optim.SGD(copy_.parameters(), lr=0.1)
        seen = record_grads(copy_, optimizer)
        result = tb.Accumulator(copy_, optimizer, **options).step(batch, this.loss_fn, this.count)
        assert result.stepped, options
        assert result.grad_norm == pytest.approx(norm, rel=TOL), options
        # the scaler's unscale and the clip happen before the step-pre hook sees the gradient
        assert max_relative_difference(seen[0], clipped) <= TOL, options


def test_a_term_without_items_contributes_nothing() -> None:
    """All responses empty: the KL term's N is 0, its mean nan; the policy term alone steps."""
    this = case("policy_kl")
    batch = rl_batch(WINDOW, 4)
    model = seeded(this.model)
    twin = copy.deepcopy(model)

    def loss_fn(model: nn.Module, mb: Batch) -> dict[str, torch.Tensor]:
        terms = this.loss_fn(model, mb)
        return {"policy": terms["policy"], "kl": terms["kl"] * 0.0}

    count = {"policy": this.count["policy"], "kl": tb.term(lambda mb: 0, weight=0.1)}
    result = tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1)).step(
        batch, loss_fn, count
    )
    m = batch["mask"]
    reference = (ppo_token_loss(twin, batch) * m).sum() / m.sum()
    reference.backward()
    torch.optim.SGD(twin.parameters(), lr=0.1).step()
    assert result.stepped
    assert result.loss == pytest.approx(reference.item(), rel=TOL)
    assert result.terms is not None and math.isnan(result.terms["kl"])
    assert result.counts == {"policy": int(m.sum()), "kl": 0}
    assert max_relative_difference(list(model.parameters()), list(twin.parameters())) <= TOL


def test_no_term_with_items_does_not_step() -> None:
    model = seeded(case("moe_sequence").model)
    before = [p.detach().clone() for p in model.parameters()]

    def loss_fn(model: nn.Module, mb: Batch) -> dict[str, torch.Tensor]:
        y, _ = model(mb["x"])
        return {"a": y.sum() * 0.0, "b": y.sum() * 0.0}

    result = tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1)).step(
        moe_batch(4, 0), loss_fn, {"a": lambda mb: 0, "b": lambda mb: 0}
    )
    assert not result.stepped
    assert result.skip_reason == "no loss term has items in the window (every N_t == 0)"
    assert math.isnan(result.loss) and result.counts == {"a": 0, "b": 0}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_single_loss_reports_no_terms() -> None:
    model = seeded(case("moe_sequence").model)
    result = tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1)).step(
        moe_batch(4, 0), lambda m, mb: m(mb["x"])[0].sum()
    )
    assert result.terms is None and result.counts is None and result.count == 4


def _terms(model: nn.Module, mb: Batch) -> dict[str, torch.Tensor]:
    y, _ = model(mb["x"])
    return {"a": y.sum(), "b": (y**2).sum()}


BAD = {
    "keys differ": (_terms, {"a": None, "c": None}, KeyError, "`loss_fn` returned the terms"),
    "term not 0-dim": (
        lambda m, mb: {"a": m(mb["x"])[0], "b": m(mb["x"])[0].sum()},
        {"a": None, "b": None},
        TypeError,
        "`loss_fn['a']` returned a tensor of shape (2, 6)",
    ),
    "term returns a count": (
        lambda m, mb: {"a": (m(mb["x"])[0].sum(), 3), "b": m(mb["x"])[0].sum()},
        {"a": None, "b": None},
        TypeError,
        "`loss_fn['a']` returned a (loss_sum, count) pair",
    ),
    "mapping without counts": (_terms, None, TypeError, "`loss_fn` returned a mapping of terms"),
    "counts without mapping": (
        lambda m, mb: m(mb["x"])[0].sum(),
        {"a": None},
        TypeError,
        "`loss_fn` returned Tensor; expected a mapping of term sums",
    ),
    "empty counts": (_terms, {}, ValueError, "`count` got an empty mapping"),
    "bad counter": (_terms, {"a": None, "b": 3}, TypeError, "`count['b']` got int"),
    "key not a string": (_terms, {"a": None, 1: None}, TypeError, "`count` got the key 1"),
}


@pytest.mark.parametrize("bad", BAD.values(), ids=list(BAD))
def test_bad_terms_are_refused_before_anything_changes(bad: tuple) -> None:
    loss_fn, count, error, message = bad
    model = seeded(case("moe_sequence").model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    acc = tb.Accumulator(model, optimizer, micro_batch_size=2)
    with pytest.raises(error) as raised:
        acc.step(moe_batch(4, 0), loss_fn, count)
    assert message in str(raised.value)
    assert "Fix:" in str(raised.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.state_dict()["state"] == {}


@pytest.mark.parametrize("weight", [math.nan, math.inf, "0.1", True])
def test_term_refuses_a_weight_that_is_not_a_finite_number(weight: object) -> None:
    with pytest.raises(ValueError, match="`weight` got"):
        tb.term(tb.count_samples, weight=weight)  # type: ignore[arg-type]


@pytest.mark.parametrize("constant", [0, -1.0, math.inf, "8"])
def test_dr_grpo_refuses_a_constant_that_is_not_positive(constant: object) -> None:
    with pytest.raises(ValueError, match="`constant` got"):
        tb.reductions.seq_mean_token_sum_norm(constant)  # type: ignore[arg-type]


def test_reductions_differ_where_the_split_matters() -> None:
    """The three presets are different losses on the same data (else the tests above could
    not tell them apart), and the per-micro-batch mean of one drifts from its big-batch value."""
    batch = rl_batch(WINDOW, 5)
    model = seeded(case("token_mean").model)
    values = {}
    for name in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        values[name] = case(name).reference(model, batch)[0].item()
    assert len({round(v, 9) for v in values.values()}) == 3
    reduction = tb.reductions.seq_mean_token_mean("mask")
    halves = [{k: v[a:b] for k, v in batch.items()} for a, b in [(0, 2), (2, WINDOW)]]
    naive = sum(
        (reduction.sum(ppo_token_loss(model, h), h["mask"]) / reduction(h)).item() for h in halves
    ) / len(halves)
    assert abs(naive - values["seq_mean_token_mean"]) > 1e-3


# ------------------------------------------------------------- two gloo ranks


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """What each rank saved per scenario (``terms_workers``), from one two-process run
    per session."""
    return launch_once(tmp_path_factory, "terms-runs", SCENARIOS, run_scenario)


@pytest.mark.processes
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_terms_on_two_ranks_with_uneven_data(distributed_runs: dict, scenario: str) -> None:
    """Every rank ends each window with the parameters of one process stepping on the
    window's global batch, and reports the global batch's loss, term means and counts."""
    name, *_ = SCENARIOS[scenario]
    model = seeded(case(name).model)
    for window in range(len(LAYOUT)):
        batch = window_batch(name, window)
        loss, means, counts, _, _, _ = reference_step(name, model, batch)
        for rank, record in enumerate(distributed_runs[scenario]):
            where = f"window {window}, rank {rank}"
            params = record["params"][window]
            assert max_relative_difference(params, list(model.parameters())) <= TOL, where
            result = record["results"][window]
            # every term's count in the window's one exchange; the loss sums in one all_reduce
            gathers = 2 if scenario.endswith("-auto") else 1  # "auto": the out-of-memory table
            expected = {"all_gather": gathers, "all_reduce": 1}
            assert record["collectives"][window] == expected, where
            assert result["loss"] == pytest.approx(loss, rel=TOL), where
            for term, mean in means.items():
                assert result["terms"][term] == pytest.approx(mean.item(), rel=TOL), where
                assert result["counts"][term] == int(counts[term]), where
        model.zero_grad(set_to_none=True)


def test_terms_overhead_benchmark_prints_its_ratios() -> None:
    """A smoke run of benchmarks/terms_overhead.py (it asserts nothing about speed)."""
    from scripts import BENCHMARKS, run_script

    out = run_script(BENCHMARKS / "terms_overhead.py", "--quick")
    rows = re.findall(
        r"^(MLP|CNN)\s+4\s+[\d.]+ ms\s+[\d.]+ ms\s+[\d.]+ ms\s+[\d.]+\s+[\d.]+$", out, re.M
    )
    assert rows == ["MLP", "CNN"], out


def test_check_judges_a_loss_with_terms_as_a_whole() -> None:
    """tb.check takes the count mapping: the terms as returned are equivalent; a term that
    returns a per-micro-batch mean instead of a sum makes the total loss non-additive."""
    this = case("policy_kl")
    model = seeded(this.model)
    batch = this.batch(WINDOW, 1)
    assert tb.check(model, this.loss_fn, batch, count=this.count).equivalent

    def mean_kl(model: nn.Module, mb: Batch) -> dict[str, torch.Tensor]:
        terms = this.loss_fn(model, mb)
        terms["kl"] = (kl_token(model, mb) * mb["mask"]).sum(-1).mean()
        return terms

    report = tb.check(model, mean_kl, batch, count=this.count)
    assert not report.equivalent
    assert "loss_not_additive" in [finding.kind for finding in report.findings]
