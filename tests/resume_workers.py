"""The training runs ``test_resume.py`` kills and resumes, each in its own process.

    python tests/resume_workers.py single CHECKPOINT OUT [--kill-window K | --kill-in-save K]
    torchrun --nproc-per-node 2 --max-restarts 1 tests/resume_workers.py ddp|fsdp2 CHECKPOINT OUT \
        [--kill-window K]

Every run trains ``EPOCHS`` epochs of windows of ``SIZE`` micro-batches over a
shuffled loader of :class:`NoisyData` (whose items draw noise from Python's
and NumPy's generators when read) with a dropout MLP, AdamW, a schedule and
clipping, and saves a checkpoint after every window. If CHECKPOINT exists the
run starts from it. ``--kill-window K`` sends SIGKILL to the process (to rank
1 on torchrun's first attempt) in the second micro-batch of window K (0-based,
counted over the whole run); ``--kill-in-save K`` sends it during the save
after window K, after the temporary file is written, before it replaces the
checkpoint. A run that finishes writes its parameters to OUT, and every run
appends the window it started at to ``OUT.starts``.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import truebatch as tb
from dist_workers import COLLECTIVE_TIMEOUT

EPOCHS = 2
SIZE = 3
MICRO_BATCH = 4
SAMPLES = 52  # one process: 13 micro-batches an epoch, windows of 3, 3, 3, 3, 1
FEATURES = 5
WINDOWS_SINGLE = EPOCHS * 5


class NoisyData(Dataset):
    """Fixed inputs and targets plus noise drawn at read time from ``random`` and NumPy."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(7)
        self.x = torch.randn(SAMPLES, FEATURES, generator=generator, dtype=torch.float64)
        self.y = torch.randn(SAMPLES, 1, generator=generator, dtype=torch.float64)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = 0.1 * random.gauss(0.0, 1.0) + 0.1 * float(np.random.standard_normal())
        return self.x[index] + noise, self.y[index]


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, 16), nn.Tanh(), nn.Dropout(0.25), nn.Linear(16, 1)
    ).double()


def build(mode: str) -> tuple[tb.Accumulator, tb.Windows[Any]]:
    """The run's Accumulator and windows, built the same way in every process."""
    model = build_model()
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[3]):
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=WINDOWS_SINGLE)
    accumulator = tb.Accumulator(model, optimizer, scheduler, micro_batch_size=2, max_grad_norm=1.0)
    data = NoisyData()
    if mode == "single":
        loader = DataLoader(data, batch_size=MICRO_BATCH, shuffle=True)
    else:
        sampler = DistributedSampler(data, shuffle=True, seed=3)
        loader = DataLoader(data, batch_size=MICRO_BATCH, sampler=sampler)
    return accumulator, tb.windows(loader, SIZE)


def loss_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).sum()


def train(mode: str, checkpoint: Path, out: Path, kill_window: int, kill_in_save: int) -> None:
    torch.set_num_threads(1)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    if mode != "single":
        init_process_group()
    rank = dist.get_rank() if mode != "single" else 0
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    accumulator, windows = build(mode)
    if checkpoint.exists():
        tb.load_checkpoint(checkpoint, accumulator, windows=windows)
    done = accumulator.state_dict()["window"]
    if rank == 0:
        with open(f"{out}.starts", "a") as log:
            log.write(f"{done}\n")

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal passes
        passes += 1
        if done == kill_window and passes == 2 and rank == (mode != "single") and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss_sum(model, batch)

    passes = 0
    for _ in range(windows.epoch, EPOCHS):
        for window in windows:
            passes = 0
            accumulator.step_window(window, loss_fn)
            if done == kill_in_save:
                os.replace = _killed  # type: ignore[assignment]
            tb.save_checkpoint(checkpoint, accumulator, windows=windows)
            done += 1
    params = [full(p) for p in accumulator.model.parameters()]
    if rank == 0:
        torch.save({"params": params, "windows": done}, out)
    if mode != "single":
        dist.destroy_process_group()


def init_process_group() -> None:
    """gloo under torchrun, with the store's keys scoped to this attempt.

    torchrun's restarted workers share the agent's store with the killed ones;
    the default group of a restarted FSDP2 run can read the dead workers'
    addresses and time out connecting, unless each attempt has its own prefix.
    """
    timeout = COLLECTIVE_TIMEOUT
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, False, timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"attempt-{attempt}", store)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)


def _killed(*_: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def full(parameter: torch.Tensor) -> torch.Tensor:
    value = parameter.detach()
    return value.full_tensor() if hasattr(value, "full_tensor") else value.clone()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "ddp", "fsdp2"])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-window", type=int, default=-1)
    parser.add_argument("--kill-in-save", type=int, default=-1)
    args = parser.parse_args(argv)
    train(args.mode, args.checkpoint, args.out, args.kill_window, args.kill_in_save)


if __name__ == "__main__":
    main(sys.argv[1:])
