"""The equivalence checker: tb.check, its Report, tb.testing and ``truebatch check``.

Culprits are planted at known paths of :class:`check_factories.Net`; each must
be found at that path and nowhere else (not in the modules downstream of it).
Reported gradient differences are compared with a plain reference computed
here: the full-batch gradient and the micro-batch loop written out by hand.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import truebatch as tb
import truebatch.cli
import truebatch.nn as tbnn
from check_factories import BATCH, BatchCentering, batch, mean_loss, net, sum_loss
from models import TASKS, image_batch, seeded
from truebatch.check import default_micro_batch_sizes

TOL64, TOL32 = 1e-12, 1e-5
# The documented floor of a tensor's gradient scale: kappa * ||whole gradient||,
# kappa = min(1, 100 * eps / tolerance); in float64 100 * 2**-52 / 1e-12.
KAPPA64 = 100 * 2.0**-52 / 1e-12


def plain_gradients(model: nn.Module, loss, micro_batches: list, n: int) -> dict:
    """``(1/n) * sum_j d(loss_sum_j)/d(params)`` by a hand-written loop on a copy."""
    copied = copy.deepcopy(model)
    for micro_batch in micro_batches:
        (loss(copied, micro_batch) / n).backward()
    return {name: p.grad for name, p in copied.named_parameters()}


def reference_difference(full: dict, other: dict) -> float:
    """Largest ``||g_other - g_full|| / max(||g_full||, kappa * ||g_full||_all)``."""
    floor = KAPPA64 * math.sqrt(sum(g.norm().item() ** 2 for g in full.values()))
    return max((other[n] - g).norm().item() / max(g.norm().item(), floor) for n, g in full.items())


def pieces(xy: tuple, size: int) -> list:
    return list(zip(*(t.split(size) for t in xy), strict=True))


def module_findings(report: tb.Report) -> dict[str, str]:
    return {f.module: f.kind for f in report.findings if f.kind != "buffer_mismatch"}


# ------------------------------------------------------------ clean models


def test_clean_mlp_is_equivalent_for_every_default_split():
    report = tb.check(net(), sum_loss, batch())
    assert report.equivalent, report
    assert sorted(report.max_relative_difference) == [1, 2, 5, 6]
    assert all(v <= TOL64 for v in report.max_relative_difference.values())
    assert report.findings == []
    assert report.tolerance == TOL64 and report.dtype == "float64"


def test_clean_cnn_is_equivalent():
    report = tb.check(seeded(TASKS["cnn"].model), TASKS["cnn"].loss_sum, image_batch(6))
    assert report.equivalent, report
    assert sorted(report.max_relative_difference) == [1, 2, 3, 4]


def test_token_lm_with_count_tokens_and_tuple_outputs_is_equivalent():
    # The GRU returns (output, h_n): h_n is (layers, batch, hidden) and is skipped.
    task = TASKS["gru_lm"]
    model, data = seeded(task.model), task.batch(9, 0)
    report = tb.check(model, task.loss_sum, data, micro_batch_sizes=[2, 4], count=task.count)
    assert report.equivalent, report


def test_float32_uses_its_tolerance():
    model = net().to(torch.float32)
    report = tb.check(model, sum_loss, batch(), micro_batch_sizes=[2, 5], dtype=torch.float32)
    assert report.equivalent, report
    assert report.tolerance == TOL32 and report.dtype == "float32"
    assert max(report.max_relative_difference.values()) <= TOL32


def test_loss_returning_sum_and_count_is_equivalent():
    def loss_with_count(model, micro_batch):
        return sum_loss(model, micro_batch), micro_batch[0].shape[0]

    assert tb.check(net(), loss_with_count, batch(), micro_batch_sizes=[5]).equivalent


# ------------------------------------------------------------ planted culprits

CULPRITS = [
    pytest.param({"batchnorm": True}, "encoder.2.bn", "batchnorm", id="batchnorm"),
    pytest.param({"dropout": 0.3}, "head.drop", "dropout", id="dropout"),
    pytest.param({"noise": True}, "blocks.0.noise", "random_op", id="random_op"),
    pytest.param({"mix": True}, "blocks.1.mix", "mixes_samples", id="mixes_samples"),
]


@pytest.mark.parametrize(("culprit", "path", "kind"), CULPRITS)
def test_a_planted_culprit_is_found_at_its_path_and_only_there(culprit, path, kind):
    report = tb.check(net(**culprit), sum_loss, batch())
    assert not report.equivalent
    assert module_findings(report) == {path: kind}, report
    finding = next(f for f in report.findings if f.kind == kind)
    assert finding.effect > 1e-3 and "tb." in finding.fix


def test_all_culprits_at_once_are_each_found_at_their_path():
    # Noise and BatchCentering sit downstream of the BatchNorm: found by the seed
    # comparison and by the eval-mode comparison, not hidden behind it.
    model = net(batchnorm=True, noise=True, mix=True, dropout=0.3)
    report = tb.check(model, sum_loss, batch(), micro_batch_sizes=[4, 6])
    assert module_findings(report) == {
        "encoder.2.bn": "batchnorm",
        "blocks.0.noise": "random_op",
        "blocks.1.mix": "mixes_samples",
        "head.drop": "dropout",
    }, report
    assert [f.module for f in report.findings] == [
        "encoder.2.bn",
        "blocks.0.noise",
        "blocks.1.mix",
        "head.drop",
        "encoder.2.bn",  # its buffers, reported after the modules
    ]


def test_a_mean_loss_behind_batchnorm_and_dropout_is_still_found():
    # They change every module output downstream; in eval mode they do not.
    report = tb.check(net(batchnorm=True, dropout=0.3), mean_loss, batch(), micro_batch_sizes=[3])
    assert module_findings(report) == {
        "encoder.2.bn": "batchnorm",
        "head.drop": "dropout",
        "loss_fn": "loss_not_additive",
    }
    (loss,) = [f for f in report.findings if f.kind == "loss_not_additive"]
    # 4 micro-batch means sum to 4x the full mean (eval mode: no batch statistics).
    assert loss.effect == pytest.approx(3.0, rel=1e-12) and "eval mode" in loss.measure


class RandomScale(nn.Module):
    """A train-only random op that is not a dropout: one random factor per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + 0.1 * torch.randn(())) if self.training else x


