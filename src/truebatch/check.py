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
hooks, :mod:`truebatch._findings` the rules). Forward hooks on every module
record its inputs and outputs on the full batch; other runs compare each
module call, micro-batch by micro-batch, with the matching rows. Two kinds of
run localize:

- *forced* forwards, in which every module output is replaced by the full
  batch's rows, so each module sees the full batch's inputs and its
  submodules' outputs: what still differs is made by the module's own code.
  Under another seed that is a random op (functional ``F.dropout`` in an
  attention layer included); on micro-batches, a module that mixes samples.
  Every culprit is named in one run, behind or inside another.
- the gradient windows themselves, where a module whose output differs while
  its inputs agreed, and none of whose submodules did, is a source.

BatchNorm and dropout modules are measured alone on their recorded inputs.
When some module output differs and the model is in train mode, the same
comparisons in eval mode (one split) judge the loss where every module output
agrees: not a sum over items, or mixing samples' outputs with each other.
Buffers are compared after the window.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from truebatch._findings import buffer_findings, loss_findings, module_findings
from truebatch._report import Finding, Kind, Report
from truebatch._runs import Runs
from truebatch.accumulator import LossFn
from truebatch.batching import Batch, Counter, batch_size, batch_unit, map_tensors
from truebatch.compare import TOLERANCES, relative_differences

__all__ = ["Finding", "Kind", "Report", "check", "default_micro_batch_sizes"]

_CHECKED_DTYPES = (torch.float64, torch.float32)
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
        model: the model. A ``DistributedDataParallel`` wrapper is unwrapped; a
            ``torch.compile`` wrapper is probed through eager copies of its
            module (paths as the module names them) while the gradients judged
            are the compiled model's.
        loss_fn: ``loss_fn(model, micro_batch)`` returning the SUM of the item
            losses, or ``(loss_sum, count)``, as for :class:`truebatch.Accumulator`.
        batch: one effective batch (tensor or nested container of tensors).
        micro_batch_sizes: sizes to check, each in ``[1, B)``; ``None`` picks
            :func:`default_micro_batch_sizes`.
        count: the item counter, as for ``Accumulator.step``.
        dtype: ``torch.float64`` (tolerance 1e-12) or ``torch.float32`` (1e-5).

    Returns:
        the :class:`Report`: per split, the largest relative gradient difference
        (:func:`truebatch.max_relative_difference`), and the findings.

    Raises:
        TypeError: ``model`` is not a module, or ``loss_fn`` or ``count`` is not callable.
        ValueError: ``dtype`` or ``micro_batch_sizes`` is not usable, the batch is
            too small to split, or ``count`` gives the batch 0 items (no pass would
            run, so "equivalent" would be vacuous).

    Module inputs and outputs are compared where they are tensors with the
    batch along dim 0 (tensor leaves of tuples, dicts and dataclasses
    included), any dtype (a boolean mask by equality); scalars, tensors without
    the batch dim and tensors that cannot be compared are skipped. The loss is
    judged (``loss_not_additive``, or ``loss_mixes_samples`` when it compares
    samples' outputs with each other) only on a split where every module
    output agrees, in eval mode if needed: behind a sample mixer that is
    active in eval mode it goes unjudged until that finding is fixed.

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
        runs = Runs(loss_fn, data, count, sizes, tolerance, devices)
        given = runs.run(base, sizes)
        # The loss is judged where every module output agrees; eval mode stills BatchNorm,
        # dropout and other train-only behaviour, which would otherwise hide it (and a
        # mixer that acts only in eval mode). One split is enough for that.
        hidden = given.diverged(tolerance) and any(m.training for m in base.modules())
        in_eval = runs.run(copy.deepcopy(base).eval(), sizes[-1:]) if hidden else given
        # The probes ran eagerly (hooks in a compiled graph recompile it per copy); the
        # gradients judged are the compiled model's, all windows on one compiled copy.
        judged = given if compiled is None else runs.compiled(compiled, base, sizes)
        grads = {
            s: relative_differences(judged.splits[s].grads, judged.full.grads, dtype=dtype)
            for s in sizes
        }
        findings = module_findings(base, given, in_eval, runs)
        findings += loss_findings(in_eval, runs)
    findings += buffer_findings(base, given, tolerance)
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
