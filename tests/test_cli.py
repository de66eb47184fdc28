"""The ``truebatch`` command as a user meets it: errors, ``--json``, ``--debug``,
``--version``, ``--help``.

Every way ``truebatch check`` can fail to run is a user error: exit status 2,
exactly one line on stderr (``truebatch check: error: ...``) that says what was
wrong and the fix, no traceback unless ``--debug``; with ``--json`` the same
message is also a JSON object on stdout, so that a script reading stdout never
gets nothing.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import truebatch
import truebatch.cli
from truebatch.check import Report

CANNOT_RUN = 2
_names = itertools.count()

# A factory module's source; SETUPS holds the function bodies by name.
HEADER = """
import torch
import torch.nn.functional as F
from torch import nn

import truebatch as tb


def _data():
    torch.manual_seed(0)
    return torch.randn(16, 4), torch.randint(0, 3, (16,))


def _sum_loss(model, micro_batch):
    x, y = micro_batch
    return F.cross_entropy(model(x), y, reduction="sum")
"""
SETUPS = {
    "exact": "return nn.Linear(4, 3), _sum_loss, _data()",
    "mean_loss": ("return nn.Linear(4, 3), lambda m, b: F.cross_entropy(m(b[0]), b[1]), _data()"),
    "ghost": (
        "model = tb.nn.convert_batchnorm("
        "nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)), 8)\n"
        "return model, _sum_loss, _data()"
    ),
    "raises": "return {}['missing key']",
    "an_int": "return 3",
    "two_items": "return nn.Linear(4, 3), _sum_loss",
    "swapped": "return _sum_loss, nn.Linear(4, 3), _data()",
    "bad_model": (
        "return nn.Linear(5, 3), _sum_loss, _data()  # 5 inputs, the batch has 4 features"
    ),
}


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        """The one line of a user error, checked to be the only line on stderr."""
        lines = self.err.splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got:\n{self.err}"
        assert lines[0].startswith("truebatch check: error: "), lines[0]
        return lines[0]


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh factory module (a unique name: imports are cached) in the working directory."""
    name = f"cli_setup_{next(_names)}"
    functions = "\n".join(
        f"\n\ndef {function}():\n{textwrap.indent(body, '    ')}"
        for function, body in SETUPS.items()
    )
    (tmp_path / f"{name}.py").write_text(HEADER + functions + "\n\nNOT_CALLABLE = 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the cwd on sys.path
    return name


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    def run_check(*argv: str) -> Run:
        try:
            code = truebatch.cli.main(["check", *argv])
        except SystemExit as exit_:  # argparse's own exits
            code = exit_.code
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run_check


def test_equivalent_and_not_exit_0_and_1(module: str, run: Callable[..., Run]) -> None:
    exact = run(f"{module}:exact")
    assert exact.code == 0 and "truebatch check: equivalent" in exact.out and exact.err == ""
    mean = run(f"{module}:mean_loss", "--json")
    assert mean.code == 1 and json.loads(mean.out)["equivalent"] is False


# (arguments after the module's name, what the one line must say, the exception behind it)
ERRORS = {
    "sizes not multiples of the ghost batch": (
        [":ghost", "--micro-batch-sizes", "4,8"],
        r"ValueError: .*\b4\b.*multiples of 8",
        "ValueError",
    ),
    "sizes not integers": (
        [":exact", "--micro-batch-sizes", "1,x"],
        r"`--micro-batch-sizes` got '1,x'; expected comma-separated positive integers\. Fix: ",
        None,
    ),
    "sizes not positive": (
        [":exact", "--micro-batch-sizes", "0,2"],
        r"`--micro-batch-sizes` got '0,2'; expected comma-separated positive integers",
        None,
    ),
    "factory raises": (
        [":raises"],
        r"{module}:raises\(\) raised KeyError: 'missing key' \(--debug shows the traceback\)$",
        "KeyError",
    ),
    "no colon": (
        [""],
        r"`factory` got '{module}'; expected module:function\. Fix: e\.g\. truebatch check ",
        None,
    ),
    "returns an int": (
        [":an_int"],
        r"{module}:an_int\(\) returned an int; expected \(model, loss_fn, batch\)\. Fix: ",
        None,
    ),
    "returns two items": (
        [":two_items"],
        r"returned a tuple of 2 items; expected \(model, loss_fn, batch\)",
        None,
    ),
    "returns the wrong order": (
        [":swapped"],
        r"returned \(function, Linear, \.\.\.\); expected \(torch\.nn\.Module, ",
        None,
    ),
    "no such attribute, a close name": (
        [":exatc"],
        r"module '{module}' has no attribute 'exatc'\. Fix: did you mean {module}:exact\?$",
        None,
    ),
    "not callable": (
        [":NOT_CALLABLE"],
        r"`factory` got '{module}:NOT_CALLABLE', an int; expected a function\. Fix: ",
        None,
    ),
    "the model raises during the check": (
        [":bad_model"],
        r"the check raised RuntimeError: .*\(--debug shows the traceback\)$",
        "RuntimeError",
    ),
}


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_are_one_line_exit_2_and_json(
    module: str, run: Callable[..., Run], case: str, as_json: bool
) -> None:
    suffix, pattern, exception = ERRORS[case]
    argv = [module + suffix[0], *suffix[1:], *(["--json"] if as_json else [])]
    result = run(*argv)
    assert result.code == CANNOT_RUN
    line = result.error_line
    assert re.search(pattern.format(module=module), line), line
    assert "Traceback" not in result.err
    if not as_json:
        assert result.out == ""
        return
    record = json.loads(result.out)
    assert record == {
        "equivalent": None,
        "error": line.removeprefix("truebatch check: error: "),
        "exception": exception,
        "exit_status": CANNOT_RUN,
    }


def test_a_file_name_is_answered_with_the_module_name(
    module: str, run: Callable[..., Run], tmp_path: Path
) -> None:
    line = run(f"{module}.py:exact").error_line
    assert line.endswith(f"Fix: drop '.py': truebatch check {module}:exact")
    (tmp_path / "sub").mkdir()
    line = run(f"sub/{module}.py:exact").error_line
    assert line.endswith(f"Fix: drop '.py': cd sub && truebatch check {module}:exact")


def test_a_missing_module_and_a_module_that_fails_to_import(
    module: str, run: Callable[..., Run], tmp_path: Path
) -> None:
    line = run("no_such_module_xyz:setup").error_line
    assert "cannot import module 'no_such_module_xyz'" in line
    assert line.endswith(
        "Fix: run from the folder that holds no_such_module_xyz, or install its package."
    )
    # A module that exists but imports something missing: that import is named, not the module.
    (tmp_path / f"{module}_deps.py").write_text("import no_such_dependency_xyz\n")
    result = run(f"{module}_deps:setup", "--json")
    assert result.code == CANNOT_RUN
    assert (
        f"importing '{module}_deps' raised ModuleNotFoundError: "
        "No module named 'no_such_dependency_xyz'" in result.error_line
    )
    assert json.loads(result.out)["exception"] == "ModuleNotFoundError"


def test_debug_adds_the_traceback_before_the_line(module: str, run: Callable[..., Run]) -> None:
    result = run(f"{module}:raises", "--debug")
    assert result.code == CANNOT_RUN
    lines = result.err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "in raises\n    return {}['missing key']" in result.err
    assert lines[-1] == f"truebatch check: error: {module}:raises() raised KeyError: 'missing key'"
    assert result.out == ""


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_argument_errors_are_one_line_too(run: Callable[..., Run], as_json: bool) -> None:
    result = run(*(["--json"] if as_json else []))  # no factory
    assert result.code == CANNOT_RUN
    line = result.error_line
    assert "the following arguments are required: factory" in line
    assert line.endswith("Fix: see truebatch check --help")
    assert (json.loads(result.out)["error"] in line) if as_json else result.out == ""


def test_verbose_prints_the_report_format_for_every_finding(
    module: str, run: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def format_report(report: Report, *, verbose: bool) -> str:
        calls.append(verbose)
        return f"report, verbose={verbose}"

    monkeypatch.setattr(Report, "format", format_report, raising=False)
    assert run(f"{module}:mean_loss", "--verbose").out == "report, verbose=True\n"
    assert run(f"{module}:mean_loss").out == "report, verbose=False\n"
    assert calls == [True, False]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        truebatch.cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"truebatch {truebatch.__version__}\n"


@pytest.mark.parametrize("command", [[], ["demo"], ["check"], ["bench"]])
def test_help_is_plain_text(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        truebatch.cli.main([*command, "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"usage: truebatch {' '.join(command)}".rstrip())
    assert "`" not in shown and ":mod:" not in shown and ":func:" not in shown


def test_the_console_script_exits_2_with_one_line(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("truebatch")
    result = subprocess.run(
        [str(script), "check", "my_setup.py:setup", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == CANNOT_RUN
    assert result.stderr.splitlines() == [
        "truebatch check: error: `factory` got 'my_setup.py:setup'; expected a module name, "
        "not a file name. Fix: drop '.py': truebatch check my_setup:setup"
    ]
    assert json.loads(result.stdout)["exit_status"] == CANNOT_RUN
