"""The equivalence checker: does accumulation give this model the big batch's update?

:func:`check` runs one effective batch through copies of the model, once whole
and once per split into micro-batches, each time through the Accumulator's own
window (``Accumulator.accumulate``), and compares the gradients it leaves:

    relative difference of parameter p = ||g_split(p) - g_full(p)|| / max(||g_full(p)||, floor)

with ``floor = kappa * ||g_full||`` (the whole gradient) and
``kappa = min(1, 100 * eps(dtype) / tolerance)`` (0.022 in float64, 1 in
float32): rounding errors scale with the whole gradient, so a tensor whose exact
gradient is zero (a bias just before a normalization) is judged on that scale.

When they differ it names the culprit. Forward hooks on every module record its
inputs and outputs on the full batch; on each split they compare each
module's outputs, micro-batch by micro-batch, with the matching rows of the
full-batch output (the same as concatenating them along dim 0). A module whose
output differs while its inputs agreed, and none of whose submodules did, is a
source; everything downstream merely inherits the difference and is not
reported. Sources are classified by a second full-batch run under another seed
(a module whose output changes with the seed draws random numbers), by their
type (BatchNorm, dropout), and otherwise mix samples. When some module output
differs and the model is in train mode, the same comparisons in eval mode (one
split) find what train-only layers hide: sample mixers and random ops
downstream, and whether the loss is a sum over items. Buffers are compared
after the window.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from truebatch import _context
from truebatch.accumulator import Accumulator, LossFn, _check_loss_fn_and_count
from truebatch.batching import (
    Batch,
    Counter,
    batch_size,
    batch_unit,
    map_tensors,
    split,
    tensor_leaves,
)
from truebatch.compare import TOLERANCES, relative_differences

__all__ = ["Finding", "Kind", "Report", "check", "default_micro_batch_sizes"]

Kind = Literal[
    "batchnorm",
    "dropout",
    "random_op",
    "mixes_samples",
    "loss_not_additive",
    "loss_mixes_samples",
    "buffer_mismatch",
]
_CHECKED_DTYPES = (torch.float64, torch.float32)
_SEED = 0
_WORST_SHOWN = 5
_FIXES: dict[str, str] = {
    "batchnorm": (
        "tb.nn.convert_batchnorm(model, ghost_batch_size=g) with g dividing your micro-batch "
        "size, or tb.nn.freeze_batchnorm(model) to normalize with running statistics"
    ),
    "ghost_batchnorm": "use micro-batch sizes that are multiples of its ghost_batch_size",
    "dropout": "tb.nn.convert_dropout(model): masks drawn per sample, the same for any split",
    "random_op": (
        "draw its randomness per sample from the sample's global index, as "
        "tb.nn.SplitInvariantDropout does, or keep it out of the training forward"
    ),
    "mixes_samples": (
        "compute it per sample (LayerNorm/GroupNorm instead of batch statistics, attention "
        "over the sequence, not the batch), or per fixed chunk as tb.nn.GhostBatchNorm1d does"
    ),
    "loss_not_additive": (
        "return the SUM over items (reduction='sum') and let truebatch divide by N, or "
        "return (loss_sum, count)"
    ),
    "loss_mixes_samples": (
        "a loss that compares samples with each other (contrastive, in-batch negatives, "
        "batch-hard triplets) on the model's outputs: train with acc.step_cached(micro_batches, "
        "encode_fn, loss_fn), which gives every sample the whole window"
    ),
    "buffer_batchnorm": (
        "tb.nn.convert_batchnorm(model, ghost_batch_size=g) updates running statistics "
        "the same for any split whose sizes are multiples of g; or tb.nn.freeze_batchnorm(model)"
    ),
    "buffer_mismatch": (
        "update the buffer from each sample independently, or once per window from the whole "
        "effective batch, not once per forward call"
    ),
}


@dataclass(frozen=True)
class Finding:
    """One reason accumulation differs from the big batch.

    Attributes:
        module: module path as in ``model.named_modules()`` (the model itself by
            its class name; ``"loss_fn"`` for the loss).
        kind: ``batchnorm``, ``dropout``, ``random_op``, ``mixes_samples`` (inside
            the model), ``loss_not_additive`` (e.g. a mean, not a sum),
            ``loss_mixes_samples`` (the loss compares samples with each other:
            ``Accumulator.step_cached``) or ``buffer_mismatch``.
        effect: size of the effect, a relative difference described by ``measure``.
        measure: what ``effect`` measures, and on which split.
        fix: one line naming the truebatch tool that removes the cause.
    """

    module: str
    kind: Kind
    effect: float
    measure: str
    fix: str


@dataclass(frozen=True)
class Report:
    """The outcome of :func:`check`.

    Attributes:
        equivalent: every split's gradient matches the full batch's within
            ``tolerance`` (relative, per parameter tensor) and there is no
            finding. A finding is a cause of difference even when this run
            happened to agree (e.g. a lone dropout drawing, on the CPU
            generator, the same numbers whole or split).
        tolerance: 1e-12 in float64, 1e-5 in float32.
        dtype: the dtype the check ran in, e.g. ``"float64"``.
        batch_size: samples in the checked batch.
        max_relative_difference: micro-batch size -> the largest relative
            gradient difference over parameter tensors.
        worst_parameters: up to five ``(name, relative difference)``, largest first,
            each the maximum over splits.
        findings: the culprits found, in forward order.
    """

    equivalent: bool
    tolerance: float
    dtype: str
    batch_size: int
    max_relative_difference: dict[int, float]
    worst_parameters: list[tuple[str, float]]
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict; non-finite numbers become the strings ``"inf"``/``"nan"``."""
        return {
            "equivalent": self.equivalent,
            "tolerance": self.tolerance,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "max_relative_difference": {
                str(size): _json_number(value)
                for size, value in self.max_relative_difference.items()
            },
            "worst_parameters": [
                {"name": name, "relative_difference": _json_number(value)}
                for name, value in self.worst_parameters
            ],
            "findings": [
                {**asdict(finding), "effect": _json_number(finding.effect)}
                for finding in self.findings
            ],
        }

    def __str__(self) -> str:
        verdict = "equivalent" if self.equivalent else "NOT equivalent"
        lines = [
            f"truebatch check: {verdict} (batch of {self.batch_size}, {self.dtype}, "
            f"tolerance {self.tolerance:.0e} relative per tensor)",
            "",
        ]
        lines += _table(
            ["micro-batch size", "micro-batches", "max relative gradient difference", ""],
            [
                [
                    str(size),
                    str(math.ceil(self.batch_size / size)),
                    f"{value:.2e}",
                    "ok" if value <= self.tolerance else "FAIL",
                ]
                for size, value in self.max_relative_difference.items()
            ],
            right=(0, 1, 2),
        )
        lines += [""]
        lines += _table(
            ["worst parameters", "max relative difference"],
            [[name, f"{value:.2e}"] for name, value in self.worst_parameters],
            right=(1,),
        )
        lines += [""]
        if not self.findings:
            lines.append("findings: none")
            return "\n".join(lines)
        rows = [
            [f.module, f.kind, f"{f.effect:.2e}", f.measure, f"fix: {f.fix}"] for f in self.findings
        ]
        table = _table(["findings", "kind", "effect", "measured as"], [r[:4] for r in rows])
        lines.append(table[0])
        indent = " " * (len(table[0]) - len(table[0].lstrip()) + 2)
        for line, row in zip(table[1:], rows, strict=True):
            lines += [line, indent + row[4]]
        return "\n".join(lines)


