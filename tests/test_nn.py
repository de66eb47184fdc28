"""Split-invariant layers: ghost BatchNorm, split-invariant dropout and the converters.

References are written out here: sequential ``nn.BatchNorm`` calls on each ghost
batch, and a pure-Python splitmix64 for the dropout mask. Exactness is checked
in float64 at 1e-12 (relative, per tensor), as in the library's contract.
"""

from __future__ import annotations

import contextlib
import copy
import math
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import truebatch as tb
import truebatch.nn as tnn
from token_data import CheckpointedBlock
from truebatch import _context
from truebatch.nn import batchnorm as ghost_module
from truebatch.nn import cpu_kernels

DTYPE = torch.float64
EXACT = 1e-12


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The contract's measurement (truebatch.compare) on one tensor."""
    return tb.max_relative_difference([actual], [expected])


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=DTYPE)


# --------------------------------------------------------------------------- ghost BatchNorm

BATCHNORMS = {
    "1d": (nn.BatchNorm1d, tnn.GhostBatchNorm1d, (5,)),
    "1d-seq": (nn.BatchNorm1d, tnn.GhostBatchNorm1d, (5, 7)),
    "2d": (nn.BatchNorm2d, tnn.GhostBatchNorm2d, (5, 3, 4)),
    "3d": (nn.BatchNorm3d, tnn.GhostBatchNorm3d, (5, 2, 3, 2)),
}


@pytest.fixture(params=["direct", "gathered", "fused"])
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run ghost BN each way: BatchNorm's kernel per ghost batch, PyTorch ops on all of them
    at once (ghost_kernels), or truebatch's CPU kernel (cpu_kernels.cpp) on all of them."""
    if request.param == "fused":
        # Built here (CI has a compiler): without it this test would not test the kernel.
        assert cpu_kernels.available()
        return request.param
    monkeypatch.setattr(ghost_module, "_fused", lambda x: False)
    threshold = 1 if request.param == "direct" else 2**62
    monkeypatch.setattr(ghost_module, "_DIRECT_CHUNK_NUMEL", threshold)
    return request.param


def make_pair(kind: str, ghost: int, **kwargs: object) -> tuple[nn.Module, nn.Module]:
    """A ghost layer with random affine parameters and running stats, and a BatchNorm twin."""
    native_cls, ghost_cls, (channels, *_) = BATCHNORMS[kind]
    layer = ghost_cls(channels, ghost, dtype=DTYPE, **kwargs)
    with torch.no_grad():
        if layer.affine:
            layer.weight.copy_(1 + randn(channels, seed=1).abs())
        if layer.bias is not None:
            layer.bias.copy_(randn(channels, seed=2))
        if layer.track_running_stats:
            layer.running_mean.copy_(randn(channels, seed=3))
            layer.running_var.copy_(1 + randn(channels, seed=4).abs())
            layer.num_batches_tracked.fill_(3)
    native = native_cls(channels, dtype=DTYPE, **kwargs)
    native.load_state_dict(layer.state_dict())
    return layer, native


def input_for(kind: str, batch: int, seed: int = 0) -> torch.Tensor:
    return 2.0 + 3.0 * randn(batch, *BATCHNORMS[kind][2], seed=seed)