@pytest.mark.parametrize(
    ("mix", "loss", "hidden"),
    [
        pytest.param(False, mean_loss, {"loss_fn": "loss_not_additive"}, id="mean_loss"),
        pytest.param(True, sum_loss, {"blocks.1.mix": "mixes_samples"}, id="mixes_samples"),
    ],
)
def test_what_a_custom_train_only_random_op_hides_is_found_in_eval_mode(mix, loss, hidden):
    # Each micro-batch draws its own factor, so every output downstream differs in
    # train mode; the eval-mode comparison is what sees past it.
    model = net(mix=mix)
    model.blocks[0].noise = RandomScale()
    report = tb.check(model, loss, batch(), micro_batch_sizes=[4])
    assert module_findings(report) == {"blocks.0.noise": "random_op", **hidden}, report


def test_a_lone_dropout_is_found_even_when_this_run_happens_to_agree():
    # On the CPU generator, a single dropout draws the same numbers whole or
    # split, so the gradients agree here; on CUDA, or with another random op,
    # they would not. The report must not call it equivalent.
    report = tb.check(net(dropout=0.3), sum_loss, batch())
    assert module_findings(report) == {"head.drop": "dropout"}
    assert not report.equivalent


def test_mean_loss_is_not_additive_with_its_measured_effect():
    report = tb.check(net(), mean_loss, batch())
    assert module_findings(report) == {"loss_fn": "loss_not_additive"}
    (finding,) = report.findings
    # Micro-batches of 1: the sum of 12 per-sample means is 12x the full mean.
    assert finding.effect == pytest.approx(BATCH - 1, rel=1e-12)
    assert "reduction='sum'" in finding.fix and "micro-batch size 1" in finding.measure


def test_batchnorm_buffers_are_reported_by_name():
    report = tb.check(net(batchnorm=True), sum_loss, batch())
    (finding,) = [f for f in report.findings if f.kind == "buffer_mismatch"]
    assert finding.module == "encoder.2.bn"
    assert "running_mean" in finding.measure and "running_var" in finding.measure
    assert "tb.nn.convert_batchnorm" in finding.fix


