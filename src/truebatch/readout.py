"""Values that live on the device until the host needs them, read together once.

Every read of a device tensor by the host (``.item()``, ``float(t)``,
``.tolist()``) waits until the device has run everything queued before it.
A window's numbers (loss sums, counts, gradient norm, whether it stepped)
are therefore kept as tensors in one :class:`Readout` and read with a single
``.tolist()``, when the Accumulator must decide on the host or when the user
first reads one of them (:class:`deferred`, a dataclass field that reads on
first access).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Readout", "deferred", "read"]

Part = float | int | torch.Tensor | list[torch.Tensor] | list[float]


def read(parts: dict[str, Part]) -> dict[str, Any]:
    """``parts`` with every tensor as Python numbers, in one host read.

    A 0-dim tensor becomes a float, a 1-d tensor or a list of 0-dim tensors
    a list of floats; Python numbers pass unchanged. The tensors are joined on
    the device of the first one (another device's tensor is copied there
    first) and read with one ``tolist``: 0-dim tensors of one device, the
    common case, with a single ``torch.stack``.
    """
    pieces: list[torch.Tensor] = []
    layout: list[tuple[str, int, bool]] = []  # name, number of values, one value?
    for key, value in parts.items():
        if isinstance(value, torch.Tensor):
            pieces.append(value)
            layout.append((key, value.numel(), value.dim() == 0))
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            pieces.extend(value)
            layout.append((key, len(value), False))
    if not pieces:
        return dict(parts)
    device = pieces[0].device
    with torch.no_grad():
        if all(t.dim() == 0 and t.device == device for t in pieces):
            joined = torch.stack(pieces)
        else:
            joined = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in pieces])
    values = joined.tolist()
    out, at = dict(parts), 0
    for key, n, one in layout:
        out[key] = values[at] if one else values[at : at + n]
        at += n
    return out


class Readout:
    """Named device values read to the host together, once, then converted.

    Args:
        parts: the values by name (tensors or Python numbers); more may be
            added with :meth:`add` until the first read.
        convert: turns the read parts into the values handed out by name.
    """

    def __init__(
        self, parts: dict[str, Part], convert: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> None:
        self.parts = dict(parts)
        self.convert = convert
        self.values: dict[str, Any] | None = None
        # Whether the values hold something the host must check before acting on them.
        self.unchecked = False

    def add(self, **parts: Part) -> None:
        if self.values is not None:
            raise RuntimeError("Readout.add after the read; add every part before reading.")
        self.parts.update(parts)

    @property
    def pending(self) -> bool:
        """Whether reading would wait for the device (some part is still a tensor)."""
        return self.values is None and any(
            isinstance(v, torch.Tensor) or (isinstance(v, list) and v and torch.is_tensor(v[0]))
            for v in self.parts.values()
        )

    def get(self, name: str) -> Any:
        """The converted value ``name``; the first call reads every part."""
        if self.values is None:
            self.values = self.convert(read(self.parts))
        return self.values[name]


class Pending:
    """The value ``name`` of a :class:`Readout`, to put in a :class:`deferred` field."""

    __slots__ = ("name", "readout")

    def __init__(self, readout: Readout, name: str) -> None:
        self.readout, self.name = readout, name


_MISSING = object()


class deferred:
    """A dataclass field that may hold a :class:`Pending` value, read on first access.

    Reading it gives the plain value (a float, a bool...), so code that reads
    ``result.loss`` is unchanged; only the first access of any field of the
    same readout waits for the device.
    """

    def __init__(self, default: Any = _MISSING) -> None:
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            if self.default is _MISSING:
                raise AttributeError(self.slot[1:])  # a dataclass field without a default
            return self.default
        value = obj.__dict__[self.slot]
        if isinstance(value, Pending):
            value = value.readout.get(value.name)
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value
