"""What the processes spawned by ``test_distributed.py`` run.

:func:`launch` starts ``WORLD_SIZE`` processes on the gloo backend (CPU); each
runs every given :class:`Scenario` in turn and saves, per scenario and rank,
what the test compares with its single-process reference: the full parameters
and buffers after every window, every ``StepResult`` (or the error a window
raised), the number of gradient synchronizations of every window, the
micro-batch sizes ``loss_fn`` saw and the collectives the window called
(and how many ``all_gather`` calls preceded each pass). Models and data are built from seeds in
``models.py`` and here, so the test process builds the very same ones.

One process group serves all scenarios because starting processes (importing
torch twice on two cores) costs far more than the scenarios themselves.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import truebatch as tb
from models import CLASSES, FEATURES, TASKS, collate_tokens, seeded, token_sequences, vector_batch
from truebatch import _context
from truebatch.distributed import GradientSync

WORLD_SIZE = 2
WINDOWS = 3
GHOST_BATCH_SIZE = 4
# As long as the launcher's own deadline: a rank waiting for a peer slowed by the load of a
# 2-core machine is not a hang; a real hang fails at the launcher's deadline either way.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=240)

# Pieces (samples per step_window element) of each rank in each window.
LAYOUTS: dict[str, tuple[tuple[tuple[int, ...], ...], ...]] = {
    # rank 0, rank 1; three windows each
    "even": (((6,), (6,), (6,)), ((6,), (6,), (6,))),
    # different numbers of micro-batches per window; rank 1 has no data in the last one
    "uneven": (((4, 3), (5,), (2, 2, 3)), ((3,), (1, 6), ())),
    # rank 1 has no data in its first window: every rank must raise, then go on
    "first_empty": (((4,), (3,), (2,)), ((), (3,), (2,))),
    # no rank has data in the middle window (N == 0: no step)
    "gap": (((4, 3), (), (2, 3)), ((3,), (), (5,))),
    # 12 samples on rank 0 and 8 on rank 1 in every window, in multiples of GHOST_BATCH_SIZE
    "ghost": (((8, 4), (12,), (4, 8)), ((8,), (4, 4), (8,))),
}


class InputMean(nn.Module):
    """Identity that keeps a running mean of its inputs in a buffer, like BatchNorm.

    Under DDP the buffer is broadcast from rank 0 in the first forward after a
    synchronizing one; a replayed pass must keep that broadcast.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.5).add_(x.mean(0), alpha=0.5)
        return x


@dataclass(frozen=True)
class Scenario:
    """One distributed run of ``WINDOWS`` windows, compared with one process.

    Attributes:
        wrapper: ``"ddp"`` or ``"fsdp2"``.
        task: ``"mlp"`` (samples) or ``"gru_lm"`` (variable-length token sequences,
            normalized by ``tb.count_tokens()``), from ``models.TASKS``.
        layout: key of :data:`LAYOUTS`.
        gradient_sync: passed to the Accumulator.
        micro_batch_size: passed to the Accumulator.
        max_grad_norm: passed to the Accumulator.
        pair: ``loss_fn`` returns ``(loss_sum, count)`` instead of taking ``count=``.
        oom_above: per window, rank 1's ``loss_fn`` raises ``torch.OutOfMemoryError``
            for micro-batches larger than this (before reaching the model).
        split_layers: ``None`` for the task's model; ``"torch"`` for
            :func:`batchnorm_dropout_mlp` with ``nn.Dropout`` and ``nn.BatchNorm1d``;
            ``"converted"`` for the same model after ``tb.nn.convert_batchnorm``
            (``GHOST_BATCH_SIZE``) and ``tb.nn.convert_dropout``.
    """

    wrapper: str
    task: str = "mlp"
    layout: str = "even"
    gradient_sync: str | None = None
    micro_batch_size: int | str | None = 2
    max_grad_norm: float | None = None
    pair: bool = False
    oom_above: tuple[int, ...] | None = None
    split_layers: str | None = None