def check(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    micro_batch_sizes: Iterable[int] | None = None,
    count: Counter | None = None,
    dtype: torch.dtype = torch.float64,
) -> Report:
    """Compare the update of ``batch`` taken whole with its accumulation over micro-batches.

    The full batch and each split run on deep copies of ``model`` cast to
    ``dtype`` (with the batch's floating tensors), in the mode ``model`` is in
    (call ``model.train()`` first to check training), each with the global RNG
    seeded identically. The gradient of a split is the Accumulator's own window
    gradient ``(1/N) * sum_j d(loss_sum_j)/d(params)``. The user's model, its
    buffers and gradients, and the global RNG state (CPU and CUDA) are left
    untouched.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is unwrapped).
        loss_fn: ``loss_fn(model, micro_batch)`` returning the SUM of the item
            losses, or ``(loss_sum, count)``, as for :class:`truebatch.Accumulator`.
        batch: one effective batch (tensor or nested container of tensors).
        micro_batch_sizes: sizes to check, each in ``[1, B)``; ``None`` picks
            :func:`default_micro_batch_sizes`.
        count: the item counter, as for ``Accumulator.step``.
        dtype: ``torch.float64`` (tolerance 1e-12) or ``torch.float32`` (1e-5).

    Only module outputs that are tensors with the batch along dim 0 are
    compared (tensor leaves of tuples, dicts and dataclasses included);
    scalars and tensors without the batch dim are skipped. The loss is judged
    (``loss_not_additive``) only on a split where every module output agrees,
    in eval mode if needed: behind a sample mixer that is active in eval mode
    it goes unjudged until that finding is fixed.

    Examples:
        >>> report = tb.check(model, loss_fn, (x, y))
        >>> print(report)              # a table of splits, parameters and findings
        >>> report.equivalent
        True
    """
    model = _local_model(model)
    _check_arguments(model, loss_fn, count, dtype)
    tolerance = TOLERANCES[dtype]
    base = copy.deepcopy(model).to(dtype)
    base.zero_grad(set_to_none=True)
    data = map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)
    total = batch_size(data)
    sizes = _micro_batch_sizes(base, total, micro_batch_sizes)
    devices = _cuda_devices()
    with torch.random.fork_rng(devices=devices):
        passes = _Passes(loss_fn, data, count, sizes, tolerance, devices)
        given = passes.run(base, sizes)
        # A module whose output differs hides whatever is downstream of it. Eval mode stills
        # BatchNorm, dropout and other train-only behaviour, which shows what they hide:
        # sample mixers and random ops downstream, and whether the loss is a sum. One split
        # is enough for that.
        hidden = given.diverged(tolerance) and any(m.training for m in base.modules())
        in_eval = passes.run(copy.deepcopy(base).eval(), sizes[-1:]) if hidden else given
        grads = {
            s: relative_differences(given.splits[s].grads, given.full.grads, dtype=dtype)
            for s in sizes
        }
        findings = _module_findings(base, given, in_eval, passes)
    findings += _loss_findings(in_eval, tolerance)
    findings += _buffer_findings(base, given, tolerance)
    worst: dict[str, float] = {}
    for differences in grads.values():
        for name, value in differences.items():
            worst[name] = max(worst.get(name, 0.0), value)
    max_per_split = {s: max(grads[s].values(), default=0.0) for s in sizes}
    return Report(
        equivalent=not findings and all(v <= tolerance for v in max_per_split.values()),
        tolerance=tolerance,
        dtype=str(dtype).removeprefix("torch."),
        batch_size=total,
        max_relative_difference=max_per_split,
        worst_parameters=sorted(worst.items(), key=lambda kv: -kv[1])[:_WORST_SHOWN],
        findings=findings,
    )


