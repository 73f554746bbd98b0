"""The ``codegraph3d-research`` command: the research tooling's subcommands in one place.

Each subcommand is one module's own command line (``python -m codegraph3d_research.<module>``
still works); this command only dispatches to it, importing the module named and nothing else,
so ``--help`` of one subcommand does not load the others' dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

__all__ = ["COMMANDS", "main"]

#: subcommand -> (module, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "evaluate": ("codegraph3d_research.evaluate", "score a run's report and SEGs against a synthetic cohort's truth"),
    "compare": ("codegraph3d_research.compare", "paired bootstrap comparison of two conditions over seeds"),
    "ablations": ("codegraph3d_research.ablations", "fill a token cache; rescore cached cohorts under other settings"),
    "combine-caches": ("codegraph3d_research.combine_caches", "a combined encoder's cache entries from its parts' entries"),
    "baseline": ("codegraph3d_research.baseline", "per-position intensity z-score baseline, evaluated like the product"),
    "benchmark": ("codegraph3d_research.benchmark", "speed, memory and FLOP rate per stage"),
    "mask-quality": ("codegraph3d_research.mask_quality", "brain masks of each method against a cohort's truth"),
}


def build_parser() -> argparse.ArgumentParser:
    """The dispatcher's parser: a subcommand and the arguments handed to it unchanged."""
    parser = argparse.ArgumentParser(
        prog="codegraph3d-research",
        description="Research tooling of codegraph3d (not part of the MAP): evaluation, experiments, benchmarks.",
        epilog="subcommands:\n" + "\n".join(f"  {name:13} {text}" for name, (_, text) in COMMANDS.items())
        + "\n\n'codegraph3d-research SUBCOMMAND --help' describes one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="SUBCOMMAND")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; its exit status (0 for a subcommand that returns a result object)."""
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    result = module.main(list(args.arguments))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