def rank_data(scenario: Scenario, rank: int) -> list[list[Any]]:
    """The pieces rank ``rank`` passes to ``step_window`` in each window."""
    windows = []
    for window, sizes in enumerate(LAYOUTS[scenario.layout][rank]):
        seeds = [1000 * window + 100 * rank + piece for piece in range(len(sizes))]
        if scenario.task == "mlp":
            windows.append([vector_batch(n, seed) for n, seed in zip(sizes, seeds, strict=True)])
        else:
            # One padded length per piece, so pieces of different ranks differ in shape too.
            windows.append(
                [
                    collate_tokens(token_sequences(n, seed))
                    for n, seed in zip(sizes, seeds, strict=True)
                ]
            )
    return windows


def batchnorm_dropout_mlp() -> nn.Module:
    """``Linear -> Dropout -> BatchNorm1d -> Tanh -> Linear`` on ``models.FEATURES`` inputs.

    Dropout comes before BatchNorm, so the batch statistics, and hence the
    running statistics, depend on the dropout masks too.
    """
    return nn.Sequential(
        nn.Linear(FEATURES, 10),
        nn.Dropout(0.3),
        nn.BatchNorm1d(10),
        nn.Tanh(),
        nn.Linear(10, CLASSES),
    )


def build_model(scenario: Scenario) -> nn.Module:
    """The unwrapped float64 model; identical on every rank and in the test process."""
    if scenario.split_layers is not None:
        model = seeded(batchnorm_dropout_mlp)
        if scenario.split_layers == "converted":
            model = tb.nn.convert_batchnorm(model, ghost_batch_size=GHOST_BATCH_SIZE)
            model = tb.nn.convert_dropout(model, seed=0)
        return model
    factory = TASKS[scenario.task].model
    if scenario.task == "mlp":
        return seeded(lambda: nn.Sequential(InputMean(FEATURES), factory()))
    return seeded(factory)


def build_optimizer(parameters: Any) -> torch.optim.Optimizer:
    """SGD with momentum: its update is linear in the gradient, so a wrong scale shows."""
    return torch.optim.SGD(parameters, lr=0.2, momentum=0.9)


def launch_once(
    tmp_path_factory: Any,
    name: str,
    scenarios: dict[str, Any],
    run: Callable[[Any, int], dict[str, list]] | None = None,
    *,
    world_size: int = WORLD_SIZE,
) -> dict[str, list[dict[str, list]]]:
    """What each rank saved, per scenario (``runs[scenario][rank]``), from one
    :func:`launch` per test session into a directory ``name``.

    Under pytest-xdist every worker that gets tests of a module needs the runs:
    the directory is then in the workers' common one (``tmp_path_factory``'s),
    the first worker starts the processes and the others wait on a lock and
    read its files.
    """
    from filelock import FileLock  # a dependency of torch

    if os.environ.get("PYTEST_XDIST_WORKER"):
        out_dir = tmp_path_factory.getbasetemp().parent / name
    else:
        out_dir = tmp_path_factory.mktemp(name)
    with FileLock(f"{out_dir}.lock"):
        done = out_dir / "done"
        if not done.exists():
            out_dir.mkdir(exist_ok=True)
            launch(scenarios, out_dir, timeout=240, run=run, world_size=world_size)
            done.touch()
    return {
        scenario: [torch.load(out_dir / f"{scenario}-{rank}.pt") for rank in range(world_size)]
        for scenario in scenarios
    }


