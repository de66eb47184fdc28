"""``truebatch demo`` and ``truebatch bench`` end to end, in their reduced (``--quick``) modes.

Each classic failure (:mod:`truebatch.demos.failures`) is reproduced and shown fixed:

- "zero_grad every micro-batch", "short last window divided by k" and
  "BatchNorm and dropout per micro-batch" on the digits CNN: their rows end far
  from the big batch; truebatch on split-invariant layers ends within the
  float64 contract of its big batch;
- "mean loss / k on variable-length tokens" on the character LM, in the demo
  and in the bench, where Accelerate's and Lightning's default loss handling
  reproduce it too.

"Far" means a relative difference above ``NAIVE_THRESHOLD`` (1%), ten orders
of magnitude above the contract's float64 tolerance (1e-12).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from truebatch.compare import max_relative_difference
from truebatch.demos import bench, demo, failures, frameworks, loops, methods, runs
from truebatch.demos.console import Progress
from truebatch.demos.data import IGNORE_INDEX, micro_batches_of
from truebatch.demos.runs import SEED, deterministic
from truebatch.demos.tasks import lm_task

FLOAT64_TOLERANCE = 1e-12
NAIVE_THRESHOLD = 1e-2


@dataclasses.dataclass(frozen=True)
class Demo:
    """One ``truebatch demo --quick`` run: its results, printed text and plot."""

    result: demo.DemoResult
    text: str
    png: Path
    args: argparse.Namespace


def _quick_demo(task: str, folder: Path) -> Demo:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    png = folder / task / "plot.png"
    args = parser.parse_args(["--quick", "--task", task, "--out", str(png)])
    result = demo.run(args)
    return Demo(result, demo.render(result, args), png, args)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # The demos run on one thread; so do the references here (no oversubscription
    # when the suite runs on two workers of a 2-core machine).
    with deterministic():
        yield


@pytest.fixture(scope="module")
def digits_demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return _quick_demo("digits", tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def lm_demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return _quick_demo("lm", tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def digits(digits_demo: Demo) -> demo.DemoResult:
    return digits_demo.result


@pytest.fixture(scope="module")
def lm(lm_demo: Demo) -> demo.DemoResult:
    return lm_demo.result


def _rows(result: demo.DemoResult) -> dict[str, demo.Row]:
    return {row.spec.label: row for row in result.rows}


def _plain_big_batch(result: demo.DemoResult, loss) -> list[torch.Tensor]:
    """The big-batch run written out: same seeds, one mean-loss SGD step per effective batch."""
    task = result.task
    torch.manual_seed(SEED)
    model = task.make_model()
    optimizer = task.make_optimizer(model)
    torch.manual_seed(SEED + 1)
    for batches in task.epochs:
        for batch in batches:
            optimizer.zero_grad()
            loss(model, batch).backward()
            optimizer.step()
    return [p.detach() for p in model.parameters()]


def _digits_mean_loss(model, batch):
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def _token_mean_loss(model, batch):
    logits = model(batch["input_ids"])[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def test_digits_reference_row_is_the_plain_big_batch_loop(digits: demo.DemoResult) -> None:
    expected = _plain_big_batch(digits, _digits_mean_loss)
    final = _rows(digits)["1"].run.snapshots[-1]
    assert max_relative_difference(final, expected) <= FLOAT64_TOLERANCE


def test_lm_reference_row_is_the_plain_big_batch_loop(lm: demo.DemoResult) -> None:
    expected = _plain_big_batch(lm, _token_mean_loss)
    final = _rows(lm)["1"].run.snapshots[-1]
    assert max_relative_difference(final, expected) <= FLOAT64_TOLERANCE


def test_digits_truebatch_on_split_invariant_layers_is_the_big_batch(
    digits: demo.DemoResult,
) -> None:
    # Row 5 against row 1*: every step, not only the last, within the contract.
    divergence = _rows(digits)["5"].run.divergence
    assert len(divergence) == digits.task.steps
    assert max(divergence) <= FLOAT64_TOLERANCE


@pytest.mark.parametrize(
    "label",
    [
        "2",  # zero_grad every micro-batch
        "3",  # mean loss / k: short last window divided by k
        "4",  # truebatch, but BatchNorm and dropout per micro-batch depend on the split
    ],
)
def test_digits_naive_rows_end_far_from_the_big_batch(digits: demo.DemoResult, label: str) -> None:
    row = _rows(digits)[label]
    assert row.spec.reference == "1"
    assert row.run.final_difference > NAIVE_THRESHOLD


def test_digits_single_windows_show_where_each_loop_goes_wrong(digits: demo.DemoResult) -> None:
    # Eval mode takes BatchNorm and dropout out: what is left is each loop's arithmetic.
    first, last = 0, 1
    errors = digits.window_errors.errors
    # zero_grad() every micro-batch is wrong on any window.
    assert errors["2"][first] > NAIVE_THRESHOLD and errors["2"][last] > NAIVE_THRESHOLD
    # mean / k is right on a window of k equal micro-batches, wrong on the short last one.
    assert errors["3"][first] <= FLOAT64_TOLERANCE
    assert errors["3"][last] > NAIVE_THRESHOLD
    # truebatch is right on both.
    assert max(errors["4"]) <= FLOAT64_TOLERANCE


def test_digits_checker_names_batchnorm_and_dropout(digits: demo.DemoResult) -> None:
    assert digits.report is not None and not digits.report.equivalent
    found = {(finding.module, finding.kind) for finding in digits.report.findings}
    assert {
        ("features.1", "batchnorm"),
        ("features.4", "batchnorm"),
        ("head.1", "dropout"),
        ("head.4", "dropout"),
    } <= found
    printed = next(note for note in digits.notes if note.startswith("tb.check"))
    assert str(digits.report) in printed


def test_lm_truebatch_with_count_tokens_is_the_big_batch(lm: demo.DemoResult) -> None:
    divergence = _rows(lm)["3"].run.divergence
    assert len(divergence) == lm.task.steps
    assert max(divergence) <= FLOAT64_TOLERANCE
    assert max(lm.window_errors.errors["3"]) <= FLOAT64_TOLERANCE


def test_lm_mean_of_micro_batch_means_is_not_the_token_mean(lm: demo.DemoResult) -> None:
    # Mean loss / k on variable-length tokens: micro-batches hold different token counts,
    # so even full windows differ.
    assert _rows(lm)["2"].run.final_difference > NAIVE_THRESHOLD
    assert min(lm.window_errors.errors["2"]) > NAIVE_THRESHOLD


def _numbers(result: demo.DemoResult) -> list:
    runs = [(row.run.losses, row.run.divergence, row.run.metric) for row in result.rows]
    return [runs, result.window_errors.errors]


def test_demo_is_deterministic(digits_demo: Demo, lm_demo: Demo) -> None:
    for first in (digits_demo, lm_demo):
        again = demo.run(first.args)
        assert _numbers(again) == _numbers(first.result)


def _table_rows(out: str, header: str) -> dict[str, list[str]]:
    """The table under ``header``'s line, cells split on runs of 2+ spaces, keyed by ``#``."""
    lines = out[out.index(header) :].splitlines()[2:]
    rows = {}
    for line in lines:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("task", ["digits", "lm"])
