"""Token budgets and packed sequences (issue 24), float64 against written-out references.

- ``tb.token_budget_sizes`` / ``tb.split(batch, max_tokens=T)``: consecutive
  micro-batches of at most T tokens, greedy, in order; a sample longer than T
  is named.
- Token-budget micro-batches through ``Accumulator.step_window`` give the big
  batch's gradient, for several budgets (one sample per micro-batch included).
- ``tb.count_tokens(position_ids=... | cu_seqlens=...)`` counts no label across
  a document boundary, and packing the same documents differently (with a
  block-diagonal causal mask) gives the same window gradient as one document
  per padded row.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import token_data
import truebatch as tb
from models import PAD_ID, VOCAB, GRULanguageModel, lm_loss, seeded
from token_data import (
    DocumentAttentionLM,
    documents,
    pack,
    packed_loss,
    variable_length_batch,
)
from truebatch import _context
from truebatch.compare import TOLERANCES

TOL = TOLERANCES[torch.float64]


# ------------------------------------------------------------------ the planner


@given(
    st.lists(st.integers(0, 20), max_size=30),
    st.integers(20, 60),
    st.booleans(),
)
def test_token_budget_sizes_are_greedy_consecutive_and_within_budget(
    lengths: list[int], max_tokens: int, padded: bool
) -> None:
    """Written out: cost(group) <= T; adding the next sample would exceed T."""

    def cost(group: list[int]) -> int:
        return len(group) * max(group, default=0) if padded else sum(group)

    sizes = tb.token_budget_sizes(lengths, max_tokens, padded=padded)
    assert sum(sizes) == len(lengths) and all(n > 0 for n in sizes)
    start = 0
    for n in sizes:
        group = lengths[start : start + n]
        assert cost(group) <= max_tokens
        if start + n < len(lengths):
            assert cost([*group, lengths[start + n]]) > max_tokens
        start += n


def test_a_sample_longer_than_the_budget_is_named() -> None:
    with pytest.raises(ValueError, match=r"`max_tokens` got 8; .* sample 2 has 9\. Fix"):
        tb.token_budget_sizes([3, 5, 9, 1], 8)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="sample 1 has 3"):
        tb.split({"attention_mask": mask}, max_tokens=2)


def test_lengths_may_be_a_tensor_and_not_negative() -> None:
    assert tb.token_budget_sizes(torch.tensor([3, 5, 2]), 8) == [2, 1]
    with pytest.raises(ValueError, match=r"`lengths` got negative lengths at samples \[1\]"):
        tb.token_budget_sizes([3, -5, 2], 8)


def test_count_tokens_reads_a_namedtuple_field() -> None:
    from collections import namedtuple

    Batch = namedtuple("Batch", ["input_ids", "labels"])
    labels = torch.tensor([[1, 2, -100], [3, 4, 5]])
    assert int(tb.count_tokens()(Batch(labels, labels))) == 3


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_bad_budget(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"`max_tokens` got .*; expected a positive int"):
        tb.token_budget_sizes([1, 2], bad)


def test_split_by_tokens_reads_the_attention_mask_and_keeps_order() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    batch = {
        "input_ids": torch.arange(20).reshape(5, 4),
        "attention_mask": mask,
        "id": list("abcde"),
    }
    parts = tb.split(batch, max_tokens=4)
    assert [p["id"] for p in parts] == [["a", "b"], ["c"], ["d", "e"]]
    assert [int(p["attention_mask"].sum()) for p in parts] == [4, 2, 4]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert tb.split(batch, max_tokens=100) == [batch]


def test_split_by_tokens_with_a_counter_function() -> None:
    batch = (torch.zeros(4, 9), torch.tensor([9, 2, 3, 4]))
    parts = tb.split(batch, max_tokens=9, tokens=lambda b: b[1])
    assert [p[1].tolist() for p in parts] == [[9], [2, 3, 4]]


def test_split_by_tokens_errors() -> None:
    x = torch.zeros(3, 2)
    with pytest.raises(KeyError, match="`tokens` got 'attention_mask', which the micro-batch"):
        tb.split({"x": x}, max_tokens=4)
    with pytest.raises(ValueError, match="expected one non-negative integer per sample"):
        tb.split({"x": x}, max_tokens=4, tokens=lambda b: [1, 2])
    with pytest.raises(ValueError, match="expected one non-negative integer per sample"):
        tb.split({"x": x}, max_tokens=4, tokens=lambda b: [1, -2, 1])
    with pytest.raises(ValueError, match="`micro_batch_size` got 2 and `max_tokens` 4"):
        tb.split({"x": x}, 2, max_tokens=4)
    with pytest.raises(TypeError, match="`tokens` got int"):
        tb.split({"x": x}, max_tokens=4, tokens=3)


# ------------------------------------------------- token budgets are exact


def window_gradient(model: nn.Module, micro_batches: list[Any], loss_fn: Any, count: Any) -> list:
    """The gradient truebatch hands the optimizer for this window."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[list[torch.Tensor]] = []
    optimizer.register_step_pre_hook(
        lambda *_: seen.append([p.grad.clone() for p in model.parameters()])
    )
    result = tb.Accumulator(model, optimizer).step_window(micro_batches, loss_fn, count=count)
    assert result.stepped
    return seen[0]


