"""Cached windows: the exact big batch for a loss that mixes the window's samples.

A contrastive loss (CLIP, SimCLR, in-batch negatives, batch-hard triplets)
compares every representation of the window with every other one:
``L = loss_fn(r)``, ``r = (r_1, ..., r_k)``, ``r_j = encode(theta, x_j)`` for
the window's micro-batches ``j``. By the chain rule,

    dL/dtheta = sum_j (dL/dr_j)^T dr_j/dtheta  +  dL/dtheta |_r

(the last term for parameters the loss uses itself, such as CLIP's
temperature). With ``G_j = dL/dr_j`` computed once, on all representations at
once, micro-batch ``j`` contributes the gradient of its *surrogate*
``s_j = sum(r_j * G_j)`` (Gao et al. 2021, gradient caching). Hence three
phases, holding one micro-batch's graph plus the window's representations:

1. every micro-batch's ``encode_fn`` without a graph, keeping ``r_j``;
   under DDP all ranks' representations are gathered (global negatives);
2. ``L = loss_fn(r, window)`` with ``r`` requiring grad: ``G`` and the
   loss's own parameter gradient, by one ``torch.autograd.grad``;
3. :meth:`Accumulator.step_window` over the micro-batches, each paired with
   its rows of ``G``. A pass's loss has the value ``l_j``, ``L`` on one
   micro-batch and 0 on the others (the window reports the true loss), and
   the surrogate's gradient: its backward sends ``G_j``, times the pass's
   weight, into ``r_j``, as ``torch.autograd.backward(r_j, G_j)`` would.

The Accumulator scales every backward by ``world_size / N`` and DDP averages
over ranks. Under global negatives every rank computes the same ``L`` from
the gathered representations and each rank backpropagates its own rows of
``G``, so the ranks' surrogates sum to ``dL/dtheta`` and the synchronized
gradient is ``dL/dtheta / N``: the big batch of all ranks, in one process.
Under local negatives ``L = sum over ranks of L_r``, each rank's loss on its
own representations.

Both forwards of a micro-batch see the same randomness: split-invariant
dropout (:mod:`truebatch.nn`) draws its mask from the sample's position,
which both forwards declare identically; for native random ops the RNG state
of the CPU and of every CUDA device holding the model's parameters
(:func:`truebatch.snapshot.rng_state`, as a window's start saves it) is
recorded before the first forward and replayed before the second. Buffers (BatchNorm statistics) are
put back after phase 1, so they are updated once, by phase 3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from truebatch import _context
from truebatch.batching import Batch, Counter, batch_size, map_tensors, split, tensor_leaves
from truebatch.gather import DeferredBufferBroadcast, concat, gather_window
from truebatch.gradients import ParameterSets
from truebatch.snapshot import (
    RNGState,
    WindowStart,
    copy_into,
    rng_state,
    same_rng_state,
    set_rng_state,
)

if TYPE_CHECKING:
    from truebatch.accumulator import Accumulator, StepResult

__all__ = ["EncodeFn", "Negatives", "WindowLossFn", "step_cached"]

Representations = Any
EncodeFn = Callable[[nn.Module, Batch], Representations]
WindowLossFn = Callable[[Representations, Batch], "torch.Tensor | tuple[torch.Tensor, Any]"]
Negatives = Literal["global", "local"]


def step_cached(
    accumulator: Accumulator,
    micro_batches: Iterable[Batch],
    encode_fn: EncodeFn,
    loss_fn: WindowLossFn,
    count: Counter | None = None,
    *,
    negatives: Negatives = "global",
    window_batch: bool = True,
    parameters: ParameterSets,
    step_cut: Callable[..., StepResult],
) -> StepResult:
    """One exact step of a window whose loss mixes its samples (see the module docstring).

    This is :meth:`truebatch.Accumulator.step_cached`; see there. ``parameters`` are
    the Accumulator's (read again here: one walk of the model for the whole window);
    ``step_cut`` runs the Accumulator's window and step on micro-batches already cut
    here, in phase 1.
    """
    _check_arguments(accumulator, encode_fn, loss_fn, count, negatives)
    parameters.refresh()
    devices = parameters.devices
    start = WindowStart(accumulator.model, devices, parameters.buffers)
    grads = [(p, p.grad) for p in parameters.model]
    try:
        window = _CachedWindow(
            accumulator, parameters, start, negatives=negatives, window_batch=window_batch
        )
        window.encode(micro_batches, encode_fn)
        window.differentiate(loss_fn, count)
        result = step_cut(window.passes, window.pass_loss_fn(encode_fn), window.pass_count(count))
    except BaseException:
        start.restore()
        for parameter, grad in grads:
            parameter.grad = grad
        raise
    set_rng_state(window.rng_after, devices)
    return result


# ------------------------------------------------------------------ the window


@dataclass
class _CachedWindow:
    """One window's state, filled phase by phase.

    Attributes:
        passes: per micro-batch ``{"batch", "rep_grad", "sample"}``: its batch, its rows
            of ``G = dL/dr``, and the local index of each sample (which also finds the
            RNG state recorded for the micro-batch, however step_window splits it).
        parameters: the model's parameters, buffers and devices, read as the window starts.
        start: the buffers and RNG (of the CPU and every device of the parameters) as the
            window starts; phase 1's buffer updates are undone from it.
        rng: the RNG state before each micro-batch's first forward, by first sample.
        rng_used: whether phase 1 drew random numbers at all.
        rng_after: the RNG state once the loss is computed; the window ends there.
        loss_value: ``L`` (this rank's share), carried by the designated micro-batch.
        zero: the value of the other passes' loss (0, in the loss's dtype and device).
        loss_count: the count loss_fn returned, carried like ``loss_value``.
        loss_param_grads: ``dL/dtheta |_r`` for parameters the loss uses itself.
        designated: whether this rank's first micro-batch carries the loss value.
    """

    accumulator: Accumulator
    parameters: ParameterSets
    start: WindowStart
    negatives: Negatives
    window_batch: bool
    pieces: list[Batch] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    micro_batches: list[Batch] = field(default_factory=list)
    reps: list[Representations] = field(default_factory=list)
    rng: dict[int, RNGState] = field(default_factory=dict)
    rng_used: bool = False
    rng_after: RNGState | None = None
    rank_sizes: list[int] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    loss_value: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    loss_count: float | None = None
    loss_param_grads: list[tuple[nn.Parameter, torch.Tensor | None]] = field(default_factory=list)
    designated: bool = False

    # ----------------------------------------------------------- phase 1

    def encode(self, micro_batches: Iterable[Batch], encode_fn: EncodeFn) -> None:
        """Run ``encode_fn`` on every micro-batch without a graph; keep the representations."""
        acc = self.accumulator
        for piece in micro_batches:
            if batch_size(piece):
                self.pieces.append(piece)
            pieces = split(
                piece, acc.micro_batch_size, max_tokens=acc.max_tokens, tokens=acc.tokens
            )
            for micro_batch in pieces:
                size = batch_size(micro_batch)
                if size:
                    self.micro_batches.append(micro_batch)
                    self.sizes.append(size)
        wait = acc.sync.exchange([float(sum(self.sizes))])

        def rank_offset() -> int:
            self.rank_sizes = self.rank_sizes or [int(row[0]) for row in wait()]
            return sum(self.rank_sizes[: acc.sync.rank])

        devices = self.parameters.devices
        window, offset = acc.completed_windows, 0
        with torch.no_grad(), DeferredBufferBroadcast(acc.model):
            for micro_batch, size in zip(self.micro_batches, self.sizes, strict=True):
                self.rng[offset] = rng_state(devices)
                with (
                    _context.micro_batch(window, offset, rank_offset),
                    _autocast(acc, self.parameters.devices[0]),
                ):
                    reps = encode_fn(acc.model, micro_batch)
                self.reps.append(_checked_reps(reps, size))
                offset += size
        self.rng_used = not same_rng_state(self.start.rng, rng_state(devices))
        # Phase 3 updates the buffers; its forwards then see the values phase 1 saw.
        copy_into(self.parameters.buffers, self.start.buffers)
        rank_offset()

    # ----------------------------------------------------------- phase 2

    def differentiate(self, loss_fn: WindowLossFn, count: Counter | None) -> None:
        """``L = loss_fn(r, window)``; ``G = dL/dr`` for this rank's rows, by micro-batch."""
        acc = self.accumulator
        local_reps = concat(self.reps) if self.reps else None
        local_batch = concat(self.pieces) if self.window_batch and self.reps else None
        self.reps = []  # the concatenation holds them now
        gather = self.negatives == "global" and acc.sync.distributed
        if gather and not any(self.rank_sizes):
            reps = batch = None
        elif gather:
            reps, batch = gather_window(
                acc.sync, self.parameters.devices[0], local_reps, local_batch, self.rank_sizes
            )
            first = sum(self.rank_sizes[: acc.sync.rank])
            owner = next(rank for rank, n in enumerate(self.rank_sizes) if n)
            self.designated = owner == acc.sync.rank
        else:
            reps, batch, first = local_reps, local_batch, 0
            self.designated = bool(self.sizes)
        if reps is None:  # no samples (on this rank, under local negatives): no loss
            self.rng_after = rng_state(self.parameters.devices)
            self.zero = torch.zeros((), device=self.parameters.devices[0])
            # Its replayed passes still reach every parameter, with weight 0, for DDP.
            self.loss_param_grads = [(p, None) for p in self.parameters.trainable]
            return
        reps = map_tensors(reps, _leaf_for_grad)
        leaves = [t for _, t in tensor_leaves(reps, None) if t.requires_grad]
        params = self.parameters.trainable
        with _autocast(acc, self.parameters.devices[0]):
            output = loss_fn(reps, batch if self.window_batch else None)
        loss, self.loss_count = _parse_loss(output, count)
        grads = torch.autograd.grad(loss, [*leaves, *params], allow_unused=True)
        self.rng_after = rng_state(self.parameters.devices)
        self.loss_value = loss.detach()
        self.zero = self.loss_value.new_zeros(())
        self.loss_param_grads = [
            (p, g) for p, g in zip(params, grads[len(leaves) :], strict=True) if g is not None
        ]
        rep_grads = iter(grads[: len(leaves)])
        self._build_passes(map_tensors(reps, lambda t: _grad_of(t, rep_grads)), first)

    def _build_passes(self, grads: Representations, first: int) -> None:
        """Pair every micro-batch with its rows of ``G`` (this rank's rows of the window
        start at ``first``)."""
        n = sum(self.sizes)
        mine = map_tensors(grads, lambda g: g[first : first + n])
        offset = 0
        for micro_batch, size in zip(self.micro_batches, self.sizes, strict=True):
            rows = map_tensors(mine, lambda g, o=offset, s=size: g[o : o + s])
            self.passes.append(
                {
                    "batch": micro_batch,
                    "rep_grad": rows,
                    "sample": torch.arange(offset, offset + size),
                }
            )
            offset += size

    # ----------------------------------------------------------- phase 3

    def pass_loss_fn(self, encode_fn: EncodeFn) -> Callable[[nn.Module, Any], torch.Tensor]:
        """The loss of one pass: the true loss share as value, ``G_j`` as gradient."""
        devices = self.parameters.devices

        def pass_loss(model: nn.Module, item: dict[str, Any]) -> torch.Tensor:
            first = int(item["sample"][0])
            recorded = self.rng.get(first)
            if recorded is not None:
                set_rng_state(recorded, devices)
            elif self.rng_used:
                raise RuntimeError(
                    f"`micro_batches` got a micro-batch starting at sample {first} that the "
                    "first pass did not run; expected the same split in both passes. Fix: "
                    "report this as a truebatch bug."
                )
            reps = encode_fn(model, item["batch"])
            carries = self.designated and first == 0
            value = self.loss_value if carries else self.zero
            return _pass_loss(reps, item["rep_grad"], self.loss_param_grads, value, carries=carries)

        return pass_loss

    def pass_count(self, count: Counter | None) -> Counter | None:
        """The item count of a pass: the user's counter, or the count loss_fn returned."""
        if count is not None:
            return lambda item: count(item["batch"])
        if self.loss_count is None:
            return None  # samples: the Accumulator counts them
        total = self.loss_count
        return lambda item: total if self.designated and int(item["sample"][0]) == 0 else 0.0


