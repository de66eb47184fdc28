"""One window: count the items, weight every backward, run the passes, total the losses.

For a loss that is a sum over items, divided by the item count N of the whole
effective batch (over all data-parallel ranks),

    grad = sum over passes j of  weight * d(loss_sum_j) / d(params),
    weight = world_size / N

(DDP and FSDP2 average gradients over ranks; world_size undoes that). With
loss terms (``truebatch.terms``) each term t has its own sum, count N_t and
coefficient w_t, and the same equation holds per term:

    grad = sum over passes j, terms t of  weight_t * d(loss_sum_jt) / d(params),
    weight_t = world_size * w_t / N_t          (0 when N_t == 0)

Every N is counted from the data before the first backward and exchanged once
over the ranks (one row per rank, one count per term), so every backward is
weighted as it runs and nothing is divided afterwards. Two branches weight
the passes with an assumed N and correct the gradient once
(:meth:`Window.correct_count`) when the true N arrives:

- under DDP the passes start with the previous window's N while the exchange
  travels (why: ``benchmarks/ddp.py``; tested by
  ``test_item_count_travels_while_the_passes_compute_under_ddp``);
- when ``loss_fn`` returns ``(loss_sum, count)``, N is known only from the
  loss totals after the last pass: the passes assume N = 1.

Neither applies to loss terms: once the terms' gradients are summed in
``.grad``, no single factor corrects terms whose N changed by different
ratios, so with terms the passes wait for the exchange.

Under torch.distributed every rank runs the same number of passes: a rank
with fewer micro-batches replays a zero-weight pass. ``micro_batch_size="auto"``
under torch.distributed runs :meth:`Window.passes_sharing_out_of_memory`, so
that an out-of-memory error on one rank makes every rank retry
(``test_auto_retries_every_rank_at_the_same_size``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from truebatch import _context
from truebatch.batching import Batch, map_tensors, slice_samples
from truebatch.distributed import GradientSync
from truebatch.gradients import GradientSums, ParameterSets, clear_gradients, scale_gradients
from truebatch.guard import WindowGuard, check_gradients_unchanged, gradients_seen
from truebatch.losses import LossFn, LossTotals, local_counts, trusted_counter
from truebatch.readout import Readout
from truebatch.snapshot import clone_buffers, restore_buffers, rng_state, set_rng_state
from truebatch.terms import Counts, TermSpec, term_spec
from truebatch.totals import WindowTotals, read_totals

__all__ = [
    "Attempt",
    "OutOfMemoryError",
    "OutOfMemoryOnSomeRank",
    "Window",
    "WindowHistory",
    "WindowSetup",
]

OutOfMemoryError: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
Plan = list[tuple[Batch, int]]
_NO_CONTEXT = nullcontext()  # reusable, and cheaper than a new one per micro-batch


@dataclass(frozen=True)
class WindowSetup:
    """What every window of one Accumulator runs with."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    sync: GradientSync
    parameters: ParameterSets
    scaler: Any
    autocast: torch.dtype | None
    accumulate_dtype: torch.dtype | None

    def autocast_context(self) -> AbstractContextManager[Any]:
        if self.autocast is None:
            return _NO_CONTEXT
        return torch.autocast(device_type=self.parameters.devices[0].type, dtype=self.autocast)


@dataclass
class WindowHistory:
    """What one window leaves the next.

    Attributes:
        index: windows completed (split-invariant layers draw by it): the
            Accumulator's steps, and the optimizer steps its caller takes
            after :meth:`Accumulator.accumulate` (:meth:`stepped_outside`).
        previous_count: under DDP, the last window's N, which the next one's
            passes start with; ``None`` where that cannot be corrected later.
        replay_batch: two samples of a recent micro-batch, for zero-weight
            passes (torch.distributed only).
        stepping: whether the Accumulator's own step is running.
    """

    index: int = 0
    previous_count: float | None = None
    replay_batch: Batch | None = None
    stepping: bool = False

    def stepped_outside(self) -> None:
        """The optimizer stepped: outside the Accumulator's own step, that ends a window
        of :meth:`Accumulator.accumulate` calls (a closure optimizer evaluates several)."""
        if not self.stepping:
            self.index += 1