def big_batch_gradient(model: nn.Module, loss_mean: Any) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_mean(model).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("max_tokens", [12, 17, 30, 64, 1000])
def test_token_budget_micro_batches_give_the_big_batch_gradient(max_tokens: int) -> None:
    batch = variable_length_batch(16, seed=4, shortest=2, longest=12)
    micro_batches = tb.split(batch, max_tokens=max_tokens)
    tokens = [int(mb["attention_mask"].sum()) for mb in micro_batches]
    assert max(tokens) <= max_tokens and sum(tokens) == int(batch["attention_mask"].sum())
    assert (len(micro_batches) > 1) == (max_tokens < sum(tokens))
    model = seeded(GRULanguageModel)
    reference = big_batch_gradient(copy.deepcopy(model), lambda m: lm_loss(m, batch, "mean"))

    ours = window_gradient(model, micro_batches, lm_loss, tb.count_tokens())
    assert tb.max_relative_difference(ours, reference) <= TOL


def test_a_budget_holding_one_sample_per_micro_batch() -> None:
    """Lengths in [7, 12] and T = 12: no two samples fit together."""
    batch = variable_length_batch(9, seed=5, shortest=7, longest=12)
    micro_batches = tb.split(batch, max_tokens=12)
    assert [tb.batch_size(mb) for mb in micro_batches] == [1] * 9
    model = seeded(GRULanguageModel)
    reference = big_batch_gradient(copy.deepcopy(model), lambda m: lm_loss(m, batch, "mean"))
    ours = window_gradient(model, micro_batches, lm_loss, tb.count_tokens())
    assert tb.max_relative_difference(ours, reference) <= TOL


def test_token_budget_of_micro_batches_padded_to_their_own_length() -> None:
    """The usual pipeline: plan by lengths, collate each micro-batch to its longest."""
    g = torch.Generator().manual_seed(6)
    sequences = [
        torch.randint(1, VOCAB, (int(n),), generator=g)
        for n in torch.randint(2, 14, (20,), generator=g)
    ]

    def collate(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=PAD_ID)
        mask = ids != PAD_ID
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(~mask, -100)}

    sizes = tb.token_budget_sizes([len(s) for s in sequences], 40, padded=True)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    micro_batches = [collate(sequences[a : a + n]) for a, n in zip(starts, sizes, strict=True)]
    assert all(mb["input_ids"].numel() <= 40 for mb in micro_batches)
    full = collate(sequences)
    model = seeded(GRULanguageModel)
    reference = big_batch_gradient(copy.deepcopy(model), lambda m: lm_loss(m, full, "mean"))
    ours = window_gradient(model, micro_batches, lm_loss, tb.count_tokens())
    assert tb.max_relative_difference(ours, reference) <= TOL


# ------------------------------------------------------------------- packing


@pytest.mark.parametrize(
    ("batch", "counter", "expected"),
    [
        # two documents in a row: [5 6 7 | 1 2]; shift scores 6, 7 and 2.
        (
            {
                "labels": torch.tensor([[5, 6, 7, 1, 2]]),
                "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
            },
            tb.count_tokens(position_ids="position_ids"),
            3,
        ),
        # the same row without the markers scores 1 across the boundary.
        ({"labels": torch.tensor([[5, 6, 7, 1, 2]])}, tb.count_tokens(), 4),
        # aligned labels: the last token of each document predicts nothing across.
        (
            {
                "labels": torch.tensor([[6, 7, -100, 2, -100]]),
                "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
            },
            tb.count_tokens(shift=False, position_ids="position_ids"),
            3,
        ),
        (
            {
                "labels": torch.tensor([[6, 7, 9, 2, 4]]),
                "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
            },
            tb.count_tokens(shift=False, position_ids="position_ids"),
            4,
        ),
        # cu_seqlens over the flattened tokens: documents [0, 3), [3, 5), [5, 9).
        (
            {"labels": torch.arange(1, 10)[None], "cu_seqlens": [0, 3, 5, 9]},
            tb.count_tokens(cu_seqlens="cu_seqlens"),
            9 - 3,
        ),
        (
            {"labels": torch.arange(1, 10)[None], "cu_seqlens": torch.tensor([0, 3, 5, 9])},
            tb.count_tokens(cu_seqlens="cu_seqlens", ignore_index=2),
            9 - 3 - 1,
        ),
        # two packed rows with padding (-100) and a padded tail restarting positions.
        (
            {
                "labels": torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, -100, -100, -100]]),
                "position_ids": torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2]]),
            },
            tb.count_tokens(position_ids="position_ids"),
            1 + 2 + 2,
        ),
    ],
    ids=["positions", "no_markers", "aligned", "aligned_all", "cu_list", "cu_tensor", "rows"],
)
def test_count_tokens_of_packed_rows(batch: dict, counter: Any, expected: int) -> None:
    assert int(counter(batch)) == expected


