"""``truebatch demo``: accumulation going wrong, and truebatch getting it right.

Default (``--task digits``): :class:`~truebatch.demos.models.DigitsCNN`
(BatchNorm, dropout) on scikit-learn's bundled digits, trained from the same
initial weights on the same data order, in float64, six ways:

1. the true big batch (64 samples per step, mean loss);
2. a hand-written loop with ``zero_grad()`` every micro-batch;
3. a hand-written loop dividing each micro-batch's mean loss by k, with each
   epoch's short last window divided by k too;
4. truebatch on the model as is (BatchNorm and dropout per micro-batch still
   depend on the split; ``tb.check`` names them);
1*. the big batch again, on split-invariant layers (ghost BatchNorm,
   split-invariant dropout), under the Accumulator with one whole batch per
   window: the reference of row 5;
5. truebatch on the same split-invariant layers, micro-batches of 16.

``--task lm``: :class:`~truebatch.demos.models.CharTransformer` on the Zen of
Python, variable-length lines with ``ignore_index`` padding: the big batch's
token mean, the mean of per-micro-batch means / k (mean loss / k on
variable-length tokens), and truebatch with ``tb.count_tokens``.

The rows are labeled with the classic failures of
:mod:`truebatch.demos.failures` they show.

Prints a table (final metric, relative parameter difference from the
reference, wall time), the gradient each loop applies on one full and one
short window, and saves a PNG of loss and divergence per step.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from truebatch.batching import Batch, batch_size
from truebatch.check import Report, check
from truebatch.compare import max_relative_difference
from truebatch.demos import failures, loops, methods
from truebatch.demos.console import positive_int, table
from truebatch.demos.data import micro_batches_of
from truebatch.demos.methods import Method
from truebatch.demos.runs import (
    SEED,
    Run,
    StepProbe,
    deterministic,
    train,
)
from truebatch.demos.tasks import Task, digits_task, lm_task

FLOAT64_TOLERANCE = 1e-12
GHOST_BATCH_SIZE = 8
DTYPE_NOTE = (
    "dtype: float64 throughout. Rounding is then ~1e-16, so a parameter difference above the "
    "contract's 1e-12 is a different update, never rounding (in float32 the line would sit "
    "at 1e-5, where small real differences could hide)."
)


# ------------------------------------------------------------------- methods


def _split_invariant(model: nn.Module) -> nn.Module:
    """Ghost BatchNorm (chunks of ``GHOST_BATCH_SIZE``) and split-invariant dropout."""
    from truebatch.nn import convert_batchnorm, convert_dropout

    return convert_dropout(convert_batchnorm(model, GHOST_BATCH_SIZE))


# ---------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Spec:
    """One way to train, as a row of the table.

    Attributes:
        label: the row's number (``"1*"`` marks a second reference).
        method_text: what is trained, in words.
        shows: the classic failure the row shows (:mod:`truebatch.demos.failures`),
            or its role ("reference", "the fix").
        method: the training method.
        reference: label of the row it is compared with (``None``: a reference).
        convert: applied to the fresh model before training (keeps the weights).
    """

    label: str
    method_text: str
    shows: str
    method: Method
    reference: str | None = None
    convert: Callable[[nn.Module], nn.Module] | None = None


@dataclass(frozen=True)
class Row:
    """A trained :class:`Spec`."""

    spec: Spec
    run: Run


@dataclass(frozen=True)
class WindowErrors:
    """The gradient each compared method applies on single windows, against the big batch's.

    Attributes:
        windows: a description of each window (e.g. ``"last: 29 samples (16+13)"``).
        errors: per spec label, per window, the relative difference
            (:func:`truebatch.compare.max_relative_difference`).
        condition: how the model was evaluated (e.g. in eval mode).
    """

    windows: list[str]
    errors: dict[str, list[float]]
    condition: str


@dataclass(frozen=True)
class DemoResult:
    """A demo's rows and what the output needs to describe them.

    Attributes:
        report: ``tb.check``'s report on the model as is, when the demo runs it.
    """

    task: Task
    title: str
    rows: list[Row]
    window_errors: WindowErrors
    notes: list[str]
    report: Report | None = None


def train_rows(task: Task, specs: list[Spec]) -> list[Row]:
    """Train every spec in order; a spec's reference must come before it."""
    runs: dict[str, Run] = {}
    rows = []
    for spec in specs:
        reference = runs[spec.reference] if spec.reference is not None else None
        run = train(f"{spec.label} {spec.method_text}", task, spec.method, spec.convert, reference)
        runs[spec.label] = run
        rows.append(Row(spec, run))
    return rows