def default_micro_batch_sizes(batch: int, unit: int = 1, minimum: int = 1) -> list[int]:
    """The micro-batch sizes :func:`check` tries by default, for a batch of ``batch`` samples.

    *Allowed* sizes ``s`` are multiples of ``unit`` in ``[1, batch)`` whose
    micro-batches all hold at least ``minimum`` samples (``batch mod s`` is 0 or
    at least ``minimum``). Of those: the two smallest, the largest not above
    ``ceil(batch / 2)``, and one that does not divide ``batch`` (an uneven last
    micro-batch): the largest not above ``ceil(batch / 2)``, else the smallest.

    ``check`` uses ``unit`` = the least common multiple of the model's ghost
    batch sizes and ``minimum = 2`` when the model has BatchNorm in train mode
    (one sample has no batch statistics).

    Examples:
        >>> default_micro_batch_sizes(12)
        [1, 2, 5, 6]
    """
    allowed = [
        s
        for s in range(unit, batch, unit)
        if s >= minimum and (batch % s == 0 or batch % s >= minimum)
    ]
    if not allowed:
        return []
    half = [s for s in allowed if s <= math.ceil(batch / 2)] or allowed[:1]
    uneven = [s for s in allowed if batch % s]
    chosen = set(allowed[:2]) | {half[-1]}
    uneven_low = [s for s in uneven if s <= half[-1]]
    if uneven:
        chosen.add(uneven_low[-1] if uneven_low else uneven[0])
    return sorted(chosen)


# ------------------------------------------------------------ arguments