def assert_same_state(layer: nn.Module, reference: nn.Module) -> None:
    for (name, ours), (_, theirs) in zip(
        layer.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        if name.endswith("num_batches_tracked"):
            assert ours.item() == theirs.item(), name
        else:
            assert relative_difference(ours, theirs) <= EXACT, name


@pytest.mark.parametrize("kind", sorted(BATCHNORMS))
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("batch", [12, 14])  # 3 ghost batches of 4; 3 and a last one of 2
def test_ghost_batchnorm_is_sequential_batchnorm_per_ghost_batch(
    kind: str, momentum: float | None, batch: int, layout: str
) -> None:
    ghost = 4
    layer, native = make_pair(kind, ghost, momentum=momentum)
    for step in range(2):
        x = input_for(kind, batch, seed=step)
        ours_x, their_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = layer(ours_x)
        theirs = torch.cat([native(chunk) for chunk in their_x.split(ghost)])
        assert relative_difference(ours, theirs) <= EXACT
        grad = randn(*ours.shape, seed=10 + step)
        ours_grads = torch.autograd.grad(ours, (ours_x, layer.weight, layer.bias), grad)
        their_grads = torch.autograd.grad(theirs, (their_x, native.weight, native.bias), grad)
        assert tb.max_relative_difference(ours_grads, their_grads) <= EXACT
        assert_same_state(layer, native)


MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


@pytest.mark.parametrize(
    "kind, channels_last",
    [(kind, False) for kind in sorted(BATCHNORMS)] + [("2d", True), ("3d", True)],
)
@pytest.mark.parametrize(
    "ghost, batch",
    [(1, 3), (2, 2), (2, 7), (3, 3), (3, 11), (5, 4)],  # tiny ghosts, one ghost batch, short last
)
def test_every_kernel_path_is_sequential_batchnorm(
    kind: str, ghost: int, batch: int, channels_last: bool, layout: str
) -> None:
    """Direct calls, GroupNorm over (G, C, g, L), gathered BatchNorm, the short last ghost
    batch and channels-last inputs, against BatchNorm called on each chunk in turn."""
    layer, native = make_pair(kind, ghost)
    x = input_for(kind, batch)
    if channels_last:
        x = x.to(memory_format=MEMORY_FORMATS[x.dim()])
    if x[:1].numel() == x.shape[1] and 1 in (ghost, batch % ghost or ghost):
        with pytest.raises(ValueError, match="1 value per channel"):
            layer(x)
        return
    ours_x, their_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = layer(ours_x)
    theirs = torch.cat([native(chunk) for chunk in their_x.split(ghost)])
    assert relative_difference(ours, theirs) <= EXACT
    grad = randn(*ours.shape, seed=10)
    ours_grads = torch.autograd.grad(ours, (ours_x, layer.weight, layer.bias), grad)
    their_grads = torch.autograd.grad(theirs, (their_x, native.weight, native.bias), grad)
    assert tb.max_relative_difference(ours_grads, their_grads) <= EXACT
    assert_same_state(layer, native)


def reference_ghost_batchnorm(
    x: torch.Tensor, layer: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ghost BatchNorm written out in float64: output, running mean and running variance.

    Each chunk of ``ghost_batch_size`` samples: ``(x - mean) / sqrt(var + eps) * w + b``
    with its biased variance; then ``r <- (1 - m) r + m s`` with the unbiased one.
    """
    channels, momentum = x.shape[1], layer.momentum
    shape = (1, channels, *[1] * (x.dim() - 2))
    weight, bias = layer.weight.double().view(shape), layer.bias.double().view(shape)
    running_mean, running_var = layer.running_mean.double(), layer.running_var.double()
    outputs = []
    for chunk in x.split(layer.ghost_batch_size):
        dims = [0, *range(2, x.dim())]
        n = chunk.numel() // channels
        mean = chunk.mean(dims, keepdim=True)
        var = ((chunk - mean) ** 2).sum(dims, keepdim=True) / n
        outputs.append((chunk - mean) / torch.sqrt(var + layer.eps) * weight + bias)
        running_mean = (1 - momentum) * running_mean + momentum * mean.flatten()
        running_var = (1 - momentum) * running_var + momentum * var.flatten() * n / (n - 1)
    return torch.cat(outputs), running_mean, running_var


def ghost_errors(
    layer: nn.Module, x: torch.Tensor, grad: torch.Tensor
) -> tuple[float, float, float]:
    """Relative differences of ``layer``'s output, gradients (input, weight, bias) and
    running statistics from :func:`reference_ghost_batchnorm` on the same values."""
    reference_layer = copy.deepcopy(layer).double()
    x64 = x.detach().double().requires_grad_()
    expected, running_mean, running_var = reference_ghost_batchnorm(x64, reference_layer)
    expected_grads = torch.autograd.grad(
        expected, (x64, reference_layer.weight, reference_layer.bias), grad.double()
    )
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    grads = torch.autograd.grad(out, (x, layer.weight, layer.bias), grad)
    return (
        relative_difference(out.double(), expected),
        tb.max_relative_difference([g.double() for g in grads], list(expected_grads)),
        tb.max_relative_difference(
            [layer.running_mean.double(), layer.running_var.double()], [running_mean, running_var]
        ),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "kind, channels_last",
    [(kind, False) for kind in sorted(BATCHNORMS)] + [("2d", True), ("3d", True)],
)
@pytest.mark.parametrize(
    "ghost, batch",
    [(1, 4), (2, 2), (2, 16), (2, 7), (3, 13), (8, 8), (8, 40)],
)
def test_every_way_is_the_written_out_ghost_batchnorm(
    kind: str, channels_last: bool, ghost: int, batch: int, dtype: torch.dtype, layout: str
) -> None:
    """Every way ghost BatchNorm computes a block (BatchNorm's kernel per ghost batch,
    reductions over a view, GroupNorm on a copy; ghost_kernels), on ghost batches of 1-2
    samples, one ghost batch, a short last one and channels-last inputs, in float64 and
    bfloat16, against the formula in float64. bfloat16 must be as close to it as
    BatchNorm2d in bfloat16 called on each chunk (plus one bfloat16 rounding)."""
    layer, native = make_pair(kind, ghost)
    layer, native = layer.to(dtype), native.to(dtype)
    x = input_for(kind, batch).to(dtype)
    if channels_last:
        x = x.to(memory_format=MEMORY_FORMATS[x.dim()])
    grad = randn(*x.shape, seed=10).to(dtype)
    if x[:1].numel() == x.shape[1] and 1 in (ghost, batch % ghost or ghost):
        with pytest.raises(ValueError, match="1 value per channel"):
            layer(x)
        return
    ours = ghost_errors(layer, x, grad)
    if dtype == torch.float64:
        assert max(ours) <= EXACT, ours
        return

    class Sequential(nn.Module):  # BatchNorm on each chunk in turn, as one layer
        def __init__(self) -> None:
            super().__init__()
            self.inner = native
            self.weight, self.bias = native.weight, native.bias
            self.running_mean, self.running_var = native.running_mean, native.running_var

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.inner(chunk) for chunk in x.split(ghost)])

    sequential = Sequential()
    sequential.ghost_batch_size, sequential.eps = ghost, native.eps
    sequential.momentum = native.momentum
    theirs = ghost_errors(sequential, x, grad)
    for what, mine, native_error in zip(
        ("output", "gradients", "stats"), ours, theirs, strict=True
    ):
        assert mine <= 2 * native_error + 2**-8, (what, mine, native_error)


@pytest.mark.parametrize("kind", sorted(BATCHNORMS))
@pytest.mark.parametrize(
    "options", [{"affine": False}, {"bias": False}, {"track_running_stats": False}]
)
@pytest.mark.parametrize("ghost", [2, 3])
def test_every_way_without_affine_parameters_or_running_stats(
    kind: str, options: dict[str, bool], ghost: int, layout: str
) -> None:
    """Without weight, without bias, without running statistics: still BatchNorm on each
    ghost batch in turn (8 samples, ghost batches of 2, or of 3: a block of 2 and a short
    last one)."""
    layer, native = make_pair(kind, ghost, **options)
    x = input_for(kind, 8)
    ours_x, their_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = layer(ours_x)
    theirs = torch.cat([native(chunk) for chunk in their_x.split(ghost)])
    assert relative_difference(ours, theirs) <= EXACT
    grad = randn(*ours.shape, seed=10)
    ours_inputs = [ours_x, *(p for p in layer.parameters())]
    their_inputs = [their_x, *(p for p in native.parameters())]
    ours_grads = torch.autograd.grad(ours, ours_inputs, grad)
    their_grads = torch.autograd.grad(theirs, their_inputs, grad)
    assert tb.max_relative_difference(ours_grads, their_grads) <= EXACT
    assert_same_state(layer, native)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(BATCHNORMS))
@pytest.mark.parametrize("ghost, batch", [(2, 8), (3, 11), (8, 16)])
def test_every_way_leaves_the_input_and_the_incoming_gradient_alone(
    kind: str, ghost: int, batch: int, dtype: torch.dtype, layout: str
) -> None:
    """The ways work in place on their own buffers: the input and the gradient handed to
    backward (the caller's tensors, possibly used again) keep their values."""
    layer, _ = make_pair(kind, ghost)
    layer = layer.to(dtype)
    x = input_for(kind, batch).to(dtype).requires_grad_()
    grad = randn(*x.shape, seed=10).to(dtype)
    x_before, grad_before = x.detach().clone(), grad.clone()
    layer(x).backward(grad)
    assert torch.equal(x.detach(), x_before)
    assert torch.equal(grad, grad_before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(BATCHNORMS))
@pytest.mark.parametrize("ghost, batch", [(2, 8), (3, 11), (8, 16)])
def test_parameter_gradients_without_an_input_gradient(
    kind: str, ghost: int, batch: int, dtype: torch.dtype, layout: str
) -> None:
    """An input that needs no gradient (the first layer): the weight and bias gradients of
    every way are still those of BatchNorm called on each ghost batch in turn, in float64;
    in bfloat16 as close to them as BatchNorm in bfloat16 (plus one bfloat16 rounding)."""
    layer, native = make_pair(kind, ghost)
    x = input_for(kind, batch)
    grad = randn(*x.shape, seed=10)

    def parameter_grads(module: nn.Module, ghost_layer: bool) -> list[torch.Tensor]:
        module = copy.deepcopy(module).to(dtype)
        inputs = x.to(dtype)
        out = module(inputs) if ghost_layer else torch.cat(list(map(module, inputs.split(ghost))))
        grads = torch.autograd.grad(out, (module.weight, module.bias), grad.to(dtype))
        return [g.double() for g in grads]

    expected = torch.autograd.grad(
        torch.cat([native(chunk) for chunk in x.split(ghost)]), (native.weight, native.bias), grad
    )
    ours = tb.max_relative_difference(parameter_grads(layer, True), expected)
    if dtype == torch.float64:
        assert ours <= EXACT
    else:
        theirs = tb.max_relative_difference(parameter_grads(native, False), expected)
        assert ours <= 2 * theirs + 2**-8, (ours, theirs)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape, ghost, channels_last",
    [
        ((64, 300), 2, False),  # two rows per ghost batch (closed form), two channel tiles
        ((64, 300), 4, False),  # rows of channels, two channel tiles, recomputed
        ((12, 300, 2, 2), 3, True),  # channels-last rows: 12 values each, saved
        ((16, 3, 17, 17), 2, False),  # runs of 289 values: two column tiles per channel
        ((12, 2, 3), 2, False),  # runs of 3 values: 6 per ghost batch, recomputed
        ((12, 2, 40), 3, False),  # 120 values per ghost batch and channel: saved statistics
    ],
)
def test_fused_kernel_tiles_threads_and_saved_statistics(
    shape: tuple[int, ...], ghost: int, channels_last: bool, threads: int
) -> None:
    """The CPU kernel on what the small shapes above do not reach: more channels than a
    task's tile, runs longer than a tile, saved versus recomputed statistics, and the
    per-thread sums of the parameter gradients and running statistics, with one and two
    threads; float64, against BatchNorm on each ghost batch in turn."""
    assert cpu_kernels.available()
    native_cls, ghost_cls = {
        2: (nn.BatchNorm1d, tnn.GhostBatchNorm1d),
        3: (nn.BatchNorm1d, tnn.GhostBatchNorm1d),
        4: (nn.BatchNorm2d, tnn.GhostBatchNorm2d),
    }[len(shape)]
    channels = shape[1]
    layer = ghost_cls(channels, ghost, dtype=DTYPE)
    with torch.no_grad():
        layer.weight.copy_(1 + randn(channels, seed=1).abs())
        layer.bias.copy_(randn(channels, seed=2))
    native = native_cls(channels, dtype=DTYPE)
    native.load_state_dict(layer.state_dict())
    x = 2.0 + 3.0 * randn(*shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert ghost_module._blocks(ghost_module._dense(x), ghost)[0][3] == "fused"
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours_x, their_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = layer(ours_x)
        theirs = torch.cat([native(chunk) for chunk in their_x.split(ghost)])
        grad = randn(*shape, seed=10)
        ours_grads = torch.autograd.grad(ours, (ours_x, layer.weight, layer.bias), grad)
        their_grads = torch.autograd.grad(theirs, (their_x, native.weight, native.bias), grad)
    finally:
        torch.set_num_threads(before)
    assert relative_difference(ours, theirs) <= EXACT
    assert tb.max_relative_difference(ours_grads, their_grads) <= EXACT
    assert_same_state(layer, native)


@pytest.mark.parametrize("ghost", [2, 3])  # 8 samples: one C++ autograd node; or blocks
def test_second_order_gradients_are_refused_not_dropped(ghost: int, layout: str) -> None:
    """A gradient penalty through a ghost layer would need its gradient to be
    differentiable, which it is not: every path raises instead of returning a gradient
    that silently leaves the penalty's part out."""
    layer = tnn.GhostBatchNorm1d(4, ghost, dtype=DTYPE)
    x = randn(8, 4).requires_grad_()
    with pytest.raises(RuntimeError, match=r"first-order|differentiate twice"):
        (grad,) = torch.autograd.grad((layer(x) ** 3).sum(), x, create_graph=True)
        grad.pow(2).sum().backward()


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_train_mode_without_autograd_is_still_ghost_batchnorm(mode: type, layout: str) -> None:
    """Under no_grad and inference_mode (no autograd dispatch: the kernel's forward alone)
    the output and the running statistics are those of BatchNorm on each ghost batch."""
    layer, native = make_pair("2d", 2)
    x = input_for("2d", 8)
    with mode():
        ours = layer(x)
        theirs = torch.cat([native(chunk) for chunk in x.split(2)])
    assert relative_difference(ours, theirs) <= EXACT
    assert_same_state(layer, native)


def test_without_a_compiler_the_layers_warn_once_and_take_their_pytorch_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed build is not an error: one RuntimeWarning that names the cause and the fix,
    then the PyTorch ways, with BatchNorm's results."""

    def no_compiler() -> None:
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels, "_load", no_compiler)
    cpu_kernels.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build its CPU kernels .*Ninja.*Fix"):
            assert not cpu_kernels.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not cpu_kernels.available()  # once
        layer, native = make_pair("1d", 2)
        x = input_for("1d", 8)
        assert {way for *_, way in ghost_module._blocks(x, 2)} == {"pair"}
        theirs = torch.cat([native(chunk) for chunk in x.split(2)])
        assert relative_difference(layer(x), theirs) <= EXACT
    finally:
        monkeypatch.undo()
        cpu_kernels.available.cache_clear()
    assert cpu_kernels.available()


def test_a_build_killed_halfway_does_not_block_the_next_process() -> None:
    """torch's lock file, left by a build that died, is cleared under truebatch's own
    lock (an flock the system releases with its process) instead of being waited on
    forever; a fresh process then loads the built library."""
    assert cpu_kernels.available()
    stale = cpu_kernels._build_directory() / "lock"
    stale.touch()
    program = "from truebatch.nn import cpu_kernels; print(cpu_kernels.available())"
    loaded = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert loaded.stdout.strip() == "True", loaded.stderr
    assert not stale.exists()


def test_the_environment_variable_keeps_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRUEBATCH_CPU_KERNELS=0: no build, no warning, the PyTorch ways."""
    monkeypatch.setenv(cpu_kernels.ENVIRONMENT_VARIABLE, "0")
    monkeypatch.setattr(cpu_kernels, "_load", lambda: pytest.fail("built despite the variable"))
    cpu_kernels.available.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not cpu_kernels.available()
        assert ghost_module._blocks(input_for("2d", 8), 4)[0][3] == "reduced"
    finally:
        monkeypatch.undo()
        cpu_kernels.available.cache_clear()
    assert cpu_kernels.available()


@pytest.mark.parametrize("kind", sorted(BATCHNORMS))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_batch_of_whole_batch_is_batchnorm(kind: str, momentum: float | None) -> None:
    batch = 6
    layer, native = make_pair(kind, batch, momentum=momentum)
    for step in range(3):
        x = input_for(kind, batch, seed=step)
        ours_x, their_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours, theirs = layer(ours_x), native(their_x)
        assert torch.equal(ours, theirs)
        grad = randn(*ours.shape, seed=10 + step)
        ours_grads = torch.autograd.grad(ours, (ours_x, layer.weight, layer.bias), grad)
        their_grads = torch.autograd.grad(theirs, (their_x, native.weight, native.bias), grad)
        for a, b in zip(ours_grads, their_grads, strict=True):
            assert torch.equal(a, b)
        assert_same_state(layer, native)
        assert layer.num_batches_tracked.item() == 3 + step + 1


@pytest.mark.parametrize("kind", sorted(BATCHNORMS))
def test_eval_mode_is_batchnorm_eval(kind: str) -> None:
    layer, native = make_pair(kind, 2)
    layer(input_for(kind, 8))  # move the running statistics away from the twin's
    native.load_state_dict(layer.state_dict())
    layer.eval(), native.eval()
    x = input_for(kind, 5, seed=1)
    assert torch.equal(layer(x), native(x))
    assert_same_state(layer, native)


def test_without_running_stats_eval_still_uses_ghost_batches() -> None:
    layer, _ = make_pair("2d", 3, track_running_stats=False)
    x = input_for("2d", 9)
    expected = torch.cat(
        [F.batch_norm(c, None, None, layer.weight, layer.bias, True) for c in x.split(3)]
    )
    for training in (True, False):
        layer.train(training)
        assert relative_difference(layer(x), expected) <= EXACT


def run_split(
    layer: nn.Module, x: torch.Tensor, sizes: list[int], window: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output (concatenated) and summed parameter gradients over micro-batches of ``sizes``."""
    outputs, grads = [], [torch.zeros_like(p) for p in layer.parameters()]
    start = 0
    for size in sizes:
        with _context.micro_batch(window=window, offset=start):
            out = layer(x[start : start + size])
        weights = torch.arange(start, start + size, dtype=DTYPE).view(-1, *[1] * (x.dim() - 1))
        for total, g in zip(
            grads, torch.autograd.grad((out * weights).sum(), list(layer.parameters())), strict=True
        ):
            total += g
        outputs.append(out.detach())
        start += size
    return torch.cat(outputs), grads


@st.composite
def ghost_splits(draw: st.DrawFn) -> tuple[int, list[int]]:
    """A ghost size and micro-batch sizes: multiples of it, the last may have a remainder."""
    ghost = draw(st.integers(1, 4))
    chunks = draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    remainder = draw(st.integers(0, ghost - 1))
    sizes = [c * ghost for c in chunks]
    sizes[-1] += remainder
    return ghost, sizes


@given(ghost_splits(), st.sampled_from([0.1, None]))
def test_ghost_batchnorm_is_split_invariant(split: tuple[int, list[int]], momentum) -> None:
    ghost, sizes = split
    layer, _ = make_pair("2d", ghost, momentum=momentum)
    x = input_for("2d", sum(sizes))
    full = copy.deepcopy(layer)
    full_out, full_grads = run_split(full, x, [sum(sizes)])
    out, grads = run_split(layer, x, sizes)
    assert relative_difference(out, full_out) <= EXACT
    assert tb.max_relative_difference(grads, full_grads) <= EXACT
    assert_same_state(layer, full)


def test_micro_batch_not_on_a_ghost_boundary_raises() -> None:
    layer, _ = make_pair("2d", 4)
    x = input_for("2d", 6)
    with _context.micro_batch(window=0, offset=0):
        layer(x)  # the first micro-batch may hold any number of samples...
    with _context.micro_batch(window=0, offset=6), pytest.raises(ValueError) as error:
        layer(x)  # ...but then the next one starts inside a ghost batch
    assert "multiple of 4" in str(error.value)
    assert "micro_batch_size" in str(error.value)


def test_single_value_ghost_batch_raises() -> None:
    layer, _ = make_pair("1d", 4)
    with pytest.raises(ValueError, match="variance"):
        layer(input_for("1d", 9))  # 4 + 4 + 1: the last ghost batch has one value per channel
    make_pair("2d", 1)[0](input_for("2d", 3))  # one sample, but 12 values per channel: fine


def test_input_shape_is_validated_like_batchnorm() -> None:
    layer, native = make_pair("2d", 2)
    x = randn(4, 5, 3)
    with pytest.raises(ValueError, match="4D input"):
        native(x)
    with pytest.raises(ValueError, match="4D input"):
        layer(x)
    with pytest.raises(ValueError, match="num_features=5"):
        layer(randn(4, 6, 3, 3))


@pytest.mark.parametrize("bad", [0, -3])
def test_ghost_batch_size_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="ghost_batch_size"):
        tnn.GhostBatchNorm2d(4, bad)
    with pytest.raises(TypeError, match="ghost_batch_size"):
        tnn.GhostBatchNorm2d(4, 2.0)  # type: ignore[arg-type]


def test_state_dict_matches_batchnorm() -> None:
    layer, native = make_pair("2d", 4)
    assert isinstance(layer, nn.modules.batchnorm._NormBase)
    assert list(layer.state_dict()) == list(native.state_dict())
    layer.load_state_dict(nn.BatchNorm2d(5, dtype=DTYPE).state_dict())  # strict
    native.load_state_dict(layer.state_dict())


def test_ghost_layers_survive_convert_sync_batchnorm() -> None:
    """convert_sync_batchnorm swaps every _BatchNorm; it used to undo convert_batchnorm."""
    model = tnn.convert_batchnorm(ConvNet(dropout=0.0).to(DTYPE), ghost_batch_size=4)
    model.features.append(nn.BatchNorm2d(4, dtype=DTYPE))  # a native one, converted
    ghosts = [m for m in model.modules() if isinstance(m, ghost_module.GhostBatchNormBase)]
    assert len(ghosts) == 3
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert [m for m in synced.modules() if isinstance(m, ghost_module.GhostBatchNormBase)] == ghosts
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 1
    assert isinstance(synced.features[-1], nn.SyncBatchNorm)
    frozen = tnn.freeze_batchnorm(synced)  # ghost layers still count as BatchNorm here
    assert all(not m.training for m in ghosts) and not frozen.features[-1].training


def test_non_contiguous_and_channels_last_inputs(layout: str) -> None:
    layer, _ = make_pair("2d", 3)
    x = input_for("2d", 9)
    expected = copy.deepcopy(layer)(x)
    channels_last = x.to(memory_format=torch.channels_last)
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)
    for variant in (channels_last, transposed):
        assert relative_difference(copy.deepcopy(layer)(variant), expected) <= EXACT