def test_a_custom_buffer_updated_per_forward_is_named():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

        def forward(self, x):
            self.calls += 1
            return x

    class CountingBlock(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin
            self.counter = Counter()

        def forward(self, x):
            return torch.tanh(self.counter(self.lin(x)))

    # A module, not a lambda assigned to forward: a lambda closing over the user's
    # model would run the user's layers from inside every copy the check makes.
    model = net()
    model.blocks[0] = CountingBlock(model.blocks[0].lin)
    report = tb.check(model, sum_loss, batch(), micro_batch_sizes=[4])
    assert [(f.module, f.kind) for f in report.findings] == [
        ("blocks.0.counter", "buffer_mismatch")
    ]
    # 3 micro-batches count 3 calls where the full batch counts 1: relative difference 2.
    assert report.findings[0].effect == pytest.approx(2.0)
    assert "calls" in report.findings[0].measure and not report.equivalent
    assert model.blocks[0].counter.calls == 0


def test_a_random_op_in_the_model_itself_is_reported_by_class_name():
    class NoisyRoot(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(6, 3)

        def forward(self, x):
            return self.inner(x + torch.randn_like(x))

    report = tb.check(NoisyRoot().double(), sum_loss, batch(), micro_batch_sizes=[6])
    assert module_findings(report) == {"NoisyRoot": "random_op"}


class Pair(nn.Module):
    """Returns a dict: a batch tensor, a scalar and a tensor without the batch dim."""

    def __init__(self, mix: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.mix = mix

    def forward(self, x):
        h = self.lin(x)
        if self.mix:
            h = h - h.mean(0)
        return {"h": h, "aux": h.pow(2).mean(), "table": self.lin.weight * 2}


class WithPair(nn.Module):
    def __init__(self, mix: bool) -> None:
        super().__init__()
        self.pair = Pair(mix)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.pair(x)["h"])


@pytest.mark.parametrize("mix", [False, True])
def test_dict_outputs_compare_their_batch_tensors_only(mix):
    report = tb.check(WithPair(mix).double(), sum_loss, batch(), micro_batch_sizes=[5])
    assert report.equivalent is not mix
    assert module_findings(report) == ({"pair": "mixes_samples"} if mix else {})


def test_a_module_called_twice_is_compared_call_by_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)
            self.center = BatchCentering()
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            return self.out(self.lin(self.center(self.lin(x))))

    report = tb.check(Twice().double(), sum_loss, batch(), micro_batch_sizes=[5])
    assert module_findings(report) == {"center": "mixes_samples"}


# ------------------------------------------------------- numbers vs reference


@pytest.mark.parametrize(
    ("model", "loss"),
    [
        pytest.param(net(), mean_loss, id="mean_loss"),
        pytest.param(net(batchnorm=True), sum_loss, id="batchnorm"),
        pytest.param(net(mix=True), sum_loss, id="mixes_samples"),
    ],
)
def test_reported_differences_match_a_plain_reference(model, loss):
    xy = batch()
    report = tb.check(model, loss, xy, micro_batch_sizes=[2, 5])
    full = plain_gradients(model, loss, [xy], BATCH)
    for size in (2, 5):
        expected = reference_difference(full, plain_gradients(model, loss, pieces(xy, size), BATCH))
        assert report.max_relative_difference[size] == pytest.approx(expected, rel=1e-9)
    assert report.worst_parameters[0][1] == max(report.max_relative_difference.values())


@settings(max_examples=8)
@given(sizes=st.lists(st.integers(1, BATCH - 1), min_size=1, max_size=3, unique=True))
def test_any_split_of_a_mean_loss_matches_the_reference(sizes):
    xy = batch()
    report = tb.check(net(), mean_loss, xy, micro_batch_sizes=sizes)
    full = plain_gradients(net(), mean_loss, [xy], BATCH)
    for size in sizes:
        expected = reference_difference(
            full, plain_gradients(net(), mean_loss, pieces(xy, size), BATCH)
        )
        assert report.max_relative_difference[size] == pytest.approx(expected, rel=1e-9)
    assert report.equivalent is False


# --------------------------------------------------------------- the fixes


def test_converted_batchnorm_and_dropout_are_equivalent():
    model = net(batchnorm=True, dropout=0.3)
    model = tbnn.convert_dropout(tbnn.convert_batchnorm(model, ghost_batch_size=2), seed=0)
    report = tb.check(model, sum_loss, batch(), micro_batch_sizes=[4, 6])
    assert report.equivalent, report
    # The default sizes follow the ghost batch size: multiples of 2 only.
    assert sorted(tb.check(model, sum_loss, batch()).max_relative_difference) == [2, 4, 6, 8]


def test_frozen_or_eval_batchnorm_is_equivalent():
    frozen = tbnn.freeze_batchnorm(net(batchnorm=True))
    assert tb.check(frozen, sum_loss, batch(), micro_batch_sizes=[5]).equivalent
    assert tb.check(net(batchnorm=True).eval(), sum_loss, batch(), micro_batch_sizes=[5]).equivalent


def test_ghost_batchnorm_with_sizes_that_split_a_ghost_batch_is_refused():
    model = tbnn.convert_batchnorm(net(batchnorm=True), ghost_batch_size=4)
    with pytest.raises(ValueError, match=r"not multiples of 4"):
        tb.check(model, sum_loss, batch(), micro_batch_sizes=[2])


# --------------------------------------------------------- user state intact


def test_the_users_model_grads_buffers_and_rng_are_untouched():
    model = net(batchnorm=True, noise=True, dropout=0.3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    report = tb.check(model, sum_loss, batch())
    assert not report.equivalent
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert model.training and model.encoder[2].bn.running_mean.abs().sum() == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_rng_is_untouched():
    model = net(noise=True).cuda()
    xy = tuple(t.cuda() for t in batch())
    rng = torch.cuda.get_rng_state()
    tb.check(model, sum_loss, xy)
    assert torch.equal(torch.cuda.get_rng_state(), rng)


def test_a_ddp_wrapped_model_is_checked_through_its_module(tmp_path):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        wrapped = nn.parallel.DistributedDataParallel(net(mix=True))
        report = tb.check(wrapped, sum_loss, batch(), micro_batch_sizes=[6])
    finally:
        torch.distributed.destroy_process_group()
    assert module_findings(report) == {"blocks.1.mix": "mixes_samples"}


# ------------------------------------------------------ the printed report


def test_the_printed_report_is_a_table_with_paths_kinds_effects_and_fixes():
    report = tb.check(net(batchnorm=True), sum_loss, batch())
    text = str(report)
    assert text.startswith("truebatch check: NOT equivalent (batch of 12, float64")
    lines = text.splitlines()
    header = next(line for line in lines if "micro-batch size" in line)
    rows = lines[lines.index(header) + 1 : lines.index(header) + 5]
    assert [row.split()[0] for row in rows] == ["2", "3", "5", "6"]
    assert all(row.rstrip().endswith("FAIL") for row in rows)
    finding_line = next(line for line in lines if line.split()[:2] == ["encoder.2.bn", "batchnorm"])
    effect = float(finding_line.split()[2])
    assert effect == pytest.approx(report.findings[0].effect, rel=1e-2)
    assert any("fix: tb.nn.convert_batchnorm" in line for line in lines)


def test_to_dict_is_json_serializable_and_complete():
    report = tb.check(net(batchnorm=True), sum_loss, batch())
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["equivalent"] is False and data["batch_size"] == BATCH
    assert set(data["max_relative_difference"]) == {"2", "3", "5", "6"}
    assert {f["kind"] for f in data["findings"]} == {"batchnorm", "buffer_mismatch"}
    assert data["findings"][0]["module"] == "encoder.2.bn"
    assert data["worst_parameters"][0]["relative_difference"] > 0


def test_to_dict_writes_non_finite_numbers_as_strings():
    finding = tb.Finding("x", "mixes_samples", math.inf, "m", "f")
    report = tb.Report(False, TOL64, "float64", 4, {1: math.nan}, [("w", math.inf)], [finding])
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["max_relative_difference"] == {"1": "nan"}
    assert data["findings"][0]["effect"] == "inf"


# ------------------------------------------------------- sizes and arguments


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((12,), [1, 2, 5, 6]),
        ((12, 1, 2), [2, 3, 5, 6]),
        ((12, 2), [2, 4, 6, 8]),
        ((6,), [1, 2, 3, 4]),
        ((7,), [1, 2, 4]),
        ((2,), [1]),
        ((1,), []),
    ],
)
def test_default_micro_batch_sizes(args, expected):
    assert default_micro_batch_sizes(*args) == expected


