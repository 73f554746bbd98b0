#!/usr/bin/env python3
"""Calibrate the lesion policy's three bounds per contrast for one encoder, on tuning cohorts.

An encoder's standardised token scores differ in scale between encoders and contrasts, so the
bounds of :mod:`codegraph3d.decision.lesion_policy` (``token_z``, ``finding_mass``, ``voxel_z``)
are set per contrast (``threshold.*_by_contrast``). This benchmark scores each tuning batch once
(the app's scoring settings, from the cached tokens of ``tools/make_decision_cohorts.sh``), then
for every candidate ``token_z``:

1. notes each volume's evidence (the mass of its largest candidate group, 0 without one);
2. sets ``finding_mass`` to the smallest bound that flags at most ``--normals-allowed`` of the
   tuning normals, every batch's normal series pooled (the evidence bound's calibration:
   a stated false-flag budget on volumes known to be normal), or, with ``--per-batch``, at most
   that many in every batch (the small-batch bound, ``threshold.small_batch_finding_mass``:
   all-normal batches of the small size, each scored alone);
3. prints the lesion series flagged, the normals flagged per batch and, for every candidate
   ``voxel_z``, the Dice of the binary masks at those bounds (pooled over the batches' brain
   voxels, working grid; each batch's own and their mean too) and the masks' volume against the
   lesions'. ``--keep-evidence-bound`` skips step 2 (the configured bound): ``voxel_z`` alone is
   tuned, for instance on lesion kinds the evidence bound was not calibrated with.

Choose per contrast the ``token_z`` with the highest recall (ties: fewer normals, then Dice) and
the ``voxel_z`` with the highest Dice; then measure the chosen bounds on held-out cohorts with
``tools/measure_decisions.py``. Tuning figures are not results.

Usage::

    CODEGRAPH3D_CONFIG=tools/efficientnet_config.yaml .venv/bin/python tools/calibrate_lesion_bounds.py \\
        --root ROOT --batch s44=subjects48_s44 --normal-batch n42=normal48_s42 \\
        --token-z 2.5 3 3.5 4 4.5 --voxel-z 3 4 5 6 8 10 --normals-allowed 1 [--json OUT.json]

    # the small-batch bound: every all-normal batch of 12 scored alone flags at most one series
    CODEGRAPH3D_CONFIG=tools/efficientnet_intensity_config.yaml .venv/bin/python tools/calibrate_lesion_bounds.py \\
        --root ROOT --normal-batch n15=normal12_s15 ... --normal-batch n20=normal12_s20 \\
        --token-z 4.5 --normals-allowed 1 --per-batch
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure_decisions import configure, load_pooled, score_series  # noqa: E402  (a sibling script)

from codegraph3d.run.config import RunConfig  # noqa: E402
from codegraph3d.run.pipeline import decide_batch, reference_groups, token_volume_ml  # noqa: E402
from codegraph3d.scoring.batch import BatchScores  # noqa: E402
from codegraph3d.scoring.maps import token_voxel_map  # noqa: E402
from codegraph3d_research.ablations import AblationSeries  # noqa: E402


@dataclass
class ScoredBatch:
    """One tuning batch of one contrast, scored once; truths loaded on first use."""

    name: str
    contrast: str
    series: list[AblationSeries]
    scores: BatchScores
    truths: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def lesioned(self) -> np.ndarray:
        """``(B,)`` bool: which series carry a lesion."""
        return np.array([item.has_lesion for item in self.series], bool)

    def truth(self, index: int) -> np.ndarray:
        """The lesion mask of series ``index`` over its brain voxels (working grid)."""
        if index not in self.truths:
            self.truths[index] = self.series[index].lesion_labels()
        return self.truths[index]


def score_batches(root: Path, specs: Sequence[str], config: RunConfig, normals_only: bool,
                  split: int = 0) -> list[ScoredBatch]:
    """Each ``NAME=COHORT[,COHORT...]`` pooled and scored once per contrast.

    ``split`` > 0 scores the pooled series in consecutive batches of near-equal size, at most
    ``split`` each (named ``NAME[i]``): the policy's per-position statistics come from the batch,
    so bounds for small batches are calibrated on small batches.
    """
    batches = []
    for spec in specs:
        name, _, cohorts = spec.partition("=")
        for contrast, series in sorted(load_pooled(root, cohorts.split(","), config).items()):
            if normals_only:
                series = [item for item in series if not item.has_lesion]
            parts = np.array_split(np.arange(len(series)), -(-len(series) // split)) if split > 0 else [np.arange(len(series))]
            for index, members in enumerate(parts):
                label = f"{name}[{index}]" if len(parts) > 1 else name
                chosen = [series[i] for i in members]
                batches.append(ScoredBatch(label, contrast, chosen, score_series(chosen, config)))
                print(f"scored {label} {contrast}: {len(chosen)} series", file=sys.stderr)
    return batches


def with_bounds(config: RunConfig, contrast: str, token_z: float, finding_mass: float, voxel_z: float) -> RunConfig:
    """``config`` with the three bounds of ``contrast`` replaced (the other contrasts' dropped).

    The small-batch and rim bounds are turned off: the bound calibrated here is the one every
    group of a batch is held to (a rim bound is chosen afterwards: docs/RESULTS.md, "Findings at
    the brain's rim", ``tools/compare_evidence_rules.py``).
    """
    return config.with_overrides({"threshold": {
        "token_z_by_contrast": {contrast: token_z}, "finding_mass_by_contrast": {contrast: finding_mass},
        "voxel_z_by_contrast": {contrast: voxel_z}, "small_batch_volumes": 0, "small_batch_finding_mass": 0.0,
        "small_batch_finding_mass_by_contrast": {}, "rim_finding_mass": 0.0, "rim_finding_mass_by_contrast": {},
    }}, "calibration")


def decide(batch: ScoredBatch, config: RunConfig) -> Any:
    """The app's decision on the scored batch (every volume a query)."""
    first = batch.series[0].record
    coords = [item.record.tokens.coords for item in batch.series]
    groups = reference_groups([item.record.decision for item in batch.series], config.scoring.exclude_same.value)
    return decide_batch(batch.scores, coords, len(batch.series), first.tokens.grid_shape, config,
                        token_volume_ml(first), batch.contrast, groups)


def largest_evidence(batch: ScoredBatch, config: RunConfig, token_z: float) -> np.ndarray:
    """``(B,)`` the mass (z x ml) of each volume's largest candidate group at ``token_z``; 0 without one.

    Groups that are not focal enough (``threshold.finding_excess``) do not count.
    """
    configured = with_bounds(config, batch.contrast, token_z, 0.0, 10.0)
    decision = decide(batch, configured)
    policy = configured.threshold.lesion_policy(batch.contrast)
    return np.array([policy.evidence(found) for found in decision.findings])


def evidence_bound(normal_evidence: np.ndarray, allowed: int) -> float:
    """The smallest bound that at most ``allowed`` of the normal evidences exceed."""
    ordered = np.sort(normal_evidence)[::-1]
    return float(ordered[allowed]) if allowed < ordered.size else 0.0


def per_batch_bound(normal_evidence: Sequence[np.ndarray], allowed: int) -> float:
    """The smallest bound that at most ``allowed`` of every batch's normal evidences exceed."""
    return max((evidence_bound(np.asarray(values), allowed) for values in normal_evidence), default=0.0)


def mask_counts(batch: ScoredBatch, config: RunConfig) -> tuple[int, int, int, float, float]:
    """True/false positive and false negative voxels of the batch's binary masks, and mask/lesion ml.

    Counted as :mod:`measure_decisions` counts them: the brain voxels of the working grid, before
    the app drops mask components under ``threshold.min_finding_ml`` on the source grid.
    """
    decision = decide(batch, config)
    tp = fp = fn = 0
    predicted_ml = lesion_ml = 0.0
    for index, item in enumerate(batch.series):
        if not decision.flagged[index] and not item.has_lesion:
            continue
        prepared, tokens = item.record.prepared, item.record.tokens
        truth = batch.truth(index)
        predicted = np.zeros(truth.shape, bool)
        if decision.flagged[index]:
            decided = token_voxel_map(decision.mask_values[index], tokens.coords, tokens.grid_shape, prepared.size,
                                      None, config.output.mask_interpolation)
            predicted = decided[prepared.brain_mask] > decision.voxel_threshold
        voxel_ml = float(prepared.grid_spacing) ** 3 / 1000.0
        tp, fp, fn = tp + int(np.sum(predicted & truth)), fp + int(np.sum(predicted & ~truth)), fn + int(np.sum(~predicted & truth))
        predicted_ml += float(predicted.sum()) * voxel_ml
        lesion_ml += float(truth.sum()) * voxel_ml
    return tp, fp, fn, predicted_ml, lesion_ml


def dice_row(counts: Sequence[tuple[int, int, int, float, float]], names: Sequence[str]) -> dict[str, Any]:
    """Dice pooled over the batches' voxels, each batch's own, their mean, and mask ml per lesion ml.

    The pooled Dice weighs a batch by its lesion volume, so a batch of large gliomas outvotes one of
    small metastases; the mean of the batches' Dice weighs each batch alike.
    """
    def dice(tp: float, fp: float, fn: float) -> float:
        return round(2 * tp / max(2 * tp + fp + fn, 1), 3)

    tp, fp, fn, predicted_ml, lesion_ml = np.sum(counts, axis=0)
    per_batch = {name: dice(*c[:3]) for name, c in zip(names, counts)}
    return {"dice": dice(tp, fp, fn), "per_batch": per_batch,
            "mean_batch_dice": round(float(np.mean(list(per_batch.values()))), 3),
            "mask_ml_per_lesion_ml": round(predicted_ml / max(lesion_ml, 1e-9), 2)}


def calibrate_contrast(batches: Sequence[ScoredBatch], config: RunConfig, token_zs: Sequence[float],
                       voxel_zs: Sequence[float], allowed: int, per_batch: bool = False,
                       keep_bound: bool = False) -> list[dict[str, Any]]:
    """One row per ``token_z``: the evidence bound, flags per batch and Dice per ``voxel_z``.

    ``per_batch``: ``allowed`` normals in every batch, not in all batches pooled. ``keep_bound``:
    the configured evidence bound of the contrast, not a calibrated one (only ``voxel_z`` is tuned,
    so the flags stay those of the shipped bounds).
    """
    rows = []
    for token_z in token_zs:
        evidence = {batch.name: largest_evidence(batch, config, token_z) for batch in batches}
        if keep_bound:
            bound = config.threshold.bound("finding_mass", batches[0].contrast)
        elif per_batch:
            bound = per_batch_bound([evidence[b.name][~b.lesioned] for b in batches], allowed)
        else:
            bound = evidence_bound(np.concatenate([evidence[b.name][~b.lesioned] for b in batches]), allowed)
        row: dict[str, Any] = {"token_z": token_z, "finding_mass": round(bound, 3), "batches": {}, "dice": {}}
        for batch in batches:
            flagged = evidence[batch.name] > bound
            row["batches"][batch.name] = {
                "lesion_flagged": f"{int(np.sum(flagged & batch.lesioned))}/{int(batch.lesioned.sum())}",
                "normals_flagged": f"{int(np.sum(flagged & ~batch.lesioned))}/{int((~batch.lesioned).sum())}",
            }
        lesion_batches = [b for b in batches if b.lesioned.any()]
        for voxel_z in voxel_zs if lesion_batches else []:
            row["dice"][voxel_z] = dice_row([mask_counts(b, with_bounds(config, b.contrast, token_z, bound, voxel_z))
                                             for b in lesion_batches], [b.name for b in lesion_batches])
        rows.append(row)
        print(_format(batches[0].contrast, row), flush=True)
    return rows


def _format(contrast: str, row: dict[str, Any]) -> str:
    flags = "; ".join(f"{name} lesions {v['lesion_flagged']} normals {v['normals_flagged']}" for name, v in row["batches"].items())
    dice = ", ".join(f"voxel_z {v:g}: Dice {d['dice']} (batch mean {d['mean_batch_dice']}; "
                     + " ".join(f"{name} {value}" for name, value in d["per_batch"].items())
                     + f"; {d['mask_ml_per_lesion_ml']} x)" for v, d in row["dice"].items())
    return f"{contrast} token_z {row['token_z']:g}: finding_mass {row['finding_mass']:g} | {flags} | {dice}"


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, score the tuning batches, print one line per contrast and ``token_z``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="cohorts and cache/ (tools/make_decision_cohorts.sh)")
    parser.add_argument("--batch", action="append", default=[], metavar="NAME=COHORT[,COHORT...]")
    parser.add_argument("--normal-batch", action="append", default=[], metavar="NAME=COHORT[,COHORT...]",
                        help="an all-normal batch: the lesion-free series of the named cohorts")
    parser.add_argument("--token-z", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 4.5])
    parser.add_argument("--voxel-z", type=float, nargs="+", default=[3.0, 4.0, 5.0, 6.0, 8.0, 10.0])
    parser.add_argument("--normals-allowed", type=int, default=1,
                        help="tuning normals (all batches pooled) the evidence bound may flag (default 1)")
    parser.add_argument("--per-batch", action="store_true",
                        help="--normals-allowed in every batch rather than in all batches pooled (small-batch bound)")
    parser.add_argument("--keep-evidence-bound", action="store_true",
                        help="hold each contrast to its configured finding_mass and tune voxel_z alone")
    parser.add_argument("--split", type=int, default=0, metavar="N",
                        help="score each --batch and --normal-batch in batches of at most N series (default: whole)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="configuration override")
    parser.add_argument("--models", default="demo/models")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = configure(args.models, args.set)
    batches = (score_batches(args.root, args.batch, config, False, args.split)
               + score_batches(args.root, args.normal_batch, config, True, args.split))
    results = {}
    for contrast in sorted({b.contrast for b in batches}):
        chosen = [b for b in batches if b.contrast == contrast]
        results[contrast] = calibrate_contrast(chosen, config, args.token_z, args.voxel_z, args.normals_allowed,
                                               args.per_batch, args.keep_evidence_bound)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
