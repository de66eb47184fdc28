"""Smoke tests of the scripts in benchmarks/: each runs with ``--quick`` and prints its ratios.

These check that a benchmark runs end to end and reports what it measures; they
assert nothing about speed (timings belong to the benchmarks themselves, run on
a quiet machine). Add one test per benchmark script, using :func:`run_benchmark`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(script: str, *args: str, timeout: float = 240) -> str:
    """Run ``benchmarks/<script>`` in a fresh interpreter; return its stdout.

    Fails with the script's stderr if it exits with a non-zero code.
    """
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_overhead_quick_prints_a_ratio_per_model() -> None:
    out = run_benchmark("overhead.py", "--quick")
    rows = re.findall(
        r"^(MLP|CNN)\s+4\s+([\d.]+) ms\s+([\d.]+) ms\s+([\d.]+) ms\s+([\d.]+)\s+([\d.]+)",
        out,
        re.M,
    )
    assert [row[0] for row in rows] == ["MLP", "CNN"], out
    for _, hand, hand_norm, ours, ratio, ratio_norm in rows:
        # The printed ratios are those of the printed medians, up to their rounding.
        assert abs(float(ratio) - float(ours) / float(hand)) < 2e-3, out
        assert abs(float(ratio_norm) - float(ours) / float(hand_norm)) < 2e-3, out


def test_ddp_benchmark_times_truebatch_against_both_hand_written_loops() -> None:
    out = run_benchmark("ddp.py", "--quick")
    per_window = re.findall(r"^  (\w+)\s+(\d+\.\d+) ms per window$", out, flags=re.MULTILINE)
    methods = ["truebatch", "no_sync", "sync_every", "fsdp2_micro_batch", "fsdp2_window"]
    assert [name for name, _ in per_window] == methods, out
    assert all(float(ms) > 0 for _, ms in per_window)
    assert re.search(r"^    of which in its own collectives .*: \d+\.\d\d ms$", out, re.M), out
    verdict = r"^truebatch / no_sync    = \d+\.\d{3}  \(<= 1\.03: (PASS|FAIL)\)$"
    assert re.search(verdict, out, flags=re.MULTILINE), out
    assert re.search(r"^truebatch / sync_every = \d+\.\d{3}$", out, flags=re.MULTILINE), out
    fsdp2 = r"^fsdp2_window / fsdp2_micro_batch = \d+\.\d{3}$"
    assert re.search(fsdp2, out, flags=re.MULTILINE), out
    # Every method computes the same update as truebatch: the comparison is fair.
    differences = re.findall(r"^  (\w+)\s+(\d\.\de[-+]\d+)$", out, flags=re.MULTILINE)
    assert [name for name, _ in differences] == methods[1:], out
    assert all(float(difference) <= 1e-5 for _, difference in differences), out