@given(batch=st.integers(2, 300), unit=st.integers(1, 8), minimum=st.integers(1, 3))
def test_default_sizes_are_allowed_and_include_an_uneven_split(batch, unit, minimum):
    sizes = default_micro_batch_sizes(batch, unit, minimum)
    assert sizes == sorted(set(sizes)) and len(sizes) <= 4
    for s in sizes:
        assert 1 <= s < batch and s % unit == 0
        assert s >= minimum and (batch % s == 0 or batch % s >= minimum)
    allowed_uneven = [s for s in range(unit, batch, unit) if s >= minimum and batch % s >= minimum]
    if allowed_uneven:
        assert any(batch % s for s in sizes)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"micro_batch_sizes": [0]}, ValueError, r"`micro_batch_sizes` got \[0\].*positive ints"),
        ({"micro_batch_sizes": [12]}, ValueError, "do not split a batch of 12 samples"),
        ({"micro_batch_sizes": [2.5]}, ValueError, "expected positive ints"),
        ({"dtype": torch.float16}, ValueError, "`dtype` got torch.float16; expected torch.float64"),
        ({"model": "not a model"}, TypeError, "`model` got str; expected a torch.nn.Module"),
        ({"loss_fn": 3}, TypeError, "`loss_fn` got int; expected a callable"),
        ({"count": 3}, TypeError, r"count.*callable"),
        ({"batch": torch.zeros(1, 6)}, ValueError, "`batch` got 1 samples, which cannot be split"),
    ],
)
def test_bad_arguments_say_what_to_change(kwargs, error, match):
    arguments = {"model": net(), "loss_fn": sum_loss, "batch": batch(), **kwargs}
    with pytest.raises(error, match=match):
        tb.check(**arguments)


