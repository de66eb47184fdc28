"""The four ways ghost BatchNorm normalizes a block of ghost batches.

Each way computes, for every ghost batch ``j`` and channel ``c`` of a block,
BatchNorm's training-mode forward and backward over the ``n`` values of that
(ghost batch, channel)::

    y = (x - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var + eps)
    dx = rstd * weight * (dy - S(dy) / n - x_hat * S(dy * x_hat) / n)

with ``mean`` and the biased ``var`` over those values, ``x_hat = (x - mean) * rstd``
and ``S`` the sum over them; the weight and bias gradients are ``S(dy * x_hat)``
and ``S(dy)`` summed over ghost batches. Forwards write ``y`` into ``out`` and
the mean and unbiased variance (BatchNorm's running-statistics inputs) into
``mean`` and ``var`` rows, and return two tensors that their backward needs.

- ``native``: one ghost batch, through BatchNorm's own kernels, on the input.
- ``reduced``: the ghost batches of a ``(G, g, C, L)`` view, by sums over dims
  1 and 3 (no copy of the input, float32 arithmetic for reduced precision).
- ``pair``: ghost batches of two samples with one value per channel, in closed
  form on the ``(G, C)`` halves of the ``(G, 2, C)`` view (below).
- ``grouped``: GroupNorm's kernels on a ``(G, C, g, L)`` copy, each (ghost
  batch, channel) a group; reduced-precision inputs stay in their dtype there.
- ``fused``: truebatch's CPU kernel (:mod:`truebatch.nn.cpu_kernels`) for any
  of the above on CPU; it returns the running statistics' updates rather than
  rows (``fused_forward``).

Which way a block takes is a measured choice (``GhostBatchNormBase``'s plan,
``benchmarks/layers.py``).
"""

from __future__ import annotations

import functools

import torch

# Below this many samples per ghost batch, the sums over a ghost batch's samples are
# taken by pairwise halving: ATen's reduction over a short middle dim is slower.
_PAIRWISE_BELOW = 32

Saved = tuple[torch.Tensor, torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reduced-precision inputs are normalized in float32, as BatchNorm's kernels do."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def ghost_view(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """``(chunks*g, C, ...)`` -> the ``(chunks, g, C, L)`` view (``x`` contiguous or
    channels-last: both give a view), ``(chunks, g, C)`` when ``L`` is 1.

    Without the trailing dim of size 1: ATen's element-wise kernels broadcasting a
    ``(G, 1, C, 1)`` operand over ``(G, g, C, 1)`` measured 3.5x slower than the
    same arithmetic on ``(G, g, C)`` (``benchmarks/layers.py``, GhostBatchNorm1d).
    """
    view = x.view(chunks, x.shape[0] // chunks, x.shape[1], -1)
    return view if view.shape[3] > 1 else view.squeeze(3)


def ghost_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum of a :func:`ghost_view` over its ghost-batch samples (dim 1) and ``L``
    (dim 3), keeping the dims: ``(G, 1, C, 1)`` or ``(G, 1, C)``."""
    if v.dim() == 4:
        v = v.sum(3, keepdim=True)
    if v.shape[1] >= _PAIRWISE_BELOW:
        return v.sum(1, keepdim=True)
    while v.shape[1] > 1:
        half = v.shape[1] // 2
        total = v[:, :half] + v[:, half : 2 * half]
        if v.shape[1] % 2:
            total[:, :1] += v[:, 2 * half :]
        v = total
    return v


def ghost_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``ghost_sum(a * b)``; with one value per channel and sample, the first halving
    multiplies and adds in one pass instead of writing the whole product."""
    size = a.shape[1]
    if a.dim() == 4 or size >= _PAIRWISE_BELOW or size == 1:
        return ghost_sum(a * b)
    half = size // 2
    total = a[:, :half] * b[:, :half]
    total.addcmul_(a[:, half : 2 * half], b[:, half : 2 * half])
    if size % 2:
        total[:, :1].addcmul_(a[:, 2 * half :], b[:, 2 * half :])
    return ghost_sum(total)


def _per_channel(parameter: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``parameter`` ``(C,)`` shaped to broadcast against the :func:`ghost_view` ``like``."""
    if parameter is None:
        return None
    return parameter.view(1, 1, -1) if like.dim() == 3 else parameter.view(1, 1, -1, 1)


