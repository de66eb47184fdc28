"""``truebatch bench``: speed and exactness of truebatch against other accumulation loops.

All methods train the ``--task lm`` demo's model and data (a one-block
character transformer on the Zen of Python, float64): effective batches of 8
lines, split into k = 4 micro-batches of 2 lines that hold different numbers
of scored tokens, each epoch ending with a window of 2 micro-batches. They
start from the same weights and see the same micro-batches in the same order:

- the big batch (the reference), one step per effective batch on its token mean;
- a correct hand-written loop: each micro-batch's loss sum divided by the
  window's token count N (the speed baseline);
- truebatch: ``Accumulator.step_window(window, loss_sum, count=tb.count_tokens())``;
- the hand-written loops of two classic failures: "mean loss / k on
  variable-length tokens" and "zero_grad every micro-batch";
- HF Accelerate's ``accumulate()`` and Lightning's ``accumulate_grad_batches``
  with their default loss handling (each micro-batch's mean loss, divided by
  k by the framework), and Accelerate's documented recipe for variable-size
  samples; these rows are skipped, with a note, when the framework is missing.

Exactness: at every optimizer step, the gradient the step applies is compared
with the big batch's gradient on the same window at the same weights
(:func:`truebatch.compare.max_relative_difference`: per tensor
``||g - g_big|| / ||g_big||``, the largest over tensors), separately for full and
short windows. Speed: after the exactness pass (which also warms every method
up), ``--repeats`` rounds train every method once each, in turn, so machine
noise spreads over all of them; the table gives the fastest run of each (load
from other processes only ever adds time, so the minimum is the steadiest
estimate) and its ratio to the hand-written loop's in the same process.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from truebatch.batching import batch_size
from truebatch.compare import max_relative_difference
from truebatch.demos import failures, frameworks, loops, methods
from truebatch.demos.console import Progress, positive_int, table
from truebatch.demos.data import micro_batches_of
from truebatch.demos.methods import Method
from truebatch.demos.runs import SEED, StepProbe, deterministic
from truebatch.demos.tasks import Task, lm_task

FLOAT64_TOLERANCE = 1e-12
INSTALL = 'pip install "truebatch[bench]"'

Train = Callable[[Task, nn.Module, torch.optim.Optimizer], None]
"""Trains ``model`` with ``optimizer`` on every epoch of the task."""


@dataclass(frozen=True)
class Entry:
    """One method of the table.

    Attributes:
        name: the loop, in words.
        loss: how the loop normalizes the loss.
        shows: the classic failure the row shows (:mod:`truebatch.demos.failures`),
            or its role ("reference", "correct loop", "the fix").
        train: the training function.
    """

    name: str
    loss: str
    shows: str
    train: Train


@dataclass(frozen=True)
class Measured:
    """An entry's measurements.

    Attributes:
        full: max relative gradient difference from the big batch over the full windows.
        short: the same over the short windows that end the epochs.
        seconds: wall time of each timed run.
    """

    entry: Entry
    full: float
    short: float
    seconds: list[float]

    @property
    def fastest(self) -> float:
        """Wall time of the fastest run."""
        return min(self.seconds)


def _without_steps(method: Method) -> Train:
    """``method`` with its per-step callback ignored."""

    def train(task: Task, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        method(task, model, optimizer, lambda loss: None)

    return train


BASELINE = Entry(
    "hand-written",
    "sum / window's N",
    "correct loop",
    _without_steps(methods.hand_written_exact),
)
TRUEBATCH = Entry(
    "truebatch step_window",
    "sum, tb.count_tokens",
    "the fix",
    _without_steps(methods.accumulator_windows),
)


def entries() -> tuple[list[Entry], list[str]]:
    """The methods to compare, and a note for each framework that is not installed."""
    compared = [
        Entry("big batch", "token mean", "reference", _without_steps(methods.big_batch)),
        BASELINE,
        TRUEBATCH,
        Entry(
            "hand-written",
            "mean / k",
            failures.TOKEN_MEAN,
            _without_steps(methods.naive(loops.mean_loss_over_k)),
        ),
        Entry(
            "hand-written, zero_grad() each",
            "mean / k",
            failures.ZERO_GRAD,
            _without_steps(methods.naive(loops.zero_grad_every_micro_batch)),
        ),
    ]
    notes = []
    if frameworks.available("accelerate"):
        compared += [
            Entry(
                "accelerate accumulate()",
                "mean (default)",
                failures.TOKEN_MEAN,
                frameworks.accelerate_accumulate,
            ),
            Entry(
                "accelerate token recipe",
                "sum * k / window's N",
                "its docs' fix",
                frameworks.accelerate_token_recipe,
            ),
        ]
    else:
        notes.append(f"accelerate is not installed: its rows are skipped ({INSTALL})")
    if frameworks.available("lightning"):
        compared.append(
            Entry(
                "lightning accumulate_grad_batches",
                "mean (default)",
                failures.TOKEN_MEAN,
                frameworks.lightning_accumulate,
            )
        )
    else:
        notes.append(f"lightning is not installed: its row is skipped ({INSTALL})")
    return compared, notes


def _fresh(task: Task) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The shared initial model (seeded) and its optimizer; the RNG is reseeded for training."""
    torch.manual_seed(SEED)
    model = task.make_model()
    optimizer = task.make_optimizer(model)
    torch.manual_seed(SEED + 1)
    return model, optimizer


