"""Accumulator.step_cached: the exact big batch for losses that mix a window's samples.

Every exactness test compares, in float64, the gradient the optimizer steps on
with the big batch written out in ``contrastive.big_batch_gradient`` (the loss
on the whole window at once), at the contract's tolerance.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import truebatch as tb
from cached_workers import (
    GHOST_BATCH_SIZE,
    LAYOUTS,
    WORLD_SIZE,
    Scenario,
    launch,
    loss_of,
    model_of,
    rank_pieces,
)
from contrastive import (
    OBJECTIVES,
    batch,
    big_batch_gradient,
    build,
    clip_encode,
    clip_loss,
    concat,
    mnrl_loss,
    nt_xent_loss,
    views_encode,
)
from truebatch.compare import TOLERANCES

TOLERANCE = TOLERANCES[torch.float64]

pieces_and_size = st.tuples(
    st.lists(st.integers(1, 5), min_size=1, max_size=4),
    st.one_of(st.none(), st.integers(1, 4)),
)


def recording(model: nn.Module, *, lr: float = 0.1) -> tuple[tb.Accumulator, list]:
    """An SGD optimizer whose steps record the gradients they see."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    seen: list[list[torch.Tensor]] = []
    optimizer.register_step_pre_hook(
        lambda *_: seen.append(
            [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        )
    )
    return optimizer, seen


def pieces_of(sizes: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return [batch(n, seed=100 * seed + i) for i, n in enumerate(sizes)]


def micro_batches_of(pieces: list[Any], size: int | None) -> list[Any]:
    """The micro-batches the Accumulator runs: each piece split by ``size``."""
    return [mb for piece in pieces for mb in tb.split(piece, size)]


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.parametrize("dropout", ["none", "converted"])
@given(layout=pieces_and_size)
def test_same_gradient_as_the_big_batch(name: str, dropout: str, layout: Any) -> None:
    sizes, micro_batch_size = layout
    objective = OBJECTIVES[name]
    model = build(dropout=0.3 if dropout == "converted" else 0.0, converted=True)
    pieces = pieces_of(sizes)
    expected, expected_loss = big_batch_gradient(model, objective, concat(pieces))

    optimizer, seen = recording(model)
    acc = tb.Accumulator(model, optimizer, micro_batch_size=micro_batch_size)
    result = acc.step_cached(pieces, objective.encode, objective.loss(model))

    assert tb.max_relative_difference(seen[0], expected) <= TOLERANCE
    assert result.loss == pytest.approx(expected_loss, rel=1e-12)
    assert result.micro_batches == len(micro_batches_of(pieces, micro_batch_size))
    assert result.stepped and result.step == 1


def sample_tokens(micro_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Made-up token counts per sample, 1 to 3 (the features carry no mask)."""
    return micro_batch["label"] + 1


@pytest.mark.parametrize("max_tokens", [3, 5, 100])
def test_a_token_budget_cuts_the_micro_batches_and_keeps_the_big_batch(max_tokens: int) -> None:
    model = build()
    pieces = pieces_of([5, 3, 6])
    expected, _ = big_batch_gradient(model, OBJECTIVES["mnrl"], concat(pieces))
    optimizer, seen = recording(model)
    acc = tb.Accumulator(model, optimizer, max_tokens=max_tokens, tokens=sample_tokens)
    result = acc.step_cached(pieces, OBJECTIVES["mnrl"].encode, OBJECTIVES["mnrl"].loss(model))

    cut = [mb for p in pieces for mb in tb.split(p, max_tokens=max_tokens, tokens=sample_tokens)]
    assert result.micro_batches == len(cut)
    assert max(int(sample_tokens(mb).sum()) for mb in cut) <= max_tokens
    assert tb.max_relative_difference(seen[0], expected) <= TOLERANCE


def test_plain_accumulation_of_the_same_loss_is_not_the_big_batch() -> None:
    """The control: negatives only within the micro-batch give another gradient."""
    model = build()
    pieces = pieces_of([4, 4, 4])
    expected, _ = big_batch_gradient(model, OBJECTIVES["clip"], concat(pieces))
    optimizer, seen = recording(model)
    loss = clip_loss(model)
    tb.Accumulator(model, optimizer).step_window(pieces, lambda m, b: loss(clip_encode(m, b), b))
    assert tb.max_relative_difference(seen[0], expected) > 1e-2


def test_consecutive_windows_follow_the_big_batch_trajectory() -> None:
    """Three windows of different sizes with converted dropout: new masks every window."""
    model, reference = build(dropout=0.3, converted=True), build(dropout=0.3, converted=True)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    optimizer, seen = recording(model)
    acc = tb.Accumulator(model, optimizer, micro_batch_size=2)
    loss = clip_loss(model)
    for window, sizes in enumerate([[3, 4], [5], [2, 2, 1]]):
        pieces = pieces_of(sizes, seed=window)
        expected, _ = big_batch_gradient(
            reference, OBJECTIVES["clip"], concat(pieces), window=window
        )
        acc.step_cached(pieces, clip_encode, loss)
        for p, g in zip(reference.parameters(), expected, strict=True):
            p.grad = g
        ref_optimizer.step()
        assert tb.max_relative_difference(seen[window], expected) <= TOLERANCE
    assert tb.max_relative_difference(list(model.parameters()), list(reference.parameters())) < (
        TOLERANCE
    )


@given(layout=pieces_and_size, seed=st.integers(0, 1000))
def test_native_dropout_sees_the_same_masks_in_both_passes(layout: Any, seed: int) -> None:
    """nn.Dropout draws from the global RNG: the second pass replays the first's state.

    The reference draws the masks as the first pass does (micro-batch by micro-batch
    from the same RNG state) and backpropagates the loss on all of them at once.
    """
    sizes, micro_batch_size = layout
    model = build(dropout=0.5)
    pieces = pieces_of(sizes)
    loss = clip_loss(model)
    torch.manual_seed(seed)
    reps = [clip_encode(model, mb) for mb in micro_batches_of(pieces, micro_batch_size)]
    n = sum(sizes)
    (loss(tuple(torch.cat(r) for r in zip(*reps, strict=True)), None) / n).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    after_reference = torch.get_rng_state()
    model.zero_grad(set_to_none=True)

    optimizer, seen = recording(model)
    torch.manual_seed(seed)
    tb.Accumulator(model, optimizer, micro_batch_size=micro_batch_size).step_cached(
        pieces, clip_encode, loss
    )
    assert tb.max_relative_difference(seen[0], expected) <= TOLERANCE
    # The window draws each mask once: the RNG ends where one forward leaves it.
    assert torch.equal(torch.get_rng_state(), after_reference)


def test_native_dropout_masks_matter_in_this_test() -> None:
    """The control for the test above: other masks give another gradient."""
    model = build(dropout=0.5)
    full = concat(pieces_of([4, 4]))
    gradients = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        gradients.append(big_batch_gradient(model, OBJECTIVES["clip"], full)[0])
    assert tb.max_relative_difference(gradients[0], gradients[1]) > 1e-2


def test_ghost_batchnorm_statistics_are_updated_once() -> None:
    model = build(ghost_batch_size=2, dropout=0.2, converted=True)
    reference = copy.deepcopy(model)
    pieces = pieces_of([4, 2, 6])
    expected, _ = big_batch_gradient(reference, OBJECTIVES["clip"], concat(pieces))
    optimizer, seen = recording(model)
    tb.Accumulator(model, optimizer, micro_batch_size=4).step_cached(
        pieces, clip_encode, clip_loss(model)
    )
    assert tb.max_relative_difference(seen[0], expected) <= TOLERANCE
    assert tb.max_relative_difference(list(model.buffers()), list(reference.buffers())) <= (
        TOLERANCE
    )
    ghost = model.image.net[2]
    assert int(ghost.num_batches_tracked) == 6  # 12 samples, ghost batches of 2, once


# ------------------------------------------------------------------ counts and values


def test_count_returned_by_loss_fn_is_n() -> None:
    """NT-Xent returns (sum over 2B anchors, 2B): N is 2B, not the B samples."""
    model = build()
    pieces = pieces_of([3, 5])
    expected, expected_loss = big_batch_gradient(model, OBJECTIVES["nt_xent"], concat(pieces))
    optimizer, seen = recording(model)
    result = tb.Accumulator(model, optimizer, micro_batch_size=2).step_cached(
        pieces, views_encode, nt_xent_loss
    )
    assert result.count == 16
    assert result.loss == pytest.approx(expected_loss, rel=1e-12)
    assert tb.max_relative_difference(seen[0], expected) <= TOLERANCE


def test_count_callable_sets_n() -> None:
    model = build()
    pieces = pieces_of([3, 5])
    full = concat(pieces)
    expected, _ = big_batch_gradient(model, OBJECTIVES["clip"], full)
    weight = full["label"].sum().item() / len(full["label"])
    optimizer, seen = recording(model)
    result = tb.Accumulator(model, optimizer).step_cached(
        pieces, clip_encode, clip_loss(model), count=lambda b: b["label"].sum()
    )
    assert result.count == full["label"].sum().item()
    scaled = [g / weight for g in expected]
    assert tb.max_relative_difference(seen[0], scaled) <= TOLERANCE


def test_local_negatives_on_one_process_are_global() -> None:
    model = build()
    pieces = pieces_of([4, 4])
    expected, _ = big_batch_gradient(model, OBJECTIVES["clip"], concat(pieces))
    optimizer, seen = recording(model)
    tb.Accumulator(model, optimizer, micro_batch_size=3).step_cached(
        pieces, clip_encode, clip_loss(model), negatives="local"
    )
    assert tb.max_relative_difference(seen[0], expected) <= TOLERANCE


def test_window_batch_false_passes_none() -> None:
    model = build()
    seen_batches = []

    def loss(reps: Any, window: Any) -> torch.Tensor:
        seen_batches.append(window)
        return clip_loss(model)(reps, window)

    acc = tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))
    acc.step_cached(pieces_of([2, 3]), clip_encode, loss, window_batch=False)
    assert seen_batches == [None]


# ------------------------------------------------------------------ precision


def test_autocast_and_grad_scaler_match_the_float32_big_batch() -> None:
    """bfloat16 autocast on CPU, with a GradScaler: within bfloat16's tolerance."""
    model = build().float()
    pieces = [
        {k: v.float() if v.is_floating_point() else v for k, v in p.items()}
        for p in pieces_of([4, 4])
    ]
    expected, _ = big_batch_gradient(model, OBJECTIVES["clip"], concat(pieces))
    optimizer, seen = recording(model)
    acc = tb.Accumulator(
        model,
        optimizer,
        micro_batch_size=2,
        autocast=torch.bfloat16,
        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10),
    )
    result = acc.step_cached(pieces, clip_encode, clip_loss(model))
    assert result.stepped
    assert (
        tb.max_relative_difference(seen[0], expected, dtype=torch.bfloat16)
        <= (TOLERANCES[torch.bfloat16])
    )


# ------------------------------------------------------------------ failures


class Boom(Exception):
    pass


def state_of(model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "rng": torch.get_rng_state(),
    }


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("params", "buffers"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True)), key
    assert all(
        (x is None and y is None) or torch.equal(x, y)
        for x, y in zip(a["grads"], b["grads"], strict=True)
    )
    assert torch.equal(a["rng"], b["rng"])
    assert repr(a["optimizer"]) == repr(b["optimizer"])
    assert a["scheduler"] == b["scheduler"]


@pytest.mark.parametrize("where", ["first pass", "loss", "second pass"])
def test_a_failure_leaves_no_trace(where: str) -> None:
    model = build(ghost_batch_size=2, dropout=0.3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    acc = tb.Accumulator(model, optimizer, scheduler, micro_batch_size=2)
    loss = clip_loss(model)
    acc.step_cached(pieces_of([4]), clip_encode, loss)  # optimizer and scheduler have state
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # the user's own gradient, left as it was
    calls = []

    def encode(m: nn.Module, b: Any) -> Any:
        calls.append(torch.is_grad_enabled())
        if (where == "first pass" and len(calls) == 2) or (
            where == "second pass" and calls[-1] and calls.count(True) == 2
        ):
            raise Boom
        return clip_encode(m, b)

    def failing_loss(reps: Any, window: Any) -> Any:
        if where == "loss":
            loss(reps, window)
            raise Boom
        return loss(reps, window)

    before = state_of(model, optimizer, scheduler)
    with pytest.raises(Boom):
        acc.step_cached(pieces_of([2, 4], seed=1), encode, failing_loss)
    assert_same_state(state_of(model, optimizer, scheduler), before)


# ------------------------------------------------------------------ refused


@pytest.mark.parametrize("name", ["micro_batch_size", "max_tokens"])
def test_auto_micro_batch_size_or_token_budget_is_refused(name: str) -> None:
    model = build()
    acc = tb.Accumulator(model, torch.optim.SGD(model.parameters()), **{name: "auto"})
    with pytest.raises(ValueError, match=f"`{name}` got 'auto'"):
        acc.step_cached(pieces_of([2]), clip_encode, clip_loss(model))


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (lambda reps, b: reps[0].sum(-1), "expected a 0-dim tensor"),
        (lambda reps, b: reps[0].sum().detach(), "does not require grad"),
        (lambda reps, b: (reps[0].sum(), 2, 3), "returned 3 items"),
        (lambda reps, b: (reps[0].sum(), -1), "returned count -1.0"),
    ],
)
def test_bad_loss_fn_results_are_refused(loss: Any, message: str) -> None:
    model = build()
    acc = tb.Accumulator(model, torch.optim.SGD(model.parameters()))
    with pytest.raises((TypeError, ValueError), match=message):
        acc.step_cached(pieces_of([2]), clip_encode, loss)


