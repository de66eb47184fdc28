"""Tiny Transformers setups shared by the tests of the Trainer, the checker and the
integrations, and their 2-rank workers.

Models are built from configs with random weights (no download), in float64;
the tokenizer is a word-level vocabulary built in memory, padding on the right,
so the stock data collators pad variable-length sequences as they do for users.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models
from torch import nn

from truebatch.integrations.transformers import token_loss_sum

VOCAB = 40
PAD = 0


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"[PAD]": PAD, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    vocab |= {f"w{i}": i for i in range(5, VOCAB)}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="right",
    )


def texts(n: int, *, seed: int, lengths: tuple[int, int] = (2, 14)) -> list[list[int]]:
    """``n`` token-id sequences of random lengths (no padding id inside)."""
    rng = random.Random(seed)
    return [[rng.randrange(5, VOCAB) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def lm_dataset(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    return [{"input_ids": ids} for ids in texts(n, seed=seed)]


def classification_dataset(n: int, *, seed: int = 0, classes: int = 3) -> list[dict[str, Any]]:
    rng = random.Random(seed + 1)
    return [{"input_ids": ids, "labels": rng.randrange(classes)} for ids in texts(n, seed=seed)]


def lm_collator() -> transformers.DataCollatorForLanguageModeling:
    """Pads, and labels = input_ids with padding at -100 (the model shifts them)."""
    return transformers.DataCollatorForLanguageModeling(tokenizer(), mlm=False)


def padding_collator() -> transformers.DataCollatorWithPadding:
    return transformers.DataCollatorWithPadding(tokenizer())


def gpt2_config(
    *,
    vocab: int = VOCAB,
    layers: int = 2,
    positions: int = 32,
    dropout: float = 0.0,
    attention_dropout: float | None = None,
) -> transformers.GPT2Config:
    """GPT-2 of width 16; ``attention_dropout`` defaults to ``dropout``."""
    attention = dropout if attention_dropout is None else attention_dropout
    return transformers.GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=16, n_layer=layers, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=attention, num_labels=3,
        bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD, use_cache=False,
    )  # fmt: skip


def llama_config(
    *,
    vocab: int = VOCAB,
    layers: int = 2,
    positions: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    attention_dropout: float = 0.0,
) -> transformers.LlamaConfig:
    """Llama of width 16 with grouped-query attention (``kv_heads`` < ``heads``)."""
    return transformers.LlamaConfig(
        attention_dropout=attention_dropout,
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=positions,
        bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD, use_cache=False,
    )  # fmt: skip


def bert_config(
    *,
    vocab: int = VOCAB,
    positions: int = 32,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
) -> transformers.BertConfig:
    """Two-layer BERT of width 16 with a 3-class head."""
    return transformers.BertConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=positions, num_labels=3, pad_token_id=PAD,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=attention_dropout,
    )  # fmt: skip


def from_config(
    cls: type[transformers.PreTrainedModel], config: Any, *, attention: str | None = None
) -> nn.Module:
    """``cls`` with the weights drawn after ``torch.manual_seed(0)``, in float64 and train
    mode; ``attention`` picks the attention implementation ("eager", "sdpa")."""
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation=attention)
    return model.double().train()


def gpt2(*, dropout: float = 0.0) -> nn.Module:
    return from_config(transformers.GPT2LMHeadModel, gpt2_config(dropout=dropout))


def llama(*, attention_dropout: float = 0.0) -> nn.Module:
    config = llama_config(attention_dropout=attention_dropout)
    return from_config(transformers.LlamaForCausalLM, config)


def bert(*, dropout: float = 0.0, attention_dropout: float = 0.0) -> nn.Module:
    config = bert_config(dropout=dropout, attention_dropout=attention_dropout)
    return from_config(transformers.BertForSequenceClassification, config)


def arguments(out: Path, batch: int, accumulation: int, **overrides: Any) -> Any:
    """Training arguments that keep the data order fixed and log every step."""
    options: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=2,
        learning_rate=5e-2,
        max_grad_norm=0.5,
        lr_scheduler_type="linear",
        warmup_steps=1,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return transformers.TrainingArguments(**(options | overrides))


def float64_mean_token_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None):
    """A ``compute_loss_func`` for the reference run (one batch per step): the mean over the
    batch's shifted scored tokens, in float64 (Transformers' own loss rounds to float32)."""
    count = (labels[:, 1:] != -100).sum()
    return token_loss_sum(outputs.logits, labels) / count


class LossLog(transformers.TrainerCallback):
    """The ``loss`` of every logging step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class Gradients(transformers.TrainerCallback):
    """The gradient the optimizer gets at every step (after clipping)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        self.steps.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})


def train(
    trainer_class: Callable[..., Any],
    model: nn.Module,
    args: Any,
    dataset: list[dict[str, Any]],
    collator: Any,
    *,
    callbacks: list[Any] = (),
    **kwargs: Any,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train; return the final parameters and the logged losses."""
    log = LossLog()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[log, *callbacks],
        **kwargs,
    )
    trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}, log.losses
