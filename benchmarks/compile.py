"""What torch.compile costs and gains under truebatch: compile time, recompiles, speed.

The model is an MLP 256 -> 512 -> 512 -> 10 (GELU, LayerNorm; 400k parameters)
in float32, run through ``tb.Accumulator.accumulate`` on windows of 100 samples
in micro-batches of 32: shapes 32, 32, 32 and a ragged 4. Each configuration
runs ``--windows`` windows on a fresh compiled copy and reports

- the first window's time (it compiles), the second's (dynamo may compile the
  batch dim dynamically when it first sees a second shape), and, from the
  third window on, the median ratio of its time to an eager window timed right
  after it on the same data;
- the graphs dynamo compiled (``torch._dynamo.utils.counters``);
- the largest relative gradient difference of the last window from eager's
  (:func:`truebatch.max_relative_difference`, float32).

Configurations: eager; inductor with ``dynamic=None`` (the default: static
first, dynamic after a second shape), ``dynamic=False`` (one graph per shape)
and ``dynamic=True`` (symbolic from the start); and aot_eager (no code
generation: the tracing cost alone).

Inductor compiles cold (its on-disk kernel cache disabled) unless ``--warm-cache``:
a first window after an earlier run of the same model is much faster.

Run: python benchmarks/compile.py [--windows 8] [--threads 2] [--warm-cache]
     python benchmarks/compile.py --quick   (3 windows, aot_eager and eager only)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch._dynamo
import torch._inductor.config
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import truebatch as tb

FEATURES, CLASSES, WINDOW, MICRO = 256, 10, 100, 32


def mlp() -> nn.Sequential:
    """The benchmark's model, with fixed weights."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, 512),
        nn.GELU(),
        nn.LayerNorm(512),
        nn.Linear(512, 512),
        nn.GELU(),
        nn.Linear(512, CLASSES),
    )


def loss_sum(model: nn.Module, micro_batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed over the samples."""
    x, y = micro_batch
    return F.cross_entropy(model(x), y, reduction="sum")


def data(windows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(WINDOW, FEATURES, generator=g),
            torch.randint(0, CLASSES, (WINDOW,), generator=g),
        )
        for _ in range(windows)
    ]


def run(model: nn.Module, compile_options: dict, batches: list) -> dict[str, object]:
    """Windows on a compiled copy of ``model`` and, interleaved from the third window on,
    on an eager copy: the compiled windows' seconds, the paired ratios, the graphs compiled
    and the last window's gradient difference from eager."""
    torch._dynamo.reset()
    counters.clear()
    eager_model, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    eager = accumulator(eager_model)
    compiled = accumulator(compiled_model, torch.compile(compiled_model, **compile_options))
    seconds, ratios = [], []
    for index, batch in enumerate(batches):
        compiled_seconds = timed(compiled, batch)
        seconds.append(compiled_seconds)
        if index >= 2:  # a slow moment of the machine slows both of a pair
            ratios.append(compiled_seconds / timed(eager, batch))
    eager.accumulate([batches[-1]], loss_sum)
    grads = [p.grad for p in compiled_model.parameters()]
    reference = [p.grad for p in eager_model.parameters()]
    return {
        "seconds": seconds,
        "ratio": statistics.median(ratios),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "difference": tb.max_relative_difference(grads, reference),
    }


def accumulator(model: nn.Module, target: nn.Module | None = None) -> tb.Accumulator:
    """An Accumulator that runs ``target`` (default: ``model``) and owns ``model``'s parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return tb.Accumulator(target or model, optimizer, micro_batch_size=MICRO)


def timed(acc: tb.Accumulator, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    start = time.perf_counter()
    acc.accumulate([batch], loss_sum)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 windows; eager and aot_eager")
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="let inductor reuse kernels compiled by an earlier run (default: compile cold)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.warm_cache:
        torch._inductor.config.force_disable_caches = True
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
    windows = 3 if args.quick else max(args.windows, 3)
    configurations: dict[str, dict] = {"aot_eager": {"backend": "aot_eager"}}
    if not args.quick:
        configurations = {
            "inductor, dynamic=None": {},
            "inductor, dynamic=False": {"dynamic": False},
            "inductor, dynamic=True": {"dynamic": True},
            **configurations,
        }
    model, batches = mlp(), data(windows)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(
        f"MLP {sum(p.numel() for p in model.parameters()):,} parameters, float32, windows of "
        f"{WINDOW} in micro-batches of {MICRO} (shapes {MICRO}, {MICRO}, {MICRO}, "
        f"{WINDOW % MICRO}); {windows} windows, {args.threads} threads, load {load}"
    )
    eager = statistics.median(timed(accumulator(copy.deepcopy(model)), b) for b in batches)
    print(f"eager: {1000 * eager:.1f} ms per window (median of {windows} windows)")
    print()
    columns = ["window 1", "window 2", "later / eager", "graphs", "grad diff"]
    widths = [9, 9, 14, 7, 10]
    print(
        f"{'configuration':<24}"
        + "".join(f" {c:>{w}}" for c, w in zip(columns, widths, strict=True))
    )
    for name, options in configurations.items():
        result = run(model, options, batches)
        first, second = result["seconds"][:2]
        print(
            f"{name:<24} {first:>8.2f}s {second:>8.2f}s {result['ratio']:>14.2f} "
            f"{result['graphs']:>7} {result['difference']:>10.1e}"
        )
    print(
        "\nlater / eager: median over windows 3.. of compiled / eager seconds, each pair timed "
        "back to back; grad diff: tb.max_relative_difference of the last window, float32"
    )


if __name__ == "__main__":
    main()
