"""Saving and resuming: stop after 6 windows, go on elsewhere, end bitwise where 12 end.

The model draws random numbers in two ways, so both parts of the
Accumulator's own state matter: ``nn.Dropout`` reads the global RNG (saved in
``state_dict()["rng"]``) and ``SplitInvariantDropout`` hashes the window index
(``state_dict()["window"]``). Resuming in a new process is compared with
``torch.equal`` against the run that never stopped; leaving either part out
is shown to change the result, so the comparison can fail.

Run as a script (``python tests/test_state.py CHECKPOINT OUTPUT``), this file
is the new process: it loads CHECKPOINT into fresh objects, trains the
remaining windows and saves the final state to OUTPUT.
"""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import truebatch as tb
import truebatch.nn as tnn
from models import CLASSES, FEATURES, TASKS, assert_bitwise_equal, seeded

WINDOWS = 12
SAVED_AFTER = 6
TASK = TASKS["mlp"]


def dropout_model() -> nn.Sequential:
    """An MLP with both kinds of dropout; layer_id fixed so every process draws alike."""
    return nn.Sequential(
        nn.Linear(FEATURES, 16),
        nn.Tanh(),
        nn.Dropout(0.3),
        nn.Linear(16, 16),
        nn.Tanh(),
        tnn.SplitInvariantDropout(0.3, layer_id=0),
        nn.Linear(16, CLASSES),
    )


