"""Dropout whose mask is a pure function of the sample, not of the global RNG.

``nn.Dropout`` draws its mask from the global random stream, so a sample gets a
different mask depending on which micro-batch it lands in. Here the keep
decision of every element is a counter-based hash of

    (seed, window, layer_id, global sample index, element index within the sample)

so the full batch and any split of it into micro-batches draw identical masks.
The hash is a few rounds of the splitmix64 finalizer computed with int64 tensor
ops on the input's device; no random state is read or advanced.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from numbers import Real

import torch
from torch import nn

from truebatch import _context

__all__ = ["SplitInvariantDropout", "keep_mask"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: odd, so counter * _GOLDEN is a bijection
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB

# Layers constructed without a layer_id get the next number: distinct masks by
# default, in construction order. convert_dropout renumbers by module order.
_next_layer_id = itertools.count()


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as ``value`` (torch has no uint64 arithmetic)."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def _mix64(value: int) -> int:
    """splitmix64 finalizer on a Python int, modulo 2**64."""
    value &= _MASK64
    value = ((value ^ (value >> 30)) * _MIX1) & _MASK64
    value = ((value ^ (value >> 27)) * _MIX2) & _MASK64
    return value ^ (value >> 31)


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer, in place on an int64 tensor.

    torch int64 multiplication wraps modulo 2**64 like uint64 does, but ``>>``
    is arithmetic (copies the sign bit), so each shift is masked to be logical.
    """
    for shift, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        z.bitwise_xor_((z >> shift).bitwise_and_((1 << (64 - shift)) - 1))
        if multiplier is not None:
            z.mul_(_signed(multiplier))
    return z


def _stream_key(seed: int, window: int, layer_id: int) -> int:
    """64-bit key of one (seed, window, layer): distinct inputs give unrelated keys."""
    key = _GOLDEN
    for value in (seed, window, layer_id):
        key = _mix64(key ^ (value & _MASK64))
    return key


def _stream_start(offset: int, pairs: int, seed: int, window: int, layer_id: int) -> int:
    """``offset * pairs * GOLDEN + K`` as an int64: hash input of the first pair of ``offset``."""
    return _signed(offset * pairs * _GOLDEN + _stream_key(seed, window, layer_id))


@torch.compiler.disable
def _stream_start_tensor(
    offset: int, pairs: int, seed: int, window: int, layer_id: int, device: torch.device | None
) -> torch.Tensor:
    """:func:`_stream_start` as a 0-d tensor, computed outside any compiled graph.

    Under ``torch.compile`` the offset and the window may be symbolic; the
    64-bit Python arithmetic of the key must then run eagerly on their values
    (it cannot be traced), and the graph receives the result as a tensor input,
    so a new offset or window neither recompiles nor specializes the graph.
    """
    start = _stream_start(offset, pairs, seed, window, layer_id)
    return torch.tensor(start, dtype=torch.int64, device=device)


def _hashed_keep(
    samples: int,
    pairs: int,
    start: int | torch.Tensor,
    keep_count: int,
    device: torch.device | str | None,
) -> torch.Tensor:
    """``(samples, 2 * pairs)`` keep decisions of the counters ``start + j * GOLDEN``."""
    z = torch.arange(samples * pairs, dtype=torch.int64, device=device)
    _mix64_(z.mul_(_signed(_GOLDEN)).add_(start))
    return (z.view(torch.int32) < keep_count - 2**31).view(samples, 2 * pairs)


