"""The ``codegraph3d`` command: the product's tools besides the app itself.

Each subcommand lives in its own module, which knows the argument parsing and calls the library;
the library modules below hold no command line of their own, so nothing there imports upwards.

Usage::

    codegraph3d bank {list,add,remove,check} ...      the cohort bank (codegraph3d.cli.bank)
    codegraph3d landmarks {template,learn,show} ...   Nyul reference landmarks (codegraph3d.cli.landmarks)
    codegraph3d template install MODEL_FOLDER         the registration template (codegraph3d.cli.template)
    codegraph3d run-diff OUTPUT_A OUTPUT_B            do two runs agree? (codegraph3d.cli.run_diff)

``python -m codegraph3d ...`` is the same command (``codegraph3d`` is installed as a console
script by ``pip install``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from codegraph3d.cli import bank, landmarks, run_diff, template

__all__ = ["main"]

# name -> (module, help); each module has configure(parser) and run(args, rest) -> exit status.
_SUBCOMMANDS = {
    "bank": (bank, "list, add, remove or check the series of a cohort bank"),
    "landmarks": (landmarks, "reference landmarks of the Nyul standardisation, per contrast"),
    "template": (template, "install the registration template into a model folder"),
    "run-diff": (run_diff, "check that two runs of the app on the same input agree"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``codegraph3d`` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="codegraph3d", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="tool", required=True, metavar="COMMAND")
    for name, (module, text) in _SUBCOMMANDS.items():
        module.configure(commands.add_parser(name, help=text, description=text, allow_abbrev=False))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns its exit status (0 ok, 1 a check failed, 2 bad input)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    module = _SUBCOMMANDS[args.tool][0]
    if rest and not getattr(module, "TAKES_EXTRA_ARGUMENTS", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(module.run(args, rest))
