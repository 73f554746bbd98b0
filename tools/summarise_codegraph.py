"""Per-seed table of tools/measure_codegraph.sh: MuSc against CoDeGraph, and what CoDeGraph found.

Reads ``<folder>/run_<appearance>_<seed>_<method>_r<radius>-evaluation/metrics.json``, the runs'
``report.json`` and the cohorts' ``labels.json``; prints one Markdown row per appearance, radius
and seed (runs not there yet are left out).

Usage::

    python tools/summarise_codegraph.py demo/codegraph --appearances striped varied --seeds 11 12 13
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _metrics(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}-evaluation" / "metrics.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["batches"].get("T2w")


def _found(folder: Path, name: str, lesion_series: set[str]) -> str:
    report = json.loads((folder / name / "report.json").read_text(encoding="utf-8"))
    found = report["batches"][0].get("codegraph", {})
    members = [uid for group in found.get("communities", []) for uid in group]
    with_lesion = sum(uid in lesion_series for uid in members)
    sizes = "+".join(str(len(group)) for group in found.get("communities", [])) or "none"
    return f"{sizes} ({with_lesion}/{len(members)} with lesions), {sum(found.get('implicated_tokens', {}).values())} tokens"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summarise(folder: Path, appearances: list[str], seeds: list[str]) -> str:
    """The Markdown table."""
    lines = [
        "| lesions | matching | seed | MuSc patient AUROC / Dice-max / voxel AUROC | "
        "CoDeGraph patient AUROC / Dice-max / voxel AUROC | communities found |",
        "|---|---|---|---|---|---|",
    ]
    for appearance in appearances:
        for radius in ("-1", "1"):
            for seed in seeds:
                base = f"run_{appearance}_{seed}"
                musc, graph = _metrics(folder, f"{base}_musc_r{radius}"), _metrics(folder, f"{base}_codegraph_r{radius}")
                if musc is None or graph is None:
                    continue
                labels = json.loads((folder / f"cohort_{appearance}_{seed}" / "labels.json").read_text(encoding="utf-8"))
                lesion_series = {s["series_instance_uid"] for st in labels["studies"] if st["has_lesion"] for s in st["series"]}
                cells = [
                    " / ".join(_fmt(m[key]) for key in ("patient_auroc", "dice_max", "voxel_auroc"))
                    for m in (musc, graph)
                ]
                lines.append(
                    f"| {appearance} | {'global' if radius == '-1' else 'window r=1'} | {seed} | {cells[0]} | {cells[1]} | "
                    f"{_found(folder, f'{base}_codegraph_r{radius}', lesion_series)} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--appearances", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", required=True)
    args = parser.parse_args(argv)
    print(summarise(args.folder, args.appearances, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
