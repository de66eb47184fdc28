"""A ``transformers.Trainer`` whose gradient accumulation is truebatch's.

The Trainer groups ``gradient_accumulation_steps`` batches per optimizer step.
This subclass runs each such group as one truebatch window: with N the number
of items the window scores over all ranks (scored tokens, or samples),

    grad = (1 / N) * sum over micro-batches j of d(loss_sum_j) / d(params),

the gradient of the big batch of ``per_device_train_batch_size ×
gradient_accumulation_steps × world_size`` samples, whatever the model's
head, however the tokens fall over micro-batches and ranks, and for the short
last window of an epoch. The Trainer itself still clips, steps the
optimizer, scaler and scheduler once per window, logs, evaluates, saves and
calls the callbacks.

An item is what the model's loss averages over: the label positions a causal
LM scores after its shift (``labels[:, 1:] != -100``, or ``shift_labels !=
-100``), the label positions of masked LMs, token classifiers and
sequence-to-sequence models (``labels != -100``), and the samples of every
other head. Token losses are summed from the logits by
:func:`~truebatch.integrations.transformers.token_loss_sum` (in the logits'
precision: float64 stays float64); other heads' mean losses are multiplied by
their micro-batch's sample count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
import transformers
from torch import nn

from truebatch import _context
from truebatch.accumulator import Accumulator
from truebatch.batching import count_samples, count_tokens
from truebatch.integrations.transformers._loss import logits_of, token_loss_sum

__all__ = ["ExactAccumulation", "Items", "Trainer"]

Items = Literal["shifted_tokens", "tokens", "samples"]

_TOKEN_HEADS = {
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
}
_SAMPLE_HEADS = {
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
}
_LOSS_TYPES: dict[str, Items] = {
    "ForCausalLM": "shifted_tokens",
    "ForMaskedLM": "tokens",
    "ForTokenClassification": "tokens",
    "ForSequenceClassification": "samples",
    "ForImageClassification": "samples",
    "ForVideoClassification": "samples",
    "ForAudioClassification": "samples",
    "ForQuestionAnswering": "samples",
}
_LABEL_KEYS = ("labels", "shift_labels")


def infer_items(model: nn.Module) -> Items:
    """What the loss of a Transformers model averages over, from its class.

    Causal LMs (the auto-class causal-LM mapping, or ``loss_type ==
    "ForCausalLM"``) score shifted tokens; masked LMs, token classifiers and
    encoder-decoders score their label tokens; classification and question
    answering heads average over samples.

    Raises:
        ValueError: the class is none of these; pass ``items=`` to the Trainer.
    """
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "tokens"
    if name in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "shifted_tokens"
    for mapping, items in [(m, "tokens") for m in sorted(_TOKEN_HEADS)] + [
        (m, "samples") for m in sorted(_SAMPLE_HEADS)
    ]:
        if name in getattr(modeling_auto, mapping, {}).values():
            return items  # type: ignore[return-value]
    loss_type = getattr(model, "loss_type", None)
    if loss_type in _LOSS_TYPES:
        return _LOSS_TYPES[loss_type]
    raise ValueError(
        f"`model` got {name}, whose loss truebatch cannot classify; expected a Transformers "
        "causal LM, masked LM, token, sequence or image classifier. Fix: pass "
        'items="shifted_tokens", "tokens" or "samples" to the Trainer.'
    )


def counter(items: Items) -> Callable[[Mapping[str, Any]], torch.Tensor | int]:
    """The item count of one micro-batch; a collator's ``shift_labels`` is counted as is."""
    if items == "samples":
        return count_samples
    aligned = count_tokens("labels", shift=False)
    if items == "tokens":
        return aligned
    shifted, preshifted = (
        count_tokens("labels", shift=True),
        count_tokens("shift_labels", shift=False),
    )

    def count(batch: Mapping[str, Any]) -> torch.Tensor:
        return preshifted(batch) if "shift_labels" in batch else shifted(batch)

    return count


