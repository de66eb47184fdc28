"""Count the host reads of tensors that truebatch makes.

On an accelerator every read of a device tensor's value by the host
(``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``...) waits
for the launch queue to drain. On the CPU of the tests nothing waits, so the
reads are counted instead: :class:`HostReads` replaces those methods of
``torch.Tensor`` with counting wrappers while it is entered.

A read is truebatch's when the innermost frame outside torch is in
truebatch's package: a read that ``loss_fn`` or the test makes is not
counted, a read that torch makes for truebatch (``GradScaler.step`` reading
its ``found_inf``) is. Reads made inside an optimizer's ``step`` are the
optimizer's own (``torch.optim.Adam`` reads its step counter, a host tensor)
and a hand-written loop pays them too: they are not counted.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import truebatch

PACKAGE = str(Path(truebatch.__file__).parent)
TORCH = str(Path(torch.__file__).parent)
OPTIM = str(Path(torch.optim.__file__).parent)
HERE = __file__

# Every Python-level way to read a tensor's value on the host.
METHODS = (
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
)
FUNCTIONS = ("equal", "allclose", "is_nonzero")


def reader() -> str | None:
    """``"truebatch"``, ``"optimizer"`` or ``None`` (anyone else): who makes this read."""
    frame = sys._getframe(2)
    owner = None
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(OPTIM) and frame.f_code.co_name == "step":
            return "optimizer"
        if owner is None and not path.startswith(TORCH) and path != HERE:
            owner = "truebatch" if path.startswith(PACKAGE) else "other"
        frame = frame.f_back
    return owner


class HostReads:
    """A context manager that counts truebatch's host reads of tensors.

    Attributes:
        count: truebatch's reads so far.
        where: per ``file:line`` of truebatch that made them, how many.

    Example:
        >>> with HostReads() as reads:
        ...     acc.step(batch, loss_fn)
        >>> reads.count
        1
    """

    def __init__(self) -> None:
        self.count = 0
        self.where: Counter[str] = Counter()
        self.saved: list[tuple[Any, str, Any, bool]] = []

    def wrap(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)
        counter = self

        def counting(*args: Any, **kwargs: Any) -> Any:
            if reader() == "truebatch":
                counter.count += 1
                frame = sys._getframe(1)
                while not frame.f_code.co_filename.startswith(PACKAGE):
                    frame = frame.f_back
                counter.where[f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"] += 1
            return original(*args, **kwargs)

        self.saved.append((owner, name, original, name in vars(owner)))
        setattr(owner, name, counting)

    def __enter__(self) -> HostReads:
        for name in METHODS:
            self.wrap(torch.Tensor, name)
        for name in FUNCTIONS:
            self.wrap(torch, name)
        return self

    def __exit__(self, *_: object) -> None:
        for owner, name, original, own in reversed(self.saved):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self.saved.clear()
