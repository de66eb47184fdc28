"""The runs :func:`truebatch.check` compares, each on a fresh copy of the model.

A window runs through the Accumulator's own ``accumulate`` (the gradient it
leaves is ``(1/N) * sum_j d(loss_sum_j)/d(params)``), with a :class:`Probe`
recording or comparing every module call. The global RNG is seeded the same
before each window (inside the caller's ``fork_rng``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from truebatch import _context
from truebatch._probe import Probe
from truebatch.accumulator import Accumulator, LossFn
from truebatch.batching import Batch, Counter, batch_size, map_tensors, split, tensor_leaves

__all__ = [
    "SEED",
    "Gradients",
    "Mode",
    "Outcome",
    "OutputGradient",
    "Runs",
    "run_alone",
    "unwrapped",
]

SEED = 0


@dataclass
class Outcome:
    """What one window left behind on its model copy."""

    grads: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    loss_sum: float
    count: float
    probe: Probe | None  # None on the unprobed windows of a compiled model


@dataclass
class OutputGradient:
    """``d loss_j / d output`` of one micro-batch: rows ``[offset, offset + size)``."""

    offset: int
    size: int
    grads: dict[tuple[int, str], torch.Tensor]


@dataclass
class Gradients:
    """The windows of a compiled model: gradients only."""

    full: Outcome
    splits: dict[int, Outcome]


@dataclass
class Mode:
    """All runs of one model mode (as given, or eval)."""

    model: nn.Module
    full: Outcome
    reseeded: Probe
    splits: dict[int, Outcome]
    forced_splits: dict[int, Probe]
    training: bool

    def diverged(self, tolerance: float) -> bool:
        """Whether any module output differs under another seed or in any split."""
        probes = (self.reseeded, *(outcome.probe for outcome in self.splits.values()))
        return any(probe.diverged(tolerance) for probe in probes)


class Runs:
    """Runs windows through the Accumulator on fresh copies of a model."""

    def __init__(
        self,
        loss_fn: LossFn,
        batch: Batch,
        count: Counter | None,
        sizes: list[int],
        tolerance: float,
        devices: list[int],
    ) -> None:
        self.loss_fn, self.batch, self.count = loss_fn, batch, count
        self.sizes, self.tolerance, self.devices = sizes, tolerance, devices
        self.total = batch_size(batch)

    def run(self, base: nn.Module, sizes: list[int]) -> Mode:
        """The full batch (seeded twice differently) and each split, on copies of ``base``."""
        full = self.window(base, None, SEED, None)
        if full.count == 0:
            # No pass ran, so nothing was compared: "equivalent" would be vacuous.
            raise ValueError(
                f"`count` got 0 items for the batch of {self.total} samples; expected at least "
                "one item the loss scores. Fix: check a batch with unmasked labels, or a count "
                "that counts them."
            )
        return Mode(
            model=base,
            full=full,
            reseeded=self.forced(base, full.probe, seed=SEED + 1),
            splits={s: self.window(base, s, SEED, full.probe) for s in sizes},
            forced_splits={s: self.forced(base, full.probe, size=s) for s in sizes},
            training=base.training,
        )

    def window(
        self,
        base: nn.Module,
        size: int | None,
        seed: int,
        reference: Probe | None,
        *,
        fresh: bool = True,
    ) -> Outcome:
        """One window of ``size``-sample micro-batches on a copy of ``base`` (on ``base``
        itself with ``fresh=False``, unprobed); returns its gradient and buffers."""
        model = copy.deepcopy(base) if fresh else base
        probe = Probe(model, self.total, reference) if fresh else None
        accumulator = Accumulator(
            model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch_size=size
        )
        self.seed(seed)
        try:
            loss_fn = self.loss_fn if probe is None else probe.wrap(self.loss_fn)
            window = accumulator.accumulate([self.batch], loss_fn, self.count)
        finally:
            if probe is not None:
                probe.remove()
        grads = {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        return Outcome(grads, buffers, window.loss_sum, window.count, probe)

    def compiled(self, compiled: nn.Module, base: nn.Module, sizes: list[int]) -> Gradients:
        """The full batch and each split on one compiled copy, reset to ``base`` before each:
        dynamo compiles it once per distinct micro-batch shape, not once per copy."""
        twin = copy.deepcopy(compiled).to(next(base.parameters()).dtype)
        state = copy.deepcopy(base.state_dict())

        def window(size: int | None) -> Outcome:
            twin._orig_mod.load_state_dict(state)
            outcome = self.window(twin, size, SEED, None, fresh=False)
            outcome.grads = {unwrapped(n): g for n, g in outcome.grads.items()}
            return outcome

        full = window(None)
        return Gradients(full=full, splits={s: window(s) for s in sizes})

    def forced(
        self, base: nn.Module, reference: Probe, *, size: int | None = None, seed: int = SEED
    ) -> Probe:
        """A forward of the batch in micro-batches of ``size`` (whole for ``None``) under
        ``seed``, each module output held at the reference's rows (see
        :class:`truebatch._probe.Probe`): no backward, no gradient."""
        model = copy.deepcopy(base)
        probe = Probe(model, self.total, reference, force=True)
        traced, offset = probe.wrap(self.loss_fn), 0
        self.seed(seed)
        try:
            for piece in [self.batch] if size is None else split(self.batch, size):
                try:
                    with _context.micro_batch(0, offset):
                        traced(model, piece)
                except Exception:
                    # Held outputs carry no graph: a loss_fn that differentiates through the
                    # model (a gradient penalty) fails after the forward the probe needs.
                    # What it saw stands; the gradient windows ran the loss as written.
                    pass
                offset += batch_size(piece)
        finally:
            probe.remove()
        return probe

    def output_gradients(self, base: nn.Module, size: int | None) -> list[OutputGradient] | None:
        """Per micro-batch of ``size`` (the whole batch for ``None``): the gradient of its loss
        with respect to the model's outputs, ``None`` where they cannot be held.

        Each call of the model inside ``loss_fn`` returns its floating leaves with
        the batch along dim 0 as fresh leaf tensors, so one backward from the loss
        stops at them: ``d loss_j / d output``, a map from (call, leaf path).
        """
        model = copy.deepcopy(base)
        held: dict[tuple[int, str], torch.Tensor] = {}
        failed = False

        def hold(module: nn.Module, args: tuple, output: Any) -> Any:
            nonlocal failed
            call, replace = len({key[0] for key in held}), {}
            for path, t in tensor_leaves(output, "output"):
                if t.is_floating_point() and t.dim() > 0 and id(t) not in replace:
                    replace[id(t)] = held[call, path] = t.detach().requires_grad_()
            try:
                return map_tensors(output, lambda t: replace.get(id(t), t))
            except Exception:  # a container that cannot be rebuilt
                failed = True
                return None

        handle = model.register_forward_hook(hold)
        pieces = [self.batch] if size is None else split(self.batch, size)
        result, offset = [], 0
        self.seed(SEED)
        try:
            for piece in pieces:
                held.clear()
                try:
                    with _context.micro_batch(0, offset):
                        loss = self.loss_fn(model, piece)
                except Exception:  # as in forced(): not measurable
                    return None
                loss = loss[0] if isinstance(loss, tuple) else loss
                n = batch_size(piece)
                usable = isinstance(loss, torch.Tensor) and loss.requires_grad
                if failed or not held or not usable:
                    return None
                grads = torch.autograd.grad(loss, list(held.values()), allow_unused=True)
                result.append(
                    OutputGradient(
                        offset,
                        n,
                        {
                            key: torch.zeros_like(t) if g is None else g
                            for (key, t), g in zip(held.items(), grads, strict=True)
                        },
                    )
                )
                offset += n
        finally:
            handle.remove()
        return result

    def seed(self, seed: int) -> None:
        """Seed the CPU generator and the CUDA generators in use (inside ``fork_rng``)."""
        torch.default_generator.manual_seed(seed)
        for device in self.devices:
            torch.cuda.default_generators[device].manual_seed(seed)


def unwrapped(name: str) -> str:
    """A parameter's name in the compiled module as the user's module names it."""
    return name.removeprefix("_orig_mod.")


@torch.no_grad()
def run_alone(module: nn.Module, pieces: list[torch.Tensor], seed: int, runs: Runs) -> torch.Tensor:
    """A fresh copy of ``module`` on ``pieces`` in turn (as micro-batches); outputs joined."""
    alone = copy.deepcopy(module)
    runs.seed(seed)
    outputs, offset = [], 0
    for piece in pieces:
        with _context.micro_batch(0, offset):
            outputs.append(alone(piece))
        offset += piece.shape[0]
    return torch.cat(outputs)