def _pass_loss(
    reps: Representations,
    rep_grads: Representations,
    loss_param_grads: list[tuple[nn.Parameter, torch.Tensor | None]],
    value: torch.Tensor,
    *,
    carries: bool,
) -> torch.Tensor:
    """A 0-dim tensor of ``value`` whose backward sends ``G_j`` (times the pass's weight)
    into the representations, and ``dL/dtheta|_r`` into the loss's own parameters on the
    micro-batch that ``carries`` the loss: the gradient of ``sum(r_j * G_j)``, without
    computing it. Under DDP every synchronizing pass must reach every parameter, so the
    other passes send the loss's own parameters zeros."""
    pairs = [
        (r, g)
        for (_, r), (_, g) in zip(
            tensor_leaves(reps, None), tensor_leaves(rep_grads, None), strict=True
        )
        if r.requires_grad
    ]
    if not pairs:
        raise TypeError(
            "`encode_fn` got no representation that requires grad; expected the model's "
            "output. Fix: return the encoder's output without .detach() or torch.no_grad()."
        )
    inputs = [r for r, _ in pairs] + [p for p, _ in loss_param_grads]
    grads = [g for _, g in pairs] + [g if carries else None for _, g in loss_param_grads]
    return _CachedGradient.apply(value, grads, *inputs)


