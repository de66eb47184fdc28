"""What the 4 gloo processes spawned by ``test_mesh.py`` run: 2-D device meshes.

Three layouts of 4 ranks, each a (2, 2) mesh, and plain DDP (``"ddp"``, for the
two-node run of ``nodes_worker.py``):

- ``"hsdp"``: ``fully_shard`` on a (replicate, shard) mesh; every rank holds
  its own data (4 data-parallel ranks).
- ``"tp"``: tensor parallelism on the ``tp`` dimension (``parallelize_module``,
  column- then row-wise) and ``fully_shard`` on ``dp``; the two ranks of a
  ``tp`` pair hold the same data (2 data-parallel ranks). The head is not
  tensor-parallel, so the parameters live on two meshes (the clip must
  combine both).
- ``"cp"``: context parallelism by hand (torch's ``context_parallel`` has no
  CPU attention kernel: ``aten._scaled_dot_product_flash_attention_for_cpu``
  has no sharding strategy in torch 2.13): each ``cp`` rank holds one half of
  every sequence (:func:`truebatch.split_sequences`) and attention all-gathers
  the keys and values over ``cp`` (the collective of torch's all-gather
  context parallelism); DDP averages over all 4 ranks (dp x cp), or FSDP2 on
  the flattened dp x cp mesh (torchtitan's ``dp_shard_cp``).

Each rank saves, per scenario and window, the ``StepResult``, the full
parameters and the collectives the window called.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import truebatch as tb
from dist_workers import build_optimizer, collective_calls
from models import (
    CLASSES,
    FEATURES,
    IGNORE_INDEX,
    VOCAB,
    collate_tokens,
    seeded,
    token_sequences,
    vector_batch,
)

WORLD_SIZE = 4
WINDOWS = 3
SEQUENCE_LENGTH = 12  # padded length of every token sequence: a multiple of the 2 cp ranks
COUNTED = ("reduce_scatter_single", "all_reduce", "all_gather")

# Pieces (samples per step_window element) of each data-parallel rank in each window:
# different numbers of micro-batches, and a rank without data in the last window.
LAYOUT: tuple[tuple[tuple[int, ...], ...], ...] = (
    ((4, 3), (5,), (2, 2, 3)),
    ((3,), (1, 6), ()),
    ((2,), (3,), (4,)),
    ((5, 1), (2,), (1,)),
)


@dataclass(frozen=True)
class MeshScenario:
    """One run of ``WINDOWS`` windows on a (2, 2) mesh.

    Attributes:
        layout: ``"hsdp"``, ``"tp"``, ``"cp"`` or ``"ddp"``.
        gradient_sync: passed to the Accumulator.
        max_grad_norm: passed to the Accumulator.
        wrapper: for ``"cp"``, ``"ddp"`` or ``"fsdp2"`` (on the flattened mesh).
    """

    layout: str
    gradient_sync: str | None = None
    max_grad_norm: float | None = None
    wrapper: str = "ddp"

    @property
    def data_ranks(self) -> int:
        """Ranks that hold different samples."""
        return 2 if self.layout in ("tp", "cp") else 4


def data_rank(scenario: MeshScenario, rank: int) -> int:
    """Which data-parallel rank's samples ``rank`` holds (ranks are row-major in the mesh)."""
    return rank // 2 if scenario.layout in ("tp", "cp") else rank


def rank_data(scenario: MeshScenario, data: int) -> list[list[Any]]:
    """The whole samples of data-parallel rank ``data``, per window (before any cp split)."""
    windows = []
    for window, sizes in enumerate(LAYOUT[data]):
        seeds = [1000 * window + 100 * data + piece for piece in range(len(sizes))]
        if scenario.layout == "cp":
            windows.append(
                [
                    collate_tokens(token_sequences(n, seed), SEQUENCE_LENGTH)
                    for n, seed in zip(sizes, seeds, strict=True)
                ]
            )
        else:
            windows.append([vector_batch(n, seed) for n, seed in zip(sizes, seeds, strict=True)])
    return windows


