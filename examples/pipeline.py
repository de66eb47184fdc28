"""Exact gradient accumulation in a pipeline-parallel model, started by torchrun.

    torchrun --standalone --nproc-per-node 2 examples/pipeline.py   # one 2-stage pipeline
    torchrun --standalone --nproc-per-node 4 examples/pipeline.py   # 2 replicas of it (DP2 x PP2)

A small next-token model is cut into two stages (``torch.distributed.pipelining``,
one process per stage); with 4 processes two replicas of the pipeline train on
different data. Every schedule run (``--micro-batches`` micro-batches, GPipe or
1F1B) is one window: ``tb.PipelineAccumulator`` counts the scored tokens of all
micro-batches and replicas before the run, so the step is that of one process
on the concatenated batch, however many tokens each micro-batch holds.
Sequences have random lengths, padded to ``--length`` (a schedule keeps the
activation shapes of its first run) with ignored targets.

Runs on CPUs (gloo) and GPUs (NCCL, one GPU per process, by ``LOCAL_RANK``).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

import truebatch as tb

VOCAB, IGNORE = 32, -100


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--rows", type=int, default=16, help="sequences per replica and window")
    parser.add_argument("--length", type=int, default=24, help="padded sequence length")
    parser.add_argument("--schedule", choices=["gpipe", "1f1b"], default="1f1b")
    parser.add_argument("--lr", type=float, default=0.05)
    return parser.parse_args()


def batch(rows: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting sequences (each token is the previous one + 1, mod VOCAB) of random
    lengths; ``target`` is the next token, ignored past each sequence's end."""
    start = torch.randint(0, VOCAB, (rows, 1), generator=generator)
    ids = (start + torch.arange(length)) % VOCAB
    lengths = torch.randint(2, length + 1, (rows, 1), generator=generator)
    target = torch.full_like(ids, IGNORE)
    target[:, :-1] = ids[:, 1:]
    target[torch.arange(length) >= lengths - 1] = IGNORE
    return ids, target


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The SUM of the token losses; truebatch divides by the tokens of the whole window."""
    return F.cross_entropy(
        logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    world_size = dist.get_world_size()
    if world_size % 2:
        raise SystemExit(f"--nproc-per-node got {world_size}; expected 2 or 4 (2 stages).")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    mesh = init_device_mesh(
        "cuda" if cuda else "cpu", (world_size // 2, 2), mesh_dim_names=("dp", "pp")
    )
    stage_index, replica = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    replicas = mesh.size(0)

    torch.manual_seed(0)  # the same initial weights in every replica
    model = nn.Sequential(
        nn.Embedding(VOCAB, 64), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, VOCAB)
    )
    module = (model[:3] if stage_index == 0 else model[3:]).to(device)
    stage = PipelineStage(module, stage_index, 2, torch.device(device), group=mesh.get_group("pp"))
    schedule_type = Schedule1F1B if args.schedule == "1f1b" else ScheduleGPipe
    schedule = schedule_type(stage, n_microbatches=args.micro_batches, loss_fn=loss_fn)
    accumulator = tb.PipelineAccumulator(
        schedule,
        torch.optim.AdamW(module.parameters(), lr=args.lr),
        max_grad_norm=1.0,
        data_parallel_group=mesh.get_group("dp") if replicas > 1 else None,
    )

    generator = torch.Generator().manual_seed(replica)  # each replica its own data
    count = tb.count_tokens("target", shift=False)  # the scored (not ignored) targets
    if dist.get_rank() == 0:
        print(
            f"{replicas} replica(s) x 2 stages, {args.schedule}, {args.micro_batches} micro-batches"
        )
    for _ in range(args.windows):
        ids, target = (t.to(device) for t in batch(args.rows, args.length, generator))
        result = accumulator.step(
            *((ids,) if stage.is_first else ()),
            target=target if stage.is_last else None,
            count=count,
        )
        if dist.get_rank() == 0:  # the result is the whole window's on every rank
            print(
                f"window {result.step:3d} loss {result.loss:.4f} tokens {result.count} "
                f"grad_norm {result.grad_norm:.3f}"
            )
    # Release what holds the process groups before destroying them (see ddp_torchrun.py).
    del accumulator, schedule, stage
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