def test_count_tokens_document_marker_errors() -> None:
    labels = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="expected one of them"):
        tb.count_tokens(position_ids="p", cu_seqlens="c")
    with pytest.raises(ValueError, match=r"`position_ids` got shape \(1, 2\)"):
        tb.count_tokens(position_ids="p")({"labels": labels, "p": torch.tensor([[0, 1]])})
    with pytest.raises(ValueError, match=r"`cu_seqlens` got \[0, 2\]; expected cumulative"):
        tb.count_tokens(cu_seqlens="c")({"labels": labels, "c": [0, 2]})
    with pytest.raises(KeyError, match="`position_ids` got 'position_ids'"):
        tb.count_tokens(position_ids="position_ids")({"labels": labels})


PACKINGS = {
    "two_rows_in_order": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
    "three_rows_shuffled": [[9, 0, 4], [2, 7, 1, 5], [3, 8, 6]],
    "pairs": [[0, 9], [1, 8], [2, 7], [3, 6], [4, 5]],
}


@pytest.mark.parametrize("micro_batch_size", [None, 1, 2])
@pytest.mark.parametrize("packing", PACKINGS.values(), ids=list(PACKINGS))
def test_packing_does_not_change_the_window_gradient(
    packing: list[list[int]], micro_batch_size: int | None
) -> None:
    """The same ten documents, one per padded row (the reference, its mean loss over
    scored tokens written out) or packed several per row with a block-diagonal causal
    mask, give the same window gradient."""
    docs = documents(seed=7)
    model = seeded(DocumentAttentionLM)
    unpacked = pack(docs, [[d] for d in range(len(docs))], max(len(d) for d in docs))
    n_scored = sum(len(d) - 1 for d in docs)
    reference = big_batch_gradient(
        copy.deepcopy(model), lambda m: packed_loss(m, unpacked) / n_scored
    )

    width = max(sum(len(docs[d]) for d in row) for row in packing)
    packed = pack(docs, packing, width)
    counter = tb.count_tokens(position_ids="position_ids")
    assert int(counter(packed)) == n_scored
    ours = window_gradient(model, tb.split(packed, micro_batch_size), packed_loss, counter)
    assert tb.max_relative_difference(ours, reference) <= TOL


def test_cu_seqlens_rows_count_like_position_ids() -> None:
    """One flattened row per micro-batch with ``cu_seqlens`` as a list (shared by the
    splitter): the same count and window gradient as the position ids say."""
    docs = documents(seed=8)
    model = seeded(DocumentAttentionLM)
    micro_batches = []
    for group in ([0, 1, 2], [3, 4, 5, 6], [7, 8, 9]):
        row = pack(docs, [group], sum(len(docs[d]) for d in group))
        offsets = [0]
        for d in group:
            offsets.append(offsets[-1] + len(docs[d]))
        row["cu_seqlens"] = offsets
        micro_batches.append(row)
    by_offsets = tb.count_tokens(cu_seqlens="cu_seqlens")
    by_positions = tb.count_tokens(position_ids="position_ids")
    assert [int(by_offsets(mb)) for mb in micro_batches] == [
        int(by_positions(mb)) for mb in micro_batches
    ]
    unpacked = pack(docs, [[d] for d in range(len(docs))], max(len(d) for d in docs))
    n_scored = sum(len(d) - 1 for d in docs)
    reference = big_batch_gradient(
        copy.deepcopy(model), lambda m: packed_loss(m, unpacked) / n_scored
    )
    ours = window_gradient(model, micro_batches, packed_loss, by_offsets)
    assert tb.max_relative_difference(ours, reference) <= TOL


