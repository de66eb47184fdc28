"""The ``truebatch`` command: ``demo``, ``check`` and ``bench``.

Each subcommand lives in the module that owns its feature and exposes
``add_arguments(parser)`` and ``main(args) -> int`` (the exit code); this file
only dispatches, importing a subcommand's module when it is used.

A user error (a bad argument, a factory that cannot be imported...) prints one
line on stderr, ``truebatch <command>: error: ...``, and exits with status 2;
with ``--json``, the same error is also a JSON object on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, NoReturn

from truebatch import __version__

USAGE_ERROR = 2
DESCRIPTION = (
    "Gradient accumulation that gives exactly the update of the big batch, "
    "or says precisely why it can't."
)
_COMMANDS = {
    "demo": (
        "truebatch.demos.demo",
        "show accumulation going wrong, and truebatch getting it right",
    ),
    "check": ("truebatch._check_cli", "check that a model and loss accumulate exactly"),
    "bench": ("truebatch.demos.bench", "overhead and exactness against other accumulation loops"),
}


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and a JSON object with ``json_errors``)."""

    def __init__(self, *args: Any, json_errors: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.json_errors = json_errors

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line (and as JSON with ``json_errors``); exit with 2."""
        report_error(self.prog, f"{message}. Fix: see {self.prog} --help", as_json=self.json_errors)
        sys.exit(USAGE_ERROR)


def report_error(prog: str, message: str, *, as_json: bool, exception: str | None = None) -> int:
    """Print a user error: one line on stderr, and a JSON object on stdout when ``json``.

    Args:
        prog: the command, e.g. ``"truebatch check"``.
        message: what went wrong and the fix; newlines are folded into spaces.
        as_json: also print ``{"equivalent": null, "error": message, "exception": ...,
            "exit_status": 2}`` on stdout, for scripts that read ``--json`` output.
        exception: the name of the exception behind the error, if any.

    Returns:
        the exit status of a user error, 2.
    """
    line = " ".join(message.split())
    print(f"{prog}: error: {line}", file=sys.stderr)
    if as_json:
        record = {"equivalent": None, "error": line, "exception": exception}
        print(json.dumps({**record, "exit_status": USAGE_ERROR}, indent=2))
    return USAGE_ERROR


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``truebatch`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(prog="truebatch", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"truebatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(_COMMANDS) + "}")
    modules = {}
    for name, (module_name, help_text) in _COMMANDS.items():
        sub = commands.add_parser(
            name, help=help_text, description=help_text, json_errors="--json" in argv
        )
        # Only the chosen command's module is imported (they pull in matplotlib, sklearn...).
        if argv and argv[0] == name:
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    return int(modules[args.command].main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
