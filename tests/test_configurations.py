"""Whole configurations, drawn at random: exact per the contract, or refused without a trace.

Issue 15's "never again" suite. Hypothesis draws a configuration people run:

- model features: ghost BatchNorm (``tb.nn.convert_batchnorm``), split-invariant
  dropout (``tb.nn.convert_dropout``), a frozen, a tied and an unused parameter,
  a per-sample conditional branch (a micro-batch may not reach it), activation
  checkpointing (both reentrant modes), a module and parameter group added
  after the first window;
- optimizer: SGD (momentum, nesterov, weight decay), Adam, AdamW; one or two
  parameter groups; all trainable parameters or a subset;
- scheduler: none, StepLR, LambdaLR, OneCycleLR, ReduceLROnPlateau (on the
  window's mean loss); a CPU GradScaler or none; clipping or none;
- batch container: tensor, tuple, dict, UserDict, dataclass, namedtuple, with
  per-sample strings that weight each sample's loss (a misaligned string
  changes the gradient); a loss_fn that draws from the global RNG;
- windows: micro-batches of equal, ragged, short and empty windows through
  ``step_window`` or one batch through ``step``, split further by
  ``micro_batch_size``;
- an exception (or a KeyboardInterrupt) injected at a random pass, or raised by
  the optimizer's step after it changed the parameters.

Every window is run twice from the same state: by truebatch, and by the plain
float64 reference written out here (the window's samples as one batch, the mean
loss, one step through the same optimizer, scheduler and scaler types, clipping
the parameters the optimizer updates). Before each window the reference takes
truebatch's state, so each window is compared *at the same weights*, as the
contract states: the gradient handed to the optimizer and the update, per
tensor with :func:`truebatch.max_relative_difference`, within the float64
tolerance; the loss, count, norm, buffers, optimizer state, learning rates and
scale. A window that raises must leave everything as before it: parameters,
buffers, optimizer, scheduler, scaler, RNG and gradients (snapshots compared
exactly); an error truebatch raises itself is allowed only on those terms.

Profiles: the default runs a fixed set of examples (derandomized) in well
under two minutes on two cores; ``TRUEBATCH_HYPOTHESIS=thorough`` draws many
more, at random.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import traceback
from collections import UserDict, namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import truebatch as tb
from truebatch import _context
from truebatch.compare import TOLERANCES

TOL = TOLERANCES[torch.float64]
FEATURES, HIDDEN, CLASSES, GHOST = 4, 6, 3, 2
PACKAGE = Path(tb.__file__).resolve().parent

THOROUGH = os.environ.get("TRUEBATCH_HYPOTHESIS") == "thorough"
PROFILE = settings(
    max_examples=2000 if THOROUGH else 300,
    derandomize=not THOROUGH,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Injected(RuntimeError):
    """The exception loss_fn raises at the drawn pass."""


# ---------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Config:
    ghost_bn: bool
    dropout: bool
    frozen: bool
    tied: bool
    unused: bool
    conditional: bool
    checkpoint: str | None  # None, "reentrant", "non_reentrant"
    grown: bool
    optimizer: str
    momentum: float
    nesterov: bool
    weight_decay: float
    groups: int
    subset: bool
    scheduler: str
    scaler: bool
    clip: float | None
    container: str
    strings: bool
    draws_random: bool  # loss_fn draws from the global RNG (logging a random sample, say)
    windows: tuple[tuple[str, tuple[int, ...]], ...]  # ("step" | "window", sizes)
    micro_batch_size: int | None
    # (window, pass, "error" | "interrupt" | "optimizer"): "optimizer" fails in the
    # optimizer's step, after it changed the parameters.
    failure: tuple[int, int, str] | None
    atomic_step: bool
    seed: int


@st.composite
def configs(draw: st.DrawFn) -> Config:
    ghost_bn = draw(st.booleans())
    unit = GHOST if ghost_bn else 1
    optimizer = draw(st.sampled_from(["sgd", "adam", "adamw"]))
    momentum = draw(st.sampled_from([0.0, 0.9])) if optimizer == "sgd" else 0.0
    sizes = st.integers(1, 3).map(lambda n: n * unit)
    window = st.tuples(
        st.sampled_from(["step", "window"]), st.lists(sizes, min_size=0, max_size=3).map(tuple)
    )
    windows = draw(st.lists(window, min_size=1, max_size=3).map(tuple))
    container = draw(st.sampled_from(CONTAINERS))
    scheduler = draw(st.sampled_from(["none", "step", "lambda", "onecycle", "plateau"]))
    return Config(
        ghost_bn=ghost_bn,
        dropout=draw(st.booleans()),
        frozen=draw(st.booleans()),
        tied=draw(st.booleans()),
        unused=draw(st.booleans()),
        conditional=draw(st.booleans()),
        checkpoint=draw(st.sampled_from([None, "reentrant", "non_reentrant"])),
        # A group added later needs a scheduler that handles new groups.
        grown=scheduler in ("none", "step") and len(windows) > 1 and draw(st.booleans()),
        optimizer=optimizer,
        momentum=momentum,
        nesterov=momentum > 0 and draw(st.booleans()),
        weight_decay=draw(st.sampled_from([0.0, 0.01])),
        groups=draw(st.integers(1, 2)),
        subset=draw(st.booleans()),
        scheduler=scheduler,
        scaler=draw(st.booleans()),
        clip=draw(st.sampled_from([None, 0.05, 100.0])),
        container=container,
        strings=container != "tensor" and draw(st.booleans()),
        draws_random=draw(st.booleans()),
        windows=windows,
        micro_batch_size=draw(st.sampled_from([None, unit, 2 * unit])),
        failure=draw(
            st.none()
            | st.tuples(
                st.integers(0, len(windows) - 1),
                st.integers(0, 4),
                st.sampled_from(["error", "interrupt", "optimizer"]),
            )
        ),
        atomic_step=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


# ------------------------------------------------------------------------ model


class Net(nn.Module):
    """``input -> [BN] -> tanh -> block (hidden, tanh, [dropout]) -> [tied] -> [branches]
    -> [adapter] -> head``; ``block`` may run under activation checkpointing."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.use_checkpoint = config.checkpoint is not None
        self.input = nn.Linear(FEATURES, HIDDEN, bias=not config.ghost_bn)
        self.norm = nn.BatchNorm1d(HIDDEN) if config.ghost_bn else nn.Identity()
        self.block = nn.Sequential(
            nn.Linear(HIDDEN, HIDDEN),
            nn.Tanh(),
            nn.Dropout(0.3) if config.dropout else nn.Identity(),
        )
        if config.tied:
            self.tied = nn.Linear(HIDDEN, HIDDEN)
            self.tied.weight = self.block[0].weight
        if config.conditional:
            self.left, self.right = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        if config.unused:
            self.unused = nn.Linear(HIDDEN, 2)
        self.head = nn.Linear(HIDDEN, CLASSES)
        if config.frozen:
            self.block[0].bias.requires_grad_(False)
        self.adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.input(x)))
        if self.use_checkpoint:
            reentrant = self.config.checkpoint == "reentrant"
            h = checkpoint(self.block, h, use_reentrant=reentrant)
        else:
            h = self.block(h)
        if self.config.tied:
            h = torch.tanh(self.tied(h))
        if self.config.conditional:
            # Per-sample routing: a micro-batch without such samples never reaches a branch.
            left = (x[:, 0] > 0).nonzero().flatten()
            right = (x[:, 0] <= 0).nonzero().flatten()
            if len(left):
                h = h.index_copy(0, left, torch.tanh(self.left(h[left])))
            if len(right):
                h = h.index_copy(0, right, torch.tanh(self.right(h[right])))
        if self.adapter is not None:
            h = h + self.adapter(h)
        return self.head(h)


