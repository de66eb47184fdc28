"""Exact token-level accumulation with context parallelism (a dp x cp mesh), torchrun.

    torchrun --standalone --nproc-per-node 4 examples/context_parallel_torchrun.py

Each sequence is split across the 2 ``cp`` ranks of its ``dp`` rank: rank c
holds positions ``c * L / 2 .. (c + 1) * L / 2``. ``tb.split_sequences`` shifts
the labels over the whole sequence *before* the cut (the label of the last
position of the first half is the first token of the second half), so
``tb.count_tokens(shift=False)`` counts every scored token exactly once, and
the sum over dp x cp ranks is the big batch's N. Attention all-gathers the
keys and values over ``cp`` (with their gradients summed back in the
backward); DDP averages the gradients over all dp x cp ranks.

torch's ``context_parallel`` (ring attention on ``scaled_dot_product_attention``)
has no CPU kernel in torch 2.13, so this example gathers keys and values by
hand; with torch's API on GPUs the data, the count and truebatch's part stay
the same. The data is synthetic: arithmetic sequences of tokens (random
start, step and length), padded to ``--length``.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import truebatch as tb

VOCAB = 17  # token 0 pads; 1..16 are values


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks")
    parser.add_argument("--length", type=int, default=16, help="padded sequence length")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per window")
    parser.add_argument("--lr", type=float, default=0.005)
    return parser.parse_args()


class GatherSequence(torch.autograd.Function):
    """All cp ranks' parts of a ``(B, L / cp, D)`` tensor, concatenated along L; the
    backward sums the gradient over the ranks and keeps this rank's part."""

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
    """Token and position embeddings, one causal attention layer, an MLP, the logits."""

    def __init__(self, length: int, group: dist.ProcessGroup, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Embedding(length, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.out = nn.Linear(width, VOCAB)
        self.group = group

    def forward(self, input_ids: torch.Tensor, first_position: int) -> torch.Tensor:
        positions = torch.arange(first_position, first_position + input_ids.shape[1])
        h = self.embed(input_ids) + self.position(positions.to(input_ids.device))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        k, v = GatherSequence.apply(k, self.group), GatherSequence.apply(v, self.group)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        causal = torch.arange(k.shape[1])[None, :] <= positions[:, None]
        h = h + scores.masked_fill(~causal.to(h.device), float("-inf")).softmax(-1) @ v
        return self.out(h + self.mlp(h))


def sequences(count: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``count`` arithmetic sequences mod 16 of random lengths, right-padded to ``length``."""
    ids = torch.zeros(count, length, dtype=torch.long)
    labels = torch.full((count, length), -100)
    for row in range(count):
        n = int(torch.randint(4, length + 1, (1,), generator=generator))
        start, step = torch.randint(0, 16, (2,), generator=generator).tolist()
        values = (start + step * torch.arange(n)) % 16 + 1
        ids[row, :n] = values
        labels[row, :n] = values
    return {"input_ids": ids, "labels": labels}


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(
        "cuda" if cuda else "cpu", (world_size // args.cp, args.cp), mesh_dim_names=("dp", "cp")
    )
    dp_rank, cp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("cp")
    first_position = cp_rank * args.length // args.cp

    torch.manual_seed(0)
    model = AttentionLM(args.length, mesh.get_group("cp")).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)  # averages over all dp x cp ranks
    optimizer = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    accumulator = tb.Accumulator(ddp, optimizer)

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input_ids"], first_position)
        return F.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum"
        )

    # The cp ranks of one dp rank draw the same sequences: one generator per dp rank.
    generator = torch.Generator().manual_seed(dp_rank)
    if rank == 0:
        print(f"{world_size} ranks, mesh (dp, cp) = {tuple(mesh.shape)}")
    for _ in range(args.windows):
        window = [
            sequences(args.micro_batch_size, args.length, generator) for _ in range(args.accumulate)
        ]
        parts = [tb.split_sequences(batch, rank=cp_rank, ranks=args.cp) for batch in window]
        parts = [{key: t.to(device) for key, t in part.items()} for part in parts]
        result = accumulator.step_window(parts, loss_fn, count=tb.count_tokens(shift=False))
        if rank == 0 and (result.step % 5 == 0 or result.step == 1):
            print(f"window {result.step:3d} loss {result.loss:.4f} tokens {result.count}")
    del accumulator, ddp, model  # release the process group before destroying it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
