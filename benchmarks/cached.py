"""Time and peak memory of step_cached against the other ways to train with in-batch negatives.

A tiny BERT sentence encoder (random weights, mean pooling, dropout 0.1)
trains with the multiple-negatives ranking loss (MNRL: each anchor against
every positive of the batch, cosine similarity x 20) on windows of B
(anchor, positive) pairs, in micro-batches of m:

- ``big_batch``: one forward and backward on all B pairs (the reference);
- ``plain_accumulation``: MNRL per micro-batch, ``(loss_sum / B).backward()``:
  the usual loop, inexact (negatives only within the micro-batch);
- ``step_cached``: ``acc.step_cached``: exact, the whole window's negatives;
- ``hand_two_pass``: a hand-written GradCache loop (no-grad pass recording
  the RNG state, loss on all embeddings, second pass with
  ``embeddings.backward(cached_grad)``);
- ``st_cached_mnrl``: sentence-transformers' ``CachedMultipleNegativesRankingLoss``
  (mini_batch_size=m), when sentence-transformers is installed.

Time: after a warm-up window each, every round runs one window of each
method, the order rotating, on one shared model and optimizer; the clock is
the process's CPU time on one thread (``--clock wall`` for wall time), so
other processes on a loaded machine cost little. Prints the median time per
window and the median over rounds of each method's ratio to
``plain_accumulation`` within a round (target for step_cached: <= 1.35).

Memory: each method runs in a fresh process (``MALLOC_MMAP_THRESHOLD_``, one
thread), once as warm-up; then the peak RSS of a second window above the RSS
before it (``/proc/self/clear_refs`` and ``VmHWM``, Linux). Prints the extra
peak of each and ``step_cached / (plain_accumulation + representations)``
(target <= 1.1), where the representations are the window's embeddings and
their gradients.

    python benchmarks/cached.py [--batch 256] [--micro 32] [--rounds 9]
    python benchmarks/cached.py --quick       # a smoke run: B=32, m=8, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from tqdm import tqdm

import truebatch as tb

HIDDEN, LAYERS, HEADS, VOCAB, LENGTH, SCALE = 64, 2, 2, 512, 24, 20.0
TIME_TARGET, MEMORY_TARGET = 1.35, 1.1
Batch = dict[str, torch.Tensor]


def sentence_transformers_available() -> bool:
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


METHODS = ["big_batch", "plain_accumulation", "step_cached", "hand_two_pass"] + (
    ["st_cached_mnrl"] if sentence_transformers_available() else []
)


# ------------------------------------------------------------------ model and data


class Encoder(nn.Module):
    """A tiny BERT with mean pooling: the same network sentence-transformers wraps."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=4 * HIDDEN,
            max_position_embeddings=LENGTH,
        )
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)


