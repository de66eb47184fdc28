"""The gradients of a window: which parameters hold them, their sums, their norm.

The parameters a window touches are read from the optimizer every window
(``optimizer.param_groups``), so parameters added after the Accumulator was
built (``add_param_group``, a new adapter) are normalized, clipped, stepped
and cleared like the others. The gradient norm, the clip and the non-finite
check cover exactly the parameters the optimizer updates (which is also what
``GradScaler.unscale_`` unscales). A trainable parameter of the model that the
optimizer does not hold still receives a gradient from backward; it is
normalized like the rest (``Accumulator.accumulate`` leaves the window's
gradient of every parameter) and cleared at the end of every window.

With ``accumulate_dtype`` the gradients of narrower parameters are summed
across micro-batches in wide buffers and rounded into ``.grad`` once.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import nn

__all__ = [
    "GradientSums",
    "ParameterSets",
    "by_mesh",
    "clear_gradients",
    "clip_gradients",
    "clip_to_norm",
    "parameters_and_buffers",
    "present_gradients",
    "scale_gradients",
    "total_norm",
]


class ParameterSets:
    """The model's parameters and the optimizer's, as of the current window.

    Attributes:
        model: every parameter of the model (their gradients are cleared at
            the start and the end of every window).
        updated: the parameters the optimizer updates, each once, in the order
            of its param groups: the norm, the clip and the step cover these.
        trainable: the model's parameters that require grad (only these can
            receive a gradient).
        buffers: the model's buffers, in ``model.buffers()`` order.
        devices: the devices of the model's parameters (the first is where
            autocast runs; the RNG of each is saved with a window's start).

    Raises:
        ValueError: (from :meth:`refresh`) the optimizer holds a parameter
            that is not the model's.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._module = model
        self._optimizer = optimizer
        self._groups: list[tuple[int, int]] = []
        self.model: list[nn.Parameter] = []
        self.updated: list[nn.Parameter] = []
        self.trainable: list[nn.Parameter] = []
        self.buffers: list[torch.Tensor] = []
        self.devices: list[torch.device] = [torch.device("cpu")]
        self.refresh()

    def refresh(self) -> None:
        """Read the parameters (and buffers) again; cheap when nothing changed.

        The optimizer's list is rebuilt (and checked against the model) only
        when the model's parameters or the optimizer's param groups changed:
        a group's identity and length, and the number of groups, tell.
        """
        model, self.buffers = parameters_and_buffers(self._module)
        groups = [(id(g["params"]), len(g["params"])) for g in self._optimizer.param_groups]
        changed = len(model) != len(self.model) or any(map(operator.is_not, model, self.model))
        if changed or groups != self._groups:
            updated = list(
                dict.fromkeys(p for g in self._optimizer.param_groups for p in g["params"])
            )
            owned = set(map(id, model))
            foreign = sum(1 for p in updated if id(p) not in owned)
            if foreign:
                raise ValueError(
                    f"`optimizer` got {foreign} parameter(s) that are not parameters of "
                    "`model`; expected parameters of the model only. Fix: build the optimizer "
                    "(and add_param_group) from model.parameters(), after wrapping the model "
                    "in DDP/FSDP."
                )
            self.model, self.updated, self._groups = model, updated, groups
            self.devices = list(dict.fromkeys(p.device for p in model)) or [torch.device("cpu")]
        self.trainable = [p for p in self.model if p.requires_grad]


def parameters_and_buffers(model: nn.Module) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """``list(model.parameters())`` and ``list(model.buffers())`` in one walk of the module
    tree, in the same order and without duplicates: a window reads both, and the two
    generators of ``nn.Module`` cost several times more (``benchmarks/overhead.py``)."""
    params: dict[int, nn.Parameter] = {}
    buffers: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        for p in module._parameters.values():
            if p is not None:
                params.setdefault(id(p), p)
        for b in module._buffers.values():
            if b is not None:
                buffers.setdefault(id(b), b)
        stack.extend(m for m in reversed(module._modules.values()) if m is not None)
    return list(params.values()), list(buffers.values())


def clear_gradients(params: list[nn.Parameter]) -> None:
    """``zero_grad(set_to_none=True)`` of the model and the optimizer in one pass: the
    optimizer's parameters are the model's (:class:`ParameterSets` checks)."""
    for parameter in params:
        parameter.grad = None


