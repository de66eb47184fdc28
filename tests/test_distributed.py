"""Exact accumulation under DDP and FSDP2: 2 gloo processes vs one process.

All scenarios run in one spawned process group (``dist_workers.launch``, under
a hard timeout, every collective under a 60 s gloo timeout); each test then
compares what the ranks saved with a reference computed here, plainly: one
process, the concatenated global batch of every window, the mean loss over
its N items, ``backward``, ``clip_grad_norm_`` and an SGD step.

The ghost-BatchNorm scenario also checks BatchNorm's running statistics, whose
reference is not the single process's: DDP broadcasts rank 0's buffers at the
first forward of every window (``broadcast_buffers=True``, its default), so the
running statistics every rank continues from are rank 0's, updated with rank
0's ghost batches only (see :func:`reference`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

import truebatch as tb
from dist_workers import (
    WINDOWS,
    WORLD_SIZE,
    Scenario,
    Trace,
    build_model,
    build_optimizer,
    rank_data,
)
from models import IGNORE_INDEX, TASKS, concat, parameters, relative_difference
from scripts import run_torchrun
from truebatch import _context
from truebatch.distributed import GradientSync

pytestmark = pytest.mark.processes

EXACT = 1e-12
REPO = Path(__file__).resolve().parents[1]

SCENARIOS: dict[str, Scenario] = {
    "ddp-even": Scenario("ddp"),
    "ddp-even-micro_batch": Scenario("ddp", gradient_sync="micro_batch"),
    "ddp-uneven-clip": Scenario("ddp", layout="uneven", max_grad_norm=0.5),
    "ddp-uneven-micro_batch": Scenario("ddp", layout="uneven", gradient_sync="micro_batch"),
    "ddp-tokens": Scenario("ddp", task="gru_lm", layout="uneven"),
    "ddp-tokens-pair": Scenario("ddp", task="gru_lm", layout="uneven", pair=True),
    "ddp-gap": Scenario("ddp", layout="gap"),
    "ddp-auto-oom": Scenario("ddp", micro_batch_size="auto", oom_above=(4, 2, 6)),
    "ddp-first-empty": Scenario("ddp", layout="first_empty"),
    "fsdp2-even-window": Scenario("fsdp2", gradient_sync="window"),
    "fsdp2-even": Scenario("fsdp2"),
    "fsdp2-uneven-window-clip": Scenario(
        "fsdp2", layout="uneven", gradient_sync="window", max_grad_norm=0.5
    ),
    "fsdp2-uneven-clip": Scenario("fsdp2", layout="uneven", max_grad_norm=0.5),
    "fsdp2-tokens": Scenario("fsdp2", task="gru_lm", layout="uneven"),
    "fsdp2-tokens-pair-window": Scenario(
        "fsdp2", task="gru_lm", layout="uneven", gradient_sync="window", pair=True
    ),
    "fsdp2-first-empty": Scenario("fsdp2", layout="first_empty"),
    "ddp-ghost-batchnorm-dropout": Scenario(
        "ddp", layout="ghost", micro_batch_size=8, split_layers="converted"
    ),
    "ddp-torch-batchnorm-dropout": Scenario(
        "ddp", layout="ghost", micro_batch_size=8, split_layers="torch"
    ),
}
# nn.BatchNorm and nn.Dropout are not split-invariant: that run is the control.
EXACT_RUNS = [
    name
    for name, scenario in SCENARIOS.items()
    if "first-empty" not in name and scenario.split_layers != "torch"
]
# "auto" exchanges once more per attempt (see test_auto_retries_every_rank_at_the_same_size).
FIXED_SIZE_RUNS = [name for name in EXACT_RUNS if SCENARIOS[name].micro_batch_size != "auto"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, list]]]:
    """What each rank saved, per scenario: ``runs[name][rank]`` (one launch per session)."""
    import dist_workers

    return dist_workers.launch_once(tmp_path_factory, "distributed-runs", SCENARIOS)


def reference(scenario: Scenario, first_window: int = 0) -> list[dict[str, Any]]:
    """One process, windows ``first_window..`` on the global batch (all ranks' data).

    Window ``w`` runs as the Accumulator declares it to split-invariant layers:
    window index ``w``, the global batch from sample 0 (ranks in order, so rank
    ``r``'s samples start after those of ranks ``< r``). ``nn.Dropout`` draws
    from the global RNG, seeded here.

    For ghost BatchNorm (``split_layers="converted"``), each window also records
    ``rank_buffers[r]``: the buffers rank ``r`` must hold after the window under
    DDP. DDP broadcasts rank 0's buffers at the window's first forward; rank
    ``r`` then updates them with the ghost batches of its own share only. So
    ``rank_buffers[r]`` is rank 0's buffers after the previous window (the
    initial ones in window 0), run forward
    (same parameters, same masks) on rank ``r``'s share of the global batch.
    ``buffers`` are the single process's, updated with every ghost batch of the
    global batch, which no rank holds.
    """
    task = TASKS[scenario.task]
    model = build_model(scenario)
    optimizer = build_optimizer(model.parameters())
    data = [rank_data(scenario, rank) for rank in range(WORLD_SIZE)]
    broadcast = {name: b.clone() for name, b in model.named_buffers()}
    windows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for window in range(first_window, WINDOWS):
            pieces = [piece for rank_pieces in data for piece in rank_pieces[window]]
            if not pieces:  # N == 0: no step
                windows.append({"count": 0, "params": parameters(model)})
                continue
            batch = concat(pieces)
            with _context.micro_batch(window, offset=0):
                loss = task.loss_mean(model, batch)
            loss.backward()
            rank_buffers = []
            if scenario.split_layers == "converted":
                rank_buffers = ddp_buffers(model, broadcast, [d[window] for d in data], window)
                broadcast = dict(zip(broadcast, rank_buffers[0], strict=True))
            if scenario.max_grad_norm is None:
                norm = torch.linalg.vector_norm(
                    torch.cat([p.grad.flatten() for p in model.parameters()])
                )
            else:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), scenario.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            if scenario.task == "mlp":
                count = len(batch[0])
            else:
                count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            windows.append(
                {
                    "loss": loss.item(),
                    "count": count,
                    "grad_norm": norm.item(),
                    "params": parameters(model),
                    "buffers": [b.clone() for b in model.buffers()],
                    "rank_buffers": rank_buffers,
                }
            )
    return windows


def ddp_buffers(
    model: nn.Module, broadcast: dict[str, torch.Tensor], shares: list[list[Any]], window: int
) -> list[list[torch.Tensor]]:
    """Per rank, ``broadcast`` (rank 0's buffers) after a forward of the rank's share.

    Rank ``r``'s pieces ``shares[r]`` are samples ``s_r .. s_r + n_r`` of the
    window's global batch, with ``s_r`` the samples of ranks ``< r``: the
    offset the Accumulator gives split-invariant layers. ``model`` holds the
    parameters of the window's forward; its own buffers are left alone.
    """
    result, first = [], 0
    for pieces in shares:
        x, _ = concat(pieces)
        buffers = {name: b.clone() for name, b in broadcast.items()}
        with torch.no_grad(), _context.micro_batch(window, offset=first):
            torch.func.functional_call(model, buffers, (x,))
        result.append(list(buffers.values()))
        first += len(x)
    return result


def passes(scenario: Scenario, window: int) -> int:
    """Forward-backward passes every rank runs in ``window``: the most of any rank."""
    return max(local_passes(scenario, rank, window) for rank in range(WORLD_SIZE))


def local_passes(scenario: Scenario, rank: int, window: int) -> int:
    """Passes of ``rank``'s own micro-batches in ``window`` (replays not included)."""
    pieces = rank_data(scenario, rank)[window]
    if scenario.micro_batch_size is None:
        return len(pieces)
    return sum(math.ceil(tb_size(piece) / scenario.micro_batch_size) for piece in pieces)


def tb_size(piece: Any) -> int:
    return len(piece[0]) if isinstance(piece, tuple) else len(piece["input_ids"])


def assert_matches(
    saved: list[dict[str, list]], expected: list[dict[str, Any]], start: int
) -> None:
    for rank, record in enumerate(saved):
        for offset, want in enumerate(expected):
            window = start + offset
            got = record["results"][window]
            where = f"rank {rank}, window {window}"
            assert got["count"] == want["count"], where
            if want["count"] == 0:
                assert not got["stepped"], where
                assert got["skip_reason"] == "the window holds no items (N == 0)", where
            else:
                assert got["stepped"], f"{where}: {got['skip_reason']}"
                assert got["loss"] == pytest.approx(want["loss"], rel=EXACT), where
                assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=EXACT), where
            for index, (a, b) in enumerate(
                zip(record["params"][window], want["params"], strict=True)
            ):
                assert relative_difference(a, b) <= EXACT, f"{where}, parameter {index}"


@pytest.mark.parametrize("name", EXACT_RUNS)
def test_same_update_as_one_process_on_the_global_batch(runs: dict, name: str) -> None:
    scenario = SCENARIOS[name]
    if scenario.max_grad_norm is not None:
        # The clip must act, or the test would not show that it is global.
        norms = [w["grad_norm"] for w in reference(scenario)]
        assert max(norms) > scenario.max_grad_norm
    assert_matches(runs[name], reference(scenario), start=0)


@pytest.mark.parametrize("name", EXACT_RUNS)
def test_gradients_synchronize_once_per_window_or_per_pass(runs: dict, name: str) -> None:
    scenario = SCENARIOS[name]
    per_pass = (
        scenario.gradient_sync or {"ddp": "window", "fsdp2": "micro_batch"}[scenario.wrapper]
    ) == "micro_batch"
    # Once per window in which some rank has data.
    has_data = [any(rank_data(scenario, r)[w] for r in range(WORLD_SIZE)) for w in range(WINDOWS)]
    expected = [passes(scenario, w) if per_pass else int(has_data[w]) for w in range(WINDOWS)]
    for rank, record in enumerate(runs[name]):
        assert record["syncs"] == expected, f"rank {rank}"


@pytest.mark.parametrize("name", FIXED_SIZE_RUNS)
def test_item_count_is_exchanged_once_per_window_before_the_first_pass(
    runs: dict, name: str
) -> None:
    scenario = SCENARIOS[name]
    for rank, record in enumerate(runs[name]):
        for window in range(WINDOWS):
            where = f"rank {rank}, window {window}"
            # Every pass (replays included) calls loss_fn after the exchange started.
            assert record["gathers_at_pass"][window] == [1] * passes(scenario, window), where
            # truebatch's own collectives: the counts before, the loss sum after.
            assert record["collectives"][window]["all_gather"] == 1, where
            assert record["collectives"][window]["all_reduce"] == 1, where


@pytest.mark.parametrize("name", FIXED_SIZE_RUNS)
def test_item_count_travels_while_the_passes_compute_under_ddp(runs: dict, name: str) -> None:
    # DDP's gradient stays local until the last pass: a window after one with N > 0 starts
    # with that N, and waits for the exchange only before the rank's last own pass (a rank
    # without data: before its first replay). Otherwise it waits before the first pass.
    scenario = SCENARIOS[name]
    travels = scenario.wrapper == "ddp" and scenario.gradient_sync != "micro_batch"
    for rank, record in enumerate(runs[name]):
        for window in range(WINDOWS):
            guessed = travels and window > 0 and record["results"][window - 1]["count"] > 0
            own = local_passes(scenario, rank, window)
            expected = max(own - 1, 0) if guessed else 0
            assert record["gather_waits"][window] == [expected], f"rank {rank}, window {window}"


@pytest.mark.parametrize("name", FIXED_SIZE_RUNS)
def test_loss_sum_travels_during_the_last_backward(runs: dict, name: str) -> None:
    # The one all-reduce of the loss sum (and counts) starts after the last forward and
    # before the last backward, so it overlaps that backward instead of following it.
    scenario = SCENARIOS[name]
    for rank, record in enumerate(runs[name]):
        for window in range(WINDOWS):
            count = passes(scenario, window)
            expected = [0] * (count - 1) + [1] if count else []
            got = record["reduces_at_backward"][window]
            assert got == expected, f"rank {rank}, window {window}"


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_rank_without_data_in_its_first_window_fails_on_every_rank(
    runs: dict, wrapper: str
) -> None:
    name = f"{wrapper}-first-empty"
    scenario = SCENARIOS[name]
    errors = [record["results"][0].get("error") for record in runs[name]]
    assert errors[0] is not None and "no data in their first window" in errors[0]
    assert errors[1] == errors[0]
    initial = parameters(build_model(scenario))
    for record in runs[name]:
        assert record["syncs"][0] == 0
        for a, b in zip(record["params"][0], initial, strict=True):
            assert torch.equal(a, b)
    # The process group is still usable and the next windows are exact.
    assert_matches(runs[name], reference(scenario, first_window=1), start=1)


def test_auto_retries_every_rank_at_the_same_size(runs: dict) -> None:
    record0, record1 = runs["ddp-auto-oom"]
    # Rank 1 alone fails above 4 samples in window 0 and above 2 in window 1.
    for record in (record0, record1):
        assert [r["micro_batch_size"] for r in record["results"]] == [3, 1, 1]
        assert [max(seen) for seen in record["seen"]] == [6, 3, 1]
    # Rank 0 never fails itself, yet redoes window 0 at 3 samples: two passes of 3.
    assert record0["seen"][0].count(6) == 1 and record0["seen"][0].count(3) == 2


def test_replayed_pass_keeps_the_ddp_buffer_broadcast(runs: dict) -> None:
    record0, record1 = runs["ddp-uneven-clip"]
    # Rank 1 has no data in window 2: its only forwards are replays, and DDP's
    # broadcast in the first of them gives it rank 0's buffers of the window's start.
    assert not torch.equal(record1["buffers"][1][0], record0["buffers"][1][0])
    assert torch.equal(record1["buffers"][2][0], record0["buffers"][1][0])


def test_ghost_batchnorm_running_statistics_are_rank_0s_under_ddp(runs: dict) -> None:
    """Running statistics of ghost BatchNorm under DDP: exact, but rank 0's, not global.

    The parameters, loss and gradient norm of this run (ghost BatchNorm and
    split-invariant dropout, 12 samples on rank 0 and 8 on rank 1 per window)
    equal the single process on the global batch:
    ``test_same_update_as_one_process_on_the_global_batch`` checks them. The
    running statistics cannot: DDP broadcasts rank 0's buffers at the first
    forward of each window, which drops what rank 1 added, and no rank ever
    sees the ghost batches of the other. What each rank holds is exactly
    ``reference``'s ``rank_buffers``: rank 0's buffers of the window's start,
    updated with the ghost batches of the rank's own share, whose dropout masks
    are drawn at the share's global sample offset (0 on rank 0, 12 on rank 1).
    """
    name = "ddp-ghost-batchnorm-dropout"
    expected = reference(SCENARIOS[name])
    for rank, record in enumerate(runs[name]):
        for window, want in enumerate(expected):
            pairs = zip(record["buffers"][window], want["rank_buffers"][rank], strict=True)
            for index, (got, ref) in enumerate(pairs):
                where = f"rank {rank}, window {window}, buffer {index}"
                if got.is_floating_point():
                    assert relative_difference(got, ref) <= EXACT, where
                else:  # num_batches_tracked: the rank's ghost batches since the broadcast
                    assert torch.equal(got, ref), where
    # The single process updates them with all 20 / 4 = 5 ghost batches of each window,
    # rank 0's survive with its 12 / 4 = 3.
    for window, want in enumerate(expected):
        saved, single = runs[name][0]["buffers"][window], want["buffers"]
        pairs = zip(saved, single, strict=True)
        gaps = [relative_difference(a, b) for a, b in pairs if a.is_floating_point()]
        assert min(gaps) > 1e-3, f"window {window}"
        assert saved[-1] == 3 * (window + 1) and single[-1] == 5 * (window + 1)


def test_torch_batchnorm_and_dropout_are_not_exact_under_ddp(runs: dict) -> None:
    """The control: the same run with ``nn.BatchNorm1d`` and ``nn.Dropout`` is far off.

    BatchNorm takes its statistics over each micro-batch instead of the global
    batch, and each rank draws its dropout masks from its own RNG stream.
    """
    name = "ddp-torch-batchnorm-dropout"
    expected = reference(SCENARIOS[name])
    for rank, record in enumerate(runs[name]):
        for window, want in enumerate(expected):
            gap = max(
                relative_difference(a, b)
                for a, b in zip(record["params"][window], want["params"], strict=True)
            )
            assert gap > 1e-3, f"rank {rank}, window {window}"


def test_a_model_without_a_wrapper_trains_locally() -> None:
    sync = GradientSync(torch.nn.Linear(2, 2))
    assert (sync.kind, sync.world_size, sync.rank, sync.distributed) == ("local", 1, 0, False)
    assert sync.mode == "window"
    assert sync.exchange([3.0, 1.0])() == [[3.0, 1.0]]
    assert sync.all_reduce(torch.tensor([2.0, 5.0], dtype=torch.float64))() == [2.0, 5.0]


def test_ddp_and_fsdp2_models_are_detected_with_their_default_sync(one_rank_group: None) -> None:
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
    sharded = nn.Linear(2, 2)
    fully_shard(sharded)
    found = [GradientSync(model) for model in (ddp, sharded, nn.Linear(2, 2))]
    assert [(s.kind, s.mode, s.world_size, s.distributed) for s in found] == [
        ("ddp", "window", 1, True),
        ("fsdp2", "micro_batch", 1, True),
        ("local", "window", 1, False),
    ]
    assert found[0].module is ddp.module and found[1].module is sharded
    assert GradientSync(sharded, "window").mode == "window"


def test_fsdp2_refuses_auto_micro_batch_size(one_rank_group: None) -> None:
    # 2-D meshes: tests/test_mesh.py.
    sharded = nn.Linear(2, 2)
    fully_shard(sharded)
    with pytest.raises(ValueError, match="'auto' is not available for FSDP2 models"):
        tb.Accumulator(
            sharded, torch.optim.SGD(sharded.parameters(), lr=0.1), micro_batch_size="auto"
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_ddp_starts_with_the_previous_n_except_in_float16(
    one_rank_group: None, dtype: torch.dtype
) -> None:
    # One rank shows when the Accumulator waits for its exchange: from the second window
    # before the last pass (N repeats, then changes); in float16 always before the first.
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(dtype)
    reference = nn.Linear(3, 1).to(dtype)
    reference.load_state_dict(model.state_dict())
    ddp = nn.parallel.DistributedDataParallel(model)
    acc = tb.Accumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), micro_batch_size=2)
    trace = Trace(acc.sync)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        trace.record_pass(len(batch[0]))
        return ((model(batch[0]) - batch[1]) ** 2).sum()

    waits = []
    for n in (6, 6, 5):
        batch = (torch.randn(n, 3, dtype=dtype), torch.randn(n, 1, dtype=dtype))
        trace.start()
        acc.step(batch, loss_fn)
        waits.append(trace.gather_waits)
        ((reference(batch[0]) - batch[1]) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert waits == ([[0], [2], [2]] if dtype == torch.float64 else [[0], [0], [0]])
    tolerance = EXACT if dtype == torch.float64 else 1e-2  # float16: a few units of 2**-10
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert relative_difference(a.detach(), b.detach()) <= tolerance


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_a_failed_window_leaves_gradients_synchronizing(one_rank_group: None, wrapper: str) -> None:
    # The window's first passes run in the wrapper's no-sync mode; an error in a later
    # pass must not leave the model there (a plain backward afterwards would not sync).
    model = nn.Linear(3, 1)
    if wrapper == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        fully_shard(model)
    acc = tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), gradient_sync="window")

    def loss_fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 1:
            raise ValueError("bad micro-batch")
        return model(x).sum()

    with pytest.raises(ValueError, match="bad micro-batch"):
        acc.step_window([torch.ones(2, 3), torch.ones(1, 3), torch.ones(2, 3)], loss_fn)
    model(torch.ones(2, 3)).sum().backward()
    if wrapper == "ddp":
        assert model.require_backward_grad_sync
    # FSDP2 reduce-scatters into the sharded .grad only when it synchronizes.
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("call", [1, 2])
def test_zero_grad_on_the_ddp_inner_module_is_reported_as_zero_grad(
    one_rank_group: None, call: int
) -> None:
    """Regression (issue 15, defect 12): ``model.module.zero_grad()`` inside loss_fn was
    reported as "backward() inside loss_fn" (or, on the first pass, not at all)."""
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 1))
    acc = tb.Accumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), micro_batch_size=2)
    calls = 0

    def loss_fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == call:
            model.module.zero_grad()
        return model(x).sum()

    with pytest.raises(RuntimeError, match=r"zero_grad\(\) was called inside a truebatch window"):
        acc.step(torch.ones(6, 3), loss_fn)
    assert "zero_grad" not in vars(ddp.module)
    ddp.module.zero_grad()


def test_unknown_gradient_sync_is_refused() -> None:
    with pytest.raises(
        ValueError,
        match="`gradient_sync` got 'every_step'; expected 'window', 'micro_batch', 'hybrid' or",
    ):
        GradientSync(torch.nn.Linear(2, 2), "every_step")


@pytest.mark.slow
def test_torchrun_example_trains(tmp_path: Path) -> None:
    stdout = run_torchrun(REPO / "examples" / "ddp_torchrun.py", 2, "--epochs", "1", cwd=tmp_path)
    losses = [
        float(line.split("loss")[1].split()[0]) for line in stdout.splitlines() if " loss " in line
    ]
    assert len(losses) >= 2 and losses[-1] < losses[0], stdout
