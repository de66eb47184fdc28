"""``truebatch check package.module:factory``: the checker from the command line.

The factory is called with no arguments and returns ``(model, loss_fn, batch)``.
Exit status: 0 when accumulation is equivalent to the full batch, 1 when it is
not, 2 when the check could not run: a usage error (the message on stderr says
what to change), or an exception from the factory or the model (traceback on
stderr).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from typing import Any

import torch
from torch import nn

from truebatch.check import check

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
EQUIVALENT, NOT_EQUIVALENT, USAGE_ERROR = 0, 1, 2


class _UsageError(Exception):
    """A problem with what the user passed; reported on stderr with exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``truebatch check``."""
    parser.add_argument(
        "factory",
        help="module:function returning (model, loss_fn, batch), e.g. mypackage.train:check_setup; "
        "the current directory is importable",
    )
    parser.add_argument(
        "--micro-batch-sizes",
        default=None,
        help="comma-separated sizes to check, e.g. 1,4,16 (default: a few from 1 to half the "
        "batch, one of them not dividing it)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default="float64",
        help="dtype of the check (float64: tolerance 1e-12, float32: 1e-5)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the check; 0 equivalent, 1 not equivalent, 2 usage error."""
    try:
        sizes = _parse_sizes(args.micro_batch_sizes)
        model, loss_fn, batch = _load(args.factory)
        report = check(model, loss_fn, batch, sizes, dtype=_DTYPES[args.dtype])
    except _UsageError as error:
        print(f"truebatch check: {error}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as error:
        # The factory, the model or tb.check's validation raised: the check could not run,
        # which must not read as "not equivalent" (exit 1).
        traceback.print_exc()
        print(f"truebatch check: could not run the check: {error}", file=sys.stderr)
        return USAGE_ERROR
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return EQUIVALENT if report.equivalent else NOT_EQUIVALENT


def _parse_sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise _UsageError(
            f"--micro-batch-sizes must be comma-separated positive integers, got {text!r}; "
            "e.g. --micro-batch-sizes 1,4,16"
        )
    return sizes


def _load(spec: str) -> tuple[nn.Module, Any, Any]:
    """Import ``module:function`` (from the current directory too) and call it."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise _UsageError(
            f"expected module:function, got {spec!r}; e.g. truebatch check mymodel:check_setup"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise _UsageError(
            f"cannot import module {module_name!r} ({error}); run from the folder that holds "
            "it, or install its package"
        ) from error
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise _UsageError(
                f"module {module_name!r} has no attribute {attribute!r}; name a function that "
                "returns (model, loss_fn, batch)"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise _UsageError(
            f"{spec} is a {type(factory).__name__}, not a function; name a function that "
            "returns (model, loss_fn, batch)"
        )
    result = factory()
    if not (isinstance(result, tuple | list) and len(result) == 3):
        raise _UsageError(
            f"{spec}() returned {_describe(result)}; it must return a tuple (model, loss_fn, batch)"
        )
    model, loss_fn, batch = result
    if not isinstance(model, nn.Module) or not callable(loss_fn):
        raise _UsageError(
            f"{spec}() returned ({type(model).__name__}, {type(loss_fn).__name__}, ...); "
            "expected (torch.nn.Module, loss_fn(model, micro_batch) -> loss_sum, batch)"
        )
    return model, loss_fn, batch


def _describe(value: Any) -> str:
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"