def test_split_window_is_the_accumulators_plan() -> None:
    """By samples, by tokens, or as given; each micro-batch with its sample count."""
    from truebatch.batching import split_window

    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    pieces = [{"attention_mask": mask[:3]}, {"attention_mask": mask[3:]}]
    plan = split_window(pieces, [3, 1], max_tokens=3)
    assert [(int(mb["attention_mask"].sum()), n) for mb, n in plan] == [(3, 2), (3, 1), (2, 1)]
    assert [n for _, n in split_window(pieces, [3, 1], micro_batch_size=2)] == [2, 1, 1]
    assert [n for _, n in split_window(pieces, [3, 1])] == [3, 1]
    with pytest.raises(ValueError, match="expected one of them"):
        split_window(pieces, [3, 1], micro_batch_size=2, max_tokens=3)


@pytest.mark.parametrize("max_tokens", [12, 30])
def test_the_accumulator_cuts_each_window_by_a_token_budget(max_tokens: int) -> None:
    """``Accumulator(max_tokens=T)``: every pass holds at most T tokens; the step is the
    big batch's."""
    batch = variable_length_batch(16, seed=6, shortest=2, longest=12)
    model = seeded(GRULanguageModel)
    reference = big_batch_gradient(copy.deepcopy(model), lambda m: lm_loss(m, batch, "mean"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[list[torch.Tensor]] = []
    optimizer.register_step_pre_hook(
        lambda *_: seen.append([p.grad.clone() for p in model.parameters()])
    )
    passes: list[int] = []

    def loss_fn(model: nn.Module, micro_batch: dict) -> torch.Tensor:
        passes.append(int(micro_batch["attention_mask"].sum()))
        return lm_loss(model, micro_batch)

    acc = tb.Accumulator(model, optimizer, max_tokens=max_tokens)
    result = acc.step(batch, loss_fn, count=tb.count_tokens())
    assert result.micro_batches == len(passes) > 1 and max(passes) <= max_tokens
    assert sum(passes) == int(batch["attention_mask"].sum())
    assert tb.max_relative_difference(seen[0], reference) <= TOL


def test_a_token_budget_is_refused_beside_a_sample_size_or_ghost_batchnorm() -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="expected one of them"):
        tb.Accumulator(model, optimizer, micro_batch_size=4, max_tokens=10)
    with pytest.raises(ValueError, match="`max_tokens` got 0"):
        tb.Accumulator(model, optimizer, max_tokens=0)
    ghost = nn.Sequential(nn.Linear(3, 2), tb.nn.GhostBatchNorm1d(2, ghost_batch_size=4))
    with pytest.raises(ValueError, match="multiples of 4 samples"):
        tb.Accumulator(ghost, torch.optim.SGD(ghost.parameters(), lr=0.1), max_tokens=10)


def test_token_budget_benchmark_quick_prints_its_ratios() -> None:
    """benchmarks/token_budget.py runs end to end (no assertion on speed)."""
    import re

    from scripts import BENCHMARKS, run_script

    out = run_script(BENCHMARKS / "token_budget.py", "--quick")
    assert re.search(r"^lengths: 64 sequences, tokens: mean \d+, p50 \d+", out, re.M), out
    cuts = re.findall(
        r"^  (fixed|budget|sorted fixed|sorted budget) +\d+ micro-batches, "
        r"largest +(\d+) padded tokens",
        out,
        re.M,
    )
    assert [name for name, _ in cuts] == ["fixed", "budget", "sorted fixed", "sorted budget"], out
    assert all(int(largest) <= 4 * 256 for _, largest in cuts), out
    difference = re.search(r"largest difference from fixed: (\S+)$", out, re.M)
    assert difference and float(difference.group(1)) <= 1e-5, out
    verdict = re.search(
        r"^sorted budget / fixed += (\d\.\d{3})  \(<= 0\.8: (PASS|FAIL)\)$", out, re.M
    )
    assert verdict and (verdict.group(2) == "PASS") == (float(verdict.group(1)) <= 0.8), out


def test_lm_memory_benchmark_quick_reports_every_configuration() -> None:
    """benchmarks/lm_memory.py runs end to end and prints each configuration's peak
    (no assertion on the sizes: they are measured)."""
    import re

    from scripts import BENCHMARKS, run_script

    out = run_script(BENCHMARKS / "lm_memory.py", "--quick", timeout=600)
    rows = re.findall(
        r"^  (.+?) +(\d+\.\d) MiB +(\d+) micro-batches, largest +(\d+) padded tokens", out, re.M
    )
    assert [name for name, *_ in rows] == [
        "whole",
        "fixed",
        "budget",
        "fixed + checkpointing",
        "budget + checkpointing",
        "budget 4T + checkpointing",
    ], out
    largest = {name: int(tokens) for name, _, _, tokens in rows}
    assert largest["fixed"] == 4 * 256 >= largest["budget"], out  # the window's worst case
    assert re.search(r"^budget \+ checkpointing / budget += \d+\.\d\d$", out, re.M), out


# ------------------------------------------------- max_tokens="auto"


def auto_attempts(lengths: list[int], limit: int) -> list[tuple[int, list[int]]]:
    """Written out: the budgets ``max_tokens="auto"`` tries on one piece, each with the
    tokens of the passes it runs: the whole piece first; while a micro-batch holds more
    than ``limit`` tokens (its pass fails, the later ones do not run), the budget
    becomes max(longest sample, failed // 2); at the longest sample it gives up."""
    budget, longest, attempts = sum(lengths), max(lengths), []
    while True:
        sizes = tb.token_budget_sizes(lengths, budget)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        passes = [sum(lengths[a : a + n]) for a, n in zip(starts, sizes, strict=True)]
        over = [i for i, tokens in enumerate(passes) if tokens > limit]
        attempts.append((budget, passes[: over[0] + 1] if over else passes))
        if not over or budget <= longest:
            return attempts
        budget = max(longest, budget // 2)


def roomy(model: token_data.TokenRoom) -> token_data.TokenRoom:
    """A copy of ``model`` with room for any batch (the big-batch reference)."""
    copied = copy.deepcopy(model)
    copied.limit = 10**9
    return copied


def step_gradients(model: nn.Module, acc: tb.Accumulator) -> list[list[torch.Tensor]]:
    """Every gradient ``acc`` hands its optimizer, from now on."""
    seen: list[list[torch.Tensor]] = []
    acc.optimizer.register_step_pre_hook(
        lambda *_: seen.append([p.grad.clone() for p in model.parameters()])
    )
    return seen


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize(("limit", "retries"), [(1000, 0), (60, 1), (30, 2), (25, 3), (12, 4)])
def test_auto_token_budget_halves_until_it_fits_and_is_the_big_batch(
    where: str, limit: int, retries: int
) -> None:
    """Out-of-memory above ``limit`` tokens per pass: the passes are those written out by
    :func:`auto_attempts`, the gradient is the big batch's (float64), and the update is
    bitwise that of ``max_tokens=<final budget>`` from the start."""
    batch = variable_length_batch(16, seed=4, shortest=2, longest=12)
    lengths = batch["attention_mask"].sum(1).tolist()
    attempts = auto_attempts(lengths, limit)
    assert len(attempts) == retries + 1  # 0 to 4 retries; 12 is the longest sample: the floor
    final = attempts[-1][0]
    model = seeded(lambda: token_data.TokenRoom(limit, where))
    reference = big_batch_gradient(roomy(model), lambda m: lm_loss(m, batch, "mean"))
    fixed_model = copy.deepcopy(model)
    fixed_model.limit = final
    acc = tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), max_tokens="auto")
    fixed = tb.Accumulator(
        fixed_model, torch.optim.SGD(fixed_model.parameters(), lr=0.1), max_tokens=final
    )
    ours, theirs = step_gradients(model, acc), step_gradients(fixed_model, fixed)
    model.seen.clear()

    result = acc.step(batch, lm_loss, count=tb.count_tokens())
    fixed.step(batch, lm_loss, count=tb.count_tokens())

    assert model.seen == [tokens for _, passes in attempts for tokens in passes]
    assert result.micro_batches == len(attempts[-1][1])
    assert acc.state_dict()["auto_max_tokens"] == (final if retries else None)
    assert tb.max_relative_difference(ours[0], reference) <= TOL
    assert all(torch.equal(a, b) for a, b in zip(ours[0], theirs[0], strict=True))
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fixed_model.parameters(), strict=True)
    )
    assert all(p.grad is None for p in model.parameters())