# --------------------------------------------------------------------------- converters


class ConvNet(nn.Module):
    """Conv/BN/dropout classifier for ``(N, 2, 4, 4)`` inputs.

    Layers feeding a BatchNorm have no bias: BatchNorm subtracts it again, so
    its gradient is zero up to rounding and a relative comparison is meaningless.
    """

    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Dropout2d(dropout),
            nn.Conv2d(4, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4, momentum=None),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(64, 8, bias=False),
            nn.BatchNorm1d(8),
            nn.Linear(8, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_convert_batchnorm_keeps_parameters_buffers_and_flags() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm1d(3, momentum=None),
        nn.BatchNorm2d(3, eps=1e-3, affine=False),
        nn.BatchNorm3d(3, track_running_stats=False),
    ).to(DTYPE)
    model.train()
    model[0](randn(8, 3))
    model[1].eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    objects = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}
    old_layers = list(model)

    converted = tnn.convert_batchnorm(model, ghost_batch_size=2)

    assert converted is model
    assert [type(m) for m in model] == [
        tnn.GhostBatchNorm1d,
        tnn.GhostBatchNorm2d,
        tnn.GhostBatchNorm3d,
    ]
    for old, new in zip(old_layers, model, strict=True):
        for attribute in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(new, attribute) == getattr(old, attribute), attribute
        assert new.training == old.training
        assert new.ghost_batch_size == 2
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for name, tensor in after.items():
        assert tensor is objects[name], name  # same objects: optimizers keep working
        assert torch.equal(tensor, before[name]) and tensor.dtype == before[name].dtype


