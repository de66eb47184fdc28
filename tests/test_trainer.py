"""The truebatch Trainer against a Trainer that runs one big batch per step.

Float64 tiny models from configs, variable-length sequences padded by the stock
collators, sequential data, AdamW with a linear schedule and clipping, two
epochs whose last window is short (20 samples, windows of 8). The truebatch
Trainer accumulates 4 × 2; the reference is ``transformers.Trainer`` with one
batch of 8 per step (no accumulation, so its normalization is a plain mean; for
causal LMs its ``compute_loss_func`` is the float64 mean over shifted tokens,
since Transformers' own loss rounds the logits to float32).

Per window at the same weights the gradient agrees within the contract's
float64 bound; after six windows of AdamW the parameters agree to 1e-10
(training amplifies rounding: the contract does not bound trajectories); the
logged losses agree to float32 precision (the Trainer sums them in float32).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import hf_setups as S  # noqa: E402
import truebatch as tb  # noqa: E402
from scripts import EXAMPLES, run_script  # noqa: E402
from truebatch.compare import TOLERANCES  # noqa: E402
from truebatch.integrations.transformers import (  # noqa: E402
    ExactAccumulation,
    Trainer,
    convert_attention_dropout,
)

TRAJECTORY = 1e-10  # parameters after 6 AdamW windows, float64


def run(trainer_class, model, out: Path, batch: int, accumulation: int, data, collator, **kw):
    """Train; return (parameters, logged losses, gradient per step)."""
    grads = S.Gradients()
    args = S.arguments(out, batch, accumulation, **kw.pop("args", {}))
    log = S.LossLog()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collator,
        callbacks=[log, grads],
        **kw,
    )
    trainer.train()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return params, log.losses, grads.steps


def losses_close(actual: list[float], expected: list[float]) -> bool:
    return len(actual) == len(expected) and all(
        abs(a - e) <= TOLERANCES[torch.float32] * abs(e)
        for a, e in zip(actual, expected, strict=True)
    )


CAUSAL = {"gpt2": S.gpt2, "llama": S.llama}


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_causal_lm_accumulation_equals_one_big_batch_per_step(name, tmp_path):
    make, data, collator = CAUSAL[name], S.lm_dataset(20), S.lm_collator()
    reference = run(
        transformers.Trainer, make(), tmp_path / "ref", 8, 1, data, collator,
        compute_loss_func=S.float64_mean_token_loss,
    )  # fmt: skip
    ours = run(Trainer, make(), tmp_path / "ours", 4, 2, data, collator)

    assert len(ours[2]) == len(reference[2]) == 6  # 3 windows per epoch, the last one short
    assert tb.max_relative_difference(ours[2][0], reference[2][0]) <= TOLERANCES[torch.float64]
    assert tb.max_relative_difference(ours[0], reference[0]) <= TRAJECTORY
    assert losses_close(ours[1], reference[1])


def test_sequence_classification_accumulation_equals_one_big_batch_per_step(tmp_path):
    data, collator = S.classification_dataset(20), S.padding_collator()
    reference = run(transformers.Trainer, S.bert(), tmp_path / "ref", 8, 1, data, collator)
    ours = run(Trainer, S.bert(), tmp_path / "ours", 4, 2, data, collator)

    assert tb.max_relative_difference(ours[2][0], reference[2][0]) <= TOLERANCES[torch.float64]
    assert tb.max_relative_difference(ours[0], reference[0]) <= TRAJECTORY
    assert losses_close(ours[1], reference[1])


def test_plain_trainer_shrinks_gpt2_gradients_where_truebatch_does_not(tmp_path):
    """GPT2LMHeadModel has ``loss_type=None``: the stock Trainer counts unshifted labels."""
    data, collator = S.lm_dataset(20), S.lm_collator()
    reference = run(
        transformers.Trainer, S.gpt2(), tmp_path / "ref", 8, 1, data, collator,
        compute_loss_func=S.float64_mean_token_loss,
    )  # fmt: skip
    plain = run(transformers.Trainer, S.gpt2(), tmp_path / "plain", 4, 2, data, collator)
    # Clipping to 0.5 would hide a uniform scale: compare the gradients unclipped.
    unclipped = {"args": {"max_grad_norm": 0.0}}
    reference = run(
        transformers.Trainer, S.gpt2(), tmp_path / "ref2", 8, 1, data, collator,
        compute_loss_func=S.float64_mean_token_loss, **unclipped,
    )  # fmt: skip
    plain = run(transformers.Trainer, S.gpt2(), tmp_path / "p2", 4, 2, data, collator, **unclipped)
    ours = run(Trainer, S.gpt2(), tmp_path / "ours", 4, 2, data, collator, **unclipped)

    assert tb.max_relative_difference(plain[2][0], reference[2][0]) > 0.05
    assert tb.max_relative_difference(ours[2][0], reference[2][0]) <= TOLERANCES[torch.float64]


def dropout_bert(*, convert: bool) -> torch.nn.Module:
    model = S.bert(dropout=0.1, attention_dropout=0.1)
    if convert:
        convert_attention_dropout(model)
        tb.nn.convert_dropout(model)
    return model


def test_bert_with_attention_and_hidden_dropout_is_exact_after_conversion(tmp_path):
    data = S.classification_dataset(20)
    # Hidden-state dropout masks are keyed by the flat element index within a sample,
    # which depends on the padded length: pad every batch to the same length.
    collator = transformers.DataCollatorWithPadding(
        S.tokenizer(), padding="max_length", max_length=32
    )
    reference = run(Trainer, dropout_bert(convert=True), tmp_path / "ref", 8, 1, data, collator)
    ours = run(Trainer, dropout_bert(convert=True), tmp_path / "ours", 4, 2, data, collator)
    unconverted = run(
        Trainer, dropout_bert(convert=False), tmp_path / "plain", 4, 2, data, collator
    )
    without = run(Trainer, S.bert(), tmp_path / "none", 8, 1, data, collator)

    assert tb.max_relative_difference(ours[2][0], reference[2][0]) <= TOLERANCES[torch.float64]
    assert tb.max_relative_difference(ours[0], reference[0]) <= TRAJECTORY
    # The dropout is really there, and without the conversion the update is not the same.
    assert tb.max_relative_difference(without[2][0], reference[2][0]) > 0.01
    assert tb.max_relative_difference(unconverted[2][0], reference[2][0]) > 0.01


CONVERTIBLE = {
    "gpt2": lambda: S.gpt2(dropout=0.1),
    "llama": lambda: S.llama(attention_dropout=0.1),  # grouped-query attention
}


@pytest.mark.parametrize("name", sorted(CONVERTIBLE))
def test_causal_lm_attention_dropout_is_exact_after_conversion(name, tmp_path):
    def converted():
        return tb.nn.convert_dropout(convert_attention_dropout(CONVERTIBLE[name]()))

    data = S.lm_dataset(20)
    collator = transformers.DataCollatorForLanguageModeling(
        S.tokenizer(), mlm=False, pad_to_multiple_of=32
    )
    reference = run(Trainer, converted(), tmp_path / "ref", 8, 1, data, collator)
    ours = run(Trainer, converted(), tmp_path / "ours", 4, 2, data, collator)
    unconverted = run(Trainer, CONVERTIBLE[name](), tmp_path / "plain", 4, 2, data, collator)

    assert tb.max_relative_difference(ours[2][0], reference[2][0]) <= TOLERANCES[torch.float64]
    assert tb.max_relative_difference(ours[0], reference[0]) <= TRAJECTORY
    assert tb.max_relative_difference(unconverted[2][0], reference[2][0]) > 0.01


@pytest.mark.parametrize("make", [S.bert, S.gpt2, S.llama])
def test_converted_attention_computes_the_models_eager_attention_without_dropout(make):
    """The conversion runs the model's own eager attention (Llama's softmax runs in float32)."""
    batch = S.padding_collator()(S.lm_dataset(4))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    model = make().eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        before = model(**batch).logits
        after = convert_attention_dropout(model)(**batch).logits
    assert tb.max_relative_difference({"logits": after}, {"logits": before}) <= 1e-12


def test_attention_dropout_mask_does_not_depend_on_padding():
    model = convert_attention_dropout(S.bert(attention_dropout=0.5))
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    padded = {"input_ids": torch.tensor([[5, 6, 7, 8, 0, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]])}  # fmt: skip
    with tb._context.micro_batch(3, 5):
        short = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    with tb._context.micro_batch(3, 5):
        long = model(**padded).logits
    with tb._context.micro_batch(3, 6):
        other = model(**padded).logits
    torch.testing.assert_close(short, long, rtol=1e-12, atol=0)
    assert not torch.allclose(long, other)


# ---------------------------------------------------------------- the rest of the Trainer


def test_resume_from_checkpoint_gives_the_unbroken_run(tmp_path):
    data, collator = S.lm_dataset(20), S.lm_collator()
    unbroken = run(Trainer, S.gpt2(), tmp_path / "a", 4, 2, data, collator)
    saving = {"args": {"save_strategy": "steps", "save_steps": 2}}
    run(Trainer, S.gpt2(), tmp_path / "b", 4, 2, data, collator, **saving)
    log, grads = S.LossLog(), S.Gradients()
    model = S.gpt2()
    trainer = Trainer(
        model=model,
        args=S.arguments(tmp_path / "b", 4, 2),
        train_dataset=data,
        data_collator=collator,
        callbacks=[log, grads],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    resumed = {k: v.detach() for k, v in model.named_parameters()}
    assert torch.equal(torch.cat([v.flatten() for v in resumed.values()]),
                       torch.cat([v.flatten() for v in unbroken[0].values()]))  # fmt: skip
    assert log.losses == unbroken[1][2:]


def test_evaluation_reports_the_mean_loss(tmp_path):
    data, collator = S.classification_dataset(12), S.padding_collator()
    model = S.bert()
    trainer = Trainer(model=model, args=S.arguments(tmp_path, 4, 2), eval_dataset=data,
                      data_collator=collator)  # fmt: skip
    metrics = trainer.evaluate()
    batch = collator(data)
    with torch.no_grad():
        expected = float(model.eval()(**batch).loss)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-12)


class HonoursNumItems(ExactAccumulation, transformers.Trainer):
    """A user override that follows the Trainer's contract: sum / num_items_in_batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        loss = S.token_loss_sum(logits, labels)
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else 1)
        return (loss, logits) if return_outputs else loss


