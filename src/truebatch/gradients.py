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
from typing import Any

import torch
from torch import nn

from truebatch.snapshot import GroupEntries

__all__ = [
    "GradientSums",
    "MaskedStep",
    "ParameterSets",
    "by_mesh",
    "clear_gradients",
    "clip_gradients",
    "combine_norms",
    "gradient_norms",
    "parameters_and_buffers",
    "present_gradients",
    "scale_gradients",
    "total_norm_of",
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


def gradient_norms(grads: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor | None:
    """The L2 norm of each gradient, from one fused kernel, when they are plain tensors of
    one device and dtype (combined by :func:`combine_norms` or :func:`total_norm_of`);
    else their total norm (a full tensor, also for FSDP2's DTensors on any number of
    device meshes: FSDP2 + tensor parallelism puts some on (dp, tp), the rest on dp);
    ``None`` for none."""
    if not grads:
        return None
    first = grads[0]
    if any(g.layout != torch.strided for g in grads):
        # A sparse gradient (nn.Embedding(sparse=True)) has no norm kernel: the norm of its
        # coalesced values (summed micro-batches repeat rows), one per tensor.
        return [torch.linalg.vector_norm(_values(g)) for g in grads]
    if all(
        type(g) is torch.Tensor and g.dtype == first.dtype and g.device == first.device
        for g in grads
    ):
        # get_total_norm first groups the tensors by device and dtype, which costs more
        # than the norm of a small model.
        return list(torch._foreach_norm(grads))
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


def _values(grad: torch.Tensor) -> torch.Tensor:
    """The entries of a gradient: a sparse COO one's coalesced values, else itself."""
    return grad.coalesce().values() if grad.layout == torch.sparse_coo else grad


def by_mesh(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``grads`` grouped by their DTensor device mesh (plain tensors together), in the
    order of first appearance: the same on every rank."""
    groups: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault(getattr(grad, "device_mesh", None), []).append(grad)
    return list(groups.values())


def combine_norms(norms: list[float] | float) -> float:
    """The global norm from the read per-tensor norms: ``sqrt(sum of squares)``, in float64."""
    if not isinstance(norms, list):
        return norms
    return math.sqrt(math.fsum(n * n for n in norms))


def total_norm_of(norms: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """:func:`combine_norms` on the device (float64), for a decision that is not read."""
    if not isinstance(norms, list):
        return norms.to(torch.float64)
    return torch.linalg.vector_norm(torch.stack(norms).to(torch.float64))


def clip_gradients(grads: list[torch.Tensor], coefficient: float | torch.Tensor) -> None:
    """Multiply ``grads`` by ``min(coefficient, 1)``, in place: the clip of
    ``torch.nn.utils.clip_grad_norm_`` when ``coefficient = max_norm / (norm + 1e-6)``.
    A Python coefficient of 1 or more costs nothing; a tensor one stays on the device."""
    if isinstance(coefficient, torch.Tensor):
        coefficient = torch.clamp(coefficient, max=1.0).to(grads[0].device)
    elif coefficient >= 1.0:
        return
    for group in by_mesh(grads):  # a DTensor op takes the tensors of one mesh only
        torch._foreach_mul_(group, coefficient)


class MaskedStep:
    """An optimizer step that the device undoes where ``skip`` holds: no host read.

    Before the step, the parameters that have a gradient (the only ones an
    optimizer updates) and the tensors of their optimizer state are copied;
    after it, each is set to ``where(skip, copy, updated)``. The result is
    bitwise the state before the step when ``skip`` holds, and the step's
    otherwise. Costs one copy of those parameters and their state per window.

    What the device cannot undo is detected, and :attr:`possible` is False,
    before anything changes: a parameter without optimizer state yet (its
    first step creates it) or state on another device than the parameter
    (``torch.optim.Adam``'s step counter lives on the host unless
    ``capturable=True`` or ``fused=True``). :meth:`finish` returns False when
    the step changed non-tensor state, or the param groups' entries (where
    schedule-free optimizers keep their step count and Prodigy its estimates),
    which only the host can put back.
    """

    @classmethod
    def when(
        cls, wanted: bool, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]
    ) -> MaskedStep | None:
        """A masked step over ``params`` if ``wanted`` and :attr:`possible`, else ``None``."""
        if not wanted:
            return None
        masked = cls(optimizer, params)
        return masked if masked.possible else None

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        self.optimizer = optimizer
        self.params = [p for p in params if p.grad is not None]
        self.grads = [p.grad for p in self.params]
        self.device = self.params[0].device if self.params else torch.device("cpu")
        states = [optimizer.state.get(p) for p in self.params]
        self.possible = all(
            state
            and all(v.device == p.device for v in state.values() if isinstance(v, torch.Tensor))
            for p, state in zip(self.params, states, strict=True)
        )
        if not self.possible:
            return
        self.tensors = list(self.params)
        self.others: list[tuple[dict[str, Any], str, Any]] = []
        for state in states:
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    self.tensors.append(value)
                else:
                    self.others.append((state, key, value))
        with torch.no_grad():
            self.saved = [torch.empty_like(t) for t in self.tensors]
            torch._foreach_copy_(self.saved, self.tensors)
        self.groups = GroupEntries(optimizer)

    def finish(self, skip: torch.Tensor) -> bool:
        """Undo the step where ``skip``; False (nothing undone) if only the host can."""
        if any(state.get(key) is not value for state, key, value in self.others):
            return False
        if self.groups.changed():
            return False
        with torch.no_grad():
            for tensor, saved in zip(self.tensors, self.saved, strict=True):
                tensor.copy_(torch.where(skip, saved, tensor))
        return True

    def undo(self) -> None:
        """Put back everything the step changed (after :meth:`finish` returned False)."""
        with torch.no_grad():
            torch._foreach_copy_(self.tensors, self.saved)
        self.groups.restore()
        for state, key, value in self.others:
            state[key] = value


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