def test_convert_batchnorm_keeps_the_device() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3, device="meta", dtype=torch.float16))
    tnn.convert_batchnorm(model, 4)
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "meta", name
    assert model[0].weight.dtype == torch.float16


def test_convert_batchnorm_root_shared_and_nested() -> None:
    root = nn.BatchNorm2d(3)
    assert isinstance(tnn.convert_batchnorm(root, 4), tnn.GhostBatchNorm2d)
    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Sequential(shared), shared)
    tnn.convert_batchnorm(model, 4)
    assert isinstance(model[1], tnn.GhostBatchNorm1d) and model[0][0] is model[1]
    ghost = model[1]
    assert tnn.convert_batchnorm(model, 8)[1] is ghost  # ghost layers are left alone


@pytest.mark.parametrize(
    "layer, hint",
    [(nn.SyncBatchNorm(3), "convert_sync_batchnorm"), (nn.LazyBatchNorm2d(), "forward pass")],
)
def test_convert_batchnorm_rejects_what_it_cannot_swap(layer: nn.Module, hint: str) -> None:
    with pytest.raises(TypeError, match=hint) as error:
        tnn.convert_batchnorm(nn.Sequential(nn.Identity(), layer), 4)
    assert "module '1'" in str(error.value)


def test_freeze_batchnorm_uses_and_keeps_running_statistics() -> None:
    model = tnn.convert_batchnorm(ConvNet(dropout=0.0).to(DTYPE), 4)
    model.features[1] = nn.BatchNorm2d(4, dtype=DTYPE)  # a native one too
    model(randn(8, 2, 4, 4))  # non-trivial running statistics
    state = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model).eval()

    tnn.freeze_batchnorm(model)
    model.train()
    x = randn(6, 2, 4, 4, seed=1)
    out = model(x)
    assert relative_difference(out, reference(x)) <= EXACT
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    out.sum().backward()
    assert model.features[1].weight.grad is not None  # affine parameters still train

    for frozen in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        frozen.train()
        frozen(x)
        assert torch.equal(frozen.features[1].running_mean, state["features.1.running_mean"])

    tnn.unfreeze_batchnorm(model)
    assert model.features[1].training
    model(x)
    assert not torch.equal(model.features[1].running_mean, state["features.1.running_mean"])