class Averages(HonoursNumItems):
    """A user override that averages over its own micro-batch: refused."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        return S.token_loss_sum(logits, labels) / (labels[:, 1:] != -100).sum()


def test_compute_loss_override_dividing_by_num_items_is_honoured(tmp_path):
    data, collator = S.lm_dataset(20), S.lm_collator()
    reference = run(Trainer, S.gpt2(), tmp_path / "ref", 4, 2, data, collator)
    ours = run(HonoursNumItems, S.gpt2(), tmp_path / "ours", 4, 2, data, collator)
    assert tb.max_relative_difference(ours[2][0], reference[2][0]) <= TOLERANCES[torch.float64]
    assert tb.max_relative_difference(ours[0], reference[0]) <= TRAJECTORY


def test_compute_loss_override_that_averages_is_refused_before_any_change(tmp_path):
    model = S.gpt2()
    before = copy.deepcopy(model.state_dict())
    trainer = Averages(model=model, args=S.arguments(tmp_path, 4, 2),
                       train_dataset=S.lm_dataset(20), data_collator=S.lm_collator())  # fmt: skip
    with pytest.raises(ValueError, match="num_items_in_batch"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compute_loss_func_that_averages_is_refused(tmp_path):
    trainer = Trainer(model=S.gpt2(), args=S.arguments(tmp_path, 4, 2),
                      train_dataset=S.lm_dataset(20), data_collator=S.lm_collator(),
                      compute_loss_func=S.float64_mean_token_loss)  # fmt: skip
    with pytest.raises(ValueError, match="compute_loss_func"):
        trainer.train()


def test_setups_that_cannot_be_exact_are_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        Trainer(model=S.gpt2(), args=S.arguments(tmp_path, 4, 2, label_smoothing_factor=0.1))

    class Head(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="items="):
        Trainer(model=Head(), args=S.arguments(tmp_path, 4, 2))
    with pytest.raises(ValueError, match="`items` got"):
        Trainer(model=S.gpt2(), args=S.arguments(tmp_path, 4, 2), items="words")


def test_sample_head_with_unscored_samples_is_refused(tmp_path):
    data = [dict(example, labels=-100 if i == 3 else 1) for i, example in enumerate(
        S.classification_dataset(8))]  # fmt: skip
    trainer = Trainer(model=S.bert(), args=S.arguments(tmp_path, 4, 2), train_dataset=data,
                      data_collator=S.padding_collator())  # fmt: skip
    with pytest.raises(ValueError, match="-100"):
        trainer.train()


def test_conversion_names_the_model_it_cannot_convert():
    with pytest.raises(ValueError, match="PreTrainedModel"):
        convert_attention_dropout(torch.nn.Linear(2, 2))


def test_left_padding_is_refused_under_attention_dropout():
    model = convert_attention_dropout(S.bert(attention_dropout=0.1)).train()
    batch = {"input_ids": torch.tensor([[0, 0, 5, 6], [5, 6, 7, 8]]),
             "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])}  # fmt: skip
    with pytest.raises(ValueError, match="left padding"):
        model(**batch)


# --------------------------------------------------------------------------- 2 ranks


@pytest.mark.processes
def test_two_gloo_ranks_with_uneven_data_equal_one_process_on_the_global_batch(tmp_path):
    """2 ranks × 2 samples × 2 batches = windows of 8; 13 sequences shared out unevenly
    (rank 0: 4 batches, rank 1: 3, one of a single sequence), so ranks score different
    numbers of tokens. Reference: one process, one batch of 8 (then 5) per step."""
    tests = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent / "src"), str(tests)]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(tests / "hf_ddp_worker.py"), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = torch.load(tmp_path / "result.pt")
    data, collator = S.lm_dataset(13), S.lm_collator()
    reference = run(
        transformers.Trainer, S.gpt2(), tmp_path / "ref", 8, 1, data, collator,
        compute_loss_func=S.float64_mean_token_loss,
    )  # fmt: skip

    assert len(ranks["grads"]) == len(reference[2]) == 4
    assert (
        tb.max_relative_difference(ranks["grads"][0], reference[2][0]) <= TOLERANCES[torch.float64]
    )
    assert tb.max_relative_difference(ranks["params"], reference[0]) <= TRAJECTORY
    assert losses_close(ranks["losses"], reference[1])


# --------------------------------------------------------------------------- TRL


def sft_run(trainer_class, make, out: Path, batch: int, accumulation: int):
    """One unclipped SFT step at lr 0 on pre-tokenized sequences; the gradient it hands over."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    config = trl.SFTConfig(
        output_dir=str(out), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.0,
        max_grad_norm=0.0, max_length=None, train_sampling_strategy="sequential",
        report_to="none", disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    grads = S.Gradients()
    trainer = trainer_class(
        model=make(),
        args=config,
        train_dataset=datasets.Dataset.from_list(S.lm_dataset(20)),
        processing_class=S.tokenizer(),
        callbacks=[grads],
    )
    trainer.train()
    return grads.steps[0]