def keep_mask(
    samples: int,
    elements: int,
    p: float,
    *,
    seed: int,
    window: int,
    layer_id: int,
    offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean keep mask of shape ``(samples, elements)``; True with probability ``1 - p``.

    Row ``i`` belongs to the sample with global index ``s = offset + i``. With
    ``K = splitmix64 key of (seed, window, layer_id)`` and ``P = ceil(elements / 2)``,
    one 64-bit word is hashed per pair of elements::

        h = splitmix64_finalizer((s * P + e // 2) * 0x9E3779B97F4A7C15 + K)   (mod 2**64)

    element ``e`` reads the 32-bit half ``e % 2`` of ``h`` (low half first), as a
    signed int32 ``u``, and is kept iff ``u < round((1 - p) * 2**32) - 2**31``.
    Every factor is exact integer arithmetic, so the mask depends only on these
    inputs: not on the device, the global RNG, or how samples are batched. It is
    the mask of :class:`SplitInvariantDropout` on a ``(samples, elements)`` input.

    Works under ``torch.compile``: the key is computed outside the graph and
    enters it as a tensor (a graph break, no recompilation per offset).

    Args:
        samples: number of rows (samples of this micro-batch).
        elements: keep decisions per sample.
        p: drop probability in [0, 1].
        seed, window, layer_id: select the stream (any Python ints; reduced mod 2**64).
        offset: global index of the first row's sample in the effective batch.
        device: where the mask is built.

    Returns:
        A bool tensor ``(samples, elements)``.

    Raises:
        ValueError: ``p`` is not in [0, 1].

    Example::

        >>> keep_mask(4, 10, 0.5, seed=0, window=0, layer_id=0).shape
        torch.Size([4, 10])
    """
    p = check_probability(p)
    if torch.compiler.is_compiling():
        target = None if device is None else torch.device(device)
        return _keep(
            samples,
            elements,
            p,
            lambda pairs: _stream_start_tensor(offset, pairs, seed, window, layer_id, target),
            device,
        )
    return _keep(
        samples,
        elements,
        p,
        lambda pairs: _stream_start(offset, pairs, seed, window, layer_id),
        device,
    )


def _keep(
    samples: int,
    elements: int,
    p: float,
    start: Callable[[int], int | torch.Tensor],
    device: torch.device | str | None,
) -> torch.Tensor:
    """The mask of :func:`keep_mask`, given ``start(pairs)``, the first counter's hash input."""
    pairs = (elements + 1) // 2
    keep_count = round((1.0 - p) * 2**32)  # out of 2**32 equally likely halves
    if keep_count >= 2**32 or samples * pairs == 0:
        return torch.ones(samples, elements, dtype=torch.bool, device=device)
    keep = _hashed_keep(samples, pairs, start(pairs), keep_count, device)
    return keep if 2 * pairs == elements else keep[:, :elements]


def check_probability(p: object) -> float:
    """Return ``p`` as a float if it is a probability in [0, 1], else raise with the fix."""
    if isinstance(p, bool) or not isinstance(p, Real):
        raise TypeError(
            f"`p` got {type(p).__name__} {p!r}; expected a number. Fix: pass the drop "
            "probability, e.g. p=0.1."
        )
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(
            f"`p` got {p}; expected a probability in [0, 1]. Fix: pass the probability of "
            "dropping an element, e.g. p=0.1."
        )
    return float(p)


@torch.compiler.disable
def _layer_start_tensor(
    layer: SplitInvariantDropout, pairs: int, *, device: torch.device
) -> torch.Tensor:
    """``layer._start(pairs)`` run eagerly, as a tensor (see :func:`_stream_start_tensor`)."""
    return torch.tensor(layer._start(pairs), dtype=torch.int64, device=device)


class SplitInvariantDropout(nn.Module):
    """Dropout whose mask does not depend on how the batch is split.

    In train mode, element ``e`` of sample ``i`` of the input is kept with
    probability ``1 - p`` and scaled by ``1 / (1 - p)``, or zeroed. The decision
    is a pure function of ``(seed, window, layer_id, s = offset + i, e)``: with
    ``K`` a splitmix64 hash of ``(seed, window, layer_id)`` and ``P`` the number
    of element pairs per sample, the 64-bit word
    ``splitmix64_finalizer((s * P + e // 2) * 0x9E3779B97F4A7C15 + K)``
    supplies two 32-bit halves, one per element of the pair, and an element is
    kept iff its half (as a signed int32) is below ``round((1 - p) * 2**32) - 2**31``.
    It is computed with int64 tensor ops on the input's device; the global RNG
    is neither read nor advanced. Under ``torch.compile`` the layer reads the
    micro-batch context outside the graph (one graph break) and hashes inside it:
    compiled and eager masks are identical, and a new offset or window does not
    recompile. :func:`keep_mask` is the same mask as a function.

    - Inside a :class:`truebatch.Accumulator`, ``window`` is the index of the
      window (optimizer step) and ``offset`` the global index of the micro-batch's
      first sample in the effective batch (``truebatch._context.current()``): the
      full batch and every split of it draw the same masks, each window new ones.
    - Outside an Accumulator, ``offset = 0`` and ``window`` is the number of
      earlier train-mode calls of this layer made outside an Accumulator
      (0, 1, 2, ...; a counter that is not part of the ``state_dict``): ordinary
      dropout, a new mask on every call, reproducible from ``seed`` and
      ``layer_id`` for a freshly built layer.

    Dim 0 of the input must be the sample dim. ``channelwise=False`` keys the
    mask by the flat (row-major) index of the element within its sample, like
    ``nn.Dropout``; ``channelwise=True`` keys it by the channel (dim 1) and drops
    whole channels, like ``nn.Dropout1d/2d/3d`` on batched ``(N, C, ...)`` input.

    ``layer_id`` separates the masks of different layers. By default each new
    layer takes the next number of a process-wide counter (a program that builds
    its layers in the same order gets the same ids in every process), and
    :func:`truebatch.nn.convert_dropout` renumbers a model's layers 0, 1, 2, ...
    in module order. As the mask is a pure function, a layer called twice on the
    same samples under the same context reuses its mask (use two layers for two
    masks). Activation checkpointing must not recompute this layer: the
    recomputation runs in backward, outside the micro-batch context, and raises
    ``RuntimeError`` rather than draw another mask.

    Eval mode and ``p=0`` are the identity (the input is returned); ``p=1`` zeroes
    everything; ``p`` outside [0, 1] is a ``ValueError``.

    Example::

        >>> drop = truebatch.nn.SplitInvariantDropout(p=0.1, seed=0)
        >>> y = drop(torch.randn(8, 16))                  # new mask on every call
        >>> with truebatch._context.micro_batch(window=3, offset=8):
        ...     y = drop(torch.randn(4, 16))              # samples 8..11 of window 3
    """

    def __init__(
        self,
        p: float = 0.5,
        seed: int = 0,
        layer_id: int | None = None,
        channelwise: bool = False,
    ) -> None:
        super().__init__()
        self.p = check_probability(p)
        self.seed = int(seed)
        self.layer_id = next(_next_layer_id) if layer_id is None else int(layer_id)
        self.channelwise = bool(channelwise)
        self._calls = 0

    def extra_repr(self) -> str:
        return (
            f"p={self.p}, seed={self.seed}, layer_id={self.layer_id}, "
            f"channelwise={self.channelwise}"
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        self._check_input(input)
        if self.p == 1.0:
            return input * 0.0
        shape = input.shape[:2] if self.channelwise else input.shape
        if torch.compiler.is_compiling():
            start = functools.partial(_layer_start_tensor, self, device=input.device)
        else:
            start = self._start
        keep = _keep(input.shape[0], math.prod(shape[1:]), self.p, start, input.device)
        keep = keep.reshape(*shape, *[1] * (input.dim() - len(shape)))
        return input * keep.to(input.dtype).mul_(1.0 / (1.0 - self.p))

    def _start(self, pairs: int) -> int:
        """Hash input of this call's first counter: reads the micro-batch context."""
        context = _context.current()
        if context is None:
            self._refuse_recomputation()
            window, offset, self._calls = self._calls, 0, self._calls + 1
        else:
            window, offset = context.window, context.offset
        return _stream_start(offset, pairs, self.seed, window, self.layer_id)

    def _refuse_recomputation(self) -> None:
        # Activation checkpointing re-runs the forward inside backward, where the
        # micro-batch context is gone (and on GPU, on another thread): the mask
        # would come from another window and silently corrupt the gradients.
        if torch._C._current_graph_task_id() != -1:
            raise RuntimeError(
                "SplitInvariantDropout ran inside a backward pass (activation checkpointing "
                "recomputes the forward there) without a micro-batch context, so it would draw "
                "a different mask than in the forward and give wrong gradients — expected it "
                "to run only in the forward — keep it out of checkpointed segments "
                "(checkpoint the layers before and after it instead)"
            )

    def _check_input(self, input: torch.Tensor) -> None:
        needed = 2 if self.channelwise else 1
        if input.dim() < needed:
            layout = "(N, C, ...)" if self.channelwise else "(N, ...)"
            raise ValueError(
                f"`input` got shape {tuple(input.shape)}; expected {layout} with the samples "
                f"along dim 0 (SplitInvariantDropout(channelwise={self.channelwise})). "
                "Fix: add the batch dim, e.g. input.unsqueeze(0)."
            )
