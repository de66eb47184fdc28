"""Dropout whose mask is a pure function of the sample (or token), not of the global RNG.

``nn.Dropout`` draws its mask from the global random stream, so a sample gets a
different mask depending on which micro-batch it lands in. Here the keep
decision of every element is a counter-based hash (:mod:`truebatch.nn.masks`) of

    (seed, window, layer_id, global sample index, element index within the sample)

or, with ``key="token"``, of (seed, window, layer_id, document id, position,
element index within the token), so the full batch and any split of it into
micro-batches (and, keyed by token, any packing of the documents into rows)
draw identical masks. No random state is read or advanced.

The micro-batch's window and offset come from the Accumulator's context. An
activation-checkpointing recomputation runs in backward, where that context is
gone: the layer then replays the window and offset of its latest forward
(``torch.utils.checkpoint`` recomputes a segment during the backward of the
forward that ran it, before any later forward), and refuses with
``RuntimeError`` when forwards with different masks ran since the last
recomputation, since it could not tell which one is recomputed.
"""

from __future__ import annotations

import itertools
import math
from contextvars import ContextVar
from typing import Any, Literal

import torch
from torch import nn

from truebatch import _context
from truebatch.nn.masks import (
    check_probability,
    keep_mask,
    sample_multiplier,
    sample_start,
    stream_key,
    token_keep,
    token_keep_mask,
)

__all__ = ["SplitInvariantDropout", "keep_mask", "token_keep_mask", "token_keys"]

# Layers constructed without a layer_id get the next number: distinct masks by
# default, in construction order. convert_dropout renumbers by module order.
_next_layer_id = itertools.count()

_Tokens = tuple[torch.Tensor, torch.Tensor]
# (window, offset, tokens): what selects a layer's mask for one call
_Stream = tuple[int, int, "_Tokens | None"]

_tokens: ContextVar[_Tokens | None] = ContextVar("truebatch_token_keys", default=None)


class token_keys:
    """Name the tokens of the code inside for ``SplitInvariantDropout(key="token")``.

    Token ``(b, t)`` of a ``(B, T, ...)`` input is named by
    ``(document_ids[b, t], positions[b, t])``: its mask is the same wherever the
    token sits, so packing the same documents into other rows, or splitting
    them across micro-batches, does not change it. Use inside ``loss_fn``, with
    the micro-batch's own fields (``position_ids`` of packed sequences restart
    at 0 per document, which is what ``positions`` means).

    Args:
        document_ids: integer tensor ``(B, T)``; a document's id must be unique
            within the window (e.g. its index in the dataset).
        positions: integer tensor ``(B, T)``, the token's position in its document.

    Raises:
        ValueError: the shapes differ or a tensor is not integer.

    Example::

        >>> def loss_fn(model, batch):
        ...     with truebatch.nn.token_keys(batch["document_ids"], batch["position_ids"]):
        ...         return model(batch["input_ids"]).sum()
    """

    __slots__ = ("token", "tokens")

    def __init__(self, document_ids: torch.Tensor, positions: torch.Tensor) -> None:
        for name, value in (("document_ids", document_ids), ("positions", positions)):
            if not isinstance(value, torch.Tensor) or value.is_floating_point():
                raise ValueError(
                    f"`{name}` got {type(value).__name__} "
                    f"{getattr(value, 'dtype', '')}; expected an integer tensor. Fix: pass "
                    "the batch's ids as a torch.long tensor."
                )
        if document_ids.shape != positions.shape:
            raise ValueError(
                f"`positions` got shape {tuple(positions.shape)}; expected the shape of "
                f"document_ids, {tuple(document_ids.shape)}. Fix: pass one position per token."
            )
        self.tokens: _Tokens = (document_ids, positions)

    def __enter__(self) -> token_keys:
        self.token = _tokens.set(self.tokens)
        return self

    def __exit__(self, *_: object) -> None:
        _tokens.reset(self.token)


def _same(a: _Stream, b: _Stream) -> bool:
    tokens_a, tokens_b = a[2], b[2]
    same_tokens = tokens_a is tokens_b or (
        tokens_a is not None
        and tokens_b is not None
        and all(x is y for x, y in zip(tokens_a, tokens_b, strict=True))
    )
    return a[:2] == b[:2] and same_tokens