def test_frozen_state_survives_conversion() -> None:
    model = tnn.freeze_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))
    tnn.convert_batchnorm(model, 2).train()
    before = model[0].running_mean.clone()
    model(torch.randn(4, 3, 2, 2))
    assert torch.equal(model[0].running_mean, before)


def test_freeze_batchnorm_without_running_statistics_raises() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"module '1'.*track_running_stats"):
        tnn.freeze_batchnorm(model)


def test_convert_dropout_types_numbering_and_flags() -> None:
    existing = tnn.SplitInvariantDropout(0.2, seed=9, layer_id=77)
    model = nn.Sequential(
        nn.Dropout(0.1), nn.Sequential(nn.Dropout2d(0.2), existing), nn.Dropout3d(0.4)
    )
    model[2].eval()
    tnn.convert_dropout(model, seed=5)
    layers = [model[0], model[1][0], model[1][1], model[2]]
    assert all(isinstance(m, tnn.SplitInvariantDropout) for m in layers)
    assert layers[2] is existing
    assert [m.layer_id for m in layers] == [0, 1, 2, 3]
    assert {m.seed for m in layers} == {5}
    assert [m.channelwise for m in layers] == [False, True, False, True]
    assert [m.p for m in layers] == [0.1, 0.2, 0.2, 0.4]
    assert [m.training for m in layers] == [True, True, True, False]


def test_convert_dropout_rejects_alpha_dropout() -> None:
    with pytest.raises(TypeError, match=r"AlphaDropout.*nn\.Dropout"):
        tnn.convert_dropout(nn.Sequential(nn.AlphaDropout(0.1)))


def tiny_transformers() -> dict[str, nn.Module]:
    """BERT and GPT-2 from small configs: their attention modules hold an nn.Dropout that
    they never call (the attention reads its p for F.dropout / SDPA's dropout_p)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
        )
    )
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=40,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    return {"bert": bert, "gpt2": gpt2}


UNCALLED = {
    "bert": ["encoder.layer.0.attention.self.dropout", "encoder.layer.1.attention.self.dropout"],
    "gpt2": ["transformer.h.0.attn.attn_dropout", "transformer.h.1.attn.attn_dropout"],
}


def converted_dropout_warnings(model: nn.Module, **kwargs: object) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(torch.randint(0, 40, (2, 6)), **kwargs)
    return [str(w.message) for w in record if "converted dropout" in str(w.message)]


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_convert_dropout_warns_about_modules_their_parent_never_calls(name: str) -> None:
    model = tnn.convert_dropout(tiny_transformers()[name].train())
    copied = copy.deepcopy(model)
    messages = converted_dropout_warnings(model)
    assert [m.split("'")[1] for m in messages] == UNCALLED[name]
    assert all("Fix: set that probability to 0" in m for m in messages)
    assert converted_dropout_warnings(model) == []  # once: the watch is gone
    assert len(converted_dropout_warnings(copied)) == 2  # a copy carries its own watch
    restored = pickle.loads(pickle.dumps(tnn.convert_dropout(tiny_transformers()[name])))
    assert len(converted_dropout_warnings(restored)) == 2


def test_convert_dropout_watch_is_quiet_when_dropout_runs_or_cannot() -> None:
    model = tnn.convert_dropout(tiny_transformers()["bert"])
    model.eval()
    assert converted_dropout_warnings(model) == []  # eval mode: nothing to judge yet
    model.train()
    for layer in model.encoder.layer:
        layer.attention.self.truebatch_attention = object()  # made split-invariant elsewhere
    assert converted_dropout_warnings(model) == []
    plain = tnn.convert_dropout(ConvNet().to(DTYPE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain(randn(4, 2, 4, 4))
    zero = tnn.convert_dropout(tiny_transformers()["bert"])
    for layer in zero.encoder.layer:
        layer.attention.self.dropout.p = 0.0
    assert converted_dropout_warnings(zero) == []


# --------------------------------------------------------------------------- dropout

MASK64 = (1 << 64) - 1


def reference_mix(value: int) -> int:
    """splitmix64's finalizer on Python ints (Steele, Lea & Flood; also Java's SplittableRandom)."""
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def reference_keep(
    p: float, seed: int, window: int, layer_id: int, sample: int, element: int, elements: int
) -> bool:
    """The documented mask of a sample's element, written out with exact integers."""
    row = reference_mix((sample * 0x9E3779B97F4A7C15) & MASK64)
    return reference_keep_row(p, seed, window, layer_id, row, element)


def reference_keep_row(
    p: float, seed: int, window: int, layer_id: int, row: int, element: int
) -> bool:
    """The documented mask of element ``element`` of the row whose hash is ``row``."""
    key = 0x9E3779B97F4A7C15
    for value in (seed, window, layer_id):
        key = reference_mix(key ^ (value & MASK64))
    counter = row + element // 2
    word = reference_mix((counter * 0x9E3779B97F4A7C15 + key) & MASK64)
    half = (word >> (32 * (element % 2))) & 0xFFFFFFFF
    signed = half - (1 << 32) if half >> 31 else half
    return signed < round((1 - p) * 2**32) - 2**31


