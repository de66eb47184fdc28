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