@pytest.mark.parametrize(
    ("encode", "message"),
    [
        (lambda m, b: "not a tensor", "expected a tensor or a tuple/dict"),
        (lambda m, b: m.image(b["image"])[:1], "expected dim 0 = the micro-batch's 2 samples"),
        (lambda m, b: m.image(b["image"]).detach(), "no representation that requires grad"),
    ],
)
def test_bad_encode_fn_results_are_refused(encode: Any, message: str) -> None:
    model = build()
    acc = tb.Accumulator(model, torch.optim.SGD(model.parameters()))
    with pytest.raises((TypeError, ValueError), match=message):
        acc.step_cached(pieces_of([2]), encode, lambda reps, b: reps.pow(2).sum())


# ------------------------------------------------------------------ DDP, 2 gloo ranks

DISTRIBUTED = {
    "global-even": Scenario("even"),
    "global-uneven": Scenario("uneven"),
    "local-uneven": Scenario("uneven", negatives="local"),
    "pair-uneven": Scenario("uneven", pair=True),
    "ghost-uneven": Scenario("uneven", ghost=True),
    "first-empty": Scenario("first_empty"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, list]]]:
    """What each rank saved: ``runs[name][rank]`` (the processes run once per module)."""
    out_dir = tmp_path_factory.mktemp("cached-runs")
    launch(DISTRIBUTED, out_dir, timeout=240)
    return {
        name: [torch.load(out_dir / f"{name}-{rank}.pt") for rank in range(WORLD_SIZE)]
        for name in DISTRIBUTED
    }


