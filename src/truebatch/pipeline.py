"""Pipeline parallelism: the micro-batches of one schedule run are one window.

A ``torch.distributed.pipelining`` schedule (``ScheduleGPipe``,
``Schedule1F1B``) cuts a batch into k micro-batches, runs them through the
stages and, on the last stage, calls its ``loss_fn(output, target)`` once per
micro-batch. :class:`PipelineAccumulator` makes the k micro-batches of every
data-parallel replica one window of the big batch:

    grad = sum over replicas r, micro-batches j of  weight * d(loss_sum_rj) / d(params)
    weight = 1 / N,   N = sum over r, j of count(target_rj)

N is counted on the last stage from the targets **before the schedule runs**
and summed over the data-parallel group, so every backward is weighted as it
runs: the schedule's ``loss_fn``, which returns the SUM of a micro-batch's
item losses, is wrapped to return ``loss_sum * weight``.

The schedule's own scaling. With ``scale_grads=True`` (its default) a
schedule divides every stage's gradient by k after the last backward
(``PipelineStage.perform_reduce_grad`` -> ``scale_grads(k)`` in torch 2.13).
With a ``loss_fn`` returning each micro-batch's mean, that is the mean of the
micro-batches' means, which is not the big batch's mean as soon as the
micro-batches hold different numbers of items (tokens after padding and
ignored labels). truebatch then weights by ``k / N`` so that the division
cancels: exact for a power-of-two k, one rounding otherwise (1e-16 relative).

Per window, after the schedule, in the same order on every rank:

1. with ``data_parallel_group``, on every stage: one all-reduce (sum) of the
   stage's gradient (flattened into one buffer), and on the last stage one of
   the loss sum: the gradient synchronizes once per window, not per micro-batch
   (a stage in DDP: DDP's own all-reduce on the last backward, which averages,
   so the weight is then ``replicas / N``);
2. with more than one stage: one all-reduce over the pipeline group of this
   stage's squared gradient norm and the last stage's loss sum, N and
   micro-batch size, so every stage clips by the global norm and skips a
   non-finite window together;
3. the step, as the Accumulator's: non-finite check -> clip -> optimizer step
   -> scheduler step -> zero_grad(set_to_none=True).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from truebatch.accumulator import StepResult
from truebatch.arguments import (
    check_max_grad_norm,
    check_model_and_optimizer,
    check_scheduler,
    check_scheduler_has_a_step_left,
)
from truebatch.batching import Counter
from truebatch.gradients import (
    ParameterSets,
    clear_gradients,
    clip_gradients,
    gradient_norms,
    present_gradients,
    total_norm_of,
)
from truebatch.guard import WindowGuard
from truebatch.losses import check_loss, local_count
from truebatch.snapshot import StepRollback, WindowStart, rng_state, set_rng_state

__all__ = ["PipelineAccumulator"]


class PipelineAccumulator:
    """One exact optimizer step per run of a pipeline schedule.

    Build the schedule with a ``loss_fn(output, target)`` that returns the SUM
    of the micro-batch's item losses; the PipelineAccumulator wraps it so that
    the window is normalized by the item count N of all micro-batches and
    data-parallel replicas. Construct one on every rank, with that rank's
    schedule and an optimizer over that rank's stage.

    Args:
        schedule: a single-stage schedule of ``torch.distributed.pipelining``
            (``ScheduleGPipe``, ``Schedule1F1B``), with a ``loss_fn``;
            ``scale_grads`` may be either (see the module docstring).
        optimizer: an optimizer over (a subset of) the stage module's parameters.
        scheduler: stepped once per window, after a real optimizer step.
        max_grad_norm: clip the global gradient norm (over all stages and, for
            the norm, the whole model) to this, once per window.
        skip_nonfinite: a window whose gradient holds NaN or inf on any stage
            does not step on any stage.
        data_parallel_group: the process group of this stage's replicas (the
            same stage of the other pipelines), or ``None`` for one pipeline.
            N is summed over it before the schedule runs and the gradient
            once per window after it. A stage module wrapped in
            ``DistributedDataParallel`` needs none: its process group is the
            data-parallel group, and DDP averages the gradient on the window's
            last backward (the schedule runs the others under ``no_sync``).
        atomic_step: copy the parameters and the optimizer state before the
            step, so that an exception in the step restores them too (as
            :class:`truebatch.Accumulator`).

    Raises:
        TypeError: ``schedule`` is not a single-stage schedule with a
            ``loss_fn``, or is already wrapped by another PipelineAccumulator.
        ValueError: the stage module is sharded with FSDP2, or wrapped in DDP
            with another ``data_parallel_group``.

    Example:
        >>> def loss_fn(logits, labels):          # the SUM over scored tokens
        ...     return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        >>> stage = PipelineStage(layers, stage_index, num_stages, device)
        >>> schedule = Schedule1F1B(stage, n_microbatches=4, loss_fn=loss_fn)
        >>> acc = tb.PipelineAccumulator(schedule, torch.optim.AdamW(layers.parameters()))
        >>> result = acc.step(tokens, target=labels, count=tb.count_tokens("target", shift=False))
    """

    def __init__(
        self,
        schedule: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = True,
        data_parallel_group: dist.ProcessGroup | None = None,
        atomic_step: bool = False,
    ) -> None:
        self.stage = _stage_of(schedule)
        model = self.stage.submod
        check_model_and_optimizer(model, optimizer)
        check_scheduler(scheduler, optimizer)
        # A stage in DDP: DDP all-reduces (averages) the gradient on the last backward,
        # over its own process group, which is then the data-parallel group.
        self.ddp = _ddp_group(model, data_parallel_group)
        if self.ddp is not None:
            data_parallel_group = self.ddp
        self.schedule = schedule
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.skip_nonfinite = skip_nonfinite
        self.data_parallel_group = data_parallel_group
        self.atomic_step = atomic_step
        self.n_microbatches = int(schedule._n_microbatches)
        self.loss = WindowLoss(schedule, schedule._loss_fn)
        schedule._loss_fn = self.loss
        self.parameters = ParameterSets(model, optimizer)
        self.windows = 0
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def step(
        self,
        *args: Any,
        target: torch.Tensor | None = None,
        count: Counter | None = None,
        **kwargs: Any,
    ) -> StepResult:
        """Run the schedule on one batch as one window and take (at most) one step.

        Call it on every rank of the pipeline with what ``schedule.step`` would
        get there: the inputs on the first stage, ``target`` on the last one.

        Args:
            *args: the whole batch's inputs, cut by the schedule into k
                micro-batches along dim 0.
            target: the last stage's targets, cut the same way (tensor rows,
                ``torch.tensor_split``).
            count: ``count({"target": target_micro_batch})`` gives the item
                count of one micro-batch, read on the last stage before any
                backward; ``None`` counts samples (rows). For token losses:
                ``tb.count_tokens("target", shift=False)`` when the targets
                are already aligned with the outputs.
            **kwargs: keyword inputs of the schedule, as ``schedule.step``'s.

        Returns:
            the window's :class:`~truebatch.StepResult`, the same on every
            stage: ``loss`` = loss sum / N over all micro-batches and replicas,
            ``count`` = N, ``grad_norm`` over all stages.

        Raises:
            ValueError: a tensor input or the target whose leading dimension is
                not a multiple of k, or whose shape differs from the first
                window's (the stages exchange activations in buffers shaped by
                the first window: pad every batch to one length); nothing changed.
            TypeError: ``count`` is not callable or ``loss_fn`` returned
                something else than a 0-dim loss sum.
        """
        check_scheduler_has_a_step_left(self.scheduler)
        if count is not None and not callable(count):
            raise TypeError(
                f"`count` got {type(count).__name__}; expected None or a function of "
                '{"target": target_micro_batch}. Fix: use tb.count_samples or '
                'tb.count_tokens("target", shift=False).'
            )
        self._check_shapes(args, kwargs, target)
        params = self.parameters
        params.refresh()
        start = WindowStart(self.model, params.devices, params.buffers)
        rollback = None
        clear_gradients(params.model)
        try:
            n_items, largest = self._count(target, count)
            self.loss.open(self._weight(n_items))
            inner = self.model.module if self.ddp is not None else self.model
            with WindowGuard(self.optimizer, self.model, inner):
                self.schedule.step(*args, target=target, **kwargs)
            loss_sum = self._synchronize()
            grad_norm, loss_sum, n_items, largest = self._pipeline_totals(
                loss_sum, n_items, largest
            )
            rollback = StepRollback(
                self.optimizer,
                self.scheduler,
                None,
                updated=params.updated if self.atomic_step else None,
            )
            reason = self._step_once(grad_norm, n_items, rollback)
        except BaseException as error:
            if rollback is not None:
                rollback.restore(error)
            start.restore()
            clear_gradients(params.model)
            # A run that failed leaves its losses in the schedule, where the next run
            # would take them for its own micro-batches' losses.
            self.schedule._internal_losses.clear()
            raise
        finally:
            self.loss.close()
        clear_gradients(params.model)
        self.windows += 1
        count_out = int(n_items) if float(n_items).is_integer() else n_items
        return StepResult(
            loss=loss_sum / n_items if n_items else math.nan,
            count=count_out,
            grad_norm=grad_norm,
            stepped=reason is None,
            skip_reason=reason,
            micro_batches=self.n_microbatches,
            micro_batch_size=int(largest),
            step=self.windows,
        )

    def state_dict(self) -> dict[str, Any]:
        """The windows done and the optimizer, scheduler and RNG states (the stage
        module is saved by the caller)."""
        return {
            "window": self.windows,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": rng_state(self.parameters.devices),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved.

        Raises:
            KeyError: ``state`` lacks a key of :meth:`state_dict`; nothing is loaded.
            ValueError: ``state`` was saved with(out) a scheduler, unlike this
                PipelineAccumulator; nothing is loaded.
        """
        missing = {"window", "optimizer", "scheduler", "rng"} - set(state)
        if missing:
            raise KeyError(
                f"`state` got no keys {sorted(missing)}; expected the dict of "
                "PipelineAccumulator.state_dict(). Fix: pass the dict it returned."
            )
        if (self.scheduler is None) != (state["scheduler"] is None):
            saved = "no" if state["scheduler"] is None else "a"
            raise ValueError(
                f"`state` got {saved} scheduler; expected "
                f"{'none' if self.scheduler is None else 'one'}, as this PipelineAccumulator "
                "has. Fix: construct it the same way as the one that was saved."
            )
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.windows = int(state["window"])
        set_rng_state(state["rng"], self.parameters.devices)

    # ------------------------------------------------------------- the window

    def _check_shapes(self, args: tuple, kwargs: dict, target: torch.Tensor | None) -> None:
        """Every tensor cut into k equal micro-batches, shaped as in the first window."""
        tensors = {f"args[{i}]": a for i, a in enumerate(args)}
        tensors.update({f"{name}=": value for name, value in kwargs.items()})
        tensors["target"] = target
        shapes = {
            name: tuple(value.shape)
            for name, value in tensors.items()
            if isinstance(value, torch.Tensor)
        }
        k = self.n_microbatches
        for name, shape in shapes.items():
            if not shape or shape[0] % k:
                raise ValueError(
                    f"`{name}` got shape {shape}; expected a leading dimension that is a "
                    f"multiple of n_microbatches={k}: the stages exchange activations of "
                    "one shape. Fix: pad or trim the batch to a multiple of n_microbatches."
                )
        if self._shapes is None:
            self._shapes = shapes
        elif shapes != self._shapes:
            raise ValueError(
                f"`batch` got shapes {shapes}; expected the first window's {self._shapes}: the "
                "schedule's activation buffers keep the first window's shapes. Fix: pad every "
                "batch to the same length (labels of padding set to the ignored index)."
            )

    def _count(self, target: torch.Tensor | None, count: Counter | None) -> tuple[float, int]:
        """The last stage's N over the data-parallel group and its largest micro-batch;
        (0, 0) on the other stages, which learn both after the schedule."""
        if not self.stage.is_last:
            return 0.0, 0
        if target is None:
            raise ValueError(
                "`target` got None on the last stage; expected the targets its loss_fn "
                "compares with. Fix: pass target= on the last stage."
            )
        chunks = torch.tensor_split(target, self.n_microbatches)
        plan = [({"target": chunk}, len(chunk)) for chunk in chunks]
        n_items = local_count(plan, count)
        if self.data_parallel_group is not None:
            n_items = self._sum([n_items], self.data_parallel_group)[0]
        return n_items, max(len(chunk) for chunk in chunks)

    def _weight(self, n_items: float) -> float:
        """weight = 1 / N (k / N when the schedule divides by k); 0 off the last stage
        and for an empty window."""
        if not n_items:
            return 0.0
        divided = self.n_microbatches if self.schedule.scale_grads else 1
        averaged = dist.get_world_size(self.ddp) if self.ddp is not None else 1
        return divided * averaged / n_items

    def _synchronize(self) -> float:
        """The data-parallel all-reduce of the gradient, once; returns the loss sum (over
        the replicas)."""
        # The micro-batches' k losses are the last k calls: on its first run a schedule
        # calls loss_fn once more before them, on placeholder tensors, to infer shapes.
        sums = self.loss.sums[-self.n_microbatches :]
        loss_sum = float(torch.stack(sums).double().sum()) if sums else 0.0
        group = self.data_parallel_group
        if group is None:
            return loss_sum
        grads = present_gradients(self.parameters.trainable)
        if grads and self.ddp is None:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=group)
            pieces = flat.split([g.numel() for g in grads])
            torch._foreach_copy_(grads, [p.view_as(g) for p, g in zip(pieces, grads, strict=True)])
        if self.stage.is_last:
            loss_sum = self._sum([loss_sum], group)[0]
        return loss_sum

    def _pipeline_totals(
        self, loss_sum: float, n_items: float, largest: int
    ) -> tuple[float, float, float, int]:
        """The global gradient norm, and the last stage's loss sum, N and micro-batch
        size, on every stage (one all-reduce over the pipeline group)."""
        norms = gradient_norms(present_gradients(self.parameters.updated))
        norm = torch.zeros((), dtype=torch.float64) if norms is None else total_norm_of(norms)
        row = [float(norm) ** 2, loss_sum, n_items, float(largest)]
        if self.stage.group_size > 1:
            last = self.stage.is_last
            row = self._sum([row[0], *(v if last else 0.0 for v in row[1:])], self.stage.group)
        return math.sqrt(row[0]), row[1], row[2], int(row[3])

    def _step_once(self, grad_norm: float, n_items: float, rollback: StepRollback) -> str | None:
        """Check, clip, step, schedule: the same decision on every stage."""
        if not n_items:
            return "the window holds no items (N == 0)"
        finite = math.isfinite(grad_norm)
        grads = present_gradients(self.parameters.updated)
        if finite and self.max_grad_norm is not None and grads:
            clip_gradients(grads, self.max_grad_norm / (grad_norm + 1e-6))
        if not finite and self.skip_nonfinite:
            return f"non-finite gradient (norm {grad_norm})"
        rollback.optimizer_stage = "stepping"
        self.optimizer.step()
        rollback.optimizer_stage = "stepped"
        if self.scheduler is not None:
            self.scheduler.step()
        return None

    def _sum(self, values: list[float], group: dist.ProcessGroup | None) -> list[float]:
        """``values`` summed over ``group``, in float64 (NCCL: on the stage's device)."""
        device = self.stage.device if "nccl" in str(dist.get_backend(group)) else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, group=group)
        return tensor.tolist()


