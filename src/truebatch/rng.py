"""The random number generators a resumed run must continue from.

A run is reproducible from a point when every generator it draws from is put
back as it was there: torch's CPU generator (dropout, ``shuffle=True``
samplers, augmentations), the generator of every accelerator device (dropout
on CUDA), Python's ``random`` and NumPy's global generator (augmentation
libraries), and any ``torch.Generator`` object the data pipeline owns.

States are kept in types ``torch.load(weights_only=True)`` reads back.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

__all__ = ["get_state", "set_state"]


def get_state(*, devices: bool, generators: Iterable[torch.Generator] = ()) -> dict[str, Any]:
    """The state of the host generators, optionally of every device, and of ``generators``.

    Args:
        devices: also record the generator of every initialized accelerator
            device (each CUDA device, MPS, XPU).
        generators: ``torch.Generator`` objects owned by the caller (a
            DataLoader's or sampler's ``generator``), recorded in order.

    Returns:
        A dict for :func:`set_state`.
    """
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _python_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "generators": [generator.get_state() for generator in generators],
    }
    if devices:
        state["devices"] = _device_states()
    return state


def set_state(
    state: dict[str, Any], *, generators: Iterable[torch.Generator] = (), host: bool = True
) -> None:
    """Put back what :func:`get_state` recorded (``generators`` in the same order).

    Device states are restored for the devices present in both the record and
    this process (a resumed run may see fewer devices; those it sees are set).
    ``host=False`` restores ``generators`` only.
    """
    for generator, saved in zip(generators, state["generators"], strict=True):
        generator.set_state(saved)
    if not host:
        return
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    for kind, saved in state.get("devices", {}).items():
        _set_device_state(kind, saved)


def _device_states() -> dict[str, Any]:
    states: dict[str, Any] = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        states["mps"] = mps.get_rng_state()
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available() and xpu.is_initialized():
        states["xpu"] = xpu.get_rng_state_all()
    return states


def _set_device_state(kind: str, saved: Any) -> None:
    if kind == "cuda" and torch.cuda.is_available():
        for index, value in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(value, index)
    elif kind == "mps" and torch.backends.mps.is_available():
        torch.mps.set_rng_state(saved)
    elif kind == "xpu" and getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        for index, value in enumerate(saved[: torch.xpu.device_count()]):
            torch.xpu.set_rng_state(value, index)


def _python_state() -> tuple[int, torch.Tensor, float | None]:
    version, internal, gauss = random.getstate()
    return version, torch.tensor(internal, dtype=torch.int64), gauss
