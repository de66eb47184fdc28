"""Ghost batch normalization: BatchNorm whose statistics never cross a ghost batch.

A :class:`GhostBatchNorm2d` with ``ghost_batch_size=g`` cuts its input, along
dim 0, into consecutive *ghost batches* of ``g`` samples and treats each one as
if :class:`torch.nn.BatchNorm2d` had been called on it alone, in data order:

- ghost batch ``j`` is normalized with its own mean and biased variance;
- the running statistics receive one update per ghost batch, with the
  unbiased variance, exactly as ``len(chunks)`` sequential BatchNorm calls;
- ``num_batches_tracked`` grows by the number of ghost batches.

Because no statistic crosses a ghost batch, the output, the gradients and the
running statistics are the same whether the samples arrive in one batch or in
micro-batches, as long as every micro-batch boundary is a ghost batch boundary.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules.batchnorm import _NormBase

from truebatch import _context
from truebatch.nn import cpu_kernels, ghost_kernels

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "GhostBatchNormBase"]

# Ghost batches with at least this many elements are normalized one BatchNorm
# call each, directly on the input; smaller ones all at once (benchmarks/layers.py
# measures both sides of the threshold).
_DIRECT_CHUNK_NUMEL = 65536

# (first sample, number of ghost batches, samples per ghost batch, way: ghost_kernels.FORWARD)
_Block = tuple[int, int, int, str]


def check_ghost_batch_size(ghost_batch_size: Any) -> int:
    """Return ``ghost_batch_size`` if it is a positive int, else raise with the fix."""
    if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int):
        raise TypeError(
            f"`ghost_batch_size` got {type(ghost_batch_size).__name__} {ghost_batch_size!r}; "
            "expected an int. Fix: pass the number of samples per ghost batch, e.g. 32."
        )
    if ghost_batch_size < 1:
        raise ValueError(
            f"`ghost_batch_size` got {ghost_batch_size}; expected an int >= 1. Fix: pass the "
            "number of samples per ghost batch, e.g. 32."
        )
    return ghost_batch_size


def _blocks(x: torch.Tensor, ghost: int) -> list[_Block]:
    """The kernel calls for the ghost batches of ``x``, in data order (the ways are
    those of :mod:`truebatch.nn.ghost_kernels`).

    A ghost batch alone in its call (the only one, or the short last one) goes
    through BatchNorm's own kernel. On CPU, the full ghost batches go together
    through truebatch's fused kernel when it is built (:mod:`truebatch.nn.cpu_kernels`;
    not under ``torch.compile``, which fuses the PyTorch ways itself). Otherwise
    full ghost batches of at least ``_DIRECT_CHUNK_NUMEL`` values take one
    BatchNorm call each, and smaller ones go together: by reductions over a view
    of the input (in closed form for two samples of one value per channel),
    except reduced-precision inputs with several values per channel and sample,
    for which GroupNorm's kernels, which stay in bfloat16 or float16, are
    faster than float32 reductions despite a copy.
    """
    batch, sample_numel = x.shape[0], math.prod(x.shape[1:])
    full, rest = divmod(batch, ghost)
    if full > 1 and _fused(x):
        blocks = [(0, full, ghost, "fused")]
    elif full > 1 and ghost * sample_numel < _DIRECT_CHUNK_NUMEL:
        low_precision = ghost_kernels.compute_dtype(x.dtype) != x.dtype
        if sample_numel == x.shape[1]:
            way = "pair" if ghost == 2 else "reduced"
        else:
            way = "grouped" if low_precision else "reduced"
        blocks = [(0, full, ghost, way)]
    else:
        blocks = [(j * ghost, 1, ghost, "native") for j in range(full)]
    if rest:
        blocks.append((full * ghost, 1, rest, "native"))
    return blocks


def _fused(x: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling() and cpu_kernels.serves(x.device)


def _rows(t: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """``t[start : start + count]``, or ``t`` itself when that is all of it (no view op)."""
    return t if start == 0 and count == t.shape[0] else t[start : start + count]


def _add(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total + part


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout of a tensor returned by :func:`_dense`."""
    for dims, layout in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if x.dim() == dims and not x.is_contiguous() and x.is_contiguous(memory_format=layout):
            return layout
    return torch.contiguous_format


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` if it is contiguous or channels-last, else a contiguous copy.

    BatchNorm's out= kernel assumes the input and the output share a layout;
    with ``x`` dense, ``torch.empty_like(x)`` has exactly its strides, and
    ``ghost_kernels.ghost_view`` is a view of both.
    """
    return x if _memory_format(x) != torch.contiguous_format else x.contiguous()


class _GhostBatchNormFunction(torch.autograd.Function):
    """Per-ghost-batch BatchNorm of a dense ``x`` (:func:`_dense`), block by block as
    :func:`_blocks` planned them.

    Given the running-average weight ``w_j`` of every ghost batch
    (:func:`_running_average_weights`), also returns, per channel, ``sum_j w_j mean_j``
    and ``sum_j w_j var_j`` with the unbiased variance (empty tensors without them):
    what BatchNorm's running statistics receive from the ghost batches.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        blocks: list[_Block],
        eps: float,
        running_weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = torch.empty_like(x)
        updates: list[torch.Tensor] = []
        saved: list[torch.Tensor] = []
        row = 0
        for start, chunks, size, way in blocks:
            rows = chunks * size
            block_saved, block_updates = ghost_kernels.block_forward(
                way,
                _rows(x, start, rows),
                weight,
                bias,
                chunks,
                eps,
                _rows(out, start, rows),
                None if running_weights is None else _rows(running_weights, row, chunks),
            )
            if block_updates is not None and updates:
                updates = [a + b for a, b in zip(updates, block_updates, strict=True)]
            elif block_updates is not None:
                updates = list(block_updates)
            saved += block_saved
            row += chunks
        ctx.save_for_backward(x, weight, *saved)
        ctx.blocks, ctx.eps = blocks, eps
        mean_update, var_update = updates or (x.new_empty(0), x.new_empty(0))
        ctx.mark_non_differentiable(mean_update, var_update)
        return out, mean_update, var_update

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_out: torch.Tensor, _grad_mean: Any, _grad_var: Any
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight, *saved = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        grad_out = grad_out.contiguous(memory_format=_memory_format(x))
        grad_x = torch.empty_like(x) if mask[0] else None
        grad_weight: torch.Tensor | None = None
        grad_bias: torch.Tensor | None = None
        for (start, chunks, size, way), first, second in zip(
            ctx.blocks, saved[::2], saved[1::2], strict=True
        ):
            rows = chunks * size
            gw, gb = ghost_kernels.BACKWARD[way](
                _rows(grad_out, start, rows),
                _rows(x, start, rows),
                weight,
                chunks,
                (first, second),
                ctx.eps,
                mask,
                None if grad_x is None else _rows(grad_x, start, rows),
            )
            if mask[1]:
                grad_weight = _add(grad_weight, gw.to(weight.dtype))
            if mask[2]:
                grad_bias = _add(grad_bias, gb.to(weight.dtype))
        return grad_x, grad_weight, grad_bias, None, None, None


def _normalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    ghost: int,
    eps: float,
    running_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:class:`_GhostBatchNormFunction`'s outputs. A batch of full ghost batches on the
    CPU kernel is one C++ autograd node (``cpu_kernels.cpp``), without the Python
    ``autograd.Function``'s fixed cost; anything else goes block by block."""
    x = _dense(x)
    blocks = _blocks(x, ghost)
    if len(blocks) == 1 and blocks[0][3] == "fused":
        return torch.ops.truebatch_cpu.ghost_batch_norm(
            x, weight, bias, blocks[0][1], eps, ghost_kernels.is_channels_last(x), running_weights
        )
    return _GhostBatchNormFunction.apply(x, weight, bias, blocks, eps, running_weights)


def _running_average_weights(
    chunks: int, momentum: float | None, tracked_before: int | None
) -> tuple[float, torch.Tensor]:
    """Closed form of ``chunks`` sequential BatchNorm running-average updates.

    BatchNorm updates ``r <- (1 - f_j) r + f_j s_j`` once per batch. After the
    ghost batches ``j = 0..n-1`` this is ``r <- keep * r + sum_j w_j s_j`` with

    - constant ``momentum=m``: ``keep = (1-m)^n``, ``w_j = m (1-m)^(n-1-j)``;
    - ``momentum=None`` (cumulative average, ``t`` batches seen before):
      ``keep = t / (t+n)``, ``w_j = 1 / (t+n)``;
    - ``momentum=None`` without ``num_batches_tracked``: factor 0, no change.

    The ``w_j`` are a float64 tensor (one per ghost batch: thousands for small ghost
    batches, where a Python list measured a tenth of the layer's time).
    """
    if momentum is not None:
        powers = torch.arange(chunks - 1, -1, -1, dtype=torch.float64)
        return (1.0 - momentum) ** chunks, torch.pow(1.0 - momentum, powers).mul_(momentum)
    if tracked_before is None:
        return 1.0, torch.zeros(chunks, dtype=torch.float64)
    total = tracked_before + chunks
    return tracked_before / total, torch.full((chunks,), 1.0 / total, dtype=torch.float64)


@functools.lru_cache(maxsize=64)
def _constant_momentum_weights(
    chunks: int, momentum: float, device: torch.device, dtype: torch.dtype
) -> tuple[float, torch.Tensor]:
    """:func:`_running_average_weights` for a constant momentum, which depend on nothing
    else: computed once per shape (read-only; four tensor ops a call otherwise)."""
    keep, weights = _running_average_weights(chunks, momentum, None)
    return keep, weights.to(device, dtype)


class GhostBatchNormBase(_NormBase):
    """Shared implementation of :class:`GhostBatchNorm1d`, ``2d`` and ``3d``.

    A ``_NormBase`` (the base torch gives BatchNorm and InstanceNorm: parameters,
    buffers, state-dict keys and loading) but not a ``_BatchNorm``, so that
    ``nn.SyncBatchNorm.convert_sync_batchnorm``, which swaps every ``_BatchNorm``,
    leaves ghost layers alone: their statistics never need other ranks.
    """

    _input_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self.ghost_batch_size = check_ghost_batch_size(ghost_batch_size)

    @property
    def batch_unit(self) -> int:
        """Micro-batches must hold whole ghost batches in train mode (``tb.batch_unit``)."""
        return self.ghost_batch_size if self.training else 1

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in self._input_dims:
            expected = " or ".join(f"{d}D" for d in self._input_dims)
            raise ValueError(
                f"`input` got a {input.dim()}D tensor; expected {expected} input "
                f"({type(self).__name__}). Fix: pass (N, C, ...) with the samples along dim 0."
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training or (self.running_mean is None and self.running_var is None)):
            # Running statistics: exactly BatchNorm eval.
            return F.batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )
        self._check_ghost_batches(input)
        update = self.training and self.track_running_stats and self.running_mean is not None
        chunks = -(-input.shape[0] // self.ghost_batch_size)
        keep, weights = self._running_average(chunks, input.device) if update else (1.0, None)
        out, mean_update, var_update = _normalize(
            input, self.weight, self.bias, self.ghost_batch_size, self.eps, weights
        )
        if update and _fused(input):  # one call (the three below cost more than the kernel)
            torch.ops.truebatch_cpu.ghost_batch_norm_update(
                self.running_mean,
                self.running_var,
                self.num_batches_tracked,
                keep,
                mean_update,
                var_update,
                chunks,
            )
        elif update:
            with torch.no_grad():
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(chunks)
                running = [self.running_mean, self.running_var]
                torch._foreach_mul_(running, keep)
                torch._foreach_add_(running, [mean_update, var_update])  # float64, rounded once
        return out

    def _check_ghost_batches(self, input: torch.Tensor) -> None:
        name, ghost = type(self).__name__, self.ghost_batch_size
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"`input` got {input.shape[1]} channels (dim 1); expected "
                f"num_features={self.num_features} ({name}). Fix: check the layer before it."
            )
        context = _context.current()
        if context is not None and context.offset % ghost:
            raise ValueError(
                f"micro-batch start got sample {context.offset}; expected a multiple of "
                f"ghost_batch_size={ghost} ({name}: a ghost batch would straddle two "
                f"micro-batches). Fix: set micro_batch_size to a multiple of {ghost}."
            )
        per_sample = math.prod(input.shape[2:])
        last = input.shape[0] % ghost or ghost
        if per_sample == 1 and 1 in (ghost, last) and input.shape[0] > 0:
            raise ValueError(
                f"`input` got a ghost batch of 1 sample with 1 value per channel (batch of "
                f"{input.shape[0]}, ghost_batch_size={ghost}); expected more than 1 value per "
                f"channel, for a variance ({name}). Fix: use ghost_batch_size >= 2 and a batch "
                "size that leaves no single sample over."
            )

    def _running_average(self, chunks: int, device: torch.device) -> tuple[float, torch.Tensor]:
        """``keep`` and the weights ``w_j`` of ``chunks`` ghost batches
        (:func:`_running_average_weights`) on ``device``: float64 on CPU (what the kernel
        sums in), else in the running statistics' dtype (some devices lack float64)."""
        assert self.running_mean is not None
        dtype = torch.float64 if device.type == "cpu" else self.running_mean.dtype
        if self.momentum is not None and not torch.compiler.is_compiling():
            return _constant_momentum_weights(chunks, self.momentum, device, dtype)
        tracked_before = None
        if self.num_batches_tracked is not None and self.momentum is None:
            tracked_before = int(self.num_batches_tracked)
        keep, weights = _running_average_weights(chunks, self.momentum, tracked_before)
        return keep, weights.to(device, dtype)


_STATISTICS_DOC = """
    In train mode, each consecutive chunk of ``ghost_batch_size`` samples along
    dim 0 (a *ghost batch*) is normalized exactly as :class:`torch.nn.{bn}` would
    normalize that chunk alone::

        y = (x - mean_j) / sqrt(var_j + eps) * weight + bias

    where ``mean_j`` and the biased ``var_j`` are taken over the samples of
    ghost batch ``j`` and all dims but the channel dim 1. A last ghost batch with
    fewer than ``ghost_batch_size`` samples (batch size not a multiple) is
    normalized on its own statistics. The running statistics are updated once
    per ghost batch, in data order, with the unbiased variance — the values
    sequential BatchNorm calls on the chunks would leave (computed in closed
    form, equal up to rounding) — and ``num_batches_tracked`` grows by the number
    of ghost batches. ``momentum=None`` is the cumulative average, as in BatchNorm.

    In eval mode with running statistics this *is* BatchNorm eval. Without
    running statistics (``track_running_stats=False``) the layer normalizes per
    ghost batch in eval mode too, where BatchNorm would use the whole batch.

    The output, the gradients and the running statistics do not depend on how
    the batch is split into micro-batches, provided every micro-batch but the
    last holds a multiple of ``ghost_batch_size`` samples. Inside an
    :class:`truebatch.Accumulator` a micro-batch starting at a sample that is not
    a multiple of ``ghost_batch_size`` raises ``ValueError``.

    State-dict keys, constructor arguments and the eval path are those of
    :class:`torch.nn.{bn}`. The layer is a ``torch.nn.modules.batchnorm._NormBase``
    (like BatchNorm and InstanceNorm) but *not* an ``nn.{bn}``: this keeps
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` from turning it back into a
    SyncBatchNorm (it swaps every ``_BatchNorm``). Test for ghost layers with
    ``isinstance(layer, truebatch.nn.batchnorm.GhostBatchNormBase)``.
    Supports first-order gradients only (no double backward).

    Example::

        >>> bn = truebatch.nn.{name}(64, ghost_batch_size=32)
        >>> y = bn(torch.randn({example}))  # 8 ghost batches of 32 samples
"""


class GhostBatchNorm1d(GhostBatchNormBase):
    __doc__ = (
        "BatchNorm1d over ghost batches of ``ghost_batch_size`` samples; "
        "input ``(N, C)`` or ``(N, C, L)``.\n"
        + _STATISTICS_DOC.format(bn="BatchNorm1d", name="GhostBatchNorm1d", example="256, 64")
    )
    _input_dims = (2, 3)


class GhostBatchNorm2d(GhostBatchNormBase):
    __doc__ = (
        "BatchNorm2d over ghost batches of ``ghost_batch_size`` samples; input ``(N, C, H, W)``.\n"
        + _STATISTICS_DOC.format(
            bn="BatchNorm2d", name="GhostBatchNorm2d", example="256, 64, 16, 16"
        )
    )
    _input_dims = (4,)


class GhostBatchNorm3d(GhostBatchNormBase):
    __doc__ = (
        "BatchNorm3d over ghost batches of ``ghost_batch_size`` samples; "
        "input ``(N, C, D, H, W)``.\n"
        + _STATISTICS_DOC.format(
            bn="BatchNorm3d", name="GhostBatchNorm3d", example="256, 64, 4, 8, 8"
        )
    )
    _input_dims = (5,)