class ExactAccumulation:
    """Mixin: a ``transformers.Trainer`` subclass with exact gradient accumulation.

    Put it first among the bases: ``class MyTrainer(ExactAccumulation,
    trl.SFTTrainer)``; :class:`Trainer` is ``ExactAccumulation`` on
    ``transformers.Trainer``.

    Each optimizer step is the big batch of ``per_device_train_batch_size ×
    gradient_accumulation_steps × world_size`` samples, normalized by its
    global item count N (see the module docstring), run by a
    :class:`truebatch.Accumulator`: counted before any backward, every backward
    scaled by ``world_size / N``, DDP synchronizing once per window. The
    logged ``loss`` is each window's mean over its N items, all ranks.

    Args:
        *args: as ``transformers.Trainer``.
        items: what the loss averages over: ``"shifted_tokens"`` (causal LM),
            ``"tokens"`` or ``"samples"``; ``None`` infers it from the model's class.
        **kwargs: as ``transformers.Trainer``.

    Without a loss override, token losses are summed from the logits (see the
    module docstring). A ``compute_loss`` override (a subclass, TRL's
    trainers) or a ``compute_loss_func`` is honoured when it divides its loss
    sum by ``num_items_in_batch``, the contract of ``transformers.Trainer``:
    it is called with the micro-batch's own item count and its loss
    multiplied back, which is checked once, on the first micro-batch (two
    extra forwards without gradient). One that averages over its own batch is
    refused, as are label smoothing, DeepSpeed and ``DataParallel``.
    ``args.average_tokens_across_devices`` is set to False: the count is
    already global.

    Raises:
        ValueError: at construction, for a setup truebatch cannot make exact.

    Examples:
        >>> class SFTTrainer(ExactAccumulation, trl.SFTTrainer):
        ...     pass
        >>> SFTTrainer(model=model, args=sft_config, train_dataset=train).train()
    """

    def __init__(self, *args: Any, items: Items | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        # truebatch counts the items of every rank itself: a loss override must not
        # also multiply by the number of processes (Trainer.compute_loss does when set).
        self.args.average_tokens_across_devices = False
        model = transformers.modeling_utils.unwrap_model(self.model)
        model = getattr(getattr(model, "base_model", None), "model", model)  # PEFT
        self.items: Items = infer_items(model) if items is None else _check_items(items)
        self._count = counter(self.items)
        self._keeps_labels = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", 0))
        self._refuse_unsupported()
        self._accumulator: Accumulator | None = None
        self._window: list[Any] | None = None
        self._loss_checked = not self._loss_overridden()

    # ---------------------------------------------------------- the window

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], None]:
        """The next window's batches; truebatch counts their items itself."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        self._window = batches
        return batches, None

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Run the whole window on its last batch; earlier batches contribute nothing.

        The Trainer calls this once per batch of the window and synchronizes
        gradients only around the last call, where every forward and backward
        of the window runs (the Accumulator defers DDP's synchronization to
        the window's last backward). Returns the window's mean loss on the
        last batch and 0 on the others, so the Trainer's logged sum is right.
        """
        window = self._window
        if window is None or not any(inputs is batch for batch in window):
            raise RuntimeError(
                "`training_step` got a batch outside the window the Trainer collected; expected "
                "the batches of get_batch_samples. Fix: do not call training_step directly."
            )
        zero = torch.zeros((), device=self.args.device)
        if inputs is not window[-1]:
            return zero
        self._window = None
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        batches = [dict(self._prepare_inputs(batch)) for batch in window]
        if not self._loss_checked:
            self._check_loss_divides(model, batches)
        totals = self._accumulator_for(model).accumulate(batches, self._loss_sum, self._count)
        if totals.count == 0:
            return zero.add_(math.nan)
        return zero.add_(totals.loss_sum / totals.count)

    def _loss_sum(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The window's ``loss_fn``: the SUM of the item losses of one micro-batch."""
        outer = _context.current()
        # Split-invariant dropout keys its masks by the optimizer step, which a
        # checkpoint restores: masks after a resume are those of an unbroken run.
        offset = (lambda: outer.offset) if outer is not None else None
        with _context.micro_batch(self.state.global_step, 0, offset):
            if not self._loss_overridden():
                return self._own_loss(model, batch)
            n = self._count(batch)
            loss = self.compute_loss(model, batch, num_items_in_batch=_at_least_one(n))
            return loss * n

    # ------------------------------------------------------------ the loss

    def _own_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The loss SUM over ``inputs``, in the logits' precision (float64 stays float64)."""
        return _loss_sum(model, inputs, self.items, keep_labels=self._keeps_labels)

    def _loss_overridden(self) -> bool:
        return type(self).compute_loss is not transformers.Trainer.compute_loss or (
            self.compute_loss_func is not None
        )

    def _check_loss_divides(self, model: nn.Module, batches: list[dict[str, Any]]) -> None:
        """Refuse a loss override that does not divide by ``num_items_in_batch``.

        Computes the first micro-batch's loss with ``num_items_in_batch`` n and 2n,
        without gradients, in eval mode and with the RNG restored: an override
        that honours the contract halves; one that averages by itself does not.
        """
        batch = next((b for b in batches if float(self._count(b)) > 0), None)
        if batch is None:
            return
        n = float(self._count(batch))
        device = self.args.device
        training = model.training
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                model.eval()
                one = float(self.compute_loss(model, dict(batch), num_items_in_batch=n))
                two = float(self.compute_loss(model, dict(batch), num_items_in_batch=2 * n))
        finally:
            model.train(training)
        if one == 0.0 or not math.isfinite(one):
            return
        if abs(2 * two - one) > 1e-3 * abs(one):
            what = "compute_loss_func" if self.compute_loss_func is not None else "compute_loss"
            raise ValueError(
                f"`{what}` got num_items_in_batch={n:g} and {2 * n:g} and returned {one:.6g} and "
                f"{two:.6g}; expected the loss sum divided by num_items_in_batch (half the loss "
                f"for twice the items). Fix: return loss_sum / num_items_in_batch."
            )
        self._loss_checked = True

    # --------------------------------------------------------------- setup

    def _accumulator_for(self, model: nn.Module) -> Accumulator:
        """One Accumulator per (model, optimizer): rebuilt when train() builds new ones."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        acc = self._accumulator
        if acc is None or acc.model is not model or acc.optimizer is not optimizer:
            scaler = getattr(self.accelerator, "scaler", None)
            acc = self._accumulator = Accumulator(model, optimizer, scaler=scaler)
        return acc

    def set_initial_training_values(self, args: Any, dataloader: Any) -> Any:
        """The Trainer's values, refused when ranks would run different numbers of windows."""
        values = super().set_initial_training_values(args, dataloader)
        if args.world_size > 1 and torch.distributed.is_initialized():
            windows = torch.tensor([float(values[1])], device=args.device)
            gathered = [torch.zeros_like(windows) for _ in range(args.world_size)]
            torch.distributed.all_gather(gathered, windows)
            per_rank = [int(t.item()) for t in gathered]
            if len(set(per_rank)) > 1:
                raise ValueError(
                    f"`train_dataset` got {per_rank} optimizer steps per epoch on the ranks; "
                    "expected the same on every rank. Fix: keep accelerator_config "
                    "even_batches=True, or size the data so every rank has as many windows."
                )
        return values

    def _refuse_unsupported(self) -> None:
        args = self.args
        if args.label_smoothing_factor:
            raise ValueError(
                f"`label_smoothing_factor` got {args.label_smoothing_factor}; expected 0. Fix: "
                "pass compute_loss_func returning F.cross_entropy(..., label_smoothing=eps, "
                "reduction='sum') / num_items_in_batch."
            )
        if args.n_gpu > 1:
            raise ValueError(
                f"`n_gpu` got {args.n_gpu} (torch.nn.DataParallel); expected 1. Fix: start one "
                "process per GPU with torchrun (DistributedDataParallel)."
            )
        if getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "`deepspeed` got a config; expected none (DeepSpeed runs its own accumulation). "
                "Fix: use DDP or FSDP through torchrun / accelerate."
            )