def window_batch(batch_size: int, seed: int) -> Batch:
    """``batch_size`` (anchor, positive) pairs of token ids, lengths 8..LENGTH, padded."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side in ("a", "p"):
        lengths = torch.randint(8, LENGTH + 1, (batch_size,), generator=g)
        mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
        out[f"{side}_ids"] = torch.randint(1, VOCAB, (batch_size, LENGTH), generator=g) * mask
        out[f"{side}_mask"] = mask
    return out


def encode(model: nn.Module, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return model(b["a_ids"], b["a_mask"]), model(b["p_ids"], b["p_mask"])


def mnrl_sum(reps: tuple[torch.Tensor, torch.Tensor], _: Any = None) -> torch.Tensor:
    anchors, positives = (F.normalize(r, dim=-1) for r in reps)
    scores = anchors @ positives.T * SCALE
    return F.cross_entropy(scores, torch.arange(len(scores)), reduction="sum")


# ------------------------------------------------------------------ the methods


def trainers(model: Encoder, micro: int) -> dict[str, Callable[[Batch], None]]:
    """One window of training per method, all on ``model`` with one SGD optimizer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    acc = tb.Accumulator(model, optimizer, micro_batch_size=micro)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def big_batch(b: Batch) -> None:
        (mnrl_sum(encode(model, b)) / len(b["a_ids"])).backward()
        step()

    def plain_accumulation(b: Batch) -> None:
        n = len(b["a_ids"])
        for mb in tb.split(b, micro):
            (mnrl_sum(encode(model, mb)) / n).backward()
        step()

    def step_cached(b: Batch) -> None:
        acc.step_cached([b], encode, mnrl_sum)

    def hand_two_pass(b: Batch) -> None:
        n, micro_batches, states, reps = len(b["a_ids"]), tb.split(b, micro), [], []
        with torch.no_grad():
            for mb in micro_batches:
                states.append(torch.get_rng_state())
                reps.append(encode(model, mb))
        leaves = [torch.cat(side).requires_grad_() for side in zip(*reps, strict=True)]
        (mnrl_sum(tuple(leaves)) / n).backward()
        after = torch.get_rng_state()
        sizes = [len(mb["a_ids"]) for mb in micro_batches]
        grads = [leaf.grad.split(sizes) for leaf in leaves]
        for j, mb in enumerate(micro_batches):
            torch.set_rng_state(states[j])
            a, p = encode(model, mb)
            torch.autograd.backward([a, p], [grads[0][j], grads[1][j]])
        torch.set_rng_state(after)
        step()

    def no_grad_encode(b: Batch) -> None:
        with torch.no_grad():
            for mb in tb.split(b, micro):
                encode(model, mb)

    methods = {
        "no_grad_encode": no_grad_encode,
        "big_batch": big_batch,
        "plain_accumulation": plain_accumulation,
        "step_cached": step_cached,
        "hand_two_pass": hand_two_pass,
    }
    if "st_cached_mnrl" in METHODS:
        methods["st_cached_mnrl"] = _st_cached_mnrl(model, micro, step)
    return methods


def _st_cached_mnrl(model: Encoder, micro: int, step: Callable[[], None]) -> Callable:
    """sentence-transformers' CachedMultipleNegativesRankingLoss on the same BERT weights."""
    from sentence_transformers import SentenceTransformer, models
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
    )
    from transformers import BertTokenizerFast

    directory = tempfile.mkdtemp(prefix="truebatch-st-")
    vocab = Path(directory, "vocab.txt")
    vocab.write_text(
        "\n".join(
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
        )
    )
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    model.bert.save_pretrained(directory)
    transformer = models.Transformer(directory, max_seq_length=LENGTH)
    # One set of weights for every method: the wrapper runs the very same BertModel, in
    # train mode like the others (from_pretrained returns a model in eval mode).
    transformer.model = model.bert
    st_model = SentenceTransformer(modules=[transformer, models.Pooling(HIDDEN, "mean")]).train()
    if next(st_model.parameters()) is not next(model.parameters()):
        raise RuntimeError("the SentenceTransformer does not run the benchmark's BertModel")
    loss = CachedMultipleNegativesRankingLoss(st_model, scale=SCALE, mini_batch_size=micro)

    def st_cached_mnrl(b: Batch) -> None:
        features = [
            {"input_ids": b[f"{side}_ids"], "attention_mask": b[f"{side}_mask"]}
            for side in ("a", "p")
        ]
        loss(features, None).backward()
        step()

    return st_cached_mnrl


# ------------------------------------------------------------------ time


def time_methods(batch: int, micro: int, rounds: int, clock: str) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = Encoder()
    train = trainers(model, micro)
    now = time.process_time if clock == "cpu" else time.perf_counter
    data = [window_batch(batch, seed) for seed in range(rounds + 1)]
    timed = [*METHODS, "no_grad_encode"]
    for method in timed:  # warm-up
        train[method](data[0])
    seconds: dict[str, list[float]] = {method: [] for method in timed}
    for r in tqdm(range(rounds), desc="rounds", disable=not sys.stderr.isatty()):
        order = timed[r % len(timed) :] + timed[: r % len(timed)]
        for method in order:
            start = now()
            train[method](data[r + 1])
            seconds[method].append(now() - start)
    return seconds