class WindowLoss:
    """The schedule's ``loss_fn``, weighted: ``loss_fn(output, target) * weight``.

    Inside :meth:`PipelineAccumulator.step` (between :meth:`open` and
    :meth:`close`) every call is checked (a 0-dim loss sum with grad), its sum
    kept for the window's loss, and the weighted loss returned for the
    schedule's backward. Outside, a schedule run without backward
    (``schedule.eval``) gets the sum itself; a training run is refused, as
    its gradient would not be normalized.
    """

    def __init__(self, schedule: Any, loss_fn: Callable[..., torch.Tensor]) -> None:
        self.schedule = schedule
        self.loss_fn = loss_fn
        self.weight: float | None = None
        self.sums: list[torch.Tensor] = []

    def open(self, weight: float) -> None:
        self.weight, self.sums = weight, []

    def close(self) -> None:
        self.weight, self.sums = None, []

    def __call__(self, output: Any, target: Any, **kwargs: Any) -> torch.Tensor:
        if self.weight is None:
            if self.schedule._has_backward:
                raise RuntimeError(
                    "`schedule.step` ran the loss outside PipelineAccumulator.step; expected "
                    "every training run of the schedule to go through it, which normalizes "
                    "the gradient by N. Fix: call acc.step(...) instead of schedule.step(...)."
                )
            return self.loss_fn(output, target, **kwargs)
        loss = check_loss(self.loss_fn(output, target, **kwargs), "the schedule's loss_fn")
        self.sums.append(loss.detach())
        return loss * self.weight


