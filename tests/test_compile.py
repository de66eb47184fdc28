"""torch.compile: the checker, the Accumulator and tb.nn on compiled models.

Compilations are counted with a backend that records each graph dynamo hands
it and runs it eagerly (``CountingBackend``); the contract: at most one
compilation per distinct micro-batch shape, no recompile warning, and the same
exactness as eager (float64, :func:`truebatch.max_relative_difference`).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import truebatch as tb
import truebatch.nn as tbnn
from check_factories import BATCH, batch, net, sum_loss

TOL64 = 1e-12


class CountingBackend:
    """A dynamo backend that counts compilations and runs each graph as traced.

    ``scale`` multiplies every graph output for inputs whose leading dim is not
    ``exact_for``: a miscompiling backend, to tell compiled gradients from eager ones.
    """

    def __init__(self, *, scale: float = 1.0, exact_for: int | None = None) -> None:
        self.compilations = 0
        self.scale, self.exact_for = scale, exact_for

    def __deepcopy__(self, memo: dict) -> CountingBackend:
        return self  # a copy of a compiled model compiles with this very backend

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.compilations += 1
        if self.scale == 1.0:
            return graph.forward

        def run(*args: object) -> object:
            out = graph.forward(*args)
            # The input x is (rows, FEATURES); so is the first weight, (WIDTH, FEATURES).
            rows = {a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() == 2}
            if self.exact_for in rows:
                return out
            return tuple(o * self.scale if isinstance(o, torch.Tensor) else o for o in out)

        return run


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------ tb.check


def test_check_on_a_compiled_model_names_paths_without_the_wrapper_prefix():
    backend = CountingBackend()
    compiled = torch.compile(net(mix=True, dropout=0.3), backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = tb.check(compiled, sum_loss, batch())
    assert not [w for w in caught if "recompil" in str(w.message).lower()]
    kinds = {f.module: f.kind for f in report.findings}
    assert kinds == {"blocks.1.mix": "mixes_samples", "head.drop": "dropout"}, report
    assert not any("_orig_mod" in name for name, _ in report.worst_parameters)
    # Default sizes 1, 2, 5, 6 of 12: shapes 12, 1, 2, 5 and 6; dynamo compiles the
    # batch dim dynamically after its second shape, and specializes size 1.
    assert 1 <= backend.compilations <= 5, backend.compilations


def test_check_on_a_compiled_model_judges_the_compiled_gradients():
    # Exact for the full batch of 12, off by 1e-6 for every micro-batch: eager is
    # equivalent, the compiled model is not, and the report must say so.
    compiled = torch.compile(net(), backend=CountingBackend(scale=1 + 1e-6, exact_for=12))
    report = tb.check(compiled, sum_loss, batch(), micro_batch_sizes=[4, 6])
    assert not report.equivalent, report
    assert all(v > 1e-9 for v in report.max_relative_difference.values())
    assert tb.check(net(), sum_loss, batch(), micro_batch_sizes=[4, 6]).equivalent


def test_check_leaves_the_compiled_model_untouched():
    model = net(batchnorm=True)
    compiled = torch.compile(model, backend=CountingBackend())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tb.check(compiled, sum_loss, batch(), micro_batch_sizes=[4])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_check_on_a_module_compiled_in_place_runs_its_copies_not_the_users_module():
    # nn.Module.compile() keeps a compiled call bound to the user's module; a copy
    # that kept it would run (and update) the user's BatchNorm.
    model = net(batchnorm=True)
    model.compile(backend=CountingBackend())
    report = tb.check(model, sum_loss, batch(), micro_batch_sizes=[4])
    assert {f.module for f in report.findings} == {"encoder.2.bn"}
    assert model.encoder[2].bn.running_mean.abs().sum() == 0
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------- the Accumulator


def full_batch_gradient(model: torch.nn.Module, xy: tuple) -> dict[str, torch.Tensor]:
    """``(1/B) * d(sum of losses)/d(params)`` of the whole batch, eagerly, on a copy."""
    eager = copy.deepcopy(model)
    (sum_loss(eager, xy) / BATCH).backward()
    return {name: p.grad for name, p in eager.named_parameters()}


def compiled_window(model: torch.nn.Module, backend, size: int, xy: tuple) -> dict:
    """The Accumulator's window gradient on ``torch.compile(copy of model)``."""
    copied = copy.deepcopy(model)
    acc = tb.Accumulator(
        torch.compile(copied, backend=backend),
        torch.optim.SGD(copied.parameters(), lr=0.1),
        micro_batch_size=size,
    )
    acc.accumulate([xy], sum_loss)
    return {name: p.grad for name, p in copied.named_parameters()}


