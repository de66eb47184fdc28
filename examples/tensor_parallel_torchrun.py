"""Exact gradient accumulation with FSDP2 + tensor parallelism (a dp x tp mesh), torchrun.

    torchrun --standalone --nproc-per-node 4 examples/tensor_parallel_torchrun.py

The two ranks of a ``tp`` pair split every layer's weights (column- then
row-wise, ``parallelize_module``) and see the *same* micro-batches; the ``dp``
ranks read different shards of scikit-learn's bundled digits. N is counted
over the ``dp`` ranks only, which truebatch learns from
``data_parallel=mesh["dp"]``: the mesh given to ``fully_shard``. Counting over
all 4 ranks would double N and halve every gradient.
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
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import truebatch as tb


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks")
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
        "cuda" if cuda else "cpu", (world_size // args.tp, args.tp), mesh_dim_names=("dp", "tp")
    )

    digits = load_digits()
    dataset = TensorDataset(
        torch.tensor(digits.data, dtype=torch.float32) / 16.0,
        torch.tensor(digits.target, dtype=torch.long),
    )
    # One shard per dp rank: both ranks of a tp pair read the same one.
    sampler = DistributedSampler(
        dataset, num_replicas=mesh["dp"].size(), rank=mesh.get_local_rank("dp"), seed=0
    )
    loader = DataLoader(dataset, batch_size=args.micro_batch_size, sampler=sampler)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    accumulator = tb.Accumulator(model, optimizer, data_parallel=mesh["dp"])

    if rank == 0:
        print(f"{world_size} ranks, mesh (dp, tp) = {tuple(mesh.shape)}")
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
