"""Integrations: Transformers' causal-LM loss, Lightning, Accelerate; and how each framework's
own accumulation compares with the big batch, measured.

Every gradient is compared with the big batch's, written out here: all sequences (or
samples) of a window in one batch, loss averaged over its scored tokens (or samples), at
the same weights. Each test needs its framework (``pytest.importorskip``); CI installs
all extras, so all of them run there.
"""

from __future__ import annotations

import copy
import functools
import itertools
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader

import truebatch as tb
from scripts import EXAMPLES, run_script
from truebatch.integrations.transformers import causal_lm_loss, token_loss_sum

# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated")

VOCAB = 32
IGNORE = -100
TokenSequence = tuple[torch.Tensor, torch.Tensor]  # (input ids, labels) of one sequence
Tensors = list[torch.Tensor]


# --------------------------------------------------------------------------- helpers


def token_sequences(
    lengths: Sequence[int], prompts: Sequence[int], seed: int
) -> list[TokenSequence]:
    """Random token sequences; the first ``prompt`` labels of each are ``IGNORE``."""
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for length, prompt in zip(lengths, prompts, strict=True):
        ids = torch.randint(1, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[:prompt] = IGNORE
        sequences.append((ids, labels))
    return sequences


def collate(sequences: Sequence[TokenSequence]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding has attention 0 and label ``IGNORE``."""
    length = max(len(ids) for ids, _ in sequences)
    batch = {
        "input_ids": torch.zeros(len(sequences), length, dtype=torch.long),
        "attention_mask": torch.zeros(len(sequences), length, dtype=torch.long),
        "labels": torch.full((len(sequences), length), IGNORE, dtype=torch.long),
    }
    for row, (ids, labels) in enumerate(sequences):
        batch["input_ids"][row, : len(ids)] = ids
        batch["attention_mask"][row, : len(ids)] = 1
        batch["labels"][row, : len(ids)] = labels
    return batch


def grouped(
    sequences: Sequence[TokenSequence], sizes: Sequence[int]
) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of ``sizes`` consecutive sequences, each padded to its own longest."""
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [collate(sequences[a:b]) for a, b in itertools.pairwise(bounds)]


def mean_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The big batch's loss: cross-entropy of logits[t] against labels[t + 1], mean over scored."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


def take_gradients(model: nn.Module) -> Tensors:
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def max_relative_difference(grads: Tensors, reference: Tensors) -> float:
    """max over parameter tensors of |g - g_ref| / |g_ref| (L2 norms)."""
    return max(
        float(torch.linalg.vector_norm(g - r) / torch.linalg.vector_norm(r))
        for g, r in zip(grads, reference, strict=True)
    )


class StepRecorder:
    """The weights and the gradients an optimizer is given at each of its steps.

    ``record()`` runs before every ``optimizer.step()``; where a closure computes the
    gradients inside ``step`` (Lightning's automatic optimization), call it from the
    framework's hook that runs after the closure instead (``hook=False``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, hook: bool = True) -> None:
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self.weights: list[Tensors] = []
        self.gradients: list[Tensors] = []
        if hook:
            optimizer.register_step_pre_hook(lambda *_: self.record())

    def record(self) -> None:
        self.weights.append([p.detach().clone() for p in self.parameters])
        self.gradients.append([p.grad.detach().clone() for p in self.parameters])


def big_batch_gradient(
    model: nn.Module, weights: Tensors, loss: Callable[[nn.Module], torch.Tensor]
) -> Tensors:
    """The gradient of ``loss`` (the big batch's mean loss) at ``weights``, on a copy of model."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for parameter, weight in zip(reference.parameters(), weights, strict=True):
            parameter.copy_(weight)
    reference.zero_grad(set_to_none=True)
    loss(reference).backward()
    return take_gradients(reference)


def lm_big_batch_loss(batch: dict[str, torch.Tensor]) -> Callable[[nn.Module], torch.Tensor]:
    def loss(model: nn.Module) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return mean_token_loss(model(**inputs).logits, batch["labels"])

    return loss


# --------------------------------------------------------------------------- Transformers


def tiny_gpt2() -> nn.Module:
    """One-layer GPT-2 with random weights, no dropout, float64."""
    transformers = pytest.importorskip("transformers")
    import hf_setups as S

    return S.from_config(transformers.GPT2LMHeadModel, S.gpt2_config(vocab=VOCAB, layers=1))


def tiny_llama() -> nn.Module:
    """One-layer Llama with random weights, float64."""
    transformers = pytest.importorskip("transformers")
    import hf_setups as S

    config = S.llama_config(vocab=VOCAB, layers=1, heads=2, kv_heads=2)
    return S.from_config(transformers.LlamaForCausalLM, config)


def truebatch_gradient(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]]) -> Tensors:
    """The gradient the Accumulator hands to the optimizer for one window."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    recorder = StepRecorder(optimizer)
    tb.Accumulator(model, optimizer).step_window(micro_batches, causal_lm_loss, tb.count_tokens())
    return recorder.gradients[0]


@functools.cache
def shared_gpt2() -> nn.Module:
    """One GPT-2 for all hypothesis examples (its weights never change: lr is 0)."""
    return tiny_gpt2()


@settings(max_examples=12)
@given(lengths=st.lists(st.integers(1, 12), min_size=2, max_size=8), data=st.data())
def test_accumulated_gradient_equals_full_batch_for_padded_variable_length_batches(lengths, data):
    prompts = [data.draw(st.integers(0, n - 1)) for n in lengths]
    assume(any(n - max(prompt, 1) > 0 for n, prompt in zip(lengths, prompts, strict=True)))  # N > 0
    cuts = sorted(data.draw(st.sets(st.integers(1, len(lengths) - 1))))
    sizes = [b - a for a, b in itertools.pairwise([0, *cuts, len(lengths)])]
    sequences = token_sequences(lengths, prompts, seed=sum(lengths))
    model = shared_gpt2()

    grads = truebatch_gradient(model, grouped(sequences, sizes))

    big = collate(sequences)
    logits = model(input_ids=big["input_ids"], attention_mask=big["attention_mask"]).logits
    mean_token_loss(logits, big["labels"]).backward()
    assert max_relative_difference(grads, take_gradients(model)) <= 1e-12


def test_loss_and_count_follow_transformers_label_conventions():
    pytest.importorskip("transformers")
    from transformers.loss.loss_utils import ForCausalLMLoss

    sequences = token_sequences([7, 3, 10, 1], prompts=[2, 0, 5, 0], seed=3)
    batch = collate(sequences)
    batch["labels"][2, 7] = IGNORE  # an ignored label inside a sequence
    logits = torch.randn(*batch["labels"].shape, VOCAB, generator=torch.Generator().manual_seed(4))

    # ForCausalLMLoss sums when given num_items_in_batch, else averages: their ratio is the
    # number of label positions it scores.
    their_sum = ForCausalLMLoss(logits, batch["labels"], VOCAB, num_items_in_batch=1)
    their_mean = ForCausalLMLoss(logits, batch["labels"], VOCAB)
    count = tb.count_tokens()(batch)
    # labels at positions 1..length-1 past the prompt: 5 + 2 + (5 - 1 ignored) + 0
    assert int(count) == round(float(their_sum / their_mean)) == 11
    torch.testing.assert_close(
        token_loss_sum(logits, batch["labels"]), their_sum, rtol=1e-6, atol=0
    )

    # Collators that ship labels already shifted: key="shift_labels", shift=False.
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    their_shifted = ForCausalLMLoss(logits, None, VOCAB, num_items_in_batch=1, shift_labels=shifted)
    assert int(tb.count_tokens("shift_labels", shift=False)({"shift_labels": shifted})) == count
    torch.testing.assert_close(token_loss_sum(logits, shifted, shift=False), their_shifted)


def test_causal_lm_loss_is_the_models_own_loss_times_the_token_count():
    model = tiny_gpt2()
    batch = collate(token_sequences([9, 4, 12], prompts=[3, 0, 1], seed=5))
    own_mean = model(**batch).loss  # Transformers' loss, averaged over its scored tokens
    ours = causal_lm_loss(model, batch) / tb.count_tokens()(batch)
    # Transformers computes its loss on float32 logits, so the two agree to float32 precision.
    torch.testing.assert_close(ours, own_mean.double(), rtol=1e-6, atol=0)


def trainer_window_gradient(
    model: nn.Module, window: list[dict], tmp_path: Path
) -> tuple[int, Tensors]:
    """What Trainer.train does for one window: count, then training_step per micro-batch."""
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        gradient_accumulation_steps=len(window),
    )
    trainer = transformers.Trainer(model=model, args=args)
    num_items_in_batch = trainer._get_num_items_in_batch(window, torch.device("cpu"))
    for micro_batch in window:
        trainer.training_step(model, micro_batch, num_items_in_batch)
    return int(num_items_in_batch), take_gradients(model)


def trainer_window() -> tuple[list[TokenSequence], list[dict[str, torch.Tensor]]]:
    sequences = token_sequences([3, 9, 5, 12, 2, 7], prompts=[0, 0, 2, 0, 0, 1], seed=1)
    return sequences, grouped(sequences, [2, 1, 3])


def llama() -> nn.Module:
    return tiny_llama()


def gpt2_with_loss_type() -> nn.Module:
    model = tiny_gpt2()
    model.loss_type = "ForCausalLM"  # what the Trainer needs to count shifted labels
    return model


@pytest.mark.parametrize("make_model", [llama, gpt2_with_loss_type])
def test_trainer_num_items_in_batch_gives_the_truebatch_gradient(make_model, tmp_path):
    model = make_model()
    sequences, window = trainer_window()
    count = sum(int(tb.count_tokens()(micro_batch)) for micro_batch in window)

    num_items_in_batch, trainer_grads = trainer_window_gradient(model, window, tmp_path)
    grads = truebatch_gradient(model, window)

    assert num_items_in_batch == count
    # Transformers' loss runs on float32 logits: agreement to float32 precision.
    assert max_relative_difference(trainer_grads, grads) <= 1e-5
    big = collate(sequences)
    reference = big_batch_gradient(
        model, [p.detach() for p in model.parameters()], lm_big_batch_loss(big)
    )
    assert max_relative_difference(grads, reference) <= 1e-12


def test_trainer_counts_every_label_of_gpt2_and_shrinks_its_gradient(tmp_path):
    """Measured on transformers 5.x: GPT2LMHeadModel has ``loss_type=None`` (its class name
    lacks "ForCausalLM"), so the Trainer counts ``labels != -100`` without the shift while
    the model's loss does shift: N is too large by the sequences whose first label is scored.
    If this starts failing, Transformers has changed the count: update docs/how-to/transformers.md.
    """
    model = tiny_gpt2()
    _, window = trainer_window()
    count = sum(int(tb.count_tokens()(micro_batch)) for micro_batch in window)
    first_scored = sum(int((mb["labels"][:, 0] != IGNORE).sum()) for mb in window)

    num_items_in_batch, trainer_grads = trainer_window_gradient(model, window, tmp_path)
    grads = truebatch_gradient(model, window)

    assert (count, first_scored, num_items_in_batch) == (31, 4, 35)
    scaled = [g * num_items_in_batch / count for g in trainer_grads]
    assert max_relative_difference(scaled, grads) <= 1e-5
    assert max_relative_difference(trainer_grads, grads) == pytest.approx(4 / 35, abs=1e-5)


# --------------------------------------------------------------------------- Lightning


def sample_batches(sizes: Sequence[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 6, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=generator),
        )
        for n in sizes
    ]


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def sample_loss_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def sgd_and_schedule(parameters) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    optimizer = torch.optim.SGD(parameters, lr=0.3, momentum=0.9)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


@pytest.fixture(scope="module")
def lit() -> SimpleNamespace:
    """Lightning, and the two LightningModules the tests train."""
    L = pytest.importorskip("lightning")

    class TrueBatchModule(L.LightningModule):
        """Manual optimization; each training batch is a window of micro-batches."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def configure_optimizers(self):
            optimizer, scheduler = sgd_and_schedule(self.parameters())
            return {"optimizer": optimizer, "lr_scheduler": scheduler}

        def on_fit_start(self) -> None:
            from truebatch.integrations.lightning import accumulator

            self.accumulator = accumulator(self)

        def training_step(self, window, batch_idx: int) -> None:
            self.accumulator.step_window(window, sample_loss_sum)

    class MeanLossModule(L.LightningModule):
        """Automatic optimization, the loss averaged within each micro-batch."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            self.recorder = StepRecorder(optimizer, hook=False)
            return optimizer

        def on_before_optimizer_step(self, optimizer) -> None:
            self.recorder.record()  # after the closure's backward, before the step

        def training_step(self, batch, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

    def fit(module, items, **kwargs):
        trainer = L.Trainer(
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
        trainer.fit(module, DataLoader(list(items), batch_size=None))
        return trainer

    return SimpleNamespace(TrueBatch=TrueBatchModule, MeanLoss=MeanLossModule, fit=fit)


def test_lightning_helper_trains_like_the_plain_truebatch_loop(lit):
    data = sample_batches([5, 2, 9, 4, 7, 3, 8, 1])
    windows = list(tb.windows(data, 3))  # 3 + 3 + 2 micro-batches
    module = lit.TrueBatch(small_net())
    trainer = lit.fit(module, windows)

    net = small_net()
    optimizer, scheduler = sgd_and_schedule(net.parameters())
    acc = tb.Accumulator(net, optimizer, scheduler)
    for window in windows:
        acc.step_window(window, sample_loss_sum)

    assert trainer.global_step == 3
    assert module.lr_schedulers().get_last_lr() == scheduler.get_last_lr() == [0.3 * 0.5**3]
    trained, plain, initial = (
        [p.detach() for p in n.parameters()] for n in (module.net, net, small_net())
    )
    assert max_relative_difference(plain, initial) > 1e-2  # training moved every tensor
    assert max_relative_difference(trained, plain) <= 1e-12


def test_lightning_helper_refuses_automatic_optimization(lit):
    from truebatch.integrations.lightning import accumulator

    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        accumulator(lit.MeanLoss(small_net()))


@pytest.mark.parametrize(
    ("sizes", "window_sizes", "expected"),
    [
        # equal micro-batches, full window: the mean of means is the big batch's mean
        ([6, 6, 6, 6], [4], [0.0]),
        # different sizes: (1/k) sum_j mean_j weighs every micro-batch the same
        ([3, 9, 5, 12], [4], [None]),
        # an epoch's short last window (1 of k=4 micro-batches) is still divided by k
        ([6, 6, 6, 6, 6], [4, 1], [0.0, 0.75]),
    ],
    ids=["equal-sizes", "different-sizes", "short-last-window"],
)
def test_lightning_accumulate_grad_batches_against_the_big_batch(
    lit, sizes, window_sizes, expected
):
    data = sample_batches(sizes)
    module = lit.MeanLoss(small_net())
    lit.fit(module, data, accumulate_grad_batches=4)

    recorder = module.recorder
    assert len(recorder.gradients) == len(window_sizes)  # Lightning steps on the short window too
    bounds = torch.tensor([0, *window_sizes]).cumsum(0).tolist()
    differences = []
    for step, (a, b) in enumerate(itertools.pairwise(bounds)):
        x, y = torch.cat([x for x, _ in data[a:b]]), torch.cat([y for _, y in data[a:b]])
        reference = big_batch_gradient(
            module.net, recorder.weights[step], lambda net, x=x, y=y: F.cross_entropy(net(x), y)
        )
        differences.append(max_relative_difference(recorder.gradients[step], reference))
    for difference, want in zip(differences, expected, strict=True):
        if want is None:  # measured: 0.81 for these sizes
            assert difference > 0.3
        else:
            assert difference == pytest.approx(want, abs=1e-12)


# --------------------------------------------------------------------------- Accelerate


class TinyTokenModel(nn.Module):
    """Per-token embedding -> tanh -> vocabulary logits (called like a Transformers model)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(torch.tanh(self.embed(input_ids))))