def _check_items(items: Any) -> Items:
    if items not in ("shifted_tokens", "tokens", "samples"):
        raise ValueError(
            f'`items` got {items!r}; expected "shifted_tokens", "tokens", "samples" or None. '
            "Fix: name what the model's loss averages over."
        )
    return items  # type: ignore[no-any-return]


def _at_least_one(n: torch.Tensor | int) -> torch.Tensor | int:
    """A divisor for an item count: a micro-batch with no items sums to 0, divided by 1."""
    return n.clamp(min=1) if isinstance(n, torch.Tensor) else max(int(n), 1)


def model_loss(model: nn.Module, *, items: Items | None = None) -> tuple[Any, Any]:
    """``(loss_fn, count)`` of a Transformers model, as the truebatch :class:`Trainer`
    computes them: for ``tb.check``, ``truebatch check`` or a hand-written loop.

    ``loss_fn(model, batch)`` returns the SUM of the item losses of a collated
    batch; ``count(batch)`` its items (see :func:`infer_items`).

    Example:
        >>> loss_fn, count = model_loss(model)
        >>> report = tb.check(model, loss_fn, batch, count=count)
    """
    items = infer_items(model) if items is None else _check_items(items)
    keep = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", 0))

    def loss_fn(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return _loss_sum(model, dict(batch), items, keep_labels=keep)

    return loss_fn, counter(items)


def _loss_sum(
    model: nn.Module, inputs: dict[str, Any], items: Items, *, keep_labels: bool
) -> torch.Tensor:
    """The loss SUM over ``inputs``, in the logits' precision (float64 stays float64)."""
    if items == "samples":
        _refuse_ignored_samples(inputs.get("labels"))
        return _model_loss(model(**inputs)) * count_samples(inputs)
    model_inputs = {k: v for k, v in inputs.items() if keep_labels or k not in _LABEL_KEYS}
    out = model(**model_inputs)
    causal = items == "shifted_tokens"
    key = "shift_labels" if causal and "shift_labels" in inputs else "labels"
    return token_loss_sum(logits_of(out), inputs[key], shift=causal and key == "labels")


def _model_loss(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None and isinstance(output, tuple | list) and output:
        loss = output[0]
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError(
            f"`model` returned {type(output).__name__} without a 0-dim loss; expected the mean "
            "loss of the batch (pass labels). Fix: pass items= for a token-level loss, or a "
            "compute_loss_func."
        )
    return loss


class Trainer(ExactAccumulation, transformers.Trainer):
    """``transformers.Trainer`` with exact gradient accumulation; same arguments,
    plus ``items=`` (see :class:`ExactAccumulation`).

    Examples:
        >>> from truebatch.integrations.transformers import Trainer
        >>> trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
        >>> trainer.train()
    """


def _refuse_ignored_samples(labels: Any) -> None:
    """A sample-level head averages over the samples it scores: all of them, or the mean
    is over a count truebatch does not know."""
    integer = isinstance(labels, torch.Tensor) and not labels.is_floating_point()
    if integer and bool((labels == -100).any()):
        raise ValueError(
            "`labels` got -100 in a sample-level head's batch; expected every sample "
            'scored. Fix: drop unscored samples, or pass items="tokens" if the head '
            "averages over its labels that are not -100."
        )
