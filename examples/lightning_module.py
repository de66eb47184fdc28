"""truebatch in a LightningModule, next to Lightning's ``accumulate_grad_batches``.

Trains a small classifier on scikit-learn's bundled digits for one epoch of
micro-batches of different sizes, grouped 4 per optimizer step (the last step
gets fewer), in float64, three ways, and prints how far each one's parameters
are from the plain big-batch loop (one step per window on the concatenated
window, mean loss):

- ``TrueBatchClassifier``: manual optimization, the window's micro-batches go
  to ``self.accumulator.step_window`` (``truebatch.integrations.lightning``);
- ``MeanLossClassifier`` with ``Trainer(accumulate_grad_batches=4)``: the
  usual Lightning code, a loss averaged within each micro-batch;
- the plain ``tb.Accumulator`` loop without Lightning.

    python examples/lightning_module.py
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import warnings
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader

import truebatch as tb
from truebatch.integrations.lightning import accumulator

Batch = tuple[torch.Tensor, torch.Tensor]

MICRO_BATCHES_PER_STEP = 4
LR = 0.5
MOMENTUM = 0.9


def digit_micro_batches(count: int = 10, seed: int = 0) -> list[Batch]:
    """``count`` consecutive micro-batches of the digits data, of random sizes 2..24, float64."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    sizes = torch.randint(2, 25, (count,), generator=torch.Generator().manual_seed(seed))
    bounds = [0, *torch.cumsum(sizes, 0).tolist()]
    return [(x[a:b], y[a:b]) for a, b in itertools.pairwise(bounds)]


def make_net(seed: int = 0) -> nn.Module:
    """A 64-32-10 tanh MLP in float64 (no dropout, no batch norm: any split is exact)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()


def make_optimizer(parameters) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    optimizer = torch.optim.SGD(parameters, lr=LR, momentum=MOMENTUM)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy SUMMED over the samples of a micro-batch (truebatch divides by N)."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


class TrueBatchClassifier(L.LightningModule):
    """Manual optimization: truebatch runs the backward passes and the step of each window."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self):
        optimizer, scheduler = make_optimizer(self.parameters())
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_fit_start(self) -> None:
        self.accumulator = accumulator(self)

    def training_step(self, window: list[Batch], batch_idx: int) -> None:
        result = self.accumulator.step_window(window, loss_sum)
        self.log("train_loss", result.loss, batch_size=result.count)


class MeanLossClassifier(L.LightningModule):
    """Automatic optimization with a per-micro-batch mean loss, for accumulate_grad_batches."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def configure_optimizers(self):
        optimizer, scheduler = make_optimizer(self.parameters())
        schedule = {"scheduler": scheduler, "interval": "step"}  # once per optimizer step
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def lightning_trainer(**kwargs) -> L.Trainer:
    """A quiet single-process CPU Trainer for one epoch in float64."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def loader(items: Sequence) -> DataLoader:
    """A DataLoader that yields ``items`` as they are (micro-batches or windows)."""
    return DataLoader(list(items), batch_size=None, shuffle=False)


def train_truebatch_lightning(net: nn.Module, data: list[Batch], **trainer_kwargs) -> L.Trainer:
    windows = tb.windows(data, MICRO_BATCHES_PER_STEP)
    trainer = lightning_trainer(**trainer_kwargs)
    trainer.fit(TrueBatchClassifier(net), loader(windows))
    return trainer


def train_lightning_accumulate(net: nn.Module, data: list[Batch], **trainer_kwargs) -> L.Trainer:
    trainer = lightning_trainer(accumulate_grad_batches=MICRO_BATCHES_PER_STEP, **trainer_kwargs)
    trainer.fit(MeanLossClassifier(net), loader(data))
    return trainer


def train_truebatch_plain(net: nn.Module, data: list[Batch]) -> None:
    optimizer, scheduler = make_optimizer(net.parameters())
    acc = tb.Accumulator(net, optimizer, scheduler)
    for window in tb.windows(data, MICRO_BATCHES_PER_STEP):
        acc.step_window(window, loss_sum)


def train_big_batch(net: nn.Module, data: list[Batch]) -> None:
    """The reference: each window concatenated into one batch, mean loss, one step."""
    optimizer, scheduler = make_optimizer(net.parameters())
    for window in tb.windows(data, MICRO_BATCHES_PER_STEP):
        x = torch.cat([x for x, _ in window])
        y = torch.cat([y for _, y in window])
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        scheduler.step()


@torch.no_grad()
def update_difference(net: nn.Module, reference: nn.Module, initial: nn.Module) -> float:
    """max over parameter tensors of |theta - theta_ref| / |theta_ref - theta_0| (L2 norms)."""
    return max(
        float(torch.linalg.vector_norm(p - r) / torch.linalg.vector_norm(r - p0))
        for p, r, p0 in zip(
            net.parameters(), reference.parameters(), initial.parameters(), strict=True
        )
    )


def compare(data: list[Batch], seed: int = 0) -> dict[str, float]:
    """Train each way from the same initial weights; their update differences from the big batch."""
    initial = make_net(seed)
    nets = {name: copy.deepcopy(initial) for name in ("big", *RUNS)}
    train_big_batch(nets["big"], data)
    train_truebatch_lightning(nets["tb_lightning"], data)
    train_lightning_accumulate(nets["lightning"], data)
    train_truebatch_plain(nets["tb"], data)
    return {name: update_difference(nets[name], nets["big"], initial) for name in RUNS}


RUNS = {
    "tb_lightning": "truebatch helper in a LightningModule",
    "tb": "plain tb.Accumulator loop",
    "lightning": "Lightning accumulate_grad_batches, mean loss",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batches", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="lightning")  # Lightning's data-loader hints
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    data = digit_micro_batches(args.micro_batches, args.seed)
    print(f"micro-batch sizes {[len(y) for _, y in data]}, {MICRO_BATCHES_PER_STEP} per step")
    print("max relative difference of the parameter update from the big-batch loop (float64):")
    first, epoch = compare(data[:MICRO_BATCHES_PER_STEP], args.seed), compare(data, args.seed)
    print(f"  {'':46s} {'first step':>11s} {'whole epoch':>12s}")
    for name, label in RUNS.items():
        print(f"  {label:46s} {first[name]:11.2e} {epoch[name]:12.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