class _CachedGradient(torch.autograd.Function):
    """``forward(value, grads, *inputs)`` returns ``value``; ``backward`` gives each input
    ``grad_output * grads[i]`` (zeros where ``grads[i]`` is None): what
    ``torch.autograd.backward(inputs, grads)`` does, as one node under the pass's loss.
    ``(r * G).sum()`` would cost a product, a sum and their backwards per representation."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, grads: list[Any], *inputs: torch.Tensor) -> Any:
        ctx.grads = grads
        ctx.inputs = [(t.dtype, t.shape, t.device) for t in inputs]
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        out = []
        for g, (dtype, shape, device) in zip(ctx.grads, ctx.inputs, strict=True):
            if g is None:
                out.append(torch.zeros(shape, dtype=dtype, device=device))
            else:
                out.append((g * grad_output.to(g.device)).to(dtype))
        return (None, None, *out)


# ------------------------------------------------------------------ helpers


def _autocast(acc: Accumulator, device: torch.device) -> AbstractContextManager[Any]:
    """Autocast on the model's first device, as the Accumulator's passes run."""
    if acc.autocast is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=acc.autocast)


def _leaf_for_grad(t: torch.Tensor) -> torch.Tensor:
    """A representation the loss differentiates: every floating tensor."""
    t = t.detach()
    return t.requires_grad_() if t.is_floating_point() else t


def _grad_of(t: torch.Tensor, grads: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """The next gradient for a representation that has one (zeros if the loss ignored it);
    other leaves stay, so the leaves of ``G`` line up with the representations'."""
    if not t.requires_grad:
        return t
    g = next(iter(grads))
    return torch.zeros_like(t) if g is None else g


