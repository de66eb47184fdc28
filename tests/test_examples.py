"""The plain-loop example runs as a script and trains (the other examples are tested with
their features: tests/test_distributed.py, tests/test_integrations.py, tests/test_pipeline.py)."""

from __future__ import annotations

import re

from scripts import EXAMPLES, run_script


def test_plain_loop_example_steps_once_per_window_and_learns() -> None:
    out = run_script(EXAMPLES / "plain_loop.py", "--epochs", "2", timeout=120)
    rows = re.findall(r"step (\d+), last window (\d+) samples, .* test accuracy ([\d.]+)", out)
    assert len(rows) == 2, out
    # 1500 training samples in micro-batches of 32 -> 47 micro-batches -> 12 windows of 4
    # per epoch, the last one holding the remaining 1500 - 11 * 128 samples.
    assert [int(step) for step, _, _ in rows] == [12, 24]
    assert {int(count) for _, count, _ in rows} == {1500 - 11 * 128}
    assert float(rows[-1][2]) > 0.5  # ten classes: chance is 0.1