@pytest.mark.parametrize("padded", [7, 9, 16])
def test_padding_a_sequence_keeps_the_masks_of_its_real_tokens(padded: int) -> None:
    """Micro-batches padded to their own longest sequence (a data collator per
    micro-batch) must draw the big batch's masks on every real token."""
    layer = tnn.SplitInvariantDropout(0.5, seed=3, layer_id=1)
    real = 5
    with _context.micro_batch(window=2, offset=4):
        short = layer(torch.ones(3, real, 6, dtype=DTYPE)) != 0
        long = layer(torch.ones(3, padded, 6, dtype=DTYPE)) != 0
    assert torch.equal(short, long[:, :real])


@pytest.fixture(params=["cpu kernel", "pytorch ops"])
def hash_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Draw masks with truebatch's CPU kernel, or with the int64 tensor ops without it."""
    if request.param == "cpu kernel":
        assert cpu_kernels.available()
    else:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    return request.param


@pytest.mark.parametrize(
    "p, seed, window, layer_id, offset, shape",
    [
        (0.5, 0, 0, 0, 0, (3, 4)),
        (0.3, -7, 12, 2**40, 5, (2, 5)),
        (0.9, 2**63, 1, 3, 2**33, (2, 3)),
        (0.2, 1, 2**62, 7, 2**62, (2, 7)),  # offsets and windows near the int64 limit
    ],
)
def test_mask_is_the_documented_hash(
    p: float,
    seed: int,
    window: int,
    layer_id: int,
    offset: int,
    shape: tuple[int, int],
    hash_by: str,
) -> None:
    layer = tnn.SplitInvariantDropout(p, seed=seed, layer_id=layer_id)
    with _context.micro_batch(window=window, offset=offset):
        kept = layer(torch.ones(shape, dtype=DTYPE)) != 0
    expected = [
        [
            reference_keep(p, seed, window, layer_id, offset + i, e, shape[1])
            for e in range(shape[1])
        ]
        for i in range(shape[0])
    ]
    assert kept.tolist() == expected


@pytest.mark.parametrize("channelwise", [False, True])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scale(p: float, channelwise: bool, hash_by: str) -> None:
    x = torch.ones(256, 4096, 2)
    with _context.micro_batch(window=5, offset=96):
        out = tnn.SplitInvariantDropout(p, seed=1, channelwise=channelwise)(x)
    kept = (out != 0).all(-1) if channelwise else out != 0  # one decision per channel
    n = kept.numel()  # independent keep decisions: Binomial(n, 1 - p) kept
    assert abs(int(kept.sum()) - n * (1 - p)) <= 5 * math.sqrt(n * p * (1 - p))
    assert torch.all((out == 0) | (out == torch.tensor(1 / (1 - p), dtype=torch.float32)))


@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=5),
    st.integers(0, 3),
    st.booleans(),
)
def test_dropout_mask_is_split_invariant(sizes: list[int], window: int, channelwise: bool) -> None:
    layer = tnn.SplitInvariantDropout(0.5, seed=3, channelwise=channelwise)
    x = randn(sum(sizes), 3, 5).requires_grad_()
    with _context.micro_batch(window=window, offset=0):
        full = layer(x)
    (full_grad,) = torch.autograd.grad(full.sum(), x)
    parts, start = [], 0
    for size in sizes:
        with _context.micro_batch(window=window, offset=start):
            parts.append(layer(x[start : start + size]))
        start += size
    (grad,) = torch.autograd.grad(torch.cat(parts).sum(), x)
    assert torch.equal(torch.cat(parts), full)
    assert torch.equal(grad, full_grad)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a != 0) == (b != 0)).double().mean().item()


def test_masks_differ_across_windows_layers_and_seeds() -> None:
    x = torch.ones(64, 256)

    def mask(window: int, layer: tnn.SplitInvariantDropout) -> torch.Tensor:
        with _context.micro_batch(window=window, offset=0):
            return layer(x)

    first, second = tnn.SplitInvariantDropout(0.5), tnn.SplitInvariantDropout(0.5)
    assert first.layer_id != second.layer_id
    # independent masks with p=0.5 agree on half of the elements
    assert abs(agreement(mask(0, first), mask(1, first)) - 0.5) < 0.02
    assert abs(agreement(mask(0, first), mask(0, second)) - 0.5) < 0.02
    reseeded = tnn.SplitInvariantDropout(0.5, seed=1, layer_id=first.layer_id)
    assert abs(agreement(mask(0, first), mask(0, reseeded)) - 0.5) < 0.02
    assert torch.equal(mask(0, first), mask(0, first))


def test_channelwise_dropout_drops_whole_channels(hash_by: str) -> None:
    layer = tnn.SplitInvariantDropout(0.5, channelwise=True)
    out = layer(torch.ones(16, 32, 3, 3))
    per_channel = (out != 0).flatten(2)
    assert torch.all(per_channel.all(-1) | ~per_channel.any(-1))
    assert 0.3 < per_channel.all(-1).double().mean().item() < 0.7
    with pytest.raises(ValueError, match=r"\(N, C, \.\.\.\)"):
        layer(torch.ones(5))


def test_outside_an_accumulator_each_call_draws_a_new_reproducible_mask() -> None:
    x = torch.ones(8, 64)
    rng = torch.get_rng_state()
    first = tnn.SplitInvariantDropout(0.5, seed=4, layer_id=0)
    again = tnn.SplitInvariantDropout(0.5, seed=4, layer_id=0)
    calls = [first(x) for _ in range(3)]
    assert abs(agreement(calls[0], calls[1]) - 0.5) < 0.1
    assert all(torch.equal(a, again(x)) for a in calls)
    with _context.micro_batch(window=1, offset=0):
        assert torch.equal(first(x), calls[1])  # call n uses window n
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not touched


def test_dropout_eval_and_extreme_probabilities() -> None:
    x = randn(4, 6)
    layer = tnn.SplitInvariantDropout(0.5).eval()
    assert layer(x) is x
    assert tnn.SplitInvariantDropout(0.0)(x) is x
    assert torch.equal(tnn.SplitInvariantDropout(1.0)(x), torch.zeros_like(x))


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("in_window", [False, True])
def test_checkpoint_recomputation_draws_the_forward_mask(
    in_window: bool, use_reentrant: bool
) -> None:
    """The recomputation runs in backward, outside the micro-batch context (it used to raise)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), tnn.SplitInvariantDropout(0.5), nn.Linear(6, 2))
    model = model.to(DTYPE)
    x = randn(4, 6).requires_grad_()  # reentrant checkpointing needs an input that does

    def gradient(layer: nn.Module, *, checkpointed: bool) -> list[torch.Tensor]:
        with _context.micro_batch(window=3, offset=5) if in_window else contextlib.nullcontext():
            out = checkpoint(layer, x, use_reentrant=use_reentrant) if checkpointed else layer(x)
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out.square().sum().backward()  # reentrant checkpointing refuses autograd.grad
        return [t.grad.clone() for t in (x, *layer.parameters())]

    for _ in range(2):  # the second forward replaces what a recomputation replays
        plain = gradient(copy.deepcopy(model), checkpointed=False)  # a copy: the same window
        recomputed = gradient(model, checkpointed=True)
        assert all(torch.equal(a, b) for a, b in zip(recomputed, plain, strict=True))


DOCUMENTS = {7: 5, 11: 3, 12: 6, 30: 2}  # document id -> length


def packed(rows: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(document_ids, positions) of rows that hold these documents in this order, padded
    with document -1."""
    ids, positions = torch.full((len(rows), length), -1), torch.zeros(len(rows), length)
    for r, documents in enumerate(rows):
        column = 0
        for doc in documents:
            ids[r, column : column + DOCUMENTS[doc]] = doc
            positions[r, column : column + DOCUMENTS[doc]] = torch.arange(DOCUMENTS[doc])
            column += DOCUMENTS[doc]
    return ids, positions.long()