def _checked_reps(reps: Any, size: int) -> Representations:
    leaves = tensor_leaves(reps, "representations")
    if not leaves:
        raise TypeError(
            f"`encode_fn` got {type(reps).__name__}; expected a tensor or a tuple/dict of "
            "tensors. Fix: return the micro-batch's representations."
        )
    for path, t in leaves:
        if t.dim() == 0 or t.shape[0] != size:
            raise ValueError(
                f"`encode_fn` returned {path} of shape {tuple(t.shape)}; expected dim 0 = "
                f"the micro-batch's {size} samples. Fix: return one row per sample."
            )
    return reps


def _parse_loss(output: Any, count: Counter | None) -> tuple[torch.Tensor, float | None]:
    returned = None
    if isinstance(output, tuple | list):
        if len(output) != 2:
            raise TypeError(
                f"`loss_fn` returned {len(output)} items; expected the loss sum or "
                "(loss_sum, count). Fix: return one of the two."
            )
        if count is not None:
            raise TypeError(
                "`loss_fn` returned (loss_sum, count) while count=... was given; expected one "
                "of the two. Fix: drop count=... or return the loss sum alone."
            )
        output, value = output
        returned = float(value.detach().sum() if isinstance(value, torch.Tensor) else value)
        if not returned >= 0:
            raise ValueError(
                f"`loss_fn` returned count {returned}; expected 0 or more items. Fix: return "
                "the number of items the loss sums over."
            )
    if not isinstance(output, torch.Tensor) or output.dim() != 0:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise TypeError(
            f"`loss_fn` returned {shape}; expected a 0-dim tensor, the SUM over the window's "
            "items. Fix: return losses.sum()."
        )
    if not output.requires_grad:
        raise TypeError(
            "`loss_fn` returned a loss that does not require grad; expected a function of the "
            "representations. Fix: compute it from them without .detach()."
        )
    return output, returned


def _check_arguments(
    acc: Accumulator, encode_fn: Any, loss_fn: Any, count: Any, negatives: Any
) -> None:
    for name in ("micro_batch_size", "max_tokens"):
        if getattr(acc, name) == "auto":
            raise ValueError(
                f"`{name}` got 'auto'; expected an int or None with step_cached (both "
                f"passes must split alike). Fix: pass a fixed {name}."
            )
    if acc.sync.kind == "fsdp2":
        raise ValueError(
            "`model` got an FSDP2 model; expected a local or DDP model with step_cached (its "
            "no-grad pass gathers parameters per micro-batch). Fix: wrap it in DDP."
        )
    for name, fn in (("encode_fn", encode_fn), ("loss_fn", loss_fn)):
        if not callable(fn):
            raise TypeError(
                f"`{name}` got {type(fn).__name__}; expected a function. Fix: pass one."
            )
    if count is not None and not callable(count):
        raise TypeError(
            f"`count` got {type(count).__name__}; expected count(micro_batch) or None. "
            "Fix: pass tb.count_samples, tb.count_tokens(...) or None."
        )
    if negatives not in ("global", "local"):
        raise ValueError(
            f"`negatives` got {negatives!r}; expected 'global' or 'local'. Fix: pass one."
        )
