"""Where a run's false positives lie: near the brain's edge or deep inside, per series.

Reads an evaluated run (the app's output with FRACTIONAL SEGs, and its ``-evaluation`` folder for
each batch's Dice-max threshold) and the cohort's truth, and prints per series the voxels above
that threshold outside the lesion: all of them, those within ``--edge-voxels`` source voxels of
the truth brain's boundary (inside or out), and those outside the truth brain.

    python tools/edge_false_positives.py --run demo/output_heads --truth demo/cohort_heads
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from codegraph3d_research.evaluate import TruthCohort, _read_report, _seg_array, default_out_dir
from codegraph3d.io.dicom import load_series_volume, scan_headers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the app's output folder (FRACTIONAL SEGs)")
    parser.add_argument("--truth", type=Path, required=True, help="the cohort folder (labels.json, truth/, dicom/)")
    parser.add_argument("--edge-voxels", type=float, default=4.0, help="edge band half-width in source voxels (default 4)")
    args = parser.parse_args(argv)
    metrics_path = default_out_dir(args.run) / "metrics.json"
    if not metrics_path.is_file():
        print(f"error: {metrics_path} does not exist: run python -m codegraph3d_research.evaluate --run {args.run} --truth {args.truth}",
              file=sys.stderr)
        return 2
    thresholds = {c: b["dice_max_threshold"] for c, b in json.loads(metrics_path.read_text())["batches"].items()}
    labels = json.loads((args.truth / "labels.json").read_text())
    head = {s["patient_id"]: s.get("has_head", False) for s in labels["studies"]}
    report, cohort = _read_report(args.run), TruthCohort.load(args.truth)
    headers = {s.series_instance_uid: s for s in scan_headers(args.truth / "dicom").series}
    print("| patient | contrast | input | false-positive voxels | within the edge band | outside the brain | lesion voxels found |")
    print("|---|---|---|---|---|---|---|")
    rows = sorted((r for r in report["series"] if r.get("status") == "scored"), key=lambda r: (r["contrast"], r["patient_id"]))
    for row in rows:
        if not row.get("seg_score"):
            print(f"error: {row['series_instance_uid']} has no score SEG; the run needs output.fractional: true", file=sys.stderr)
            return 2
        uid, threshold = row["series_instance_uid"], thresholds.get(row["contrast"])
        if threshold is None:
            continue
        volume = load_series_volume(headers[uid]).volume
        lesion, brain = cohort.load_masks(uid, volume)
        score = _seg_array(args.run / row["seg_score"], volume.sop_instance_uids, uid, volume.array.shape)
        # Distance to the boundary from both sides: the band straddles the brain's edge.
        distance = np.where(brain, ndimage.distance_transform_edt(brain), ndimage.distance_transform_edt(~brain))
        above = score > threshold
        false = above & ~lesion
        print(f"| {row['patient_id']} | {row['contrast']} | {'head' if head.get(row['patient_id']) else 'stripped'} | "
              f"{int(false.sum())} | {int((false & (distance <= args.edge_voxels)).sum())} | {int((false & ~brain).sum())} | "
              f"{int((above & lesion).sum())} / {int(lesion.sum())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