def reduced_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    chunks: int,
    eps: float,
    out: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
) -> Saved:
    """``mean = S(x) / n``, ``var = S(d * d) / n`` with ``d = x - mean`` (two passes,
    as BatchNorm's kernel, so a large mean costs no precision), then
    ``y = d * (rstd * weight) + bias``, with ``d`` held in ``out``. Saves ``mean``
    and ``rstd`` (the backward recomputes ``d``, as BatchNorm keeps only the input)."""
    view = ghost_view(x, chunks)
    n = view.numel() // (chunks * view.shape[2])
    # One explicit conversion: ATen's mixed-dtype elementwise kernels are not vectorized.
    xc = view.to(compute_dtype(x.dtype))
    block_mean = ghost_sum(xc).div_(n)
    out_view = ghost_view(out, chunks)
    # d over the converted copy, or in out: a fresh input-sized tensor costs page faults
    # that measured slower than the subtraction itself.
    d = torch.sub(xc, block_mean, out=xc if xc is not view else out_view)
    block_var = ghost_dot(d, d).div_(n)
    rstd = (block_var + eps).rsqrt_()
    scale = rstd if weight is None else rstd * _per_channel(weight, d)
    shift = torch.zeros_like(rstd) if bias is None else _per_channel(bias, d).to(rstd.dtype)
    # Explicit outputs: an addcmul whose first operand is the (G, 1, C, 1) one lays its
    # result out after that operand, which is slow to traverse.
    torch.addcmul(shift, d, scale, out=d)
    if d is not out_view:
        out_view.copy_(d)
    mean.copy_(block_mean.view(chunks, -1))
    var.copy_(block_var.view(chunks, -1).mul_(n / (n - 1)))
    return block_mean, rstd


