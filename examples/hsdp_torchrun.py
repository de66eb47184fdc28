"""Exact gradient accumulation under HSDP (FSDP2 on a 2-D replicate x shard mesh), torchrun.

    torchrun --standalone --nproc-per-node 4 examples/hsdp_torchrun.py

On two machines (or two "nodes" on one, as the tests do), replicate across the
nodes and shard within each:

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id digits examples/hsdp_torchrun.py --shard 2

Every rank reads its own shard of scikit-learn's bundled digits: all ranks are
data-parallel, and N is counted over all of them. truebatch detects HSDP and
synchronizes in ``"hybrid"`` mode: every micro-batch reduce-scatters its
gradient within the replica (each rank keeps its shard only), and the
all-reduce across the replicas runs once per window, on its last pass.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import truebatch as tb


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shard", type=int, default=2, help="ranks per replica (shard group)")
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per window")
    parser.add_argument("--lr", type=float, default=0.5)
    return parser.parse_args()


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The SUM of the per-sample losses; truebatch divides by the global sample count."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(
        "cuda" if cuda else "cpu",
        (world_size // args.shard, args.shard),
        mesh_dim_names=("replicate", "shard"),
    )

    digits = load_digits()
    dataset = TensorDataset(
        torch.tensor(digits.data, dtype=torch.float32) / 16.0,
        torch.tensor(digits.target, dtype=torch.long),
    )
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)  # every rank its own data
    loader = DataLoader(dataset, batch_size=args.micro_batch_size, sampler=sampler)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    accumulator = tb.Accumulator(model, optimizer)  # HSDP detected: gradient_sync="hybrid"

    if rank == 0:
        print(f"{world_size} ranks, HSDP mesh {tuple(mesh.shape)}, sync {accumulator.sync.mode}")
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        micro_batches = ((x.to(device), y.to(device)) for x, y in loader)
        for window in tb.windows(micro_batches, args.accumulate):
            result = accumulator.step_window(window, loss_fn)
            if rank == 0:
                print(
                    f"epoch {epoch} window {result.step:3d} loss {result.loss:.4f} "
                    f"samples {result.count} grad_norm {result.grad_norm:.3f}"
                )
    with torch.no_grad():
        x, y = (t.to(device) for t in dataset.tensors)
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    if rank == 0:
        print(f"training accuracy {accuracy:.3f}")
    del accumulator, model  # release the process group before destroying it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
