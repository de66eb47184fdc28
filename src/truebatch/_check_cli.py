"""``truebatch check module:factory``: the checker from the command line.

The factory is called with no arguments and returns ``(model, loss_fn, batch)``,
or ``(model, batch)`` for a Hugging Face Transformers model with a collated
batch: the loss and its item count are then the truebatch Trainer's
(:func:`truebatch.integrations.transformers.model_loss`).
Exit status: 0 when accumulation is equivalent to the full batch, 1 when it is
not, 2 when the check could not run. Then one line on stderr says why and what
to change (and, with ``--json``, a JSON object on stdout says it too); the
traceback is shown only with ``--debug``: an error in the user's factory,
model or loss is theirs to read, not a crash of truebatch.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import sys
import traceback
from typing import Any

import torch
from torch import nn

from truebatch.check import Report, check
from truebatch.cli import report_error

PROG = "truebatch check"
_DTYPES = {"float64": torch.float64, "float32": torch.float32}
EQUIVALENT, NOT_EQUIVALENT, CANNOT_RUN = 0, 1, 2
_FACTORY_RETURNS = "(model, loss_fn, batch)"


class CannotRun(Exception):
    """The check could not run because of what the user passed; ``str`` is the message."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``truebatch check``."""
    parser.epilog = (
        "exit status: 0 equivalent, 1 not equivalent, 2 the check could not run "
        "(one line on stderr says why; --debug adds the traceback)"
    )
    parser.add_argument(
        "factory",
        help=f"module:function returning {_FACTORY_RETURNS}, e.g. mypackage.train:check_setup; "
        "the current directory is importable",
    )
    parser.add_argument(
        "--micro-batch-sizes",
        default=None,
        help="comma-separated sizes to check, e.g. 1,4,16 (default: a few from 1 to half the "
        "batch, one of them not dividing it)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default="float64",
        help="dtype of the check (float64: tolerance 1e-12, float32: 1e-5)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report (or the error) as JSON on stdout"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="list every module of each finding, not a summary"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="when the check cannot run, also print the traceback",
    )


def main(args: argparse.Namespace) -> int:
    """Run the check; 0 equivalent, 1 not equivalent, 2 when it could not run."""
    try:
        report = _run(args)
    except CannotRun as error:
        return _fail(args, str(error), error.__cause__)
    except Exception as error:
        # The model, the loss or tb.check's validation raised: the check could not run,
        # which must not read as "not equivalent" (exit 1).
        return _fail(args, f"the check raised {_exception(error)}", error)
    print(json.dumps(report.to_dict(), indent=2) if args.json else _text(report, args.verbose))
    return EQUIVALENT if report.equivalent else NOT_EQUIVALENT


def _run(args: argparse.Namespace) -> Report:
    sizes = _parse_sizes(args.micro_batch_sizes)
    model, loss_fn, count, batch = _load(args.factory)
    return check(model, loss_fn, batch, sizes, count=count, dtype=_DTYPES[args.dtype])


def _text(report: Report, verbose: bool) -> str:
    """The report as text; ``verbose`` lists every module of a group of findings."""
    # Report.format(verbose=...) groups findings of one kind and fix; a Report without
    # it prints every finding already.
    format_report = getattr(report, "format", None)
    return str(report) if format_report is None else format_report(verbose=verbose)


def _fail(args: argparse.Namespace, message: str, cause: BaseException | None) -> int:
    if cause is not None:
        if args.debug:
            traceback.print_exception(cause)
        else:
            message += " (--debug shows the traceback)"
    exception = None if cause is None else type(cause).__name__
    return report_error(PROG, message, as_json=args.json, exception=exception)