@given(
    lengths=st.lists(st.integers(2, 12), min_size=1, max_size=12),
    limit=st.integers(1, 60),
    where=st.sampled_from(["forward", "backward"]),
)
def test_auto_token_budget_any_lengths_and_room(lengths: list[int], limit: int, where: str) -> None:
    """Any lengths and room: the passes written out, then the big batch's gradient; or, when
    the longest sample alone does not fit, the error and nothing changed."""
    g = torch.Generator().manual_seed(len(lengths) * 100 + limit)
    width = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    ids = ids.masked_fill(~mask, PAD_ID)
    batch = {
        "input_ids": ids,
        "attention_mask": mask.long(),
        "labels": ids.masked_fill(~mask, -100),
    }
    attempts = auto_attempts(lengths, limit)
    model = seeded(lambda: token_data.TokenRoom(limit, where))
    before = [p.detach().clone() for p in model.parameters()]
    reference = big_batch_gradient(roomy(model), lambda m: lm_loss(m, batch, "mean"))
    acc = tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), max_tokens="auto")
    ours = step_gradients(model, acc)
    model.seen.clear()
    rng = torch.get_rng_state()

    if max(lengths) > limit:
        with pytest.raises(
            RuntimeError, match=rf"the longest sample alone \({max(lengths)} tokens\)"
        ):
            acc.step(batch, lm_loss, count=tb.count_tokens())
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
        assert torch.equal(torch.get_rng_state(), rng)
    else:
        acc.step(batch, lm_loss, count=tb.count_tokens())
        assert tb.max_relative_difference(ours[0], reference) <= TOL
    assert model.seen == [tokens for _, passes in attempts for tokens in passes]
    assert all(p.grad is None for p in model.parameters())


