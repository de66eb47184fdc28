"""Resuming exactly: the data position (tb.windows), the checkpoint file, and killed runs.

The reference is always the run that never stopped, compared with
``torch.equal``: the micro-batches it reads, the random numbers it draws, the
parameters it ends with. A resumed run is built from fresh objects in a
scrambled random state, as a new process would be. The fault-injection tests
(``resume_workers.py``) kill real processes with SIGKILL, mid-window and
mid-save, one process and two torchrun ranks, and restart them.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

import resume_workers as workers
import truebatch as tb
from models import assert_bitwise_equal

WORKERS = Path(workers.__file__)
SAMPLES = 22  # micro-batches of 3: 3 3 3 3 3 3 3 1, windows of 3: 3 3 2 per epoch
EPOCHS = 3


class Noisy(Dataset):
    """Item ``i`` plus noise drawn when read from torch's, Python's and NumPy's generators."""

    def __init__(self) -> None:
        self.reads = 0

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads += 1
        noise = torch.rand(()) + random.random() + float(np.random.random())
        return torch.tensor(float(index)) + noise


LOADERS: dict[str, Callable[[], Any]] = {
    "shuffle": lambda: DataLoader(Noisy(), batch_size=3, shuffle=True),
    "generator": lambda: DataLoader(
        Noisy(), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(5)
    ),
    "distributed": lambda: DataLoader(
        Noisy(), batch_size=3, sampler=DistributedSampler(Noisy(), num_replicas=2, rank=1, seed=4)
    ),
    "stateful": lambda: StatefulDataLoader(Noisy(), batch_size=3, shuffle=True),
    "list": lambda: [torch.full((2,), float(i)) for i in range(7)],
}


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def scramble() -> None:
    """A new process's random state: anything but the saved one."""
    seed_all(999)


def host_rng() -> tuple[Any, ...]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def host_rng_bytes() -> tuple[bytes, ...]:
    """The host generators' states, comparable with ``==``."""
    torch_state, python_state, numpy_state = host_rng()
    return torch_state.numpy().tobytes(), pickle.dumps(python_state), pickle.dumps(numpy_state)


def set_host_rng(state: tuple[Any, ...]) -> None:
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


def consume(windows: tb.Windows[Any], stop: int | None = None) -> list[Any]:
    """Run the epochs left, a "training step" (a random draw) after each window.

    Returns each window with the draw after it; stops after ``stop`` windows.
    """
    seen: list[Any] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdata's deprecation warnings
        for _ in range(windows.epoch, EPOCHS):
            for window in windows:
                seen.append((windows.epoch, window, torch.rand(2)))
                if len(seen) == stop:
                    return seen
    return seen


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


# ------------------------------------------------------------------- windows


def test_each_pass_is_an_epoch_and_next_works() -> None:
    windows = tb.windows(range(5), 2)
    assert next(windows) == [0, 1]
    assert list(windows) == [[2, 3], [4]]
    assert windows.epoch == 1
    assert list(windows) == [[0, 1], [2, 3], [4]] and windows.epoch == 2


@pytest.mark.parametrize("kind", list(LOADERS))
@settings(max_examples=12)
@given(stop=st.integers(1, 3 * EPOCHS))
def test_resumed_windows_read_and_draw_what_the_uninterrupted_ones_do(kind: str, stop: int) -> None:
    seed_all(0)
    straight = consume(tb.windows(LOADERS[kind](), 3))
    stop = 1 + (stop - 1) % len(straight)  # loaders have 2 or 3 windows an epoch
    seed_all(0)
    windows = tb.windows(LOADERS[kind](), 3)
    before = consume(windows, stop)
    state, rng = round_trip(windows.state_dict()), host_rng()

    scramble()
    resumed = tb.windows(LOADERS[kind](), 3)
    resumed.load_state_dict(state)
    set_host_rng(rng)
    after = consume(resumed)

    assert len(before) == stop and len(before) + len(after) == len(straight)
    assert_bitwise_equal(before + after, straight, "windows")