def mlp() -> nn.Module:
    return seeded(
        lambda: nn.Sequential(
            nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, CLASSES)
        )
    )


class GatherSequence(torch.autograd.Function):
    """Every cp rank's part of a ``(B, L / R, D)`` tensor, concatenated along L.

    The backward is the adjoint: the gradient summed over the ranks (each
    rank's queries attend to every part), this rank's part kept.
    """

    @staticmethod
    def forward(ctx: Any, part: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.length = group, dist.get_rank(group), part.shape[1]
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, part.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(1, ctx.rank * ctx.length, ctx.length), None


class AttentionLM(nn.Module):
    """Embedding (token + position) -> one causal attention head -> vocabulary logits.

    With ``group`` set, the input is one context-parallel part of each sequence,
    starting at position ``first_position``; keys and values are gathered over
    ``group``.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Embedding(SEQUENCE_LENGTH, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, VOCAB)
        self.group: dist.ProcessGroup | None = None

    def forward(self, input_ids: torch.Tensor, first_position: int = 0) -> torch.Tensor:
        positions = torch.arange(first_position, first_position + input_ids.shape[1])
        h = self.embed(input_ids) + self.position(positions)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        if self.group is not None:
            k, v = GatherSequence.apply(k, self.group), GatherSequence.apply(v, self.group)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        causal = torch.arange(k.shape[1])[None, :] <= positions[:, None]
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.out(h + attention @ v)


def build_model(scenario: MeshScenario) -> nn.Module:
    """The unwrapped float64 model; identical on every rank and in the test process."""
    return seeded(AttentionLM) if scenario.layout == "cp" else mlp()


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], first: int) -> torch.Tensor:
    """Cross-entropy SUM over the labels of ``batch``, which are already shifted."""
    logits = model(batch["input_ids"], first)
    return F.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def run(scenario: MeshScenario, rank: int) -> dict[str, list]:
    """``WINDOWS`` windows of ``scenario`` on this rank; what the test compares."""
    model = build_model(scenario)
    cp_rank = 0
    if scenario.layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif scenario.layout == "tp":
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        fully_shard(model[4], mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])  # the Accumulator finds mesh["dp"] there
    elif scenario.layout == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
        model.group = mesh.get_group("cp")
        cp_rank = mesh.get_local_rank("cp")
        if scenario.wrapper == "fsdp2":
            # One 1-D mesh over dp x cp, as torchtitan shards: FSDP2 averages over all 4.
            fully_shard(model, mesh=mesh["dp", "cp"]._flatten("dp_cp"))
        else:
            model = nn.parallel.DistributedDataParallel(model)  # averages over dp x cp
    accumulator = tb.Accumulator(
        model,
        build_optimizer(model.parameters()),
        micro_batch_size=2,
        max_grad_norm=scenario.max_grad_norm,
        gradient_sync=scenario.gradient_sync,
    )
    if scenario.layout == "cp":
        first = cp_rank * SEQUENCE_LENGTH // 2
        count = tb.count_tokens(shift=False)

        def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
            return lm_loss_sum(model, batch, first)

    else:
        count = tb.count_samples

        def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    record: dict[str, list] = {"results": [], "params": [], "collectives": []}
    for pieces in rank_data(scenario, data_rank(scenario, rank)):
        if scenario.layout == "cp":
            pieces = [tb.split_sequences(p, rank=cp_rank, ranks=2) for p in pieces]
        before = collective_calls()
        result = accumulator.step_window(pieces, loss_fn, count=count)
        after = collective_calls()
        record["results"].append(asdict(result))
        record["collectives"].append({name: after[name] - before[name] for name in COUNTED})
        record["params"].append([_full(p) for p in model.parameters()])
    return record


def _full(parameter: torch.Tensor) -> torch.Tensor:
    value = parameter.detach()
    return value.full_tensor() if hasattr(value, "full_tensor") else value.clone()
