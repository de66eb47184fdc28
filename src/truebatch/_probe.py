"""Forward hooks that compare every module call of a run with the full batch's.

A :class:`Probe` on a model copy records, on the full batch, each module call's
inputs and outputs (the tensor leaves with the batch along dim 0). On another
run it compares each micro-batch's leaves with rows ``[offset, offset + n)`` of
the recorded ones, so that for every leaf

    difference = ||concat_j(leaf_j) - leaf_full|| / ||leaf_full||

(:func:`truebatch.compare.max_relative_difference` on the joined leaf). Any
tensor is compared, as float64: a boolean attention mask or integer positions
differ exactly when some element does. A leaf that cannot be compared (another
layout, another shape, a tensor subclass that refuses the operations) is
skipped: a probe never changes what the model computes, and never raises
inside it.

``force=True`` additionally replaces every compared output with the recorded
one, so each module call sees the inputs the full batch gave it and the
outputs of its submodules: a difference that remains was made by the module's
own code (a functional dropout between two submodules, say), and
:meth:`Probe.own_sources` names that module alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from truebatch.batching import Batch, batch_size, map_tensors, tensor_leaves
from truebatch.compare import max_relative_difference

__all__ = ["Key", "Probe"]

Key = tuple[str, int]  # (module name, call index within one micro-batch)
Leaves = dict[str, torch.Tensor]


class Probe:
    """Hooks on every module of ``model``, active only inside the wrapped ``loss_fn``.

    Args:
        model: the model copy to watch.
        total: samples in the full batch (the leading dim of recorded leaves).
        reference: the full-batch probe to compare with; ``None`` records.
        force: replace compared outputs by the reference's (see the module docstring).
    """

    def __init__(
        self, model: nn.Module, total: int, reference: Probe | None, *, force: bool = False
    ) -> None:
        self.total, self.reference, self.force = total, reference, force
        self.leaves: dict[tuple[Key, str], Leaves] = {}
        self.order: dict[str, int] = {}
        self.parents: dict[Key, Key | None] = {}
        self._pieces: dict[tuple[Key, str, str], list[torch.Tensor]] = {}
        self._skipped: set[tuple[Key, str, str]] = set()
        self._offset, self._size, self._active = 0, total, False
        self._calls: dict[str, int] = {}
        self._stack: list[Key] = []
        self._handles = []
        for name, module in model.named_modules():
            self._handles.append(
                module.register_forward_pre_hook(self._before(name), with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._after(name)))

    def wrap(self, loss_fn: Callable[[nn.Module, Batch], Any]) -> Callable[[nn.Module, Batch], Any]:
        """``loss_fn`` that announces each micro-batch to the probe before running it."""

        def traced(model: nn.Module, micro_batch: Batch) -> Any:
            self._size, self._calls, self._stack, self._active = (
                batch_size(micro_batch),
                {},
                [],
                True,
            )
            try:
                return loss_fn(model, micro_batch)
            finally:
                self._active = False
                self._offset += self._size

        return traced

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()

    def _before(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._active:
                return
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            key = (name, call)
            self.parents.setdefault(key, self._stack[-1] if self._stack else None)
            self._stack.append(key)
            self.order.setdefault(name, len(self.order))
            self._see(key, "in", [*tensor_leaves(args, "args"), *tensor_leaves(kwargs, "kwargs")])

        return hook

    def _after(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not self._active or not self._stack or self._stack[-1][0] != name:
                return None
            key = self._stack.pop()
            leaves = list(tensor_leaves(output, "output"))
            self._see(key, "out", leaves)
            return self._forced(key, output, leaves) if self.force else None

        return hook

    def _see(self, key: Key, side: str, leaves: list[tuple[str, torch.Tensor]]) -> None:
        if self.reference is None:
            recorded = self.leaves.setdefault((key, side), {})
            for path, t in leaves:
                if _comparable(t) and t.dim() > 0 and t.shape[0] == self.total:
                    recorded[path] = t.detach().clone()
            return
        expected = self.reference.leaves.get((key, side), {})
        for path, t in leaves:
            full = expected.get(path)
            if full is None:
                continue
            entry = (key, side, path)
            rows = full[self._offset : self._offset + self._size]
            if not _comparable(t) or t.shape != rows.shape:
                self._skipped.add(entry)
                continue
            # A copy: a later in-place op (ReLU(inplace=True)) must not rewrite what was seen.
            self._pieces.setdefault(entry, []).append(t.detach().clone())

    def _forced(self, key: Key, output: Any, leaves: list[tuple[str, torch.Tensor]]) -> Any:
        """``output`` with each compared leaf replaced by the reference's rows, or ``None``."""
        assert self.reference is not None
        expected = self.reference.leaves.get((key, "out"), {})
        replace = {}
        for path, t in leaves:
            full = expected.get(path)
            if full is not None and not (t.is_leaf and t.requires_grad):
                rows = full[self._offset : self._offset + self._size]
                if rows.shape == t.shape and rows.dtype == t.dtype:
                    replace[id(t)] = rows.clone()
        if not replace:
            return None
        try:
            forced = map_tensors(output, lambda t: replace.get(id(t), t))
        except Exception:  # a container that cannot be rebuilt: leave the output as computed
            return None
        return forced if type(forced) is type(output) else None

    def differences(self) -> dict[Key, tuple[float | None, float | None]]:
        """Per module call: relative difference of (inputs, outputs); ``None`` if not compared."""
        assert self.reference is not None
        result: dict[Key, list[float | None]] = {}
        for (key, side, path), pieces in self._pieces.items():
            if (key, side, path) in self._skipped:
                continue
            full = self.reference.leaves[key, side][path]
            joined = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            if joined.shape != full.shape:
                continue
            value = max_relative_difference([joined], [full], dtype=torch.float64)
            slot = result.setdefault(key, [None, None])
            index = 0 if side == "in" else 1
            slot[index] = value if slot[index] is None else max(slot[index], value)
        return {key: (v[0], v[1]) for key, v in result.items()}

    def sources(self, tolerance: float) -> dict[str, float]:
        """Modules with a call whose output differs while its inputs agreed -> that difference."""
        found: dict[str, float] = {}
        for (name, _), (inputs, output) in self.differences().items():
            if output is not None and output > tolerance and (inputs or 0.0) <= tolerance:
                found[name] = max(found.get(name, 0.0), output)
        return found

    def own_sources(self, tolerance: float) -> dict[str, float]:
        """With ``force``: modules whose own code made a difference -> its size.

        A module whose output differs while its inputs agreed, and the parent
        of a submodule call whose inputs differ while the parent's agreed (the
        parent's code between its submodules made the difference, since every
        submodule output was replaced by the reference's).
        """
        differences = self.differences()
        found = self.sources(tolerance)
        for key, (inputs, _) in differences.items():
            parent = self.parents.get(key)
            if parent is None or (inputs or 0.0) <= tolerance:
                continue
            if (differences.get(parent, (None, None))[0] or 0.0) <= tolerance:
                found[parent[0]] = max(found.get(parent[0], 0.0), inputs or 0.0)
        return found

    def diverged(self, tolerance: float) -> bool:
        """Whether any module output differs at all (agreeing inputs or not)."""
        return any((out or 0.0) > tolerance for _, out in self.differences().values())


def _comparable(t: torch.Tensor) -> bool:
    """A dense tensor with values (not meta, sparse, quantized, nested or a subclass that may
    refuse the operations of the comparison)."""
    return (
        type(t) is torch.Tensor and t.layout == torch.strided and not (t.is_meta or t.is_quantized)
    )