def token_masks(layer: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> dict:
    """(document, position) -> the layer's output at that token (ones in: the kept scale)."""
    with _context.micro_batch(window=2, offset=0), tnn.token_keys(ids, positions):
        out = layer(torch.ones(*ids.shape, 3, 4, dtype=DTYPE))
    return {
        (int(d), int(t)): out[b, c]
        for (b, c), d, t in zip(
            torch.ones_like(ids).nonzero().tolist(), ids.flatten(), positions.flatten(), strict=True
        )
        if d >= 0
    }


def test_token_keyed_masks_survive_repacking_and_splitting() -> None:
    layer = tnn.SplitInvariantDropout(0.5, seed=1, layer_id=4, key="token")
    first = token_masks(layer, *packed([[7, 11], [12, 30]], 8))
    repacked = token_masks(layer, *packed([[30, 7], [11], [12]], 7))
    assert first.keys() == repacked.keys() and len(first) == sum(DOCUMENTS.values())
    assert all(torch.equal(first[token], repacked[token]) for token in first)
    kept = torch.stack(list(first.values())) != 0
    assert 0.3 < kept.double().mean().item() < 0.7 and not kept.all(-1).all(-1).any()
    ids, positions = packed([[7, 11], [12, 30]], 8)
    with tnn.token_keys(ids[1:], positions[1:]), _context.micro_batch(window=2, offset=1):
        second_row = layer(torch.ones(1, 8, 3, 4, dtype=DTYPE))  # the offset plays no part
    assert all(torch.equal(second_row[0, t], first[12, t]) for t in range(6))
    other_window = tnn.SplitInvariantDropout(0.5, seed=1, layer_id=4, key="token")
    with _context.micro_batch(window=3, offset=0), tnn.token_keys(ids, positions):
        assert not torch.equal(other_window(torch.ones(2, 8, 3, 4, dtype=DTYPE))[0, 0], first[7, 0])


def test_token_keyed_mask_is_the_documented_hash() -> None:
    ids, positions = torch.tensor([[3, 3, 2**40]]), torch.tensor([[0, 1, 7]])
    layer = tnn.SplitInvariantDropout(0.3, seed=5, layer_id=2, key="token")
    with _context.micro_batch(window=9, offset=4), tnn.token_keys(ids, positions):
        kept = (layer(torch.ones(1, 3, 5, dtype=DTYPE)) != 0)[0]
    for t in range(3):
        row = reference_mix((int(ids[0, t]) * 0x9E3779B97F4A7C15 + int(positions[0, t])) & MASK64)
        expected = [reference_keep_row(0.3, 5, 9, 2, row, e) for e in range(5)]
        assert kept[t].tolist() == expected
    assert torch.equal(
        kept, tnn.dropout.token_keep_mask(ids, positions, 5, 0.3, seed=5, window=9, layer_id=2)[0]
    )


def test_token_keyed_dropout_refuses_what_it_cannot_key() -> None:
    layer = tnn.SplitInvariantDropout(0.5, key="token")
    with pytest.raises(RuntimeError, match="token_keys"):
        layer(torch.ones(2, 3, 4))
    ids = torch.zeros(2, 5, dtype=torch.long)
    with tnn.token_keys(ids, ids), pytest.raises(ValueError, match=r"\(B, T\) = \(2, 5\)"):
        layer(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="`positions` got shape"):
        tnn.token_keys(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        tnn.token_keys(torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="`key` got"):
        tnn.SplitInvariantDropout(0.5, channelwise=True, key="token")


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_recomputation_after_two_different_forwards_raises(use_reentrant: bool) -> None:
    """Which forward is recomputed is unknown; replaying the wrong mask would be silent."""
    model = nn.Sequential(nn.Linear(6, 6), tnn.SplitInvariantDropout(0.5)).to(DTYPE)
    x = randn(4, 6).requires_grad_()
    first = checkpoint(model, x, use_reentrant=use_reentrant)
    checkpoint(model, x, use_reentrant=use_reentrant)  # outside a window: another mask
    with pytest.raises(RuntimeError, match="forwards with different masks"):
        first.sum().backward()


class TinyTransformer(nn.Module):
    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        self.embed, self.blocks = (
            nn.Linear(3, 8),
            nn.ModuleList([CheckpointedBlock(), CheckpointedBlock()]),
        )
        self.head, self.use_reentrant = nn.Linear(8, 4), use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            if self.use_reentrant is None:
                h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=self.use_reentrant)
        return self.head(h).mean(1)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointed_transformer_with_split_invariant_dropout_is_exact(
    use_reentrant: bool,
) -> None:
    """Accumulator.step_window over uneven micro-batches of a checkpointed model vs the plain
    full-batch loop on the same model without checkpointing, two windows, float64."""
    generator = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(12, 5, 3, generator=generator, dtype=DTYPE), torch.randint(0, 4, (12,)))
        for _ in range(2)
    ]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = TinyTransformer(use_reentrant=None).to(DTYPE)
    model = copy.deepcopy(reference)
    model.use_reentrant = use_reentrant
    for net in (reference, model):
        tnn.convert_dropout(net, seed=7)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    for window, (x, y) in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        with _context.micro_batch(window=window, offset=0):
            F.cross_entropy(reference(x), y).backward()
        optimizer.step()
    acc = tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.5))
    for x, y in batches:
        acc.step_window([(x[a:b], y[a:b]) for a, b in ((0, 3), (3, 8), (8, 12))], summed_loss)
    assert tb.max_relative_difference(list(model.parameters()), list(reference.parameters())) <= (
        EXACT
    )
    moved = tb.max_relative_difference(
        list(model.parameters()), list(TinyTransformer(None).to(DTYPE).parameters())
    )
    assert moved > 1e-3  # the control: the weights did move


SPLITS = [[16], [4, 4, 4, 4], [8, 8], [3, 5, 8], [1, 15]]


def split_outputs(layer: nn.Module, x: torch.Tensor, sizes: list[int], window: int) -> torch.Tensor:
    outputs, start = [], 0
    for size in sizes:
        with _context.micro_batch(window=window, offset=start):
            outputs.append(layer(x[start : start + size]))
        start += size
    return torch.cat(outputs)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("channelwise", [False, True])