def test_demo_prints_the_table_and_saves_the_plot(
    task: str, digits_demo: Demo, lm_demo: Demo
) -> None:
    run = {"digits": digits_demo, "lm": lm_demo}[task]
    assert run.text.endswith(f"Plot of loss and parameter divergence per step: {run.png}")
    assert run.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _table_rows(run.text, "#  ")
    exact = {"digits": ["5"], "lm": ["3"]}[task]
    naive = {"digits": ["2", "3", "4"], "lm": ["2"]}[task]
    for label in exact:
        assert float(rows[label][4].split(" vs ")[0]) <= FLOAT64_TOLERANCE
        assert rows[label][5] == "yes"
    for label in naive:
        assert float(rows[label][4].split(" vs ")[0]) > NAIVE_THRESHOLD
        assert rows[label][5] == "no"


def test_bench_measures_the_gradient_a_step_applies_against_the_big_batch() -> None:
    # One window: mean loss / k at the initial weights, against the token mean, written out.
    task = lm_task(1)
    task = dataclasses.replace(task, epochs=[task.epochs[0][:1]])
    mean_over_k = methods.naive(loops.mean_loss_over_k)
    full, short = bench.gradient_differences(
        task, lambda task, model, optimizer: mean_over_k(task, model, optimizer, lambda loss: None)
    )

    torch.manual_seed(SEED)
    model = task.make_model()
    window = task.epochs[0][0]
    big = torch.autograd.grad(_token_mean_loss(model, window), list(model.parameters()))
    micro = micro_batches_of([window], task.micro_batch_size)
    k = len(micro)
    assert k == task.accumulation_steps
    means = sum(_token_mean_loss(model, micro_batch) for micro_batch in micro) / k
    applied = torch.autograd.grad(means, list(model.parameters()))

    assert short == 0.0  # no short window in this task
    assert full == pytest.approx(max_relative_difference(list(applied), list(big)), rel=1e-9)
    assert full > NAIVE_THRESHOLD