def test_accelerate_accumulate_differs_from_the_big_batch_where_truebatch_matches():
    accelerate = pytest.importorskip("accelerate")
    sequences = token_sequences(
        [3, 4, 12, 10, 2, 7, 9, 5, 6], prompts=[0, 1, 0, 4, 0, 0, 2, 0, 0], seed=2
    )
    micro_batches = grouped(sequences, [2, 2, 1, 3, 1])  # windows of 4, then 1 micro-batch
    windows = [sequences[:8], sequences[8:]]
    torch.manual_seed(0)
    initial = TinyTokenModel().double()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=4)

    # The loop of Accelerate's guide: mean loss per micro-batch, step when accumulate() syncs.
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    accelerate_steps = StepRecorder(optimizer)
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, DataLoader(micro_batches, batch_size=None)
    )
    for batch in loader:
        with accelerator.accumulate(model):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            accelerator.backward(mean_token_loss(logits, batch["labels"]))
            optimizer.step()
            optimizer.zero_grad()

    # truebatch: the same prepared model and data, the window's micro-batches to step_window.
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    truebatch_steps = StepRecorder(optimizer)
    model, loader = accelerator.prepare(model, DataLoader(micro_batches, batch_size=None))
    acc = tb.Accumulator(model, optimizer)
    for window in tb.windows(loader, accelerator.gradient_accumulation_steps):
        acc.step_window(window, causal_lm_loss, count=tb.count_tokens())

    for recorder, bounds in ((accelerate_steps, (0.3, 0.75)), (truebatch_steps, None)):
        assert len(recorder.gradients) == 2
        for step, window in enumerate(windows):
            reference = big_batch_gradient(
                initial, recorder.weights[step], lm_big_batch_loss(collate(window))
            )
            difference = max_relative_difference(recorder.gradients[step], reference)
            if bounds is None:
                assert difference <= 1e-12
            elif step == 0:  # micro-batches of 5, 17, 1 and 17 scored tokens, weighed equally
                assert difference > bounds[0]
            else:  # the short last window: divided by k = 4 although it holds one micro-batch
                assert difference == pytest.approx(bounds[1], abs=1e-12)


