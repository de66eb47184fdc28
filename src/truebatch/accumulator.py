"""The Accumulator: k micro-batches, one exact optimizer step.

For a loss that is a sum over items, divided by the item count N of the whole
effective batch (over all data-parallel ranks),

    grad = (1 / N) * sum over micro-batches j of  d(loss_sum_j) / d(params),

which is the gradient of the big batch up to floating-point summation order.
The Accumulator counts every micro-batch's items *before* any backward, so
each backward is already scaled by world_size / N (DDP and FSDP2 average over
ranks), and nothing needs dividing afterwards. (Under DDP the passes need not
wait for the other ranks' counts: they start with the previous window's N, and
a different N rescales the gradient once, before it is synchronized.)

Each window then does exactly one of each, in this order: unscale (GradScaler)
-> non-finite check -> clip -> optimizer step -> scaler update -> scheduler
step -> zero_grad(set_to_none=True).
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import operator
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from truebatch import _context
from truebatch.batching import (
    Batch,
    Counter,
    batch_size,
    batch_unit,
    count_samples,
    map_tensors,
    split_sized,
)
from truebatch.cached import EncodeFn, Negatives, WindowLossFn, step_cached
from truebatch.distributed import GradientSync, SyncMode

__all__ = ["Accumulator", "LossFn", "StepResult", "WindowTotals"]

log = logging.getLogger("truebatch")

LossFn = Callable[[nn.Module, Batch], "torch.Tensor | tuple[torch.Tensor, Any]"]
_NO_CONTEXT = nullcontext()  # reusable, and cheaper than a new one per micro-batch
OutOfMemoryError: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class StepResult:
    """What one window did.

    Attributes:
        loss: mean loss over the N items of the window, all ranks
            (``sum of loss sums / N``); ``nan`` when N == 0.
        count: N, the item count of the window over all ranks.
        grad_norm: global L2 norm of the gradient before clipping (after
            unscaling); ``nan`` when no gradient was computed.
        stepped: whether the optimizer stepped.
        skip_reason: why it did not, else ``None``.
        micro_batches: micro-batches run on this rank.
        micro_batch_size: largest micro-batch run on this rank (the size
            ``"auto"`` settled on).
        step: windows completed so far, this one included.
    """

    loss: float
    count: int | float
    grad_norm: float
    stepped: bool
    skip_reason: str | None
    micro_batches: int
    micro_batch_size: int
    step: int


@dataclass(frozen=True)
class WindowTotals:
    """What :meth:`Accumulator.accumulate` returns; the window's gradient is in ``.grad``.

    Attributes:
        loss_sum: sum of the loss sums over all micro-batches and ranks.
        count: N, the window's item count over all ranks.
        micro_batches: micro-batches run on this rank.
        micro_batch_size: largest micro-batch run on this rank.
    """

    loss_sum: float
    count: float
    micro_batches: int
    micro_batch_size: int


class _RetryWindow(Exception):
    """Some rank ran out of memory: every rank redoes the window smaller.

    ``size`` is the smallest micro-batch size that failed on any rank; every
    rank retries at half of it, so all ranks keep one shared size.
    """

    def __init__(self, size: int) -> None:
        super().__init__(f"a rank ran out of memory at micro-batch size {size}")
        self.size = size


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
        skip_nonfinite: a window whose gradient holds NaN or inf does not step.
        max_micro_batch_size: first size ``"auto"`` tries.
        gradient_sync: ``"window"`` or ``"micro_batch"``: when a data-parallel
            wrapper synchronizes gradients (see :class:`GradientSync`).

    Examples:
        >>> acc = Accumulator(model, optimizer, micro_batch_size=16)
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     return F.cross_entropy(model(x), y, reduction="sum")
        >>> result = acc.step((x, y), loss_fn)   # one exact step on the whole batch
    """

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
    ) -> None:
        _check_model_and_optimizer(model, optimizer, scheduler)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.micro_batch_size = _check_micro_batch_size(micro_batch_size, max_micro_batch_size)
        self.max_micro_batch_size = max_micro_batch_size
        self.max_grad_norm = _check_max_grad_norm(max_grad_norm)
        self.scaler = _check_scaler(scaler)
        self.autocast = _check_dtype(autocast, "autocast", (torch.float16, torch.bfloat16))
        self.accumulate_dtype = _check_dtype(accumulate_dtype, "accumulate_dtype", None)
        self.skip_nonfinite = skip_nonfinite
        self.sync = GradientSync(model, gradient_sync)
        # Like the optimizer, the Accumulator holds the model's parameters from here on.
        self._params = list(model.parameters())
        if self.micro_batch_size == "auto" and self.sync.kind == "fsdp2":
            raise ValueError(
                "micro_batch_size='auto' is not available for FSDP2 models: FSDP2 gathers "
                "parameters inside forward, so an out-of-memory error on one rank cannot be "
                "shared with the others without a hang; pass a fixed micro_batch_size"
            )
        self._window_index = 0
        self._auto_size: int | None = None
        self._template: Batch | None = None
        # Under torch.distributed: the last window's N, which the next one starts with.
        self._count_guess: float | None = None

    # ------------------------------------------------------------------ public

    def step(self, batch: Batch, loss_fn: LossFn, count: Counter | None = None) -> StepResult:
        """Run one effective batch and take (at most) one optimizer step.

        ``batch`` is split into micro-batches of ``micro_batch_size``.
        ``loss_fn(model, micro_batch)`` returns the SUM of the per-item losses
        of the micro-batch (0-dim tensor), or ``(loss_sum, count)``.
        ``count(micro_batch)`` gives its item count N_j before any backward;
        ``None`` counts samples, unless ``loss_fn`` returns counts itself, in
        which case the gradient is divided by their total once at the end.
        """
        return self._apply(self.accumulate([batch], loss_fn, count))

    def step_window(
        self, micro_batches: Iterable[Batch], loss_fn: LossFn, count: Counter | None = None
    ) -> StepResult:
        """Run the given micro-batches as one window: one effective batch, one step.

        Each micro-batch is further split by ``micro_batch_size`` when that is
        set. An empty window (e.g. a rank with no data left) takes part in the
        window's collectives and steps with the other ranks' gradient.
        """
        return self._apply(self.accumulate(micro_batches, loss_fn, count))

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
                ``micro_batch_size`` when that is an int.
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
        )

    @property
    def completed_windows(self) -> int:
        """Windows completed so far: the window index split-invariant layers see next."""
        return self._window_index

    def state_dict(self) -> dict[str, Any]:
        """truebatch's state plus the optimizer, scheduler, scaler and RNG states."""
        return {
            "window": self._window_index,
            "auto_micro_batch_size": self._auto_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": _rng_state(self._device()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the model is loaded by the caller)."""
        missing = {"window", "optimizer", "rng"} - set(state)
        if missing:
            raise KeyError(
                f"Accumulator.load_state_dict: keys {sorted(missing)} are missing; pass the "
                "dict returned by Accumulator.state_dict()"
            )
        wrapped = {name: getattr(self, name) for name in ("scheduler", "scaler")}
        # Check everything before loading anything, so a refused state leaves self as it was.
        for name, target in wrapped.items():
            saved = state.get(name)
            if (target is None) != (saved is None):
                raise ValueError(
                    f"Accumulator.load_state_dict: the saved state has "
                    f"{'no' if saved is None else 'a'} {name} but this Accumulator has "
                    f"{'none' if target is None else 'one'}; construct it the same way as "
                    "the one that was saved"
                )
        self.optimizer.load_state_dict(state["optimizer"])
        for name, target in wrapped.items():
            if target is not None:
                target.load_state_dict(state[name])
        self._window_index = int(state["window"])
        self._auto_size = state.get("auto_micro_batch_size")
        _set_rng_state(self._device(), state["rng"])

    # ---------------------------------------------------------------- a window

    def accumulate(
        self, micro_batches: Iterable[Batch], loss_fn: LossFn, count: Counter | None = None
    ) -> WindowTotals:
        """Every pass of a window and no optimizer step.

        The window's gradient, ``(1 / N) * sum_j d(loss_sum_j) / d(params)``, is
        left in the parameters' ``.grad`` (where :func:`truebatch.check` reads
        it); nothing else changes but the buffers forward updates (BatchNorm
        statistics) and the RNG. :meth:`step_window` is ``accumulate`` followed
        by the once-per-window step.

        Returns:
            the window's loss sum, item count N and micro-batch plan.
        """
        pieces = list(micro_batches)
        sizes = [batch_size(piece) for piece in pieces]
        _check_loss_fn_and_count(loss_fn, count)
        if self.micro_batch_size == "auto":
            return self._accumulate_auto(pieces, sizes, loss_fn, count)
        return self._accumulate(_split_all(pieces, sizes, self.micro_batch_size), loss_fn, count)

    def _accumulate_auto(
        self, pieces: list[Batch], sizes: list[int], loss_fn: LossFn, count: Counter | None
    ) -> WindowTotals:
        """Halve the micro-batch size on out-of-memory and redo the window from its start."""
        largest = max(sizes, default=1)
        size = min(self._auto_size or self.max_micro_batch_size or largest, largest)
        device = self._device()
        rng, buffers = _rng_state(device), _clone_buffers(self.model)
        # Halve, but keep whole ghost batches (tb.nn.GhostBatchNorm) in every micro-batch.
        unit = batch_unit(self.model)
        retried = False
        while True:
            try:
                window = self._accumulate(
                    _split_all(pieces, sizes, size),
                    loss_fn,
                    count,
                    share_oom=self.sync.distributed,
                )
            except (OutOfMemoryError, _RetryWindow) as error:
                # The failed attempt leaves no trace, for the retry and for a caller who
                # catches the error below: BatchNorm statistics and the RNG go back to
                # the window start.
                _restore_buffers(self.model, buffers)
                _set_rng_state(device, rng)
                failed = error.size if isinstance(error, _RetryWindow) else size
                if failed <= unit:
                    smallest, smaller = (
                        ("1 sample", "the model or sequence size")
                        if unit == 1
                        else (f"one ghost batch ({unit} samples)", "the ghost_batch_size")
                    )
                    raise RuntimeError(
                        f"micro_batch_size='auto': a micro-batch of {smallest} still runs out of "
                        f"memory; reduce {smaller}, use autocast=torch.bfloat16, or shard the "
                        "model (FSDP2)"
                    ) from error
            else:
                if self._window_index == 0 or retried:
                    log.info("truebatch: micro_batch_size='auto' runs %d samples per pass", size)
                return window
            # Retry outside the except block, so the traceback and its activations are freed.
            size = self._auto_size = max(unit, failed // 2 // unit * unit)
            retried = True
            log.info(
                "truebatch: out of memory at micro-batch size %d, retrying at %d", failed, size
            )
            _free_memory(device)

    def _accumulate(
        self,
        micro_batches: list[tuple[Batch, int]],
        loss_fn: LossFn,
        count: Counter | None,
        share_oom: bool = False,
    ) -> WindowTotals:
        """Forward and backward every ``(micro_batch, size)``; leaves the window's gradient
        in .grad.

        Under DDP (``"window"`` mode), from the second window on, the passes
        start before the exchange of item counts arrives, each backward scaled
        by the previous window's N (see :meth:`_passes`). ``share_oom`` is
        ``"auto"`` under torch.distributed (see :meth:`_passes_sharing_oom`).
        """
        sizes = [size for _, size in micro_batches]
        largest = max(sizes, default=0)
        params = self._params
        stats = self._exchange_stats(_local_count(micro_batches, count), sizes)
        guess = None if share_oom else self._count_guess
        if guess is None and stats.wait().count == 0:
            return WindowTotals(0.0, 0.0, len(micro_batches), largest)
        scale = self.sync.world_size / (guess or stats.count)
        totals = _Totals(self.sync, count is not None, scale, self._device())
        grads = _GradBuffers(params, self.accumulate_dtype, self.sync.distributed)
        # Only these can receive a gradient from a backward inside loss_fn (see _pass).
        trainable = [p for p in params if p.requires_grad]
        if self.sync.distributed and micro_batches:
            # Taken anew every window: no larger than this window's micro-batches ("auto").
            self._template = _template_of(micro_batches[0][0])
        # A gradient left from before the window (the user's own backward) is not part of it.
        _clear_grads(params)
        try:
            with _Guard(self.optimizer, self.model), self.sync.window():
                if share_oom:
                    self._passes_sharing_oom(
                        micro_batches, loss_fn, stats, totals, grads, trainable
                    )
                else:
                    self._passes(micro_batches, loss_fn, stats, guess, totals, grads, trainable)
                loss_total, n_items, pair_mode = totals.finish()
                if pair_mode and n_items > 0:
                    # Divide the wide sums before they are rounded: one rounding per window.
                    grads.scale(1.0 / n_items)
                grads.restore()
        except BaseException:
            grads.discard()
            _clear_grads(params)
            raise
        # Every rank read the same table, so every rank makes the same guess next time;
        # only a gradient that stays local until the last pass can be rescaled, and not
        # in float16, where a gradient scaled by a much smaller N could overflow.
        usable = (
            self.sync.gradient_stays_local
            and stats.count > 0
            and stats.all_can_replay
            and all(p.dtype != torch.float16 for p in trainable)
        )
        self._count_guess = stats.count if usable else None
        n_items = n_items if pair_mode else stats.count
        return WindowTotals(loss_total, n_items, len(micro_batches), largest)

    def _passes(
        self,
        micro_batches: list[tuple[Batch, int]],
        loss_fn: LossFn,
        stats: _Stats,
        guess: float | None,
        totals: _Totals,
        grads: _GradBuffers,
        trainable: list[nn.Parameter],
    ) -> None:
        """This rank's passes, then zero-weight replays up to the busiest rank's number.

        The gradient synchronizes on the window's last pass (on every pass in
        ``"micro_batch"`` mode). Given a ``guess`` of N, the passes do not wait
        for the exchange of counts: each backward is scaled by world_size /
        guess, and the exchange travels meanwhile. It is waited for just before
        this rank's last pass, the first that must know the number of passes
        (whether it synchronizes); until then this rank's own number is a safe
        stand-in, as no earlier pass can be the window's last. If N differs
        from the guess, the gradient so far is multiplied once by guess / N.
        """
        local = len(micro_batches)
        settle_at, passes = (-1, stats.passes) if guess is None else (max(local - 1, 0), local)
        offset = 0
        for index in itertools.count():
            if index == settle_at:
                assert guess is not None
                passes = self._settle(stats, guess, totals, grads)
            if index >= passes:
                break
            synchronize = self.sync.synchronizes(index, passes)
            final = index == passes - 1
            grads.before_pass(synchronize)
            if index < local:
                micro_batch, size = micro_batches[index]
                self._pass(
                    micro_batch,
                    loss_fn,
                    totals,
                    _context.micro_batch(self._window_index, offset, stats.rank_offset),
                    synchronize,
                    final,
                    trainable,
                )
                offset += size
            else:
                self._replay(loss_fn, synchronize, totals if final else None)
            grads.after_pass(synchronize)

    def _settle(self, stats: _Stats, guess: float, totals: _Totals, grads: _GradBuffers) -> int:
        """Wait for the exchange; if N is not the guess, rescale the passes so far and
        the ones to come. Returns the number of passes of the window."""
        count = stats.wait().count
        if count > 0 and count != guess:
            totals.scale = self.sync.world_size / count
            if totals.used is False:  # passes ran, scaled by 1 / guess (pairs wait for the end)
                grads.scale(guess / count)
        return stats.passes

    def _passes_sharing_oom(
        self,
        micro_batches: list[tuple[Batch, int]],
        loss_fn: LossFn,
        stats: _Stats,
        totals: _Totals,
        grads: _GradBuffers,
        trainable: list[nn.Parameter],
    ) -> None:
        """``"auto"`` under torch.distributed: no real pass synchronizes.

        A zero-weight pass first makes the wrapper's forward-time collectives
        (DDP's first forward after a synchronizing one broadcasts buffers), so a
        pass that runs out of memory before reaching the model cannot leave one
        unmatched. An out-of-memory error stops this rank's passes, every rank
        learns of it through one small exchange (all retry smaller), and only
        then does a zero-weight pass synchronize the gradients.
        """
        self._replay(loss_fn, synchronize=False)
        out_of_memory, offset = False, 0
        for micro_batch, size in micro_batches:
            try:
                self._pass(
                    micro_batch,
                    loss_fn,
                    totals,
                    _context.micro_batch(self._window_index, offset, stats.rank_offset),
                    False,
                    False,
                    trainable,
                )
            except OutOfMemoryError:
                out_of_memory = True
                break
            grads.stash()
            offset += size
        largest = max((size for _, size in micro_batches), default=0)
        self._share_out_of_memory(out_of_memory, largest)
        grads.restore()
        self._replay(loss_fn, synchronize=True, totals=totals)

    def _pass(
        self,
        micro_batch: Batch,
        loss_fn: LossFn,
        totals: _Totals,
        where: _context.micro_batch,
        synchronize: bool,
        final: bool,
        trainable: list[nn.Parameter],
    ) -> None:
        """Forward and backward of one micro-batch (whose position ``where`` tells);
        its loss sum goes to ``totals``, whose reduction over ranks starts before the
        backward of the ``final`` pass.

        A backward inside ``loss_fn`` would add to the gradient outside the
        Accumulator's scaling: it changes some parameter's ``.grad`` (a new
        tensor, or an in-place sum that bumps its version counter), which a
        look at the gradients before and after ``loss_fn`` reveals.
        """
        before = _gradients(trainable)
        self.sync.prepare(synchronize)
        with where, self._autocast():
            output = loss_fn(self.model, micro_batch)
        if _gradients_changed(trainable, before):
            raise RuntimeError(
                "backward() was called inside loss_fn; loss_fn must *return* the loss sum "
                "and the Accumulator runs backward with the right scale: replace "
                "`loss.backward(); return loss` by `return loss`"
            )
        scaled = totals.add(output)
        if final:
            totals.start()
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()

    def _replay(self, loss_fn: LossFn, synchronize: bool, totals: _Totals | None = None) -> None:
        """A pass that adds exactly zero gradient, to keep the ranks' collectives in step.

        A rank with fewer micro-batches than the others replays two samples of
        its latest first micro-batch (this window's, if it has one) with weight 0;
        buffers (BatchNorm statistics) and the RNG are restored afterwards, so
        the replay leaves no trace. Buffers are saved as the wrapped module
        starts, after DDP's broadcast, which the replay must keep. When this is
        the window's last pass, the reduction of ``totals`` starts before its
        backward.
        """
        device = self._device()
        rng, saved = _rng_state(device), [_clone_buffers(self.model)]

        def save_buffers(*_: Any) -> None:
            if len(saved) == 1:
                saved.append(_clone_buffers(self.model))

        handle = self.sync.module.register_forward_pre_hook(save_buffers)
        try:
            self.sync.prepare(synchronize)
            with _context.micro_batch(self._window_index, 0), self._autocast():
                output = loss_fn(self.model, self._template)
            loss = output[0] if isinstance(output, tuple | list) else output
            if totals is not None:
                totals.start()
            (loss * 0.0).backward()
        finally:
            handle.remove()
        _restore_buffers(self.model, saved[-1])
        _set_rng_state(device, rng)

    def _apply(self, window: WindowTotals) -> StepResult:
        """Unscale, check, clip, step, update, schedule and zero, once."""
        if window.count == 0:
            _clear_grads(self._params)
            return self._result(window, math.nan, "the window holds no items (N == 0)")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._grad_norm_and_clip(_present_grads(self._params))
        finite = math.isfinite(grad_norm)
        reason = None if finite else f"non-finite gradient (norm {grad_norm})"
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if not finite:
                reason += f"; GradScaler lowered its scale to {self.scaler.get_scale():g}"
        elif finite or not self.skip_nonfinite:
            self.optimizer.step()
            reason = None
        if reason is None and self.scheduler is not None:
            self.scheduler.step()
        _clear_grads(self._params)
        return self._result(window, grad_norm, reason)

    def _result(self, window: WindowTotals, grad_norm: float, reason: str | None) -> StepResult:
        self._window_index += 1
        loss = window.loss_sum / window.count if window.count else math.nan
        count = window.count
        return StepResult(
            loss=loss,
            count=int(count) if float(count).is_integer() else count,
            grad_norm=grad_norm,
            stepped=reason is None,
            skip_reason=reason,
            micro_batches=window.micro_batches,
            micro_batch_size=window.micro_batch_size,
            step=self._window_index,
        )

    # --------------------------------------------------------------- helpers

    def _exchange_stats(self, local: float, sizes: list[int]) -> _Stats:
        """Start the window's one exchange: item count, passes, samples, and whether this
        rank can replay a micro-batch (it has had one)."""
        can_replay = self._template is not None or bool(sizes)
        # Python numbers from here: a few tensor ops per window would cost more than the rest.
        row = [local, len(sizes), sum(sizes), float(can_replay)]
        return _Stats(self.sync.exchange(row), self.sync.rank)

    def _share_out_of_memory(self, out_of_memory: bool, largest: int) -> None:
        """One small exchange per attempt: if any rank ran out of memory, all retry."""
        table = self.sync.exchange([float(out_of_memory), float(largest)])()
        failed = [size for ran_out, size in table if ran_out]
        if failed:
            raise _RetryWindow(int(min(failed)))

    def _grad_norm_and_clip(self, grads: list[torch.Tensor]) -> float:
        """Global L2 norm of ``grads``; clips them to ``max_grad_norm`` when it is finite."""
        if not grads:
            return 0.0
        norm = _total_norm(grads)
        value = float(norm.item())
        if self.max_grad_norm is not None and math.isfinite(value):
            # The same coefficient as torch.nn.utils.clip_grad_norm_.
            coefficient = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coefficient.to(grads[0].device))
        return value

    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast is None:
            return _NO_CONTEXT
        return torch.autocast(device_type=self._device().type, dtype=self.autocast)


# ------------------------------------------------------------------ plumbing


class _Totals:
    """The window's loss sums, and the counts loss_fn returns if it returns any.

    :meth:`add` parses each pass's output; :meth:`start` begins summing the
    totals over ranks, just before the window's last backward, so the small
    collective travels while that backward computes; :meth:`finish` waits for
    the sums. Counts are checked once, on the sums, so no pass waits for the
    device and every rank raises together.
    """

    def __init__(
        self, sync: GradientSync, counter_given: bool, scale: float, device: torch.device
    ) -> None:
        self.sync = sync
        self.counter_given = counter_given
        self.scale = scale  # world_size / N: DDP and FSDP2 average over ranks
        self.device = device
        self.used: bool | None = None
        self.losses: list[torch.Tensor] = []
        self.counts: list[torch.Tensor] = []
        self._wait: Callable[[], list[float]] | None = None

    def add(self, output: Any) -> torch.Tensor:
        """Record one pass's ``loss_fn`` output; returns the loss to run backward on."""
        pair = isinstance(output, (tuple, list))
        if self.used is None:
            self.used = pair
        if pair != self.used:
            raise TypeError(
                "loss_fn returned a (loss_sum, count) pair for some micro-batches and a bare "
                "loss for others; return the same kind every time"
            )
        if pair:
            if self.counter_given:
                raise TypeError(
                    "loss_fn returned (loss_sum, count) while count=... was also given; choose "
                    "one: drop count=... to normalize by the counts loss_fn returns, or return "
                    "the loss sum alone"
                )
            if len(output) != 2:
                raise TypeError(
                    f"loss_fn returned a sequence of {len(output)} items; return the loss sum "
                    "alone or a pair (loss_sum, count)"
                )
            output, count = output
            self.counts.append(_as_count(count, "the count returned by loss_fn").to(self.device))
        loss = _check_loss(output)
        self.losses.append(loss)  # as returned: start() stacks them without autograd
        # Counts returned by loss_fn are only known at the end: the gradient is divided then.
        return loss * (float(self.sync.world_size) if pair else self.scale)

    def start(self) -> None:
        """Start summing (loss sum, returned count, negative counts, counts returned?)."""
        if self._wait is not None:
            return
        with torch.no_grad():  # the losses are kept as loss_fn returned them
            losses = torch.stack(self.losses) if self.losses else None
            if losses is not None and not (self.counts or self.sync.distributed):
                # One rank, no returned count: the losses alone, read and added up when
                # finished.
                self._wait = lambda: [math.fsum(losses.tolist()), 0.0, 0.0, 0.0]
                return
            values = torch.zeros(4, dtype=torch.float64, device=self.device)
            if losses is not None:
                values[0] = losses.sum(dtype=torch.float64)
            if self.counts:
                counts = torch.stack(self.counts)
                values[1:] = torch.stack(
                    [counts.sum(), (counts < 0).sum(dtype=torch.float64), counts.new_ones(())]
                )
        self._wait = self.sync.all_reduce(values)

    def finish(self) -> tuple[float, float, bool]:
        """Over all ranks: the loss sum, the returned count, whether counts were returned."""
        self.start()
        assert self._wait is not None
        loss, count, negative, returned = self._wait()
        if negative:
            raise ValueError(
                f"loss_fn returned a negative count for {int(negative)} micro-batch(es); a count "
                "is a number of items (samples, tokens), 0 or more: return (loss_sum, n_items)"
            )
        return loss, count, returned > 0


class _Stats:
    """The window's numbers over all ranks, from one gather of a row per rank
    ``[item count, passes, samples, can replay]``; waited for on first need."""

    # Set by wait(): reading one before is an AttributeError, not a silent 0.
    count: float  # N
    passes: int  # of the busiest rank
    offset: int  # samples on lower ranks
    all_can_replay: bool

    def __init__(self, wait: Callable[[], list[list[float]]], rank: int) -> None:
        self._wait: Callable[[], list[list[float]]] | None = wait
        self._rank = rank

    def wait(self) -> _Stats:
        if self._wait is None:
            return self
        table, self._wait = self._wait(), None
        self.count = sum(row[0] for row in table)
        self.passes = int(max(row[1] for row in table))
        self.offset = int(sum(row[2] for row in table[: self._rank]))
        self.all_can_replay = all(row[3] for row in table)
        stranded = [r for r, row in enumerate(table) if row[1] < self.passes and row[3] == 0]
        if stranded and self.count > 0:
            raise RuntimeError(
                f"ranks {stranded} have no data in their first window and cannot take part in "
                "the window's collectives; give every rank at least one sample in its first "
                "window"
            )
        return self

    def rank_offset(self) -> int:
        return self.wait().offset


class _GradBuffers:
    """The window's gradient so far: sums low-precision gradients across micro-batches
    in ``dtype`` (e.g. float32).

    After every pass the gradients of parameters whose dtype is narrower than
    ``dtype`` are moved into wide buffers (``stash``); before a pass that a
    data-parallel wrapper synchronizes, and at the end of the window, the sums
    are rounded back into ``.grad`` once (``restore``).
    """

    def __init__(
        self, params: list[nn.Parameter], dtype: torch.dtype | None, round_before_sync: bool
    ) -> None:
        self.narrow = (
            []
            if dtype is None
            else [
                p
                for p in params
                if p.requires_grad
                and p.dtype.is_floating_point
                and p.dtype.itemsize < dtype.itemsize
            ]
        )
        self.params = params
        self.dtype = dtype
        self.round_before_sync = round_before_sync
        self.sums: dict[nn.Parameter, torch.Tensor] = {}

    def before_pass(self, synchronize: bool) -> None:
        """A data-parallel wrapper reduces .grad inside a synchronizing backward, so the
        wide sums must be back in .grad before it (``round_before_sync``)."""
        if synchronize and self.round_before_sync:
            self.restore()

    def after_pass(self, synchronize: bool) -> None:
        """Move the pass's gradient into the wide sums; a local model keeps them wide
        until the window ends and rounds once."""
        if not (synchronize and self.round_before_sync):
            self.stash()

    def stash(self) -> None:
        for p in self.narrow:
            if p.grad is None:
                continue
            if p in self.sums:
                self.sums[p].add_(p.grad)
            else:
                self.sums[p] = p.grad.to(self.dtype)
            p.grad = None

    def restore(self) -> None:
        self.stash()
        for p, total in self.sums.items():
            p.grad = total.to(p.dtype)
        self.sums.clear()

    def scale(self, factor: float) -> None:
        """Multiply the window's gradient so far, wide sums and ``.grad``, by ``factor``."""
        for total in self.sums.values():
            total.mul_(factor)
        present = _present_grads(self.params)
        if present:
            torch._foreach_mul_(present, factor)

    def discard(self) -> None:
        self.sums.clear()


def _refuse_step(*_: Any) -> None:
    raise RuntimeError(
        "optimizer.step() was called inside a truebatch window (from loss_fn?); the "
        "Accumulator steps once per window itself: remove the call from loss_fn"
    )


def _refuse_zero_grad(*_: Any, **__: Any) -> None:
    raise RuntimeError(
        "zero_grad() was called inside a truebatch window (from loss_fn?); it would "
        "erase the gradient accumulated so far. The Accumulator zeroes gradients once "
        "per window itself: remove the call from loss_fn"
    )


class _Guard:
    """Inside a window, the user's code may not step or zero the gradients
    (:meth:`Accumulator._pass` checks for a backward inside loss_fn).

    Entering shadows ``step`` and ``zero_grad`` on the optimizer and
    ``zero_grad`` on the model, as instance attributes; leaving restores what
    the instances had before (an LR scheduler wraps ``optimizer.step`` there).
    ``object.__setattr__`` skips nn.Module's bookkeeping, which has nothing to
    track for a method.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        self.shadows = (
            (optimizer, "step", _refuse_step),
            (optimizer, "zero_grad", _refuse_zero_grad),
            (model, "zero_grad", _refuse_zero_grad),
        )

    def __enter__(self) -> None:
        self.saved = [vars(owner).get(name) for owner, name, _ in self.shadows]
        for owner, name, refuse in self.shadows:
            object.__setattr__(owner, name, refuse)

    def __exit__(self, *_: object) -> None:
        for (owner, name, _), own in zip(self.shadows, self.saved, strict=True):
            if own is None:
                object.__delattr__(owner, name)
            else:
                object.__setattr__(owner, name, own)


_grad_of = operator.attrgetter("grad")
_Gradients = tuple[list[torch.Tensor | None], list[int]]


def _gradients(params: list[nn.Parameter]) -> _Gradients:
    """The parameters' gradients (held, so no id is reused) and their version counters."""
    grads = list(map(_grad_of, params))
    return grads, [g._version for g in grads if g is not None]


def _gradients_changed(params: list[nn.Parameter], before: _Gradients) -> bool:
    """Whether a backward ran since ``before``: it sets a new ``.grad`` or adds into one."""
    grads, versions = before
    now = list(map(_grad_of, params))
    return any(map(operator.is_not, now, grads)) or versions != [
        g._version for g in now if g is not None
    ]


def _split_all(
    pieces: list[Batch], sizes: list[int], micro_batch_size: int | None
) -> list[tuple[Batch, int]]:
    """Every piece (of ``sizes`` samples) split by ``micro_batch_size``, each with its size."""
    if micro_batch_size is None:
        return list(zip(pieces, sizes, strict=True))
    return [
        pair
        for piece, size in zip(pieces, sizes, strict=True)
        for pair in split_sized(piece, size, micro_batch_size)
    ]


def _template_of(micro_batch: Batch) -> Batch:
    """A two-sample copy of a micro-batch, enough to replay a zero-weight pass."""
    return map_tensors(micro_batch, lambda t: t[:2].clone())


def _as_count(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"{what} must be a number or a 1-element tensor, got shape {tuple(value.shape)}"
            )
        return value.detach().reshape(()).to(torch.float64)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(
        f"{what} must be an int, a float or a 1-element tensor, got {type(value).__name__}"
    )


def _local_count(micro_batches: list[tuple[Batch, int]], count: Counter | None) -> float:
    """This rank's item count: the sum of ``count(micro_batch)``, by default the samples.

    Counting samples needs no call: the micro-batches come with their sizes.
    """
    if count is None or count is count_samples:
        return float(sum(size for _, size in micro_batches))
    if not micro_batches:
        return 0.0
    values = torch.stack(
        [_as_count(count(mb), "count(micro_batch)").cpu() for mb, _ in micro_batches]
    )
    negative = torch.nonzero(values < 0).flatten().tolist()
    if negative:
        raise ValueError(
            f"count(micro_batch) returned a negative count for micro-batches {negative}; "
            "a count is a number of items (samples, tokens), 0 or more"
        )
    return float(values.sum())


def _check_loss_fn_and_count(loss_fn: Any, count: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable as loss_fn(model, micro_batch) -> loss_sum, got "
            f"{type(loss_fn).__name__}"
        )
    if count is not None and not callable(count):
        raise TypeError(
            f"count must be callable as count(micro_batch) -> int or tensor, or None, got "
            f"{type(count).__name__}; use tb.count_samples or tb.count_tokens(...)"
        )


def _check_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"loss_fn must return a 0-dim tensor (the SUM of per-item losses), got "
            f"{type(loss).__name__}"
        )
    if loss.dim() != 0:
        raise TypeError(
            f"loss_fn must return a 0-dim tensor (the SUM of per-item losses), got shape "
            f"{tuple(loss.shape)}; return per_item_losses.sum() or use reduction='sum'"
        )
    if not loss.requires_grad:
        raise TypeError(
            "loss_fn returned a tensor that does not require grad: it was computed under "
            "torch.no_grad(), detached, or from frozen parameters only; compute it from the "
            "model's output without .detach()/.item()"
        )
    return loss