def test_bench_quick_prints_exactness_and_overhead_in_one_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "truebatch.cli", "bench", "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = {(cells[1], cells[2]): cells for cells in _table_rows(out, "#  method").values()}

    def differences(method: str, loss: str) -> tuple[float, float]:
        cells = rows[method, loss]
        assert float(cells[8].rstrip("x")) > 0  # both time ratios are printed
        assert float(cells[9].rstrip("x")) > 0
        return float(cells[4]), float(cells[5])

    assert rows["hand-written", "sum / window's N"][8] == "1.00x"  # the speed baseline
    assert rows["truebatch step_window", "sum, tb.count_tokens"][9] == "1.00x"
    for exact in [
        ("big batch", "token mean"),
        ("hand-written", "sum / window's N"),
        ("truebatch step_window", "sum, tb.count_tokens"),
    ]:
        assert max(differences(*exact)) <= FLOAT64_TOLERANCE
    naive = differences("hand-written", "mean / k")
    assert min(naive) > NAIVE_THRESHOLD
    assert min(differences("hand-written, zero_grad() each", "mean / k")) > NAIVE_THRESHOLD

    if importlib.util.find_spec("accelerate"):
        # accumulate() with the default mean loss is the mean loss / k loop, number for number.
        assert differences("accelerate accumulate()", "mean (default)") == naive
        assert max(differences("accelerate token recipe", "sum * k / window's N")) <= 1e-12
    else:
        assert "accelerate is not installed" in out
    if importlib.util.find_spec("lightning"):
        assert differences("lightning accumulate_grad_batches", "mean (default)") == naive
    else:
        assert "lightning is not installed" in out


def test_bench_skips_missing_frameworks_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frameworks, "available", lambda framework: False)
    compared, notes = bench.entries()
    assert [entry.name for entry in compared] == [
        "big batch",
        "hand-written",
        "truebatch step_window",
        "hand-written",
        "hand-written, zero_grad() each",
    ]
    assert notes == [
        'accelerate is not installed: its rows are skipped (pip install "truebatch[bench]")',
        'lightning is not installed: its row is skipped (pip install "truebatch[bench]")',
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--width", "3"], "width 3 is odd"),
        (["--epochs", "0"], "expected a positive integer, got 0"),
        (["--repeats", "-1"], "expected a positive integer, got -1"),
    ],
)
def test_bench_refuses_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------- what a user reads


