"""Sharded checkpoints: FSDP2 models saved and loaded through torch.distributed.checkpoint.

Every rank writes its own shards of the model and optimizer into one
directory (DCP's ``__<rank>_<n>.distcp`` files and its ``.metadata``); no rank
gathers the full model. DCP re-splits the shards when the world size
changes. The SHA-256 of every file is recorded at the save (each rank hashes
the files it wrote) and checked before a load (the files are spread over the
ranks), so a damaged shard is refused like a damaged checkpoint file.

An optimizer without state (no step taken yet) is not saved: torch's
``get_optimizer_state_dict`` would create its state with a step at lr 0
(Adam's step count would then be one ahead of a run never saved).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["apply", "is_sharded", "read", "save"]

_CHUNK = 1 << 22


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds DTensor parameters (FSDP2's ``fully_shard``)."""
    if not dist.is_available() or not dist.is_initialized():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Write the shards into ``directory`` (collective); return what :func:`read` checks.

    Returns:
        ``{"optimizer": whether its state was saved, "sha256": {file name: digest}}``.
    """
    import torch.distributed.checkpoint as dcp

    with_optimizer = bool(optimizer.state)
    dcp.save(_state(model, optimizer, with_optimizer=with_optimizer), checkpoint_id=directory)
    rank = dist.get_rank()
    mine = sorted(directory.glob(f"__{rank}_*.distcp"))
    if rank == 0:
        mine.append(directory / ".metadata")
    hashes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, {path.name: _sha256(path) for path in mine})
    return {"optimizer": with_optimizer, "sha256": {k: v for h in hashes for k, v in h.items()}}


def read(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    saved: dict[str, Any],
    *,
    check_model: Callable[[dict[str, Any], dict[str, Any]], None],
) -> dict[str, Any]:
    """Check the shards and read them into copies (collective); nothing is loaded yet.

    ``check_model(saved, current)`` compares the saved global shapes and dtypes
    with the model's. Every rank raises the same error when any rank finds one.

    Raises:
        ValueError: a file is missing or damaged, the shards hold another
            model, or they cannot be read.
    """
    import torch.distributed.checkpoint as dcp

    _agree(_damaged(directory, saved["sha256"]))
    metadata = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    fresh = not optimizer.state
    with torch.no_grad():
        state = _state(model, optimizer, with_optimizer=saved["optimizer"])
    try:
        check_model(
            {k[len("model.") :]: _Meta(v) for k, v in metadata.items() if k.startswith("model.")},
            state["model"],  # a DTensor's shape is the global one, as saved
        )
        copies = _cloned(state)
        try:
            dcp.load(copies, checkpoint_id=directory)
        except Exception as error:
            raise ValueError(
                f"`path` got shards in {directory} that cannot be read ({error}); expected this "
                "model's and optimizer's. Fix: load an earlier checkpoint."
            ) from error
    finally:
        if fresh:
            # get_optimizer_state_dict created it (set_optimizer_state_dict creates it again).
            optimizer.state.clear()
    return copies


def apply(model: nn.Module, optimizer: torch.optim.Optimizer, loaded: dict[str, Any]) -> None:
    """Load what :func:`read` returned into the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, loaded["model"])
    if "optimizer" in loaded:
        set_optimizer_state_dict(model, optimizer, loaded["optimizer"])
    else:
        optimizer.state.clear()  # saved before its first step


def _state(model: nn.Module, optimizer: Any, *, with_optimizer: bool) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model)}
    if with_optimizer:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def _damaged(directory: Path, hashes: dict[str, str]) -> str | None:
    """What is wrong with this rank's share of the files (file ``i`` is rank ``i % world``'s)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for index, name in enumerate(sorted(hashes)):
        if index % world_size != rank:
            continue
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if _sha256(path) != hashes[name]:
            return f"{path} does not match its SHA-256: the file is damaged"
    return None


def _agree(problem: str | None) -> None:
    """Raise on every rank if any rank found a problem (a lone raise would hang the others)."""
    problems: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    found = [p for p in problems if p is not None]
    if found:
        raise ValueError(
            f"`path` got shards where {found[0]}; expected the files save_checkpoint wrote. "
            "Fix: load an earlier checkpoint."
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Meta:
    """A saved tensor's global shape and dtype, read from DCP's metadata."""

    def __init__(self, metadata: Any) -> None:
        self.shape = torch.Size(getattr(metadata, "size", ()))
        self.dtype = getattr(getattr(metadata, "properties", None), "dtype", None)


def _cloned(value: Any) -> Any:
    """Copies of the tensors (DTensors stay sharded) for DCP to read into."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cloned(v) for v in value)
    return value