def compilations(backend) -> int:
    """Graphs compiled so far: the counting backend's tally, or dynamo's for a named one."""
    if isinstance(backend, CountingBackend):
        return backend.compilations
    return counters["stats"]["unique_graphs"]


BACKENDS = [pytest.param(CountingBackend, id="eager"), pytest.param(lambda: "aot_eager", id="aot")]


@pytest.mark.parametrize("make_backend", BACKENDS)
@pytest.mark.parametrize("size", [1, 4, 5])
def test_a_compiled_model_accumulates_the_full_batch_gradient_exactly(make_backend, size):
    model, xy = net(), batch()
    got = compiled_window(model, make_backend(), size, xy)
    assert tb.max_relative_difference(got, full_batch_gradient(model, xy)) <= TOL64


@pytest.mark.parametrize("make_backend", BACKENDS)
@pytest.mark.parametrize(("size", "shapes"), [(4, 1), (5, 2), (12, 1)])
def test_recompiles_at_most_once_per_distinct_micro_batch_shape(make_backend, size, shapes):
    # 12 samples in micro-batches of 5: shapes 5 and 2 (the ragged last one), then
    # nothing new in the windows after the first.
    backend = make_backend()
    model = net()
    acc = tb.Accumulator(
        torch.compile(model, backend=backend),
        torch.optim.SGD(model.parameters(), lr=0.1),
        micro_batch_size=size,
    )
    acc.step(batch(), sum_loss)
    after_first = compilations(backend)
    assert 1 <= after_first <= shapes
    for seed in range(2, 5):
        acc.step(batch(seed=seed), sum_loss)
    assert compilations(backend) == after_first


def test_a_compiled_models_update_equals_the_eager_full_batch_update():
    model = net()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    compiled_copy = copy.deepcopy(model)
    acc = tb.Accumulator(
        torch.compile(compiled_copy, backend=CountingBackend()),
        torch.optim.SGD(compiled_copy.parameters(), lr=0.1, momentum=0.9),
        micro_batch_size=5,
    )
    for seed in (1, 2):
        data = batch(seed=seed)
        optimizer.zero_grad()
        (sum_loss(reference, data) / BATCH).backward()
        optimizer.step()
        acc.step(data, sum_loss)
    got = dict(compiled_copy.named_parameters())
    assert tb.max_relative_difference(got, dict(reference.named_parameters())) <= TOL64


# ------------------------------------------------------------------ tb.nn


def test_ghost_batchnorm_compiled_is_exact_with_the_same_running_statistics():
    model = tbnn.convert_batchnorm(net(batchnorm=True), ghost_batch_size=2)
    xy = batch()
    eager = copy.deepcopy(model)
    (sum_loss(eager, xy) / BATCH).backward()
    compiled_copy = copy.deepcopy(model)
    acc = tb.Accumulator(
        torch.compile(compiled_copy, backend=CountingBackend()),
        torch.optim.SGD(compiled_copy.parameters(), lr=0.1),
        micro_batch_size=4,
    )
    acc.accumulate([xy], sum_loss)
    grads = {n: p.grad for n, p in compiled_copy.named_parameters()}
    assert (
        tb.max_relative_difference(grads, {n: p.grad for n, p in eager.named_parameters()}) <= TOL64
    )
    buffers = dict(compiled_copy.named_buffers())
    assert tb.max_relative_difference(buffers, dict(eager.named_buffers())) <= TOL64


def test_split_invariant_dropout_compiled_draws_the_full_batch_masks():
    # The reference is the eager model's window over the whole batch: the masks are a
    # function of each sample's index in the window, which the Accumulator provides.
    model = tbnn.convert_dropout(net(dropout=0.3), seed=0)
    xy = batch()
    eager = copy.deepcopy(model)
    tb.Accumulator(eager, torch.optim.SGD(eager.parameters(), lr=0.1)).accumulate([xy], sum_loss)
    got = compiled_window(model, CountingBackend(), 5, xy)
    assert (
        tb.max_relative_difference(got, {n: p.grad for n, p in eager.named_parameters()}) <= TOL64
    )


def test_check_calls_a_compiled_converted_model_equivalent():
    model = tbnn.convert_batchnorm(net(batchnorm=True), ghost_batch_size=2)
    report = tb.check(torch.compile(model, backend=CountingBackend()), sum_loss, batch())
    assert report.equivalent, report


# --------------------------------------------------------------- inductor


@pytest.mark.slow
def test_inductor_compiled_window_is_exact_in_float64():
    # The real compiler: C++ kernels that may reorder sums, still within float64's bound.
    model, xy = net(), batch()
    got = compiled_window(model, "inductor", 5, xy)
    assert tb.max_relative_difference(got, full_batch_gradient(model, xy)) <= TOL64
