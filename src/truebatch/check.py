"""The equivalence checker: does accumulation give this model the big batch's update?

:func:`check` runs one effective batch through copies of the model, once whole
and once per split into micro-batches, each time through the Accumulator's own
window (``Accumulator.accumulate``), and compares the gradients it leaves:

    relative difference of parameter p = ||g_split(p) - g_full(p)|| / max(||g_full(p)||, floor)

with ``floor = kappa * ||g_full||`` (the whole gradient) and
``kappa = min(1, 100 * eps(dtype) / tolerance)`` (0.022 in float64, 1 in
float32): rounding errors scale with the whole gradient, so a tensor whose exact
gradient is zero (a bias just before a normalization) is judged on that scale.

When they differ it names the culprit (:mod:`truebatch._probe` holds the
hooks). Forward hooks on every module record its inputs and outputs on the
full batch; on each split they compare each module's outputs, micro-batch by
micro-batch, with the matching rows of the full-batch output. A module whose
output differs while its inputs agreed, and none of whose submodules did, is a
source; everything downstream merely inherits the difference and is not
reported. Random ops are found by a forward of the full batch under another
seed in which every module output is replaced by the first seed's: what still
differs is drawn by the module's own code, so every random op is named in one
run, functional ones (``F.dropout`` in an attention layer) included. BatchNorm
and dropout modules are measured alone; other sources mix samples. When some
module output differs and the model is in train mode, the same comparisons in
eval mode (one split) find what train-only layers hide: sample mixers
downstream, and whether the loss is a sum over items. Buffers are compared
after the window.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from truebatch import _context
from truebatch._probe import Probe
from truebatch._report import FIXES, Finding, Kind, Report
from truebatch.accumulator import Accumulator, LossFn
from truebatch.batching import Batch, Counter, batch_size, batch_unit, map_tensors, split
from truebatch.compare import TOLERANCES, max_relative_difference, relative_differences

__all__ = ["Finding", "Kind", "Report", "check", "default_micro_batch_sizes"]

_CHECKED_DTYPES = (torch.float64, torch.float32)
_SEED = 0
_WORST_SHOWN = 5


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
    _check_arguments(model, loss_fn, dtype)
    compiled = model if _is_compiled(model) else None
    tolerance = TOLERANCES[dtype]
    base = _eager_copy(model if compiled is None else compiled._orig_mod).to(dtype)
    base.zero_grad(set_to_none=True)
    data = map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)
    total = batch_size(data)
    sizes = _micro_batch_sizes(base, total, micro_batch_sizes)
    devices = _cuda_devices()
    with torch.random.fork_rng(devices=devices):
        runs = _Runs(loss_fn, data, count, sizes, tolerance, devices)
        given = runs.run(base, sizes)
        # A module whose output differs hides whatever is downstream of it. Eval mode stills
        # BatchNorm, dropout and other train-only behaviour, which shows what they hide:
        # sample mixers and random ops downstream, and whether the loss is a sum. One split
        # is enough for that.
        hidden = given.diverged(tolerance) and any(m.training for m in base.modules())
        in_eval = runs.run(copy.deepcopy(base).eval(), sizes[-1:]) if hidden else given
        # The probes ran eagerly (hooks in a compiled graph recompile it per copy); the
        # gradients judged are the compiled model's, all windows on one compiled copy.
        judged = given if compiled is None else runs.compiled(compiled, base, sizes)
        grads = {
            s: relative_differences(judged.splits[s].grads, judged.full.grads, dtype=dtype)
            for s in sizes
        }
        findings = _module_findings(base, given, in_eval, runs)
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


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is ``torch.compile(module)``'s wrapper (dynamo is loaded if so)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def _unwrapped(name: str) -> str:
    """A parameter's name in the compiled module as the user's module names it."""
    return name.removeprefix("_orig_mod.")


def _eager_copy(model: nn.Module) -> nn.Module:
    """A deep copy that runs eagerly: ``nn.Module.compile()`` leaves a compiled call bound
    to the original module, which a copy would otherwise call."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    return copied


