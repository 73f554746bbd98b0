"""Score a run's outputs against ground truth: ``python -m codegraph3d.evaluate --run OUT --truth COHORT``.

Inputs:

* ``OUT``: the app's output folder (report.json, ``SEG/*_binary.dcm``, ``SEG/*_score.dcm``; the
  FRACTIONAL SEGs are needed for voxel-level metrics, so run with ``output.fractional: true``);
* ``COHORT``: a folder in the demo cohort's format: ``labels.json`` (per study and series:
  ``series_instance_uid``, ``has_lesion``, ``truth.lesion`` and ``truth.brain`` NIfTI paths relative to
  the folder, on the series' native grid) and ``dicom/`` (the source series, for slice order).

Per contrast batch: patient-level AUROC and AP (one score per series, from report.json), voxel-level
AUROC and AP pooled over brain voxels, Dice-max with its threshold and the IoU there, and the Dice
of the product's BINARY masks (what a user actually gets). Voxel metrics use the streaming
histograms of :mod:`codegraph3d.metrics`, so no voxel array is ever sorted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np

from .io.dicom import load_series_volume, scan_headers
from .metrics import StreamingBinaryMetrics, patient_auroc, patient_average_precision

__all__ = ["evaluate_run", "main"]


def _nifti_zyx(path: Path) -> np.ndarray:
    # NIfTI voxel (i, j, k) is the series' (x, y, z) index.
    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0) > 0


def _seg_array(path: Path, sop_uids: list[str]) -> np.ndarray:
    seg = hd.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance(sop_uids, segment_numbers=[1], rescale_fractional=True)
    return np.asarray(pixels[..., 0], dtype=np.float32)


def evaluate_run(run: str | Path, truth: str | Path, n_bins: int = 1000) -> dict[str, Any]:
    """Compute the metrics of one run against one cohort's ground truth; see the module docstring."""
    run, truth = Path(run), Path(truth)
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    if report.get("status") != "completed":
        raise ValueError(f"{run / 'report.json'}: the run did not complete ({report.get('message')})")
    labels = json.loads((truth / "labels.json").read_text(encoding="utf-8"))
    series_truth = {s["series_instance_uid"]: s for study in labels["studies"] for s in study["series"]}
    headers = {s.series_instance_uid: s for s in scan_headers(truth / "dicom").series}
    per_batch: dict[str, dict[str, Any]] = defaultdict(lambda: {"scores": [], "labels": [], "voxel": None, "binary": [0, 0, 0]})
    for row in report["series"]:
        uid = row["series_instance_uid"]
        if row["status"] != "scored" or uid not in series_truth:
            continue
        entry = per_batch[row["contrast"]]
        entry["scores"].append(row["score"])
        entry["labels"].append(bool(series_truth[uid]["has_lesion"]))
        if not row.get("seg_score"):
            continue
        volume = load_series_volume(headers[uid]).volume
        lesion = _nifti_zyx(truth / series_truth[uid]["truth"]["lesion"])
        brain = _nifti_zyx(truth / series_truth[uid]["truth"]["brain"])
        score = _seg_array(run / row["seg_score"], volume.sop_instance_uids)
        binary = _seg_array(run / row["seg_binary"], volume.sop_instance_uids) > 0.5
        if entry["voxel"] is None:
            entry["voxel"] = StreamingBinaryMetrics(0.0, 1.0, n_bins=n_bins)
        entry["voxel"].update(score[brain], lesion[brain])
        tp = int((binary & lesion).sum())
        entry["binary"][0] += tp
        entry["binary"][1] += int((binary & ~lesion).sum())
        entry["binary"][2] += int((~binary & lesion).sum())
    results: dict[str, Any] = {"run": str(run), "truth": str(truth), "encoder": report["encoder"], "batches": {}}
    for contrast, entry in per_batch.items():
        scores, y = np.array(entry["scores"]), np.array(entry["labels"])
        item: dict[str, Any] = {
            "n_series": int(len(y)),
            "n_lesion": int(y.sum()),
            "patient_auroc": patient_auroc(scores, y),
            "patient_ap": patient_average_precision(scores, y),
        }
        if entry["voxel"] is not None:
            voxel = entry["voxel"]
            dice, threshold, iou = voxel.dice_max()
            tp, fp, fn = entry["binary"]
            item.update(
                voxel_auroc=voxel.auroc(),
                voxel_ap=voxel.average_precision(),
                dice_max=dice,
                dice_max_threshold_unit=threshold,
                iou_at_dice_max=iou,
                dice_at_product_threshold=2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan"),
            )
        results["batches"][contrast] = item
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the app's output folder")
    parser.add_argument("--truth", required=True, help="cohort folder with labels.json, truth/ and dicom/")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    results = evaluate_run(args.run, args.truth)
    print(f"encoder: {results['encoder']['description']}")
    for contrast, item in results["batches"].items():
        print(f"[{contrast}] " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in item.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
