"""Small reference models, data and comparisons shared by the core tests.

Everything here is float64 and seeded, so an exactness test can compare
truebatch with the plain full-batch computation at 1e-12. Other test files
import this module (``from models import TASKS, relative_difference``); keep
the names and signatures stable.

Each :class:`Task` bundles a model factory, a batch factory, a loss with a
``reduction`` argument and the truebatch counter that matches it:

- ``loss(model, batch, reduction="sum")`` is what truebatch's ``loss_fn``
  returns (the SUM over items);
- ``loss(model, batch, reduction="mean")`` is the full-batch reference: the
  mean over the N items of the batch (samples, or scored tokens).

:func:`reference_step` is the plain full-batch optimizer step every
exactness test compares truebatch with; :func:`record_grads` captures the
gradients an optimizer steps on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import truebatch as tb

IGNORE_INDEX = -100
PAD_ID = 0
VOCAB = 11
FEATURES = 6
CLASSES = 3
DTYPE = torch.float64


class MLP(nn.Module):
    """``features -> hidden -> hidden -> classes`` with tanh (and optional dropout)."""

    def __init__(self, features: int = FEATURES, hidden: int = 12, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two convolutions and a linear head on ``(N, 1, 8, 8)`` images."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3),
            nn.ReLU(),
        )
        self.head = nn.Linear(6 * 2 * 2, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class GRULanguageModel(nn.Module):
    """Embedding -> GRU -> vocabulary logits; causal, so right padding never leaks."""

    def __init__(self, vocab: int = VOCAB, width: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.gru = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.gru(self.embed(input_ids))
        return self.head(hidden)


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``factory()`` built under ``seed`` in float64, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().to(DTYPE)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def vector_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: ``n`` float64 feature vectors and class labels."""
    g = _generator(seed)
    return torch.randn(n, FEATURES, generator=g, dtype=DTYPE), torch.randint(
        0, CLASSES, (n,), generator=g
    )


def image_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: ``n`` float64 single-channel 8x8 images and class labels."""
    g = _generator(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=DTYPE), torch.randint(
        0, CLASSES, (n,), generator=g
    )


def token_sequences(n: int, seed: int = 0, max_len: int = 12) -> list[torch.Tensor]:
    """``n`` token sequences of random lengths in ``[2, max_len]`` (ids ``1..VOCAB-1``)."""
    g = _generator(seed)
    lengths = torch.randint(2, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(1, VOCAB, (length,), generator=g) for length in lengths]


def collate_tokens(
    sequences: Iterable[torch.Tensor], length: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to ``length`` (default: the longest): ``input_ids`` with PAD_ID,
    ``labels`` (= the ids, unshifted) with IGNORE_INDEX."""
    sequences = list(sequences)
    length = length or max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), PAD_ID, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = sequence
        labels[row, : len(sequence)] = sequence
    return {"input_ids": input_ids, "labels": labels}


def token_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` variable-length sequences padded to the longest, labels ignored on padding."""
    return collate_tokens(token_sequences(n, seed))


def classification_loss(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], reduction: str = "sum"
) -> torch.Tensor:
    """Cross-entropy over samples, reduced by ``reduction`` (``"sum"`` or ``"mean"``)."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction=reduction)


def lm_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "sum"
) -> torch.Tensor:
    """Next-token cross-entropy over the scored positions (position t predicts label t+1).

    ``reduction="mean"`` divides by the number of labels that are not
    IGNORE_INDEX in the whole batch, which is what ``tb.count_tokens()`` counts.
    """
    logits = model(batch["input_ids"])
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


@dataclass(frozen=True)
class Task:
    """A model, its data, its loss and the counter truebatch normalizes it by."""

    name: str
    model: Callable[[], nn.Module]
    batch: Callable[[int, int], Any]
    loss: Callable[..., torch.Tensor]
    count: Callable[[Any], Any]

    def loss_sum(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The truebatch ``loss_fn``: the SUM of the item losses of ``batch``."""
        return self.loss(model, batch, reduction="sum")

    def loss_mean(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The full-batch reference loss: the mean over the items of ``batch``."""
        return self.loss(model, batch, reduction="mean")


TASKS: dict[str, Task] = {
    "mlp": Task("mlp", MLP, vector_batch, classification_loss, tb.count_samples),
    "cnn": Task("cnn", CNN, image_batch, classification_loss, tb.count_samples),
    "gru_lm": Task("gru_lm", GRULanguageModel, token_batch, lm_loss, tb.count_tokens()),
}


def concat(batches: list[Any]) -> Any:
    """Concatenate micro-batches along the leading dimension (tensors, tuples, dicts).

    Token batches are re-padded to the longest of them first, so micro-batches
    collated to different lengths join into one full batch.
    """
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        length = max(b["input_ids"].shape[1] for b in batches)
        return {
            key: torch.cat([_pad_right(b[key], length, fill) for b in batches])
            for key, fill in (("input_ids", PAD_ID), ("labels", IGNORE_INDEX))
        }
    return type(first)(torch.cat(parts) for parts in zip(*batches, strict=True))


def _pad_right(t: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    return F.pad(t, (0, length - t.shape[1]), value=fill)


def reference_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    loss_mean: Callable[[nn.Module, Any], torch.Tensor],
    max_grad_norm: float | None = None,
) -> tuple[float, float, list[torch.Tensor]]:
    """The reference: zero_grad, mean loss over the whole batch, backward, (clip), step.

    Returns the mean loss, the gradient norm before clipping and the gradients
    the optimizer stepped on.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_mean(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    stepped = [g.clone() for g in grads]
    optimizer.step()
    return loss.item(), norm, stepped


def record_grads(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """Grows by the gradients the optimizer sees at each of its steps."""
    seen: list[list[torch.Tensor]] = []
    optimizer.register_step_pre_hook(
        lambda *_: seen.append([p.grad.clone() for p in model.parameters()])
    )
    return seen


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (``b`` is the reference): :func:`truebatch.max_relative_difference`
    of one tensor, so ``inf`` when ``b`` is zero and ``a`` is not."""
    return tb.max_relative_difference([a], [b])


def max_relative_difference(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> float:
    """The contract's measurement over paired tensors (per tensor, with the scale floor):
    :func:`truebatch.max_relative_difference`."""
    return tb.max_relative_difference(list(a), list(b))


def assert_bitwise_equal(a: Any, b: Any, where: str = "state", *, nan_equal: bool = False) -> None:
    """Assert two states (tensors, dicts, lists, numbers, nested) are equal value for value;
    ``nan_equal``: a NaN in the same place of both tensors counts as equal (a training
    that stepped on a non-finite gradient). A NaN number always equals NaN."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        if nan_equal:
            assert torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), where
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}[{key!r}]", nan_equal=nan_equal)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]", nan_equal=nan_equal)
    else:
        assert a == b or (a != a and b != b), where  # NaN equals NaN here


def parameters(model: nn.Module) -> list[torch.Tensor]:
    """Detached copies of ``model``'s parameters, in order."""
    return [p.detach().clone() for p in model.parameters()]


class GroupStateSGD(torch.optim.SGD):
    """SGD with momentum that keeps part of its state in its param groups, as
    schedule-free optimizers (``k``) and Prodigy (``d``, ``d_numerator``) do: the step
    count ``k`` lives there and the step is ``lr / k``."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        for group in self.param_groups:
            group["k"] = group.get("k", 0) + 1
            group["lr"] = group.setdefault("base_lr", group["lr"]) / group["k"]
        return super().step(closure)
