"""A stock Hugging Face Trainer script with exact gradient accumulation: one import changed.

Nothing is downloaded: a tiny GPT-2 is built from a config with random weights,
and the text is the docstrings of standard-library modules as UTF-8 bytes (a
256-token vocabulary, no tokenizer), padded per batch by a plain collator.

    python examples/transformers_trainer.py --epochs 2
    python examples/transformers_trainer.py --epochs 2 --stock   # transformers.Trainer

The only difference from a stock script is the import of ``Trainer``; with
``--stock`` the script uses ``transformers.Trainer``, whose GPT-2 gradients are
too small by the sequences whose first label is scored (``loss_type`` is None).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import Any

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from truebatch.integrations.transformers import Trainer

MODULES = ("argparse", "collections", "csv", "dataclasses", "functools", "json", "logging",
           "pathlib", "random", "statistics", "string", "textwrap", "typing")  # fmt: skip


def dataset(max_length: int = 48) -> list[dict[str, list[int]]]:
    """One example per docstring paragraph: its first ``max_length`` UTF-8 bytes."""
    examples = []
    for name in MODULES:
        for paragraph in (importlib.import_module(name).__doc__ or "").split("\n\n"):
            data = " ".join(paragraph.split()).encode("utf-8")[:max_length]
            if data:
                examples.append({"input_ids": list(data)})
    return examples


def collate(examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded labels are -100 (the model shifts them)."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        mask[row, : len(example["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class PrintLoss(transformers.TrainerCallback):
    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        if logs and "loss" in logs:
            print(f"step {state.global_step}: loss {logs['loss']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=8)
    parser.add_argument("--stock", action="store_true", help="use transformers.Trainer")
    parser.add_argument("--output-dir", default="/tmp/truebatch-trainer-example")
    options = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.accumulation,
        num_train_epochs=options.epochs,
        learning_rate=3e-3,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer_class = transformers.Trainer if options.stock else Trainer
    trainer = trainer_class(
        model=model, args=args, train_dataset=dataset(), data_collator=collate,
        callbacks=[PrintLoss()],
    )  # fmt: skip
    trainer.remove_callback(transformers.PrinterCallback)
    result = trainer.train()
    print(f"{trainer_class.__module__.split('.')[0]}.Trainer: {result.global_step} steps, "
          f"mean training loss {result.training_loss:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
