"""Smoke test of benchmarks/cached.py: it runs end to end and prints every ratio it measures.

It asserts nothing about speed or memory (those are the benchmark's own verdicts,
printed for a quiet machine); only that each method is timed and measured, that the
printed ratios are consistent with each other, and that step_cached's float64
gradient matches the big batch's.
"""

from __future__ import annotations

import re

from scripts import BENCHMARKS, run_script


def test_cached_benchmark_quick_times_and_measures_every_method() -> None:
    out = run_script(BENCHMARKS / "cached.py", "--quick", timeout=900)
    difference = re.search(r"max relative difference (\S+)$", out, re.M)
    assert difference and float(difference.group(1)) <= 1e-12, out
    rows = re.findall(r"^  (\w+)\s+([\d.]+)\s+([\d.]+)(?:\s+([\d.]+))?$", out, re.M)
    names = [row[0] for row in rows]
    assert names[:4] == ["big_batch", "plain_accumulation", "step_cached", "hand_two_pass"], out
    assert names[-1] == "no_grad_encode", out
    ratios = {name: (float(plain), versus) for name, _, plain, versus in rows}
    assert ratios["plain_accumulation"][0] == 1.0
    assert ratios["step_cached"][1] == "1.000"
    assert all(versus for name, (_, versus) in ratios.items() if name != "no_grad_encode"), out
    floor = re.search(
        r"^no-grad forward / \(forward \+ backward\) = ([\d.]+): .* is ([\d.]+) x", out, re.M
    )
    assert floor and abs(1 + float(floor.group(1)) - float(floor.group(2))) < 2e-3, out
    assert float(floor.group(1)) == ratios["no_grad_encode"][0], out
    assert re.search(
        r"^step_cached / floor \(plain_accumulation \+ no_grad_encode\) = [\d.]+$", out, re.M
    )
    assert re.search(
        r"^step_cached / plain_accumulation = [\d.]+  \(<= 1\.35: (PASS|FAIL)\)", out, re.M
    ), out
    measured = re.findall(r"^  (\w+)\s+(-?[\d.]+) MiB$", out, re.M)
    assert [name for name, _ in measured] == names[:-1], out
    verdict = (
        r"^step_cached / \(plain_accumulation \+ representations\) = [\d.]+  "
        r"\(<= 1\.1: (PASS|FAIL)\)$"
    )
    assert re.search(verdict, out, re.M), out
    assert re.search(r"load average [\d.]+ [\d.]+ [\d.]+ on \d+ cores", out), out