def test_compiled_dropout_draws_the_eager_masks(backend: str, channelwise: bool) -> None:
    """Every micro-batch after the first used to crash dynamo (64-bit hash on a symbolic offset)."""
    torch._dynamo.reset()
    layer = tnn.SplitInvariantDropout(0.5, seed=3, layer_id=1, channelwise=channelwise)
    compiled = torch.compile(layer, backend=backend)
    x = randn(16, 3, 5).requires_grad_()
    for window in range(2):
        expected = split_outputs(layer, x, [16], window)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x)
        for sizes in SPLITS:
            out = split_outputs(compiled, x, sizes, window)
            (grad,) = torch.autograd.grad(out.sum(), x)
            assert torch.equal(out, expected), sizes
            assert torch.equal(grad, expected_grad), sizes
    twin = tnn.SplitInvariantDropout(0.5, seed=3, layer_id=1, channelwise=channelwise)
    for _ in range(3):  # outside an Accumulator: a new mask per call, as in eager
        assert torch.equal(compiled(x), twin(x))


def test_compiled_dropout_with_inductor_matches_eager() -> None:
    torch._dynamo.reset()
    layer = nn.Sequential(nn.Linear(6, 6), tnn.SplitInvariantDropout(0.3, seed=1, layer_id=0))
    layer = layer.to(DTYPE)
    compiled = torch.compile(layer)
    x = randn(12, 6)
    for window in range(2):
        expected = split_outputs(layer, x, [12], window)
        for sizes in ([12], [4, 8], [4, 4, 4]):
            assert torch.equal(split_outputs(compiled, x, sizes, window) != 0, expected != 0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_token_keyed_dropout_draws_the_eager_masks(backend: str) -> None:
    torch._dynamo.reset()
    layer = tnn.SplitInvariantDropout(0.4, seed=2, layer_id=3, key="token")
    compiled = torch.compile(layer, backend=backend)
    ids, positions = packed([[7, 11], [12, 30]], 8)
    x = randn(2, 8, 5)
    for window in range(2):
        with _context.micro_batch(window=window, offset=0), tnn.token_keys(ids, positions):
            assert torch.equal(compiled(x), layer(x))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_ghost_batchnorm_is_exact(backend: str) -> None:
    torch._dynamo.reset()
    layer, _ = make_pair("2d", 2)
    x = input_for("2d", 12)
    reference = copy.deepcopy(layer)
    expected, expected_grads = run_split(reference, x, [12])
    for sizes in ([4, 4, 4], [8, 4], [2, 6, 4], [12]):
        ours = copy.deepcopy(layer)
        out, grads = run_split(torch.compile(ours, backend=backend), x, sizes)
        assert relative_difference(out, expected) <= EXACT
        assert tb.max_relative_difference(grads, expected_grads) <= EXACT
        assert_same_state(ours, reference)


@pytest.mark.parametrize("p, error", [(-0.1, ValueError), (1.5, ValueError), ("0.1", TypeError)])
def test_dropout_probability_is_validated(p: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="`p` got"):
        tnn.SplitInvariantDropout(p)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- whole models


def window_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batch_size: int, window: int
) -> list[torch.Tensor]:
    """Sum over micro-batches of the gradient of the summed loss, run under the context."""
    model.zero_grad(set_to_none=True)
    for start in range(0, len(x), micro_batch_size):
        stop = start + micro_batch_size
        with _context.micro_batch(window=window, offset=start):
            loss = F.cross_entropy(model(x[start:stop]), y[start:stop], reduction="sum")
        loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def split_differences(model: nn.Module, ghost: int, chunk_counts: list[int]) -> list[float]:
    """Worst relative gradient / buffer difference to the full batch, per micro-batch size."""
    batch = 8 * ghost
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 2, 4, 4, generator=generator, dtype=DTYPE)
    y = torch.randint(0, 3, (batch,), generator=generator)
    full = copy.deepcopy(model)
    reference = [window_gradients(full, x, y, batch, window=w) for w in range(2)]
    worst = []
    for chunks in chunk_counts:
        split = copy.deepcopy(model)
        grads = [window_gradients(split, x, y, chunks * ghost, window=w) for w in range(2)]
        differences = [
            relative_difference(a, b)
            for window, full_window in zip(grads, reference, strict=True)
            for a, b in zip(window, full_window, strict=True)
        ]
        buffers = zip(split.state_dict().items(), full.state_dict().values(), strict=True)
        for (name, ours), theirs in buffers:
            assert ours.dtype == theirs.dtype, name
            differences.append(relative_difference(ours.double(), theirs.double()))
        worst.append(max(differences))
    return worst


def test_converted_cnn_gives_full_batch_gradients_and_statistics() -> None:
    torch.manual_seed(0)
    model = ConvNet().to(DTYPE)
    model = tnn.convert_dropout(tnn.convert_batchnorm(model, ghost_batch_size=4), seed=0)
    for worst in split_differences(model, ghost=4, chunk_counts=[1, 2, 4, 8]):
        assert worst <= EXACT


def test_unconverted_cnn_is_not_split_invariant() -> None:
    """The control: the same check does catch BatchNorm and dropout."""
    torch.manual_seed(0)
    for worst in split_differences(ConvNet().to(DTYPE), ghost=4, chunk_counts=[1, 4]):
        assert worst > 1e-3


def converted_convnet() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ConvNet().to(DTYPE)
    return tnn.convert_dropout(tnn.convert_batchnorm(model, ghost_batch_size=4), seed=0)


def image_batches(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 2, 4, 4, generator=generator, dtype=DTYPE),
            torch.randint(0, 3, (n,), generator=generator),
        )
        for n in sizes
    ]


def summed_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")


def full_batch_training(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """The plain loop: one forward of each whole batch (window ``w``), mean loss, SGD step."""
    model = converted_convnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for window, (x, y) in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        with _context.micro_batch(window=window, offset=0):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return model


def assert_same_model(model: nn.Module, reference: nn.Module) -> None:
    for (name, ours), theirs in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert relative_difference(ours.double(), theirs.double()) <= EXACT, name


@pytest.mark.parametrize("chunks", [1, 2, 4, 8])
def test_accumulator_matches_full_batch_over_several_windows(chunks: int) -> None:
    """Several optimizer steps: every parameter and buffer as with the whole batch at once.

    The batches of 34 and 30 samples end with a short ghost batch (2 samples), and
    a micro-batch of ``chunks`` ghost batches leaves a short last micro-batch.
    """
    batches = image_batches([34, 32, 30])
    model = converted_convnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    acc = tb.Accumulator(model, optimizer, micro_batch_size=4 * chunks)
    for batch in batches:
        acc.step(batch, summed_loss)
    assert_same_model(model, full_batch_training(batches))


def test_accumulator_with_unequal_micro_batches_matches_full_batch() -> None:
    """step_window with micro-batches of 8, 4, 16 and 6 samples: offsets follow the sizes."""
    batches = image_batches([34, 34])
    model = converted_convnet()
    acc = tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for x, y in batches:
        acc.step_window(
            [(x[a:b], y[a:b]) for a, b in ((0, 8), (8, 12), (12, 28), (28, 34))], summed_loss
        )
    assert_same_model(model, full_batch_training(batches))


def test_accumulator_refuses_micro_batches_that_split_a_ghost_batch() -> None:
    model = converted_convnet()
    acc = tb.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=6)
    with pytest.raises(ValueError, match=r"got sample 6.*multiple of ghost_batch_size=4"):
        acc.step(image_batches([12])[0], summed_loss)
