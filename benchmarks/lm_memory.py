"""Peak memory of a small causal LM's window: token budgets and activation checkpointing.

The model is GPT-2 built from a ``transformers`` config with random weights
(4 layers, width 256, 4 heads, vocabulary 4096, context 256). One window holds
64 sequences with the long-tailed lengths of ``benchmarks/token_budget.py``
(log-normal, median 32 tokens, clipped to [8, 256]), its longest one set to the
full context of 256 tokens: the length that decides how many sequences a fixed
micro-batch may hold (``m``) whatever the window holds; every micro-batch is
padded to its own longest sequence, as a collate per micro-batch does, and
``tb.Accumulator.step_window`` runs the window with ``count=tb.count_tokens()``.
The ways to cut it:

- ``whole``: the window in one pass, padded to its longest sequence;
- ``fixed``: ``m = 4`` sequences per micro-batch;
- ``budget``: consecutive sequences up to ``T = 4 x 256`` padded tokens
  (``tb.token_budget_sizes(lengths, T, padded=True)``), the worst case of ``fixed``;
- ``... + checkpointing``: the same with ``model.gradient_checkpointing_enable()``
  (``torch.utils.checkpoint``, non-reentrant: each block's activations are
  recomputed in backward instead of kept);
- ``budget 4T + checkpointing``: a budget four times larger, with checkpointing.

The peak is that of the window's largest micro-batch (each backward frees its
micro-batch's graph before the next forward). It is measured as in
``benchmarks/memory.py`` (:func:`memory.extra_peak_mib`): each configuration
in a fresh process, a warm-up window, then the extra peak RSS of a second
window over the memory before it (median over ``--repeats`` alternating runs).
The seconds of that window are printed too (one run each, on a shared machine:
indicative only).

    python benchmarks/lm_memory.py [--repeats 3]
    python benchmarks/lm_memory.py --quick   # 16 sequences, a smaller GPT-2, one process
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from memory import MEASURE_ENV, extra_peak_mib
from token_budget import LONGEST, long_tailed_lengths
from tqdm import tqdm

import truebatch as tb

MICRO = 4
SIZES = {"full": (4096, 256, 4), "small": (512, 64, 2)}  # vocabulary, width, layers
CONFIGS = {
    # name: (cut, budget multiple of MICRO x LONGEST, checkpointing)
    "whole": ("whole", 0, False),
    "fixed": ("fixed", 0, False),
    "budget": ("budget", 1, False),
    "fixed + checkpointing": ("fixed", 0, True),
    "budget + checkpointing": ("budget", 1, True),
    "budget 4T + checkpointing": ("budget", 4, True),
}
Batch = dict[str, torch.Tensor]


def gpt2(size: str, *, checkpointing: bool) -> torch.nn.Module:
    import transformers

    vocab, width, layers = SIZES[size]
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=LONGEST, n_embd=width, n_layer=layers, n_head=4
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def collate(sequences: Sequence[torch.Tensor]) -> Batch:
    ids = torch.nn.utils.rnn.pad_sequence(list(sequences), batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence(
        [torch.ones_like(s) for s in sequences], batch_first=True
    )
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum"
    )


def window(sequences: list[torch.Tensor], cut: str, multiple: int) -> list[Batch]:
    """The window's micro-batches, each padded to its own longest sequence."""
    if cut == "whole":
        sizes = [len(sequences)]
    elif cut == "fixed":
        sizes = [min(MICRO, len(sequences) - i) for i in range(0, len(sequences), MICRO)]
    else:
        lengths = [len(s) for s in sequences]
        sizes = tb.token_budget_sizes(lengths, multiple * MICRO * LONGEST, padded=True)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [collate(sequences[a : a + n]) for a, n in zip(starts, sizes, strict=True)]


def window_lengths(n: int) -> list[int]:
    """Long-tailed lengths, the longest set to the full context."""
    lengths = long_tailed_lengths(n)
    lengths[lengths.index(max(lengths))] = LONGEST
    return lengths


