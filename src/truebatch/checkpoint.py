"""Checkpoints a run resumes from exactly: one call to save, one to load.

What a resume needs is the model, the Accumulator (optimizer, scheduler,
scaler, its window count and "auto" size), the position in the data
(:class:`~truebatch.windows.Windows`) and every random generator (torch's CPU
and every device's, Python's, NumPy's), per rank. Saved after a window and
loaded into freshly built objects, the run continues with bitwise the same
parameters as the run that never stopped (same world size, same code).

A checkpoint is one file, replaced atomically: written to a temporary file in
the same directory, flushed to disk (fsync), renamed over the old one, and
the directory flushed, so a run killed while saving leaves the previous
checkpoint whole. The file starts with a header holding the payload's length
and SHA-256: a truncated or damaged file is refused before anything is loaded.

Sharded models (FSDP2's ``fully_shard``) are saved with
``torch.distributed.checkpoint`` (DCP): every rank writes its own shards to
a directory beside the file (``<name>.shards-<id>``), no rank gathers the
full model, and the file, written last by rank 0, names that directory; the
directory of the previous checkpoint is removed after the new file is in place.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from truebatch import rng, shards
from truebatch.accumulator import Accumulator
from truebatch.windows import Windows

__all__ = ["load_checkpoint", "save_checkpoint"]

_MAGIC = b"truebatch checkpoint\n"
_VERSION = 1
_HEADER = struct.Struct(f"<{len(_MAGIC)}sIQ32s")  # magic, version, payload length, SHA-256


def save_checkpoint(
    path: str | os.PathLike[str], accumulator: Accumulator, *, windows: Windows[Any] | None = None
) -> None:
    """Save everything a run needs to resume exactly, replacing ``path`` atomically.

    Call it after a window (``acc.step_window``) on every rank; under
    torch.distributed it is collective. The Accumulator brings the model,
    optimizer, scheduler and scaler it holds, so they cannot be mixed up
    with others; ``windows`` brings the data position.

    Args:
        path: the checkpoint file; its directory must exist. Sharded (FSDP2)
            models also write a directory ``<path>.shards-<id>`` beside it.
        accumulator: the run's Accumulator.
        windows: the run's :func:`truebatch.windows`, to resume the data
            where it was (omit it if you track the data position yourself).

    Examples:
        >>> tb.save_checkpoint("run/last.pt", acc, windows=windows)
    """
    path = Path(path)
    world_size, rank = _world()
    part = {
        "rng": rng.get_state(devices=True),
        "windows": windows.state_dict() if windows is not None else None,
    }
    ranks = [part]
    if world_size > 1:
        ranks = [None] * world_size
        dist.all_gather_object(ranks, part)
    state = accumulator.state_dict()
    payload: dict[str, Any] = {"format": _VERSION, "world_size": world_size, "ranks": ranks}
    if shards.is_sharded(accumulator.model):
        name = _shared_name(f"{path.name}.shards-")
        saved = shards.save(path.parent / name, accumulator.model, accumulator.optimizer)
        # The optimizer's state is in the shards; the rest of the Accumulator's is small.
        state = {key: value for key, value in state.items() if key != "optimizer"}
        payload.update(shards=name, sharded=saved, accumulator=state)
    elif rank == 0:
        payload.update(shards=None, model=accumulator.model.state_dict(), accumulator=state)
    if rank == 0:
        _write_atomically(path, payload)
        _remove_leftovers(path, keep=payload["shards"])
    if world_size > 1:
        dist.barrier()


def load_checkpoint(
    path: str | os.PathLike[str], accumulator: Accumulator, *, windows: Windows[Any] | None = None
) -> None:
    """Continue from what :func:`save_checkpoint` saved, or refuse without changing anything.

    Build the model (wrapped as before), optimizer, scheduler, scaler,
    Accumulator and windows as the saved run did, then load: the next window is
    the one after the saved position. Everything is checked before anything is
    loaded: the file's integrity, that it holds this model's parameters (names,
    shapes, dtypes), the optimizer's groups, the scheduler and scaler, and the
    windows' size.

    Same world size: exact (bitwise the run that never stopped). Another world
    size is only possible for what does not depend on the rank: model,
    optimizer, scheduler and scaler (FSDP2 shards are re-split exactly); each
    rank's data position and random state cannot be mapped to other ranks, so
    ``windows`` must then be omitted, the random state is not restored (a
    warning says so) and the data should restart at an epoch boundary.

    Args:
        path: a file written by :func:`save_checkpoint`.
        accumulator: the Accumulator to load into (with its model and optimizer).
        windows: the windows to put back at the saved position.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a complete, undamaged truebatch checkpoint,
            or holds another model, optimizer, windows or world size; the
            message says which.

    Examples:
        >>> if os.path.exists("run/last.pt"):
        ...     tb.load_checkpoint("run/last.pt", acc, windows=windows)
    """
    path = Path(path)
    payload = _read(path)
    world_size, rank = _world()
    same_world = payload["world_size"] == world_size
    part = payload["ranks"][rank] if same_world else None
    if not same_world and windows is not None:
        raise ValueError(
            f"`path` got a checkpoint of {payload['world_size']} ranks; expected {world_size}, "
            "since each rank's data position is its own. Fix: resume on "
            f"{payload['world_size']} ranks, or omit windows= and restart the data at an epoch."
        )
    if windows is not None and part["windows"] is None:
        raise ValueError(
            "`windows` got a checkpoint saved without a data position; expected one saved with "
            "windows=. Fix: omit windows= and position the data yourself."
        )
    sharded = shards.is_sharded(accumulator.model)
    if sharded != (payload["shards"] is not None):
        kinds = ("an unsharded", "a sharded")
        saved, expected = kinds if sharded else kinds[::-1]
        raise ValueError(
            f"`path` got {saved} model's checkpoint; expected {expected} one, like this model. "
            "Fix: wrap the model as the saved run did (fully_shard or not)."
        )
    if sharded:
        loaded = shards.read(
            path.parent / payload["shards"],
            accumulator.model,
            accumulator.optimizer,
            payload["sharded"],
            check_model=_check_model,
        )
        state = {**payload["accumulator"], "optimizer": accumulator.optimizer.state_dict()}
    else:
        _check_model(payload["model"], accumulator.model.state_dict())
        _check_optimizer(payload["accumulator"]["optimizer"], accumulator.optimizer)
        state = payload["accumulator"]
    _apply(accumulator, state, windows, part)
    if sharded:
        shards.apply(accumulator.model, accumulator.optimizer, loaded)
    else:
        accumulator.model.load_state_dict(payload["model"])
    if part is not None:
        rng.set_state(part["rng"])
    else:
        warnings.warn(
            f"load_checkpoint: the random state of {payload['world_size']} ranks cannot be "
            f"mapped to {world_size}; dropout and shuffling continue from this run's own.",
            stacklevel=2,
        )


def _apply(
    accumulator: Accumulator, state: dict[str, Any], windows: Windows[Any] | None, part: Any
) -> None:
    """Load the windows and the Accumulator, or neither: each checks before it changes."""
    before = windows.state_dict() if windows is not None else None
    if windows is not None:
        windows.load_state_dict(part["windows"])
    try:
        accumulator.load_state_dict(state)
    except BaseException:
        if windows is not None:
            windows.load_state_dict(before)
        raise


# ------------------------------------------------------------------- the file


def _write_atomically(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    header = _HEADER.pack(_MAGIC, _VERSION, len(data), hashlib.sha256(data).digest())
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "wb") as file:
            file.write(header)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); Windows cannot open a directory, nor needs to."""
    if os.name == "nt":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_leftovers(path: Path, *, keep: str | None) -> None:
    """Temporary files of saves that were killed, and shard directories no file names."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)
    for directory in path.parent.glob(f"{path.name}.shards-*"):
        if directory.name != keep:
            shutil.rmtree(directory, ignore_errors=True)


def _read(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    fix = "Fix: load an earlier checkpoint, or start over."
    if not data.startswith(_MAGIC):
        raise ValueError(
            f"`path` got {path}, which is not a truebatch checkpoint; expected a file written by "
            "tb.save_checkpoint. Fix: pass the path given to tb.save_checkpoint."
        )
    if len(data) < _HEADER.size:
        raise ValueError(
            f"`path` got {path}, truncated inside its header; expected {_HEADER.size}+ bytes. {fix}"
        )
    _, version, length, digest = _HEADER.unpack_from(data)
    if version != _VERSION:
        raise ValueError(
            f"`path` got a checkpoint of format {version}; expected {_VERSION}. "
            "Fix: load it with the truebatch version that saved it."
        )
    body = memoryview(data)[_HEADER.size :]
    if len(body) != length:
        raise ValueError(
            f"`path` got {path} with {len(body)} bytes of data; expected {length}: the file is "
            f"truncated (or was appended to). {fix}"
        )
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(
            f"`path` got {path}, whose data does not match its SHA-256: the file is damaged. {fix}"
        )
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- the checks


def _check_model(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """``saved`` and ``current`` map names to tensors (or anything with a shape and dtype)."""
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    differ = [
        f"{name!r} saved {tuple(saved[name].shape)} {saved[name].dtype}, "
        f"model {tuple(value.shape)} {value.dtype}"
        for name, value in current.items()
        if name in saved
        and isinstance(value, torch.Tensor)
        and (saved[name].shape != value.shape or saved[name].dtype != value.dtype)
    ]
    if missing or unexpected or differ:
        found = [
            f"{len(missing)} missing ({', '.join(missing[:3])})" if missing else "",
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})" if unexpected else "",
            f"{len(differ)} of another shape or dtype ({'; '.join(differ[:3])})" if differ else "",
        ]
        raise ValueError(
            f"`path` got another model's checkpoint: entries {', '.join(f for f in found if f)}; "
            "expected this model's names, shapes and dtypes. Fix: load a checkpoint of this "
            "model, wrapped as when saved (DDP adds 'module.' to every name)."
        )


def _check_optimizer(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    groups = optimizer.state_dict()["param_groups"]
    saved_groups = saved.get("param_groups", [])
    shape = [len(g["params"]) for g in saved_groups], [len(g["params"]) for g in groups]
    options = [sorted(g) for g in saved_groups], [sorted(g) for g in groups]
    if shape[0] != shape[1] or options[0] != options[1]:
        raise ValueError(
            f"`path` got an optimizer with parameter groups of {shape[0]} parameters and options "
            f"{options[0][:1]}; expected {shape[1]} and {options[1][:1]}. "
            "Fix: build the optimizer as the saved run did."
        )


# ------------------------------------------------------------------ helpers


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _shared_name(prefix: str) -> str:
    """A fresh name, the same on every rank (rank 0's)."""
    name = [f"{prefix}{uuid.uuid4().hex[:12]}"]
    if _world()[0] > 1:
        dist.broadcast_object_list(name, src=0)
    return name[0]
