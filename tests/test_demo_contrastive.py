"""``truebatch demo --task contrastive --quick`` end to end.

Plain accumulation of NT-Xent gives each view only its micro-batch's negatives:
its gradient is far from the big batch's at every step (above 1%), while
step_cached's is within the float64 contract at every step.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from truebatch.demos import contrastive

FLOAT64_TOLERANCE = 1e-12


def test_quick_demo_separates_plain_accumulation_from_step_cached(tmp_path: Path) -> None:
    runs, title = contrastive.run_demo(epochs=1, train_size=301)
    by_label = {run.label: run for run in runs}
    assert max(by_label["3"].differences) <= FLOAT64_TOLERANCE
    assert min(by_label["2"].differences) > 1e-2
    assert len(by_label["3"].differences) == 3  # 301 images: windows of 128, 128, 45
    assert by_label["3"].losses == pytest.approx(by_label["1"].losses, rel=1e-12)
    png = contrastive.plot(runs, title, tmp_path / "plot.png")
    assert png.stat().st_size > 10_000


def test_cli_runs_the_contrastive_demo(tmp_path: Path) -> None:
    png = tmp_path / "c.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "truebatch.cli",
            "demo",
            "--task",
            "contrastive",
            "--quick",
            "--epochs",
            "1",
            "--out",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "step_cached, 8 x 16" in done.stdout and png.exists()
    row = next(line for line in done.stdout.splitlines() if line.startswith("3  "))
    assert " yes " in row
