"""Smoke test of benchmarks/cached.py: it runs end to end and prints every ratio it measures.

It asserts nothing about speed or memory (those are the benchmark's own verdicts,
printed for a quiet machine); only that each method is timed and measured, and that
step_cached's float64 gradient matches the big batch's.
"""

from __future__ import annotations

import re

from scripts import BENCHMARKS, run_script


def test_cached_benchmark_quick_times_and_measures_every_method() -> None:
    out = run_script(BENCHMARKS / "cached.py", "--quick", timeout=900)
    difference = re.search(r"max relative difference (\S+)$", out, re.M)
    assert difference and float(difference.group(1)) <= 1e-12, out
    timed = re.findall(r"^  (\w+)\s+[\d.]+ ms per window\s+([\d.]+)$", out, re.M)
    names = [name for name, _ in timed]
    assert names[:4] == ["big_batch", "plain_accumulation", "step_cached", "hand_two_pass"], out
    assert dict(timed)["plain_accumulation"] == "1.000"
    measured = re.findall(r"^  (\w+)\s+(-?[\d.]+) MiB$", out, re.M)
    assert [name for name, _ in measured] == names, out
    assert re.search(
        r"^step_cached / plain_accumulation = [\d.]+  \(<= 1\.35: (PASS|FAIL)\)$", out, re.M
    )
    verdict = (
        r"^step_cached / \(plain_accumulation \+ representations\) = [\d.]+  "
        r"\(<= 1\.1: (PASS|FAIL)\)$"
    )
    assert re.search(verdict, out, re.M), out