@dataclass
class Training:
    """Everything a resumed run rebuilds: model, AdamW, a cosine schedule, the Accumulator."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    acc: tb.Accumulator

    @classmethod
    def fresh(cls) -> Training:
        model = seeded(dropout_model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=WINDOWS)
        acc = tb.Accumulator(model, optimizer, scheduler, micro_batch_size=5, max_grad_norm=1.0)
        return cls(model, optimizer, scheduler, acc)

    def train(self, windows: range) -> tb.StepResult:
        """Window ``w`` is the same 16 samples in every run (5 + 5 + 5 + 1 per window)."""
        for window in windows:
            result = self.acc.step(TASK.batch(16, window), TASK.loss_sum)
            assert result.stepped, result.skip_reason
        return result

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "accumulator": self.acc.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.acc.load_state_dict(state["accumulator"])


def serialized(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def loaded(data: bytes) -> dict[str, Any]:
    """A fresh copy of a saved state (``torch.load``'s default, ``weights_only=True``)."""
    return torch.load(io.BytesIO(data))


@pytest.fixture(scope="module")
def straight() -> dict[str, Any]:
    """The final state of the run that never stopped."""
    torch.manual_seed(0)
    run = Training.fresh()
    run.train(range(WINDOWS))
    return loaded(serialized(run.state_dict()))


@pytest.fixture(scope="module")
def checkpoint() -> bytes:
    """The same run's state after SAVED_AFTER windows, serialized with torch.save."""
    torch.manual_seed(0)
    run = Training.fresh()
    run.train(range(SAVED_AFTER))
    return serialized(run.state_dict())


def resume(checkpoint: Path, output: Path) -> None:
    """The new process: fresh objects, the checkpoint, the remaining windows, the final state."""
    run = Training.fresh()
    run.load_state_dict(torch.load(checkpoint))
    run.train(range(SAVED_AFTER, WINDOWS))
    torch.save(run.state_dict(), output)


def test_resume_in_a_new_process_is_bitwise_equal_to_never_stopping(
    tmp_path: Path, checkpoint: bytes, straight: dict[str, Any]
) -> None:
    saved, output = tmp_path / "window6.pt", tmp_path / "window12.pt"
    saved.write_bytes(checkpoint)

    subprocess.run(
        [sys.executable, __file__, str(saved), str(output)],
        check=True,
        timeout=120,
        capture_output=True,
    )

    resumed = torch.load(output)
    for name, parameter in straight["model"].items():
        assert torch.equal(resumed["model"][name], parameter), name
    assert_bitwise_equal(resumed, straight)
    assert resumed["accumulator"]["window"] == WINDOWS


def test_resume_in_the_same_process_is_bitwise_equal_to_never_stopping(
    checkpoint: bytes, straight: dict[str, Any]
) -> None:
    """Here the model's and the Accumulator's state dicts alone: the latter holds the
    optimizer's and the scheduler's, so the two make a complete checkpoint."""
    state = loaded(checkpoint)
    torch.manual_seed(1234)  # the resumed run must not depend on the RNG it starts with
    run = Training.fresh()
    run.model.load_state_dict(state["model"])
    run.acc.load_state_dict(state["accumulator"])
    assert run.train(range(SAVED_AFTER, WINDOWS)).step == WINDOWS

    assert_bitwise_equal(run.state_dict(), straight)


@pytest.mark.parametrize("forgotten", ["rng", "window"])
def test_a_resume_without_the_accumulator_state_differs(
    forgotten: str, checkpoint: bytes, straight: dict[str, Any]
) -> None:
    """The control: the model really depends on both parts of the Accumulator's state."""
    state = loaded(checkpoint)
    if forgotten == "window":
        state["accumulator"]["window"] = 0
    run = Training.fresh()
    run.load_state_dict(state)
    if forgotten == "rng":
        torch.manual_seed(0)
    run.train(range(SAVED_AFTER, WINDOWS))

    for name, parameter in run.model.named_parameters():
        assert not torch.equal(parameter, straight["model"][name]), name


# ------------------------------------------------------------- round trips


def sgd_accumulator(
    scheduler: bool = False, scaler: bool = False, model: nn.Module | None = None, **options: Any
) -> tb.Accumulator:
    """SGD with momentum on the float64 MLP (or ``model``), optionally a StepLR and a scaler."""
    model = model if model is not None else seeded(TASK.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return tb.Accumulator(
        model,
        optimizer,
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=1) if scheduler else None,
        scaler=torch.amp.GradScaler("cpu") if scaler else None,
        **options,
    )


def test_missing_keys_are_named() -> None:
    acc = sgd_accumulator()
    with pytest.raises(
        KeyError, match=r"`state` got no keys \['optimizer', 'rng'\]; expected.*state_dict\(\)"
    ):
        acc.load_state_dict({"window": 3})


@pytest.mark.parametrize(
    ("saved", "loading", "words"),
    [
        ({"scheduler": True}, {}, "got a scheduler; expected none"),
        ({}, {"scheduler": True}, "got no scheduler; expected one"),
        ({"scaler": True}, {}, "got a scaler; expected none"),
        ({}, {"scaler": True}, "got no scaler; expected one"),
    ],
    ids=["saved_scheduler", "loading_scheduler", "saved_scaler", "loading_scaler"],
)
def test_a_state_from_an_accumulator_built_differently_is_refused_untouched(
    saved: dict[str, bool], loading: dict[str, bool], words: str
) -> None:
    """The refusal names the difference, and nothing is half-loaded: regression, the
    optimizer state and window count used to be loaded before the check raised."""
    source, target = sgd_accumulator(**saved), sgd_accumulator(**loading)
    for acc, seed in ((source, 1), (source, 2), (target, 3)):
        acc.step(TASK.batch(8, seed), TASK.loss_sum)
    state, before = source.state_dict(), loaded(serialized(target.state_dict()))

    with pytest.raises(ValueError, match=f"{words}.*Fix: construct it the same way"):
        target.load_state_dict(state)

    assert_bitwise_equal(target.state_dict(), before)


class Fits(nn.Module):
    """Identity with room for ``limit`` samples: more raise torch.OutOfMemoryError."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"injected: {x.shape[0]} > {self.limit}")
        return x


def test_the_size_auto_found_is_resumed_without_running_out_of_memory_again() -> None:
    def gated() -> tuple[tb.Accumulator, Fits]:
        fits = Fits(limit=4)
        model = seeded(lambda: nn.Sequential(nn.Linear(FEATURES, 8), fits, nn.Linear(8, CLASSES)))
        return sgd_accumulator(model=model, micro_batch_size="auto"), model[1]

    acc, fits = gated()
    acc.step(TASK.batch(16, 1), TASK.loss_sum)
    assert fits.seen[:2] == [16, 8]  # two out-of-memory attempts before 4 fits

    resumed, fits = gated()
    resumed.load_state_dict(loaded(serialized(acc.state_dict())))
    result = resumed.step(TASK.batch(16, 2), TASK.loss_sum)

    assert fits.seen == [4, 4, 4, 4]
    assert result.micro_batch_size == 4 and result.step == 2


if __name__ == "__main__":
    resume(Path(sys.argv[1]), Path(sys.argv[2]))
