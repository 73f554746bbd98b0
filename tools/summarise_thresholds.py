"""Summarise tools/measure_bank_threshold.sh: false positives on all-normal batches, Dice with lesions.

Reads ``<folder>/run_{normal,lesions}_<seed>_<arm>-evaluation/metrics.json`` and prints one
Markdown table row per threshold arm, pooled over the seeds.

Usage::

    python tools/summarise_thresholds.py demo/bank_threshold --arms batch bank_refs bank_threshold --seeds 31 32 33
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean
from typing import Any


def _rows(folder: Path, kind: str, seed: str, arm: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    path = folder / f"run_{kind}_{seed}_{arm}-evaluation" / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; run tools/measure_bank_threshold.sh first")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    rows = [r for r in metrics["series"] if r.get("status") == "scored"]
    return rows, metrics["batches"].get("T2w", {})


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summarise(folder: Path, arms: list[str], seeds: list[str]) -> str:
    """The Markdown table."""
    lines = [
        "| threshold arm | all-normal batches: volumes flagged | false-positive ml per normal volume | "
        "lesion batches: lesion volumes flagged | normal volumes flagged | mean Dice at threshold "
        "(lesion volumes) | patient AUROC | Dice-max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        normal_rows: list[dict[str, Any]] = []
        lesion_rows: list[dict[str, Any]] = []
        aurocs: list[float] = []
        dice_max: list[float] = []
        for seed in seeds:
            rows, _ = _rows(folder, "normal", seed, arm)
            normal_rows += rows
            rows, batch = _rows(folder, "lesions", seed, arm)
            lesion_rows += rows
            if batch.get("patient_auroc") is not None:
                aurocs.append(batch["patient_auroc"])
            if batch.get("dice_max") is not None:
                dice_max.append(batch["dice_max"])
        flagged_normal = sum(bool(r["flagged"]) for r in normal_rows)
        fp_ml = mean(float(r["predicted_ml"] or 0.0) for r in normal_rows) if normal_rows else None
        with_lesion = [r for r in lesion_rows if r["has_lesion"]]
        without = [r for r in lesion_rows if not r["has_lesion"]]
        dice = [float(r["dice_at_product_threshold"] or 0.0) for r in with_lesion]
        lines.append(
            f"| {arm} | {flagged_normal}/{len(normal_rows)} | {_fmt(fp_ml, 2)} | "
            f"{sum(bool(r['flagged']) for r in with_lesion)}/{len(with_lesion)} | "
            f"{sum(bool(r['flagged']) for r in without)}/{len(without)} | {_fmt(mean(dice) if dice else None)} | "
            f"{_fmt(mean(aurocs) if aurocs else None)} | {_fmt(mean(dice_max) if dice_max else None)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--arms", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", required=True)
    args = parser.parse_args(argv)
    print(summarise(args.folder, args.arms, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