def _exception(error: BaseException) -> str:
    """``"ZeroDivisionError: division by zero"``, on one line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _parse_sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise CannotRun(
            f"`--micro-batch-sizes` got {text!r}; expected comma-separated positive integers. "
            "Fix: e.g. --micro-batch-sizes 1,4,16."
        )
    return sizes


def _load(spec: str) -> tuple[nn.Module, Any, Any, Any]:
    """Import ``module:function`` (from the current directory too) and call it: the
    model, loss_fn, count (``None``: samples) and batch."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise CannotRun(
            f"`factory` got {spec!r}; expected module:function. "
            "Fix: e.g. truebatch check my_setup:setup for the function setup in my_setup.py."
        )
    module = _import(spec, module_name)
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise CannotRun(
                f"`factory` got {spec!r}; module {module_name!r} has no attribute "
                f"{attribute!r}. Fix: {_suggest(module, attribute, module_name)}"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise CannotRun(
            f"`factory` got {spec!r}, {_a(type(factory).__name__)}; expected a function. "
            f"Fix: name a function that returns {_FACTORY_RETURNS}."
        )
    try:
        result = factory()
    except Exception as error:
        raise CannotRun(f"{spec}() raised {_exception(error)}") from error
    if isinstance(result, tuple | list) and len(result) == 2 and _is_transformers_model(result[0]):
        # A Transformers model and a collated batch: the truebatch Trainer's loss and count.
        from truebatch.integrations.transformers import model_loss

        model, batch = result
        try:
            loss_fn, count = model_loss(model)
        except ValueError as error:
            raise CannotRun(str(error)) from error
        return model, loss_fn, count, batch
    if not (isinstance(result, tuple | list) and len(result) == 3):
        raise CannotRun(
            f"{spec}() returned {_describe(result)}; expected {_FACTORY_RETURNS}. "
            f"Fix: end {attribute} with: return model, loss_fn, batch."
        )
    model, loss_fn, batch = result
    if not isinstance(model, nn.Module) or not callable(loss_fn):
        raise CannotRun(
            f"{spec}() returned ({type(model).__name__}, {type(loss_fn).__name__}, ...); "
            "expected (torch.nn.Module, loss_fn(model, micro_batch) -> loss_sum, batch). "
            "Fix: return the model first, then the loss function, then the batch."
        )
    return model, loss_fn, None, batch


def _is_transformers_model(model: Any) -> bool:
    """A ``transformers.PreTrainedModel``, without importing transformers for others."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
        for cls in type(model).__mro__
    )


def _import(spec: str, module_name: str) -> Any:
    """Import the factory's module, from the current directory too."""
    if module_name.endswith(".py"):
        folder, file = os.path.split(module_name)
        fixed = f"{file.removesuffix('.py')}:{spec.partition(':')[2]}"
        where = f"cd {folder} && " if folder else ""
        raise CannotRun(
            f"`factory` got {spec!r}; expected a module name, not a file name. "
            f"Fix: drop '.py': {where}truebatch check {fixed}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and f"{module_name}.".startswith(f"{error.name}."):
            raise CannotRun(
                f"`factory` got {spec!r}; cannot import module {module_name!r} from "
                f"{os.getcwd()}. Fix: run from the folder that holds "
                f"{module_name.split('.')[0]}, or install its package."
            ) from None
        raise CannotRun(f"importing {module_name!r} raised {_exception(error)}") from error
    except Exception as error:
        raise CannotRun(f"importing {module_name!r} raised {_exception(error)}") from error


def _suggest(module: Any, attribute: str, module_name: str) -> str:
    functions = [name for name, value in vars(module).items() if callable(value)]
    close = difflib.get_close_matches(attribute, functions, n=1)
    if close:
        return f"did you mean {module_name}:{close[0]}?"
    return f"name a function of {module_name} that returns {_FACTORY_RETURNS}."


def _describe(value: Any) -> str:
    if isinstance(value, tuple | list):
        return f"{_a(type(value).__name__)} of {len(value)} items"
    return _a(type(value).__name__)


def _a(noun: str) -> str:
    """``"an int"``, ``"a tuple"``."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"
