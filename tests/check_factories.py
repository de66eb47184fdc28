"""Models with culprits planted at known paths, and factories for ``truebatch check``.

:class:`Net` is a small float64 MLP whose layers sit at fixed paths, each of
which can hold a culprit (otherwise an ``nn.Identity``):

    encoder.2.bn     BatchNorm1d                 (``batchnorm=True``)
    blocks.0.noise   Noise: adds torch.randn_like (``noise=True``)
    blocks.1.mix     BatchCentering: x - mean over the batch (``mix=True``)
    head.drop        Dropout(p)                  (``dropout=p``)

A factory returns ``(model, loss_fn, batch)``; the CLI tests name them as
``check_factories:clean`` (the tests folder is on sys.path under pytest, and is
the working directory of the subprocess test).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURES, WIDTH, CLASSES, BATCH = 6, 8, 3, 12


class Noise(nn.Module):
    """Adds Gaussian noise from the global RNG: a random op that is not a dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn_like(x)


class BatchCentering(nn.Module):
    """Subtracts the mean over the batch: its output mixes samples."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=0, keepdim=True)


class Normed(nn.Module):
    """``bn(lin(x))``: Linear then a (possibly identity) normalization."""

    def __init__(self, batchnorm: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.bn = nn.BatchNorm1d(WIDTH) if batchnorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


class Block(nn.Module):
    """``tanh(mix(noise(lin(x))))``."""

    def __init__(self, noise: bool = False, mix: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.noise = Noise() if noise else nn.Identity()
        self.mix = BatchCentering() if mix else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.noise(self.lin(x))))


class Head(nn.Module):
    """``out(drop(x))``."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.out = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(x))


class Net(nn.Module):
    """encoder -> blocks -> head, with the culprits asked for at their paths."""

    def __init__(
        self,
        batchnorm: bool = False,
        noise: bool = False,
        mix: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(FEATURES, WIDTH), nn.Tanh(), Normed(batchnorm))
        self.blocks = nn.Sequential(Block(noise=noise), Block(mix=mix))
        self.head = Head(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.encoder(x)))


def net(**culprits: object) -> Net:
    """A float64 :class:`Net` with fixed weights, built without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net(**culprits).to(torch.float64)


def batch(n: int = BATCH, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: ``n`` float64 feature vectors and class labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEATURES, generator=g, dtype=torch.float64), torch.randint(
        0, CLASSES, (n,), generator=g
    )


def sum_loss(model: nn.Module, micro_batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed over the samples: what truebatch expects."""
    x, y = micro_batch
    return F.cross_entropy(model(x), y, reduction="sum")


def mean_loss(model: nn.Module, micro_batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy averaged over the micro-batch: not additive over samples."""
    x, y = micro_batch
    return F.cross_entropy(model(x), y)


# ----------------------------------------------------------- CLI factories


def clean():
    """An equivalent setup: exit status 0."""
    return net(), sum_loss, batch()


def with_batchnorm():
    """BatchNorm in train mode: exit status 1."""
    return net(batchnorm=True), sum_loss, batch()


def wrong_shape():
    """Returns two items instead of three."""
    return net(), sum_loss


def not_a_module():
    """Returns a model that is not an nn.Module."""
    return "model", sum_loss, batch()


NOT_CALLABLE = 3


# ------------------------------------------------- a resnet18-like model


class BasicBlock(nn.Module):
    """resnet18's block: two 3x3 convolutions with BatchNorm, and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(nn.Module):
    """resnet18's layout (20 BatchNorm layers at its paths) with 4 to 8 channels."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        widths = [(4, 4, 1), (4, 6, 2), (6, 8, 2), (8, 8, 2)]
        for i, (cin, cout, stride) in enumerate(widths, start=1):
            blocks = nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))
            setattr(self, f"layer{i}", blocks)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_resnet():
    """A float64 :class:`TinyResNet` in train mode, 8 images of 3x8x8: 20 BatchNorm findings."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyResNet().to(torch.float64)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)
    return model, sum_loss, (images, torch.randint(0, CLASSES, (8,), generator=g))