@pytest.mark.parametrize("stop", [2, 4])
def test_a_loader_with_worker_processes_is_replayed_exactly(stop: int) -> None:
    """Workers draw from seeds the loader takes from the random state at the epoch start."""

    def loader() -> DataLoader:
        return DataLoader(Noisy(), batch_size=3, shuffle=True, num_workers=2)

    seed_all(0)
    straight = consume(tb.windows(loader(), 3))
    seed_all(0)
    windows = tb.windows(loader(), 3)
    before = consume(windows, stop)
    state, rng = round_trip(windows.state_dict()), host_rng()
    scramble()
    resumed = tb.windows(loader(), 3)
    resumed.load_state_dict(state)
    set_host_rng(rng)
    assert_bitwise_equal(before + consume(resumed), straight, "windows")


def test_the_last_window_of_an_epoch_resumes_at_the_next_epoch_without_reading_again() -> None:
    loader = DataLoader(Noisy(), batch_size=3, shuffle=True)
    windows = tb.windows(loader, 3)
    assert len(consume(windows, 3)) == 3  # the whole first epoch
    state = windows.state_dict()
    assert (state["epoch"], state["window"], state["micro_batch"]) == (1, 0, 0)

    resumed_loader = DataLoader(Noisy(), batch_size=3, shuffle=True)
    resumed = tb.windows(resumed_loader, 3)
    resumed.load_state_dict(state)
    next(resumed)
    assert resumed_loader.dataset.reads == 9  # the first window of epoch 1 only


def test_a_mid_epoch_position_is_epoch_window_and_micro_batch() -> None:
    windows = tb.windows(DataLoader(Noisy(), batch_size=3), 3)
    consume(windows, 5)  # 3 windows of epoch 0, 2 of epoch 1
    state = windows.state_dict()
    assert (state["epoch"], state["window"], state["micro_batch"]) == (1, 2, 6)


def test_set_epoch_is_called_at_every_epoch_and_after_a_resume() -> None:
    sampler = DistributedSampler(Noisy(), num_replicas=2, rank=0)
    windows = tb.windows(DataLoader(Noisy(), batch_size=3, sampler=sampler), 3)
    consume(windows, 3)
    assert sampler.epoch == 1
    state = windows.state_dict()

    other = DistributedSampler(Noisy(), num_replicas=2, rank=0)
    resumed = tb.windows(DataLoader(Noisy(), batch_size=3, sampler=other), 3)
    resumed.load_state_dict(state)
    next(resumed)
    assert other.epoch == 1


def saved_midway(kind: str = "shuffle") -> dict[str, Any]:
    windows = tb.windows(LOADERS[kind](), 3)
    consume(windows, 2)
    return windows.state_dict()


@pytest.mark.parametrize(
    ("loader", "change", "words"),
    [
        ("shuffle", {"size": 2}, "got windows of size 2; expected 3"),
        ("shuffle", {"extra": 1}, "expected the keys"),
        ("shuffle", {"rng": None}, "got rng=None; expected the random state of the epoch"),
        ("generator", {}, "got a loader with 0 torch.Generator\\(s\\); expected 1"),
        ("stateful", {}, "over a loader that has no state; expected the same kind"),
    ],
)
def test_a_state_of_other_windows_is_refused_untouched(
    loader: str, change: dict[str, Any], words: str
) -> None:
    windows = tb.windows(LOADERS[loader](), 3)
    consume(windows, 1)
    before = windows.state_dict()
    state = {**saved_midway(), **change}

    with pytest.raises(ValueError, match=words):
        windows.load_state_dict(state)

    assert_bitwise_equal(windows.state_dict(), before)


def test_a_loader_shorter_than_the_saved_position_is_an_error() -> None:
    state = saved_midway()
    windows = tb.windows(DataLoader(Noisy(), batch_size=11), 3)  # 2 micro-batches an epoch
    windows.load_state_dict(state)
    with pytest.raises(ValueError, match="got a loader of 2 micro-batches in epoch 0; expected"):
        next(windows)


# ---------------------------------------------------------------- checkpoints