def test_the_auto_budget_is_remembered_and_a_longer_sample_raises_it_for_its_window() -> None:
    """Window 1 finds a budget; window 2 starts there; window 3 holds a sample longer
    than that budget and runs it alone; window 4 is back at the remembered budget. The
    budget is saved in ``state_dict`` and a new Accumulator loading it starts there."""
    short = [variable_length_batch(12, seed=s, shortest=2, longest=5) for s in (1, 2)]
    windows = [short[0], short[1], with_a_long_sample(short[1], 14), short[0]]
    lengths = [w["attention_mask"].sum(1).tolist() for w in windows]
    limit = 15
    first = auto_attempts(lengths[0], limit)
    remembered = first[-1][0]
    assert len(first) > 1 and remembered < 14 <= limit  # the case: a retry, then a longer sample
    model = seeded(lambda: token_data.TokenRoom(limit))
    acc = tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), max_tokens="auto")
    passes = []
    for window in windows:
        model.seen.clear()
        acc.step(window, lm_loss, count=tb.count_tokens())
        passes.append(list(model.seen))

    def cut(lengths: list[int], budget: int) -> list[int]:
        sizes = tb.token_budget_sizes(lengths, budget)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [sum(lengths[a : a + n]) for a, n in zip(starts, sizes, strict=True)]

    assert passes[0] == [t for _, p in first for t in p]
    assert passes[1] == cut(lengths[1], remembered)
    assert passes[2] == cut(lengths[2], 14)  # max(remembered, longest sample)
    assert passes[3] == cut(lengths[3], remembered)
    assert acc.state_dict()["auto_max_tokens"] == remembered
    assert acc.state_dict()["auto_micro_batch_size"] is None

    resumed_model = seeded(lambda: token_data.TokenRoom(limit))
    resumed = tb.Accumulator(
        resumed_model, torch.optim.SGD(resumed_model.parameters(), lr=0.1), max_tokens="auto"
    )
    resumed.load_state_dict(acc.state_dict())
    resumed.step(windows[1], lm_loss, count=tb.count_tokens())
    assert resumed_model.seen == cut(lengths[1], remembered)


def with_a_long_sample(batch: dict[str, torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
    """``batch`` with one more sample, in the middle, of ``tokens`` real tokens."""
    g = torch.Generator().manual_seed(tokens)
    width = max(batch["input_ids"].shape[1], tokens)
    long_ids = torch.randint(1, VOCAB, (1, width), generator=g)
    long_mask = (torch.arange(width) < tokens)[None].long()
    long_ids = long_ids.masked_fill(long_mask == 0, PAD_ID)

    def widen(t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)

    middle = batch["input_ids"].shape[0] // 2
    parts = {
        "input_ids": (widen(batch["input_ids"], PAD_ID), long_ids),
        "attention_mask": (widen(batch["attention_mask"], 0), long_mask),
        "labels": (widen(batch["labels"], -100), long_ids.masked_fill(long_mask == 0, -100)),
    }
    return {k: torch.cat([a[:middle], b, a[middle:]]) for k, (a, b) in parts.items()}


def test_a_longest_sample_that_does_not_fit_is_a_clear_error_that_leaves_no_trace() -> None:
    """After a window that stepped (momentum state exists), a window whose longest sample
    alone runs out of memory raises, its cause the out-of-memory error; parameters,
    optimizer state, RNG and gradients are as before, and the next window that fits
    gives what an Accumulator that never saw the failed window gives."""
    fits = variable_length_batch(10, seed=1, shortest=2, longest=6)
    hopeless = with_a_long_sample(fits, 15)
    model = seeded(lambda: token_data.TokenRoom(12))
    twin = copy.deepcopy(model)
    accs = [
        tb.Accumulator(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), max_tokens="auto")
        for m in (model, twin)
    ]
    for acc in accs:
        acc.step(fits, lm_loss, count=tb.count_tokens())
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [s["momentum_buffer"].clone() for s in accs[0].optimizer.state.values()]
    budget, rng = accs[0].state_dict()["auto_max_tokens"], torch.get_rng_state()

    with pytest.raises(
        RuntimeError,
        match=r"^`max_tokens` got 'auto'; expected a micro-batch that fits in memory, but the "
        r"longest sample alone \(15 tokens\) still runs out of memory\. Fix: truncate",
    ) as info:
        accs[0].step(hopeless, lm_loss, count=tb.count_tokens())

    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert all(
        torch.equal(s["momentum_buffer"], m)
        for s, m in zip(accs[0].optimizer.state.values(), momentum, strict=True)
    )
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert accs[0].state_dict()["auto_max_tokens"] == budget
    assert (
        budget == auto_attempts(fits["attention_mask"].sum(1).tolist(), 12)[-1][0]
    )  # one retry at least
    torch.set_rng_state(rng)
    for acc in accs:
        acc.step(fits, lm_loss, count=tb.count_tokens())
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True)
    )


