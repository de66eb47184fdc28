"""Time and peak memory of step_cached against the other ways to train with in-batch negatives.

A sentence encoder (a BERT with random weights, mean pooling, dropout 0.1)
trains with the multiple-negatives ranking loss (MNRL: each anchor against
every positive of the batch, cosine similarity x 20) on windows of B
(anchor, positive) pairs, in micro-batches of m pairs:

- ``big_batch``: one forward and backward on all B pairs (the reference);
- ``plain_accumulation``: MNRL per micro-batch, ``(loss_sum / B).backward()``:
  the usual loop, inexact (negatives only within the micro-batch);
- ``step_cached``: ``acc.step_cached``: exact, the whole window's negatives;
- ``hand_two_pass``: a hand-written GradCache loop (no-grad pass recording
  the RNG state, loss on all embeddings, second pass with
  ``torch.autograd.backward(embeddings, cached_grad)``);
- ``st_cached_mnrl``: sentence-transformers' ``CachedMultipleNegativesRankingLoss``
  (mini_batch_size=m), when sentence-transformers is installed;
- ``no_grad_encode``: the no-grad forwards alone, the extra work of every
  two-pass method: none can cost less than ``plain + no_grad_encode``, its
  floor, ``1 + no_grad_encode / plain_accumulation`` times plain accumulation.

The default encoder has the shape of sentence-transformers' all-MiniLM-L6-v2
(6 layers, width 384, 12 heads, 30522 tokens) on sequences of 128 tokens;
``--model tiny`` is a 2-layer BERT of width 64 on 24 tokens (a smoke run).

Time: after a warm-up window each, every round runs one window of each
method, the order rotating, on one shared model and optimizer; the clock is
the process's CPU time on one thread (``--clock wall`` for wall time), so
other processes on a loaded machine cost little. Prints the median time per
window, the median over rounds of each method's ratio to
``plain_accumulation`` within a round (target for step_cached: <= 1.35), and
of step_cached's ratio to each method and to the floor (truebatch's own cost
beyond the extra forward).

Memory: each method runs in a process of its own, forked from one fresh
interpreter (``MALLOC_MMAP_THRESHOLD_``, one thread) that has imported the
libraries but built no model, once as warm-up; then the peak RSS of a second window above the RSS
before it (``/proc/self/clear_refs`` and ``VmHWM``, Linux). Prints the extra
peak of each and ``step_cached / (plain_accumulation + representations)``
(target <= 1.1), where the representations are the window's embeddings and
their gradients.

    python benchmarks/cached.py [--batch 32] [--micro 8] [--rounds 3]
    python benchmarks/cached.py --quick       # a smoke run: tiny model, B=32, m=8, 2 rounds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from tqdm import tqdm

import truebatch as tb

SCALE = 20.0
TIME_TARGET, MEMORY_TARGET = 1.35, 1.1
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Shape:
    """A BERT encoder's shape and its sequence length."""

    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    length: int


SHAPES = {
    "minilm": Shape("all-MiniLM-L6-v2-shaped", 6, 384, 12, 30522, 128),
    "tiny": Shape("tiny", 2, 64, 2, 512, 24),
}


def sentence_transformers_available() -> bool:
    # Found, not imported: the import takes seconds, and only st_cached_mnrl needs it.
    return importlib.util.find_spec("sentence_transformers") is not None


METHODS = ["big_batch", "plain_accumulation", "step_cached", "hand_two_pass"] + (
    ["st_cached_mnrl"] if sentence_transformers_available() else []
)
TIMED = [*METHODS, "no_grad_encode"]


# ------------------------------------------------------------------ model and data


class Encoder(nn.Module):
    """A BERT with mean pooling: the same network sentence-transformers wraps."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=4 * shape.hidden,
            max_position_embeddings=max(shape.length, 512),
        )
        self.shape = shape
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)


def window_batch(shape: Shape, batch_size: int, seed: int) -> Batch:
    """``batch_size`` (anchor, positive) pairs of token ids, of length L/4..L, padded to L."""
    g = torch.Generator().manual_seed(seed)
    out, length = {}, shape.length
    for side in ("a", "p"):
        lengths = torch.randint(length // 4, length + 1, (batch_size,), generator=g)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, shape.vocab, (batch_size, length), generator=g)
        out[f"{side}_ids"], out[f"{side}_mask"] = ids * mask, mask
    return out


def encode(model: nn.Module, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return model(*_trimmed(b["a_ids"], b["a_mask"])), model(*_trimmed(b["p_ids"], b["p_mask"]))


def _trimmed(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Without the padding columns no sequence of the (micro-)batch uses, as
    sentence-transformers' cached losses cut each mini-batch: every method then runs
    the same tokens."""
    width = int(mask.sum(1).max())
    return ids[:, :width], mask[:, :width]