def _local_model(model: Any) -> Any:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _check_arguments(model: Any, loss_fn: Any, count: Any, dtype: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "model has no parameter that requires grad, so there is no update to compare; "
            "pass a model with trainable parameters"
        )
    _check_loss_fn_and_count(loss_fn, count)
    if dtype not in _CHECKED_DTYPES:
        raise ValueError(
            f"dtype must be torch.float64 or torch.float32, got {dtype!r}; the check compares "
            "gradients at those dtypes' tolerances (1e-12, 1e-5)"
        )


def _has_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.training for m in model.modules())


def _micro_batch_sizes(model: nn.Module, total: int, requested: Iterable[int] | None) -> list[int]:
    unit = batch_unit(model)
    if requested is None:
        minimum = 2 if _has_batch_statistics(model) else 1
        sizes = default_micro_batch_sizes(total, unit, minimum)
        if not sizes:
            raise ValueError(
                f"a batch of {total} samples cannot be split into micro-batches of at least "
                f"{minimum} sample(s) that are multiples of {unit} (the model's ghost batch "
                f"size); pass a batch of at least {2 * max(unit, minimum)} samples"
            )
        return sizes
    sizes = sorted(set(requested))
    invalid = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if invalid or not sizes:
        raise ValueError(
            f"micro_batch_sizes must be positive ints, got {list(sizes)!r}; pass e.g. [1, 4]"
        )
    too_big = [s for s in sizes if s >= total]
    if too_big:
        raise ValueError(
            f"micro_batch_sizes {too_big} do not split a batch of {total} samples; pass "
            f"sizes below {total}"
        )
    straddling = [s for s in sizes if s % unit]
    if straddling:
        raise ValueError(
            f"micro_batch_sizes {straddling} are not multiples of {unit}, the model's ghost "
            f"batch size (tb.nn.GhostBatchNorm), which refuses micro-batches that split a "
            f"ghost batch; pass multiples of {unit}"
        )
    return sizes


def _cuda_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


# --------------------------------------------------------- module probes

Key = tuple[str, int]  # (module name, call index within one micro-batch)


