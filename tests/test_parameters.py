"""The parameters a window touches are the optimizer's, read every window.

The gradient norm, clipping, the non-finite check and the division by counts
``loss_fn`` returns cover exactly the parameters the optimizer updates (with
or without a GradScaler, which unscales only those); parameters added to the
optimizer after the Accumulator was built (``add_param_group``, a new
adapter) are normalized, clipped, stepped and cleared like the others. A
trainable parameter of the model that the optimizer does not hold still gets
a gradient from backward; the Accumulator clears it at the end of every
window, so nothing piles up. Every case is compared with a plain float64 loop
written out here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import truebatch as tb
from models import CLASSES, FEATURES, seeded, vector_batch
from truebatch.gradients import parameters_and_buffers

TOL = 1e-12


class Adapted(nn.Module):
    """A small MLP, with an optional residual adapter added later (as fine-tuning does)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(FEATURES, 10)
        self.middle = nn.Linear(10, 10)
        self.head = nn.Linear(10, CLASSES)
        self.adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.middle(torch.tanh(self.first(x))))
        if self.adapter is not None:
            h = h + self.adapter(h)
        return self.head(h)


def loss_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def loss_and_count(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
    return loss_sum(model, batch), len(batch[0])


def subset(model: Adapted) -> list[nn.Parameter]:
    """What the optimizer holds: the first and last layers, not the middle one."""
    return [*model.first.parameters(), *model.head.parameters()]


def sgd(parameters: Any) -> torch.optim.SGD:
    return torch.optim.SGD(parameters, lr=0.3, momentum=0.9)


def reference_window(
    model: Adapted,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    max_grad_norm: float | None,
) -> float:
    """The plain float64 loop: mean loss, backward, the norm and clip over the optimizer's
    parameters (``clip_grad_norm_``'s coefficient), the step; returns the norm."""
    updated = [p for group in optimizer.param_groups for p in group["params"]]
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    grads = [p.grad for p in updated if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if max_grad_norm is not None:
        coefficient = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coefficient)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return norm.item()


def assert_same(model: nn.Module, reference: nn.Module) -> None:
    ours = dict(model.named_parameters())
    theirs = dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    assert tb.max_relative_difference(ours, theirs) <= TOL
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("scaler", [False, True], ids=["no_scaler", "gradscaler"])
@pytest.mark.parametrize("returns_count", [False, True], ids=["count_fn", "loss_fn_count"])
def test_norm_and_clipping_cover_the_parameters_the_optimizer_updates(
    scaler: bool, returns_count: bool
) -> None:
    """Regression (issue 15, defect 1): with a GradScaler, the middle layer's gradient
    (not the optimizer's, so never unscaled) entered the norm still multiplied by the
    scale; without one, the clip covered parameters the optimizer does not own."""
    model = seeded(Adapted)
    reference = copy.deepcopy(model)
    middle = [p.detach().clone() for p in model.middle.parameters()]
    acc = tb.Accumulator(
        model,
        sgd(subset(model)),
        micro_batch_size=4,
        max_grad_norm=0.05,
        scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaler else None,
    )
    ref_optimizer = sgd(subset(reference))

    for window in range(3):
        batch = vector_batch(11, seed=window)
        result = acc.step(batch, loss_and_count if returns_count else loss_sum)
        norm = reference_window(reference, ref_optimizer, batch, max_grad_norm=0.05)

        assert result.stepped, result.skip_reason
        assert norm > 0.05  # the clip acts
        assert result.grad_norm == pytest.approx(norm, rel=TOL)
        assert_same(model, reference)
    for before, after in zip(middle, model.middle.parameters(), strict=True):
        assert torch.equal(before, after)


def test_a_nonfinite_gradient_outside_the_optimizer_does_not_skip_the_window() -> None:
    """sqrt(0) in the loss gives a parameter the optimizer does not hold an infinite
    gradient; the optimizer's own gradient is finite, so the window steps (the check
    covers what the optimizer would step on), and the infinite gradient is cleared."""
    model = seeded(Adapted)
    model.register_parameter("aside", nn.Parameter(torch.zeros(1, dtype=torch.float64)))
    reference = copy.deepcopy(model)
    acc = tb.Accumulator(model, sgd(subset(model)), micro_batch_size=4)
    ref_optimizer = sgd(subset(reference))

    def with_sqrt(model: nn.Module, batch: Any) -> torch.Tensor:
        return loss_sum(model, batch) + model.aside.sqrt().sum()

    batch = vector_batch(8, seed=3)
    result = acc.step(batch, with_sqrt)
    norm = reference_window(reference, ref_optimizer, batch, max_grad_norm=None)

    assert result.stepped and math.isfinite(result.grad_norm), result.skip_reason
    assert result.grad_norm == pytest.approx(norm, rel=TOL)
    assert_same(model, reference)


def train_both(
    steps: list[Callable[[Adapted, torch.optim.Optimizer], None]],
    loss_fn: Callable[..., Any],
    max_grad_norm: float | None = None,
) -> None:
    """Windows of 10 samples on the model and on the plain loop; before window ``w``,
    ``steps[w]`` changes both models and optimizers the same way."""
    model = seeded(Adapted)
    reference = copy.deepcopy(model)
    optimizer, ref_optimizer = sgd(model.first.parameters()), sgd(reference.first.parameters())
    acc = tb.Accumulator(model, optimizer, micro_batch_size=3, max_grad_norm=max_grad_norm)
    for window, change in enumerate(steps):
        change(model, optimizer)
        change(reference, ref_optimizer)
        batch = vector_batch(10, seed=10 + window)
        result = acc.step(batch, loss_fn)
        norm = reference_window(reference, ref_optimizer, batch, max_grad_norm)
        assert result.grad_norm == pytest.approx(norm, rel=TOL), f"window {window}"
        assert_same(model, reference)


def nothing(model: Adapted, optimizer: torch.optim.Optimizer) -> None:
    pass


def add_head_group(model: Adapted, optimizer: torch.optim.Optimizer) -> None:
    optimizer.add_param_group({"params": list(model.head.parameters()), "lr": 0.1})


def add_adapter(model: Adapted, optimizer: torch.optim.Optimizer) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model.adapter = nn.Linear(10, 10).to(torch.float64)
    optimizer.add_param_group({"params": list(model.adapter.parameters())})


def grow_first_group(model: Adapted, optimizer: torch.optim.Optimizer) -> None:
    optimizer.param_groups[0]["params"].extend(model.middle.parameters())


@pytest.mark.parametrize("returns_count", [False, True], ids=["count_fn", "loss_fn_count"])
@pytest.mark.parametrize(
    "change", [add_head_group, add_adapter, grow_first_group], ids=lambda f: f.__name__
)
def test_parameters_added_after_construction_are_normalized_clipped_and_stepped(
    change: Callable[[Adapted, torch.optim.Optimizer], None], returns_count: bool
) -> None:
    """Regression (issue 15, defect 2): the parameter list was frozen at construction,
    so added parameters were never cleared nor divided by N when loss_fn returns
    counts, and their gradients piled up across windows."""
    train_both(
        [nothing, change, nothing, nothing],
        loss_and_count if returns_count else loss_sum,
        max_grad_norm=0.05,
    )


def test_gradients_of_parameters_outside_the_optimizer_are_cleared_every_window() -> None:
    """The model's middle layer (and an adapter added to the model only) get gradients
    from backward but are not stepped: they stay as they were and hold no gradient."""

    def adapter_in_the_model_only(model: Adapted, optimizer: torch.optim.Optimizer) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            model.adapter = nn.Linear(10, 10).to(torch.float64)

    train_both([nothing, adapter_in_the_model_only, nothing], loss_sum)


def test_an_optimizer_parameter_added_outside_the_model_is_refused_before_anything_changes() -> (
    None
):
    model = seeded(Adapted)
    optimizer = sgd(model.parameters())
    acc = tb.Accumulator(model, optimizer, micro_batch_size=4)
    acc.step(vector_batch(8, seed=1), loss_sum)
    stranger = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer.add_param_group({"params": [stranger]})
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()))

    with pytest.raises(ValueError, match=r"`optimizer` got 1 parameter.*not.*model.*Fix:"):
        acc.step(vector_batch(8, seed=2), loss_sum)

    after = (model.state_dict(), optimizer.state_dict())
    pairs = zip(before[0].values(), after[0].values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert before[1]["state"].keys() == after[1]["state"].keys()
    assert acc.state_dict()["window"] == 1


def test_one_walk_reads_the_parameters_and_buffers_in_the_order_of_torch() -> None:
    """Tied weights, a module registered twice, a GRU and BatchNorm buffers: the walk the
    window reads the model with gives what model.parameters() and model.buffers() give."""
    tied = seeded(Adapted)
    tied.adapter = nn.Sequential(nn.BatchNorm1d(10), nn.GRU(10, 10), tied.middle)
    tied.middle.weight = tied.adapter[2].weight  # the same tensor under two names
    tied.register_module("again", tied.first)  # the same module under two names
    tied.register_buffer("scale", torch.ones(1))
    for model in (tied, nn.ModuleDict({"module": tied})):
        params, buffers = parameters_and_buffers(model)
        assert [id(p) for p in params] == [id(p) for p in model.parameters()]
        assert [id(b) for b in buffers] == [id(b) for b in model.buffers()]


class Bag(nn.Module):
    """A sparse embedding (``sparse=True``: its gradient is a sparse tensor holding the rows
    the window looked up) and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 5, sparse=True)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids).mean(dim=1))


def bag_loss_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, y = batch
    return F.cross_entropy(model(ids), y, reduction="sum")


@pytest.mark.parametrize("max_grad_norm", [None, 0.05], ids=["no_clip", "clip"])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adagrad"])
def test_sparse_gradients_are_normalized_measured_clipped_and_stepped(
    optimizer_name: str, max_grad_norm: float | None
) -> None:
    """Regression: a window with a sparse gradient (``nn.Embedding(sparse=True)``, which
    a plain loop steps with SGD or Adagrad) raised NotImplementedError in the norm."""
    model = seeded(Bag).double()
    reference = copy.deepcopy(model)

    def build(module: nn.Module) -> torch.optim.Optimizer:
        if optimizer_name == "sgd":
            return torch.optim.SGD(module.parameters(), lr=0.5)
        return torch.optim.Adagrad(module.parameters(), lr=0.5)

    optimizer, reference_optimizer = build(model), build(reference)
    acc = tb.Accumulator(model, optimizer, micro_batch_size=3, max_grad_norm=max_grad_norm)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = (
            torch.randint(0, 20, (10, 4), generator=generator),
            torch.randint(0, CLASSES, (10,), generator=generator),
        )

        result = acc.step(batch, bag_loss_sum)

        # The plain loop, with the norm of the dense gradients (clip_grad_norm_ refuses
        # sparse ones) and clip_grad_norm_'s coefficient.
        (bag_loss_sum(reference, batch) / len(batch[1])).backward()
        grads = [p.grad for p in reference.parameters()]
        norm = math.sqrt(sum(g.to_dense().square().sum().item() for g in grads))
        if max_grad_norm is not None:
            for g in grads:
                g.mul_(min(1.0, max_grad_norm / (norm + 1e-6)))
        reference_optimizer.step()
        reference_optimizer.zero_grad(set_to_none=True)
        assert result.stepped
        assert result.grad_norm == pytest.approx(norm, rel=1e-12)
        assert_same(model, reference)