def launch(
    scenarios: dict[str, Any],
    out_dir: Path,
    timeout: float,
    run: Callable[[Any, int], dict[str, list]] | None = None,
    *,
    world_size: int = WORLD_SIZE,
) -> None:
    """Run ``scenarios`` on ``world_size`` spawned gloo processes; fail if they hang.

    ``run(scenario, rank)`` (a module-level function, default: this module's
    scenarios through ``step_window``) returns what is saved per scenario and rank.

    Raises:
        AssertionError: a process was still running after ``timeout`` seconds
            (it is terminated) or exited with an error.
    """
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_main,
            args=(rank, world_size, str(out_dir), scenarios, run or _run),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(10)
    errors = "".join(path.read_text() for path in sorted(out_dir.glob("error-*.txt")))
    if hung:
        raise AssertionError(f"ranks {hung} still ran after {timeout} s (a hang?)\n{errors}")
    failed = {rank: p.exitcode for rank, p in enumerate(processes) if p.exitcode != 0}
    if failed:
        raise AssertionError(f"ranks exited with codes {failed}\n{errors}")


def _main(
    rank: int,
    world_size: int,
    out_dir: str,
    scenarios: dict[str, Any],
    run: Callable[[Any, int], dict[str, list]],
) -> None:
    # Two processes share two cores: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    # The ranks meet in a file of the launch's own directory: no port to pick, so none
    # that another process can take between picking and binding it.
    dist.init_process_group(
        "gloo",
        init_method=Path(out_dir, "store").absolute().as_uri(),
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    _count_calls()
    try:
        for name, scenario in scenarios.items():
            try:
                record = run(scenario, rank)
            except BaseException:
                Path(out_dir, f"error-{name}-{rank}.txt").write_text(
                    f"rank {rank}, scenario {name}:\n{traceback.format_exc()}"
                )
                raise
            torch.save(record, Path(out_dir, f"{name}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(scenario: Scenario, rank: int) -> dict[str, list]:
    model, synchronizations = _wrap(build_model(scenario), scenario.wrapper)
    accumulator = tb.Accumulator(
        model,
        build_optimizer(model.parameters()),
        micro_batch_size=scenario.micro_batch_size,
        max_grad_norm=scenario.max_grad_norm,
        gradient_sync=scenario.gradient_sync,
    )
    trace = Trace(accumulator.sync)
    loss_fn = _loss_fn(scenario, rank, trace)
    count = None if scenario.pair else TASKS[scenario.task].count
    keys = (
        "results",
        "params",
        "buffers",
        "syncs",
        "seen",
        "gathers_at_pass",
        "reduces_at_backward",
        "gather_waits",
        "collectives",
    )
    record: dict[str, list] = {key: [] for key in keys}
    for pieces in rank_data(scenario, rank):
        before = synchronizations()
        trace.start()
        try:
            result: Any = asdict(accumulator.step_window(pieces, loss_fn, count=count))
        except RuntimeError as error:
            result = {"error": str(error)}
        record["results"].append(result)
        record["syncs"].append(synchronizations() - before)
        record["seen"].append(trace.sizes)
        record["gathers_at_pass"].append(trace.gathers_at_pass)
        record["reduces_at_backward"].append(trace.reduces_at_backward)
        record["gather_waits"].append(trace.gather_waits)
        record["collectives"].append({name: trace.calls(name) for name in _CALLS})
        record["params"].append([_full(p) for p in model.parameters()])
        record["buffers"].append([b.detach().clone() for b in model.buffers()])
    return record


class Trace:
    """What one window does on this rank, as seen from ``loss_fn`` and ``torch.distributed``.

    Attributes:
        sizes: the micro-batch size of every call of ``loss_fn`` (replays included).
        gathers_at_pass: the ``all_gather`` calls made in the window so far, at
            every call of ``loss_fn`` (each call precedes its backward).
        reduces_at_backward: the ``all_reduce`` calls made in the window so far,
            as every pass's backward reaches its loss.
        gather_waits: for every exchange the Accumulator waited for (through
            ``sync``, its :class:`~truebatch.distributed.GradientSync`), the
            calls of ``loss_fn`` made in the window before the wait.
    """

    def __init__(self, sync: GradientSync) -> None:
        exchange = sync.exchange

        def traced_exchange(row: list[float]) -> Any:
            wait = exchange(row)

            def traced_wait() -> list[list[float]]:
                self.gather_waits.append(len(self.sizes))
                return wait()

            return traced_wait

        sync.exchange = traced_exchange  # type: ignore[method-assign]

    def start(self) -> None:
        self._start = dict(_CALLS)
        self.sizes: list[int] = []
        self.gathers_at_pass: list[int] = []
        self.reduces_at_backward: list[int] = []
        self.gather_waits: list[int] = []

    def calls(self, name: str) -> int:
        """Calls of ``torch.distributed.<name>`` since the window started."""
        return _CALLS[name] - self._start[name]

    def record_pass(self, size: int) -> None:
        self.sizes.append(size)
        self.gathers_at_pass.append(self.calls("all_gather"))

    def record_backward(self, loss: torch.Tensor) -> None:
        loss.register_hook(lambda _: self.reduces_at_backward.append(self.calls("all_reduce")))


def _loss_fn(scenario: Scenario, rank: int, trace: Trace) -> tb.accumulator.LossFn:
    """The task's loss sum; traces the pass and injects out-of-memory errors."""
    task = TASKS[scenario.task]

    def loss_fn(model: nn.Module, micro_batch: Any) -> Any:
        size = tb.batch_size(micro_batch)
        trace.record_pass(size)
        context = _context.current()
        if scenario.oom_above and rank == 1 and size > scenario.oom_above[context.window]:
            raise torch.OutOfMemoryError(f"injected: {size} samples on rank 1")
        loss = task.loss_sum(model, micro_batch)
        trace.record_backward(loss)
        return (loss, task.count(micro_batch)) if scenario.pair else loss

    return loss_fn


def _wrap(model: nn.Module, wrapper: str) -> tuple[nn.Module, Any]:
    """The data-parallel model and a function returning its gradient syncs so far.

    DDP counts all-reduce rounds through a communication hook (the last bucket
    closes a round); FSDP2 counts reduce-scatters, one per sharded module per
    synchronization, and divides by the number of sharded modules.
    """
    if wrapper == "ddp":
        calls = [0]

        # No annotations: DDP compares them with dist.GradBucket, and this module's
        # annotations are strings (from __future__ import annotations).
        def counting_hook(state, bucket):
            calls[0] += bucket.is_last()
            # DDP's default averaging, through the process group itself rather than
            # dist.all_reduce, which then counts truebatch's calls only.
            gradient = bucket.buffer().div_(WORLD_SIZE)
            work = dist.group.WORLD.allreduce([gradient])
            return work.get_future().then(lambda future: future.value()[0])

        ddp = nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(None, counting_hook)
        return ddp, lambda: calls[0]
    from torch.distributed.fsdp import fully_shard

    sharded = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    for module in sharded:
        fully_shard(module)
    fully_shard(model)
    return model, lambda: _CALLS["reduce_scatter_single"] / len(sharded)


# Calls of these torch.distributed functions so far in this process. FSDP2 reduce-scatters
# gradients through reduce_scatter_single; truebatch exchanges counts with all_gather and
# sums losses with all_reduce; DDP's comm hook and DTensor's collectives use neither.
_CALLS = {"reduce_scatter_single": 0, "all_gather": 0, "all_reduce": 0}


def collective_calls() -> dict[str, int]:
    """Calls so far in this process of the ``torch.distributed`` functions counted here."""
    return dict(_CALLS)


def _count_calls() -> None:
    """Wrap the functions of :data:`_CALLS` in ``torch.distributed`` to count their calls."""
    for name in _CALLS:
        setattr(dist, name, _counting(name, getattr(dist, name)))


def _counting(name: str, original: Any) -> Any:
    def counting(*args: Any, **kwargs: Any) -> Any:
        _CALLS[name] += 1
        return original(*args, **kwargs)

    return counting


def _full(parameter: torch.Tensor) -> torch.Tensor:
    """A full copy of a parameter (FSDP2's are sharded DTensors: gather them)."""
    value = parameter.detach()
    return value.full_tensor() if hasattr(value, "full_tensor") else value.clone()
