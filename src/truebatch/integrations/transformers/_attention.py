"""Split-invariant dropout on the attention probabilities of Transformers models.

Transformers applies attention dropout functionally, inside the attention
function (``F.dropout`` on the probabilities), where
:func:`truebatch.nn.convert_dropout` cannot reach it. The conversion registers
an attention implementation, ``"truebatch_eager"``, that runs the model's own
eager attention function and replaces its one ``F.dropout`` by a mask drawn
with the counter-based hash of :class:`truebatch.nn.SplitInvariantDropout`.

The keep decision for the probability of query ``i`` attending to key ``j`` in
head ``h`` of the sample with global index ``s`` (within the effective batch,
over all ranks) is a pure function of

    (seed, window, layer_id, row = (s * L + i) * H + h, column = j)

where ``L`` (``max_length``) is a fixed stride, so the mask of a position does
not depend on how far the batch it arrives in is padded: the full batch and
every split of it draw the same masks (right padding; left padding shifts the
positions and is refused).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from truebatch import _context
from truebatch.nn.masks import keep_mask

__all__ = ["IMPLEMENTATION", "convert_attention_dropout"]

IMPLEMENTATION = "truebatch_eager"
# Attention layers take ids from here on, apart from convert_dropout's 0, 1, 2, ...
_FIRST_LAYER_ID = 1 << 20


def convert_attention_dropout(
    model: nn.Module, *, seed: int = 0, max_length: int | None = None
) -> nn.Module:
    """Make a Transformers model's attention-probability dropout split-invariant, in place.

    Switches the model to the ``"truebatch_eager"`` attention implementation:
    each attention module runs its own modeling file's eager attention, whose
    dropout mask is drawn per (sample, head, query, key) by the counter-based
    hash described in the module docstring, keyed by the global sample index a
    :class:`truebatch.Accumulator` (or the truebatch ``Trainer``) provides.
    Eval mode and ``p = 0`` draw nothing. Combine with
    :func:`truebatch.nn.convert_dropout` for the hidden-state dropout.

    Args:
        model: a ``transformers.PreTrainedModel`` whose attention goes through
            Transformers' attention interface.
        seed: the masks' seed.
        max_length: the position stride ``L``, at least the longest sequence;
            default ``config.max_position_embeddings``. The mask costs
            ``O(heads × query length × L)`` per sample and layer.

    Returns:
        ``model``.

    Raises:
        ValueError: the model (or an attention module, named) cannot be
            converted, with the reason.

    Examples:
        >>> model = transformers.BertForSequenceClassification(config)
        >>> convert_attention_dropout(model)
        >>> tb.nn.convert_dropout(model)
    """
    import transformers
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    if not isinstance(model, transformers.PreTrainedModel):
        raise ValueError(
            f"`model` got {type(model).__name__}; expected a transformers.PreTrainedModel. "
            "Fix: convert the Transformers model inside your module."
        )
    stride = _stride(model, max_length)
    layers = [(name, m) for name, m in model.named_modules() if _is_attention(m)]
    if not layers:
        raise ValueError(
            f"`model` got {type(model).__name__} with no attention module that calls "
            "Transformers' attention interface; expected one. Fix: convert its attention "
            "dropout by hand or set its attention dropout to 0."
        )
    eager = {}
    for name, module in layers:
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if not callable(function):
            raise ValueError(
                f"`model` module {name!r} ({type(module).__name__}) has no eager attention "
                "function in its modeling file; expected eager_attention_forward. Fix: set its "
                "attention dropout to 0."
            )
        eager[name] = function
    transformers.AttentionInterface.register(IMPLEMENTATION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)
    model.set_attn_implementation(IMPLEMENTATION)
    if model.config._attn_implementation != IMPLEMENTATION:
        raise ValueError(
            f"`model` got {type(model).__name__}, which refused the attention implementation "
            f"{IMPLEMENTATION!r}; expected it to accept registered ones. Fix: set its "
            "attention dropout to 0."
        )
    for index, (name, module) in enumerate(layers):
        module.truebatch_attention = _Layer(
            eager[name], seed=seed, layer_id=_FIRST_LAYER_ID + index, stride=stride, name=name
        )
    return model


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The ``"truebatch_eager"`` attention function (see the module docstring)."""
    layer = getattr(module, "truebatch_attention", None)
    if layer is None:
        raise RuntimeError(
            f"`module` got {type(module).__name__} under attention implementation "
            f"{IMPLEMENTATION!r} without conversion; expected a converted model. Fix: call "
            "convert_attention_dropout(model) on the whole model."
        )
    if not dropout or not module.training:
        return layer.eager(module, query, key, value, attention_mask, *args, dropout=0.0, **kwargs)
    _refuse_left_padding(attention_mask, layer.name)
    with _MaskedDropout(layer, dropout) as masked:
        out = layer.eager(
            module, query, key, value, attention_mask, *args, dropout=dropout, **kwargs
        )
    if masked.calls != 1:
        raise RuntimeError(
            f"`model` module {layer.name!r} applied F.dropout {masked.calls} times in its eager "
            "attention; expected once, on the probabilities. Fix: set its attention dropout to 0."
        )
    return out