def reduced_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    chunks: int,
    saved: Saved,
    eps: float,
    mask: list[bool],
    grad_x: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dx = k * dy + b * d + a`` with per-(ghost batch, channel) ``k = rstd * weight``,
    ``b = -k * rstd * S(dy * x_hat) / n``, ``a = -k * S(dy) / n``: two passes, ``d``
    recomputed into ``grad_x``."""
    block_mean, rstd = saved
    view = ghost_view(x, chunks)
    xc = view.to(rstd.dtype)
    grad_view = None if grad_x is None else ghost_view(grad_x, chunks)
    target = xc if xc is not view else grad_view
    d = xc - block_mean if target is None else torch.sub(xc, block_mean, out=target)
    n = d.numel() // (chunks * d.shape[2])
    dy = ghost_view(grad_out, chunks).to(d.dtype)
    sum_dy = ghost_sum(dy)
    sum_dy_xhat = ghost_dot(dy, d).mul_(rstd)
    if grad_view is not None:
        k = rstd if weight is None else rstd * _per_channel(weight, d)
        minus_k_over_n = k * (-1.0 / n)
        a = minus_k_over_n * sum_dy
        b = minus_k_over_n.mul_(rstd).mul_(sum_dy_xhat)
        torch.addcmul(a, d, b, out=d).addcmul_(dy, k)
        if d is not grad_view:
            grad_view.copy_(d)
    dims = [0, 1, *range(3, d.dim())]
    return sum_dy_xhat.sum(dims), sum_dy.sum(dims)


def pair_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    chunks: int,
    eps: float,
    out: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
) -> Saved:
    """Two values ``x0, x1`` per (ghost batch, channel): ``x0 - mean = h = (x0 - x1) / 2 =
    -(x1 - mean)``, ``var = h**2``, so ``x_hat = +-t`` with ``t = h * rstd`` and
    ``y = bias +- t * weight``. Every operation is on ``(G, C)`` halves: none
    broadcasts over the samples, which ATen's element-wise kernels do slowly for
    a short sample dim. Saves ``t`` and ``rstd``."""
    view = ghost_view(x, chunks)
    dtype = compute_dtype(x.dtype)
    first, second = view[:, 0].to(dtype), view[:, 1].to(dtype)
    half = torch.sub(first, second).mul_(0.5)
    square = half * half
    rstd = torch.add(square, eps).rsqrt_()
    torch.add(first, second, out=mean).mul_(0.5)
    torch.mul(square, 2.0, out=var)
    t = half.mul_(rstd)
    scaled = t if weight is None else t * weight
    out_view = ghost_view(out, chunks)
    if bias is None:
        out_view[:, 0].copy_(scaled)
        torch.neg(scaled, out=out_view[:, 1])
    else:
        torch.add(bias, scaled, out=out_view[:, 0])
        torch.sub(bias, scaled, out=out_view[:, 1])
    return t, rstd


def pair_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    chunks: int,
    saved: Saved,
    eps: float,
    mask: list[bool],
    grad_x: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """With ``D = dy0 - dy1``: ``S(dy * x_hat) = t * D`` and, as ``1 - t**2 = eps * rstd**2``,
    ``dx0 = -dx1 = D * eps * rstd**3 * weight / 2`` (no cancellation)."""
    t, rstd = saved
    view = ghost_view(grad_out, chunks)
    first, second = view[:, 0].to(t.dtype), view[:, 1].to(t.dtype)
    difference = first - second
    sum_dy = torch.add(first, second).sum(0)
    sum_dy_xhat = (t * difference).sum(0)
    if grad_x is not None:
        factor = rstd.square().mul_(0.5 * eps).mul_(rstd)
        if weight is not None:
            factor.mul_(weight)
        grad_view = ghost_view(grad_x, chunks)
        torch.mul(difference, factor, out=grad_view[:, 0])
        torch.neg(grad_view[:, 0], out=grad_view[:, 1])
    return sum_dy_xhat, sum_dy


def _grouped(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """``(chunks*g, C, ...)`` with ``L > 1`` values per channel and sample -> contiguous
    ``(chunks, C, g, L)``."""
    return ghost_view(x, chunks).transpose(1, 2).contiguous()


def grouped_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    chunks: int,
    eps: float,
    out: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
) -> Saved:
    """GroupNorm on ``(G, C, g, L)``; the unbiased variance is
    ``(rstd**-2 - eps) * n / (n - 1)``. Saves GroupNorm's mean and rstd."""
    grouped = _grouped(x, chunks)
    _, channels, size, length = grouped.shape
    y, save_mean, save_rstd = torch.native_group_norm(
        grouped, weight, bias, chunks, channels, size * length, channels, eps
    )
    ghost_view(out, chunks).copy_(y.transpose(1, 2))
    n = size * length
    mean.copy_(save_mean)
    var.copy_(save_rstd.double().pow(-2).sub_(eps).clamp_(min=0).mul_(n / (n - 1)))
    return save_mean, save_rstd


def grouped_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    chunks: int,
    saved: Saved,
    eps: float,
    mask: list[bool],
    grad_x: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    grouped = _grouped(x, chunks)
    _, channels, size, length = grouped.shape
    gx, gw, gb = torch.ops.aten.native_group_norm_backward(
        _grouped(grad_out, chunks),
        grouped,
        saved[0],
        saved[1],
        weight,
        chunks,
        channels,
        size * length,
        channels,
        [grad_x is not None, *mask[1:]],
    )
    if grad_x is not None:
        ghost_view(grad_x, chunks).copy_(gx.transpose(1, 2))
    return gw, gb


@functools.cache
def _saved_stat_dtype(
    device_type: str, dtype: torch.dtype, weight_dtype: torch.dtype | None
) -> torch.dtype:
    """Dtype of the mean / invstd that BatchNorm's kernel saves for backward (device-specific)."""
    x = torch.ones(2, 1, dtype=dtype, device=device_type)
    weight = None if weight_dtype is None else torch.ones(1, dtype=weight_dtype, device=device_type)
    return torch.native_batch_norm(x, weight, weight, None, None, True, 0.0, 1e-5)[1].dtype


