"""Exact gradient accumulation under DistributedDataParallel, started by torchrun.

    torchrun --standalone --nproc-per-node 2 examples/ddp_torchrun.py

Runs unchanged on CPUs (gloo) and on GPUs (NCCL, one GPU per process, chosen
by ``LOCAL_RANK``). Each rank reads its shard of scikit-learn's bundled digits
through a ``DistributedSampler`` in micro-batches of ``--micro-batch-size``;
``tb.windows`` groups ``--accumulate`` of them into one window, and one window
of every rank together is one effective batch of
``world_size * accumulate * micro_batch_size`` samples and one optimizer step.

Per window truebatch makes one small all_gather of item counts before the
first backward, lets DDP all-reduce the gradients once (on the last pass, the
others run under ``no_sync``), and one all_reduce of the loss, so the update
is that of one process on the whole effective batch: ``loss`` printed on rank 0
is the mean over all ranks' samples of the window.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import truebatch as tb


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
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
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    digits = load_digits()
    dataset = TensorDataset(
        torch.tensor(digits.data, dtype=torch.float32) / 16.0,
        torch.tensor(digits.target, dtype=torch.long),
    )
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.micro_batch_size, sampler=sampler)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    accumulator = tb.Accumulator(ddp, optimizer)

    if rank == 0:
        effective = world_size * args.accumulate * args.micro_batch_size
        print(f"{world_size} ranks ({dist.get_backend()}), effective batch {effective} samples")
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
    # Release what holds the process group (DDP, and the Accumulator holding DDP) while it
    # is still registered, so that destroy_process_group frees it. Freed later, at
    # interpreter exit, gloo's destructor can deadlock on the GIL (torch 2.13): one rank
    # then never exits.
    del accumulator, ddp
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