def build_model(config: Config) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Net(config).double()
    if config.ghost_bn:
        model = tb.nn.convert_batchnorm(model, ghost_batch_size=GHOST)
    if config.dropout:
        model = tb.nn.convert_dropout(model, seed=config.seed)
    return model


def grow(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    """A new module (an adapter) and its parameter group, after the Accumulator exists."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model.adapter = nn.Linear(HIDDEN, HIDDEN).double()
    optimizer.add_param_group({"params": list(model.adapter.parameters()), "lr": 0.02})


def build_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if config.subset:  # the head's bias is trained by no optimizer
        trainable = [(name, p) for name, p in trainable if name != "head.bias"]
    first = [p for name, p in trainable if name.startswith(("input", "norm"))]
    rest = [p for name, p in trainable if not name.startswith(("input", "norm"))]
    groups = (
        [{"params": first + rest}]
        if config.groups == 1
        else [{"params": first, "lr": 0.03}, {"params": rest, "weight_decay": 0.0}]
    )
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=0.1,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    kind = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return kind(groups, lr=0.01, weight_decay=config.weight_decay or 0.1)


def halve(epoch: int) -> float:
    return 1.0 / (1.0 + epoch)


def build_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> Any:
    schedulers = torch.optim.lr_scheduler
    if config.scheduler == "step":
        return schedulers.StepLR(optimizer, step_size=1, gamma=0.5)
    if config.scheduler == "lambda":
        return schedulers.LambdaLR(optimizer, halve)
    if config.scheduler == "onecycle":
        cycle = config.optimizer != "sgd" or config.momentum > 0
        return schedulers.OneCycleLR(optimizer, max_lr=0.1, total_steps=10, cycle_momentum=cycle)
    if config.scheduler == "plateau":
        return schedulers.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    return None


def build_scaler(config: Config) -> torch.amp.GradScaler | None:
    if not config.scaler:
        return None
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)


# ------------------------------------------------------------------------- data

Pair = namedtuple("Pair", ["x", "y", "names"])


@dataclasses.dataclass
class Example:
    x: torch.Tensor
    y: torch.Tensor
    names: list[str] | None = None


class Features(UserDict):
    """A UserDict subclass, like transformers' BatchEncoding."""


CONTAINERS = ["tensor", "tuple", "dict", "userdict", "dataclass", "namedtuple"]


def make_batch(container: str, x: torch.Tensor, y: torch.Tensor, names: list[str] | None) -> Any:
    if container == "tensor":
        return torch.cat([x, y[:, None].to(x.dtype)], 1)
    if container == "tuple":
        return (x, y) if names is None else (x, y, names)
    if container == "namedtuple":
        return Pair(x, y, names)
    if container == "dataclass":
        return Example(x, y, names)
    fields = {"x": x, "y": y} if names is None else {"x": x, "y": y, "names": names}
    return fields if container == "dict" else Features(fields)


def unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    if isinstance(batch, torch.Tensor):
        return batch[:, :-1], batch[:, -1].long(), None
    if isinstance(batch, Pair | Example):
        return batch.x, batch.y, batch.names
    if isinstance(batch, tuple):
        return batch[0], batch[1], batch[2] if len(batch) > 2 else None
    return batch["x"], batch["y"], batch.get("names")


def samples(config: Config, window: int, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(config.seed * 7 + window)
    x = torch.randn(n, FEATURES, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    lengths = torch.randint(1, 5, (n,), generator=g).tolist()
    return x, y, ["s" * k for k in lengths]


def loss_sum(model: nn.Module, batch: Any) -> torch.Tensor:
    """The sum over samples of each one's cross-entropy, weighted by its name's length."""
    x, y, names = unpack(batch)
    losses = F.cross_entropy(model(x), y, reduction="none")
    if names is not None:
        assert len(names) == len(y), "per-sample names misaligned with the rows"
        losses = losses * torch.tensor([float(len(n)) for n in names], dtype=losses.dtype)
    return losses.sum()


# -------------------------------------------------------------------- snapshots


def snapshot(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any
) -> dict[str, Any]:
    """Everything a window may change, deep-copied."""
    return copy.deepcopy(
        {
            "parameters": [p.detach() for p in model.parameters()],
            "grads": [p.grad for p in model.parameters()],
            "buffers": [b for b in model.buffers()],
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": torch.get_rng_state(),
        }
    )


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths at which two snapshots differ (tensors compared exactly, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}[{k!r}]")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path} length {len(a)} vs {len(b)}"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{path}[{i}]")
        ]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def raised_by_truebatch(error: BaseException) -> bool:
    """Whether ``error`` was raised by truebatch's own code (its innermost frame)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE)


# -------------------------------------------------------------------- reference


def optimized(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def reference_window(
    config: Config, reference: Trainer, batch: Any, n: int, window_index: int
) -> tuple[float, float, list[torch.Tensor | None]]:
    """The plain big-batch step: mean loss, backward, (unscale), clip the optimizer's
    parameters, step, (scaler update), schedule. Returns loss, norm and stepped grads."""
    model, optimizer = reference.model, reference.optimizer
    scheduler, scaler = reference.scheduler, reference.scaler
    model.zero_grad(set_to_none=True)
    # The same dropout masks as truebatch's window: window index, samples from 0.
    with _context.micro_batch(window_index, 0):
        loss = loss_sum(model, batch) / n
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in optimized(optimizer) if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip if config.clip else math.inf))
    stepped = [p.grad.clone() if p.grad is not None else None for p in optimized(optimizer)]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(loss.item())
    elif scheduler is not None:
        scheduler.step()
    model.zero_grad(set_to_none=True)
    return loss.item(), norm, stepped


# ------------------------------------------------------------------------ suite


class FailingLoss:
    """``loss_sum``, raising the drawn exception at pass ``failure[1]`` of the window,
    or arming ``optimizer_fails`` for the optimizer's step."""

    def __init__(self, failure: tuple[int, int, str] | None, *, draws_random: bool) -> None:
        self.failure = failure
        self.draws_random = draws_random
        self.passes = 0
        self.optimizer_fails = failure is not None and failure[2] == "optimizer"

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self.failure is not None and self.passes == self.failure[1]:
            if self.failure[2] == "error":
                raise Injected("injected in loss_fn")
            if self.failure[2] == "interrupt":
                raise KeyboardInterrupt
        self.passes += 1
        if self.draws_random:
            torch.rand(())  # advances the RNG, which a failed window must restore
        return loss_sum(model, batch)

    def after_step(self, *_: Any) -> None:
        """An optimizer step post-hook: fails once the parameters have changed."""
        if self.optimizer_fails:
            raise Injected("injected in optimizer.step, after the update")


@dataclasses.dataclass
class Trainer:
    """A model with its optimizer, scheduler and scaler: truebatch's or the reference's."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any

    @classmethod
    def build(cls, config: Config) -> Trainer:
        model = build_model(config)
        optimizer = build_optimizer(config, model)
        return cls(model, optimizer, build_scheduler(config, optimizer), build_scaler(config))

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self.model, self.optimizer, self.scheduler, self.scaler)

    def load(self, other: Trainer) -> None:
        """Take ``other``'s state: the next window starts at the same weights."""
        self.model.load_state_dict(other.model.state_dict())
        self.optimizer.load_state_dict(copy.deepcopy(other.optimizer.state_dict()))
        if other.scheduler is not None:
            self.scheduler.load_state_dict(copy.deepcopy(other.scheduler.state_dict()))
        if other.scaler is not None:
            self.scaler.load_state_dict(other.scaler.state_dict())


def window_batches(config: Config, index: int, sizes: tuple[int, ...]) -> tuple[list[Any], Any]:
    """The window's micro-batches of ``sizes`` samples, and all of them as one batch."""
    x, y, names = samples(config, index, sum(sizes))
    names = names if config.strings else None
    pieces, start = [], 0
    for size in sizes:
        part = slice(start, start + size)
        piece_names = None if names is None else names[part]
        pieces.append(make_batch(config.container, x[part], y[part], piece_names))
        start += size
    return pieces, make_batch(config.container, x, y, names)


def run(config: Config) -> None:
    ours = Trainer.build(config)
    reference = Trainer.build(dataclasses.replace(config, checkpoint=None))
    replay = Trainer.build(dataclasses.replace(config, checkpoint=None))
    before = ours.snapshot()
    try:
        acc = tb.Accumulator(
            ours.model,
            ours.optimizer,
            ours.scheduler,
            micro_batch_size=config.micro_batch_size,
            max_grad_norm=config.clip,
            scaler=ours.scaler,
            atomic_step=config.atomic_step,
        )
    except Exception as error:  # a refusal at construction: truebatch's, and no trace
        assert raised_by_truebatch(error), f"not a truebatch error: {error!r}"
        assert differences(before, ours.snapshot()) == []
        return

    failing = [FailingLoss(None, draws_random=False)]  # the current window's
    ours.optimizer.register_step_post_hook(lambda *args: failing[0].after_step(*args))
    seen: list[list[torch.Tensor | None]] = []
    ours.optimizer.register_step_pre_hook(
        lambda *_: seen.append(
            [p.grad.clone() if p.grad is not None else None for p in optimized(ours.optimizer)]
        )
    )
    for index, (mode, sizes) in enumerate(config.windows):
        if config.grown and index == 1:
            grow(ours.model, ours.optimizer, config.seed)
            grow(reference.model, reference.optimizer, config.seed)
            grow(replay.model, replay.optimizer, config.seed)
        pieces, full = window_batches(config, index, sizes)
        n = sum(sizes)
        if mode == "step" and n == 0:
            mode = "window"  # an empty batch has no tensor to split: an empty window instead
        reference.load(ours)
        replay.load(ours)
        window_index = acc.state_dict()["window"]
        parameters_before = [p.detach().clone() for p in optimized(ours.optimizer)]
        state_before = ours.snapshot()
        failure = config.failure if config.failure and config.failure[0] == index else None
        loss_fn = failing[0] = FailingLoss(failure, draws_random=config.draws_random)
        steps_before = len(seen)
        try:
            run_window = acc.step if mode == "step" else acc.step_window
            result = run_window(full if mode == "step" else pieces, loss_fn)
        except (Injected, KeyboardInterrupt) as error:
            changed = differences(state_before, ours.snapshot())
            if loss_fn.optimizer_fails and not config.atomic_step:
                # Without atomic_step, an exception after the update leaves the update (the
                # parameters and the optimizer's state) and says so; nothing else changes.
                assert any("parameters" in n for n in getattr(error, "__notes__", [])), error
                changed = [
                    c for c in changed if not c.startswith(("['parameters']", "['optimizer']"))
                ]
            assert changed == [], f"{type(error).__name__} at pass {loss_fn.passes} left {changed}"
            continue
        except Exception as error:
            assert raised_by_truebatch(error), f"not a truebatch error: {error!r}"
            changed = differences(state_before, ours.snapshot())
            assert changed == [], f"{error!r} left {changed}"
            continue

        if n == 0:
            assert not result.stepped and result.count == 0 and len(seen) == steps_before
            assert differences(state_before, ours.snapshot()) == []
            continue
        loss, norm, stepped = reference_window(config, reference, full, n, window_index)
        assert result.stepped and result.count == n
        assert len(seen) == steps_before + 1, "the optimizer did not step exactly once"
        assert tb.max_relative_difference(seen[-1], stepped) <= TOL, "gradient"
        assert abs(result.loss - loss) <= TOL * abs(loss), "loss"
        assert abs(result.grad_norm - norm) <= TOL * norm, "grad_norm"
        assert_same_state(ours, reference, replay, seen[-1], parameters_before)


def assert_same_state(
    ours: Trainer,
    reference: Trainer,
    replay: Trainer,
    gradient: list[torch.Tensor | None],
    before: list[torch.Tensor],
) -> None:
    """After a window from the same state: the update and optimizer state the optimizer
    makes from the gradient truebatch handed it (``replay``, stepped here from the same
    state), the reference's buffers, schedule and scale, and no gradient left.

    The update is compared with the replay, not the reference: Adam turns a tensor
    whose exact gradient is ~0 (rounding noise) into a full step, so the contract
    judges the gradient (checked against the reference) and not the update.
    """
    for p, g in zip(optimized(replay.optimizer), gradient, strict=True):
        p.grad = g
    replay.optimizer.step()
    update = [p.detach() - q for p, q in zip(optimized(ours.optimizer), before, strict=True)]
    expected = [p.detach() - q for p, q in zip(optimized(replay.optimizer), before, strict=True)]
    assert tb.max_relative_difference(update, expected) <= TOL, "update"
    assert_same_optimizer_state(ours.optimizer, replay.optimizer)
    buffers = dict(ours.model.named_buffers())
    assert tb.max_relative_difference(buffers, dict(reference.model.named_buffers())) <= TOL
    if ours.scheduler is not None:
        epochs = [t.scheduler.state_dict()["last_epoch"] for t in (ours, reference)]
        assert epochs[0] == epochs[1], "scheduler steps"
        lrs = [[g["lr"] for g in t.optimizer.param_groups] for t in (ours, reference)]
        assert lrs[0] == lrs[1], "learning rates"
    if ours.scaler is not None:
        assert ours.scaler.get_scale() == reference.scaler.get_scale(), "scale"
    assert all(p.grad is None for p in ours.model.parameters()), "gradients left after the step"


def assert_same_optimizer_state(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer) -> None:
    """Per-parameter state (momentum, moments, step); the learning rates are the
    scheduler's, compared with the reference's."""
    for p, q in zip(optimized(ours), optimized(theirs), strict=True):
        state, ref_state = ours.state.get(p, {}), theirs.state.get(q, {})
        assert state.keys() == ref_state.keys()
        for key in state:
            a, b = state[key], ref_state[key]
            if isinstance(a, torch.Tensor):
                assert tb.max_relative_difference([a], [b]) <= TOL, f"optimizer state {key}"
            else:
                assert a == b, f"optimizer state {key}"


@PROFILE
@given(configs())
def test_configuration_is_exact_or_refused_without_a_trace(config: Config) -> None:
    run(config)


CASES: dict[str, dict[str, Any]] = {
    "plain_sgd": {},
    "everything": dict(
        ghost_bn=True,
        dropout=True,
        frozen=True,
        tied=True,
        unused=True,
        conditional=True,
        optimizer="adamw",
        groups=2,
        scheduler="onecycle",
        clip=0.05,
        container="userdict",
        strings=True,
    ),
    "scaler_and_subset": dict(scaler=True, subset=True, clip=0.05),
    "subset_clipped": dict(subset=True, clip=0.05),
    "grown": dict(grown=True),
    "plateau": dict(scheduler="plateau"),
    "error_with_ghost_bn": dict(ghost_bn=True, failure=(0, 1, "error")),
    "interrupt_with_ghost_bn": dict(ghost_bn=True, failure=(1, 2, "interrupt")),
    "optimizer_step_fails": dict(optimizer="adam", failure=(1, 0, "optimizer")),
    "optimizer_step_fails_atomic": dict(
        optimizer="adam", failure=(1, 0, "optimizer"), atomic_step=True
    ),
    "error_after_random_draws": dict(draws_random=True, failure=(0, 2, "error")),
    "checkpointed_dropout": dict(dropout=True, checkpoint="non_reentrant"),
    "checkpointed_dropout_reentrant": dict(dropout=True, checkpoint="reentrant"),
}


@pytest.mark.parametrize("changes", CASES.values(), ids=list(CASES))
def test_named_configuration(changes: dict[str, Any]) -> None:
    """Configurations issue 15 names, always run whatever hypothesis draws."""
    base = Config(
        ghost_bn=False,
        dropout=False,
        frozen=False,
        tied=False,
        unused=False,
        conditional=False,
        checkpoint=None,
        grown=False,
        optimizer="sgd",
        momentum=0.9,
        nesterov=False,
        weight_decay=0.0,
        groups=1,
        subset=False,
        scheduler="none",
        scaler=False,
        clip=None,
        container="tuple",
        strings=False,
        draws_random=False,
        windows=(("window", (4, 2)), ("step", (6,)), ("window", ())),
        micro_batch_size=2,
        failure=None,
        atomic_step=False,
        seed=0,
    )
    run(dataclasses.replace(base, **changes))