@dataclass(frozen=True)
class Attempt:
    """One attempt of ``"auto"`` (``truebatch.autosize``), as the ranks share its outcome.

    Attributes:
        size: the micro-batch size tried (samples, or tokens with ``max_tokens="auto"``).
        smallest: whether this rank has no smaller size to retry at.
    """

    size: int
    smallest: bool


class OutOfMemoryOnSomeRank(Exception):
    """Some rank ran out of memory: every rank redoes the window smaller.

    ``size`` is the smallest size that failed on any rank; every rank retries
    at half of it, so all ranks keep one shared size. ``smallest``: a rank
    that failed has no smaller size, so every rank gives up.
    """

    def __init__(self, size: int, *, smallest: bool = False) -> None:
        super().__init__(f"a rank ran out of memory at micro-batch size {size}")
        self.size = size
        self.smallest = smallest


def ratio(numerator: float, n: float | torch.Tensor) -> float | torch.Tensor:
    """``numerator / n``, 0 when ``n`` is 0; on the device when ``n`` is a tensor."""
    if isinstance(n, torch.Tensor):
        return torch.where(n > 0, numerator / n, 0.0)
    return numerator / n if n else 0.0


def as_weight(weight: float | torch.Tensor, loss: torch.Tensor) -> float | torch.Tensor:
    """A device weight in the precision a Python number would be applied in: the loss's
    dtype, or float32 for a 16-bit loss (whose product then rounds once, as with a number)."""
    if not isinstance(weight, torch.Tensor):
        return weight
    dtype = loss.dtype if loss.dtype in (torch.float32, torch.float64) else torch.float32
    return weight.to(device=loss.device, dtype=dtype)


class GlobalCounts:
    """The window's numbers over all ranks, from one gather of a row per rank
    ``[item count per term..., passes, samples, can replay]``; waited for on first need."""

    term_counts: list[float]  # N_t per term (one entry without terms)
    n_items: float  # N, the sum of term_counts; set by wait(), so reading early is an error
    passes: int  # of the busiest rank
    rank_offset: int  # samples on lower ranks
    all_can_replay: bool

    def __init__(self, wait: Callable[[], list[list[float]]], rank: int, *, terms: int) -> None:
        self._wait: Callable[[], list[list[float]]] | None = wait
        self._rank = rank
        self._terms = terms

    def wait(self) -> GlobalCounts:
        if self._wait is None:
            return self
        table, self._wait = self._wait(), None
        k = self._terms
        if len(table) == 1:  # one process: its counts as they are (a tensor stays one)
            self.term_counts = table[0][:k]
        else:
            self.term_counts = [sum(row[t] for row in table) for t in range(k)]
        self.n_items = self.term_counts[0] if k == 1 else sum(self.term_counts)
        self.passes = int(max(row[k] for row in table))
        self.rank_offset = int(sum(row[k + 1] for row in table[: self._rank]))
        self.all_can_replay = all(row[k + 2] for row in table)
        stranded = [r for r, row in enumerate(table) if row[k] < self.passes and row[k + 2] == 0]
        if stranded and self.n_items > 0:
            raise RuntimeError(
                f"ranks {stranded} have no data in their first window and cannot take part in "
                "the window's collectives. Fix: give every rank at least one sample in its "
                "first window."
            )
        return self

    def offset_of_rank(self) -> int:
        return self.wait().rank_offset


