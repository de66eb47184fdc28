"""Swap a model's BatchNorm and dropout layers for split-invariant ones, or freeze BatchNorm.

Every function here changes the model in place and returns it; when the model
itself is the layer being swapped, the returned module is the new one, so
always use the return value: ``model = convert_batchnorm(model, 32)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from truebatch.nn.batchnorm import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    GhostBatchNormBase,
    check_ghost_batch_size,
)
from truebatch.nn.dropout import SplitInvariantDropout

__all__ = [
    "convert_batchnorm",
    "convert_dropout",
    "freeze_batchnorm",
    "unfreeze_batchnorm",
]

_GHOST_OF: dict[type[nn.Module], type[GhostBatchNormBase]] = {
    nn.BatchNorm1d: GhostBatchNorm1d,
    nn.BatchNorm2d: GhostBatchNorm2d,
    nn.BatchNorm3d: GhostBatchNorm3d,
}
# BatchNorm layers in the sense of freeze_batchnorm: torch's and the ghost ones.
_BATCHNORMS = (_BatchNorm, GhostBatchNormBase)
_CHANNELWISE_OF: dict[type[nn.Module], bool] = {
    nn.Dropout: False,
    nn.Dropout1d: True,
    nn.Dropout2d: True,
    nn.Dropout3d: True,
}


def _swap_modules(
    model: nn.Module, replacement: Callable[[str, nn.Module], nn.Module | None]
) -> nn.Module:
    """Replace, in place, every module for which ``replacement(path, module)`` gives one.

    A module shared by several parents is replaced by one shared new module.
    Returns the new root when the root itself is replaced.
    """
    new_of: dict[int, nn.Module] = {}

    def swap(path: str, module: nn.Module) -> nn.Module:
        if id(module) not in new_of:
            new = replacement(path, module)
            new_of[id(module)] = module if new is None else new
        return new_of[id(module)]

    for parent_path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            new = swap(f"{parent_path}.{name}" if parent_path else name, child)
            if new is not child:
                setattr(parent, name, new)
    return swap("", model)


def _where(path: str) -> str:
    return f"module '{path}'" if path else "the model itself"


def convert_batchnorm(model: nn.Module, ghost_batch_size: int) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``model`` by the matching ``GhostBatchNorm``.

    The new layer normalizes each chunk of ``ghost_batch_size`` samples with its
    own statistics (see :class:`GhostBatchNorm2d`), which makes the model's
    output, gradients and running statistics the same for the full batch and
    for any micro-batch size that is a multiple of ``ghost_batch_size``.

    The new layer takes over the old one's parameter and buffer *objects*
    (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``: an optimizer built before the conversion keeps
    working), its ``eps``, ``momentum``, ``affine``, ``track_running_stats``, its
    train/eval flag and its :func:`freeze_batchnorm` state; device and dtype
    follow. Other hooks registered on the old layer are not carried over.
    Existing ghost layers are left as they are.

    Ghost layers are not ``_BatchNorm`` instances, so a later
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` leaves them alone (ghost batches
    need no statistics from other ranks) and converts only the BatchNorm layers
    still there.

    Raises ``TypeError`` for ``nn.SyncBatchNorm`` (its input rank is unknown;
    convert before ``nn.SyncBatchNorm.convert_sync_batchnorm`` instead), for lazy
    BatchNorm that has not run yet, and for other BatchNorm subclasses, whose
    extra behaviour a swap would silently drop.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = truebatch.nn.convert_batchnorm(model, ghost_batch_size=32)
        >>> type(model[1]).__name__
        'GhostBatchNorm2d'
    """
    check_ghost_batch_size(ghost_batch_size)

    def ghost(path: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, _BatchNorm):
            return None
        if type(module) not in _GHOST_OF:
            raise TypeError(
                f"`model` got {_where(path)} of type {type(module).__name__}; expected "
                "nn.BatchNorm1d, nn.BatchNorm2d or nn.BatchNorm3d, which have a ghost version "
                f"(convert_batchnorm). Fix: {_conversion_hint(module)}."
            )
        return _ghost_from(module, ghost_batch_size)

    return _swap_modules(model, ghost)


def _conversion_hint(module: nn.Module) -> str:
    if isinstance(module, nn.SyncBatchNorm):
        return (
            "call convert_batchnorm on the model before nn.SyncBatchNorm."
            "convert_sync_batchnorm (ghost batches need no cross-rank statistics)"
        )
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return "run one forward pass first, so that the lazy layer becomes a plain BatchNorm"
    return "replace it by a plain BatchNorm or by a GhostBatchNorm yourself"


def _ghost_from(old: _BatchNorm, ghost_batch_size: int) -> GhostBatchNormBase:
    new = _GHOST_OF[type(old)](
        old.num_features,
        ghost_batch_size,
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        device="meta",
    )
    for name in ("weight", "bias"):
        new.register_parameter(name, getattr(old, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(name, getattr(old, name))
    new.train(old.training)
    if _is_frozen(old):
        _freeze(new)
    return new


def convert_dropout(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace every ``nn.Dropout`` / ``Dropout1d/2d/3d`` by a :class:`SplitInvariantDropout`.

    ``nn.Dropout`` becomes element-wise, ``Dropout1d/2d/3d`` channel-wise
    (whole channels, keyed by (sample, channel)), each with the old ``p`` and
    train/eval flag (``inplace`` is dropped: the new layer returns a new tensor).

    Every split-invariant dropout of the model — new and already present — gets
    ``seed`` and ``layer_id`` = its position (0, 1, 2, ...) among them in
    ``model.modules()`` order, so the masks depend only on ``seed`` and the
    model's structure, and no two layers share a mask.

    Raises ``TypeError`` for ``nn.AlphaDropout`` / ``nn.FeatureAlphaDropout``
    and other dropout subclasses, which have no split-invariant version.
    Dropout called functionally (``F.dropout``, attention dropout inside
    ``nn.MultiheadAttention``) is not a module and is not converted. Hugging
    Face attention modules hold an ``nn.Dropout`` but only read its ``p`` for a
    functional dropout: a swapped layer that does not run during the first
    train-mode forward of its parent makes that forward warn (``UserWarning``,
    once per layer) with the fix; after that first forward the watch is gone.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
        >>> model = truebatch.nn.convert_dropout(model, seed=0)
        >>> model[1]
        SplitInvariantDropout(p=0.1, seed=0, layer_id=0, channelwise=False)
    """
    dropouts = [
        m
        for m in model.modules()
        if isinstance(m, SplitInvariantDropout | nn.modules.dropout._DropoutNd)
    ]
    layer_ids = {id(m): i for i, m in enumerate(dropouts)}

    def split_invariant(path: str, module: nn.Module) -> nn.Module | None:
        if id(module) not in layer_ids:
            return None
        if isinstance(module, SplitInvariantDropout):
            module.seed, module.layer_id = int(seed), layer_ids[id(module)]
            return None
        if type(module) not in _CHANNELWISE_OF:
            raise TypeError(
                f"`model` got {_where(path)} of type {type(module).__name__}; expected "
                "nn.Dropout, nn.Dropout1d, nn.Dropout2d or nn.Dropout3d, which have a "
                "split-invariant version (convert_dropout). Fix: replace it by one of these or "
                "remove it."
            )
        new = SplitInvariantDropout(
            module.p,  # type: ignore[arg-type]
            seed=seed,
            layer_id=layer_ids[id(module)],
            channelwise=_CHANNELWISE_OF[type(module)],
        )
        return new.train(module.training)

    swapped = {id(m) for m in dropouts if not isinstance(m, SplitInvariantDropout)}
    parents = [
        (path, parent, name)
        for path, parent in model.named_modules()
        for name, child in parent.named_children()
        if id(child) in swapped
    ]
    model = _swap_modules(model, split_invariant)
    for path, parent, name in parents:
        _UnusedDropoutWatch(path, name).attach(parent)
    return model


class _UnusedDropoutWatch:
    """Warns once if a swapped dropout does not run during its parent's first train forward.

    A forward pre-hook on the dropout notes that it ran; a forward hook on the
    parent judges after the parent's forward, then removes both hooks. Hooks
    are this object's bound methods, so ``copy.deepcopy`` and pickling of the
    model carry a watch that refers to the copied modules.
    """

    def __init__(self, parent_path: str, name: str) -> None:
        self.parent_path, self.name, self.ran = parent_path, name, False
        self.keys: tuple[int, int] = (-1, -1)

    def attach(self, parent: nn.Module) -> None:
        child = parent.get_submodule(self.name)
        self.keys = (
            child.register_forward_pre_hook(self.child_ran).id,
            parent.register_forward_hook(self.parent_done).id,
        )

    def child_ran(self, _child: nn.Module, _args: object) -> None:
        self.ran = True

    def parent_done(self, parent: nn.Module, _args: object, _output: object) -> None:
        child = parent._modules.get(self.name)
        if not parent.training or child is None:
            return
        child._forward_pre_hooks.pop(self.keys[0], None)
        parent._forward_hooks.pop(self.keys[1], None)
        # truebatch.integrations.transformers.convert_attention_dropout marks attention
        # modules whose functional dropout it made split-invariant.
        handled = hasattr(parent, "truebatch_attention")
        if self.ran or handled or not child.training or getattr(child, "p", 0.0) == 0.0:
            return
        path = f"{self.parent_path}.{self.name}" if self.parent_path else self.name
        warnings.warn(
            f"`model` got module '{path}', a converted dropout that did not run during a "
            f"train-mode forward of {_where(self.parent_path)}; expected it to run. If the "
            "parent applies dropout functionally with its p (F.dropout or "
            "scaled_dot_product_attention(dropout_p=...), as Hugging Face attention does), that "
            "dropout is not split-invariant. Fix: set that probability to 0 (e.g. "
            "config.attention_probs_dropout_prob=0.0), or call truebatch.integrations."
            "transformers.convert_attention_dropout(model).",
            UserWarning,
            stacklevel=2,
        )


def _use_running_statistics(module: nn.Module, _args: object) -> None:
    """Forward pre-hook of a frozen BatchNorm: always run it in eval mode."""
    module.training = False


def _is_frozen(module: nn.Module) -> bool:
    return any(hook is _use_running_statistics for hook in module._forward_pre_hooks.values())


def _freeze(module: nn.Module) -> None:
    if not _is_frozen(module):
        module.register_forward_pre_hook(_use_running_statistics)
    module.training = False


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Make every BatchNorm of ``model`` (ghost ones too) use and keep its running statistics.

    A frozen BatchNorm normalizes with ``running_mean`` / ``running_var`` and
    never updates them, even after ``model.train()`` — the usual setting for
    fine-tuning with small batches. It then treats every sample on its own, so
    it is split-invariant. ``weight`` and ``bias`` still train; call
    ``requires_grad_(False)`` on them to freeze those too.

    Mechanism: each BatchNorm is put in eval mode and gets a forward pre-hook
    that puts it back in eval mode before every call; it survives ``deepcopy``,
    pickling and :func:`convert_batchnorm`. Undo with :func:`unfreeze_batchnorm`.

    Raises ``ValueError`` if a BatchNorm has no running statistics
    (``track_running_stats=False``), since there is nothing to freeze to.

    Example::

        >>> model = truebatch.nn.freeze_batchnorm(model)
        >>> model.train()  # BatchNorm layers stay in eval statistics
    """
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, _BATCHNORMS)]
    for path, layer in layers:
        if layer.running_mean is None or layer.running_var is None:
            raise ValueError(
                f"`model` got {_where(path)} ({type(layer).__name__}) without running "
                "statistics (track_running_stats=False); expected every BatchNorm to track them "
                "(freeze_batchnorm). Fix: construct it with track_running_stats=True, or use "
                "GroupNorm."
            )
    for _, layer in layers:
        _freeze(layer)
    return model


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_batchnorm`: BatchNorm follows ``model.train()`` / ``eval()`` again.

    Each BatchNorm loses the pre-hook and takes the train/eval flag of ``model``.

    Example::

        >>> model = truebatch.nn.unfreeze_batchnorm(model)
    """
    for layer in model.modules():
        if isinstance(layer, _BATCHNORMS):
            hooks = layer._forward_pre_hooks
            for key in [k for k, hook in hooks.items() if hook is _use_running_statistics]:
                del hooks[key]
            layer.training = model.training
    return model
