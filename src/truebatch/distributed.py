"""Data-parallel helpers: who we are, and when gradients are synchronized.

The Accumulator talks to torch.distributed only through :class:`GradientSync`.
A model wrapped in ``DistributedDataParallel`` or sharded with FSDP2's
``fully_shard`` is data-parallel; any other model is trained locally, even when
a process group exists (a process may train its own model).

Per window the Accumulator makes these collectives, in the same order on every
rank, which is what keeps uneven data from hanging:

1. one ``all_gather`` of a few numbers per rank (item count, number of passes,
   samples, flags), started as the window starts; under DDP, from the second
   window on, it travels while the passes compute and is waited for just before
   this rank's last pass (see ``truebatch.window.Window.passes``), else before
   the first;
2. the gradient synchronization of the wrapper: once, on the last pass, when
   gradients are synchronized per window (DDP's default), or on every pass
   (FSDP2's default); every rank runs the same number of passes;
3. one ``all_reduce`` of the loss sum (and of the counts ``loss_fn`` returned),
   started just before the window's last backward and waited for after it, so
   that it travels while the backward computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

SyncMode = Literal["window", "micro_batch"]

__all__ = ["GradientSync", "SyncMode", "rank", "world_size"]


def world_size() -> int:
    """Number of processes in the default group, 1 without torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Rank of this process in the default group, 0 without torch.distributed."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _fsdp2_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def _kind(model: nn.Module) -> Literal["local", "ddp", "fsdp2"]:
    if not (dist.is_available() and dist.is_initialized()):
        return "local"
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    fsdp2 = _fsdp2_module_type()
    if fsdp2 is not None and isinstance(model, fsdp2):
        return "fsdp2"
    return "local"


