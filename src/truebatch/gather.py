"""Joining a window's representations: across micro-batches, and across DDP ranks.

:func:`gather_window` concatenates every rank's rows of each tensor leaf in
rank order (one ``all_gather`` per leaf, padded to the largest rank, after one
``all_gather_object`` of the leaves' structure, dtypes and trailing shapes, so
a rank without samples can take part and a mismatch raises on every rank
rather than hanging).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from truebatch.batching import map_tensors, tensor_leaves
from truebatch.distributed import GradientSync

__all__ = ["DeferredBufferBroadcast", "concat", "gather_window"]


def concat(structures: list[Any]) -> Any:
    """Tensor leaves of same-shaped structures concatenated along dim 0, in order
    (one structure is returned as it is: no copy)."""
    if len(structures) == 1:
        return structures[0]
    columns = [[t for _, t in tensor_leaves(s, None)] for s in structures]
    if len({len(c) for c in columns}) != 1:
        raise ValueError(
            f"`encode_fn`/`micro_batches` got structures with {sorted({len(c) for c in columns})}"
            " tensors; expected the same structure for every micro-batch. Fix: return the same "
            "keys every time."
        )
    try:
        joined = iter([torch.cat(column) for column in zip(*columns, strict=True)])
    except RuntimeError as error:
        raise ValueError(
            f"`micro_batches` got tensors that cannot be concatenated ({error}); expected "
            "equal shapes beyond dim 0. Fix: pass window_batch=False and return what the "
            "loss needs (e.g. labels) from encode_fn."
        ) from error
    result = map_tensors(structures[0], lambda _: next(joined))
    if next(joined, None) is not None:
        raise TypeError(
            f"`micro_batches` got {type(structures[0]).__name__} with tensors that are not "
            "constructor fields; expected tensors in init fields. Fix: pass a dict or tuple."
        )
    return result


class DeferredBufferBroadcast:
    """DDP broadcasts rank 0's buffers in the first forward after a synchronizing one.

    The first, no-grad forwards must make no collective (a rank without samples runs
    none): the broadcast is left to the first pass with a graph, which every rank runs.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model if isinstance(model, nn.parallel.DistributedDataParallel) else None

    def __enter__(self) -> None:
        if self.model is not None:
            self.saved = self.model.require_forward_param_sync
            self.model.require_forward_param_sync = False

    def __exit__(self, *_: object) -> None:
        if self.model is not None:
            self.model.require_forward_param_sync = self.saved


def gather_window(
    sync: GradientSync, device: torch.device, reps: Any, batch: Any, rank_sizes: list[int]
) -> tuple[Any, Any]:
    """All ranks' representations (and batch), concatenated in rank order.

    ``device`` is this rank's model device: NCCL gathers there.
    """
    group = sync.group
    specs: list[Any] = [None] * sync.world_size
    dist.all_gather_object(specs, (_spec(reps), _spec(batch)), group=group)
    known = [s for s in specs if s[0][0] is not None]
    signatures = {repr(_signature(s)) for s in known}
    if len(signatures) > 1:
        raise ValueError(
            f"`encode_fn` got representations (or batches) that differ between ranks: "
            f"{sorted(signatures)}; expected one structure, dtype and shape beyond dim 0. "
            "Fix: return the same on every rank."
        )
    (reps_spec, reps_devices), (batch_spec, batch_devices) = known[0]
    reps = reps if reps is not None else _empty(reps_spec, reps_devices, device)
    if batch_spec is not None:
        batch = batch if batch is not None else _empty(batch_spec, batch_devices, device)
    most = max(rank_sizes)
    nccl = "nccl" in str(dist.get_backend(group))

    def gather_leaf(t: torch.Tensor) -> torch.Tensor:
        home = t.device
        padded = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
        if nccl:
            padded = padded.to(device)
        parts = [torch.empty_like(padded) for _ in rank_sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, rank_sizes, strict=True)]).to(home)

    return map_tensors(reps, gather_leaf), (
        map_tensors(batch, gather_leaf) if batch is not None else None
    )


def _spec(structure: Any) -> tuple[Any, list[str]] | tuple[None, None]:
    """Structure, dtypes and trailing shapes (as meta tensors) and devices of the leaves."""
    if structure is None:
        return None, None
    meta = map_tensors(
        structure, lambda t: torch.empty((0, *t.shape[1:]), dtype=t.dtype, device="meta")
    )
    return meta, [str(t.device) for _, t in tensor_leaves(structure, None)]


def _signature(spec: Any) -> list[Any]:
    (reps, _), (batch, _) = spec
    return [
        [(t.dtype, tuple(t.shape)) for _, t in tensor_leaves(s, None)] if s is not None else None
        for s in (reps, batch)
    ]


def _empty(spec: Any, devices: list[str], device: torch.device) -> Any:
    """Zero rows shaped like ``spec``: a rank without samples in the gather. A leaf on
    another rank's accelerator is placed on this rank's (``device``)."""
    where = iter(devices)

    def empty(t: torch.Tensor) -> torch.Tensor:
        home = torch.device(next(where))
        return torch.empty(t.shape, dtype=t.dtype, device=device if home.type != "cpu" else home)

    return map_tensors(spec, empty)
