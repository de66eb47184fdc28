"""Smoke tests of the benchmark scripts: each runs with ``--quick`` and prints its ratios.

Timings are never asserted (the machine is shared and noisy); a test checks
that the script runs to the end and reports every case it promises.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(name: str, *args: str, timeout: float = 180) -> str:
    """Run ``benchmarks/<name>.py --quick *args`` in a subprocess; its stdout (exit 0 required)."""
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_layers_benchmark_reports_a_ratio_per_case() -> None:
    out = run_benchmark("layers", "--threads", "1")
    ratios = re.findall(r"^(\w+)\S* .*ratio (\d+\.\d+)", out, flags=re.MULTILINE)
    assert [name for name, _ in ratios] == [
        "GhostBatchNorm2d",
        "SplitInvariantDropout",
        "GhostBatchNorm1d",
        "SplitInvariantDropout",
    ], out
    assert all(float(ratio) > 0 for _, ratio in ratios)


def test_check_speed_benchmark_times_both_cases_against_the_baseline_step() -> None:
    out = run_benchmark("check_speed", "--threads", "1")
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
    out = run_benchmark("memory", timeout=300)
    extra = dict(re.findall(r"^  (\w+)\s+(\d+\.\d+) MiB", out, flags=re.MULTILINE))
    assert list(extra) == ["truebatch", "plain_micro", "plain_accumulation", "plain_full"], out
    assert float(extra["plain_full"]) > float(extra["truebatch"]) > 0
    verdict = r"^truebatch / plain_micro = \d+\.\d{3}  \(<= 1\.05: (PASS|FAIL)\)$"
    assert re.search(verdict, out, flags=re.MULTILINE), out


def test_precision_benchmark_prints_both_errors_per_k_and_saves_the_plot(tmp_path: Path) -> None:
    png = tmp_path / "precision.png"
    out = run_benchmark("precision", "--out", str(png))
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