# --------------------------------------------------------------- tb.testing


def test_assert_accumulation_equivalent_returns_the_report_or_raises_it():
    report = tb.testing.assert_accumulation_equivalent(net(), sum_loss, batch(), [5])
    assert isinstance(report, tb.Report) and report.equivalent
    with pytest.raises(AssertionError) as raised:
        tb.testing.assert_accumulation_equivalent(net(mix=True), sum_loss, batch(), [5])
    assert "truebatch check: NOT equivalent" in str(raised.value)
    assert "blocks.1.mix" in str(raised.value)


# ---------------------------------------------------------------------- CLI


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = truebatch.cli.main(["check", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_exit_status_is_0_when_equivalent(capsys):
    code, out, _ = run_cli(capsys, "check_factories:clean")
    assert code == 0 and "truebatch check: equivalent" in out


def test_cli_json_and_options(capsys):
    code, out, _ = run_cli(
        capsys,
        "check_factories:with_batchnorm",
        "--json",
        "--micro-batch-sizes",
        "3,4",
        "--dtype",
        "float32",
    )
    data = json.loads(out)
    assert code == 1 and data["equivalent"] is False
    assert set(data["max_relative_difference"]) == {"3", "4"}
    assert data["tolerance"] == TOL32 and data["dtype"] == "float32"
    assert data["findings"][0]["module"] == "encoder.2.bn"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
        (["check_factories:missing"], "has no attribute 'missing'"),
        (["check_factories:NOT_CALLABLE"], "an int; expected a function"),
        (["check_factories:wrong_shape"], "returned a tuple of 2 items"),
        (["check_factories:not_a_module"], "expected (torch.nn.Module"),
        (["check_factories"], "expected module:function"),
        (["check_factories:clean", "--micro-batch-sizes", "0,2"], "positive integers"),
        (["check_factories:clean", "--micro-batch-sizes", "a"], "positive integers"),
        (["check_factories:clean", "--micro-batch-sizes", "12"], "do not split a batch of 12"),
    ],
)
def test_cli_usage_errors_exit_2_with_a_message(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err


def test_cli_runs_as_a_command_from_the_project_folder():
    # The console script, run from tests/, imports check_factories from the working
    # directory (the script's own sys.path does not hold it) and exits with main's
    # status. A factory of the wrong shape stops before the check: the process
    # costs little more than importing torch.
    script = Path(sys.executable).with_name("truebatch")
    result = subprocess.run(
        [str(script), "check", "check_factories:wrong_shape"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 2, result.stderr
    assert "check_factories:wrong_shape() returned a tuple of 2 items" in result.stderr
    assert result.stdout == ""


def test_cli_reports_an_exception_in_the_model_with_exit_2(capsys, monkeypatch):
    import check_factories

    def broken():
        return net(), lambda model, mb: F.cross_entropy(model(mb[0][:, :2]), mb[1]), batch()

    monkeypatch.setattr(check_factories, "broken", broken, raising=False)
    code, _, err = run_cli(capsys, "check_factories:broken")
    # One line naming the exception; the traceback only with --debug (tests/test_cli.py).
    assert code == 2 and "the check raised RuntimeError" in err and "Traceback" not in err


# ------------------------------------------------------------- N == 0 refused


@pytest.mark.parametrize(
    ("loss", "count"),
    [
        pytest.param(mean_loss, lambda micro_batch: 0, id="count_yields_0"),
        pytest.param(
            lambda model, mb: (sum_loss(model, mb), 0), None, id="loss_fn_returns_count_0"
        ),
    ],
)
def test_a_batch_with_no_items_is_refused_not_passed(loss, count):
    # BatchNorm, dropout and a mean loss: any real check would fail; with N == 0 the
    # window runs no pass, so nothing could be compared and "equivalent" would be vacuous.
    model = net(batchnorm=True, dropout=0.3)
    with pytest.raises(ValueError, match=r"`count` got 0 items.*Fix:"):
        tb.check(model, loss, batch(), count=count)
    with pytest.raises(ValueError, match=r"`count` got 0 items"):
        tb.testing.assert_accumulation_equivalent(model, loss, batch(), count=count)


def test_every_label_ignored_by_count_tokens_is_refused():
    tokens = torch.arange(24).reshape(4, 6) % 7
    labels = torch.full((4, 6), -100)
    model = nn.Sequential(nn.Embedding(7, 5), nn.Linear(5, 7)).double()

    def loss(model, mb):
        logits = model(mb["input_ids"])
        return F.cross_entropy(
            logits.flatten(0, 1), mb["labels"].flatten(), ignore_index=-100, reduction="sum"
        )

    with pytest.raises(ValueError, match=r"`count` got 0 items"):
        tb.check(model, loss, {"input_ids": tokens, "labels": labels}, count=tb.count_tokens())


# ------------------------------------------- any tensor between modules


class AboveMedian(nn.Module):
    """A boolean per sample: above the batch's median, so it mixes samples."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] > x[:, 0].median()


class Flagged(nn.Module):
    """Adds an embedding of a boolean flag per sample (as attention masks travel in HF)."""

    def __init__(self, flag: nn.Module) -> None:
        super().__init__()
        self.lin, self.flag, self.emb = nn.Linear(6, 8), flag, nn.Embedding(2, 8)
        self.sparse, self.out = SparseCopy(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x)) + self.emb(self.flag(x).long())
        return self.out(self.sparse(h)[0])


class SparseCopy(nn.Module):
    """Returns its input with a sparse copy: a leaf that cannot be sliced and compared."""

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h, h.detach().to_sparse()


def test_boolean_and_integer_tensors_are_compared_by_equality():
    model = Flagged(AboveMedian()).double()
    report = tb.check(model, sum_loss, batch(), micro_batch_sizes=[3, 5])
    assert module_findings(report) == {"flag": "mixes_samples"}, report
    # The flag of a split differs in some rows: the fraction is measured, not subtracted.
    assert 0 < report.findings[0].effect < math.inf


def test_tensors_that_cannot_be_compared_are_skipped():
    class Positive(nn.Module):
        def forward(self, x):
            return x[:, 0] > 0

    report = tb.check(Flagged(Positive()).double(), sum_loss, batch(), micro_batch_sizes=[5])
    assert report.equivalent, report


class FunctionalNoise(nn.Module):
    """F.dropout between two submodules, then a dropout module: GPT-2's attention shape."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.resid_dropout = nn.Linear(8, 8), nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(self.proj(F.dropout(x, p=0.2, training=self.training)))


def test_a_functional_random_op_is_named_beside_its_random_submodule_and_behind_dropout():
    # head.drop is upstream-free here; the encoder's dropout changes every later
    # output, and the functional dropout sits inside a module whose last submodule
    # is itself random: each is named in one run.
    model = net(dropout=0.3)
    model.encoder[2] = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3))
    model.blocks[0].noise = FunctionalNoise()
    model.blocks[1].noise = FunctionalNoise()
    model = model.double()
    report = tb.check(model, sum_loss, batch(), micro_batch_sizes=[4])
    assert module_findings(report) == {
        "encoder.2.1": "dropout",
        "blocks.0.noise": "random_op",
        "blocks.0.noise.resid_dropout": "dropout",
        "blocks.1.noise": "random_op",
        "blocks.1.noise.resid_dropout": "dropout",
        "head.drop": "dropout",
    }, report


# ------------------------------------------------- grouped findings


@pytest.fixture(scope="module")
def resnet_report() -> tb.Report:
    import check_factories

    model, loss, data = check_factories.tiny_resnet()
    return tb.check(model, loss, data, micro_batch_sizes=[4])


def findings_section(text: str) -> list[str]:
    lines = text.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.lstrip().startswith("findings")) :]