def _stage_of(schedule: Any) -> Any:
    """The stage of a single-stage schedule with a loss, checked."""
    required = ("_stage", "_n_microbatches", "_loss_fn", "_internal_losses", "scale_grads")
    if not all(hasattr(schedule, name) for name in required):
        raise TypeError(
            f"`schedule` got {type(schedule).__name__}; expected a single-stage schedule of "
            "torch.distributed.pipelining (ScheduleGPipe, Schedule1F1B). Fix: build one "
            "schedule per rank around that rank's PipelineStage."
        )
    if isinstance(schedule._loss_fn, WindowLoss):
        raise TypeError(
            "`schedule` got a schedule another PipelineAccumulator already wraps; expected "
            "one PipelineAccumulator per schedule. Fix: reuse the first one."
        )
    if schedule._loss_fn is None:
        raise TypeError(
            "`schedule` got a schedule without loss_fn; expected one built with "
            "loss_fn(output, target) returning the SUM of the item losses. Fix: pass "
            "loss_fn= to the schedule."
        )
    return schedule._stage


def _ddp_group(model: nn.Module, data_parallel_group: Any) -> Any:
    """The process group of a stage wrapped in DDP (None for a plain module); an FSDP2
    stage is refused, as is a DDP stage with another ``data_parallel_group``."""
    from torch.distributed.fsdp import FSDPModule  # torch.distributed.pipelining needs it too

    if isinstance(model, FSDPModule):
        raise ValueError(
            "`schedule` got a stage module sharded with FSDP2; expected a plain module or "
            "one wrapped in DistributedDataParallel. Fix: build the stage from the plain "
            "module and pass data_parallel_group=."
        )
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    if data_parallel_group is not None and data_parallel_group is not model.process_group:
        raise ValueError(
            "`data_parallel_group` got a group other than the DDP stage's process group; "
            "expected None for a stage in DDP, which averages over its own group. Fix: "
            "drop data_parallel_group= or build DDP with process_group=data_parallel_group."
        )
    return model.process_group
