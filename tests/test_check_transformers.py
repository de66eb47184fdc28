"""tb.check on Hugging Face models as transformers 5.x builds them by default.

Tiny BERT, GPT-2 and Llama-style models from configs with random weights, SDPA or
eager attention, padded variable-length batches with attention masks. SDPA
passes a boolean mask between modules; attention-probability dropout is
functional (``F.dropout(p=self.dropout.p)`` or SDPA's ``dropout_p``), so the
``nn.Dropout`` module that holds ``p`` never runs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import truebatch as tb

transformers = pytest.importorskip("transformers")
import hf_setups as S  # noqa: E402

VOCAB, LENGTHS = S.VOCAB, [10, 7, 5, 10, 3, 8]
IMPLEMENTATIONS = ["eager", "sdpa"]


def padded_batch(*, causal: bool) -> dict[str, torch.Tensor]:
    """Six sequences of the lengths above, right-padded with 0 to length 10."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate(LENGTHS):
        mask[row, length:] = 0
        ids[row, length:] = 0
    if causal:
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    labels = torch.randint(0, 3, (len(LENGTHS),), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build(kind: str, implementation: str, *, dropout: float = 0.0, attention_dropout: float = 0.0):
    """A float64 model with fixed random weights, in train mode."""
    if kind == "bert":
        config = S.bert_config(positions=16, dropout=dropout, attention_dropout=attention_dropout)
        cls = transformers.BertForSequenceClassification
    elif kind == "gpt2":
        config = S.gpt2_config(positions=16, dropout=dropout, attention_dropout=attention_dropout)
        cls = transformers.GPT2ForSequenceClassification
    else:
        config = S.llama_config(
            positions=16, heads=2, kv_heads=1, attention_dropout=attention_dropout
        )
        cls = transformers.LlamaForCausalLM
    return S.from_config(cls, config, attention=implementation)


def classification_loss(model, micro_batch):
    out = model(input_ids=micro_batch["input_ids"], attention_mask=micro_batch["attention_mask"])
    return F.cross_entropy(out.logits, micro_batch["labels"], reduction="sum")


def lm_loss(model, micro_batch):
    out = model(input_ids=micro_batch["input_ids"], attention_mask=micro_batch["attention_mask"])
    logits, labels = out.logits[:, :-1], micro_batch["labels"][:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


# ------------------------------------------- padded batches, boolean masks


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_a_padded_batch_with_attention_masks_checks_equivalent(kind, implementation):
    # SDPA hands a boolean mask from module to module: compared by equality, never subtracted.
    model = build(kind, implementation)
    causal = kind == "llama"
    batch = padded_batch(causal=causal)
    loss, count = (lm_loss, tb.count_tokens()) if causal else (classification_loss, None)
    report = tb.check(model, loss, batch, micro_batch_sizes=[2, 4], count=count)
    assert report.equivalent, report
    assert report.findings == []


# ------------------------------------------------ functional attention dropout


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("kind", "attention", "config_name"),
    [
        ("bert", "bert.encoder.layer.{}.attention.self", "attention_probs_dropout_prob"),
        ("gpt2", "transformer.h.{}.attn", "attn_pdrop"),
    ],
)
def test_every_functional_attention_dropout_is_named_in_one_run(
    kind, attention, config_name, implementation
):
    # Hidden dropout upstream changes every later output; each attention layer is still
    # named, with a fix that reaches functional dropout.
    model = build(kind, implementation, dropout=0.1, attention_dropout=0.1)
    report = tb.check(model, classification_loss, padded_batch(causal=False), micro_batch_sizes=[3])
    random_ops = {f.module: f for f in report.findings if f.kind == "random_op"}
    assert set(random_ops) == {attention.format(0), attention.format(1)}, report
    for finding in random_ops.values():
        assert finding.effect > 1e-2
        assert config_name in finding.fix
        assert "truebatch.integrations.transformers.convert_attention_dropout(model)" in finding.fix
    dropouts = {f.module for f in report.findings if f.kind == "dropout"}
    assert dropouts and all("attention.self" not in name for name in dropouts)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_the_named_fix_works_attention_dropout_0_with_the_rest_converted(implementation):
    model = build("bert", implementation, dropout=0.1, attention_dropout=0.0)
    model = tb.nn.convert_dropout(model, seed=0)
    report = tb.check(model, classification_loss, padded_batch(causal=False), micro_batch_sizes=[3])
    assert report.equivalent, report


def test_llama_attention_dropout_is_named_with_its_config_field():
    model = build("llama", "sdpa", attention_dropout=0.1)
    report = tb.check(
        model, lm_loss, padded_batch(causal=True), micro_batch_sizes=[3], count=tb.count_tokens()
    )
    assert {(f.module, f.kind) for f in report.findings} == {
        ("model.layers.0.self_attn", "random_op"),
        ("model.layers.1.self_attn", "random_op"),
    }, report
    assert all("config.attention_dropout" in f.fix for f in report.findings)


def in_batch_negatives(model, micro_batch):
    out = model(input_ids=micro_batch["input_ids"], attention_mask=micro_batch["attention_mask"])
    z = F.normalize(out.logits, dim=1)
    return F.cross_entropy(z @ z.T / 0.1, torch.arange(len(z)), reduction="sum")


def mean_loss(model, micro_batch):
    return classification_loss(model, micro_batch) / len(micro_batch["labels"])


@pytest.mark.parametrize(
    ("loss", "kind"),
    [(in_batch_negatives, "loss_mixes_samples"), (mean_loss, "loss_not_additive")],
)
def test_the_loss_on_a_model_output_dataclass_is_judged(loss, kind):
    # The outputs are held through transformers' ModelOutput, rebuilt around them.
    model, data = build("bert", "sdpa"), padded_batch(causal=False)
    report = tb.check(model, loss, data, micro_batch_sizes=[3])
    assert [(f.module, f.kind) for f in report.findings] == [("loss_fn", kind)], report


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_after_convert_dropout_only_the_attention_layers_remain_all_in_one_run(implementation):
    model = build("bert", implementation, dropout=0.1, attention_dropout=0.1)
    with warnings.catch_warnings():  # about the attention dropout modules it cannot reach
        warnings.simplefilter("ignore")
        model = tb.nn.convert_dropout(model)
    report = tb.check(model, classification_loss, padded_batch(causal=False), micro_batch_sizes=[3])
    assert {(f.module, f.kind) for f in report.findings} == {
        ("bert.encoder.layer.0.attention.self", "random_op"),
        ("bert.encoder.layer.1.attention.self", "random_op"),
    }, report
    text = str(report)
    assert text.count("convert_attention_dropout") == 2  # two rows, each with its fix


# ------------------------------------------- one entry point for Trainer users


def test_model_loss_is_the_token_sum_and_count_of_a_causal_lm():
    from truebatch.integrations.transformers import model_loss

    model, batch = build("llama", "sdpa"), padded_batch(causal=True)
    loss_fn, count = model_loss(model)
    assert int(count(batch)) == int((batch["labels"][:, 1:] != -100).sum())
    expected = lm_loss(model, {**batch, "labels": batch["labels"]})
    assert torch.allclose(loss_fn(model, batch), expected, rtol=1e-12, atol=0)
    assert tb.check(model, loss_fn, batch, count=count).equivalent


def trainer_style_llama():
    return build("llama", "sdpa"), padded_batch(causal=True)


def trainer_style_bert_with_attention_dropout():
    model = build("bert", "eager", attention_dropout=0.1)
    return model, padded_batch(causal=False)


def trainer_style_not_transformers():
    return torch.nn.Linear(2, 2), torch.zeros(4, 2)


@pytest.mark.parametrize(
    ("factory", "code", "words"),
    [
        ("trainer_style_llama", 0, "equivalent"),
        ("trainer_style_bert_with_attention_dropout", 1, "convert_attention_dropout"),
        ("trainer_style_not_transformers", 2, "expected (model, loss_fn, batch)"),
    ],
)
def test_truebatch_check_takes_a_model_and_a_collated_batch(capsys, factory, code, words):
    """A factory returning (model, batch) for a Transformers model: the loss and count
    are the truebatch Trainer's, and the HF culprits are named."""
    import truebatch.cli

    assert truebatch.cli.main(["check", f"test_check_transformers:{factory}"]) == code
    captured = capsys.readouterr()
    assert words in captured.out + captured.err