def _check_arguments(model: Any, loss_fn: Any, dtype: Any) -> None:
    # `count` is validated by the Accumulator; `loss_fn` here, since the probe wraps it.
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` got {type(model).__name__}; expected a torch.nn.Module. "
            "Fix: pass the model itself."
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "`model` got no parameter that requires grad; expected trainable parameters, whose "
            "update the check compares. Fix: pass the model you train."
        )
    if not callable(loss_fn):
        raise TypeError(
            f"`loss_fn` got {type(loss_fn).__name__}; expected a callable "
            "loss_fn(model, micro_batch) -> loss_sum. Fix: pass the function."
        )
    if dtype not in _CHECKED_DTYPES:
        raise ValueError(
            f"`dtype` got {dtype!r}; expected torch.float64 or torch.float32 (tolerances 1e-12, "
            "1e-5). Fix: pass dtype=torch.float64."
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
                f"`batch` got {total} samples, which cannot be split into micro-batches of at "
                f"least {minimum} sample(s) that are multiples of {unit} (the model's ghost "
                f"batch size); expected at least {2 * max(unit, minimum)} samples. Fix: pass a "
                "bigger batch."
            )
        return sizes
    sizes = sorted(set(requested))
    invalid = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if invalid or not sizes:
        raise ValueError(
            f"`micro_batch_sizes` got {list(sizes)!r}; expected positive ints. "
            "Fix: pass e.g. [1, 4]."
        )
    too_big = [s for s in sizes if s >= total]
    if too_big:
        raise ValueError(
            f"`micro_batch_sizes` got {too_big}, which do not split a batch of {total} samples; "
            f"expected sizes below {total}. Fix: pass smaller sizes."
        )
    straddling = [s for s in sizes if s % unit]
    if straddling:
        raise ValueError(
            f"`micro_batch_sizes` got {straddling}, not multiples of {unit}, the model's ghost "
            "batch size (tb.nn.GhostBatchNorm refuses micro-batches that split a ghost batch); "
            f"expected multiples of {unit}. Fix: pass multiples of {unit}."
        )
    return sizes


def _cuda_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


# ------------------------------------------------------------------ runs


@dataclass
class _Outcome:
    """What one window left behind on its model copy."""

    grads: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    loss_sum: float
    count: float
    probe: Probe | None  # None on the unprobed windows of a compiled model


@dataclass
class _Gradients:
    """The windows of a compiled model: gradients only."""

    full: _Outcome
    splits: dict[int, _Outcome]


@dataclass
class _Mode:
    """All runs of one model mode (as given, or eval)."""

    full: _Outcome
    reseeded: Probe
    splits: dict[int, _Outcome]
    training: bool

    def diverged(self, tolerance: float) -> bool:
        """Whether any module output differs under another seed or in any split."""
        probes = (self.reseeded, *(outcome.probe for outcome in self.splits.values()))
        return any(probe.diverged(tolerance) for probe in probes)


class _Runs:
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
        if full.count == 0:
            # No pass ran, so nothing was compared: "equivalent" would be vacuous.
            raise ValueError(
                f"`count` got 0 items for the batch of {self.total} samples; expected at least "
                "one item the loss scores. Fix: check a batch with unmasked labels, or a count "
                "that counts them."
            )
        return _Mode(
            full=full,
            reseeded=self.forced(base, full.probe),
            splits={s: self.window(base, s, _SEED, full.probe) for s in sizes},
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
    ) -> _Outcome:
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
        return _Outcome(grads, buffers, window.loss_sum, window.count, probe)

    def compiled(self, compiled: nn.Module, base: nn.Module, sizes: list[int]) -> _Gradients:
        """The full batch and each split on one compiled copy, reset to ``base`` before each:
        dynamo compiles it once per distinct micro-batch shape, not once per copy."""
        twin = copy.deepcopy(compiled).to(next(base.parameters()).dtype)
        state = copy.deepcopy(base.state_dict())

        def window(size: int | None) -> _Outcome:
            twin._orig_mod.load_state_dict(state)
            outcome = self.window(twin, size, _SEED, None, fresh=False)
            outcome.grads = {_unwrapped(n): g for n, g in outcome.grads.items()}
            return outcome

        full = window(None)
        return _Gradients(full=full, splits={s: window(s) for s in sizes})

    def forced(self, base: nn.Module, reference: Probe) -> Probe:
        """The full batch's forward under another seed, each module output forced to the
        reference's (see :class:`truebatch._probe.Probe`): no backward, no gradient."""
        model = copy.deepcopy(base)
        probe = Probe(model, self.total, reference, force=True)
        self.seed(_SEED + 1)
        try:
            with _context.micro_batch(0, 0):
                probe.wrap(self.loss_fn)(model, self.batch)
        finally:
            probe.remove()
        return probe

    def seed(self, seed: int) -> None:
        """Seed the CPU generator and the CUDA generators in use (inside ``fork_rng``)."""
        torch.default_generator.manual_seed(seed)
        for device in self.devices:
            torch.cuda.default_generators[device].manual_seed(seed)


# ------------------------------------------------------------- findings


def _module_findings(base: nn.Module, given: _Mode, in_eval: _Mode, runs: _Runs) -> list[Finding]:
    """Culprit modules, in forward order: typed layers, random ops, then sample mixers.

    Random ops come from the forced runs, where what differs is each module's
    own code, so they stand beside a random submodule. A sample mixer is
    reported only if none of its submodules is itself a source (the submodule
    explains the difference the parent shows).
    """
    modes, tolerance = (given, in_eval), runs.tolerance
    typed = {name: m for name, m in base.named_modules() if _typed_kind(m) is not None}
    found = _typed_findings(base, typed, given.full.probe, runs)
    random: dict[str, float] = {}
    for mode in modes:
        for name, effect in mode.reseeded.own_sources(tolerance).items():
            random[name] = max(random.get(name, 0.0), effect)
    for name, effect in random.items():
        if name not in typed:
            found[name] = _random_finding(base, name, effect, given.full.probe)
    mixers: dict[str, Finding] = {}
    for size in runs.sizes:
        probes = (mode.splits[size].probe for mode in modes if size in mode.splits)
        for name, effect in _merge(probes, tolerance).items():
            known = mixers.get(name)
            if name in found or (known is not None and known.effect >= effect):
                continue
            measure = (
                f"relative output difference, full batch vs micro-batches of {size}, "
                "while its inputs agreed"
            )
            mixers[name] = _finding(base, name, "mixes_samples", effect, measure)
    split_sources = _merge((o.probe for mode in modes for o in mode.splits.values()), tolerance)
    sources = set(found) | set(split_sources)
    found.update(
        (name, finding) for name, finding in mixers.items() if not _has_descendant(name, sources)
    )
    order = given.full.probe.order
    return [found[name] for name in sorted(found, key=lambda name: order.get(name, len(order)))]


def _random_finding(base: nn.Module, name: str, effect: float, reference: Probe) -> Finding:
    """``random_op``; an attention module whose dropout module never ran gets the attention fix
    (its dropout is functional: ``F.dropout(p=self.dropout.p)`` or SDPA's ``dropout_p``)."""
    module = base.get_submodule(name)
    prefix = f"{name}." if name else ""
    silent_dropout = any(
        isinstance(child, _DropoutNd) and f"{prefix}{child_name}" not in reference.order
        for child_name, child in module.named_children()
    )
    attention = "attention" in type(module).__name__.lower()
    fix = "attention_dropout" if silent_dropout or attention else None
    measure = (
        "relative output change between two seeds, full batch, its submodules' outputs held "
        "at the first seed's"
    )
    return _finding(base, name, "random_op", effect, measure, fix)


def _merge(probes: Iterable[Probe], tolerance: float) -> dict[str, float]:
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
    base: nn.Module, typed: dict[str, nn.Module], reference: Probe, runs: _Runs
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
                ((_split_effect(module, x, s, runs), s) for x in inputs for s in runs.sizes),
                default=(0.0, 0),
            )
            measure = (
                "relative output difference of the module alone on its full-batch input, "
                f"micro-batch size {size}"
            )
        else:
            effect = max((_seed_effect(module, x, runs) for x in inputs), default=0.0)
            measure = "relative output change of the module alone between two seeds"
        if effect > runs.tolerance:
            fix = "ghost_batchnorm" if hasattr(module, "ghost_batch_size") else None
            found[name] = _finding(base, name, kind, effect, measure, fix)
    return found


def _split_effect(module: nn.Module, x: torch.Tensor, size: int, runs: _Runs) -> float:
    whole = _run_alone(module, [x], _SEED, runs)
    return _difference(_run_alone(module, split(x, size), _SEED, runs), whole)


def _seed_effect(module: nn.Module, x: torch.Tensor, runs: _Runs) -> float:
    first = _run_alone(module, [x], _SEED, runs)
    return _difference(_run_alone(module, [x], _SEED + 1, runs), first)


@torch.no_grad()
def _run_alone(
    module: nn.Module, pieces: list[torch.Tensor], seed: int, runs: _Runs
) -> torch.Tensor:
    """A fresh copy of ``module`` on ``pieces`` in turn (as micro-batches); outputs joined."""
    alone = copy.deepcopy(module)
    runs.seed(seed)
    outputs, offset = [], 0
    for piece in pieces:
        with _context.micro_batch(0, offset):
            outputs.append(alone(piece))
        offset += piece.shape[0]
    return torch.cat(outputs)


def _finding(
    base: nn.Module, name: str, kind: Kind, effect: float, measure: str, fix: str | None = None
) -> Finding:
    return Finding(name or type(base).__name__, kind, effect, measure, FIXES[fix or kind])


def _loss_findings(in_eval: _Mode, tolerance: float) -> list[Finding]:
    """``loss_not_additive`` when micro-batch losses do not sum to the full-batch loss.

    Judged only on splits where every module output agreed (in eval mode when
    some output differed in train mode), so that any difference comes from the
    loss itself. A random op or a sample mixer that is active in
    eval mode leaves the loss unjudged until it is fixed.
    """
    full = in_eval.full.loss_sum
    judged = {
        size: _difference(torch.tensor(outcome.loss_sum), torch.tensor(full))
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
    return [Finding("loss_fn", "loss_not_additive", effect, measure, FIXES["loss_not_additive"])]


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
    """:func:`truebatch.max_relative_difference` of one tensor; ``inf`` if ``other`` is missing."""
    if other is None:
        return float("inf")
    return max_relative_difference([other], [full], dtype=torch.float64)


def _has_descendant(name: str, sources: set[str]) -> bool:
    prefix = f"{name}." if name else ""
    return any(other != name and other.startswith(prefix) for other in sources)