def mnrl_sum(reps: tuple[torch.Tensor, torch.Tensor], _: Any = None) -> torch.Tensor:
    anchors, positives = (F.normalize(r, dim=-1) for r in reps)
    scores = anchors @ positives.T * SCALE
    return F.cross_entropy(scores, torch.arange(len(scores)), reduction="sum")


# ------------------------------------------------------------------ the methods


def trainers(
    model: Encoder, micro: int, *, methods: list[str] = TIMED
) -> dict[str, Callable[[Batch], None]]:
    """One window of training per method of ``methods``, all on ``model`` with one SGD
    optimizer."""
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

    trainer = {
        "no_grad_encode": no_grad_encode,
        "big_batch": big_batch,
        "plain_accumulation": plain_accumulation,
        "step_cached": step_cached,
        "hand_two_pass": hand_two_pass,
    }
    if "st_cached_mnrl" in methods:
        trainer["st_cached_mnrl"] = _st_cached_mnrl(model, micro, step)
    return trainer


def _st_cached_mnrl(model: Encoder, micro: int, step: Callable[[], None]) -> Callable:
    """sentence-transformers' CachedMultipleNegativesRankingLoss on the same BERT weights."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertTokenizerFast

    shape = model.shape
    directory = tempfile.mkdtemp(prefix="truebatch-st-")
    vocab = Path(directory, "vocab.txt")
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab.write_text("\n".join(special + [f"w{i}" for i in range(shape.vocab - 5)]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    model.bert.save_pretrained(directory)
    transformer = Transformer(directory, max_seq_length=shape.length)
    # One set of weights for every method: the wrapper runs the very same BertModel, in
    # train mode like the others (from_pretrained returns a model in eval mode).
    transformer.model = model.bert
    pooling = Pooling(shape.hidden, "mean")
    st_model = SentenceTransformer(modules=[transformer, pooling]).train()
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


def time_methods(
    shape: Shape, batch: int, micro: int, rounds: int, clock: str
) -> dict[str, list[float]]:
    """Seconds per window of every method, one window each per round, the order rotating."""
    torch.manual_seed(0)
    train = trainers(Encoder(shape), micro)
    now = time.process_time if clock == "cpu" else time.perf_counter
    warm_up = window_batch(shape, 2 * micro, seed=rounds)  # two micro-batches: every path
    data = [window_batch(shape, batch, seed) for seed in range(rounds)]
    seconds: dict[str, list[float]] = {method: [] for method in TIMED}
    quiet = not sys.stderr.isatty()
    with tqdm(total=(rounds + 1) * len(TIMED), desc="windows", disable=quiet) as progress:
        for method in TIMED:
            train[method](warm_up)
            progress.update()
        for r in range(rounds):
            for method in TIMED[r % len(TIMED) :] + TIMED[: r % len(TIMED)]:
                start = now()
                train[method](data[r])
                seconds[method].append(now() - start)
                progress.update()
    return seconds


def median_ratio(seconds: dict[str, list[float]], method: str, baseline: str) -> float:
    """Median over rounds of ``method``'s time divided by ``baseline``'s in the same round."""
    pairs = zip(seconds[method], seconds[baseline], strict=True)
    return statistics.median(a / b for a, b in pairs)


def floor_ratio(seconds: dict[str, list[float]]) -> float:
    """Median over rounds of step_cached / (plain_accumulation + no_grad_encode)."""
    rounds = zip(
        seconds["step_cached"],
        seconds["plain_accumulation"],
        seconds["no_grad_encode"],
        strict=True,
    )
    return statistics.median(c / (p + e) for c, p, e in rounds)


def _check_same_gradient(shape: Shape, micro: int) -> float:
    """Relative difference of step_cached's gradient from the big batch's (float64,
    dropout off) on a window of two micro-batches."""
    torch.manual_seed(0)
    model = Encoder(shape).double().eval()  # eval: no dropout, the big batch is deterministic
    b = window_batch(shape, 2 * micro, seed=0)
    (mnrl_sum(encode(model, b)) / (2 * micro)).backward()
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


def measure_memory(shape: Shape, method: str, batch: int, micro: int) -> float:
    """Extra peak RSS (MiB) of one window of ``method`` (call in a fresh process)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train = trainers(Encoder(shape), micro, methods=[method])[method]
    data = window_batch(shape, batch, seed=0)
    train(data)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    baseline = _status_mib("VmRSS")
    train(data)
    return _status_mib("VmHWM") - baseline


