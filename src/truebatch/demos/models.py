"""The demos' models, small enough to train in seconds on a CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: two 3x3 convolutions, max-pooling, two linear layers.

    Args:
        batch_norm: follow each convolution by ``BatchNorm2d`` (split-dependent
            in train mode: it normalizes with the statistics of the batch it sees).
        dropout: dropout probability before each linear layer; ``0`` removes
            the dropout layers (dropout masks come from the global RNG, so they
            depend on how the batch is split).

    Input ``(N, 1, 8, 8)``, output logits ``(N, 10)``.
    """

    def __init__(self, batch_norm: bool = True, dropout: float = 0.25) -> None:
        super().__init__()

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

        def drop() -> nn.Module:
            return nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            norm(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            norm(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            drop(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            drop(),
            nn.Linear(64, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class CharTransformer(nn.Module):
    """A one-block causal transformer over characters (pre-norm, learned positions).

    Input token ids ``(N, T)`` with ``T <= max_length``, output next-token
    logits ``(N, T, vocabulary_size)``. Attention is causal, so position ``t``
    sees only tokens ``0..t`` and right padding never changes the logits of
    real tokens; LayerNorm works per token, so nothing mixes samples.
    """

    def __init__(
        self, vocabulary_size: int, max_length: int, width: int = 32, heads: int = 2
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(
                f"width {width} is not divisible by heads {heads}; each head takes "
                "width / heads features, so choose a width that is a multiple of heads"
            )
        self.heads = heads
        self.embed = nn.Embedding(vocabulary_size, width)
        self.position = nn.Embedding(max_length, width)
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.project = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocabulary_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        samples, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)
        hidden = self.embed(input_ids) + self.position(positions)
        # (N, T, 3 * width) -> three tensors (N, heads, T, width / heads)
        query, key, value = (
            self.qkv(self.attention_norm(hidden))
            .view(samples, length, 3, self.heads, -1)
            .permute(2, 0, 3, 1, 4)
        )
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        hidden = hidden + self.project(attended.transpose(1, 2).reshape(samples, length, -1))
        hidden = hidden + self.mlp(self.mlp_norm(hidden))
        return self.out(self.out_norm(hidden))