def window_errors(task: Task, specs: list[Spec], condition: str) -> WindowErrors:
    """The gradient of one optimizer step of each method, on the first (full) and the
    last (short) window of the first epoch, at the initial weights with the model in
    eval mode, relative to the big batch's gradient on the same window.

    Gradients are read from the optimizer's step (a zero learning rate keeps the
    weights), so each method runs exactly the code of its training row.
    """
    first_epoch = task.epochs[0]
    chosen = [first_epoch[0], first_epoch[-1]]
    probe_task = dataclasses.replace(task, epochs=[chosen])

    def applied(method: Method) -> list[list[torch.Tensor]]:
        torch.manual_seed(SEED)
        model = task.make_model().eval()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        probe = StepProbe(optimizer)
        method(probe_task, model, optimizer, lambda loss: None)
        probe.remove()
        return probe.grads

    reference = applied(methods.big_batch)
    errors = {
        spec.label: [
            max_relative_difference(grads, ref)
            for grads, ref in zip(applied(spec.method), reference, strict=True)
        ]
        for spec in specs
    }
    described = [
        f"{name}: {_describe(task, window)}"
        for name, window in zip(("first", "last"), chosen, strict=True)
    ]
    return WindowErrors(described, errors, condition)


def _describe(task: Task, window: Batch) -> str:
    """``"29 samples (16+13)"``: a window's items and how its micro-batches hold them."""
    parts = [float(task.count(mb)) for mb in micro_batches_of([window], task.micro_batch_size)]
    return f"{sum(parts):.0f} {task.items} ({'+'.join(f'{p:.0f}' for p in parts)})"


# --------------------------------------------------------------------- demos


def check_report(task: Task) -> Report:
    """``tb.check`` on the task's initial model as is, first effective batch."""
    torch.manual_seed(SEED)
    report = check(
        task.make_model(),
        task.sum_loss,
        task.epochs[0][0],
        micro_batch_sizes=[task.micro_batch_size],
    )
    return report


def run_digits(epochs: int = 4, train_size: int | None = None) -> DemoResult:
    """The default demo: six runs of :class:`DigitsCNN` on the digits (see module docs)."""
    task = digits_task(epochs, train_size)
    big = Spec(
        "1", f"big batch ({task.batch_size} per step)", "reference of 2-4", methods.big_batch
    )
    compared = [
        Spec(
            "2",
            "hand-written, zero_grad() each",
            failures.ZERO_GRAD,
            methods.naive(loops.zero_grad_every_micro_batch),
            reference="1",
        ),
        Spec(
            "3",
            "hand-written, mean loss / k",
            failures.SHORT_WINDOW,
            methods.naive(loops.mean_loss_over_k),
            reference="1",
        ),
        Spec(
            "4",
            "truebatch, model as is",
            failures.BATCHNORM_DROPOUT,
            methods.accumulator_windows,
            reference="1",
        ),
    ]
    invariant = [
        Spec(
            "1*",
            "big batch, split-invariant layers",
            "reference of 5",
            methods.accumulator_whole_batches,
            convert=_split_invariant,
        ),
        Spec(
            "5",
            "truebatch, split-invariant layers",
            "the fix",
            methods.accumulator_windows,
            reference="1*",
            convert=_split_invariant,
        ),
    ]
    with deterministic():
        report = check_report(task)
        rows = train_rows(task, [big, *compared, *invariant])
        errors = window_errors(
            task, compared, "model in eval mode: BatchNorm on running statistics, no dropout"
        )
    title = (
        f"DigitsCNN (BatchNorm, dropout) on scikit-learn's digits: {_items(task)} training "
        f"images, {epochs} epochs of {len(task.epochs[0])} steps; effective batch "
        f"{task.batch_size} = {task.accumulation_steps} micro-batches of "
        f"{task.micro_batch_size}; each epoch ends with a window of "
        f"{batch_size(task.epochs[0][-1])}"
    )
    notes = [
        DTYPE_NOTE,
        f"tb.check on the model as is (first effective batch, micro-batches of "
        f"{task.micro_batch_size}):\n{report}",
        f"Rows 1* and 5 use tb.nn.convert_batchnorm(model, {GHOST_BATCH_SIZE}) and "
        "tb.nn.convert_dropout(model): ghost BatchNorm and split-invariant dropout.",
    ]
    return DemoResult(task, title, rows, errors, notes, report)


