"""The Accumulator: k micro-batches, one exact optimizer step.

A window (one effective batch) runs in ``truebatch.window``: its items are
counted before any backward, every backward is weighted by
``world_size / N``, and the window's gradient is left in ``.grad``. Then the
Accumulator steps once (``truebatch.step``), doing exactly one of each, in this
order: unscale (GradScaler) -> non-finite check -> clip -> optimizer step ->
scaler update -> scheduler step -> zero_grad(set_to_none=True). A failure in
the passes or in the step leaves buffers, RNG, gradients, scheduler and scaler
as before the window (``truebatch.snapshot``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

from truebatch.arguments import (
    check_accumulator_micro_batch_size,
    check_dtype,
    check_flag,
    check_max_grad_norm,
    check_max_tokens,
    check_model_and_optimizer,
    check_scaler,
    check_scheduler,
    check_scheduler_has_a_step_left,
)
from truebatch.autosize import AutoSize, TokenLengths
from truebatch.batching import Batch, Counter, TokenCounter, batch_size, batch_unit, split_window
from truebatch.cached import EncodeFn, Negatives, WindowLossFn, step_cached
from truebatch.distributed import GradientSync, SyncMode
from truebatch.gradients import (
    ParameterSets,
    clear_gradients,
)
from truebatch.losses import LossFn, check_loss_fn_and_count
from truebatch.result import StepResult
from truebatch.snapshot import WindowStart, rng_state, set_rng_state
from truebatch.step import WindowStep
from truebatch.terms import Counts
from truebatch.totals import WindowTotals
from truebatch.window import Attempt, Window, WindowHistory, WindowSetup

__all__ = ["Accumulator", "LossFn", "StepResult", "WindowTotals"]


class Accumulator:
    """Gradient accumulation that gives the update of the effective batch.

    Args:
        model: the model; may be wrapped in DistributedDataParallel or sharded
            with FSDP2's ``fully_shard``. Like the optimizer, the Accumulator
            holds its parameters: build both once the model is wrapped.
        optimizer: an optimizer over (a subset of) ``model``'s parameters.
        scheduler: stepped once per window, after a real optimizer step.
        micro_batch_size: samples per micro-batch. ``None`` runs each batch (or
            each micro-batch given to :meth:`step_window`) as it comes;
            ``"auto"`` finds the largest size that fits in memory.
        max_grad_norm: clip the global gradient norm to this, once per window.
        scaler: a ``torch.amp.GradScaler``; scales every backward, unscales and
            updates once per window.
        autocast: dtype for ``torch.autocast`` around ``loss_fn`` (e.g.
            ``torch.bfloat16``), on the model's device type.
        accumulate_dtype: sum the gradients of lower-precision parameters
            across micro-batches in this dtype (e.g. ``torch.float32``) and
            round them once per window.
        skip_nonfinite: a window whose gradient holds NaN or inf does not step;
            required with an enabled ``scaler``, whose overflows must not step.
        max_micro_batch_size: first size ``"auto"`` tries.
        gradient_sync: ``"window"``, ``"micro_batch"`` or (HSDP) ``"hybrid"``:
            when a data-parallel wrapper synchronizes gradients (see
            :class:`GradientSync`).
        data_parallel: for an FSDP2 model, the ``DeviceMesh`` given to
            ``fully_shard`` (e.g. ``mesh["dp"]`` beside tensor parallelism):
            N is counted over its ranks only. ``None`` reads it from FSDP2
            (plain, HSDP, beside tensor parallelism); a mesh other than
            FSDP2's is refused.
        max_tokens: instead of ``micro_batch_size``, cut each window into
            micro-batches of consecutive samples holding at most this many
            tokens (padding excluded; :func:`truebatch.split`). ``"auto"``
            finds the largest budget that fits in memory: it starts from the
            whole window and halves the budget on out-of-memory, never below
            the longest sample.
        tokens: where ``max_tokens`` reads tokens from: a mask's key (nonzero
            entries are tokens) or ``tokens(batch)`` giving one count per sample.
        atomic_step: copy the parameters the optimizer updates, its state and
            its param groups before every step, so that an exception raised by the optimizer or
            the scheduler after the update leaves them as before the window too.
            Costs one more copy of both in memory during the step and the time
            to write it; without it, such an exception leaves the update in
            place (and says so in a note on the exception) while gradients,
            buffers, RNG, scheduler and scaler go back.
        host_sync: ``True`` reads the window's numbers (loss, count, gradient
            norm) to the host once per window and decides there whether to
            step. ``False`` reads nothing: the non-finite skip is decided on
            the device (the step is undone there, at the cost of one copy of
            the stepped parameters and their optimizer state), and the
            :class:`StepResult`'s numbers are read on first access. Where the
            host must know (a scheduler with ``skip_nonfinite``, counts
            ``loss_fn`` returns, an optimizer's first step, torch.distributed's
            passes) the window still reads once; see docs/how-to/speed.md.

    Examples:
        >>> acc = Accumulator(model, optimizer, micro_batch_size=16)
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     return F.cross_entropy(model(x), y, reduction="sum")
        >>> result = acc.step((x, y), loss_fn)   # one exact step on the whole batch
    """

    # A third of it is the public docstrings: the construction, the three ways to run
    # a window (and the cached one), the state, and how a window's passes are cut.

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        micro_batch_size: int | Literal["auto"] | None = None,
        max_grad_norm: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        autocast: torch.dtype | None = None,
        accumulate_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = True,
        max_micro_batch_size: int | None = None,
        gradient_sync: SyncMode | None = None,
        data_parallel: DeviceMesh | None = None,
        atomic_step: bool = False,
        max_tokens: int | Literal["auto"] | None = None,
        tokens: TokenCounter = "attention_mask",
        host_sync: bool = True,
    ) -> None:
        check_model_and_optimizer(model, optimizer)
        check_scheduler(scheduler, optimizer)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.micro_batch_size = check_accumulator_micro_batch_size(
            micro_batch_size, max_micro_batch_size
        )
        self.max_tokens = check_max_tokens(
            max_tokens, micro_batch_size=self.micro_batch_size, unit=batch_unit(model)
        )
        self.tokens = tokens
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.skip_nonfinite = check_flag(skip_nonfinite, "skip_nonfinite")
        self.scaler = check_scaler(scaler, optimizer, skip_nonfinite=self.skip_nonfinite)
        self.autocast = check_dtype(autocast, "autocast", (torch.float16, torch.bfloat16))
        self.accumulate_dtype = check_dtype(accumulate_dtype, "accumulate_dtype", None)
        self.atomic_step = check_flag(atomic_step, "atomic_step")
        self.host_sync = check_flag(host_sync, "host_sync")
        self.sync = GradientSync(model, gradient_sync, mesh=data_parallel)
        self._auto = AutoSize(
            max_micro_batch_size, over="tokens" if self.max_tokens == "auto" else "samples"
        )
        if "auto" in (self.micro_batch_size, self.max_tokens) and self.sync.kind == "fsdp2":
            name = self._auto.argument
            raise ValueError(
                f"`{name}` got 'auto' for an FSDP2 model; 'auto' is not available for "
                "FSDP2 models: FSDP2 gathers parameters inside forward, so an out-of-memory "
                f"error on one rank cannot be shared without a hang. Fix: pass a fixed {name}."
            )
        self._setup = WindowSetup(
            model=model,
            optimizer=optimizer,
            sync=self.sync,
            parameters=ParameterSets(model, optimizer),
            scaler=self.scaler,
            autocast=self.autocast,
            accumulate_dtype=self.accumulate_dtype,
        )
        self._history = WindowHistory()
        self._step_of_window = WindowStep(self, self._setup.parameters, self._history)
        self._hooked: weakref.ref[torch.optim.Optimizer] | None = None

    def step(self, batch: Batch, loss_fn: LossFn, count: Counts = None) -> StepResult:
        """Run one effective batch and take (at most) one optimizer step.

        Args:
            batch: a tensor or a nested tuple/list/dict/dataclass of tensors
                sharing the leading (batch) dimension; split into micro-batches
                of ``micro_batch_size``.
            loss_fn: ``loss_fn(model, micro_batch)`` returns the SUM of the
                per-item losses of the micro-batch (a 0-dim tensor), or
                ``(loss_sum, count)``, or with loss terms a mapping of term
                sums ``{"policy": S, "kl": S}``.
            count: ``count(micro_batch)`` gives its item count N_j before any
                backward; ``None`` counts samples, unless ``loss_fn`` returns
                counts, by whose total the gradient is then divided once. A
                mapping with the keys of ``loss_fn``'s mapping gives one
                counter per loss term (a counter, ``None`` or
                :func:`truebatch.term` with a weight): the gradient is then that
                of ``sum_t w_t * S_t / N_t`` (see ``truebatch.terms``).

        Returns:
            what the window did (:class:`StepResult`).

        Raises:
            TypeError, ValueError: a bad ``loss_fn``, ``count``, batch or
                output, before anything changed.

        Example:
            >>> result = acc.step((x, y), loss_fn)
            >>> result.stepped, result.count
            (True, 32)
        """
        return self._step([batch], loss_fn, count)

    def step_window(
        self, micro_batches: Iterable[Batch], loss_fn: LossFn, count: Counts = None
    ) -> StepResult:
        """Run the given micro-batches as one window: one effective batch, one step.

        Each micro-batch is further split by ``micro_batch_size`` when that is
        set. An empty window (e.g. a rank with no data left) takes part in the
        window's collectives and steps with the other ranks' gradient. The
        arguments and errors are those of :meth:`step`.

        Example:
            >>> for window in tb.windows(loader, size=4):
            ...     acc.step_window(window, loss_fn)
        """
        return self._step(micro_batches, loss_fn, count)

    def accumulate(
        self, micro_batches: Iterable[Batch], loss_fn: LossFn, count: Counts = None
    ) -> WindowTotals:
        """Every pass of a window and no optimizer step.

        The window's gradient, ``sum_j (world_size / N) * d(loss_sum_j) / d(params)``,
        is left in the parameters' ``.grad`` (where :func:`truebatch.check`
        reads it); nothing else changes but the buffers forward updates
        (BatchNorm statistics) and the RNG. :meth:`step_window` is
        ``accumulate`` followed by the once-per-window step. Your own
        ``optimizer.step()`` after it ends the window (:attr:`completed_windows`
        counts it): split-invariant layers draw new masks in the next one, and
        the same masks in every ``accumulate`` before it. The arguments and
        errors are those of :meth:`step`.

        Returns:
            the window's loss sum, item count N and micro-batch plan.

        Example:
            >>> totals = acc.accumulate([batch], loss_fn)
            >>> totals.loss_sum / totals.count   # the window's mean loss
        """
        self._count_outside_steps()
        totals = self._window(micro_batches, loss_fn, count, read=True)[0]
        if totals.count == 0:
            # No item: no gradient, as when N is known before the passes. Counted on the
            # device, the passes ran with weight 0 and left zeros, which a momentum or
            # weight-decay step would still apply.
            clear_gradients(self._setup.parameters.model)
        return totals

    def _count_outside_steps(self) -> None:
        """A step the caller takes after accumulate() (a closure optimizer, SAM) ends a
        window too: split-invariant layers then draw the next window's masks, as
        step_window does. The hook is registered on first use, and again on a copy (a
        copied optimizer drops its hooks)."""
        if self._hooked is not None and self._hooked() is self.optimizer:
            return
        history = weakref.ref(self._history)
        self.optimizer.register_step_post_hook(lambda *_: _stepped_outside(history))
        self._hooked = weakref.ref(self.optimizer)

    def step_cached(
        self,
        micro_batches: Iterable[Batch],
        encode_fn: EncodeFn,
        loss_fn: WindowLossFn,
        count: Counter | None = None,
        *,
        negatives: Negatives = "global",
        window_batch: bool = True,
    ) -> StepResult:
        """One exact step for a loss that compares the window's samples with each other.

        Contrastive losses (CLIP, SimCLR, in-batch negatives, batch-hard triplets)
        accumulated per micro-batch see only the micro-batch's negatives. Here the
        loss sees the whole window, as in the big batch, with the memory of one
        micro-batch's graph plus the window's representations (gradient caching,
        :mod:`truebatch.cached`): every micro-batch is encoded without a graph,
        ``loss_fn`` runs once on all representations, and every micro-batch is
        encoded again with a graph and backpropagates its rows of
        ``d loss_sum / d representations``. Both encodings of a micro-batch see
        the same randomness (native random ops by RNG replay, on CPU and CUDA).

        Args:
            micro_batches: the window's micro-batches, each further split by
                ``micro_batch_size`` or ``max_tokens`` when that is an int.
            encode_fn: ``encode_fn(model, micro_batch)`` returns the
                representations: a tensor, or a tuple/dict of tensors, with one
                row per sample along dim 0.
            loss_fn: ``loss_fn(representations, window_batch)`` gets the window's
                representations and batch, concatenated in order (under DDP with
                global negatives: of all ranks, in rank order), and returns the
                SUM over the window's items, or ``(loss_sum, count)``.
            count: ``count(micro_batch)`` gives N; ``None`` counts samples, or
                uses the count ``loss_fn`` returns.
            negatives: ``"global"`` gathers every rank's representations under
                DDP; ``"local"`` keeps each rank's loss on its own.
            window_batch: ``False`` passes ``None`` to ``loss_fn`` instead of the
                batch (nothing concatenated or gathered).

        Returns:
            the window's :class:`StepResult`; its loss is ``loss_sum / N``.

        Raises:
            ValueError: ``micro_batch_size="auto"`` or an FSDP2 model.
            TypeError: ``encode_fn`` or ``loss_fn`` returned something else than
                described above.

        Examples:
            >>> def encode_fn(model, batch):
            ...     return model(batch["image"], batch["text"])    # (image_emb, text_emb)
            >>> def loss_fn(reps, batch):
            ...     logits = reps[0] @ reps[1].T / 0.07
            ...     labels = torch.arange(len(logits))
            ...     return (F.cross_entropy(logits, labels, reduction="sum")
            ...             + F.cross_entropy(logits.T, labels, reduction="sum")) / 2
            >>> result = acc.step_cached(micro_batches, encode_fn, loss_fn)
        """
        return step_cached(
            self,
            micro_batches,
            encode_fn,
            loss_fn,
            count,
            negatives=negatives,
            window_batch=window_batch,
            parameters=self._setup.parameters,
            step_cut=partial(self._step, cut=True),
        )

    @property
    def completed_windows(self) -> int:
        """Windows completed so far: the window index split-invariant layers see next.

        Each window run by :meth:`step`, :meth:`step_window` or :meth:`step_cached`
        counts, stepped or skipped, and each ``optimizer.step()`` taken outside them
        (after :meth:`accumulate`).
        """
        return self._history.index

    def state_dict(self) -> dict[str, Any]:
        """truebatch's state plus the optimizer, scheduler, scaler and RNG states."""
        return {
            "window": self._history.index,
            "auto_micro_batch_size": self._auto.size if self._auto.over == "samples" else None,
            "auto_max_tokens": self._auto.size if self._auto.over == "tokens" else None,
            # The N the next window starts with under torch.distributed: a resumed run must
            # start with it too, or it rescales (rounds) differently.
            "previous_count": self._history.previous_count,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(self._setup.parameters.devices),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the model is loaded by the caller).

        Raises:
            KeyError, ValueError: ``state`` is incomplete, or saved by an
                Accumulator built with(out) a scheduler or scaler; nothing is loaded.
        """
        missing = {"window", "optimizer", "rng"} - set(state)
        if missing:
            raise KeyError(
                f"`state` got no keys {sorted(missing)}; expected the dict of "
                "Accumulator.state_dict(). Fix: pass the dict returned by "
                "Accumulator.state_dict()."
            )
        wrapped = {name: getattr(self, name) for name in ("scheduler", "scaler")}
        # Check everything before loading anything, so a refused state leaves self as it was.
        for name, target in wrapped.items():
            saved = state.get(name)
            if (target is None) != (saved is None):
                raise ValueError(
                    f"`state` got {'no' if saved is None else 'a'} {name}; expected "
                    f"{'none' if target is None else 'one'}, as this Accumulator has. Fix: "
                    "construct it the same way as the one that was saved."
                )
        self.optimizer.load_state_dict(state["optimizer"])
        for name, target in wrapped.items():
            if target is not None:
                target.load_state_dict(state[name])
        self._history.index = int(state["window"])
        self._auto.size = state.get(f"auto_{self._auto.argument}")
        self._history.previous_count = state.get("previous_count")
        set_rng_state(state["rng"], self._setup.parameters.devices)

    # --------------------------------------------------------------- a window

    def _step(
        self, micro_batches: Iterable[Batch], loss_fn: LossFn, count: Counts, *, cut: bool = False
    ) -> StepResult:
        """One window and its step; ``cut``: the micro-batches are run as given (already
        cut by ``micro_batch_size`` or ``max_tokens``)."""
        check_scheduler_has_a_step_left(self.scheduler)
        totals, start = self._window(micro_batches, loss_fn, count, cut=cut)
        return self._step_of_window.apply(totals, start)

    def _window(
        self,
        micro_batches: Iterable[Batch],
        loss_fn: LossFn,
        count: Counts,
        *,
        read: bool = False,
        cut: bool = False,
    ) -> tuple[WindowTotals, WindowStart]:
        """The passes of a window; whatever they raise, buffers, RNG and gradients go back
        to the window start (returned: the step restores it too if it fails). ``read``:
        read the totals (and check the counts) before returning."""
        pieces = list(micro_batches)
        sizes = [batch_size(piece) for piece in pieces]
        check_loss_fn_and_count(loss_fn, count)
        params = self._setup.parameters
        params.refresh()
        start = WindowStart(self.model, params.devices, params.buffers)
        run = partial(self._run_window, pieces, sizes, loss_fn, count)
        try:
            if cut:
                totals = run(micro_batch_size=None, max_tokens=None)
            elif "auto" in (self.micro_batch_size, self.max_tokens):
                totals = self._run_auto(pieces, sizes, run, start)
            else:
                totals = run(micro_batch_size=self.micro_batch_size, max_tokens=self.max_tokens)
            if read:
                totals.readout.get("count")
        except BaseException:
            start.restore()
            clear_gradients(params.model)
            raise
        return totals, start

    def _run_window(
        self,
        pieces: list[Batch],
        sizes: list[int],
        loss_fn: LossFn,
        count: Counts,
        *,
        micro_batch_size: int | None,
        max_tokens: int | None,
        lengths: list[list[int]] | None = None,
        attempt: Attempt | None = None,
    ) -> WindowTotals:
        plan = split_window(
            pieces,
            sizes,
            micro_batch_size=micro_batch_size,
            max_tokens=max_tokens,
            tokens=self.tokens,
            lengths=lengths,
        )
        # "auto" under torch.distributed: every rank learns of any rank's out-of-memory.
        sharing = attempt if self.sync.distributed else None
        window = Window(
            self._setup, self._history, plan, loss_fn, count, share_out_of_memory=sharing
        )
        return window.run()

    def _run_auto(
        self,
        pieces: list[Batch],
        sizes: list[int],
        run: Callable[..., WindowTotals],
        start: WindowStart,
    ) -> WindowTotals:
        """The passes at the size ``"auto"`` finds: samples, or the token budget."""
        first_window = self._history.index == 0
        if self._auto.over == "samples":
            return self._auto.run(
                max(sizes, default=1),
                lambda attempt: run(
                    micro_batch_size=attempt.size, max_tokens=None, attempt=attempt
                ),
                start,
                unit=batch_unit(self.model),
                log_size=first_window,
            )
        tokens = TokenLengths(pieces, self.tokens)  # read once, cut at every attempt
        return self._auto.run(
            tokens.largest,
            lambda attempt: run(
                micro_batch_size=None,
                max_tokens=attempt.size,
                lengths=tokens.lengths,
                attempt=attempt,
            ),
            start,
            unit=tokens.longest,
            log_size=first_window,
        )


def _stepped_outside(history: weakref.ref[WindowHistory]) -> None:
    """The optimizer's step hook; a no-op once the Accumulator is gone."""
    alive = history()
    if alive is not None:
        alive.stepped_outside()
