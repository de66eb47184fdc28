"""The one measurement of "how far apart": relative difference per tensor.

The contract compares, tensor by tensor, a gradient (or any list of tensors)
with its reference:

    relative(p) = ||actual(p) - expected(p)|| / max(||expected(p)||, floor)
    floor       = kappa * ||expected||            (all tensors together)
    kappa       = min(1, 100 * eps(dtype) / tolerance(dtype))

Rounding errors scale with the whole gradient, not with one tensor's, so a
tensor whose exact value is ~0 (a bias just before a normalization, a key bias
in attention) is judged on the whole gradient's scale: ``kappa`` is 0.022 in
float64 and 1 in float32. Norms are taken in float64.

``TOLERANCES`` are the contract's bounds for one window at the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

__all__ = ["TOLERANCES", "max_relative_difference", "relative_differences", "tolerance"]

TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-3,
}

Tensors = Mapping[str, "torch.Tensor | None"] | Iterable["torch.Tensor | None"]


def tolerance(dtype: torch.dtype) -> float:
    """The contract's bound for one window's gradient in ``dtype``.

    Raises:
        ValueError: ``dtype`` is not a floating dtype the contract covers.
    """
    if dtype not in TOLERANCES:
        raise ValueError(
            f"`dtype` got {dtype}; expected one of {sorted(map(str, TOLERANCES))}. "
            "Fix: compare in float64 or float32."
        )
    return TOLERANCES[dtype]


def relative_differences(
    actual: Tensors, expected: Tensors, *, dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Per tensor: ``||actual - expected|| / max(||expected||, floor)`` (module docstring).

    Args:
        actual: tensors by name, or a sequence (named by position, ``"0"``, ``"1"``, ...).
            ``None`` stands for a zero tensor (a parameter without gradient).
        expected: the reference, keyed or ordered like ``actual``.
        dtype: the dtype whose tolerance sets the floor; by default the
            reference's first floating dtype.

    Returns:
        name -> relative difference; ``inf`` where the shapes differ.

    Example:
        >>> relative_differences({"w": torch.ones(2)}, {"w": torch.ones(2)})
        {'w': 0.0}
    """
    a, e = _named(actual), _named(expected)
    if isinstance(actual, Mapping) != isinstance(expected, Mapping):
        raise TypeError(
            "`actual` and `expected` got a mapping and a sequence; expected two of the same "
            "kind. Fix: pass both as dicts by name or both as lists in one order."
        )
    if not isinstance(actual, Mapping) and len(a) != len(e):
        raise ValueError(
            f"`actual` got {len(a)} tensors and `expected` {len(e)}; expected the same number. "
            "Fix: pass the tensors of one model in the same order."
        )
    if dtype is None:
        floating = (t.dtype for t in e.values() if t is not None and t.is_floating_point())
        dtype = next(floating, torch.float64)
    kappa = min(1.0, 100 * torch.finfo(dtype).eps / TOLERANCES.get(dtype, 1e-12))
    norms = {name: _norm(t) for name, t in e.items()}
    floor = kappa * math.sqrt(math.fsum(v * v for v in norms.values()))
    result = {}
    for name in dict.fromkeys([*e, *a]):
        x, y = a.get(name), e.get(name)
        if x is not None and y is not None and x.shape != y.shape:
            result[name] = math.inf
            continue
        difference = _norm(x if y is None else y if x is None else _wide(x) - _wide(y))
        scale = max(norms.get(name, 0.0), floor)
        result[name] = difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)
    return result


def max_relative_difference(
    actual: Tensors, expected: Tensors, *, dtype: torch.dtype | None = None
) -> float:
    """The largest of :func:`relative_differences` (0.0 for no tensors).

    Example:
        >>> max_relative_difference([torch.ones(2)], [torch.ones(2)])
        0.0
    """
    return max(relative_differences(actual, expected, dtype=dtype).values(), default=0.0)


def _named(tensors: Tensors) -> dict[str, torch.Tensor | None]:
    if isinstance(tensors, Mapping):
        return dict(tensors)
    return {str(i): t for i, t in enumerate(tensors)}


def _wide(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if hasattr(t, "full_tensor"):  # a DTensor shard: compare the whole tensor
        t = t.full_tensor()
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def _norm(t: torch.Tensor | None) -> float:
    return 0.0 if t is None else torch.linalg.vector_norm(_wide(t)).item()