def test_findings_of_one_kind_and_fix_share_a_row_with_the_fix_once(resnet_report):
    bns = [f.module for f in resnet_report.findings if f.kind == "batchnorm"]
    assert len(bns) == 20 and bns[:2] == ["bn1", "layer1.0.bn1"]
    section = findings_section(str(resnet_report))
    assert len(section) == 5, "\n".join(section)  # header, then two rows with their fix
    assert section[1].split()[:8] == [
        "20",
        "BatchNorm",
        "layers",
        "(bn1,",
        "layer1.0.bn1,",
        "…",
        "18",
        "more)",
    ]
    worst = max(f.effect for f in resnet_report.findings if f.kind == "batchnorm")
    assert section[1].split()[9] == f"{worst:.2e}"
    assert section[3].lstrip().startswith("buffers of 20 BatchNorm layers (bn1, layer1.0.bn1, …")
    fixes = [line for line in section if line.lstrip().startswith("fix:")]
    assert len(fixes) == 2 and "convert_batchnorm" in fixes[0] and "running statistics" in fixes[1]


def test_the_verbose_form_and_to_dict_keep_every_finding(resnet_report):
    section = findings_section(resnet_report.format(verbose=True))
    rows = [line.split()[0] for line in section[1::2]]
    assert rows == [f.module for f in resnet_report.findings] and len(rows) == 40
    assert all(line.lstrip().startswith("fix:") for line in section[2::2])
    data = resnet_report.to_dict()
    assert [f["module"] for f in data["findings"]] == rows
    assert str(resnet_report) == resnet_report.format()


