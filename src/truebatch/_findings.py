"""From the runs to the findings: which module (or the loss) breaks equivalence, and how.

A *source* is a module call whose output differs while its inputs agreed. Random
ops come from the forced run under another seed, BatchNorm and dropout modules
are measured alone on their recorded inputs, other sources of a split mix
samples; the loss is judged where every module output agreed; buffers after the
window. Every "how far apart" is :func:`truebatch.max_relative_difference`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from truebatch._probe import Probe
from truebatch._report import FIXES, Finding, Kind
from truebatch._runs import SEED, Mode, Runs, run_alone
from truebatch.batching import split
from truebatch.compare import max_relative_difference

__all__ = ["buffer_findings", "difference", "loss_findings", "module_findings"]


def module_findings(base: nn.Module, given: Mode, in_eval: Mode, runs: Runs) -> list[Finding]:
    """Culprit modules, in forward order: typed layers, random ops, then sample mixers.

    Random ops and sample mixers come first from the forced runs (under
    another seed; in micro-batches), where what differs is each module's own
    code, so they stand beside a culprit submodule and behind a culprit
    upstream. A sample mixer seen only in an unforced split (its inputs agreed)
    is reported only if none of its submodules is itself a source (the
    submodule explains the difference the parent shows).
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
    own: dict[str, tuple[float, int]] = {}
    for size, probe in given.forced_splits.items():
        for name, effect in probe.own_sources(tolerance).items():
            if name not in found and effect > own.get(name, (0.0, size))[0]:
                own[name] = (effect, size)
    for name, (effect, size) in own.items():
        measure = (
            f"relative output difference, full batch vs micro-batches of {size}, its inputs "
            "and its submodules' outputs held at the full batch's"
        )
        found[name] = _finding(base, name, "mixes_samples", effect, measure)
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
    base: nn.Module, typed: dict[str, nn.Module], reference: Probe, runs: Runs
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


def _split_effect(module: nn.Module, x: torch.Tensor, size: int, runs: Runs) -> float:
    whole = run_alone(module, [x], SEED, runs)
    return difference(run_alone(module, split(x, size), SEED, runs), whole)


def _seed_effect(module: nn.Module, x: torch.Tensor, runs: Runs) -> float:
    first = run_alone(module, [x], SEED, runs)
    return difference(run_alone(module, [x], SEED + 1, runs), first)


def _finding(
    base: nn.Module, name: str, kind: Kind, effect: float, measure: str, fix: str | None = None
) -> Finding:
    return Finding(name or type(base).__name__, kind, effect, measure, FIXES[fix or kind])


def loss_findings(in_eval: Mode, runs: Runs) -> list[Finding]:
    """The loss, when micro-batch losses do not sum to the full-batch loss.

    Judged only on splits where every module output agreed (in eval mode when
    some output differed in train mode), so that any difference comes from the
    loss itself. A random op or a sample mixer that is active in eval mode
    leaves the loss unjudged until it is fixed.

    ``loss_mixes_samples`` when the loss's gradient with respect to the model's
    outputs, on a micro-batch, is not a multiple of the full batch's on the same
    rows: a sample's gradient then depends on which other samples share its
    micro-batch (in-batch negatives). Otherwise ``loss_not_additive`` (e.g. a
    mean: each micro-batch's gradient is the full one scaled by N / n_j).
    """
    tolerance = runs.tolerance
    full = in_eval.full.loss_sum
    judged = {
        size: difference(torch.tensor(outcome.loss_sum), torch.tensor(full))
        for size, outcome in in_eval.splits.items()
        if outcome.probe is not None and not outcome.probe.diverged(tolerance)
    }
    if not judged:
        return []
    size, effect = max(judged.items(), key=lambda kv: kv[1])
    if effect <= tolerance:
        return []
    mode = ", eval mode" if not in_eval.training else ""
    mixing = _loss_mixing(in_eval, runs, size)
    if mixing is not None and mixing > tolerance:
        measure = (
            "relative difference of the loss's gradient with respect to the model's outputs, "
            f"micro-batches of {size} vs the full batch's rows, after the best scale per "
            f"micro-batch{mode}"
        )
        kind: Kind = "loss_mixes_samples"
        return [Finding("loss_fn", kind, mixing, measure, FIXES[kind])]
    measure = (
        f"relative difference of the sum of micro-batch losses from the full-batch loss, "
        f"micro-batch size {size}{mode}"
    )
    return [Finding("loss_fn", "loss_not_additive", effect, measure, FIXES["loss_not_additive"])]


def _loss_mixing(mode: Mode, runs: Runs, size: int) -> float | None:
    """Largest ``||g_j - c_j G_j|| / ||c_j G_j||`` over micro-batches j, with ``g_j`` the
    gradient of micro-batch j's loss w.r.t. its outputs, ``G_j`` the full batch's on
    the same rows and ``c_j`` the least-squares scale; ``None`` if not measurable."""
    whole = runs.output_gradients(mode.model, None)
    pieces = runs.output_gradients(mode.model, size)
    if whole is None or pieces is None:
        return None
    (full,) = whole
    worst = 0.0
    for piece in pieces:
        if set(piece.grads) != set(full.grads):
            return None
        g = torch.cat([piece.grads[key].flatten() for key in full.grads]).double()
        rows = slice(piece.offset, piece.offset + piece.size)
        reference = torch.cat([t[rows].flatten() for t in full.grads.values()]).double()
        square = reference.dot(reference)
        scale = g.dot(reference) / square if square > 0 else torch.zeros(())
        worst = max(worst, max_relative_difference([g], [scale * reference]))
    return worst


def buffer_findings(base: nn.Module, given: Mode, tolerance: float) -> list[Finding]:
    """``buffer_mismatch`` per module whose buffers end the window differently than whole."""
    owners: dict[str, dict[str, tuple[float, int]]] = {}
    for size, outcome in given.splits.items():
        for name, full in given.full.buffers.items():
            value = difference(outcome.buffers.get(name), full)
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


def difference(other: torch.Tensor | None, full: torch.Tensor) -> float:
    """:func:`truebatch.max_relative_difference` of one tensor; ``inf`` if ``other`` is missing."""
    if other is None:
        return float("inf")
    return max_relative_difference([other], [full], dtype=torch.float64)


def _has_descendant(name: str, sources: set[str]) -> bool:
    prefix = f"{name}." if name else ""
    return any(other != name and other.startswith(prefix) for other in sources)