def measure_forked(shape: Shape, methods: list[str], batch: int, micro: int) -> dict[str, float]:
    """:func:`measure_memory` of each method in a child forked from this process (call
    in a fresh one): the libraries are imported once, and every method starts from the
    same state, with no model built before it."""
    torch.set_num_threads(1)
    if "st_cached_mnrl" in methods:
        import sentence_transformers  # noqa: F401  (imported once, before the forks)
    peaks = {}
    for method in methods:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report through the pipe, exit without cleanup
            os.close(read)
            code = 1
            try:
                os.write(write, json.dumps(measure_memory(shape, method, batch, micro)).encode())
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        os.close(write)
        with os.fdopen(read) as pipe:
            reported = pipe.read()
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code != 0 or not reported:
            raise RuntimeError(f"measuring {method} failed (exit code {code})")
        peaks[method] = float(json.loads(reported))
    return peaks


def memory_in_fresh_process(model: str, batch: int, micro: int) -> dict[str, float]:
    """Extra peak RSS (MiB) of every method, measured by :func:`measure_forked`."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    command = [sys.executable, __file__, "--measure", ",".join(METHODS), "--model", model]
    command += ["--batch", str(batch), "--micro", str(micro)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ report


def report_time(seconds: dict[str, list[float]], rounds: int) -> None:
    print(
        f"time per window (median of {rounds} interleaved rounds; a ratio is the median over "
        "rounds of the ratio within a round)"
    )
    print(f"  {'method':<20} {'ms/window':>10}  {'/ plain':>8}  {'step_cached /':>13}")
    for method in TIMED:
        median_ms = 1000 * statistics.median(seconds[method])
        plain = median_ratio(seconds, method, "plain_accumulation")
        cached = median_ratio(seconds, "step_cached", method)
        versus = f"  {cached:13.3f}" if method != "no_grad_encode" else ""
        print(f"  {method:<20} {median_ms:10.1f}  {plain:8.3f}{versus}")
    forward = median_ratio(seconds, "no_grad_encode", "plain_accumulation")
    print(
        f"no-grad forward / (forward + backward) = {forward:.3f}: the floor of any two-pass "
        f"method (one extra forward) is {1 + forward:.3f} x plain_accumulation"
    )
    print(f"step_cached / floor (plain_accumulation + no_grad_encode) = {floor_ratio(seconds):.3f}")
    ratio = median_ratio(seconds, "step_cached", "plain_accumulation")
    verdict = "PASS" if ratio <= TIME_TARGET else "FAIL"
    below = "" if 1 + forward <= TIME_TARGET else f"; the floor {1 + forward:.3f} is above it"
    print(f"step_cached / plain_accumulation = {ratio:.3f}  (<= {TIME_TARGET}: {verdict}){below}")


def report_memory(model: str, shape: Shape, batch: int, micro: int) -> None:
    memory = memory_in_fresh_process(model, batch, micro)
    # The window's embeddings (two sides, float32) and their gradients.
    representations = 2 * 2 * batch * shape.hidden * 4 / 2**20
    print(
        "extra peak RSS of a window (a forked process each); "
        f"representations {representations:.2f} MiB"
    )
    for method in METHODS:
        print(f"  {method:<20} {memory[method]:7.1f} MiB")
    ratio = memory["step_cached"] / (memory["plain_accumulation"] + representations)
    verdict = "PASS" if ratio <= MEMORY_TARGET else "FAIL"
    print(
        f"step_cached / (plain_accumulation + representations) = {ratio:.3f}  "
        f"(<= {MEMORY_TARGET}: {verdict})"
    )


def main() -> int:
    transformers.logging.set_verbosity_error()  # no load report of the random weights
    transformers.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="minilm")
    parser.add_argument("--batch", type=int, default=32, help="window size B (pairs)")
    parser.add_argument("--micro", type=int, default=8, help="micro-batch size m (pairs)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model, B=32, m=8, 2 rounds")
    parser.add_argument("--measure", help="(internal) peak memory of these methods (a,b,...)")
    args = parser.parse_args()
    if args.quick:
        args.model, args.batch, args.micro, args.rounds = "tiny", 32, 8, 2
    shape = SHAPES[args.model]
    if args.measure:
        methods = args.measure.split(",")
        print(json.dumps(measure_forked(shape, methods, args.batch, args.micro)))
        return 0
    torch.set_num_threads(1)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"{shape.name} BERT ({shape.layers} layers, width {shape.hidden}, "
        f"{shape.length} tokens), MNRL on B = {args.batch} pairs in micro-batches of "
        f"m = {args.micro}; {args.clock} clock, one thread; load average {' '.join(load)} "
        f"on {os.cpu_count()} cores"
    )
    difference = _check_same_gradient(shape, args.micro)
    print(
        f"step_cached vs big batch, float64, no dropout: max relative difference {difference:.1e}"
    )
    report_time(time_methods(shape, args.batch, args.micro, args.rounds, args.clock), args.rounds)
    report_memory(args.model, shape, args.batch, args.micro)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average at the end: {' '.join(load)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