def test_a_single_finding_of_a_kind_is_printed_by_its_path():
    report = tb.check(net(batchnorm=True, mix=True), sum_loss, batch(), micro_batch_sizes=[4])
    rows = [line.split()[0] for line in findings_section(str(report))[1::2]]
    assert rows == ["encoder.2.bn", "blocks.1.mix", "encoder.2.bn"]


# ------------------------------------- samples mixed in the loss vs in the model


class TwoTowers(nn.Module):
    """CLIP-style: an image and a text embedding per sample, each computed per sample."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.image, self.text = nn.Linear(6, 5), nn.Linear(6, 5)
        self.mix = BatchCentering() if mix else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.mix(self.image(x)), dim=1), F.normalize(self.text(x.flip(1)), dim=1)


def info_nce(model, micro_batch):
    """Symmetric InfoNCE with in-batch negatives, summed over the samples."""
    x, _ = micro_batch
    image, text = model(x)
    logits = image @ text.T / 0.1
    targets = torch.arange(len(x))
    return (
        F.cross_entropy(logits, targets, reduction="sum")
        + F.cross_entropy(logits.T, targets, reduction="sum")
    ) / 2


def nt_xent_two_calls(model, micro_batch):
    """SimCLR-style: two views through two calls of the model, negatives in the batch."""
    x, _ = micro_batch
    first, _ = model(x)
    second, _ = model(x + 0.1)
    logits = first @ second.T / 0.5
    return F.cross_entropy(logits, torch.arange(len(x)), reduction="sum")


def centered_outputs(model, micro_batch):
    """A loss on the outputs' batch statistics: mixes samples without any negatives."""
    image, _ = model(micro_batch[0])
    return (image - image.mean(0)).pow(2).sum()


@pytest.mark.parametrize("loss", [info_nce, nt_xent_two_calls, centered_outputs])
def test_a_loss_mixing_samples_on_the_outputs_is_told_apart_and_sent_to_step_cached(loss):
    report = tb.check(TwoTowers().double(), loss, batch(), micro_batch_sizes=[3, 4])
    assert [(f.module, f.kind) for f in report.findings] == [("loss_fn", "loss_mixes_samples")]
    (finding,) = report.findings
    assert "acc.step_cached(micro_batches, encode_fn, loss_fn)" in finding.fix
    assert finding.effect > 1e-3 and not report.equivalent


def test_a_model_mixing_samples_with_a_per_sample_loss_is_not_sent_to_step_cached():
    def per_sample(model, micro_batch):
        image, text = model(micro_batch[0])
        return (image * text).sum()

    report = tb.check(TwoTowers(mix=True).double(), per_sample, batch(), micro_batch_sizes=[4])
    assert module_findings(report) == {"mix": "mixes_samples"}, report
    assert "step_cached" not in report.findings[0].fix


def test_a_mean_over_the_micro_batch_is_not_additive_rather_than_mixing():
    # Each micro-batch's output gradient is the full one times N / n_j: a scale, not a mix.
    def mean_per_sample(model, micro_batch):
        image, text = model(micro_batch[0])
        return (image * text).sum(1).mean()

    report = tb.check(TwoTowers().double(), mean_per_sample, batch(), micro_batch_sizes=[5])
    assert module_findings(report) == {"loss_fn": "loss_not_additive"}


