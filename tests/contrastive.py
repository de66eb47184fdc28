"""Contrastive models and losses written out in full, shared by the step_cached tests.

Every loss returns the SUM over the window's items (or ``(sum, count)``), the
form ``Accumulator.step_cached`` takes; the references divide by N themselves.
Everything is float64 and seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import truebatch as tb

IMAGE, TEXT, EMBED = 6, 5, 4


class Tower(nn.Module):
    """``Linear -> Tanh -> [GhostBatchNorm1d] -> Dropout -> Linear``."""

    def __init__(
        self, features: int, *, dropout: float = 0.0, ghost_batch_size: int | None = None
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(features, 10), nn.Tanh()]
        if ghost_batch_size is not None:
            layers.append(tb.nn.GhostBatchNorm1d(10, ghost_batch_size=ghost_batch_size))
        layers += [nn.Dropout(dropout), nn.Linear(10, EMBED)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TwoTowers(nn.Module):
    """CLIP in miniature: an image and a text tower and a learnable temperature."""

    def __init__(self, *, dropout: float = 0.0, ghost_batch_size: int | None = None) -> None:
        super().__init__()
        self.image = Tower(IMAGE, dropout=dropout, ghost_batch_size=ghost_batch_size)
        self.text = Tower(TEXT, dropout=dropout)
        self.logit_scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.image(image), self.text(text)


def build(
    *, dropout: float = 0.0, converted: bool = False, ghost_batch_size: int | None = None
) -> TwoTowers:
    """A float64 TwoTowers built under seed 0 (the global RNG left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TwoTowers(dropout=dropout, ghost_batch_size=ghost_batch_size).double()
    return tb.nn.convert_dropout(model, seed=0) if converted else model


def batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Image and text features, a hard negative and a class label for ``n`` samples."""
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, IMAGE, generator=g, dtype=torch.float64),
        "text": torch.randn(n, TEXT, generator=g, dtype=torch.float64),
        "negative": torch.randn(n, TEXT, generator=g, dtype=torch.float64),
        "label": torch.randint(0, 3, (n,), generator=g),
    }


def concat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


# ---------------------------------------------------------------- the losses


def clip_encode(model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return model(b["image"], b["text"])


def clip_loss(model: TwoTowers) -> Callable[[Any, Any], torch.Tensor]:
    """Symmetric InfoNCE: image i against every text, text i against every image."""

    def loss(reps: tuple[torch.Tensor, ...], _: Any) -> torch.Tensor:
        image, text = (F.normalize(r, dim=-1) for r in reps)
        logits = image @ text.T * model.logit_scale.exp()
        labels = torch.arange(len(logits))
        return (
            F.cross_entropy(logits, labels, reduction="sum")
            + F.cross_entropy(logits.T, labels, reduction="sum")
        ) / 2

    return loss


def views_encode(model: nn.Module, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SimCLR's two views of a sample: the image and a fixed perturbation of it."""
    tower = getattr(model, "module", model).image
    return {"a": tower(b["image"]), "b": tower(b["image"].flip(-1) * 0.5)}


def nt_xent_loss(reps: dict[str, torch.Tensor], _: Any) -> tuple[torch.Tensor, int]:
    """NT-Xent over 2B anchors (each view against all others); returns (sum, 2B)."""
    z = F.normalize(torch.cat([reps["a"], reps["b"]]), dim=-1)
    n = len(reps["a"])
    logits = (z @ z.T / 0.5).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, targets, reduction="sum"), 2 * n


def mnrl_encode(model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    inner = getattr(model, "module", model)
    return inner.image(b["image"]), inner.text(b["text"]), inner.text(b["negative"])


def mnrl_loss(reps: tuple[torch.Tensor, ...], _: Any) -> torch.Tensor:
    """Multiple negatives ranking: query i against every positive and hard negative."""
    query, positive, negative = (F.normalize(r, dim=-1) for r in reps)
    scores = query @ torch.cat([positive, negative]).T * 20.0
    return F.cross_entropy(scores, torch.arange(len(query)), reduction="sum")


def triplet_encode(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return getattr(model, "module", model).image(b["image"])


def triplet_loss(embeddings: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Batch-hard triplet loss: hardest positive and hardest negative of every anchor."""
    distance = torch.cdist(embeddings, embeddings).pow(2)
    same = b["label"][:, None] == b["label"][None, :]
    hardest_positive = (distance * same).amax(dim=1)
    hardest_negative = distance.masked_fill(same, float("inf")).amin(dim=1)
    return F.relu(hardest_positive - hardest_negative + 1.0).sum()


@dataclass(frozen=True)
class Objective:
    encode: Callable[[nn.Module, Any], Any]
    loss: Callable[[TwoTowers], Callable[[Any, Any], Any]]


OBJECTIVES = {
    "clip": Objective(clip_encode, clip_loss),
    "nt_xent": Objective(views_encode, lambda _: nt_xent_loss),
    "mnrl": Objective(mnrl_encode, lambda _: mnrl_loss),
    "batch_hard_triplet": Objective(triplet_encode, lambda _: triplet_loss),
}


def big_batch_gradient(
    model: nn.Module, objective: Objective, full: Any, *, window: int = 0
) -> tuple[list[torch.Tensor], float]:
    """The reference: the loss on the whole window at once, divided by N, backward.

    Split-invariant layers see the window from sample 0, as the Accumulator declares it.
    """
    from truebatch import _context

    with _context.micro_batch(window, 0):
        output = objective.loss(model)(objective.encode(model, full), full)
    loss, count = output if isinstance(output, tuple) else (output, len(full["image"]))
    model.zero_grad(set_to_none=True)
    (loss / count).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads, loss.item() / count
