"""truebatch's CPU kernels: a C++ extension built on first use, or PyTorch ops without it.

Ghost BatchNorm's small ghost batches need one pass over memory per step
(sums, then centring and scaling) to run at BatchNorm's speed; PyTorch's
element-wise ops make a pass, and a fresh tensor, per operation. The kernels
in ``cpu_kernels.cpp`` are compiled the first time a process needs them, with
the compiler PyTorch's own extensions use (``torch.utils.cpp_extension``:
a C++ compiler and ninja), into a directory keyed by the source, the torch
and Python versions, the platform and the CPU (under ``TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``): about half a minute once, then a
load of the built library. Processes that need it at the same time wait for
the one that builds (an ``flock``, released even if that process dies).

Without a compiler the layers take their PyTorch path, slower on small ghost
batches but with the same results, and say so once in a warning. Set
``TRUEBATCH_CPU_KERNELS=0`` to never build or use the kernels.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["available", "serves"]

ENVIRONMENT_VARIABLE = "TRUEBATCH_CPU_KERNELS"
_NAME = "truebatch_cpu"
_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")


def _flags() -> list[str]:
    """-O3; OpenMP for at::parallel_for on Linux (its symbols resolve to the runtime torch
    loaded); the machine's own vector instructions on x86-64 Linux, which is why the
    build directory is keyed by the CPU (:func:`_cpu`)."""
    flags = ["-O3", "-fno-math-errno"]
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")
        if platform.machine() in ("x86_64", "AMD64"):
            flags.append("-march=native")
    return flags


def _cpu() -> str:
    """The CPU's model and instruction-set flags (Linux), else the processor's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def _build_directory() -> Path:
    """A directory per source, flags, torch, Python, platform and CPU: a built library
    is only ever loaded where it was built for (a shared cache serves mixed machines)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    key = hashlib.sha256(_SOURCE.read_bytes())
    for part in (torch.__version__, sys.version, platform.platform(), _cpu(), *_flags()):
        key.update(part.encode())
    return Path(root) / f"{_NAME}_{key.hexdigest()[:16]}"


@contextlib.contextmanager
def _only_builder(directory: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``directory`` for as long as the block runs.

    An ``flock``: the system releases it when its process dies, so a build killed
    halfway never blocks the next one (torch's own lock file would, forever). Where
    there is no ``fcntl`` (Windows), torch's lock is the only one.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(directory / "truebatch.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load() -> None:
    """Loads the built library, building it first if this machine has none yet."""
    directory = _build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{_NAME}.so"
    with _only_builder(directory):
        # Holding the lock, no other build runs: a library here is complete, and a lock
        # file of torch's is what a killed build left.
        (directory / "lock").unlink(missing_ok=True)
        if library.exists():
            torch.ops.load_library(str(library))
            return
        from torch.utils import cpp_extension

        if sys.stderr.isatty():
            print(
                f"truebatch: compiling its CPU kernels into {directory} "
                "(once, about half a minute)",
                file=sys.stderr,
            )
        cpp_extension.load(
            _NAME,
            sources=[str(_SOURCE)],
            extra_cflags=_flags(),
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )


@functools.cache
def available() -> bool:
    """Whether ``torch.ops.truebatch_cpu`` is loaded: built on the first call if needed.

    False when ``TRUEBATCH_CPU_KERNELS=0``, or when the build fails (after one
    warning that names the reason and the fix).
    """
    if os.environ.get(ENVIRONMENT_VARIABLE, "1") == "0":
        return False
    try:
        _load()
    except Exception as error:  # any failure of the build leaves the PyTorch path
        warnings.warn(
            f"truebatch could not build its CPU kernels ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[-1] if str(error).strip() else error!r}); "
            "ghost BatchNorm and split-invariant dropout take their PyTorch path, with the same "
            "results, slower. Fix: install a C++ compiler and ninja (`pip install ninja`), or "
            f"set {ENVIRONMENT_VARIABLE}=0 to not try.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def serves(device: torch.device | str | None) -> bool:
    """Whether the kernels run on ``device``: a CPU one (``None`` is the CPU), with the
    library loaded (:func:`available`)."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device or "cpu").type
    return kind == "cpu" and available()