# torch.compiler.disable, applied at the first call: decorating with it imports
# torch._dynamo (seconds per process, as much as torch itself), and this runs only
# under torch.compile, which has imported it.
@torch._disable_dynamo
def _resolve_outside_graph(
    layer: SplitInvariantDropout, device: torch.device
) -> tuple[torch.Tensor, _Tokens | None]:
    """``layer.resolve()`` run eagerly, the start as a tensor (see ``masks.start_tensor``):
    reading the context and the layer's counters is a graph break, the hash is not."""
    start, tokens = layer.resolve()
    return torch.tensor(start, dtype=torch.int64, device=device), tokens


class SplitInvariantDropout(nn.Module):
    """Dropout whose mask does not depend on how the batch is split.

    In train mode, element ``e`` of sample ``i`` of the input is kept with
    probability ``1 - p`` and scaled by ``1 / (1 - p)``, or zeroed. The decision
    is a pure function of ``(seed, window, layer_id, s = offset + i, e)``: with
    ``K`` a splitmix64 hash of ``(seed, window, layer_id)`` and ``R`` one of
    ``s``, the 64-bit word
    ``splitmix64_finalizer((R + e // 2) * 0x9E3779B97F4A7C15 + K)``
    supplies two 32-bit halves, one per element of the pair, and an element is
    kept iff its half (as a signed int32) is below ``round((1 - p) * 2**32) - 2**31``
    (:func:`keep_mask`). As ``R`` does not depend on the number of elements, a
    ``(B, T, D)`` input padded to another length ``T`` keeps the mask of every
    real token: micro-batches padded to their own longest sequence draw the
    big batch's masks. It is computed with int64 tensor ops on the input's
    device; the global RNG is neither read nor advanced. Under ``torch.compile``
    the layer reads the micro-batch context outside the graph (one graph break)
    and hashes inside it: compiled and eager masks are identical, and a new
    offset or window does not recompile.

    - Inside a :class:`truebatch.Accumulator`, ``window`` is the index of the
      window (optimizer step) and ``offset`` the global index of the micro-batch's
      first sample in the effective batch (``truebatch._context.current()``): the
      full batch and every split of it draw the same masks, each window new ones.
    - Outside an Accumulator, ``offset = 0`` and ``window`` is the number of
      earlier train-mode calls of this layer made outside an Accumulator
      (0, 1, 2, ...; a counter that is not part of the ``state_dict``): ordinary
      dropout, a new mask on every call, reproducible from ``seed`` and
      ``layer_id`` for a freshly built layer.
    - Under activation checkpointing (``torch.utils.checkpoint``, both reentrant
      modes), the recomputation in backward replays the window and offset of the
      layer's latest forward, so it draws the forward's mask (module docstring).

    Dim 0 of the input must be the sample dim. ``channelwise=False`` keys the
    mask by the flat (row-major) index of the element within its sample, like
    ``nn.Dropout``; ``channelwise=True`` keys it by the channel (dim 1) and drops
    whole channels, like ``nn.Dropout1d/2d/3d`` on batched ``(N, C, ...)`` input.
    ``key="token"`` keys the mask of a ``(B, T, ...)`` input by token instead:
    token ``(b, t)`` is the ``(document id, position)`` that :class:`token_keys`
    names around the call (:func:`token_keep_mask`), and the offset is not used,
    so the mask survives re-packing documents into rows.

    ``layer_id`` separates the masks of different layers. By default each new
    layer takes the next number of a process-wide counter (a program that builds
    its layers in the same order gets the same ids in every process), and
    :func:`truebatch.nn.convert_dropout` renumbers a model's layers 0, 1, 2, ...
    in module order. As the mask is a pure function, a layer called twice on the
    same samples under the same context reuses its mask (use two layers for two
    masks).

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
        *,
        key: Literal["sample", "token"] = "sample",
    ) -> None:
        super().__init__()
        if key not in ("sample", "token") or (key == "token" and channelwise):
            raise ValueError(
                f"`key` got {key!r} with channelwise={channelwise}; expected 'sample', or "
                "'token' with channelwise=False. Fix: pass key='sample' or key='token'."
            )
        self.p = check_probability(p)
        self.seed = int(seed)
        self.layer_id = next(_next_layer_id) if layer_id is None else int(layer_id)
        self.channelwise = bool(channelwise)
        self.key = key
        self._calls = 0
        # The stream of the latest forward, for a checkpoint's recomputation.
        self._recorded: _Stream | None = None
        self._ambiguous = False
        self._recomputed = False

    def extra_repr(self) -> str:
        token = ", key='token'" if self.key == "token" else ""
        return (
            f"p={self.p}, seed={self.seed}, layer_id={self.layer_id}, "
            f"channelwise={self.channelwise}{token}"
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        self._check_input(input)
        if self.p == 1.0:
            return input * 0.0
        by_token = self.key == "token"
        shape = input.shape[:2] if self.channelwise or by_token else input.shape
        elements = math.prod(input.shape[2:]) if by_token else math.prod(shape[1:])
        start: int | tuple[int, int] | torch.Tensor
        if torch.compiler.is_compiling():
            start, tokens = _resolve_outside_graph(self, input.device)
        else:
            start, tokens = self.resolve()
        if by_token:
            assert tokens is not None
            self._check_tokens(input, tokens)
            ids, positions = (t.to(input.device) for t in tokens)
            keep = token_keep(ids, positions, elements, self.p, start).view(input.shape)
            return input * keep.to(input.dtype).mul_(1.0 / (1.0 - self.p))
        multiplier = sample_multiplier(
            input.shape[0], elements, self.p, start, input.device, input.dtype
        )
        return input * multiplier.reshape(*shape, *[1] * (input.dim() - len(shape)))

    def resolve(self) -> tuple[int | tuple[int, int], _Tokens | None]:
        """This call's hash start (the key itself when keyed by token) and tokens.

        Reads the micro-batch context; outside one, a recomputation in backward
        replays the latest forward, and a plain call takes the next window.
        """
        context = _context.current()
        if context is not None:
            stream: _Stream = (context.window, context.offset, _tokens.get())
            self._record(stream)
        elif torch._C._current_graph_task_id() != -1:
            stream = self._replay()
        else:
            stream = (self._calls, 0, _tokens.get())
            self._calls += 1
            self._record(stream)
        window, offset, tokens = stream
        key = stream_key(self.seed, window, self.layer_id)
        if self.key == "token":
            if tokens is None:
                raise RuntimeError(
                    "`SplitInvariantDropout(key='token')` got no token ids; expected a call "
                    "inside truebatch.nn.token_keys(document_ids, positions). Fix: wrap the "
                    "model call in loss_fn with it."
                )
            return key, tokens
        return sample_start(offset, key), None

    def _record(self, stream: _Stream) -> None:
        if self._recomputed:
            self._recorded, self._ambiguous, self._recomputed = None, False, False
        if not self._ambiguous and self._recorded is not None and not _same(self._recorded, stream):
            self._ambiguous = True  # (set once: a Module attribute write is slow)
        self._recorded = stream

    def _replay(self) -> _Stream:
        # Activation checkpointing re-runs the forward inside backward, where the
        # micro-batch context is gone (and on GPU, on another thread).
        if self._recorded is None or self._ambiguous:
            reason = "no forward" if self._recorded is None else "forwards with different masks"
            raise RuntimeError(
                f"`SplitInvariantDropout` got a recomputation in backward after {reason} "
                "since the last recomputation; expected one forward per backward, whose mask "
                "the recomputation replays. Fix: run each forward's backward before the next "
                "forward (as truebatch.Accumulator does), or keep this layer out of "
                "checkpointed segments."
            )
        self._recomputed = True
        return self._recorded

    def _check_tokens(self, input: torch.Tensor, tokens: _Tokens) -> None:
        if input.dim() < 2 or tuple(input.shape[:2]) != tuple(tokens[0].shape):
            raise ValueError(
                f"`input` got shape {tuple(input.shape)}; expected (B, T, ...) with (B, T) = "
                f"{tuple(tokens[0].shape)}, the shape of token_keys' ids. Fix: name the tokens "
                "of this input in token_keys."
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A pickle without these attributes loads as a sample-keyed layer, nothing recorded.
        state.setdefault("key", "sample")
        state.setdefault("_recorded", None)
        state.setdefault("_ambiguous", False)
        state.setdefault("_recomputed", False)
        super().__setstate__(state)