def native_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    chunks: int,
    eps: float,
    out: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
) -> Saved:
    """BatchNorm's out= kernel on one ghost batch, straight into ``out``; with momentum 1
    its running-statistics update stores the mean and unbiased variance into the
    rows. Saves the kernel's mean and invstd."""
    assert chunks == 1
    # BatchNorm blends the rows with weight 0: zero them (0 * garbage may be NaN).
    mean.zero_()
    var.zero_()
    # Dynamo traces through a cache (and warns); the dtypes are constants to it anyway.
    dtype_of = _saved_stat_dtype.__wrapped__ if torch.compiler.is_compiling() else _saved_stat_dtype
    saved_dtype = dtype_of(x.device.type, x.dtype, None if weight is None else weight.dtype)
    save_mean, save_invstd = x.new_empty(0, dtype=saved_dtype), x.new_empty(0, dtype=saved_dtype)
    torch.ops.aten.native_batch_norm.out(
        x,
        weight,
        bias,
        mean.view(-1),
        var.view(-1),
        True,
        1.0,
        eps,
        out=out,
        save_mean=save_mean,
        save_invstd=save_invstd,
    )
    return save_mean, save_invstd


def native_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    chunks: int,
    saved: Saved,
    eps: float,
    mask: list[bool],
    grad_x: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
        grad_out,
        x,
        weight,
        None,
        None,
        saved[0],
        saved[1],
        True,
        eps,
        [grad_x is not None, *mask[1:]],
    )
    if grad_x is not None:
        grad_x.copy_(gx)
    return gw, gb


def is_channels_last(x: torch.Tensor) -> bool:
    """A dense input that is not contiguous is channels-last (``batchnorm._dense``)."""
    return not x.is_contiguous()


def fused_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    chunks: int,
    eps: float,
    out: torch.Tensor,
    running_weights: torch.Tensor | None,
) -> tuple[Saved, tuple[torch.Tensor, torch.Tensor] | None]:
    """The forward of ``cpu_kernels.cpp``: writes ``out``; returns what its backward
    needs (empty for ghost batches it recomputes the statistics of) and, given the
    running-average weight ``w_j`` of each ghost batch, ``(sum_j w_j mean_j,
    sum_j w_j var_j)`` in float64, with the unbiased variance."""
    save_mean, save_rstd, mean_update, var_update = (
        torch.ops.truebatch_cpu.ghost_batch_norm_forward(
            x, weight, bias, chunks, eps, is_channels_last(x), running_weights, out
        )
    )
    updates = None if running_weights is None else (mean_update, var_update)
    return (save_mean, save_rstd), updates


def fused_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    chunks: int,
    saved: Saved,
    eps: float,
    mask: list[bool],
    grad_x: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of ``cpu_kernels.cpp``: writes ``grad_x`` and returns the weight
    and bias gradients summed over the block's ghost batches (in the weight's dtype)."""
    return torch.ops.truebatch_cpu.ghost_batch_norm_backward(
        grad_out,
        x,
        weight,
        saved[0],
        saved[1],
        chunks,
        eps,
        is_channels_last(x),
        grad_x is not None,
        x.new_empty(0) if grad_x is None else grad_x,
    )


FORWARD = {
    "native": native_forward,
    "reduced": reduced_forward,
    "pair": pair_forward,
    "grouped": grouped_forward,
}
BACKWARD = {
    "native": native_backward,
    "reduced": reduced_backward,
    "pair": pair_backward,
    "grouped": grouped_backward,
    "fused": fused_backward,
}


def block_forward(
    way: str,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    chunks: int,
    eps: float,
    out: torch.Tensor,
    running_weights: torch.Tensor | None,
) -> tuple[Saved, tuple[torch.Tensor, torch.Tensor] | None]:
    """Normalizes a block of ``chunks`` ghost batches the way ``way`` into ``out``;
    returns what the way's backward needs and, given each ghost batch's running-average
    weight ``w_j``, the running statistics' updates ``(sum_j w_j mean_j, sum_j w_j var_j)``
    (unbiased variance)."""
    if way == "fused":
        return fused_forward(x, weight, bias, chunks, eps, out, running_weights)
    stat_dtype = weight.dtype if weight is not None else x.dtype
    mean = x.new_empty(chunks, x.shape[1], dtype=stat_dtype)
    var = torch.empty_like(mean)
    saved = FORWARD[way](x, weight, bias, chunks, eps, out, mean, var)
    if running_weights is None:
        return saved, None
    dtype = running_weights.dtype
    return saved, (running_weights @ mean.to(dtype), running_weights @ var.to(dtype))