class Run:
    """A run of ``resume_workers``' setup in this process; ``windows`` counts over epochs."""

    def __init__(self) -> None:
        self.acc, self.windows = workers.build("single")

    def train(self, stop: int | None = None) -> Run:
        done = 0
        for _ in range(self.windows.epoch, workers.EPOCHS):
            for window in self.windows:
                self.acc.step_window(window, workers.loss_sum)
                done += 1
                if done == stop:
                    return self
        return self

    def state(self) -> dict[str, Any]:
        return {
            "model": self.acc.model.state_dict(),
            "accumulator": self.acc.state_dict(),
            "windows": self.windows.state_dict(),
        }


def seeded_run() -> Run:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    return Run()


@pytest.fixture(scope="module")
def straight() -> dict[str, Any]:
    return round_trip(seeded_run().train().state())


@pytest.mark.parametrize("stop", [3, 5, 8])
def test_load_checkpoint_continues_bitwise(
    tmp_path: Path, stop: int, straight: dict[str, Any]
) -> None:
    """Window 5 ends the first epoch; the others stop inside one."""
    path = tmp_path / "last.pt"
    run = seeded_run().train(stop)
    tb.save_checkpoint(path, run.acc, windows=run.windows)

    scramble()
    resumed = Run()
    tb.load_checkpoint(path, resumed.acc, windows=resumed.windows)
    assert resumed.acc.state_dict()["window"] == stop

    assert_bitwise_equal(round_trip(resumed.train().state()), straight)


@pytest.mark.parametrize("forgotten", ["python", "numpy"])
def test_a_resume_without_the_host_generators_differs(
    tmp_path: Path, forgotten: str, straight: dict[str, Any]
) -> None:
    """The control: the data's noise really comes from Python's and NumPy's generators."""
    path = tmp_path / "last.pt"
    run = seeded_run().train(4)
    tb.save_checkpoint(path, run.acc, windows=run.windows)
    resumed = Run()
    tb.load_checkpoint(path, resumed.acc, windows=resumed.windows)
    random.seed(5) if forgotten == "python" else np.random.seed(5)

    final = resumed.train().state()["model"]
    assert not any(torch.equal(final[k], v) for k, v in straight["model"].items())


def test_the_scaler_and_auto_size_are_restored(tmp_path: Path) -> None:
    def accumulator() -> tb.Accumulator:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        return tb.Accumulator(model, optimizer, scaler=scaler, micro_batch_size="auto")

    acc = accumulator()
    for seed in range(3):
        acc.step(torch.randn(6, 4, generator=torch.Generator().manual_seed(seed)), _sum_loss)
    tb.save_checkpoint(tmp_path / "c.pt", acc)
    resumed = accumulator()
    tb.load_checkpoint(tmp_path / "c.pt", resumed)
    assert_bitwise_equal(round_trip(resumed.state_dict()), round_trip(acc.state_dict()))
    assert resumed.scaler.get_scale() == 2.0**13


def _sum_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).sum()


# ------------------------------------------------------ damaged or mismatched


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "last.pt"
    run = seeded_run().train(4)
    tb.save_checkpoint(path, run.acc, windows=run.windows)
    return path


