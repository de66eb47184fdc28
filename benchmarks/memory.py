"""Peak memory of a truebatch window against plain training, on CPU.

Four ways to train the same small CNN (its activations dominate its memory:
about 0.25 MiB per sample against 9 KiB of parameters) on one batch of B
samples:

- ``truebatch``: one ``tb.Accumulator(micro_batch_size=m)`` window over B;
- ``plain_micro``: plain training at batch m (B / m ordinary steps);
- ``plain_accumulation``: the usual hand-written accumulation loop at m;
- ``plain_full``: one ordinary step on the whole batch B.

How the peak is measured, and why it is robust: each configuration runs in a
fresh Python process that builds the model, optimizer and batch, then runs its
training once as a warm-up (so every kernel, oneDNN primitive, thread pool and
code page that training touches is already resident), resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``, Linux), reads the current RSS as
the baseline, trains again and reads the peak (``VmHWM``). The difference is
what the training itself needs at its peak: activations, autograd graph and
gradients. ``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc give every tensor over
64 KiB its own mapping, returned to the system when freed, so no freed
warm-up memory sits in the heap to be reused unseen; one intra-op thread keeps
scratch memory constant.

``--quick`` measures every configuration once, in turn, in a single fresh
process (B = 128, m = 16), truebatch first: memory freed by an earlier
configuration can only make a later one look smaller, so truebatch is never
favoured. It agrees with the one-process-per-configuration runs within 2%.

Prints the extra peak memory of each configuration (median over ``--repeats``
alternating runs), the ratio truebatch / plain_micro with PASS (<= 1.05) or
FAIL, and plain_full / truebatch.

    python benchmarks/memory.py [--batch 512] [--micro 32] [--repeats 3]
    python benchmarks/memory.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import truebatch as tb

CONFIGS = ("truebatch", "plain_micro", "plain_accumulation", "plain_full")
CHANNELS = 8
IMAGE = 32
LAYERS = 4
CLASSES = 10
PASS_RATIO = 1.05
Batch = tuple[torch.Tensor, torch.Tensor]


def _status_mib(field: str) -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line; this benchmark needs Linux")
    return int(match.group(1)) / 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS


def _model() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, CHANNELS, 3, padding=1), nn.ReLU()]
    for _ in range(LAYERS - 1):
        layers += [nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, 10))


def _loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def _trainer(
    config: str, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch_size: int
) -> Callable[[Batch], None]:
    """One effective batch of training, the way ``config`` does it."""
    accumulator = tb.Accumulator(model, optimizer, micro_batch_size=micro_batch_size)

    def plain_step(batch: Batch) -> None:
        (_loss_sum(model, batch) / tb.batch_size(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def plain_micro(batch: Batch) -> None:
        for micro_batch in tb.split(batch, micro_batch_size):
            plain_step(micro_batch)

    def plain_accumulation(batch: Batch) -> None:
        for micro_batch in tb.split(batch, micro_batch_size):
            (_loss_sum(model, micro_batch) / tb.batch_size(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    trainers = {
        "truebatch": lambda batch: accumulator.step(batch, _loss_sum),
        "plain_micro": plain_micro,
        "plain_accumulation": plain_accumulation,
        "plain_full": plain_step,
    }
    if config not in trainers:
        raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")
    return trainers[config]


def extra_peak_mib(train: Callable[[], object]) -> float:
    """Extra peak RSS in MiB of ``train()`` over the memory before it: run it once as a
    warm-up, reset the peak, run it again. Call in a fresh process started with
    :data:`MEASURE_ENV` (see the module docstring for why)."""
    train()
    _reset_peak()
    baseline = _status_mib("VmRSS")
    train()
    return _status_mib("VmHWM") - baseline


# The allocator and thread settings the measuring process must start with.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


def measure(config: str, batch_size: int, micro_batch_size: int) -> float:
    """Extra peak RSS in MiB of one effective batch of ``config`` (call in a fresh process)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = (torch.randn(batch_size, 3, IMAGE, IMAGE), torch.randint(0, CLASSES, (batch_size,)))
    train = _trainer(config, model, optimizer, micro_batch_size)
    return extra_peak_mib(lambda: train(batch))


def run_in_subprocess(
    configs: Sequence[str], batch_size: int, micro_batch_size: int, timeout: float = 300
) -> dict[str, float]:
    """:func:`measure` of each config, in turn, in one fresh Python process with the
    allocator settings above; returns the extra peak MiB of each."""
    env = dict(os.environ, **MEASURE_ENV)
    command = [sys.executable, __file__, "--measure", ",".join(configs)]
    command += ["--batch", str(batch_size), "--micro", str(micro_batch_size)]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, check=False, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _configs(text: str) -> list[str]:
    configs = text.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown configs {unknown}; choose from {CONFIGS}")
    return configs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512, help="effective batch B")
    parser.add_argument("--micro", type=int, default=32, help="micro-batch size m")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration")
    parser.add_argument(
        "--quick", action="store_true", help="B=128, m=16, all configs once in one process"
    )
    parser.add_argument("--measure", type=_configs, help="(internal) measure configs a,b,...")
    args = parser.parse_args()
    if args.measure:
        extra = {c: measure(c, args.batch, args.micro) for c in args.measure}
        print(json.dumps(extra))
        return 0

    if args.quick:
        args.batch, args.micro, args.repeats = 128, 16, 1
        runs = {c: [v] for c, v in run_in_subprocess(CONFIGS, args.batch, args.micro).items()}
        how = "one process, configurations in turn"
    else:
        runs = {c: [] for c in CONFIGS}
        jobs = [c for _ in range(args.repeats) for c in CONFIGS]  # alternate the configurations
        for config in tqdm(jobs, desc="fresh processes"):
            runs[config] += run_in_subprocess([config], args.batch, args.micro).values()
        how = f"a fresh process per run, median of {args.repeats}"
    extra = {c: statistics.median(v) for c, v in runs.items()}
    print(
        f"CNN {LAYERS}x{CHANNELS} channels on {IMAGE}x{IMAGE} images, B = {args.batch}, "
        f"m = {args.micro}; extra peak RSS over the baseline ({how})"
    )
    width = max(len(c) for c in CONFIGS)
    for config in CONFIGS:
        spread = ", ".join(f"{v:.1f}" for v in runs[config])
        print(f"  {config:<{width}}  {extra[config]:7.1f} MiB   (runs: {spread})")
    ratio = extra["truebatch"] / extra["plain_micro"]
    verdict = "PASS" if ratio <= PASS_RATIO else "FAIL"
    print(f"truebatch / plain_micro = {ratio:.3f}  (<= {PASS_RATIO}: {verdict})")
    print(f"plain_full / truebatch  = {extra['plain_full'] / extra['truebatch']:.1f}")
    if args.quick:
        print("quick run: one measurement, exit 0 whatever the verdict (run without --quick)")
        return 0
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