def exact_sft() -> type:
    trl = pytest.importorskip("trl")

    class SFTTrainer(ExactAccumulation, trl.SFTTrainer):
        pass

    return SFTTrainer


def test_trl_sft_trainer_accumulation_equals_one_big_batch(tmp_path):
    """TRL computes its token loss in float32 (a fused LM head): float32 precision."""
    trl = pytest.importorskip("trl")
    reference = sft_run(trl.SFTTrainer, S.llama, tmp_path / "ref", 8, 1)
    ours = sft_run(exact_sft(), S.llama, tmp_path / "ours", 4, 2)
    assert tb.max_relative_difference(ours, reference) <= TOLERANCES[torch.float32]


def test_trl_sft_trainer_miscounts_gpt2_tokens_and_the_mixin_does_not(tmp_path):
    """GPT2LMHeadModel has ``loss_type=None``: the Trainer hands TRL the unshifted label
    count as ``num_items_in_batch``, even without accumulation."""
    trl = pytest.importorskip("trl")
    stock = sft_run(trl.SFTTrainer, S.gpt2, tmp_path / "stock", 8, 1)
    big = sft_run(exact_sft(), S.gpt2, tmp_path / "big", 8, 1)
    ours = sft_run(exact_sft(), S.gpt2, tmp_path / "ours", 4, 2)
    assert tb.max_relative_difference(ours, big) <= TOLERANCES[torch.float32]
    assert tb.max_relative_difference(stock, big) > 0.05


def test_trainer_example_runs_and_learns():
    out = run_script(EXAMPLES / "transformers_trainer.py", "--epochs", "2", timeout=300)
    losses = [float(x) for x in re.findall(r"step \d+: loss ([\d.]+)", out)]
    assert re.search(r"^truebatch\.Trainer: 6 steps", out, re.MULTILINE), out
    assert losses and losses[-1] < 5.45  # log(256) = 5.55 at random weights
