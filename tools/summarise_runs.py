"""Summarise evaluated runs by condition: per-seed patient AUROC and Dice-max, and their means.

Each argument is ``CONDITION=EVALUATION_FOLDER`` (the folder ``python -m codegraph3d.evaluate``
wrote, holding ``metrics.json``); arguments sharing a condition are its seeds. Prints a Markdown
table per contrast: one row per condition with the per-seed values and the mean.

    python tools/summarise_runs.py heads=demo/a-evaluation heads=demo/b-evaluation \\
        stripped=demo/c-evaluation stripped=demo/d-evaluation
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

METRICS = (("patient_auroc", "patient AUROC"), ("dice_max", "Dice-max"))


def load_batches(folder: Path) -> dict[str, dict]:
    """The per-contrast batch metrics of one evaluation folder."""
    path = folder / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: evaluate the run first (python -m codegraph3d.evaluate --run RUN --truth COHORT)")
    return json.loads(path.read_text())["batches"]


def summary_tables(runs: dict[str, list[Path]]) -> str:
    """Markdown tables, one per contrast, of every condition's per-seed metrics and their means."""
    values: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for condition, folders in runs.items():
        for folder in folders:
            for contrast, batch in load_batches(folder).items():
                for key, _ in METRICS:
                    if batch.get(key) is not None:
                        values[contrast][condition][key].append(float(batch[key]))
    lines: list[str] = []
    for contrast in sorted(values, reverse=True):
        lines += [f"**{contrast}**", ""]
        header = "| condition | seeds | " + " | ".join(f"{label} per seed | mean {label}" for _, label in METRICS) + " |"
        lines += [header, "|" + "---|" * (2 + 2 * len(METRICS))]
        for condition in runs:
            row = values[contrast][condition]
            cells = [condition, str(max((len(v) for v in row.values()), default=0))]
            for key, _ in METRICS:
                seeds = row.get(key, [])
                cells.append(", ".join(f"{v:.3f}" for v in seeds) or "n/a")
                cells.append(f"{sum(seeds) / len(seeds):.3f}" if seeds else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="CONDITION=EVALUATION_FOLDER")
    args = parser.parse_args(argv)
    runs: dict[str, list[Path]] = defaultdict(list)
    for item in args.runs:
        condition, sep, folder = item.partition("=")
        if not sep or not condition or not folder:
            parser.error(f"{item!r} is not CONDITION=EVALUATION_FOLDER")
        runs[condition].append(Path(folder))
    print(summary_tables(dict(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
