"""What each demo trains: data, model, optimizer, losses, item counter and metric.

A :class:`Task` holds everything a loop needs, so the loops in
:mod:`truebatch.demos.loops` stay task-agnostic:

- ``mean_loss(model, batch)``: the framework-default loss, the mean over the
  batch's items (samples, or scored tokens); what hand-written loops use.
- ``sum_loss(model, batch)``: the sum over the batch's items; what truebatch's
  ``loss_fn`` returns. ``mean_loss == sum_loss / count`` on every batch.
- ``count(batch)``: the item count (``tb.count_samples`` or ``tb.count_tokens``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from truebatch.batching import Batch, Counter, count_samples, count_tokens, split
from truebatch.demos import data
from truebatch.demos.models import CharTransformer, DigitsCNN


@dataclass(frozen=True)
class Task:
    """One demo's training problem.

    Attributes:
        name: short name (``"digits"``, ``"lm"``).
        make_model: a freshly initialized model (the caller seeds the RNG).
        make_optimizer: the optimizer for a model.
        mean_loss: mean loss over a batch's items.
        sum_loss: summed loss over a batch's items.
        count: a batch's item count.
        epochs: per epoch, the effective batches in training order.
        batch_size: samples per effective batch (the last one of an epoch may be short).
        micro_batch_size: samples per micro-batch of the accumulation loops.
        evaluate: the final metric of a trained model (evaluated in eval mode).
        metric: what ``evaluate`` measures, for the table header.
        items: what ``count`` counts, for the output.
    """

    name: str
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    mean_loss: Callable[[nn.Module, Batch], torch.Tensor]
    sum_loss: Callable[[nn.Module, Batch], torch.Tensor]
    count: Counter
    epochs: list[list[Batch]]
    batch_size: int
    micro_batch_size: int
    evaluate: Callable[[nn.Module], float]
    metric: str
    items: str

    def __post_init__(self) -> None:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}; the accumulation loops group k = batch_size / "
                "micro_batch_size micro-batches per window, so choose sizes that divide"
            )

    @property
    def accumulation_steps(self) -> int:
        """k: micro-batches per full window."""
        return self.batch_size // self.micro_batch_size

    @property
    def steps(self) -> int:
        """Optimizer steps over all epochs (one per effective batch)."""
        return sum(len(batches) for batches in self.epochs)


def _digits_loss(model: nn.Module, batch: Batch, reduction: str) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels, reduction=reduction)


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(images).argmax(dim=1) == labels).sum().item()
    model.train()
    return correct / len(labels)


def digits_task(
    epochs: int, train_size: int | None = None, batch_size: int = 64, micro_batch_size: int = 16
) -> Task:
    """The default demo: :class:`DigitsCNN` (BatchNorm, dropout) on the digits, float64.

    SGD with momentum 0.9, learning rate 0.05; the training set is reshuffled
    every epoch by a fixed seed.
    """
    digits = data.load_digits(torch.float64, train_size)
    orders = data.epoch_orders(len(digits.train_y), epochs, seed=1)
    return Task(
        name="digits",
        make_model=lambda: DigitsCNN().to(torch.float64),
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        mean_loss=functools.partial(_digits_loss, reduction="mean"),
        sum_loss=functools.partial(_digits_loss, reduction="sum"),
        count=count_samples,
        epochs=[
            split((digits.train_x[order], digits.train_y[order]), batch_size) for order in orders
        ],
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        evaluate=functools.partial(_accuracy, images=digits.test_x, labels=digits.test_y),
        metric="test accuracy",
        items="samples",
    )


def _lm_loss(model: nn.Module, batch: Batch, reduction: str) -> torch.Tensor:
    # Position t predicts token t + 1; padded labels are IGNORE_INDEX and not scored.
    logits = model(batch["input_ids"])[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=data.IGNORE_INDEX,
        reduction=reduction,
    )


def _loss_per_token(model: nn.Module, batch: Batch, count: Counter) -> float:
    model.eval()
    with torch.no_grad():
        value = _lm_loss(model, batch, reduction="sum").item() / float(count(batch))
    model.train()
    return value


def lm_task(epochs: int, batch_size: int = 8, micro_batch_size: int = 2, width: int = 32) -> Task:
    """``--task lm``: :class:`CharTransformer` on the Zen of Python by character, float64.

    Loss is the mean over scored tokens (``ignore_index`` padding); SGD with
    momentum 0.9, learning rate 0.3; lines reshuffled every epoch by a fixed seed. With 20
    lines and effective batches of 8, every epoch ends with a window of 4 lines.
    ``width`` is the model's (``truebatch bench --width`` scales the compute per step).
    """
    corpus = data.char_corpus(data.zen_lines())
    everything = corpus.batch(torch.arange(len(corpus.labels)))
    orders = data.epoch_orders(len(corpus.labels), epochs, seed=1)
    count = count_tokens(key="labels", ignore_index=data.IGNORE_INDEX, shift=True)
    return Task(
        name="lm",
        make_model=lambda: CharTransformer(
            len(corpus.vocabulary) + 2, corpus.input_ids.shape[1], width=width
        ).to(torch.float64),
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9),
        mean_loss=functools.partial(_lm_loss, reduction="mean"),
        sum_loss=functools.partial(_lm_loss, reduction="sum"),
        count=count,
        epochs=[split(corpus.batch(order), batch_size) for order in orders],
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        evaluate=functools.partial(_loss_per_token, batch=everything, count=count),
        metric="loss per token",
        items="tokens",
    )