def one_process(scenario: Scenario) -> list[tuple[list, float] | None]:
    """Per window, the gradient and loss of one process on the global batch (None: no step).

    Each rank's samples are encoded where the Accumulator puts them (rank 0's first);
    global negatives compute one loss on all representations, local ones a loss per rank.
    """
    from truebatch import _context

    model = model_of(scenario)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = loss_of(scenario, model)
    per_rank = [rank_pieces(scenario, rank) for rank in range(WORLD_SIZE)]
    expected: list[tuple[list, float] | None] = []
    completed = 0
    for window in range(len(per_rank[0])):
        segments = [concat(pieces[window]) for pieces in per_rank if pieces[window]]
        if len(segments) < WORLD_SIZE and window == 0:
            expected.append(None)  # a rank without data in its first window: refused
            continue
        reps, offset = [], 0
        for segment in segments:
            with _context.micro_batch(completed, offset):
                reps.append(clip_encode(model, segment))
            offset += len(segment["image"])
        if scenario.negatives == "global":
            outputs = [loss(tuple(torch.cat(r) for r in zip(*reps, strict=True)), None)]
        else:
            outputs = [loss(r, None) for r in reps]
        total = sum(o[0] if isinstance(o, tuple) else o for o in outputs)
        n = sum(o[1] for o in outputs) if scenario.pair else offset
        optimizer.zero_grad(set_to_none=True)
        (total / n).backward()
        expected.append(([p.grad.clone() for p in model.parameters()], total.item() / n))
        optimizer.step()
        completed += 1
    return expected


