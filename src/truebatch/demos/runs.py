"""Deterministic training runs that record, after every optimizer step, the window's
loss and how far the parameters are from a reference run's parameters at the same step.

The distance is the contract's measurement,
:func:`truebatch.compare.max_relative_difference`: per parameter tensor
``||p - r|| / ||r||`` (with the scale floor of :mod:`truebatch.compare`), the
largest over tensors. ``1e-16`` is float64 rounding and anything above the
contract's ``1e-12`` is a different update.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from truebatch.compare import max_relative_difference
from truebatch.demos.console import Progress
from truebatch.demos.methods import Method
from truebatch.demos.tasks import Task

SEED = 0


@contextmanager
def deterministic() -> Iterator[None]:
    """One CPU thread and deterministic algorithms inside; previous settings restored after.

    With a fixed seed this makes every run of a demo give bitwise the same
    numbers (floating-point sums in a fixed order).
    """
    threads = torch.get_num_threads()
    enabled = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled)
        torch.set_num_threads(threads)


@dataclass
class Run:
    """One trained model's record.

    Attributes:
        name: what was trained.
        losses: per optimizer step, the mean loss over the window's items.
        snapshots: per optimizer step, the parameters after the step.
        divergence: per step, :func:`max_relative_difference` from the
            reference run (empty when the run has no reference).
        metric: the task's final metric (e.g. test accuracy).
        seconds: wall time of training, recording excluded.
    """

    name: str
    losses: list[float] = field(default_factory=list)
    snapshots: list[list[torch.Tensor]] = field(default_factory=list)
    divergence: list[float] = field(default_factory=list)
    metric: float = float("nan")
    seconds: float = 0.0

    @property
    def final_difference(self) -> float | None:
        """Relative difference of the final parameters from the reference's, if any."""
        return self.divergence[-1] if self.divergence else None


def train(
    name: str,
    task: Task,
    method: Method,
    convert: Callable[[nn.Module], nn.Module] | None = None,
    reference: Run | None = None,
) -> Run:
    """Train ``task``'s model with ``method`` from the shared initial weights.

    The model is built after ``torch.manual_seed(SEED)`` (every run starts from
    the same weights), optionally converted by ``convert`` (which must keep
    the weights), and trained with the global RNG reseeded, so the runs' only
    difference is the method. With ``reference``, the run records its
    divergence from the reference after every step.
    """
    torch.manual_seed(SEED)
    model = task.make_model()
    if convert is not None:
        model = convert(model)
    optimizer = task.make_optimizer(model)
    run = Run(name)
    recording = 0.0
    progress = Progress(task.steps, name, "step")

    def on_step(loss: float) -> None:
        nonlocal recording
        started = time.perf_counter()
        params = [p.detach().clone() for p in model.parameters()]
        if reference is not None:
            step = len(run.snapshots)
            run.divergence.append(max_relative_difference(params, reference.snapshots[step]))
        run.losses.append(loss)
        run.snapshots.append(params)
        progress.update()
        recording += time.perf_counter() - started

    torch.manual_seed(SEED + 1)
    with progress:
        started = time.perf_counter()
        method(task, model, optimizer, on_step)
        run.seconds = time.perf_counter() - started - recording
    if len(run.losses) != task.steps:
        raise RuntimeError(
            f"{name} took {len(run.losses)} optimizer steps, expected one per effective "
            f"batch ({task.steps}); every method must step once per window"
        )
    run.metric = task.evaluate(model)
    return run


class StepProbe:
    """Records, at every step of ``optimizer``, its parameters before the step and the
    gradient the step applies.

    Works with any loop that calls ``optimizer.step()`` (directly, or through
    a wrapper such as Accelerate's or Lightning's); a step run with a closure
    computes its last micro-batch's gradient inside the step, which is why
    gradients are read after it. Call :meth:`remove` when done.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.before: list[list[torch.Tensor]] = []
        self.grads: list[list[torch.Tensor]] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._record_params),
            optimizer.register_step_post_hook(self._record_grads),
        ]

    def _record_params(self, *_: object) -> None:
        self.before.append([p.detach().clone() for p in self.params])

    def _record_grads(self, *_: object) -> None:
        self.grads.append(
            [
                torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for p in self.params
            ]
        )

    def remove(self) -> None:
        """Stop recording."""
        for handle in self._handles:
            handle.remove()
