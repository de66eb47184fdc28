"""Exact accumulation on 2-D device meshes: HSDP, FSDP2 + tensor parallelism, context
parallelism; 4 gloo processes vs one process on the concatenated global batch.

All scenarios run in one spawned process group of 4 ranks
(``dist_workers.launch``, under a hard timeout, every collective under a 60 s
gloo timeout). The data is uneven: data-parallel ranks hold different numbers
of samples and micro-batches, and one holds none in the last window. The
reference, written out here, is one process on all data-parallel ranks'
samples of each window: the mean loss over its N items (samples, or scored
tokens), ``backward``, ``clip_grad_norm_`` and an SGD step.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import truebatch as tb
from dist_workers import build_optimizer
from mesh_workers import (
    WINDOWS,
    WORLD_SIZE,
    MeshScenario,
    build_model,
    rank_data,
)
from models import IGNORE_INDEX, VOCAB, concat, lm_loss, parameters
from scripts import run_torchrun

EXACT = 1e-12
TESTS = Path(__file__).resolve().parent

SCENARIOS: dict[str, MeshScenario] = {
    "hsdp-hybrid-clip": MeshScenario("hsdp", max_grad_norm=0.3),
    "hsdp-micro_batch": MeshScenario("hsdp", gradient_sync="micro_batch"),
    "hsdp-window": MeshScenario("hsdp", gradient_sync="window"),
    "tp-clip": MeshScenario("tp", max_grad_norm=0.3),
    "cp": MeshScenario("cp", max_grad_norm=0.8),
    "cp-fsdp2": MeshScenario("cp", wrapper="fsdp2"),
}
# The sharded Linear layers of the "hsdp" model: FSDP2 reduces each one's gradients.
SHARDED_LAYERS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, list]]]:
    """What each rank saved, per scenario: ``runs[name][rank]`` (one launch per session)."""
    import dist_workers
    import mesh_workers

    return dist_workers.launch_once(
        tmp_path_factory, "mesh-runs", SCENARIOS, mesh_workers.run, world_size=WORLD_SIZE
    )


def reference(scenario: MeshScenario) -> list[dict[str, Any]]:
    """One process, every window on the global batch (all data-parallel ranks' samples)."""
    model = build_model(scenario)
    optimizer = build_optimizer(model.parameters())
    data = [rank_data(scenario, rank) for rank in range(scenario.data_ranks)]
    windows = []
    for window in range(WINDOWS):
        batch = concat([piece for pieces in data for piece in pieces[window]])
        if scenario.layout == "cp":
            loss = lm_loss(model, batch, reduction="mean")  # shifts the labels itself
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        else:
            x, y = batch
            loss, count = F.cross_entropy(model(x), y), len(x)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        if scenario.max_grad_norm is None:
            norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), scenario.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        windows.append(
            {
                "loss": loss.item(),
                "count": count,
                "grad_norm": norm.item(),
                "params": parameters(model),
            }
        )
    return windows


@pytest.mark.processes
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_update_as_one_process_on_the_global_batch(runs: dict, name: str) -> None:
    scenario = SCENARIOS[name]
    expected = reference(scenario)
    if scenario.max_grad_norm is not None:
        # The clip must act, or the test would not show that it is global.
        assert max(w["grad_norm"] for w in expected) > scenario.max_grad_norm
    for rank, record in enumerate(runs[name]):
        for window, want in enumerate(expected):
            got, where = record["results"][window], f"rank {rank}, window {window}"
            assert got["count"] == want["count"], where
            assert got["stepped"], where
            assert got["loss"] == pytest.approx(want["loss"], rel=EXACT), where
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=EXACT), where
            gap = tb.max_relative_difference(record["params"][window], want["params"])
            assert gap <= EXACT, where


@pytest.mark.processes
@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s.layout != "cp"])
def test_item_count_is_exchanged_once_per_window_over_the_data_parallel_ranks(
    runs: dict, name: str
) -> None:
    # One all_gather per window. Over 4 ranks under HSDP, over the 2 dp ranks under tensor
    # parallelism: a count over all 4 would double N, which the exactness test would show.
    for rank, record in enumerate(runs[name]):
        for window in range(WINDOWS):
            assert record["collectives"][window]["all_gather"] == 1, f"rank {rank}, {window}"


