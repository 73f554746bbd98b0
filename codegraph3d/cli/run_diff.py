"""``codegraph3d run-diff OUTPUT_A OUTPUT_B``: do two runs of the app on the same input agree?

Prints one line per series (:func:`codegraph3d.run.diff.compare_runs` says what "agree" means)
and exits 0 when the runs agree, 1 when they do not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codegraph3d.run.diff import RunDifference, compare_runs

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the two output folders and the tolerances to ``parser``."""
    parser.add_argument("output_a", type=Path)
    parser.add_argument("output_b", type=Path)
    parser.add_argument("--score-tolerance", type=float, default=1e-4)
    parser.add_argument("--mask-tolerance", type=float, default=1e-3, help="fraction of a series' voxels")


def _print(result: RunDifference) -> None:
    for series in result.series:
        if series.status_a == "scored" and series.status_b == "scored":
            mask = "-" if series.mask_fraction is None else f"{series.differing_voxels} voxels ({series.mask_fraction:.4%})"
            flags = "" if series.flagged_a == series.flagged_b else f"  flagged {series.flagged_a} vs {series.flagged_b}"
            print(f"{series.series_instance_uid}  score diff {series.score_difference:.2e}  mask diff {mask}{flags}")
        else:
            print(f"{series.series_instance_uid}  {series.status_a} vs {series.status_b} ({series.reason_a})")
    scored = sum(s.score_difference is not None for s in result.series)
    print(
        f"{scored} scored series compared: max score difference {result.max_score_difference:.2e}, "
        f"max mask difference {result.max_mask_fraction:.4%}"
    )
    for problem in result.problems:
        print(f"MISMATCH: {problem}")
    print("runs agree" if result.agree else "runs DIFFER")


def run(args: argparse.Namespace, rest: list[str]) -> int:
    """Compare the runs; 0 when they agree, 1 when not, 2 on unreadable outputs."""
    try:
        result = compare_runs(args.output_a, args.output_b, args.score_tolerance, args.mask_tolerance)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _print(result)
    return 0 if result.agree else 1