def test_auto_token_budget_refusals() -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match="`max_tokens` got 'Auto'; expected a positive int, 'auto'"
    ):
        tb.Accumulator(model, optimizer, max_tokens="Auto")
    with pytest.raises(ValueError, match="expected one of them"):
        tb.Accumulator(model, optimizer, micro_batch_size="auto", max_tokens="auto")
    with pytest.raises(ValueError, match="`max_micro_batch_size` got 8"):
        tb.Accumulator(model, optimizer, max_tokens="auto", max_micro_batch_size=8)
    ghost = nn.Sequential(nn.Linear(3, 2), tb.nn.GhostBatchNorm1d(2, ghost_batch_size=4))
    with pytest.raises(ValueError, match="multiples of 4 samples"):
        tb.Accumulator(ghost, torch.optim.SGD(ghost.parameters(), lr=0.1), max_tokens="auto")


def test_auto_token_budget_is_refused_for_fsdp2(tmp_path: Any) -> None:
    """As for samples: FSDP2 gathers parameters inside forward, so an out-of-memory error
    on one rank cannot be shared without a hang."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        sharded = nn.Linear(2, 2)
        fully_shard(sharded)
        optimizer = torch.optim.SGD(sharded.parameters(), lr=0.1)
        with pytest.raises(
            ValueError,
            match=r"^`max_tokens` got 'auto' for an FSDP2 model; .* Fix: pass a fixed max_tokens\.",
        ):
            tb.Accumulator(sharded, optimizer, max_tokens="auto")
        assert tb.Accumulator(sharded, optimizer, max_tokens=64).max_tokens == 64
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------ two gloo ranks


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, list]]]:
    """What each of the two DDP ranks saved, per case of ``token_data.CASES``."""
    out_dir = tmp_path_factory.mktemp("token-ranks")
    token_data.launch(out_dir, timeout=240)
    return {
        name: [torch.load(out_dir / f"{name}-{rank}.pt") for rank in range(token_data.WORLD_SIZE)]
        for name in [*token_data.CASES, "stuck"]
    }


@pytest.mark.parametrize("name", list(token_data.CASES))
@pytest.mark.processes
def test_two_ranks_give_one_process_gradient_on_the_global_batch(
    ranks: dict[str, list[dict[str, list]]], name: str
) -> None:
    """Under DDP, token-budget micro-batches (uneven across ranks), packed rows,
    ``max_tokens="auto"`` with an out-of-memory error on one rank, and a transformer with
    split-invariant dropout under activation checkpointing (both reentrant modes): each
    window's gradient equals one process's on the global batch, at the same weights (the
    reference: the whole batch in one pass, not checkpointed, with the window's masks)."""
    case = token_data.CASES[name]
    for w in range(case.windows):
        batch, count = case.reference(w)
        model = case.plain(case.model())
        with torch.no_grad():
            for p, value in zip(model.parameters(), ranks[name][0]["before"][w], strict=True):
                p.copy_(value)
        n_items = int(count(batch))
        with _context.micro_batch(window=w, offset=0):
            expected = big_batch_gradient(model, lambda m, b=batch, n=n_items: case.loss(m, b) / n)
        for rank in range(token_data.WORLD_SIZE):
            assert not ranks[name][rank]["errors"]
            assert tb.max_relative_difference(ranks[name][rank]["seen"][w], expected) <= TOL


@pytest.mark.processes
def test_auto_token_budget_under_ddp_retries_every_rank_after_one_rank_runs_out(
    ranks: dict[str, list[dict[str, list]]],
) -> None:
    """Rank 1 runs out above 20 tokens per pass, rank 0 never: rank 1's attempts are
    those written out by :func:`auto_attempts`, and rank 0 retries with them, at
    max(its longest sample, rank 1's budget)."""
    shares = [token_data.rank_share(0, rank)[0] for rank in range(token_data.WORLD_SIZE)]
    lengths = [share["attention_mask"].sum(1).tolist() for share in shares]
    failing = auto_attempts(lengths[1], 20)
    assert len(failing) > 1 and sum(lengths[0]) > 20  # rank 0 alone would not retry
    budget = failing[-1][0]
    assert ranks["auto"][1]["budgets"][0] == budget
    assert ranks["auto"][0]["budgets"][0] == max(max(lengths[0]), budget)


@pytest.mark.processes
def test_a_longest_sample_that_fits_on_no_rank_raises_on_every_rank(
    ranks: dict[str, list[dict[str, list]]],
) -> None:
    """Rank 1's longest sample alone runs out of memory: both ranks raise the error (none
    waits for the other), and neither changed its parameters."""
    for record in ranks["stuck"]:
        assert len(record["errors"]) == 1, record["errors"]
        assert "still runs out of memory" in record["errors"][0]
        assert all(
            torch.equal(a, b) for a, b in zip(record["after"], record["before"][0], strict=True)
        )
    assert "the longest sample alone" in ranks["stuck"][1]["errors"][0]


# ------------------------------------------------------- per-document means


@pytest.mark.parametrize(
    ("batch", "counter", "expected"),
    [
        # rows: 3 scored labels, none (one token), none (ignored): one document.
        (
            {"labels": torch.tensor([[1, 2, 3, 4], [5, -100, -100, -100], [-100] * 4])},
            tb.count_documents(),
            1,
        ),
        ({"labels": torch.tensor([[1, 2], [5, -100]])}, tb.count_documents(shift=False), 2),
        # packed: [5 6 7 | 1 2 | pad], [8 | 9 1]: the single-token document scores nothing.
        (
            {
                "labels": torch.tensor([[5, 6, 7, 1, 2, -100], [8, 9, 1, -100, -100, -100]]),
                "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0], [0, 0, 1, 0, 1, 2]]),
            },
            tb.count_documents(position_ids="position_ids"),
            3,
        ),
        (
            {"labels": torch.arange(1, 10)[None], "cu_seqlens": [0, 1, 5, 9]},
            tb.count_documents(cu_seqlens="cu_seqlens"),
            2,
        ),
    ],
    ids=["rows", "rows_aligned", "packed", "cu_seqlens"],
)
def test_count_documents(batch: dict, counter: Any, expected: int) -> None:
    assert int(counter(batch)) == expected


def per_document_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum over documents of each one's mean next-token loss, written out: a
    document starts where the position ids restart at 0."""
    logits = model(batch["input_ids"], batch["position_ids"])[:, :-1]
    labels = batch["labels"].masked_fill(batch["position_ids"] == 0, -100)[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
    )
    document = (batch["position_ids"] == 0).flatten().cumsum(0).view(labels.shape[0], -1)
    document = document[:, 1:].flatten()
    scored = (labels != -100).flatten().to(losses.dtype)
    sums = losses.new_zeros(document.numel() + 1).index_add(0, document, losses * scored)
    counts = losses.new_zeros(document.numel() + 1).index_add(0, document, scored)
    present = counts > 0
    return (sums[present] / counts[present]).sum()


@pytest.mark.parametrize("packing", PACKINGS.values(), ids=list(PACKINGS))
def test_per_document_means_do_not_depend_on_packing(packing: list[list[int]]) -> None:
    """Reference: one document per padded row, each row's token mean, the mean over
    documents. Packed several per row, count_documents gives the same N and gradient."""
    docs = documents(seed=9)
    model = seeded(DocumentAttentionLM)
    unpacked = pack(docs, [[d] for d in range(len(docs))], max(len(d) for d in docs))

    def reference_loss(model: nn.Module) -> torch.Tensor:
        logits = model(unpacked["input_ids"], unpacked["position_ids"])[:, :-1]
        labels = unpacked["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        per_row = losses.sum(1) / (labels != -100).sum(1)
        return per_row.mean()

    reference = big_batch_gradient(copy.deepcopy(model), reference_loss)
    width = max(sum(len(docs[d]) for d in row) for row in packing)
    packed = pack(docs, packing, width)
    counter = tb.count_documents(position_ids="position_ids")
    assert int(counter(packed)) == len(docs)
    ours = window_gradient(model, tb.split(packed, 1), per_document_loss, counter)
    assert tb.max_relative_difference(ours, reference) <= TOL
