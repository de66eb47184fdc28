"""A plain PyTorch training loop with truebatch: digits, an MLP, effective batch 128.

The loader yields micro-batches of 32; ``tb.windows`` groups them 4 at a time,
and each window is one optimizer step (and one scheduler step) with the exact
gradient of its 128 samples (the last, shorter window of an epoch included).

    python examples/plain_loop.py [--epochs 5] [--micro-batch-size 32] [--k 4]

Needs the ``demo`` extra (scikit-learn ships the digits data).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import truebatch as tb


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The SUM of the cross-entropy over the micro-batch; truebatch divides by the window's N."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=4, help="micro-batches per optimizer step")
    args = parser.parse_args()

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, test = TensorDataset(x[:1500], y[:1500]), (x[1500:], y[1500:])
    loader = DataLoader(train, batch_size=args.micro_batch_size, shuffle=True)

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = args.epochs * tb.windows_per_epoch(len(loader), args.k)  # windows, not micro-batches
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
    acc = tb.Accumulator(model, optimizer, scheduler, max_grad_norm=1.0)

    for epoch in range(args.epochs):
        for window in tb.windows(loader, args.k):
            result = acc.step_window(window, loss_fn)
        with torch.no_grad():
            accuracy = (model(test[0]).argmax(1) == test[1]).double().mean().item()
        print(
            f"epoch {epoch + 1}: step {result.step}, last window {result.count} samples, "
            f"loss {result.loss:.4f}, grad norm {result.grad_norm:.3f}, "
            f"test accuracy {accuracy:.3f}"
        )


if __name__ == "__main__":
    main()