class _Layer:
    """What one converted attention module needs: its eager function and mask key."""

    def __init__(
        self, eager: Callable[..., Any], *, seed: int, layer_id: int, stride: int, name: str
    ) -> None:
        self.eager, self.seed, self.layer_id = eager, seed, layer_id
        self.stride, self.name = stride, name
        self.calls = 0  # train-mode calls outside an Accumulator: the window of plain dropout

    def keep(self, shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
        """Keep mask of shape ``(batch, heads, queries, keys)``."""
        batch, heads, queries, keys = shape
        if max(queries, keys) > self.stride:
            raise ValueError(
                f"`max_length` got {self.stride} for module {self.name!r}; expected at least the "
                f"sequence length {max(queries, keys)}. Fix: convert_attention_dropout(model, "
                "max_length=...)."
            )
        context = _context.current()
        if context is None:
            window, offset, self.calls = self.calls, 0, self.calls + 1
        else:
            window, offset = context.window, context.offset
        rows = [
            keep_mask(
                queries * heads,
                self.stride,
                p,
                seed=self.seed,
                window=window,
                layer_id=self.layer_id,
                offset=(offset + b) * self.stride * heads,
                device=device,
            )
            for b in range(batch)
        ]
        # rows (query, head) x columns (key) -> (head, query, key) per sample
        mask = torch.stack(rows).view(batch, queries, heads, self.stride)[..., :keys]
        return mask.transpose(1, 2)


class _MaskedDropout(TorchFunctionMode):
    """Inside one eager attention call: ``F.dropout`` applies the layer's keep mask."""

    def __init__(self, layer: _Layer, p: float) -> None:
        super().__init__()
        self.layer, self.p, self.calls = layer, p, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.dropout:
            return func(*args, **kwargs)
        self.calls += 1
        probabilities = args[0]
        if probabilities.dim() != 4:
            raise RuntimeError(
                f"`model` module {self.layer.name!r} applied dropout to a tensor of shape "
                f"{tuple(probabilities.shape)}; expected (batch, heads, queries, keys). Fix: set "
                "its attention dropout to 0."
            )
        keep = self.layer.keep(probabilities.shape, self.p, probabilities.device)
        return probabilities * keep.to(probabilities.dtype).mul_(1.0 / (1.0 - self.p))


def _refuse_left_padding(mask: torch.Tensor | None, name: str) -> None:
    """The mask is keyed by position from the start: a masked first key means left padding."""
    if mask is None or mask.dim() != 4:
        return
    blocked = ~mask if mask.dtype == torch.bool else mask <= torch.finfo(mask.dtype).min / 2
    first_blocked = blocked[..., 0].flatten(1).all(dim=1)
    if bool((first_blocked & ~blocked.flatten(1).all(dim=1)).any()):
        raise ValueError(
            f"`attention_mask` of module {name!r} got left padding; expected right padding "
            "(masks are keyed by position from the start of each sequence). Fix: "
            "tokenizer.padding_side = 'right' for training."
        )


def _stride(model: nn.Module, max_length: int | None) -> int:
    length = (
        max_length
        if max_length is not None
        else getattr(model.config, "max_position_embeddings", None)
    )
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(
            f"`max_length` got {length!r}; expected a positive int (the longest sequence). "
            "Fix: convert_attention_dropout(model, max_length=...)."
        )
    return length + length % 2  # an even stride: the hash draws elements in pairs


def _is_attention(module: nn.Module) -> bool:
    """A module whose forward asks Transformers' attention interface for its function."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    return code is not None and "get_interface" in code.co_names
