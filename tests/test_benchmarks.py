"""Smoke tests of the scripts in benchmarks/: each runs with ``--quick`` and prints its ratios.

These check that a benchmark runs end to end and reports what it measures; they
assert nothing about speed (timings belong to the benchmarks themselves, run on
a quiet machine). Add one test per benchmark script, using :func:`run_benchmark`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts import BENCHMARKS, run_script


def run_benchmark(script: str, *args: str, timeout: float = 240) -> str:
    """Run ``benchmarks/<script>`` in a fresh interpreter; return its stdout."""
    return run_script(BENCHMARKS / script, *args, timeout=timeout)


def test_overhead_quick_prints_a_ratio_per_model() -> None:
    out = run_benchmark("overhead.py", "--quick")
    rows = re.findall(
        r"^(MLP|CNN|Tiny)\s+4\s+[\d.]+ ms\s+[\d.]+ ms\s+[\d.]+ ms\s+([\d.]+)\s+[\d.]+"
        r"\s+(-?[\d.]+) ms  (ok|above target 1\.01|above target 0\.1 ms)$",
        out,
        re.M,
    )
    assert [row[0] for row in rows] == ["MLP", "CNN", "Tiny"], out
    for name, ratio, fixed, verdict in rows:
        # The verdict follows the printed ratio (median of the rounds' ratios), or on the
        # tiny model the printed fixed cost per window.
        good = float(fixed) <= 0.1 if name == "Tiny" else float(ratio) <= 1.01
        assert (verdict == "ok") == good, out


@pytest.mark.processes
def test_hsdp_benchmark_times_each_gradient_sync_and_they_reach_the_same_parameters() -> None:
    out = run_benchmark("hsdp.py", "--quick")
    per_window = re.findall(r"^  (\w+)\s+(\d+\.\d+) ms per window$", out, flags=re.MULTILINE)
    methods = ["hybrid", "hybrid_again", "micro_batch", "window"]
    assert [name for name, _ in per_window] == methods, out
    assert all(float(ms) > 0 for _, ms in per_window)
    for ratio in ("hybrid / micro_batch", "hybrid_again / hybrid", "window / hybrid"):
        assert re.search(rf"^{re.escape(ratio)} = \d+\.\d{{3}}\b", out, re.M), out
    # The three modes are the same update up to float32 summation order.
    differences = re.findall(r"^  (\w+)\s+(\d\.\de[-+]\d+)$", out, flags=re.MULTILINE)
    assert [name for name, _ in differences] == methods[1:], out
    assert all(float(d) <= 1e-6 for _, d in differences), out


@pytest.mark.processes
def test_ddp_benchmark_times_truebatch_against_both_hand_written_loops() -> None:
    out = run_benchmark("ddp.py", "--quick")
    per_window = re.findall(r"^  (\w+)\s+(\d+\.\d+) ms per window$", out, flags=re.MULTILINE)
    methods = [
        "truebatch",
        "no_sync",
        "no_sync_again",
        "sync_every",
        "fsdp2_micro_batch",
        "fsdp2_window",
    ]
    assert [name for name, _ in per_window] == methods, out
    assert all(float(ms) > 0 for _, ms in per_window)
    assert re.search(r"^    of which in its own collectives .*: \d+\.\d\d ms$", out, re.M), out
    verdict = r"^truebatch / no_sync    = \d+\.\d{3}  \(<= 1\.03: (PASS|FAIL)\)$"
    assert re.search(verdict, out, flags=re.MULTILINE), out
    assert re.search(r"^truebatch / sync_every = \d+\.\d{3}$", out, flags=re.MULTILINE), out
    assert re.search(r"^no_sync_again / no_sync = \d+\.\d{3}  \(the same loop", out, re.M), out
    fsdp2 = r"^fsdp2_window / fsdp2_micro_batch = \d+\.\d{3}$"
    assert re.search(fsdp2, out, flags=re.MULTILINE), out
    # Every method computes the same update as truebatch: the comparison is fair.
    differences = re.findall(r"^  (\w+)\s+(\d\.\de[-+]\d+)$", out, flags=re.MULTILINE)
    assert [name for name, _ in differences] == methods[1:], out
    assert all(float(difference) <= 1e-5 for _, difference in differences), out


def test_layers_quick_prints_a_ratio_per_cell_of_the_grid() -> None:
    out = run_benchmark("layers.py", "--quick", "--threads", "1", "--dtypes", "float32")
    cells = re.findall(
        r"^(GhostBatchNorm[123]d\(g=\d+\)|SplitInvariantDropout [\w -]+ eager) \S+ float32 "
        r"1 thread\(s\): native \d+\.\d+ ms, ratio (\d+\.\d+) (ok|ABOVE) \(<= ([\d.]+)\), "
        r"load \d+\.\d",
        out,
        flags=re.MULTILINE,
    )
    names = [name for name, *_ in cells]
    ghost = [f"GhostBatchNorm{d}(g={g})" for d in ("1d", "2d", "3d") for g in (2, 8, 32, 128)]
    assert names[:12] == ghost and len(names) == 15, out
    for _, ratio, verdict, target in cells:
        assert (verdict == "ok") == (float(ratio) <= float(target)), out
    assert re.search(r"^worst GhostBatchNorm: ratio \d+\.\d+ \(", out, flags=re.MULTILINE), out


def test_check_speed_benchmark_times_both_cases_against_the_baseline_step() -> None:
    out = run_benchmark("check_speed.py", "--quick", "--threads", "1")
    assert "100,682 parameters" in out, out
    assert "as written (BatchNorm, dropout): NOT equivalent" in out
    assert "findings ['batchnorm', 'buffer_mismatch', 'dropout']" in out
    assert "split-invariant dropout): equivalent" in out
    assert re.search(r"^baseline: one full-batch forward \+ backward \d+\.\d+ ms$", out, re.M)
    timing = r"^check, (as written|converted) .*: (\d+\.\d+) s, ratio (\d+)x"
    timings = re.findall(timing, out, re.M)
    assert [case for case, _, _ in timings] == ["as written", "converted"], out
    assert all(float(seconds) > 0 and int(ratio) > 0 for _, seconds, ratio in timings)


def test_memory_benchmark_reports_every_configuration_and_the_ratio() -> None:
    out = run_benchmark("memory.py", "--quick", timeout=300)
    extra = dict(re.findall(r"^  (\w+)\s+(\d+\.\d+) MiB", out, flags=re.MULTILINE))
    assert list(extra) == ["truebatch", "plain_micro", "plain_accumulation", "plain_full"], out
    assert float(extra["plain_full"]) > float(extra["truebatch"]) > 0
    verdict = r"^truebatch / plain_micro = \d+\.\d{3}  \(<= 1\.05: (PASS|FAIL)\)$"
    assert re.search(verdict, out, flags=re.MULTILINE), out


def test_precision_benchmark_prints_both_errors_per_k_and_saves_the_plot(tmp_path: Path) -> None:
    png = tmp_path / "precision.png"
    out = run_benchmark("precision.py", "--quick", "--out", str(png))
    rows = re.findall(
        r"^\s+(\d+)  (accumulation|total)\s+(\S+)\s+(\S+)\s+\S+$", out, flags=re.MULTILINE
    )
    assert [(int(k), reference) for k, reference, _, _ in rows] == [
        (k, reference) for k in (1, 4, 16) for reference in ("accumulation", "total")
    ], out
    errors = {(int(k), ref): (float(bf16), float(fp32)) for k, ref, bf16, fp32 in rows}
    assert errors[1, "accumulation"] == (0.0, 0.0)  # one micro-batch: nothing is summed
    bf16, fp32 = errors[16, "accumulation"]
    assert 0 < fp32 < bf16
    assert f"plot saved to {png}" in out
    assert png.read_bytes().startswith(b"\x89PNG")


def test_lr_scaling_quick_prints_accuracy_per_recipe_and_batch_and_saves_the_plot(
    tmp_path: Path,
) -> None:
    png = tmp_path / "lr_scaling.png"
    out = run_benchmark("lr_scaling.py", "--quick", "--out", str(png))
    header = re.search(r"^recipe\s+(\d+)\s+(\d+)$", out, flags=re.MULTILINE)
    assert header and header.groups() == ("16", "128"), out
    rows = {
        label.strip(): [float(mean) for mean in means.split()[::3]]
        for label, means in re.findall(r"^(\w.*?)\s{2,}(\d\.\d{3} ± .*)$", out, flags=re.MULTILINE)
    }
    assert list(rows) == [
        "SGD, same rate",
        "SGD, tb.scale_lr(rule='linear') + 2-epoch warmup",
        "Adam, same rate",
        "Adam, tb.scale_lr(rule='sqrt')",
    ], out
    assert all(0.5 < accuracy <= 1.0 for accuracies in rows.values() for accuracy in accuracies)
    # At 8 times the batch the rate tuned at 16 trains less in the same epochs; the scaled
    # rate recovers some of it (by about 10 points after 2 epochs on this seeded run).
    assert rows["SGD, tb.scale_lr(rule='linear') + 2-epoch warmup"][1] > rows["SGD, same rate"][1]
    assert rows["Adam, tb.scale_lr(rule='sqrt')"][1] > rows["Adam, same rate"][1]
    assert f"plot saved to {png}" in out
    assert png.read_bytes().startswith(b"\x89PNG")


def test_compile_benchmark_reports_compile_time_graphs_and_the_gradient_difference() -> None:
    out = run_benchmark("compile.py", "--quick", "--threads", "1", timeout=300)
    assert "400,394 parameters" in out, out
    row = r"^aot_eager\s+(\d+\.\d\d)s\s+(\d+\.\d\d)s\s+(\d+\.\d\d)\s+(\d+)\s+(\S+)$"
    (found,) = re.findall(row, out, re.M)
    # Shapes 32 and the ragged 4: at most one graph each; aot_eager runs eager's kernels.
    assert 1 <= int(found[3]) <= 2 and float(found[4]) <= 1e-5, out


@pytest.mark.slow
@pytest.mark.processes
def test_pipeline_benchmark_times_both_methods_and_prints_their_gradient_differences() -> None:
    out = run_benchmark("pipeline.py", "--quick")
    per_window = re.findall(r"^  (\w+)\s+(\d+\.\d+) ms per window$", out, flags=re.M)
    methods = ["truebatch", "own_scaling", "own_scaling_clip"]
    assert [name for name, _ in per_window] == methods, out
    ratios = re.findall(r"^truebatch / (\w+) = \d+\.\d{3}  \(median of 3 rounds\)$", out, re.M)
    assert ratios == methods[1:], out
    differences = dict(re.findall(r"^  (\w+)\s+(\d\.\de[-+]\d+)$", out, flags=re.M))
    # float64: truebatch within the contract's 1e-12, the schedule's own scaling far off.
    assert float(differences["truebatch"]) <= 1e-12, out
    assert float(differences["own_scaling"]) > 1e-2, out
    assert differences["own_scaling_clip"] == differences["own_scaling"], out
