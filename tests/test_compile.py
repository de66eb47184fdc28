"""torch.compile: the checker, the Accumulator and tb.nn on compiled models.

Compilations are counted with a backend that records each graph dynamo hands
it and runs it eagerly (``CountingBackend``); the contract: at most one
compilation per distinct micro-batch shape, no recompile warning, and the same
exactness as eager (float64, :func:`truebatch.max_relative_difference`).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo

import truebatch as tb
from check_factories import batch, net, sum_loss


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
