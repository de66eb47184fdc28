"""Shared pytest configuration: one hypothesis profile and one intra-op thread per process."""

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, settings

# Exactness examples run real forward/backward passes: no per-example deadline, no
# health check timed against the clock (a loaded CI runner is slow), and a number of
# examples that keeps the suite within its time budget. Derandomized: every run draws
# the same examples, so a run that fails fails again; TRUEBATCH_HYPOTHESIS=thorough
# draws many more, at random, to look for new failures.
settings.register_profile(
    "truebatch",
    deadline=None,
    max_examples=30,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(
    "thorough" if os.environ.get("TRUEBATCH_HYPOTHESIS") == "thorough" else "truebatch"
)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Moves every object alive after collection (the imported libraries, the test items)
    out of the garbage collector's reach: ``auto`` retries call ``gc.collect()`` after each
    out-of-memory error, and in a process holding torch, transformers and a thousand test
    items one full collection took 0.3 s (a test of 30 drawn examples spent 7 s in it).
    Garbage created by the tests themselves is collected as before."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny, and ``pytest -n 2`` already keeps both cores busy:
    more intra-op threads only contend (a check took 1.2 s on two threads, 0.15 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of one rank, in this process: enough to wrap models in DDP
    and FSDP2 and to build device meshes."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``processes`` start several processes (gloo ranks, torchrun) that
    each need a core: they run one at a time, on one xdist worker (``--dist loadgroup``),
    so that on two cores they never share the machine with another such test. Run side
    by side, a 10-second torchrun example took over 180 s."""
    for item in items:
        if item.get_closest_marker("processes"):
            item.add_marker(pytest.mark.xdist_group("processes"))