def sequences(n: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (length,), generator=g) for length in window_lengths(n)]


def measure(name: str, n: int, size: str) -> dict[str, float]:
    """Extra peak MiB, seconds, micro-batches and largest padded micro-batch of one
    window of ``name`` (call in a fresh process started with ``MEASURE_ENV``)."""
    torch.set_num_threads(1)
    cut, multiple, checkpointing = CONFIGS[name]
    model = gpt2(size, checkpointing=checkpointing)
    acc = tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=1e-4))
    micro_batches = window(sequences(n, SIZES[size][0]), cut, multiple)
    seconds: list[float] = []

    def train() -> None:
        start = time.perf_counter()
        acc.step_window(micro_batches, loss_sum, count=tb.count_tokens())
        seconds.append(time.perf_counter() - start)

    mib = extra_peak_mib(train)
    largest = max(mb["input_ids"].numel() for mb in micro_batches)
    return {"mib": mib, "seconds": seconds[-1], "passes": len(micro_batches), "largest": largest}


def run_in_subprocess(
    names: Sequence[str], n: int, size: str, timeout: float = 900
) -> dict[str, dict]:
    """:func:`measure` of each configuration, in turn, in one fresh Python process."""
    command = [sys.executable, __file__, "--measure", json.dumps(list(names))]
    done = subprocess.run(
        [*command, "--sequences", str(n), "--size", size],
        env=dict(os.environ, **MEASURE_ENV),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=64, help="sequences in the window")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration")
    parser.add_argument("--quick", action="store_true", help="16 sequences, one process")
    parser.add_argument("--size", choices=list(SIZES), default="full", help="GPT-2 size")
    parser.add_argument("--measure", type=json.loads, help="(internal) measure these configs")
    args = parser.parse_args()
    if args.measure:
        extra = {name: measure(name, args.sequences, args.size) for name in args.measure}
        print(json.dumps(extra))
        return 0

    names = list(CONFIGS)
    if args.quick:
        args.sequences, args.size = 16, "small"
        runs = {k: [v] for k, v in run_in_subprocess(names, args.sequences, args.size).items()}
        how = "one process, configurations in turn"
    else:
        runs = {name: [] for name in names}
        jobs = [name for _ in range(args.repeats) for name in names]  # alternate them
        for name in tqdm(jobs, desc="fresh processes", disable=None):
            runs[name] += run_in_subprocess([name], args.sequences, args.size).values()
        how = f"a fresh process per run, median of {args.repeats}"
    lengths = window_lengths(args.sequences)
    vocab, width, layers = SIZES[args.size]
    print(
        f"GPT-2 ({layers} layers, width {width}, vocabulary {vocab}), one window of "
        f"{args.sequences} "
        f"sequences of {min(lengths)} to {max(lengths)} tokens (median "
        f"{statistics.median(lengths):.0f}), each micro-batch padded to its longest; "
        f"m = {MICRO}, T = {MICRO} x {LONGEST} padded tokens; extra peak RSS ({how})"
    )
    peak = {name: statistics.median(r["mib"] for r in runs[name]) for name in names}
    for name in names:
        first = runs[name][0]
        print(
            f"  {name:<26} {peak[name]:7.1f} MiB  {first['passes']:3d} micro-batches, "
            f"largest {first['largest']:5d} padded tokens, {first['seconds']:5.2f} s per window"
        )
    print(f"fixed / whole                      = {peak['fixed'] / peak['whole']:.2f}")
    print(f"budget / fixed                     = {peak['budget'] / peak['fixed']:.2f}")
    print(
        "budget + checkpointing / budget    = "
        f"{peak['budget + checkpointing'] / peak['budget']:.2f}"
    )
    print(
        "budget 4T + checkpointing / budget = "
        f"{peak['budget 4T + checkpointing'] / peak['budget']:.2f}"
    )
    print(f"load average: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