# --------------------------------------------------------------------------- optional, examples


def test_importing_truebatch_imports_no_framework():
    code = (
        "import sys, truebatch, truebatch.integrations, truebatch.integrations.transformers, "
        "truebatch.integrations.lightning\n"
        "frameworks = ('transformers', 'lightning', 'pytorch_lightning', 'lightning_fabric', "
        "'accelerate')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in frameworks))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip() == "[]"


def run_example(name: str, *args: str) -> str:
    return run_script(EXAMPLES / name, *args)


def test_transformers_example_trains():
    pytest.importorskip("transformers")
    out = run_example("transformers_causal_lm.py", "--epochs", "2", "--steps-per-epoch", "1")
    losses = [float(x) for x in re.findall(r"mean token loss ([\d.]+) over 1 steps", out)]
    assert len(losses) == 2, out
    assert losses[1] < losses[0] < 6.0  # log(256) = 5.55 for random weights


def test_lightning_example_prints_the_measured_differences():
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    out = run_example("lightning_module.py")
    rows = {
        label: [float(x) for x in re.findall(r"\d\.\d+e[-+]\d+", line)]
        for line in out.splitlines()
        for label in ("truebatch helper", "plain tb.Accumulator", "Lightning accumulate")
        if label in line
    }
    assert max(rows["truebatch helper"] + rows["plain tb.Accumulator"]) <= 1e-12, out
    assert min(rows["Lightning accumulate"]) > 0.1, out