def damaged(good: Path, directory: Path, how: str) -> Path:
    data = good.read_bytes()
    edits = {
        "truncated_in_header": data[:40],
        "truncated": data[: len(data) // 2],
        "one_byte_short": data[:-1],
        "appended": data + b"\0",
        "flipped": data[:-500] + bytes([data[-500] ^ 1]) + data[-499:],
        "not_a_checkpoint": b"PK\x03\x04" + data[4:],
    }
    path = directory / f"{how}.pt"
    path.write_bytes(edits[how])
    return path


def other_model(directory: Path) -> Path:
    model = torch.nn.Sequential(torch.nn.Linear(workers.FEATURES, 8), torch.nn.Linear(8, 1))
    acc = tb.Accumulator(model.double(), torch.optim.AdamW(model.parameters()))
    tb.save_checkpoint(directory / "other.pt", acc, windows=Run().windows)
    return directory / "other.pt"


def other_optimizer(directory: Path) -> Path:
    acc = Run().acc
    acc.optimizer = torch.optim.SGD(acc.model.parameters(), lr=0.1)
    tb.save_checkpoint(directory / "sgd.pt", acc, windows=tb.windows(range(3), 3))
    return directory / "sgd.pt"


def no_scheduler(directory: Path) -> Path:
    acc = Run().acc
    acc = tb.Accumulator(acc.model, acc.optimizer)
    tb.save_checkpoint(directory / "no_scheduler.pt", acc, windows=Run().windows)
    return directory / "no_scheduler.pt"


def other_windows(directory: Path) -> Path:
    run = Run()
    tb.save_checkpoint(directory / "size4.pt", run.acc, windows=tb.windows(range(3), 4))
    return directory / "size4.pt"


def no_windows(directory: Path) -> Path:
    tb.save_checkpoint(directory / "no_windows.pt", Run().acc)
    return directory / "no_windows.pt"


BAD: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "truncated_in_header": (lambda g, d: damaged(g, d, "truncated_in_header"), "inside its header"),
    "truncated": (lambda g, d: damaged(g, d, "truncated"), "truncated"),
    "one_byte_short": (lambda g, d: damaged(g, d, "one_byte_short"), "truncated"),
    "appended": (lambda g, d: damaged(g, d, "appended"), "truncated \\(or was appended to\\)"),
    "flipped": (lambda g, d: damaged(g, d, "flipped"), "does not match its SHA-256"),
    "not_a_checkpoint": (lambda g, d: damaged(g, d, "not_a_checkpoint"), "not a truebatch"),
    "other_model": (lambda g, d: other_model(d), "another model's checkpoint: entries .*missing"),
    "other_optimizer": (lambda g, d: other_optimizer(d), "got an optimizer with parameter groups"),
    "no_scheduler": (
        lambda g, d: no_scheduler(d),
        "got no scheduler; expected one, as this Accumulator has",
    ),
    "other_windows": (lambda g, d: other_windows(d), "got windows of size 4; expected 3"),
    "no_windows": (lambda g, d: no_windows(d), "saved without a data position"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_damaged_or_mismatched_checkpoint_is_refused_and_nothing_is_loaded(
    tmp_path: Path, good: Path, case: str
) -> None:
    make, words = BAD[case]
    bad = make(good, tmp_path)
    scramble()
    run = Run().train(2)
    before, rng = round_trip(run.state()), host_rng_bytes()

    with pytest.raises(ValueError, match=words):
        tb.load_checkpoint(bad, run.acc, windows=run.windows)

    assert_bitwise_equal(round_trip(run.state()), before)
    assert host_rng_bytes() == rng, "the random state changed"
    tb.load_checkpoint(good, run.acc, windows=run.windows)  # the previous one still loads
    assert run.acc.state_dict()["window"] == 4


def test_a_failed_save_leaves_the_previous_checkpoint(
    tmp_path: Path, good: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    shutil.copy(good, path)

    def disk_full(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    run = Run().train(1)
    with pytest.raises(OSError, match="No space left"):
        tb.save_checkpoint(path, run.acc, windows=run.windows)

    assert path.read_bytes() == good.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left


def test_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        tb.load_checkpoint(tmp_path / "none.pt", Run().acc)


# ------------------------------------------------------------ killed processes


def run_worker(*args: str, expect_kill: bool = False) -> None:
    completed = subprocess.run(
        [sys.executable, str(WORKERS), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    expected = -9 if expect_kill else 0
    assert completed.returncode == expected, completed.stderr[-3000:]


@pytest.mark.slow
def test_a_run_killed_at_random_windows_and_during_a_save_ends_bitwise_equal(
    tmp_path: Path,
) -> None:
    """One run killed three times mid-window and once during a save, each time restarted."""
    kills = sorted(random.Random(22).sample(range(1, workers.WINDOWS_SINGLE), 4))
    in_save = kills.pop(1)
    run_worker("single", str(tmp_path / "ref.pt"), str(tmp_path / "ref.out"))
    checkpoint, out = str(tmp_path / "run.pt"), str(tmp_path / "run.out")
    for kill in sorted([*kills, in_save]):
        option = "--kill-in-save" if kill == in_save else "--kill-window"
        run_worker("single", checkpoint, out, option, str(kill), expect_kill=True)
        if kill == in_save:
            assert list(tmp_path.glob(".run.pt.*.tmp")), "the killed save left its temporary file"
    run_worker("single", checkpoint, out)

    starts = [int(n) for n in Path(f"{out}.starts").read_text().split()]
    assert starts == [0, *sorted([*kills, in_save])]  # each run started where the last one died
    reference, resumed = torch.load(tmp_path / "ref.out"), torch.load(out)
    assert resumed["windows"] == reference["windows"] == workers.WINDOWS_SINGLE
    assert_bitwise_equal(resumed["params"], reference["params"], "parameters")
    assert not list(tmp_path.glob(".run.pt.*.tmp")), "the next save removed it"


@pytest.mark.slow
def test_the_resumable_example_ends_with_the_parameters_of_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "resumable.py"

    def run(checkpoint: str, *options: str, code: int = 0) -> list[str]:
        arguments = ["--checkpoint", str(tmp_path / checkpoint), "--epochs", "1", *options]
        completed = subprocess.run(
            [sys.executable, str(example), *arguments],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert completed.returncode == code, completed.stderr[-3000:]
        return completed.stdout.splitlines()

    straight = run("straight.pt")
    assert run("killed.pt", "--crash-after", "5", code=-9)[-1].startswith("epoch 0 window   5")
    resumed = run("killed.pt")
    assert resumed[0] == "resumed after window 5 (epoch 0)"
    assert resumed[-1] == straight[-1] and resumed[-1].startswith("parameters sha256 ")
    assert resumed[1:-1] == straight[5:-1]  # windows 6.. print the same losses


@pytest.fixture
def one_rank() -> Any:
    """A process group of this process alone, for FSDP2 without other processes."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def fsdp2_train(acc: tb.Accumulator, windows: tb.Windows[Any], count: int) -> list[torch.Tensor]:
    for _, window in zip(range(count), windows, strict=False):
        acc.step_window(window, workers.loss_sum)
    return [workers.full(p) for p in acc.model.parameters()]


@pytest.mark.parametrize("saved_after", [0, 2])
def test_fsdp2_shards_resume_bitwise(tmp_path: Path, one_rank: None, saved_after: int) -> None:
    """Also before the first step: saving a fresh optimizer must not create its state
    (torch's get_optimizer_state_dict would, and Adam's step count would run ahead)."""
    seed_all(0)
    straight = fsdp2_train(*workers.build("fsdp2"), 4)
    seed_all(0)
    acc, windows = workers.build("fsdp2")
    fsdp2_train(acc, windows, saved_after)
    tb.save_checkpoint(tmp_path / "c.pt", acc, windows=windows)
    assert bool(acc.optimizer.state) == bool(saved_after)
    saved_then_trained = fsdp2_train(acc, windows, 4 - saved_after)

    scramble()
    resumed, resumed_windows = workers.build("fsdp2")
    tb.load_checkpoint(tmp_path / "c.pt", resumed, windows=resumed_windows)
    assert resumed.state_dict()["window"] == saved_after
    assert_bitwise_equal(saved_then_trained, straight, "parameters")
    resumed_params = fsdp2_train(resumed, resumed_windows, 4 - saved_after)
    assert_bitwise_equal(resumed_params, straight, "parameters")


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("flipped", "got shards where .*does not match its SHA-256"),
        ("missing", "got shards where .*is missing"),
        ("no_scheduler", "got no scheduler; expected one, as this Accumulator has"),
    ],
)
def test_damaged_or_mismatched_fsdp2_shards_are_refused_and_nothing_is_loaded(
    tmp_path: Path, one_rank: None, damage: str, words: str
) -> None:
    """Nothing: not the parameters, nor the state of the fresh optimizer (DCP creates it)."""
    seed_all(0)
    acc, windows = workers.build("fsdp2")
    fsdp2_train(acc, windows, 2)
    if damage == "no_scheduler":
        acc = tb.Accumulator(acc.model, acc.optimizer)
    tb.save_checkpoint(tmp_path / "c.pt", acc, windows=windows)
    (shards,) = tmp_path.glob("c.pt.shards-*")
    (shard,) = shards.glob("*.distcp")
    if damage == "flipped":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == "missing":
        shard.unlink()
    fresh, fresh_windows = workers.build("fsdp2")
    before = [workers.full(p) for p in fresh.model.parameters()]

    with pytest.raises(ValueError, match=words):
        tb.load_checkpoint(tmp_path / "c.pt", fresh, windows=fresh_windows)

    assert_bitwise_equal([workers.full(p) for p in fresh.model.parameters()], before)
    assert not fresh.optimizer.state and fresh.state_dict()["window"] == 0


def test_an_unsharded_checkpoint_is_refused_by_a_sharded_model(
    tmp_path: Path, one_rank: None
) -> None:
    tb.save_checkpoint(tmp_path / "c.pt", Run().acc)
    acc, _ = workers.build("fsdp2")
    with pytest.raises(ValueError, match="got an unsharded model's checkpoint; expected a sharded"):
        tb.load_checkpoint(tmp_path / "c.pt", acc)


def torchrun(mode: str, checkpoint: Path, out: Path, *options: str) -> None:
    command = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert command is not None, "torchrun is installed with torch"
    launcher = [command, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]
    completed = subprocess.run(
        [*launcher, str(WORKERS), mode, str(checkpoint), str(out), *options],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]


@pytest.mark.processes
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_torchrun_restarts_a_group_whose_rank_was_killed_and_ends_bitwise_equal(
    tmp_path: Path, mode: str
) -> None:
    """Rank 1 is killed in window 3 of 6; torchrun restarts both ranks from the checkpoint.

    Window 3 opens epoch 1 after a window of 4 samples: it has 24, so the N
    the Accumulator starts a window with (the previous window's) is 6 times
    too small there, and a resume that lost it rounds differently. FSDP2 saves
    and loads its shards with torch.distributed.checkpoint; on the same world
    size the resumed run is bitwise the uninterrupted one (within the
    contract's 1e-12 a fortiori).
    """
    torchrun(mode, tmp_path / "ref.pt", tmp_path / "ref.out")
    torchrun(mode, tmp_path / "run.pt", tmp_path / "run.out", "--kill-window", "3")

    assert Path(f"{tmp_path / 'run.out'}.starts").read_text().split() == ["0", "3"]
    reference, resumed = torch.load(tmp_path / "ref.out"), torch.load(tmp_path / "run.out")
    assert resumed["windows"] == reference["windows"] == 6
    assert tb.max_relative_difference(resumed["params"], reference["params"]) <= 1e-12
    assert_bitwise_equal(resumed["params"], reference["params"], "parameters")
    shards = sorted(p.name for p in tmp_path.glob("run.pt.shards-*"))
    assert len(shards) == (1 if mode == "fsdp2" else 0), shards  # old shards are removed
    check_another_world_size(mode, tmp_path / "run.pt", reference["params"])


def check_another_world_size(mode: str, path: Path, saved: list[torch.Tensor]) -> None:
    """A 2-rank checkpoint on 1 rank: windows refused; model and optimizer load, with a warning.

    FSDP2's shards of 2 ranks are re-split by DCP onto 1.
    """
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        acc, windows = workers.build(mode)
        with pytest.raises(ValueError, match="checkpoint of 2 ranks; expected 1"):
            tb.load_checkpoint(path, acc, windows=windows)
        with pytest.warns(UserWarning, match="random state of 2 ranks cannot be mapped to 1"):
            tb.load_checkpoint(path, acc)
        loaded = [workers.full(p) for p in acc.model.parameters()]
        assert_bitwise_equal(loaded, saved, "parameters")
    finally:
        dist.destroy_process_group()