def _check_same_gradient(batch: int, micro: int) -> float:
    """Relative difference of step_cached's gradient from the big batch's (dropout off)."""
    torch.manual_seed(0)
    model = Encoder().double().eval()  # eval: no dropout, so the big batch is deterministic
    b = window_batch(batch, 0)
    (mnrl_sum(encode(model, b)) / batch).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    seen: list[list[torch.Tensor]] = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.register_step_pre_hook(
        lambda *_: seen.append([p.grad.clone() for p in model.parameters()])
    )
    tb.Accumulator(model, optimizer, micro_batch_size=micro).step_cached([b], encode, mnrl_sum)
    return tb.max_relative_difference(seen[0], expected)


# ------------------------------------------------------------------ memory


def _status_mib(field: str) -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line; this benchmark needs Linux")
    return int(match.group(1)) / 1024


def measure_memory(method: str, batch: int, micro: int) -> float:
    """Extra peak RSS (MiB) of one window of ``method`` (call in a fresh process)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train = trainers(Encoder(), micro)[method]
    data = window_batch(batch, 0)
    train(data)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    baseline = _status_mib("VmRSS")
    train(data)
    return _status_mib("VmHWM") - baseline


def memory_in_fresh_process(method: str, batch: int, micro: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    command = [sys.executable, __file__, "--measure", method, "--batch", str(batch)]
    command += ["--micro", str(micro)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------ report


def main() -> int:
    transformers.logging.set_verbosity_error()  # no load report of the random weights
    transformers.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="window size B (pairs)")
    parser.add_argument("--micro", type=int, default=32, help="micro-batch size m")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="B=32, m=8, 2 rounds")
    parser.add_argument("--measure", help="(internal) peak memory of one method")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_memory(args.measure, args.batch, args.micro)))
        return 0
    if args.quick:
        args.batch, args.micro, args.rounds = 32, 8, 2
    torch.set_num_threads(1)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"BERT {LAYERS}x{HIDDEN}, MNRL on B = {args.batch} pairs, m = {args.micro}, "
        f"{args.clock} clock, one thread; load average {' '.join(load)} on "
        f"{os.cpu_count()} cores"
    )
    difference = _check_same_gradient(args.batch, args.micro)
    print(
        f"step_cached vs big batch, float64, no dropout: max relative difference {difference:.1e}"
    )

    seconds = time_methods(args.batch, args.micro, args.rounds, args.clock)
    base = seconds["plain_accumulation"]
    print("time per window (median)                 / plain_accumulation (median of rounds)")
    for method in METHODS:
        ratio = statistics.median(s / b for s, b in zip(seconds[method], base, strict=True))
        median_ms = 1000 * statistics.median(seconds[method])
        print(f"  {method:<20} {median_ms:9.1f} ms per window   {ratio:6.3f}")
    floor = statistics.median(
        (s + b) / b for s, b in zip(seconds["no_grad_encode"], base, strict=True)
    )
    print(
        f"  any two-pass method costs at least 1 + no-grad encoding / plain_accumulation "
        f"= {floor:.3f}"
    )
    cached_ratio = statistics.median(
        s / b for s, b in zip(seconds["step_cached"], base, strict=True)
    )
    verdict = "PASS" if cached_ratio <= TIME_TARGET else "FAIL"
    print(f"step_cached / plain_accumulation = {cached_ratio:.3f}  (<= {TIME_TARGET}: {verdict})")

    memory = {
        method: memory_in_fresh_process(method, args.batch, args.micro)
        for method in tqdm(METHODS, desc="memory", disable=not sys.stderr.isatty())
    }
    # The window's embeddings (two sides, float32) and their gradients.
    representations = 2 * 2 * args.batch * HIDDEN * 4 / 2**20
    print(
        "extra peak RSS of a window (fresh process each); "
        f"representations {representations:.2f} MiB"
    )
    for method in METHODS:
        print(f"  {method:<20} {memory[method]:7.1f} MiB")
    memory_ratio = memory["step_cached"] / (memory["plain_accumulation"] + representations)
    verdict = "PASS" if memory_ratio <= MEMORY_TARGET else "FAIL"
    print(
        f"step_cached / (plain_accumulation + representations) = {memory_ratio:.3f}  "
        f"(<= {MEMORY_TARGET}: {verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