class _Probe:
    """Forward hooks on every module of a model copy, active only inside ``loss_fn``.

    With ``reference=None`` it records the inputs and outputs of the full
    batch (the tensor leaves with the batch along dim 0). Given a reference,
    it compares each micro-batch's leaves with rows ``[offset, offset + n)`` of
    the reference's, summing squared differences, so that for every leaf

        relative difference = ||concat_j(leaf_j) - leaf_full|| / ||leaf_full||.
    """

    def __init__(self, model: nn.Module, total: int, reference: _Probe | None) -> None:
        self.total = total
        self.reference = reference
        self.leaves: dict[tuple[Key, str], dict[str, torch.Tensor]] = {}
        self.order: dict[str, int] = {}
        self.squares: dict[tuple[Key, str, str], float] = {}
        self.mismatched: set[tuple[Key, str, str]] = set()
        self._offset, self._size, self._active = 0, total, False
        self._calls: dict[str, int] = {}
        self._open: dict[str, list[int]] = {}
        self._handles = []
        for name, module in model.named_modules():
            self._handles.append(
                module.register_forward_pre_hook(self._before(name), with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._after(name)))

    def wrap(self, loss_fn: LossFn) -> LossFn:
        """``loss_fn`` that announces each micro-batch to the probe before running it."""

        def traced(model: nn.Module, micro_batch: Batch) -> Any:
            self._size, self._calls, self._active = batch_size(micro_batch), {}, True
            try:
                return loss_fn(model, micro_batch)
            finally:
                self._active = False
                self._offset += self._size

        return traced

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _before(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._active:
                return
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            self._open.setdefault(name, []).append(call)
            self.order.setdefault(name, len(self.order))
            self._see(
                (name, call),
                "in",
                [*tensor_leaves(args, "args"), *tensor_leaves(kwargs, "kwargs")],
            )

        return hook

    def _after(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._active or not self._open.get(name):
                return
            call = self._open[name].pop()
            self._see((name, call), "out", list(tensor_leaves(output, "output")))

        return hook

    def _see(self, key: Key, side: str, leaves: list[tuple[str, torch.Tensor]]) -> None:
        if self.reference is None:
            self.leaves[key, side] = {
                path: t.detach().clone()
                for path, t in leaves
                if t.dim() > 0 and t.shape[0] == self.total
            }
            return
        expected = self.reference.leaves.get((key, side), {})
        for path, t in leaves:
            full = expected.get(path)
            if full is None:
                continue
            entry = (key, side, path)
            rows = full[self._offset : self._offset + self._size]
            if t.dim() == 0 or t.shape != rows.shape:
                self.mismatched.add(entry)
                continue
            square = _norm(t.detach() - rows) ** 2
            self.squares[entry] = self.squares.get(entry, 0.0) + square

    def differences(self) -> dict[Key, tuple[float | None, float | None]]:
        """Per module call: relative difference of (inputs, outputs); ``None`` if not comparable."""
        assert self.reference is not None
        result: dict[Key, list[float | None]] = {}
        for (key, side, path), square in self.squares.items():
            if (key, side, path) in self.mismatched:
                continue
            norm = _norm(self.reference.leaves[key, side][path])
            value = _relative(math.sqrt(square), norm)
            slot = result.setdefault(key, [None, None])
            index = 0 if side == "in" else 1
            slot[index] = value if slot[index] is None else max(slot[index], value)
        return {key: (v[0], v[1]) for key, v in result.items()}

    def sources(self, tolerance: float) -> dict[str, float]:
        """Modules with a call whose output differs while its inputs agreed -> that difference."""
        found: dict[str, float] = {}
        for (name, _), (inputs, output) in self.differences().items():
            if output is not None and output > tolerance and (inputs or 0.0) <= tolerance:
                found[name] = max(found.get(name, 0.0), output)
        return found

    def diverged(self, tolerance: float) -> bool:
        """Whether any module output differs at all (agreeing inputs or not)."""
        return any((out or 0.0) > tolerance for _, out in self.differences().values())


# ------------------------------------------------------------------ runs


@dataclass
class _Outcome:
    """What one window left behind on its model copy."""

    grads: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    loss_sum: float
    probe: _Probe
    # (items, loss) of every micro-batch: tells a mean over items from a loss that mixes them
    parts: list[tuple[float, float]]


@dataclass
class _Mode:
    """All runs of one model mode (as given, or eval)."""

    full: _Outcome
    reseeded: _Outcome
    splits: dict[int, _Outcome]
    training: bool

    def diverged(self, tolerance: float) -> bool:
        """Whether any module output differs under another seed or in any split."""
        outcomes = (self.reseeded, *self.splits.values())
        return any(outcome.probe.diverged(tolerance) for outcome in outcomes)


class _Passes:
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

    def run(self, base: nn.Module, sizes: list[int]) -> _Mode:
        """The full batch (seeded twice differently) and each split, on copies of ``base``."""
        full = self.window(base, None, _SEED, None)
        return _Mode(
            full=full,
            reseeded=self.window(base, None, _SEED + 1, full.probe),
            splits={s: self.window(base, s, _SEED, full.probe) for s in sizes},
            training=base.training,
        )

    def window(
        self, base: nn.Module, size: int | None, seed: int, reference: _Probe | None
    ) -> _Outcome:
        """One window of ``size``-sample micro-batches; returns its gradient and buffers."""
        model = copy.deepcopy(base)
        probe = _Probe(model, self.total, reference)
        accumulator = Accumulator(
            model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch_size=size
        )
        self.seed(seed)
        parts: list[tuple[float, float]] = []
        try:
            loss_fn = _recording(probe.wrap(self.loss_fn), self.count, parts)
            window = accumulator.accumulate([self.batch], loss_fn, self.count)
        finally:
            probe.remove()
        grads = {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        return _Outcome(grads, buffers, window.loss_sum, probe, parts)

    def seed(self, seed: int) -> None:
        """Seed the CPU generator and the CUDA generators in use (inside ``fork_rng``)."""
        torch.default_generator.manual_seed(seed)
        for device in self.devices:
            torch.cuda.default_generators[device].manual_seed(seed)


# ------------------------------------------------------------- findings


def _module_findings(
    base: nn.Module, given: _Mode, in_eval: _Mode, passes: _Passes
) -> list[Finding]:
    """Culprit modules, in forward order: typed layers, random ops, then sample mixers.

    A module is reported only if none of its submodules is itself a source
    (the submodule explains the difference the parent shows).
    """
    modes, tolerance = (given, in_eval), passes.tolerance
    typed = {name: m for name, m in base.named_modules() if _typed_kind(m) is not None}
    found = _typed_findings(base, typed, given.full.probe, passes)
    for name, effect in _merge((mode.reseeded.probe for mode in modes), tolerance).items():
        if name not in typed:
            measure = "relative output change between two seeds, full batch"
            found[name] = _finding(base, name, "random_op", effect, measure)
    for size in passes.sizes:
        probes = (mode.splits[size].probe for mode in modes if size in mode.splits)
        for name, effect in _merge(probes, tolerance).items():
            known = found.get(name)
            if name in typed or (known is not None and known.effect >= effect):
                continue
            if known is None or known.kind == "mixes_samples":
                measure = (
                    f"relative output difference, full batch vs micro-batches of {size}, "
                    "while its inputs agreed"
                )
                found[name] = _finding(base, name, "mixes_samples", effect, measure)
    sources = set(found) | set(
        _merge(
            (o.probe for mode in modes for o in (mode.reseeded, *mode.splits.values())), tolerance
        )
    )
    order = given.full.probe.order
    kept = sorted(
        (name for name in found if not _has_descendant(name, sources)),
        key=lambda name: order.get(name, len(order)),
    )
    return [found[name] for name in kept]


def _merge(probes: Iterable[_Probe], tolerance: float) -> dict[str, float]:
    """Sources of several comparisons: module -> the largest difference it showed."""
    merged: dict[str, float] = {}
    for probe in probes:
        for name, effect in probe.sources(tolerance).items():
            merged[name] = max(merged.get(name, 0.0), effect)
    return merged


def _typed_kind(module: nn.Module) -> Kind | None:
    if isinstance(module, _BatchNorm):
        return "batchnorm"
    if isinstance(module, _DropoutNd):
        return "dropout"
    return None


def _typed_findings(
    base: nn.Module, typed: dict[str, nn.Module], reference: _Probe, passes: _Passes
) -> dict[str, Finding]:
    """BatchNorm and dropout modules, each measured alone on its full-batch inputs.

    BatchNorm: its output on the whole input vs on the input split into
    micro-batches. Dropout: its output under two seeds, since its mask comes
    from the global random stream, which a split consumes in another order
    (even when, on one device, a lone dropout happens to draw the same mask).
    """
    found = {}
    for name, module in typed.items():
        inputs = [
            leaves["args[0]"]
            for (key, side), leaves in reference.leaves.items()
            if key[0] == name and side == "in" and "args[0]" in leaves
        ]
        kind = _typed_kind(module)
        if kind == "batchnorm":
            effect, size = max(
                ((_split_effect(module, x, s, passes), s) for x in inputs for s in passes.sizes),
                default=(0.0, 0),
            )
            measure = (
                "relative output difference of the module alone on its full-batch input, "
                f"micro-batch size {size}"
            )
        else:
            effect = max((_seed_effect(module, x, passes) for x in inputs), default=0.0)
            measure = "relative output change of the module alone between two seeds"
        if effect > passes.tolerance:
            fix = "ghost_batchnorm" if hasattr(module, "ghost_batch_size") else None
            found[name] = _finding(base, name, kind, effect, measure, fix)
    return found


def _split_effect(module: nn.Module, x: torch.Tensor, size: int, passes: _Passes) -> float:
    whole = _run_alone(module, [x], _SEED, passes)
    return _difference(_run_alone(module, split(x, size), _SEED, passes), whole)


def _seed_effect(module: nn.Module, x: torch.Tensor, passes: _Passes) -> float:
    first = _run_alone(module, [x], _SEED, passes)
    return _difference(_run_alone(module, [x], _SEED + 1, passes), first)


@torch.no_grad()
def _run_alone(
    module: nn.Module, pieces: list[torch.Tensor], seed: int, passes: _Passes
) -> torch.Tensor:
    """A fresh copy of ``module`` on ``pieces`` in turn (as micro-batches); outputs joined."""
    alone = copy.deepcopy(module)
    passes.seed(seed)
    outputs, offset = [], 0
    for piece in pieces:
        with _context.micro_batch(0, offset):
            outputs.append(alone(piece))
        offset += piece.shape[0]
    return torch.cat(outputs)


def _finding(
    base: nn.Module, name: str, kind: Kind, effect: float, measure: str, fix: str | None = None
) -> Finding:
    return Finding(name or type(base).__name__, kind, effect, measure, _FIXES[fix or kind])


def _recording(loss_fn: LossFn, count: Counter | None, parts: list) -> LossFn:
    """``loss_fn`` that appends each micro-batch's (items, loss) to ``parts``."""

    def recorded(model: nn.Module, micro_batch: Batch) -> Any:
        output = loss_fn(model, micro_batch)
        loss, items = output if isinstance(output, tuple | list) else (output, None)
        if items is None:
            items = count(micro_batch) if count is not None else batch_size(micro_batch)
        parts.append((float(items), float(loss.detach())))
        return output

    return recorded


def _loss_findings(in_eval: _Mode, tolerance: float) -> list[Finding]:
    """``loss_not_additive`` when micro-batch losses do not sum to the full-batch loss.

    When the micro-batch losses weighted by their share of the items do not give
    the full-batch loss either, the loss is not a mean over items but compares them
    with each other (``loss_mixes_samples``, fixed by ``Accumulator.step_cached``).

    Judged only on splits where every module output agreed (in eval mode when
    some output differed in train mode), so that any difference comes from the
    loss itself. A random op or a sample mixer that is active in
    eval mode leaves the loss unjudged until it is fixed.
    """
    full = in_eval.full.loss_sum
    judged = {
        size: _relative(abs(outcome.loss_sum - full), abs(full))
        for size, outcome in in_eval.splits.items()
        if not outcome.probe.diverged(tolerance)
    }
    if not judged:
        return []
    size, effect = max(judged.items(), key=lambda kv: kv[1])
    if effect <= tolerance:
        return []
    measure = (
        f"relative difference of the sum of micro-batch losses from the full-batch loss, "
        f"micro-batch size {size}{', eval mode' if not in_eval.training else ''}"
    )
    parts = in_eval.splits[size].parts
    items = sum(n for n, _ in parts)
    weighted = sum(n * loss for n, loss in parts) / items if items else math.nan
    kind: Kind = "loss_not_additive"
    if not _relative(abs(weighted - full), abs(full)) <= tolerance:
        kind = "loss_mixes_samples"  # neither a sum nor a mean over the items
        measure += "; weighted by their share of the items, they do not give it either"
    return [Finding("loss_fn", kind, effect, measure, _FIXES[kind])]


def _buffer_findings(base: nn.Module, given: _Mode, tolerance: float) -> list[Finding]:
    """``buffer_mismatch`` per module whose buffers end the window differently than whole."""
    owners: dict[str, dict[str, tuple[float, int]]] = {}
    for size, outcome in given.splits.items():
        for name, full in given.full.buffers.items():
            value = _difference(outcome.buffers.get(name), full)
            if value > tolerance:
                owner, _, buffer = name.rpartition(".")
                previous = owners.setdefault(owner, {}).get(buffer, (0.0, size))
                owners[owner][buffer] = max(previous, (value, size), key=lambda v: v[0])
    modules = dict(base.named_modules())
    findings = []
    for owner, buffers in owners.items():
        effect, size = max(buffers.values(), key=lambda v: v[0])
        measure = (
            f"relative difference of buffer(s) {', '.join(buffers)} after the window, "
            f"micro-batch size {size}"
        )
        fix = "buffer_batchnorm" if isinstance(modules[owner], _BatchNorm) else None
        findings.append(_finding(base, owner, "buffer_mismatch", effect, measure, fix))
    return findings


# ---------------------------------------------------------------- numbers


def _difference(other: torch.Tensor | None, full: torch.Tensor) -> float:
    """``||other - full|| / ||full||``; infinite when ``other`` is missing or shaped otherwise."""
    if other is None or other.shape != full.shape:
        return math.inf
    return _relative(_norm(_wide(other) - _wide(full)), _norm(full))


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def _norm(t: torch.Tensor) -> float:
    return torch.linalg.vector_norm(_wide(t)).item()


def _relative(difference: float, scale: float) -> float:
    if scale > 0:
        return difference / scale
    return 0.0 if difference == 0 else math.inf


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _has_descendant(name: str, sources: set[str]) -> bool:
    prefix = f"{name}." if name else ""
    return any(other != name and other.startswith(prefix) for other in sources)


def _table(header: list[str], rows: list[list[str]], right: tuple[int, ...] = ()) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return ("  " + "  ".join(padded)).rstrip()

    return [line(header), *(line(r) for r in rows)]
