"""Hugging Face batches: tokenizers' and data collators' BatchEncoding, split and
accumulated exactly (issue 15, defect 4). The tokenizer is built here from a
small vocabulary; nothing is downloaded."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import truebatch as tb
from truebatch.compare import TOLERANCES

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "fast", "slow", "big", "small"]
TEXTS = [
    "the cat sat",
    "a dog ran on the mat fast",
    "cat",
    "the big dog sat on a small mat",
    "slow cat ran",
    "a dog",
    "the mat",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A word-level fast tokenizer built here from a small vocabulary (nothing downloaded)."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[MASK]", *WORDS])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]"
    )


def test_split_batch_encoding_keeps_attributes_and_its_encodings(tokenizer: Any) -> None:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert isinstance(batch, transformers.BatchEncoding) and batch.encodings is not None
    parts = tb.split(batch, 3)
    assert [type(p) for p in parts] == [transformers.BatchEncoding] * 3
    assert [len(p.encodings) for p in parts] == [3, 3, 1]
    for start, part in zip((0, 3, 6), parts, strict=True):
        assert part.to("cpu") is part and torch.equal(part.input_ids, part["input_ids"])
        for row in range(tb.batch_size(part)):
            assert part.word_ids(row) == batch.word_ids(start + row)
            assert part.tokens(row) == batch.tokens(start + row)
    assert len(batch.encodings) == len(TEXTS) and batch.input_ids.shape[0] == len(TEXTS)


def tiny_lm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(len(WORDS) + 3, 8), nn.Tanh(), nn.Linear(8, len(WORDS) + 3))


def lm_loss(model: nn.Module, batch: Any, shift: bool, reduction: str) -> torch.Tensor:
    """Cross-entropy of the labels, read through BatchEncoding's attribute access."""
    batch = batch.to("cpu")
    logits = model(batch.input_ids * batch.attention_mask)
    labels = batch.labels
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction=reduction)


@pytest.mark.parametrize("mlm", [False, True], ids=["causal", "masked"])
@pytest.mark.parametrize("micro_batch_size", [1, 2, 3])
def test_data_collator_batches_through_the_accumulator(
    tokenizer: Any, mlm: bool, micro_batch_size: int
) -> None:
    """DataCollatorForLanguageModeling's BatchEncoding: one exact step, float64."""
    torch.manual_seed(1)  # the masked-LM collator draws its masks from the global RNG
    collate = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=mlm, return_tensors="pt")
    batch = collate([tokenizer(text) for text in TEXTS])
    assert isinstance(batch, transformers.BatchEncoding)
    model = tiny_lm().double()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    seen: list[list[torch.Tensor]] = []
    optimizer.register_step_pre_hook(
        lambda *_: seen.append([p.grad.clone() for p in model.parameters()])
    )
    acc = tb.Accumulator(model, optimizer, micro_batch_size=micro_batch_size)

    result = acc.step(
        batch,
        lambda m, b: lm_loss(m, b, not mlm, "sum"),
        count=tb.count_tokens(shift=not mlm),
    )
    lm_loss(reference, batch, not mlm, "mean").backward()

    assert result.micro_batches == -(-len(TEXTS) // micro_batch_size)
    assert result.count == int(tb.count_tokens(shift=not mlm)(batch)) > 0
    expected = [p.grad for p in reference.parameters()]
    assert tb.max_relative_difference(seen[0], expected) <= TOLERANCES[torch.float64]


def test_data_collator_with_padding_splits_like_its_rows(tokenizer: Any) -> None:
    collate = transformers.DataCollatorWithPadding(tokenizer, return_tensors="pt")
    features = [dict(tokenizer(text), label=i % 2) for i, text in enumerate(TEXTS)]
    batch = collate(features)
    parts = tb.split(batch, 2)
    assert [type(p) for p in parts] == [transformers.BatchEncoding] * 4
    for key in batch:
        assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])
    assert [int(p.attention_mask.sum()) for p in parts] == [
        int(batch["attention_mask"][i : i + 2].sum()) for i in range(0, len(TEXTS), 2)
    ]