def passes(window: int) -> int:
    """Passes every rank runs under HSDP in ``window``: the most micro-batches of any rank."""
    data = [rank_data(MeshScenario("hsdp"), rank)[window] for rank in range(WORLD_SIZE)]
    return max(sum(-(-len(x) // 2) for x, _ in pieces) for pieces in data)


@pytest.mark.processes
@pytest.mark.parametrize(
    ("name", "reduce_scatters", "all_reduces"),
    [
        # "hybrid" (HSDP's default): reduce-scatter within a replica every pass, the
        # cross-replica all-reduce once per window.
        ("hsdp-hybrid-clip", "every pass", "once"),
        ("hsdp-micro_batch", "every pass", "every pass"),
        ("hsdp-window", "once", "once"),
    ],
)
def test_hsdp_all_reduces_across_replicas_once_per_window(
    runs: dict, name: str, reduce_scatters: str, all_reduces: str
) -> None:
    for rank, record in enumerate(runs[name]):
        for window in range(WINDOWS):
            times = {"once": 1, "every pass": passes(window)}
            calls = record["collectives"][window]
            assert calls["reduce_scatter_single"] == SHARDED_LAYERS * times[reduce_scatters]
            # truebatch's loss all-reduce, then FSDP2's: one per sharded layer and sync.
            assert calls["all_reduce"] == 1 + SHARDED_LAYERS * times[all_reduces], (rank, window)


@pytest.mark.processes
def test_two_torchrun_nodes_match_one_process(tmp_path: Path) -> None:
    """Two ``torchrun --nnodes 2`` agents on this machine, 2 processes each, one c10d
    rendezvous on localhost: DDP and HSDP (replicate across the nodes, shard within
    each) on uneven data give one process's update on the global batch."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun is installed with torch"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        torchrun,
        "--nnodes",
        "2",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"truebatch-{port}",
        str(TESTS / "nodes_worker.py"),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session each, so that a hung node is killed with its workers, not left running.
    nodes = [
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
        for node in nodes:
            os.killpg(node.pid, signal.SIGKILL)
        pytest.fail(
            "the two nodes did not finish in 240 s:\n"
            + "\n".join((node.communicate()[0] or "")[-2000:] for node in nodes)
        )
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    expected = reference(MeshScenario("hsdp"))  # the same data on the same 4 ranks
    for name in ("nodes-ddp", "nodes-hsdp"):
        saved = [torch.load(tmp_path / f"{name}-{rank}.pt") for rank in range(WORLD_SIZE)]
        # Each agent ran two of the four ranks.
        assert sorted(record["node"] for record in saved) == [[0, 0], [0, 1], [1, 0], [1, 1]]
        for rank, record in enumerate(saved):
            for window, want in enumerate(expected):
                got, where = record["results"][window], f"{name}, rank {rank}, window {window}"
                assert got["count"] == want["count"], where
                assert got["loss"] == pytest.approx(want["loss"], rel=EXACT), where
                gap = tb.max_relative_difference(record["params"][window], want["params"])
                assert gap <= EXACT, where


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def test_tensor_parallel_model_counts_over_the_mesh_given_to_fully_shard(
    one_rank_group: None,
) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    model = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 2))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    for data_parallel in (None, mesh["dp"]):
        acc = tb.Accumulator(model, sgd(model), data_parallel=data_parallel)
        assert acc.sync.group is mesh.get_group("dp")
        assert (acc.sync.kind, acc.sync.mode, acc.sync.ranks.hybrid) == (
            "fsdp2",
            "micro_batch",
            False,
        )
    # The tensor-parallel dimension holds the same items: counting over it is refused.
    with pytest.raises(
        ValueError, match=r"got the mesh \('tp',\); expected the mesh given to fully_shard"
    ):
        tb.Accumulator(model, sgd(model), data_parallel=mesh["tp"])


def test_modules_sharded_on_different_meshes_need_the_mesh_named(one_rank_group: None) -> None:
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("a", "b"))
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    fully_shard(model[0], mesh=mesh["a"])
    fully_shard(model[1], mesh=mesh["b"])
    fully_shard(model, mesh=mesh["a"])
    with pytest.raises(ValueError, match=r"ambiguous\. Fix: pass data_parallel=mesh\['dp'\]"):
        tb.Accumulator(model, sgd(model))


def test_hsdp_is_detected_and_defers_only_the_all_reduce(one_rank_group: None) -> None:
    model = nn.Linear(2, 2)
    fully_shard(model, mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("rep", "shard")))
    acc = tb.Accumulator(model, sgd(model))
    assert (acc.sync.kind, acc.sync.mode, acc.sync.ranks.hybrid) == ("fsdp2", "hybrid", True)
    assert tb.Accumulator(model, sgd(model), gradient_sync="window").sync.mode == "window"


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_hybrid_sync_is_refused_without_hsdp(one_rank_group: None, wrapper: str) -> None:
    model = nn.Linear(2, 2)
    if wrapper == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        fully_shard(model)
    with pytest.raises(ValueError, match=f"'hybrid' for a {wrapper} model; expected an FSDP2"):
        tb.Accumulator(model, sgd(model), gradient_sync="hybrid")


def test_data_parallel_mesh_is_refused_for_ddp_and_beyond_two_dimensions(
    one_rank_group: None,
) -> None:
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
    mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("a", "b", "c"))
    with pytest.raises(ValueError, match="for a ddp model; expected an FSDP2 model"):
        tb.Accumulator(ddp, sgd(ddp), data_parallel=mesh["a"])
    sharded = nn.Linear(2, 2)
    fully_shard(sharded)
    with pytest.raises(ValueError, match="got a 3-D mesh; expected the 1-D or 2-D DeviceMesh"):
        tb.Accumulator(sharded, sgd(sharded), data_parallel=mesh)


def test_split_sequences_shifts_before_the_cut() -> None:
    # A causal LM on the two halves of each sequence, labels shifted before the cut, gives
    # the loss sum and the token count of the whole sequences; shifting inside each half
    # (what count_tokens(shift=True) assumes) loses the label at the cut.
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, 8))
    labels = ids.clone()
    labels[0, 5:] = IGNORE_INDEX
    labels[2, 3] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "lengths": torch.tensor([5, 8, 8])}
    logits = torch.randn(3, 8, VOCAB, dtype=torch.float64)
    whole = F.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    parts = [tb.split_sequences(batch, rank=r, ranks=2) for r in range(2)]
    assert all(torch.equal(p["lengths"], batch["lengths"]) for p in parts)
    total = sum(
        F.cross_entropy(
            logits[:, 4 * r : 4 * r + 4].flatten(0, 1),
            part["labels"].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        for r, part in enumerate(parts)
    )
    assert torch.allclose(total, whole, rtol=1e-14, atol=0)
    counts = [int(tb.count_tokens(shift=False)(part)) for part in parts]
    assert sum(counts) == int(tb.count_tokens()(batch))
    naive = [int(tb.count_tokens()({"labels": labels[:, 4 * r : 4 * r + 4]})) for r in range(2)]
    assert sum(naive) < sum(counts)
    assert torch.equal(parts[1]["input_ids"], ids[:, 4:])


def test_split_sequences_refuses_a_length_that_does_not_divide() -> None:
    batch = {"input_ids": torch.ones(2, 7, dtype=torch.long), "labels": torch.ones(2, 7)}
    with pytest.raises(ValueError, match=r"length 7; expected a multiple of ranks = 2\. Fix: pad"):
        tb.split_sequences(batch, rank=0, ranks=2)
    with pytest.raises(ValueError, match="`rank` got 2; expected 0 <= rank < ranks = 2"):
        tb.split_sequences(batch, rank=2, ranks=2)


def test_a_failed_window_leaves_hsdp_all_reducing(
    one_rank_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "hybrid" defers the cross-replica all-reduce until the window's last pass; an error
    # in an earlier pass must not leave it off (a plain backward would then not all-reduce).
    model = nn.Linear(3, 1)
    fully_shard(model, mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("rep", "shard")))
    acc = tb.Accumulator(model, sgd(model))
    assert acc.sync.mode == "hybrid"

    def loss_fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 1:
            raise ValueError("bad micro-batch")
        return model(x).sum()

    with pytest.raises(ValueError, match="bad micro-batch"):
        acc.step_window([torch.ones(2, 3), torch.ones(1, 3), torch.ones(2, 3)], loss_fn)
    calls = []
    all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(1) or all_reduce(*a, **k))
    model(torch.ones(2, 3)).sum().backward()
    assert calls and all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.parametrize(
    "script", ["hsdp_torchrun.py", "tensor_parallel_torchrun.py", "context_parallel_torchrun.py"]
)
def test_mesh_examples_train(tmp_path: Path, script: str) -> None:
    args = ["--windows", "15"] if script.startswith("context") else ["--epochs", "1"]
    stdout = run_torchrun(TESTS.parent / "examples" / script, 4, *args, cwd=tmp_path)
    losses = [
        float(line.split(" loss ")[1].split()[0])
        for line in stdout.splitlines()
        if " loss " in line
    ]
    assert len(losses) >= 2 and losses[-1] < losses[0], stdout
