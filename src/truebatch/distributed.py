"""Data-parallel helpers: who we are, and when gradients are synchronized.

The Accumulator talks to torch.distributed only through :class:`GradientSync`.
A model wrapped in ``DistributedDataParallel`` or sharded with FSDP2's
``fully_shard`` is data-parallel; any other model is trained locally, even when
a process group exists (a process may train its own model).

The item count N is summed over the *data-parallel ranks*: the ranks over which
the wrapper averages gradients (:func:`data_parallel_ranks`), and only those.
With FSDP2 these are the ranks of the mesh given to ``fully_shard``: both
dimensions of an HSDP (replicate, shard) mesh; the ``dp`` dimension only of an
FSDP2 + tensor-parallel mesh, whose tensor-parallel ranks see the same items
(counting them again would double N). Context-parallel ranks hold parts of the
same sequences: they belong to the mesh the wrapper averages over (torchtitan's
``dp_shard_cp``), so their token counts are summed, each token counted once.
The weight ``world_size / N`` of every backward uses the size of that group,
the factor by which the wrapper divides.

Per window the Accumulator makes these collectives, in the same order on every
rank, which is what keeps uneven data from hanging:

1. one ``all_gather`` of a few numbers per rank (item count, number of passes,
   samples, flags), started as the window starts; under DDP, from the second
   window on, it travels while the passes compute and is waited for just before
   this rank's last pass (see ``truebatch.window.Window.passes``), else before
   the first;
2. the gradient synchronization of the wrapper: once, on the last pass, when
   gradients are synchronized per window (DDP's default), or on every pass
   (FSDP2's default); under HSDP by default a reduce-scatter within the
   replica every pass and the all-reduce across replicas on the last
   (``"hybrid"``); every rank runs the same number of passes;
3. one ``all_reduce`` of the loss sum (and of the counts ``loss_fn`` returned),
   started just before the window's last backward and waited for after it, so
   that it travels while the backward computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

SyncMode = Literal["window", "micro_batch", "hybrid"]

__all__ = [
    "DataParallelRanks",
    "GradientSync",
    "SyncMode",
    "data_parallel_ranks",
    "gather_rows",
    "rank",
    "world_size",
]


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


@dataclass(frozen=True)
class DataParallelRanks:
    """The ranks that hold different items of a window and average their gradients.

    Attributes:
        group: their process group (``None``: the default group).
        size: how many they are: the factor by which the wrapper divides the
            summed gradient, the ``world_size`` of ``weight = world_size / N``.
        rank: this process's rank among them.
        hybrid: FSDP2 on a 2-D (replicate, shard) mesh (HSDP), which
            reduce-scatters within a replica and all-reduces across replicas.
    """

    group: dist.ProcessGroup | None
    size: int
    rank: int
    hybrid: bool = False


LOCAL = DataParallelRanks(group=None, size=1, rank=0)


def data_parallel_ranks(model: nn.Module, *, mesh: Any = None) -> DataParallelRanks:
    """The data-parallel ranks of ``model``: DDP's process group, or FSDP2's mesh.

    Args:
        model: the model the Accumulator trains.
        mesh: the ``DeviceMesh`` given to ``fully_shard`` (1-D, or 2-D for
            HSDP), checked against FSDP2's record of it; ``None`` reads that
            record (or, where torch keeps it elsewhere, the parameters' mesh
            when it can only be FSDP2's: one 1-D mesh, or one 2-D mesh on
            which every parameter is (Replicate, Shard), i.e. HSDP).

    Returns:
        :data:`LOCAL` (one rank) for a model that is neither DDP nor FSDP2.

    Raises:
        ValueError: ``mesh`` for a model that is not FSDP2, a mesh of more than
            2 dimensions, a mesh other than the one given to ``fully_shard``,
            or (``mesh=None``) modules sharded on different meshes.
    """
    kind = _kind(model)
    if mesh is not None and kind != "fsdp2":
        raise ValueError(
            f"`data_parallel` got a device mesh for a {kind} model; expected an FSDP2 model "
            "(DDP averages over its process_group). Fix: pass data_parallel=None."
        )
    if kind == "local":
        return LOCAL
    if kind == "ddp":
        group = model.process_group
        return DataParallelRanks(group, dist.get_world_size(group), dist.get_rank(group))
    mesh = _fsdp2_mesh(model, _check_mesh(mesh) if mesh is not None else None)
    if mesh.ndim == 1:
        group = mesh.get_group()
    elif mesh.size() == dist.get_world_size():
        group = None  # the default group holds the same ranks: no new group needed
    else:
        # One group over both dimensions, for one count exchange per window; torch
        # offers no public way to flatten a mesh, and torchtitan uses this one.
        group = mesh._flatten().get_group()
    return DataParallelRanks(
        group, dist.get_world_size(group), dist.get_rank(group), hybrid=mesh.ndim == 2
    )


def _check_mesh(mesh: Any) -> Any:
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh) or mesh.ndim > 2:
        got = f"a {mesh.ndim}-D mesh" if isinstance(mesh, DeviceMesh) else type(mesh).__name__
        raise ValueError(
            f"`data_parallel` got {got}; expected the 1-D or 2-D DeviceMesh given to "
            "fully_shard. Fix: pass data_parallel=mesh['dp'] (or mesh['replicate', 'shard'])."
        )
    return mesh


def _fsdp2_mesh(model: nn.Module, given: Any) -> Any:
    """The mesh given to ``fully_shard``: FSDP2's own record of it, checked against
    ``given``; else ``given``; else the parameters' mesh when it can only be FSDP2's."""
    own = _fully_shard_meshes(model)
    if given is not None:
        if own is not None and own != {given}:
            raise ValueError(
                f"`data_parallel` got the mesh {_names(given)}; expected the mesh given to "
                f"fully_shard, {', '.join(sorted(map(_names, own)))}. Fix: pass that mesh."
            )
        return given
    if own is not None and len(own) == 1:
        return next(iter(own))
    params = [p for p in model.parameters() if hasattr(p, "device_mesh")]
    meshes = {p.device_mesh for p in params}
    if own is None and len(meshes) == 1:
        (mesh,) = meshes
        hsdp = mesh.ndim == 2 and all(
            p.placements[0].is_replicate() and p.placements[1].is_shard() for p in params
        )
        if mesh.ndim == 1 or hsdp:
            return mesh
    found = ", ".join(sorted(map(_names, own if own is not None else meshes)))
    raise ValueError(
        f"`model` got FSDP2 modules on device mesh(es) {found}; expected one mesh given to "
        "fully_shard: which ranks hold different items is ambiguous. Fix: pass "
        "data_parallel=mesh['dp'], the mesh whose ranks hold different items."
    )


def _fully_shard_meshes(model: nn.Module) -> set[Any] | None:
    """The meshes FSDP2 records for the modules it shards; ``None`` when this torch
    keeps them elsewhere. FSDP2 has no public accessor: the record is private (torch
    2.4 to 2.13 keep it here), hence the fallbacks of :func:`_fsdp2_mesh`."""
    fsdp2 = _fsdp2_module_type()
    meshes = set()
    try:
        for module in model.modules():
            if isinstance(module, fsdp2):
                group = module._get_fsdp_state()._fsdp_param_group
                if group is not None:
                    meshes.add(group.mesh_info.mesh)
    except AttributeError:
        return None
    return meshes or None


def _names(mesh: Any) -> str:
    return str(mesh.mesh_dim_names or f"{mesh.ndim}-D")


def gather_rows(
    row: Sequence[float], ranks: DataParallelRanks, device: torch.device | None
) -> Callable[[], list[list[float]]]:
    """Start gathering every data-parallel rank's ``row``; returns the wait.

    The window's one count exchange: calling the returned function waits for
    the rows and returns them in rank order, as Python numbers (no tensor at
    all for one rank). ``device`` is where the collective runs (NCCL: the GPU).
    """
    if ranks == LOCAL:
        rows = [list(row)]
        return lambda: rows
    local = torch.tensor([list(row)], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(ranks.size)]
    work = dist.all_gather(gathered, local, group=ranks.group, async_op=True)

    def wait() -> list[list[float]]:
        work.wait()
        return torch.cat(gathered).tolist()

    return wait


class GradientSync:
    """How (and how often) a model's gradients are synchronized across ranks.

    Args:
        model: the model the Accumulator trains.
        mode: ``"window"`` synchronizes once per window, on its last pass
            (``no_sync`` / ``set_requires_gradient_sync(False)`` before);
            ``"micro_batch"`` synchronizes every pass; ``"hybrid"`` (HSDP
            only) reduce-scatters within each replica every pass and
            all-reduces across replicas once per window
            (``set_requires_all_reduce(False)`` before the last pass).
            ``None`` picks the wrapper's sensible default: ``"window"`` for
            DDP (no extra memory), ``"hybrid"`` for HSDP (no extra memory
            either: the sharded gradient waits for its all-reduce),
            ``"micro_batch"`` for FSDP2 (deferring its reduce-scatter keeps a
            full unsharded gradient per rank).
        mesh: FSDP2's data-parallel mesh (see :func:`data_parallel_ranks`).

    Attributes:
        kind: ``"ddp"``, ``"fsdp2"`` or ``"local"``.
        ranks: the data-parallel ranks (:class:`DataParallelRanks`).
        world_size, rank: size of, and this process's rank in, the group
            that averages the gradients (1 and 0 for a local model).
        module: the module the wrapper runs after its own pre-forward work
            (``model.module`` for DDP, whose forward first broadcasts buffers).

    Raises:
        ValueError: an unknown ``mode``, ``"hybrid"`` for a model that is not
            HSDP, or a ``mesh`` :func:`data_parallel_ranks` refuses.
    """

    def __init__(self, model: nn.Module, mode: SyncMode | None = None, *, mesh: Any = None) -> None:
        if mode not in (None, "window", "micro_batch", "hybrid"):
            raise ValueError(
                f"`gradient_sync` got {mode!r}; expected 'window', 'micro_batch', 'hybrid' or "
                "None. Fix: pass None for the wrapper's default."
            )
        self.kind = _kind(model)
        self.model = model
        self.ranks = data_parallel_ranks(model, mesh=mesh)
        if mode == "hybrid" and not self.ranks.hybrid:
            raise ValueError(
                f"`gradient_sync` got 'hybrid' for a {self.kind} model; expected an FSDP2 model "
                "on a 2-D (replicate, shard) mesh (HSDP). Fix: pass 'window' or 'micro_batch'."
            )
        self.group = self.ranks.group
        self.world_size = self.ranks.size
        self.rank = self.ranks.rank
        default = "hybrid" if self.ranks.hybrid else "micro_batch"
        self.mode: SyncMode = mode or (default if self.kind == "fsdp2" else "window")
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
        return gather_rows(row, self.ranks, self._device() if self.distributed else None)

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
        ``set_requires_gradient_sync(False)``, HSDP's
        ``set_requires_all_reduce(False)`` in ``"hybrid"`` mode) is entered or left only when
        this changes, so a run of passes that do not synchronize enters it
        once. Call inside :meth:`window`, which leaves it.
        """
        if synchronize == self._synchronizing or self.kind == "local":
            return
        self._synchronizing = synchronize
        if self.mode == "hybrid":
            self.model.set_requires_all_reduce(synchronize)
        elif self.kind == "fsdp2":
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