@pytest.mark.parametrize("name", list(DISTRIBUTED))
@pytest.mark.processes
def test_ddp_gives_one_process_on_the_global_batch(runs: dict, name: str) -> None:
    expected = one_process(DISTRIBUTED[name])
    for rank, record in enumerate(runs[name]):
        for window, reference in enumerate(expected):
            result = record["results"][window]
            if reference is None:
                assert "have no data in their first window" in result["error"]
                continue
            grads, loss = reference
            assert tb.max_relative_difference(record["grads"][window], grads) <= TOLERANCE, (
                rank,
                window,
            )
            assert result["loss"] == pytest.approx(loss, rel=1e-12)
            assert record["syncs"][window] == 1  # one gradient synchronization per window


@pytest.mark.processes
def test_ddp_global_negatives_differ_from_local_ones(runs: dict) -> None:
    """The control: the two options are different objectives."""
    global_, local = runs["global-uneven"][0]["grads"], runs["local-uneven"][0]["grads"]
    assert tb.max_relative_difference(global_[0], local[0]) > 1e-3


@pytest.mark.processes
def test_ddp_ghost_batchnorm_counts_each_ghost_batch_once(runs: dict) -> None:
    """DDP broadcasts rank 0's buffers as each window starts; then each rank adds its
    own ghost batches, once (not once per pass)."""
    record = runs["ghost-uneven"]
    layouts = LAYOUTS[DISTRIBUTED["ghost-uneven"].layout]
    start = 0
    for window in range(len(layouts[0])):
        for rank in range(WORLD_SIZE):
            ghost_batches = sum(layouts[rank][window]) // GHOST_BATCH_SIZE
            tracked = record[rank]["buffers"][window][2]  # image tower's num_batches_tracked
            assert int(tracked) == start + ghost_batches, (rank, window)
        start = int(record[0]["buffers"][window][2])