def gradient_differences(task: Task, train: Train) -> tuple[float, float]:
    """Train once and compare every step's gradient with the big batch's at the same weights.

    Returns the largest :func:`truebatch.compare.max_relative_difference`
    over the full windows and over the short ones. The big batch's gradient of
    window ``w`` is ``grad (1/N) sum_i loss_i`` over the window's ``N`` items,
    computed on a copy of the model holding the weights the step started from.
    """
    model, optimizer = _fresh(task)
    reference = copy.deepcopy(model)
    probe = StepProbe(optimizer)
    train(task, model, optimizer)
    probe.remove()
    batches = [batch for epoch in task.epochs for batch in epoch]
    if len(probe.grads) != len(batches):
        raise RuntimeError(
            f"the loop took {len(probe.grads)} optimizer steps, expected one per effective "
            f"batch ({len(batches)}); every method must step once per window"
        )
    full = short = 0.0
    for before, grads, batch in zip(probe.before, probe.grads, batches, strict=True):
        with torch.no_grad():
            for param, value in zip(reference.parameters(), before, strict=True):
                param.copy_(value)
        reference.zero_grad(set_to_none=True)
        task.mean_loss(reference, batch).backward()
        difference = max_relative_difference(grads, [p.grad for p in reference.parameters()])
        if batch_size(batch) == task.batch_size:
            full = max(full, difference)
        else:
            short = max(short, difference)
    return full, short


def measure(task: Task, compared: list[Entry], repeats: int) -> list[Measured]:
    """Exactness of every entry, then ``repeats`` alternating timed rounds (see module docs)."""
    progress = Progress(len(compared) * (1 + repeats), "bench: exactness and timing", "run")
    differences = {}
    for entry in compared:
        progress.note(f"exactness: {entry.name}, {entry.loss}")
        differences[entry] = gradient_differences(task, entry.train)
        progress.update()
    seconds: dict[Entry, list[float]] = {entry: [] for entry in compared}
    for _ in range(repeats):
        for entry in compared:
            progress.note(f"timing: {entry.name}, {entry.loss}")
            model, optimizer = _fresh(task)
            started = time.perf_counter()
            entry.train(task, model, optimizer)
            seconds[entry].append(time.perf_counter() - started)
            progress.update()
    progress.close()
    return [Measured(entry, *differences[entry], seconds[entry]) for entry in compared]


def format_table(measured: list[Measured]) -> str:
    """One row per method: gradient differences (full and short windows), time, two ratios.

    ``this / hand-written`` is the method's fastest time over the hand-written
    loop's; ``truebatch / this`` is truebatch's fastest time over the method's
    (below 1: truebatch is faster).
    """
    times = {row.entry: row.fastest for row in measured}
    lines = [
        (
            "#",
            "method",
            "loss",
            "shows",
            "grad diff, full windows",
            "short windows",
            f"<= {FLOAT64_TOLERANCE:g}",
            "time/run (s)",
            "this / hand-written",
            "truebatch / this",
        )
    ]
    for index, row in enumerate(measured, start=1):
        exact = max(row.full, row.short) <= FLOAT64_TOLERANCE
        lines.append(
            (
                str(index),
                row.entry.name,
                row.entry.loss,
                row.entry.shows,
                f"{row.full:.1e}",
                f"{row.short:.1e}",
                "yes" if exact else "no",
                f"{row.fastest:.3f}",
                f"{row.fastest / times[BASELINE]:.2f}x",
                f"{times[TRUEBATCH] / row.fastest:.2f}x",
            )
        )
    return table(lines)


def describe(task: Task, repeats: int) -> str:
    """The setup line printed above the table."""
    micro = micro_batches_of(task.epochs[0], task.micro_batch_size)
    tokens = [float(task.count(micro_batch)) for micro_batch in micro]
    parameters = sum(p.numel() for p in task.make_model().parameters())
    return (
        f"CharTransformer ({parameters} parameters) on the Zen of Python (float64), "
        f"{len(task.epochs)} epochs of "
        f"{len(task.epochs[0])} steps; effective batch {task.batch_size} lines = "
        f"{task.accumulation_steps} micro-batches of {task.micro_batch_size} lines holding "
        f"{min(tokens):.0f} to {max(tokens):.0f} tokens; each epoch ends with a window of "
        f"{batch_size(task.epochs[0][-1])} lines.\n"
        "grad diff: max over steps and parameter tensors of ||g - g_big|| / ||g_big||, "
        "g_big the big batch's gradient on the same window at the same weights.\n"
        f"time/run: fastest of {repeats} alternating runs of all epochs (one thread; "
        "framework setup such as Lightning's Trainer included)."
    )


def _width(text: str) -> int:
    """An argparse ``type``: a positive, even model width (the model has 2 attention heads)."""
    value = positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(
            f"width {value} is odd; the model splits it over 2 attention heads, "
            "so pass an even width such as 32 or 128"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``truebatch bench``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds: 1 epoch, 2 timed rounds (default: 10 epochs, 7 rounds)",
    )
    parser.add_argument("--epochs", type=positive_int, default=None, help="epochs per run")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed rounds")
    parser.add_argument(
        "--width",
        type=_width,
        default=32,
        help="the model's width, even (default 32; wider: more compute per step, so "
        "fixed per-step costs weigh less)",
    )


def run(epochs: int, repeats: int, width: int = 32) -> tuple[Task, list[Measured], list[str]]:
    """Measure every available method on ``epochs`` epochs with ``repeats`` timed rounds,
    the model ``width`` wide."""
    task = lm_task(epochs, width=width)
    compared, notes = entries()
    with deterministic():
        measured = measure(task, compared, repeats)
    return task, measured, notes


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print its table."""
    epochs = args.epochs or (1 if args.quick else 10)
    repeats = args.repeats or (2 if args.quick else 7)
    task, measured, notes = run(epochs, repeats, args.width)
    print("\n\n".join([describe(task, repeats), *notes, format_table(measured)]))
    return 0