def _check_model_and_optimizer(model: Any, optimizer: Any, scheduler: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    owned = {id(p) for p in model.parameters()}
    foreign = sum(
        1 for group in optimizer.param_groups for p in group["params"] if id(p) not in owned
    )
    if foreign:
        raise ValueError(
            f"optimizer holds {foreign} parameter(s) that are not parameters of model; build "
            "the optimizer from model.parameters() (after wrapping the model in DDP/FSDP)"
        )
    if scheduler is not None:
        if not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
        # Compare param groups, not objects: wrappers such as Lightning's optimizer share
        # the param groups of the optimizer the scheduler was built for.
        bound = getattr(scheduler, "optimizer", optimizer)
        if getattr(bound, "param_groups", None) is not optimizer.param_groups:
            raise ValueError(
                "scheduler was built for another optimizer; create it from the optimizer "
                "passed to the Accumulator"
            )


def _check_micro_batch_size(size: Any, max_size: Any) -> int | Literal["auto"] | None:
    if max_size is not None and size != "auto":
        raise ValueError(
            "max_micro_batch_size only applies with micro_batch_size='auto'; drop it or set "
            "micro_batch_size='auto'"
        )
    if size is None or size == "auto":
        if max_size is not None and (not isinstance(max_size, int) or max_size <= 0):
            raise ValueError(f"max_micro_batch_size must be a positive int, got {max_size!r}")
        return size
    if isinstance(size, str):
        raise ValueError(f"micro_batch_size must be a positive int, 'auto' or None, got {size!r}")
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(
            f"micro_batch_size must be a positive int, 'auto' or None, got {type(size).__name__}"
        )
    if size <= 0:
        raise ValueError(f"micro_batch_size must be a positive int, 'auto' or None, got {size}")
    return size


def _check_max_grad_norm(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(
            f"max_grad_norm must be a positive number or None, got {value!r}; use None to "
            "disable clipping"
        )
    return float(value)


def _check_scaler(scaler: Any) -> Any:
    if scaler is None:
        return None
    required = ("scale", "unscale_", "step", "update", "state_dict")
    missing = [name for name in required if not hasattr(scaler, name)]
    if missing:
        raise TypeError(
            f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__} (missing "
            f"{missing})"
        )
    return scaler


def _check_dtype(
    dtype: Any, name: str, allowed: tuple[torch.dtype, ...] | None
) -> torch.dtype | None:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating torch.dtype such as torch.float32, got {dtype!r}"
        )
    if allowed is not None and dtype not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {dtype}")
    return dtype


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients together (a full tensor, also for FSDP2's DTensors)."""
    first = grads[0]
    if all(
        type(g) is torch.Tensor and g.dtype == first.dtype and g.device == first.device
        for g in grads
    ):
        # The common case in one fused kernel: get_total_norm first groups the tensors by
        # device and dtype, which costs more than the norm of a small model.
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if hasattr(torch.nn.utils, "get_total_norm"):
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
    else:  # torch < 2.6
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _clear_grads(params: list[nn.Parameter]) -> None:
    """``zero_grad(set_to_none=True)`` of model and optimizer in one pass: the
    optimizer's parameters are the model's (checked at construction)."""
    for parameter in params:
        parameter.grad = None


def _present_grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The gradients that exist (a parameter the window did not reach has none)."""
    return [p.grad for p in params if p.grad is not None]


def _clone_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def _restore_buffers(model: nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved, strict=True):
            buffer.copy_(value)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(device: torch.device, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
