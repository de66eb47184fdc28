"""Embedded data for the demos: nothing is downloaded.

- Digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10
  classes), split once into 1437 training and 360 test images. 1437 is not a
  multiple of the demos' effective batch of 64, so every epoch ends with a
  short window (29 samples: micro-batches of 16 and 13).
- Zen: the 20 non-empty lines of the Zen of Python (the standard library's
  ``this`` module), tokenized by character. The lines hold 19 to 69
  characters, so micro-batches of lines hold different numbers of tokens.
"""

from __future__ import annotations

import codecs
import contextlib
import io
from dataclasses import dataclass

import numpy as np
import torch

from truebatch.batching import Batch, split

DIGITS_TEST_SIZE = 360
PAD_ID = 0
BOS_ID = 1
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Digits:
    """Digits images ``(N, 1, 8, 8)``, standardized with the training set's mean and std."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits(dtype: torch.dtype, train_size: int | None = None) -> Digits:
    """The fixed digits split (stratified, ``random_state=0``), optionally fewer training images.

    Pixels (0..16) are standardized as ``(x - mean) / std`` with the scalar mean
    and standard deviation of the training pixels.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    images, labels = sklearn_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=DIGITS_TEST_SIZE, random_state=0, stratify=labels
    )
    train_x, train_y = train_x[:train_size], train_y[:train_size]
    mean, std = train_x.mean(), train_x.std()

    def images_of(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((array - mean) / std, dtype=dtype).reshape(-1, 1, 8, 8)

    return Digits(
        train_x=images_of(train_x),
        train_y=torch.as_tensor(train_y),
        test_x=images_of(test_x),
        test_y=torch.as_tensor(test_y),
    )


def zen_lines() -> list[str]:
    """The non-empty lines of the Zen of Python, title included (20 lines)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    return [line for line in codecs.decode(this.s, "rot13").splitlines() if line.strip()]


@dataclass(frozen=True)
class CharCorpus:
    """Lines as padded character ids.

    ``input_ids[i] = [BOS, c_1, ..., c_L, PAD, ...]`` and ``labels[i]`` is the
    same sequence with padding replaced by ``IGNORE_INDEX``; a causal model
    predicts ``labels[:, 1:]`` from ``input_ids[:, :-1]``, so line ``i`` scores
    exactly its ``L`` characters.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    vocabulary: str

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The lines ``indices`` as a batch ``{"input_ids", "labels"}``."""
        return {"input_ids": self.input_ids[indices], "labels": self.labels[indices]}


def char_corpus(lines: list[str]) -> CharCorpus:
    """Tokenize ``lines`` by character (ids from 2 on), right-padded to the longest line."""
    vocabulary = "".join(sorted(set("".join(lines))))
    ids = {char: index + 2 for index, char in enumerate(vocabulary)}
    length = 1 + max(len(line) for line in lines)
    input_ids = torch.full((len(lines), length), PAD_ID, dtype=torch.long)
    labels = torch.full((len(lines), length), IGNORE_INDEX, dtype=torch.long)
    for row, line in enumerate(lines):
        tokens = torch.tensor([BOS_ID] + [ids[char] for char in line])
        input_ids[row, : len(tokens)] = tokens
        labels[row, : len(tokens)] = tokens
    return CharCorpus(input_ids=input_ids, labels=labels, vocabulary=vocabulary)


def epoch_orders(size: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """One random permutation of ``range(size)`` per epoch, the same on every run."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(size, generator=generator) for _ in range(epochs)]


def micro_batches_of(batches: list[Batch], micro_batch_size: int) -> list[Batch]:
    """Every effective batch split into micro-batches, in order (a loader of micro-batches)."""
    return [micro for batch in batches for micro in split(batch, micro_batch_size)]