# ------------------------------------------------------------------ what users pass


def test_labels_returned_with_the_representations_reach_loss_fn() -> None:
    """window_batch=False: the labels a batch-hard triplet loss needs come from encode_fn."""
    model = build()
    pieces = pieces_of([3, 4, 5])
    expected, _ = big_batch_gradient(model, OBJECTIVES["batch_hard_triplet"], concat(pieces))

    def encode(m: nn.Module, b: Any) -> dict[str, torch.Tensor]:
        return {"embedding": m.image(b["image"]), "label": b["label"]}

    def loss(reps: dict[str, torch.Tensor], window: Any) -> torch.Tensor:
        assert window is None
        return OBJECTIVES["batch_hard_triplet"].loss(model)(reps["embedding"], reps)

    optimizer, seen = recording(model)
    tb.Accumulator(model, optimizer, micro_batch_size=2).step_cached(
        pieces, encode, loss, window_batch=False
    )
    assert tb.max_relative_difference(seen[0], expected) <= TOLERANCE


def test_a_representation_the_loss_ignores_gets_no_gradient() -> None:
    model = build()
    pieces = pieces_of([4, 4])
    full = concat(pieces)

    def only_images(reps: tuple[torch.Tensor, ...], _: Any) -> torch.Tensor:
        return reps[0].pow(2).sum()

    model.zero_grad(set_to_none=True)
    (only_images(clip_encode(model, full), None) / 8).backward()
    expected = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    optimizer, seen = recording(model)
    tb.Accumulator(model, optimizer, micro_batch_size=3).step_cached(
        pieces, clip_encode, only_images
    )
    assert tb.max_relative_difference(seen[0], expected) <= TOLERANCE


def test_pieces_that_cannot_be_concatenated_are_refused_with_the_fix() -> None:
    """Token batches padded to different lengths: the window batch cannot be one tensor."""
    model = build()
    pieces = [
        {"image": torch.randn(2, 6, dtype=torch.float64), "tokens": torch.zeros(2, 5)},
        {"image": torch.randn(3, 6, dtype=torch.float64), "tokens": torch.zeros(3, 7)},
    ]

    def encode(m: nn.Module, b: Any) -> torch.Tensor:
        return m.image(b["image"])

    def loss(reps: torch.Tensor, _: Any) -> torch.Tensor:
        return reps.pow(2).sum()

    acc = tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="Fix: pass window_batch=False"):
        acc.step_cached(pieces, encode, loss)
    assert all(p.grad is None for p in model.parameters())
    assert acc.step_cached(pieces, encode, loss, window_batch=False).stepped


def test_clipping_sees_the_big_batch_gradient() -> None:
    model, reference = build(), build()
    pieces = pieces_of([5, 5])
    expected, _ = big_batch_gradient(reference, OBJECTIVES["mnrl"], concat(pieces))
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in expected if g is not None])
    )
    optimizer, seen = recording(model)
    result = tb.Accumulator(model, optimizer, micro_batch_size=2, max_grad_norm=0.1).step_cached(
        pieces, OBJECTIVES["mnrl"].encode, mnrl_loss
    )
    assert result.grad_norm == pytest.approx(norm.item(), rel=1e-12)
    clipped = [None if g is None else g * (0.1 / (norm + 1e-6)) for g in expected]
    assert tb.max_relative_difference(seen[0], clipped) <= TOLERANCE