class Window:
    """The state of one window and its passes: the plan, the counts, the weight, the
    loss totals and the gradient sums. :meth:`run` once."""

    def __init__(
        self,
        setup: WindowSetup,
        history: WindowHistory,
        plan: Plan,
        loss_fn: LossFn,
        count: Counts,
        *,
        share_out_of_memory: Attempt | None = None,
    ) -> None:
        self.setup, self.history, self.plan = setup, history, plan
        self.loss_fn = loss_fn
        self.terms: TermSpec | None = term_spec(count)
        self.count = count if self.terms is None else self.terms
        self.share_out_of_memory = share_out_of_memory
        self.sizes = [size for _, size in plan]
        device = setup.parameters.devices[0]
        names = None if self.terms is None else self.terms.names
        self.totals = LossTotals(
            setup.sync, count_given=count is not None, device=device, names=names
        )
        self.sums = GradientSums(
            setup.parameters.trainable,
            setup.accumulate_dtype,
            round_before_sync=setup.sync.distributed,
        )
        # The N every backward is weighted by: the window's, or an assumed one until it
        # arrives (the previous window's under DDP, 1 when loss_fn returns counts). With
        # loss terms, each term's N_t (self.counts.term_counts) and never an assumed one.
        self.n_items = 0.0
        self.weights_of: tuple[Any, list[float | torch.Tensor]] | None = None
        # With (loss_sum, count) returns: N over all ranks, from the loss totals.
        self.returned_count: torch.Tensor | None = None

    def run(self) -> WindowTotals:
        """Count, weight, pass, total; leaves the window's gradient in ``.grad``.

        Nothing here reads a device value on one process: counts from tensors,
        the weight and the loss totals stay on the device, in the returned
        totals' readout (see ``truebatch.readout``).
        """
        setup, sync, params = self.setup, self.setup.sync, self.setup.parameters
        largest = max(self.sizes, default=0)
        # Count: every micro-batch's items, before any backward; one exchange over ranks.
        self.counts = self.exchange_counts()
        # Weight: the N of world_size / N (run_pass); the DDP overlap starts with the last N.
        previous = None if self.share_out_of_memory else self.history.previous_count
        if self.terms is not None:
            previous = None  # see the module docstring: terms cannot be corrected afterwards
        if previous is None:
            n_items = self.counts.wait().n_items
            if not isinstance(n_items, torch.Tensor) and n_items == 0:
                return self.window_totals(None, largest)
        self.n_items = previous or self.counts.n_items
        if sync.distributed and self.plan:
            # Taken anew every window: no larger than this window's micro-batches ("auto").
            # Two samples, per-sample lists cut with the tensors (a loss_fn may zip them).
            first, size = self.plan[0]
            two = slice_samples(first, 0, min(2, size), size=size)
            self.history.replay_batch = map_tensors(two, lambda t: t.clone())
        # A gradient left from before the window (the user's own backward) is not part of it.
        clear_gradients(params.model)
        try:
            # Passes, then totals.
            with WindowGuard(setup.optimizer, setup.model, sync.module), sync.window():
                if self.share_out_of_memory:
                    self.passes_sharing_out_of_memory()
                else:
                    self.passes(started_with_previous_count=previous is not None)
                sums = self.totals.finish()
                if self.totals.returns_pairs or (
                    sync.distributed and self.totals.returns_pairs is None
                ):
                    # loss_fn returned the counts: every rank's passes assumed N = 1 (even a
                    # rank that only replayed; whether any rank returned counts is in the
                    # sums). Divide the wide sums before they are rounded: one rounding per
                    # window.
                    terms = len(self.counts.term_counts)
                    returned, count = sums[terms + 2] > 0, sums[terms]
                    factor = torch.where(returned, 1.0 / count, 1.0)
                    self.sums.scale(factor)
                    scale_gradients(params.model, factor)
                    self.n_items = torch.where(returned, count, self.counts.wait().n_items)
                    self.returned_count = self.n_items
                self.sums.restore()
        except BaseException:
            self.sums.discard()
            clear_gradients(params.model)
            raise
        self.remember_count()
        return self.window_totals(sums, largest)

    def weights(self) -> list[float | torch.Tensor]:
        """The one normalization, per loss term: weight_t = world_size * w_t / N_t (0 for a
        term without items). A single loss is one term with w = 1 and N = ``n_items``.
        A count still on the device gives a weight on the device."""
        if self.weights_of is not None and self.weights_of[0] is self.n_items:
            return self.weights_of[1]  # device weights cost tensor ops: once per N
        world_size = self.setup.sync.world_size
        if self.terms is None:
            weights = [ratio(world_size, self.n_items)]
        else:
            weights = [
                ratio(world_size * w, n)
                for w, n in zip(self.terms.weights, self.counts.term_counts, strict=True)
            ]
        self.weights_of = (self.n_items, weights)
        return weights

    def window_totals(
        self, sums: torch.Tensor | list[torch.Tensor] | None, largest: int
    ) -> WindowTotals:
        """The window's totals over all ranks, pending on the device until first read.
        ``sums`` (None: no pass ran) is what :meth:`LossTotals.finish` returned."""
        counts = self.counts
        terms = len(counts.term_counts)
        names = None if self.terms is None else self.terms.names
        weights = None if self.terms is None else self.terms.weights
        term_counts: Any = counts.term_counts
        if any(isinstance(n, torch.Tensor) for n in term_counts):
            # A list of 0-dim tensors, read in the window's one stack.
            device = next(n for n in term_counts if isinstance(n, torch.Tensor)).device
            term_counts = [
                torch.as_tensor(n, dtype=torch.float64, device=device) for n in term_counts
            ]
        if sums is None:
            totals: dict[str, Any] = {"sums": [0.0] * (terms + 3)}
        elif isinstance(sums, list):  # one process: the loss of every pass and term
            totals = {"losses": sums}
        else:
            totals = {"sums": sums}
        readout = Readout(
            {
                **totals,
                "counts": term_counts,
                "n_items": counts.n_items if self.returned_count is None else self.returned_count,
            },
            lambda values: read_totals(values, names, weights),
        )
        # Counts from loss_fn, or from a user's counter as tensors, are checked when read:
        # a caller that must not act on a wrong count reads before acting.
        readout.unchecked = bool(self.totals.returns_pairs) or self.unchecked_count
        return WindowTotals.pending(readout, len(self.plan), largest)

    def exchange_counts(self) -> GlobalCounts:
        """Count this rank's items (before any backward) and start the window's one exchange:
        item count, passes, samples, and whether this rank can replay a micro-batch."""
        can_replay = self.history.replay_batch is not None or bool(self.sizes)
        sync = self.setup.sync
        # Python numbers where the counter gives them: a few tensor ops per window would
        # cost more than the rest. One process keeps a counter's tensors on the device.
        counts = local_counts(self.plan, self.count, on_device=not sync.distributed)
        self.unchecked_count = any(isinstance(n, torch.Tensor) for n in counts) and not all(
            trusted_counter(c) for c in self.counters()
        )
        row = [*counts, len(self.sizes), sum(self.sizes), can_replay]
        if sync.distributed:
            row = [float(v) for v in row]
        return GlobalCounts(sync.exchange(row), sync.rank, terms=len(counts))

    def counters(self) -> tuple[Any, ...]:
        return (self.count,) if self.terms is None else self.terms.counters

    def passes(self, *, started_with_previous_count: bool) -> None:
        """This rank's passes, then zero-weight replays up to the busiest rank's number.

        The gradient synchronizes on the window's last pass (on every pass in
        ``"micro_batch"`` mode). Started with the previous window's N, the
        passes do not wait for the exchange: it is waited for just before this
        rank's last pass, the first that must know the number of passes
        (whether it synchronizes); until then this rank's own number is a safe
        stand-in, as no earlier pass can be the window's last.
        """
        local = len(self.plan)
        if started_with_previous_count:
            settle_at, passes = max(local - 1, 0), local
        else:
            settle_at, passes = -1, self.counts.passes
        offset = 0
        for index in itertools.count():
            if index == settle_at:
                passes = self.settle_previous_count()
            if index >= passes:
                break
            synchronize = self.setup.sync.synchronizes(index, passes)
            last = index == passes - 1
            self.sums.before_pass(synchronize=synchronize)
            if index < local:
                micro_batch, size = self.plan[index]
                self.run_pass(micro_batch, offset, synchronize=synchronize, last=last)
                offset += size
            else:
                self.replay(synchronize=synchronize, last=last)
            self.sums.after_pass(synchronize=synchronize)

    def run_pass(self, micro_batch: Batch, offset: int, *, synchronize: bool, last: bool) -> None:
        """Forward and backward of the micro-batch whose first sample is ``offset`` on this
        rank; the reduction of the loss totals starts before the backward of the ``last``."""
        setup = self.setup
        trainable = setup.parameters.trainable
        before = gradients_seen(trainable)
        setup.sync.prepare(synchronize)
        where = _context.micro_batch(self.history.index, offset, self.counts.offset_of_rank)
        with where, setup.autocast_context():
            output = self.loss_fn(setup.model, micro_batch)
        check_gradients_unchanged(trainable, before)
        losses = self.totals.add(output)
        if self.totals.returns_pairs:
            self.n_items = 1.0  # the counts arrive with the totals: correct_count then
        if last:
            self.totals.start()
        weights = self.weights()
        scaled = losses[0] * as_weight(weights[0], losses[0])
        for term in range(1, len(losses)):
            scaled = scaled + losses[term] * as_weight(weights[term], losses[term])
        if setup.scaler is not None:
            scaled = setup.scaler.scale(scaled)
        scaled.backward()

    def correct_count(self, n_items: float | torch.Tensor) -> None:
        """The passes so far were weighted with an assumed N; make the gradient so far
        (and the passes to come) weighted by ``world_size / n_items``: one multiplication
        (on the device when ``n_items`` is there)."""
        factor = self.n_items / n_items
        self.sums.scale(factor)
        scale_gradients(self.setup.parameters.model, factor)
        self.n_items = n_items

    def settle_previous_count(self) -> int:
        """DDP overlap: wait for the exchange; correct the passes if N differs from the
        previous window's. Returns the number of passes of the window."""
        counts = self.counts.wait()
        pairs = self.totals.returns_pairs  # then N comes with the totals, after the passes
        if counts.n_items > 0 and counts.n_items != self.n_items and not pairs:
            self.correct_count(counts.n_items)
        return counts.passes

    def remember_count(self) -> None:
        """Every rank read the same table, so every rank makes the same choice: only a
        gradient that stays local until the last pass can be corrected, and not in
        float16, where a gradient weighted by a much smaller N could overflow."""
        counts, sync = self.counts, self.setup.sync
        correctable = (
            self.terms is None
            and sync.gradient_stays_local
            and counts.n_items > 0
            and counts.all_can_replay
            and all(p.dtype != torch.float16 for p in self.setup.parameters.trainable)
        )
        self.history.previous_count = counts.n_items if correctable else None

    def passes_sharing_out_of_memory(self) -> None:
        """``"auto"`` under torch.distributed: no real pass synchronizes.

        A zero-weight pass first makes the wrapper's forward-time collectives
        (DDP's first forward after a synchronizing one broadcasts buffers), so a
        pass that runs out of memory before reaching the model cannot leave one
        unmatched. An out-of-memory error stops this rank's passes, every rank
        learns of it through one small exchange (all retry smaller), and only
        then does a zero-weight pass synchronize the gradients. The replayed
        samples are the first of this attempt's first micro-batch, so when they
        run out of memory that micro-batch would too: this attempt ran out.
        """
        out_of_memory, offset = False, 0
        try:
            self.replay(synchronize=False, last=False)
        except OutOfMemoryError:
            out_of_memory = True
        for micro_batch, size in [] if out_of_memory else self.plan:
            try:
                self.run_pass(micro_batch, offset, synchronize=False, last=False)
            except OutOfMemoryError:
                out_of_memory = True
                break
            self.sums.stash()
            offset += size
        attempt = self.share_out_of_memory
        assert attempt is not None  # this branch runs only when sharing
        row = [float(out_of_memory), float(attempt.size), float(attempt.smallest)]
        table = self.setup.sync.exchange(row)()
        failed = [(size, smallest) for ran_out, size, smallest in table if ran_out]
        if failed:
            smallest = any(at_smallest for _, at_smallest in failed)
            raise OutOfMemoryOnSomeRank(int(min(size for size, _ in failed)), smallest=smallest)
        self.sums.restore()
        self.replay(synchronize=True, last=True)

    def replay(self, *, synchronize: bool, last: bool) -> None:
        """A pass that adds exactly zero gradient, to keep the ranks' collectives in step.

        It replays the history's two samples with weight 0; buffers (BatchNorm
        statistics) and the RNG are restored afterwards, so the replay leaves
        no trace. Buffers are saved as the wrapped module starts, after DDP's
        broadcast, which the replay must keep. When this is the window's last
        pass, the reduction of the loss totals starts before its backward.
        """
        setup = self.setup
        devices = setup.parameters.devices
        rng, saved = rng_state(devices), [clone_buffers(setup.model)]

        def save_buffers(*_: Any) -> None:
            if len(saved) == 1:
                saved.append(clone_buffers(setup.model))

        handle = setup.sync.module.register_forward_pre_hook(save_buffers)
        try:
            setup.sync.prepare(synchronize)
            with _context.micro_batch(self.history.index, 0), setup.autocast_context():
                output = self.loss_fn(setup.model, self.history.replay_batch)
            loss = output[0] if isinstance(output, tuple | list) else output
            if isinstance(output, Mapping):
                loss = sum(output.values())
            if last:
                self.totals.start()
            (loss * 0.0).backward()
        finally:
            handle.remove()
        restore_buffers(setup.model, saved[-1])
        set_rng_state(rng, devices)