def run_lm(epochs: int = 30) -> DemoResult:
    """``--task lm``: three runs of :class:`CharTransformer` on the Zen of Python."""
    task = lm_task(epochs)
    big = Spec("1", "big batch (token mean)", "reference of 2-3", methods.big_batch)
    compared = [
        Spec(
            "2",
            "hand-written, mean loss / k",
            failures.TOKEN_MEAN,
            methods.naive(loops.mean_loss_over_k),
            reference="1",
        ),
        Spec(
            "3", "truebatch, tb.count_tokens", "the fix", methods.accumulator_windows, reference="1"
        ),
    ]
    with deterministic():
        rows = train_rows(task, [big, *compared])
        errors = window_errors(task, compared, "the model has no split-dependent layer")
    tokens = [
        float(task.count(mb)) for mb in micro_batches_of(task.epochs[0], task.micro_batch_size)
    ]
    title = (
        f"CharTransformer on the Zen of Python by character: {_items(task)} lines, {epochs} "
        f"epochs of {len(task.epochs[0])} steps; effective batch {task.batch_size} lines = "
        f"{task.accumulation_steps} micro-batches of {task.micro_batch_size} lines, holding "
        f"{min(tokens):.0f} to {max(tokens):.0f} tokens"
    )
    notes = [
        DTYPE_NOTE,
        "Optimizer: SGD with momentum. Adam divides every gradient element by its own "
        "magnitude, which lifts rounding in near-cancelling elements to ~1e-13 update "
        "differences; SGD keeps the exact row at rounding level.",
    ]
    return DemoResult(task, title, rows, errors, notes)


def _items(task: Task) -> int:
    return sum(batch_size(batch) for batch in task.epochs[0])


# -------------------------------------------------------------------- output


def format_rows(result: DemoResult) -> str:
    """The main table: per row, the final metric, the distance from its reference, the time."""
    lines = [
        (
            "#",
            "method",
            "shows",
            result.task.metric,
            "max rel. param diff",
            f"<= {FLOAT64_TOLERANCE:g}",
            "time (s)",
        )
    ]
    for row in result.rows:
        difference = row.run.final_difference
        if difference is None:
            compared, exact = "(reference)", ""
        else:
            compared = f"{difference:.1e} vs {row.spec.reference}"
            exact = "yes" if difference <= FLOAT64_TOLERANCE else "no"
        lines.append(
            (
                row.spec.label,
                row.spec.method_text,
                row.spec.shows,
                f"{row.run.metric:.4f}",
                compared,
                exact,
                f"{row.run.seconds:.1f}",
            )
        )
    return table(lines)


def format_window_errors(result: DemoResult) -> str:
    """The one-window table: each method's gradient against the big batch's."""
    errors = result.window_errors
    labels = list(errors.errors)
    lines = [("window", *(f"row {label}" for label in labels))]
    for index, window in enumerate(errors.windows):
        lines.append((window, *(f"{errors.errors[label][index]:.1e}" for label in labels)))
    return table(lines)


def format_result(result: DemoResult, plot_path: Path) -> str:
    """Everything the demo prints."""
    parts = [result.title, *result.notes, format_rows(result)]
    parts.append(
        "One optimizer step from the initial weights, "
        f"{result.window_errors.condition}: relative difference of the gradient each loop "
        "applies from the big batch's gradient on the same window\n" + format_window_errors(result)
    )
    parts.append(f"Plot of loss and parameter divergence per step: {plot_path}")
    return "\n\n".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``truebatch demo``."""
    parser.add_argument(
        "--task",
        choices=("digits", "lm", "contrastive"),
        default="digits",
        help="digits: CNN with BatchNorm and dropout (default); lm: tiny character language "
        "model; contrastive: in-batch negatives (step_cached)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="epochs to train (default: 4 digits, 30 lm)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds: 301 training images and 2 epochs (digits), 3 epochs (lm)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to save the plot (default: truebatch-output/demo.png, demo-lm.png for lm)",
    )


def run(args: argparse.Namespace) -> DemoResult:
    """The demo the parsed arguments select."""
    if args.task == "lm":
        return run_lm(args.epochs or (3 if args.quick else 30))
    return run_digits(args.epochs or (2 if args.quick else 4), 301 if args.quick else None)


def render(result: DemoResult, args: argparse.Namespace) -> str:
    """Save the demo's plot (``--out``, or a default under ``truebatch-output/``) and return
    the text the demo prints, which ends with the plot's path."""
    from truebatch.demos.plot import plot_runs

    default_name = "demo-lm.png" if args.task == "lm" else "demo.png"
    path = args.out or Path("truebatch-output") / default_name
    plot_runs(result.rows, result.title, path, FLOAT64_TOLERANCE)
    return format_result(result, path)


def main(args: argparse.Namespace) -> int:
    """Run the demo, save its plot and print its tables."""
    if args.task == "contrastive":
        from truebatch.demos import contrastive

        return contrastive.main(args)
    print(render(run(args), args))
    return 0
