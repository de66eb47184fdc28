"""Running the repository's scripts (examples/, benchmarks/) as a user would, for tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
BENCHMARKS = REPO / "benchmarks"


def run_script(path: Path, *args: str, timeout: float = 240) -> str:
    """Run the Python script ``path`` in a fresh interpreter; return its stdout.

    Fails with the script's stderr if it exits with a non-zero code.
    """
    completed = subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout
