"""A training run that survives being killed: it resumes from its last checkpoint, exactly.

    python examples/resumable.py --checkpoint run/last.pt
    torchrun --standalone --nproc-per-node 2 --max-restarts 3 examples/resumable.py \\
        --checkpoint run/last.pt

Kill it at any time (``kill -9``, a preemption, ``--crash-after N`` to try)
and start it again with the same command (torchrun restarts it by itself):
it loads ``--checkpoint``, goes on from the window after the last one saved,
and ends with bitwise the parameters of a run that was never interrupted.
Under torchrun each rank trains on its share (``DistributedSampler``) of a
DDP model. The last line printed is the SHA-256 of the final parameters' bytes.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import truebatch as tb


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per window")
    parser.add_argument("--crash-after", type=int, default=None, help="SIGKILL after N windows")
    return parser.parse_args()


def init_process_group() -> None:
    """Under torchrun: one process group per attempt (restarted workers must not read the
    killed ones' addresses from torchrun's store)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=datetime.timedelta(minutes=5),
    )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    store = dist.PrefixStore(f"attempt-{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The SUM of the per-sample losses; truebatch divides by the window's sample count."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def main() -> None:
    args = parse_args()
    distributed = "RANK" in os.environ
    if distributed:
        init_process_group()
    rank = dist.get_rank() if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 20, generator=generator)
    data = TensorDataset(x, (x[:, :5].sum(1) > 0).long() + (x[:, 5] > 1).long())
    sampler = DistributedSampler(data, seed=0) if distributed else None
    loader = DataLoader(
        data, batch_size=args.micro_batch_size, shuffle=sampler is None, sampler=sampler
    )
    windows = tb.windows(loader, args.accumulate)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 3))
    model = model.to(device)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = args.epochs * tb.windows_per_epoch(len(loader), args.accumulate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    acc = tb.Accumulator(model, optimizer, scheduler, max_grad_norm=1.0)

    if args.checkpoint.exists():
        tb.load_checkpoint(args.checkpoint, acc, windows=windows)
        if rank == 0:
            print(f"resumed after window {acc.state_dict()['window']} (epoch {windows.epoch})")
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    for epoch in range(windows.epoch, args.epochs):
        for window in windows:
            micro_batches = [(x.to(device), y.to(device)) for x, y in window]
            result = acc.step_window(micro_batches, loss_fn)
            tb.save_checkpoint(args.checkpoint, acc, windows=windows)
            if rank == 0:
                print(f"epoch {epoch} window {result.step:3d} loss {result.loss:.4f}")
            if result.step == args.crash_after:
                os.kill(os.getpid(), signal.SIGKILL)

    fingerprint = hashlib.sha256()
    for parameter in model.parameters():
        fingerprint.update(parameter.detach().cpu().numpy().tobytes())
    if rank == 0:
        print(f"parameters sha256 {fingerprint.hexdigest()}")
    if distributed:
        # Free DDP (held by the Accumulator) before the group: see examples/ddp_torchrun.py.
        del acc, model
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
