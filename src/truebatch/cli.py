"""The ``truebatch`` command: ``demo``, ``check`` and ``bench``.

Each subcommand lives in the module that owns its feature and exposes
``add_arguments(parser)`` and ``main(args) -> int`` (the exit code); this file
only dispatches, importing a subcommand's module when it is used.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMANDS = {
    "demo": (
        "truebatch.demos.demo",
        "show accumulation going wrong, and truebatch getting it right",
    ),
    "check": ("truebatch._check_cli", "check that a model and loss accumulate exactly"),
    "bench": ("truebatch.demos.bench", "overhead and exactness against other accumulation loops"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``truebatch`` console script."""
    parser = argparse.ArgumentParser(prog="truebatch", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(_COMMANDS) + "}")
    modules = {}
    argv = sys.argv[1:] if argv is None else argv
    for name, (module_name, help_text) in _COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (they pull in matplotlib, sklearn...).
        if argv and argv[0] == name:
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