def _data_parallel_group(model: nn.Module, kind: str) -> dist.ProcessGroup | None:
    """The process group over which ``model``'s gradients are averaged (None: the default)."""
    if kind == "ddp":
        return model.process_group
    if kind != "fsdp2":
        return None
    meshes = {p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh")}
    if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
        raise ValueError(
            f"`model` got FSDP2 parameters on {len(meshes)} device mesh(es) of dimensions "
            f"{sorted(m.ndim for m in meshes)}; expected one 1-D mesh (plain fully_shard): "
            "truebatch counts items over the ranks that average gradients. Fix: shard with "
            "fully_shard(model, mesh=init_device_mesh(device, (world_size,)))."
        )
    return next(iter(meshes)).get_group()


class GradientSync:
    """How (and how often) a model's gradients are synchronized across ranks.

    Args:
        model: the model the Accumulator trains.
        mode: ``"window"`` synchronizes once per window, on its last pass
            (``no_sync`` / ``set_requires_gradient_sync(False)`` before);
            ``"micro_batch"`` synchronizes every pass. ``None`` picks the
            wrapper's sensible default: ``"window"`` for DDP (no extra memory),
            ``"micro_batch"`` for FSDP2 (deferring its reduce-scatter keeps a
            full unsharded gradient per rank).

    Attributes:
        kind: ``"ddp"``, ``"fsdp2"`` or ``"local"``.
        world_size, rank: size of, and this process's rank in, the group
            that averages the gradients (1 and 0 for a local model).
        module: the module the wrapper runs after its own pre-forward work
            (``model.module`` for DDP, whose forward first broadcasts buffers).
    """

    def __init__(self, model: nn.Module, mode: SyncMode | None = None) -> None:
        if mode not in (None, "window", "micro_batch"):
            raise ValueError(
                f"`gradient_sync` got {mode!r}; expected 'window', 'micro_batch' or None. Fix: "
                "pass None for the wrapper's default."
            )
        self.kind = _kind(model)
        self.model = model
        self.group = _data_parallel_group(model, self.kind)
        self.world_size = 1 if self.kind == "local" else dist.get_world_size(self.group)
        self.rank = 0 if self.kind == "local" else dist.get_rank(self.group)
        self.mode: SyncMode = mode or ("micro_batch" if self.kind == "fsdp2" else "window")
        self.module: nn.Module = model.module if self.kind == "ddp" else model
        self._synchronizing = True  # see prepare()
        self._no_sync: AbstractContextManager[None] = nullcontext()  # DDP's, once entered

    @property
    def distributed(self) -> bool:
        """Whether the Accumulator must exchange counts and keep passes in step."""
        return self.world_size > 1 or self.kind != "local"

    @property
    def gradient_stays_local(self) -> bool:
        """Whether each rank's gradient stays in its parameters' ``.grad``, unreduced,
        until the window's last pass: DDP in ``"window"`` mode. (FSDP2 in that mode
        keeps it on internal unsharded parameters.) Only such a gradient can be
        rescaled by each rank on its own before the synchronization."""
        return self.kind == "ddp" and self.mode == "window"

    def _device(self) -> torch.device:
        """Where the group's collectives run: NCCL only takes tensors on the model's GPU."""
        if "nccl" not in str(dist.get_backend(self.group)):
            return torch.device("cpu")
        for parameter in self.model.parameters():
            if parameter.device.type == "cuda":
                return parameter.device
        return torch.device("cuda", torch.cuda.current_device())

    def exchange(self, row: Sequence[float]) -> Callable[[], list[list[float]]]:
        """Start gathering every rank's ``row``; returns the wait.

        Calling the returned function waits for the rows and returns them in
        rank order, as Python numbers (no tensor at all for a local model).
        """
        if not self.distributed:
            rows = [list(row)]
            return lambda: rows
        local = torch.tensor([list(row)], dtype=torch.float64, device=self._device())
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        work = dist.all_gather(gathered, local, group=self.group, async_op=True)

        def wait() -> list[list[float]]:
            work.wait()
            return torch.cat(gathered).tolist()

        return wait

    def all_reduce(self, values: torch.Tensor) -> Callable[[], list[float]]:
        """Start summing ``values`` (a 1-d float64 tensor) over ranks; returns the wait.

        Calling the returned function waits for the sum and returns it as Python
        numbers. Between the two, the collective travels while the caller
        computes.
        """
        wait = self.all_reduce_tensor(values)
        return lambda: wait().tolist()

    def all_reduce_tensor(self, values: torch.Tensor) -> Callable[[], torch.Tensor]:
        """:meth:`all_reduce` whose wait returns the sum as a tensor (on the collective's
        device), so that nothing is read to the host."""
        if not self.distributed:
            return lambda: values
        values = values.to(self._device())
        work = dist.all_reduce(values, group=self.group, async_op=True)

        def wait() -> torch.Tensor:
            work.wait()
            return values

        return wait

    def prepare(self, synchronize: bool) -> None:
        """Make the next pass synchronize gradients, or not.

        The wrapper's no-sync mode (DDP's ``no_sync()``, FSDP2's
        ``set_requires_gradient_sync(False)``) is entered or left only when
        this changes, so a run of passes that do not synchronize enters it
        once. Call inside :meth:`window`, which leaves it.
        """
        if synchronize == self._synchronizing or self.kind == "local":
            return
        self._synchronizing = synchronize
        if self.kind == "fsdp2":
            self.model.set_requires_gradient_sync(synchronize)
        elif synchronize:
            self._no_sync.__exit__(None, None, None)
        else:
            self._no_sync = self.model.no_sync()
            self._no_sync.__enter__()

    @contextmanager
    def window(self) -> Iterator[None]:
        """The passes of one window; gradients synchronize again afterwards, also on error."""
        try:
            yield
        finally:
            self.prepare(True)

    def synchronizes(self, pass_index: int, passes: int) -> bool:
        """Whether pass ``pass_index`` (0-based) of ``passes`` synchronizes gradients."""
        return self.mode == "micro_batch" or pass_index == passes - 1