@pytest.mark.parametrize(
    ("task", "shown"),
    [
        (
            "digits",
            {
                "2": failures.ZERO_GRAD,
                "3": failures.SHORT_WINDOW,
                "4": failures.BATCHNORM_DROPOUT,
                "5": "the fix",
            },
        ),
        ("lm", {"2": failures.TOKEN_MEAN, "3": "the fix"}),
    ],
)
def test_demo_rows_name_the_classic_failure_they_show(
    task: str, shown: dict[str, str], digits_demo: Demo, lm_demo: Demo
) -> None:
    run = {"digits": digits_demo, "lm": lm_demo}[task]
    rows = _table_rows(run.text, "#  ")
    assert {label: rows[label][2] for label in shown} == shown
    assert "report 0" not in run.text and "reports 0" not in run.text


def test_bench_rows_name_the_classic_failure_they_show(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frameworks, "available", lambda framework: True)
    compared, _ = bench.entries()
    shows = {(entry.name, entry.loss): entry.shows for entry in compared}
    assert shows["hand-written", "mean / k"] == failures.TOKEN_MEAN
    assert shows["hand-written, zero_grad() each", "mean / k"] == failures.ZERO_GRAD
    assert shows["accelerate accumulate()", "mean (default)"] == failures.TOKEN_MEAN
    assert shows["lightning accumulate_grad_batches", "mean (default)"] == failures.TOKEN_MEAN


def test_plot_gives_every_compared_row_its_own_visible_curves(digits: demo.DemoResult) -> None:
    from truebatch.demos.plot import figure

    drawn = figure(digits.rows, digits.title, FLOAT64_TOLERANCE)
    compared = [row for row in digits.rows if row.spec.reference is not None]
    losses, divergences = drawn.axes[: len(compared)], drawn.axes[len(compared) :]
    assert len(drawn.axes) == 2 * len(compared)
    labels = {row.spec.label: row for row in digits.rows}
    for row, loss_axes, divergence_axes in zip(compared, losses, divergences, strict=True):
        reference = labels[row.spec.reference]
        band, line = loss_axes.get_lines()
        # The reference is a wide band under the row's thin line: where they coincide,
        # both still show.
        assert band.get_linewidth() >= 3 * line.get_linewidth()
        assert list(band.get_ydata()) == reference.run.losses
        assert list(line.get_ydata()) == row.run.losses
        assert line.get_marker() == "o"
        legend = [text.get_text() for text in loss_axes.get_legend().get_texts()]
        assert legend == [label.get_label() for label in (band, line)]
        assert legend[0].startswith(f"{reference.spec.label}: ")
        assert legend[1].startswith(f"{row.spec.label}: ")
        curve, contract = divergence_axes.get_lines()
        assert list(contract.get_ydata()) == [FLOAT64_TOLERANCE] * 2
        assert contract.get_linestyle() == "--"
        assert curve.get_ydata()[-1] == max(row.run.divergence[-1], 1e-18)
        legend = [text.get_text() for text in divergence_axes.get_legend().get_texts()]
        assert legend == [f"row {row.spec.label} vs row {reference.spec.label}", "contract: 1e-12"]
        low, high = divergence_axes.get_ylim()
        assert low < min(FLOAT64_TOLERANCE, *row.run.divergence) and high > max(row.run.divergence)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_writes_one_line_per_stage() -> None:
    log = io.StringIO()
    for stage in ("first", "second"):
        with Progress(5, stage, "step", stream=log) as progress:
            for _ in range(5):
                progress.note("running")
                progress.update()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(" in ")[0] for line in lines] == ["first: 5 steps", "second: 5 steps"]
    assert all(re.fullmatch(r"\w+: 5 steps in \d+\.\d s", line) for line in lines)


def test_progress_on_a_terminal_draws_a_bar_and_clears_it() -> None:
    terminal = _Terminal()
    with Progress(5, "training", "step", stream=terminal) as progress:
        for _ in range(5):
            progress.update()
    written = terminal.getvalue()
    assert "\r" in written and "training" in written
    assert "steps in" not in written  # no summary line: the bar was the progress


def test_demo_run_logs_one_line_per_run_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    task = lm_task(1)
    runs.train("1 big batch", task, methods.big_batch)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.fullmatch(rf"1 big batch: {task.steps} steps in \d+\.\d s\n", err)
