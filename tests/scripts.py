"""Running the repository's scripts (examples/, benchmarks/) as a user would, for tests."""

from __future__ import annotations

import os
import shutil
import signal
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


def run_torchrun(path: Path, processes: int, *args: str, cwd: Path, timeout: float = 300) -> str:
    """Run ``torchrun --standalone --nproc-per-node processes path *args``; return its stdout.

    A single-node rendezvous on a free port (``--master-port 0`` would hand every
    worker MASTER_PORT=0). The run gets a session of its own, so that a hung rank is
    killed with torchrun, not left running. Fails with the end of stderr on a
    non-zero exit or after ``timeout`` seconds.
    """
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun is installed with torch"
    command = [torchrun, "--standalone", "--nproc-per-node", str(processes), str(path), *args]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            raise AssertionError(
                f"{path.name} did not finish in {timeout} s:\n{stdout[-2000:]}\n{stderr[-3000:]}"
            ) from None
    assert process.returncode == 0, stderr[-3000:]
    return stdout