def present_gradients(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The gradients that exist (a parameter the window did not reach has none)."""
    return [p.grad for p in params if p.grad is not None]


def scale_gradients(params: list[nn.Parameter], factor: float) -> None:
    """Multiply every present gradient of ``params`` by ``factor``, in place."""
    for group in by_mesh(present_gradients(params)):
        torch._foreach_mul_(group, factor)


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients together (a full tensor, also for FSDP2's DTensors, on
    any number of device meshes: FSDP2 + tensor parallelism puts some on (dp, tp), the
    rest on dp)."""
    first = grads[0]
    if all(
        type(g) is torch.Tensor and g.dtype == first.dtype and g.device == first.device
        for g in grads
    ):
        # The common case in one fused kernel: get_total_norm first groups the tensors by
        # device and dtype, which costs more than the norm of a small model.
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    # DTensors of different meshes cannot be stacked: one norm per mesh, each made a full
    # tensor (a collective over its mesh, in the same order on every rank), then combined.
    norms = []
    for group in by_mesh(grads):
        if hasattr(torch.nn.utils, "get_total_norm"):
            norm = torch.nn.utils.get_total_norm(group, 2.0)
        else:  # torch < 2.6
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in group])
            )
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def by_mesh(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``grads`` grouped by their DTensor device mesh (plain tensors together), in the
    order of first appearance: the same on every rank."""
    groups: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault(getattr(grad, "device_mesh", None), []).append(grad)
    return list(groups.values())


def clip_gradients(params: list[nn.Parameter], max_norm: float | None) -> float:
    """The global L2 norm of the present gradients of ``params`` (0.0 when none);
    clips them to ``max_norm`` when it is given and the norm is finite, with the
    coefficient of ``torch.nn.utils.clip_grad_norm_``."""
    grads = present_gradients(params)
    if not grads:
        return 0.0
    norm = total_norm(grads)
    value = float(norm.item())
    if max_norm is not None and math.isfinite(value):
        clip_to_norm(grads, norm, max_norm)
    return value


def clip_to_norm(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Multiply ``grads`` in place by ``min(1, max_norm / (norm + 1e-6))``, the coefficient
    of ``torch.nn.utils.clip_grad_norm_``, for a ``norm`` measured by the caller (the
    global norm of a gradient spread over processes)."""
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(grads[0].device)
    for group in by_mesh(grads):  # a DTensor op takes the tensors of one mesh only
        torch._foreach_mul_(group, coefficient)


class GradientSums:
    """The window's gradient so far, summed in ``dtype`` for narrower parameters.

    After every pass the gradients of parameters narrower than ``dtype`` move
    into wide sums (:meth:`stash`); before a pass that a data-parallel wrapper
    synchronizes (which reduces ``.grad`` inside its backward), and at the end
    of the window, the sums are rounded back into ``.grad`` once
    (:meth:`restore`). Without ``dtype`` every method does nothing.
    """

    def __init__(
        self, trainable: list[nn.Parameter], dtype: torch.dtype | None, *, round_before_sync: bool
    ) -> None:
        self.narrow = (
            []
            if dtype is None
            else [
                p
                for p in trainable
                if p.dtype.is_floating_point and p.dtype.itemsize < dtype.itemsize
            ]
        )
        self.dtype = dtype
        self.round_before_sync = round_before_sync
        self.sums: dict[nn.Parameter, torch.Tensor] = {}

    def before_pass(self, *, synchronize: bool) -> None:
        if synchronize and self.round_before_sync:
            self.restore()

    def after_pass(self, *, synchronize: bool) -> None:
        """A local model keeps the sums wide until the window ends and rounds once."""
        if not (synchronize and self.round_before_sync):
            self.stash()

    def stash(self) -> None:
        for p in self.narrow:
            if p.grad is None:
                continue
            if p in self.sums:
                self.sums[p].add_(p.grad)
            else:
                self.sums[p] = p.grad.to(self.dtype)
            p.grad = None

    def restore(self) -> None:
        self.stash()
        for p, total in self.sums.items():
            p.grad = total.to(p.dtype)
        self.sums.clear()

    def scale(self, factor: float) -> None:
        """Multiply the wide sums by ``factor`` (``.grad`` is the caller's)."""
        for total in self.sums.values():
            total.mul_(factor)

    def discard(self) -> None:
        self.sums.clear()