@settings(max_examples=10)
@given(
    culprits=st.sets(
        st.sampled_from(["batchnorm", "noise", "mix", "dropout", "functional"]), min_size=1
    ),
    size=st.sampled_from([3, 4, 5]),
)
def test_any_set_of_planted_culprits_is_found_exactly_in_one_run(culprits, size):
    # Each culprit changes every output downstream of it; each must still be named
    # at its own path, and nothing else.
    model = net(
        batchnorm="batchnorm" in culprits,
        noise="noise" in culprits,
        mix="mix" in culprits,
        dropout=0.3 if "dropout" in culprits else 0.0,
    )
    expected = {
        "batchnorm": ("encoder.2.bn", "batchnorm"),
        "noise": ("blocks.0.noise", "random_op"),
        "mix": ("blocks.1.mix", "mixes_samples"),
        "dropout": ("head.drop", "dropout"),
        "functional": ("blocks.1", "random_op"),
    }
    if "functional" in culprits:
        model.blocks[1] = FunctionalDropoutBlock(model.blocks[1])
    report = tb.check(model, sum_loss, batch(), micro_batch_sizes=[size])
    assert module_findings(report) == dict(expected[c] for c in culprits), report


class FunctionalDropoutBlock(nn.Module):
    """A block that calls F.dropout on its input before its own layers."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.lin, self.noise, self.mix = block.lin, block.noise, block.mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, p=0.2, training=self.training)
        return torch.tanh(self.mix(self.noise(self.lin(x))))


def test_an_output_changed_in_place_later_is_compared_as_it_was_returned():
    # torchvision's ResNet applies ReLU(inplace=True) to a BatchNorm's output: the
    # probe must compare what the module returned, not what was later written over it.
    model = nn.Sequential(
        nn.Linear(6, 8),
        nn.ReLU(inplace=True),
        nn.Linear(8, 8),
        nn.ReLU(inplace=True),
        nn.Linear(8, 3),
    ).double()
    report = tb.check(model, sum_loss, batch(), micro_batch_sizes=[5])
    assert report.equivalent, report
    mixing = net(mix=True)
    mixing.blocks[1].noise = nn.ReLU(inplace=True)  # rewrites the mixer's input in place
    report = tb.check(mixing, sum_loss, batch(), micro_batch_sizes=[5])
    assert module_findings(report) == {"blocks.1.mix": "mixes_samples"}, report


def test_activation_checkpointing_is_probed_once_per_forward():
    # The recomputation runs in backward, outside loss_fn: the probe does not see it twice.
    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = torch.utils.checkpoint.checkpoint(
                lambda h: torch.tanh(self.inner(h)), x, use_reentrant=False
            )
            return self.out(hidden)

    report = tb.check(Checkpointed().double(), sum_loss, batch(), micro_batch_sizes=[5])
    assert report.equivalent, report


@pytest.mark.parametrize(("layers", "rows"), [(3, 3), (4, 1)])
def test_findings_share_a_row_from_four_of_a_kind(layers, rows):
    blocks = [m for _ in range(layers) for m in (nn.Linear(6, 6), nn.BatchNorm1d(6))]
    model = nn.Sequential(*blocks, nn.Linear(6, 3)).double()
    report = tb.check(model, sum_loss, batch(), micro_batch_sizes=[4])
    section = findings_section(str(report))
    batchnorm_rows = [line for line in section[1::2] if " batchnorm " in line]
    assert len(batchnorm_rows) == rows, "\n".join(section)
    assert len(report.to_dict()["findings"]) == 2 * layers


def test_a_loss_that_differentiates_through_the_model_is_checked():
    # A gradient penalty on the inputs (WGAN-GP style): the forced forwards, whose
    # module outputs carry no graph, cannot run it; the check still names the mixer.
    def penalized(model, micro_batch):
        x, y = micro_batch
        x = x.clone().requires_grad_()
        logits = model(x)
        (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
        return F.cross_entropy(logits, y, reduction="sum") + grad.pow(2).sum()

    assert tb.check(net(), penalized, batch(), micro_batch_sizes=[4]).equivalent
    report = tb.check(net(mix=True), penalized, batch(), micro_batch_sizes=[4])
    assert module_findings(report) == {"blocks.1.mix": "mixes_samples"}, report
