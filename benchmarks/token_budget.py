"""Token-budget micro-batches against fixed-sample ones of the same peak memory.

A small causal transformer LM trains one epoch of sequences whose lengths have a
long tail (log-normal, median 32 tokens, clipped to [8, 256]), in windows of
``--window`` sequences, with truebatch. Each micro-batch is padded to its own
longest sequence, as a DataLoader's collate does. Two ways to cut a window:

- ``fixed``: ``m`` sequences per micro-batch. Its peak memory is set by the
  worst micro-batch, ``m`` sequences padded to the longest length L: ``m * L``
  padded tokens, so ``m`` must be small enough for that case;
- ``budget``: as many consecutive sequences as fit in ``T = m * L`` padded
  tokens (``tb.token_budget_sizes(lengths, T, padded=True)``): never more than
  the fixed cut's worst micro-batch, in tokens and in attention scores
  (``n * l**2 <= T * L``), so the same peak memory.

Both give the same update (the window is normalized by its scored tokens); the
script checks it on the first window. Timings alternate between the two in
each round, on one shared model, and the ratio budget / fixed is the median of
the rounds' ratios (target <= 0.8). The load average is printed: the machine is
shared.

    python benchmarks/token_budget.py [--rounds 5] [--sequences 512]
    python benchmarks/token_budget.py --quick
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import truebatch as tb

VOCAB = 512
WIDTH = 64
HEADS = 4
LAYERS = 2
LONGEST = 256
SHORTEST = 8
IGNORE = -100


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, _ = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(batch, length, 3, HEADS, -1).unbind(2)
        # Right padding and a causal mask: no real token attends to padding.
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        h = h + self.proj(attended.transpose(1, 2).reshape(batch, length, WIDTH))
        return h + self.mlp(self.norm2(h))


class CausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Embedding(LONGEST, WIDTH)
        self.blocks = nn.Sequential(*(Block() for _ in range(LAYERS)))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1])
        return self.head(self.blocks(self.embed(input_ids) + self.position(positions)))


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["input_ids"])
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE,
        reduction="sum",
    )


def long_tailed_lengths(n: int, seed: int = 0) -> list[int]:
    """Log-normal lengths, median 32, clipped to [SHORTEST, LONGEST]."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(math.log(32) + 0.8 * torch.randn(n, generator=g))
    return raw.round().clamp(SHORTEST, LONGEST).long().tolist()


def collate(sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    labels = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=IGNORE)
    return {"input_ids": ids, "labels": labels}


Window = list[dict[str, torch.Tensor]]


def cut(sequences: list[torch.Tensor], sizes: list[int]) -> Window:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [collate(sequences[a : a + n]) for a, n in zip(starts, sizes, strict=True)]


CUTS = ("fixed", "budget", "sorted fixed", "sorted budget")


def plans(sequences: list[torch.Tensor], window: int, m: int) -> dict[str, list[Window]]:
    """The epoch's windows, cut by samples (m) and by a budget of m * LONGEST padded
    tokens, each in the data's order and with the window sorted by length first
    (which keeps the window, hence the update, and saves padding)."""
    budget = m * LONGEST
    epochs: dict[str, list[Window]] = {name: [] for name in CUTS}
    for start in range(0, len(sequences), window):
        part = sequences[start : start + window]
        for order, seqs in (("", part), ("sorted ", sorted(part, key=len))):
            fixed = [min(m, len(seqs) - i) for i in range(0, len(seqs), m)]
            sizes = tb.token_budget_sizes([len(s) for s in seqs], budget, padded=True)
            epochs[f"{order}fixed"].append(cut(seqs, fixed))
            epochs[f"{order}budget"].append(cut(seqs, sizes))
    return epochs


def padded_tokens(windows: list[Window]) -> tuple[int, int, int]:
    """(largest micro-batch, all padded tokens, micro-batches) of an epoch."""
    sizes = [mb["input_ids"].numel() for w in windows for mb in w]
    return max(sizes), sum(sizes), len(sizes)


def epoch(acc: tb.Accumulator, windows: list[Window]) -> float:
    start = time.perf_counter()
    for window in windows:
        acc.step_window(window, loss_sum, count=tb.count_tokens())
    return time.perf_counter() - start


def first_window_difference(model: nn.Module, epochs: dict[str, list[Window]]) -> float:
    """The largest difference of a cut's first-window gradient from the fixed cut's,
    at the same weights."""
    grads = []
    for windows in epochs.values():
        copy = CausalLM()
        copy.load_state_dict(model.state_dict())
        optimizer = torch.optim.SGD(copy.parameters(), lr=0.0)
        tb.Accumulator(copy, optimizer).accumulate(windows[0], loss_sum, tb.count_tokens())
        grads.append([p.grad for p in copy.parameters()])
    return max(tb.max_relative_difference(g, grads[0]) for g in grads[1:])


def describe(lengths: list[int]) -> str:
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return (
        f"{len(lengths)} sequences, tokens: mean {statistics.mean(lengths):.0f}, "
        f"p50 {pct(0.5)}, p90 {pct(0.9)}, p99 {pct(0.99)}, max {ordered[-1]}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--window", type=int, default=64, help="sequences per window")
    parser.add_argument("--micro", type=int, default=4, help="m: sequences per fixed micro-batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="64 sequences, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.sequences, args.window, args.rounds = 64, 32, 1
    torch.set_num_threads(1)
    torch.manual_seed(0)

    lengths = long_tailed_lengths(args.sequences)
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]
    epochs = plans(sequences, args.window, args.micro)
    model = CausalLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    acc = tb.Accumulator(model, optimizer)

    print(f"lengths: {describe(lengths)}")
    print(
        f"window: {args.window} sequences; fixed: m = {args.micro}; "
        f"budget: T = {args.micro} x {LONGEST} = {args.micro * LONGEST} padded tokens"
    )
    for name, windows in epochs.items():
        largest, total, count = padded_tokens(windows)
        print(
            f"  {name:<6} {count:4d} micro-batches, largest {largest:5d} padded tokens, "
            f"{total} padded tokens per epoch"
        )
    difference = first_window_difference(model, epochs)
    print(f"first window's gradient, largest difference from fixed: {difference:.1e}")

    epoch(acc, epochs["fixed"])  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {name: [] for name in epochs}
    for r in tqdm(range(args.rounds), desc="rounds", disable=None):
        for name in CUTS[:: 1 if r % 2 else -1]:  # alternate the order between rounds
            times[name].append(epoch(acc, epochs[name]))
    for name, values in times.items():
        print(
            f"  {name:<13} {statistics.median(values):7.3f} s per epoch (median of {args.rounds})"
        )

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    headline = ratio("sorted budget", "fixed")
    print(
        f"sorted budget / fixed        = {headline:.3f}  (<= 0.8: "
        f"{'PASS' if headline <= 0.8 else 'FAIL'})"
    )
    print(f"sorted budget / sorted fixed = {ratio('sorted budget', 'sorted fixed'):.3f}")
    print(f"budget / fixed (data order)  = {ratio('budget', 'fixed'):.3f}")
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
