#!/usr/bin/env python3
"""Benchmark of the product's decisions: flags and binary masks against ground truth.

Rescoring cached cohorts (``tools/make_decision_cohorts.sh`` fills the cache) with the app's
configuration, this prints, per batch and contrast, what decisions are judged on (not AUROC
alone):

* lesion-series recall (flagged lesion series / lesion series) and normal series flagged;
* Dice of the product's binary masks (pooled over the brain voxels of the working grid) against
  Dice-max of the score maps (the best single threshold, chosen with hindsight);
* patient AUROC of the volume score, and the recall a hindsight threshold on the volume score
  reaches at the same number of normals flagged;
* per lesion series: lesion volume (ml) and whether it was flagged (the detection limit).

Batches are named groups of cohorts pooled into one batch per contrast (``--batch
all48=subjects48_s40``; ``--normal-batch`` keeps only their lesion-free series); ``--bank-studies Q --bank B`` scores every study of the cohorts ``Q``
alone against the volumes of the cohorts ``B`` as a cohort bank (the per-study clinical mode);
``--batches-with-bank`` scores every batch with the bank's volumes as references (the app's
small-batch mode).

Usage::

    CODEGRAPH3D_CONFIG=tools/demo_config.yaml .venv/bin/python tools/measure_decisions.py \\
        --root work/decisions --batch demo=demo --batch normal12=normal12_s10 \\
        [--set "threshold.finding_mass_by_contrast={T1w: 50, T2w: 30}"] [--json OUT.json]

The demo configuration sets the evidence bound per contrast, so ``--set threshold.finding_mass``
alone does not change T1w or T2w batches; set ``finding_mass_by_contrast`` (replaced whole).

Figures are on the working grid (224^3), not the source grids; the app's own evaluation
(``python -m codegraph3d_research.evaluate``) measures its written SEGs on the source grids.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml


from codegraph3d_research.ablations import AblationSeries, load_cohort
from codegraph3d.run.config import ConfigError, RunConfig, load_config
from codegraph3d.decision.lesion_policy import LESION_POLICY_NAME
from codegraph3d.scoring.maps import token_voxel_map
from codegraph3d_research.metrics import StreamingBinaryMetrics, patient_auroc
from codegraph3d.run.pipeline import (
    bank_groups, bank_scores_reusable, decide_batch, decided_against_bank, reference_groups, score_configured,
    series_sharing_the_bank, token_volume_ml,
)
from codegraph3d.scoring.batch import BatchScores
from codegraph3d.decision.thresholds import BANK_POLICY_NAME, POLICY_NAME

OPERATING_POINTS = Path(__file__).resolve().parents[1] / "codegraph3d" / "decision" / "operating_points.json"


@dataclass
class Tally:
    """Decisions and voxel counts of one scenario and contrast."""

    lesion_series: int = 0
    lesion_flagged: int = 0
    normal_series: int = 0
    normal_flagged: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    volume_scores: list[float] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    flags: list[bool] = field(default_factory=list)
    lesions: list[dict[str, Any]] = field(default_factory=list)
    # Per series: its largest finding's evidence against the bound in effect (lesion policy).
    evidence: list[dict[str, Any]] = field(default_factory=list)
    # Per series: its study, whether the study holds a lesion, whether the series was flagged.
    studies: list[dict[str, Any]] = field(default_factory=list)
    voxel: StreamingBinaryMetrics | None = None
    voxel_z: StreamingBinaryMetrics | None = None

    def summary(self) -> dict[str, Any]:
        """Counts as fractions, AUROC, Dice at the threshold and Dice-max, and the lesion list."""
        scores, labels = np.array(self.volume_scores), np.array(self.labels, bool)
        auroc = patient_auroc(scores, labels) if labels.any() and (~labels).any() else float("nan")
        dice_max = self.voxel.dice_max()[0] if self.voxel is not None and labels.any() else float("nan")
        dice_max_z = self.voxel_z.dice_max()[0] if self.voxel_z is not None and labels.any() else float("nan")
        dice = 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp + self.fp + self.fn else float("nan")
        return {
            "lesion_recall": f"{self.lesion_flagged}/{self.lesion_series}",
            "normals_flagged": f"{self.normal_flagged}/{self.normal_series}",
            "hindsight_recall": _hindsight_recall(scores, labels, self.normal_flagged),
            "patient_auroc": round(auroc, 3),
            "dice_at_threshold": round(dice, 3),
            "dice_max": round(dice_max, 3),
            "dice_max_z": round(dice_max_z, 3),
            "lesions": self.lesions,
            "evidence": self.evidence,
            "studies": self.studies,
        }


def _hindsight_recall(scores: np.ndarray, labels: np.ndarray, normals_flagged: int) -> str:
    """Lesion series above the best volume-score threshold that flags ``normals_flagged`` normals."""
    if not labels.any():
        return "n/a"
    normal = np.sort(scores[~labels])[::-1]
    bound = normal[normals_flagged] if normals_flagged < normal.size else -np.inf
    return f"{int(np.sum(scores[labels] > bound))}/{int(labels.sum())}"


def batch_groups(series: Sequence[AblationSeries], n: int, config: RunConfig) -> list[Hashable]:
    """Scoring groups as the app gives them: the batch's first ``n`` volumes, then bank volumes."""
    exclude = config.scoring.exclude_same.value
    own = reference_groups([item.record.decision for item in series[:n]], exclude)
    bank = reference_groups([item.record.decision for item in series[n:]], exclude) if len(series) > n else []
    return own + bank_groups(bank)


def score_series(series: Sequence[AblationSeries], config: RunConfig, n: int | None = None,
                 known: dict[tuple[str, ...], list[list[np.ndarray]]] | None = None) -> BatchScores:
    """Score one batch as the app does (scoring section); volumes after the first ``n`` are bank volumes.

    ``known``: the bank volumes' scores against each other by the bank volumes' uids, filled and
    read as the app's ``bank.reuse_scores`` does (MuSc with bank groups only), so that studies
    scored one by one against one bank score only themselves.
    """
    settings = config.scoring
    tokens = [item.record.tokens for item in series]
    n = len(series) if n is None else n
    groups = batch_groups(series, n, config)
    # The known scores stand where the app's bank would keep them (score_batch skips them where
    # scoring the queries alone would cost more).
    reusable = known is not None and bank_scores_reusable(config, known, groups, n)
    key = tuple(item.uid for item in series[n:])
    scores = score_configured(
        [[t.tokens[layer] for t in tokens] for layer in range(len(tokens[0].tokens))],
        groups, [t.coords for t in tokens], tokens[0].grid_shape, settings,
        known_scores=known.get(key) if reusable else None,  # type: ignore[union-attr]
    )
    if reusable:
        known.setdefault(key, [layer[n:] for layer in scores.per_layer])  # type: ignore[union-attr]
    return scores


def _tally_batch(series: Sequence[AblationSeries], n: int, config: RunConfig, tally: Tally,
                 known: dict[tuple[str, ...], list[list[np.ndarray]]] | None = None,
                 shared_by: int | None = None) -> None:
    """Score ``series`` (queries first, then references), decide, and add the queries to ``tally``.

    ``shared_by``: the series decided against the bank in the app's run, every contrast's (they
    share the bank's rate, as in the app: :func:`series_sharing_the_bank`).
    """
    scores = score_series(series, config, n, known)
    coords = [item.record.tokens.coords for item in series]
    groups = batch_groups(series, n, config)
    banked = decided_against_bank(len(series) - n, config)
    decision = decide_batch(scores, coords, n, series[0].record.tokens.grid_shape, config,
                            token_volume_ml(series[0].record), series[0].record.decision.contrast, groups,
                            shared_by=shared_by if banked else None)
    mask_interpolation = config.output.mask_interpolation
    score_interpolation = config.output.score_interpolation
    policy = config.threshold.lesion_policy(series[0].record.decision.contrast, with_bank=banked)
    for index, item in enumerate(series[:n]):
        prepared, tokens = item.record.prepared, item.record.tokens
        truth = item.lesion_labels()
        raw = token_voxel_map(scores.token_scores[index], tokens.coords, tokens.grid_shape, prepared.size,
                              None, score_interpolation)[prepared.brain_mask]
        flagged = bool(decision.flagged[index])
        predicted = np.zeros(truth.shape, bool)
        if flagged:
            values = scores.token_scores[index] if decision.mask_values is None else decision.mask_values[index]
            decided = token_voxel_map(values, tokens.coords, tokens.grid_shape, prepared.size, None, mask_interpolation)
            predicted = decided[prepared.brain_mask] > decision.voxel_threshold
        tally.tp += int(np.sum(predicted & truth))
        tally.fp += int(np.sum(predicted & ~truth))
        tally.fn += int(np.sum(~predicted & truth))
        tally.voxel = tally.voxel or StreamingBinaryMetrics(0.0, 4.0, n_bins=2000)
        tally.voxel.update(np.clip(raw, 0.0, 4.0), truth)
        if decision.mask_values is not None:
            # The lesion policy's standardised map: Dice-max of the map the decisions are made on.
            z_map = token_voxel_map(decision.z_values[index], tokens.coords, tokens.grid_shape, prepared.size,
                                    None, mask_interpolation)[prepared.brain_mask]
            tally.voxel_z = tally.voxel_z or StreamingBinaryMetrics(0.0, 40.0, n_bins=4000)
            tally.voxel_z.update(np.clip(z_map, 0.0, 40.0), truth)
        if decision.findings is not None:
            tally.evidence.append({"uid": item.uid, "lesion": item.has_lesion, "bound": round(float(decision.volume_threshold), 3),
                                   "evidence": round(policy.evidence(decision.findings[index]), 3),
                                   # The bank's largest evidence values: the bound at any other rank.
                                   "bank_evidence": _bank_evidence(decision.params),
                                   # The raw volume score and the largest z, beside the bank volumes'
                                   # own volume scores (scored against the other bank volumes): what a
                                   # bound on the volume score instead of the evidence would have seen.
                                   "volume_score": round(float(scores.volume_scores[index]), 4),
                                   "peak_z": round(float(np.max(decision.z_values[index], initial=0.0)), 3),
                                   "bank_volume_scores": _largest(scores.volume_scores[n:])})
        tally.studies.append({"study": item.record.decision.study_instance_uid, "lesion": item.has_lesion,
                              "flagged": flagged})
        tally.volume_scores.append(float(scores.volume_scores[index]))
        tally.labels.append(item.has_lesion)
        tally.flags.append(flagged)
        if item.has_lesion:
            tally.lesion_series += 1
            tally.lesion_flagged += flagged
            # Working-grid (template-space) millilitres: the registration's scaling is small.
            voxel_ml = float(prepared.grid_spacing) ** 3 / 1000.0
            tally.lesions.append({"uid": item.uid, "lesion_voxels": int(truth.sum()), "lesion_ml": round(truth.sum() * voxel_ml, 2),
                                  "predicted_ml": round(predicted.sum() * voxel_ml, 2),
                                  "flagged": flagged, "dice": round(2 * np.sum(predicted & truth) / max(predicted.sum() + truth.sum(), 1), 3)})
        else:
            tally.normal_series += 1
            tally.normal_flagged += flagged


def study_level(by_contrast: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Lesion and normal studies flagged, a study flagged when any of its series is (report.json's study flag).

    A study counts as a lesion study when any of its series holds a lesion (the cohorts draw one
    lesion per subject, seen in every contrast).
    """
    studies: dict[str, tuple[bool, bool]] = {}
    for row in by_contrast.values():
        for entry in row.get("studies", []):
            lesion, flagged = studies.get(entry["study"], (False, False))
            studies[entry["study"]] = (lesion or entry["lesion"], flagged or entry["flagged"])
    lesion = [flagged for has_lesion, flagged in studies.values() if has_lesion]
    normal = [flagged for has_lesion, flagged in studies.values() if not has_lesion]
    return {"lesion_studies_flagged": f"{sum(lesion)}/{len(lesion)}",
            "normal_studies_flagged": f"{sum(normal)}/{len(normal)}"}


def _batches(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The measured batches of ``results`` (name, rows per contrast), without its other entries."""
    return [(name, rows) for name, rows in results.items() if name not in ("settings", "study_level")]


def _bank_evidence(params: Mapping[str, Any]) -> list[float] | None:
    """The bank calibration's largest evidence values (the bound at other ranks), if calibrated."""
    calibration = params.get("bank_calibration")
    return list(calibration["largest_evidence"]) if isinstance(calibration, Mapping) else None


def _largest(values: np.ndarray, count: int = 8) -> list[float] | None:
    """The ``count`` largest of ``values``, largest first (``None`` when there are none)."""
    values = np.asarray(values, float)
    return [round(float(v), 4) for v in np.sort(values)[::-1][:count]] if values.size else None


_ENCODERS: set[str] = set()


def load_pooled(root: Path, names: Sequence[str], config: RunConfig) -> dict[str, list[AblationSeries]]:
    """The series of the named cohorts, pooled by contrast (cohort order kept)."""
    pooled: dict[str, list[AblationSeries]] = {}
    for name in names:
        cohort = load_cohort(root / "cache", root / name, config)
        _ENCODERS.add(cohort.settings["encoder"]["name"])
        for contrast, series in cohort.by_contrast.items():
            pooled.setdefault(contrast, []).extend(series)
    return pooled


def measure_batch(
    root: Path, names: Sequence[str], config: RunConfig, normals_only: bool = False,
    bank: Mapping[str, list[AblationSeries]] | None = None,
) -> dict[str, Any]:
    """One pooled batch per contrast of the named cohorts (``normals_only``: their lesion-free series).

    ``bank``: per contrast, cohort-bank volumes scored with the batch as its references (the app
    joins them to a batch of fewer than ``bank.min_patients`` patients); only the batch is decided.
    """
    out = {}
    pooled = {contrast: [item for item in series if not (normals_only and item.has_lesion)]
              for contrast, series in sorted(load_pooled(root, names, config).items())}
    drawn = {contrast: _drawn_references(series, (bank or {}).get(contrast, [])) for contrast, series in pooled.items()}
    # As in the app's run: every contrast's series decided against the bank share its rate.
    shared_by = series_sharing_the_bank(((len(pooled[c]), len(drawn[c])) for c in pooled), config)
    for contrast, series in pooled.items():
        references = drawn[contrast]
        tally = Tally()
        _tally_batch([*series, *references], len(series), config, tally, shared_by=shared_by)
        out[contrast] = {**tally.summary(), "n_bank_volumes": len(references)} if bank else tally.summary()
    return out


def _drawn_references(series: Sequence[AblationSeries], bank: Sequence[AblationSeries]) -> list[AblationSeries]:
    """The bank volumes a batch draws, as the app does: never one of its own patients or studies."""
    patients = {item.record.decision.patient_id for item in series}
    studies = {item.record.decision.study_instance_uid for item in series}
    return [ref for ref in bank if ref.record.decision.patient_id not in patients
            and ref.record.decision.study_instance_uid not in studies]


def measure_bank_studies(root: Path, queries: Sequence[str], bank: Sequence[str], config: RunConfig,
                         reuse: bool = True) -> dict[str, Any]:
    """Each study of ``queries`` scored alone against the series of ``bank`` as references.

    ``reuse``: score the bank volumes against each other once per draw, as the app does with
    ``bank.reuse_scores`` (``False``: for every study, to time what that saves).
    """
    references = load_pooled(root, bank, config)
    out = {}
    known: dict[tuple[str, ...], list[list[np.ndarray]]] | None = {} if reuse else None  # per draw
    pooled = load_pooled(root, queries, config)
    drawn = {(contrast, item.uid): _drawn_references([item], references.get(contrast, []))
             for contrast, series in pooled.items() for item in series}
    # A study's series are decided in one run, as the app does: they share the bank's rate.
    per_study: dict[str, list[tuple[int, int]]] = {}
    for contrast, series in pooled.items():
        for item in series:
            per_study.setdefault(item.record.decision.study_instance_uid, []).append((1, len(drawn[contrast, item.uid])))
    for contrast, series in sorted(pooled.items()):
        tally = Tally()
        for item in series:
            _tally_batch([item, *drawn[contrast, item.uid]], 1, config, tally, known,
                         shared_by=series_sharing_the_bank(per_study[item.record.decision.study_instance_uid], config))
        out[contrast] = {**tally.summary(), "n_bank_volumes": len(references.get(contrast, []))}
    return out


def configure(models: str, assignments: Sequence[str]) -> RunConfig:
    """The app's configuration with ``SECTION.FIELD=VALUE`` overrides, validated as the app validates."""
    override: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        key, _, text = assignment.partition("=")
        section, _, name = key.partition(".")
        override.setdefault(section, {})[name] = yaml.safe_load(text)
    try:
        return load_config(models, override=override)
    except ConfigError as error:
        raise SystemExit(f"--set: {error}") from error


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, measure every batch asked for, print and optionally save the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("work/decisions"), help="cohorts and cache/ (default work/decisions)")
    parser.add_argument("--batch", action="append", default=[], metavar="NAME=COHORT[,COHORT...]")
    parser.add_argument("--normal-batch", action="append", default=[], metavar="NAME=COHORT[,COHORT...]",
                        help="an all-normal batch: the lesion-free series of the named cohorts")
    parser.add_argument("--bank-studies", nargs="+", default=[], metavar="COHORT", help="cohorts scored study by study")
    parser.add_argument("--bank", nargs="+", default=[], metavar="COHORT", help="cohorts that form the bank")
    parser.add_argument("--fresh-bank-scores", action="store_true",
                        help="with --bank-studies: score the bank volumes anew for every study (the app with "
                        "bank.reuse_scores false), to time what reusing them saves")
    parser.add_argument("--batches-with-bank", action="store_true",
                        help="score --batch and --normal-batch batches with the --bank volumes as references "
                        "(as the app does for a batch of fewer than bank.min_patients patients)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="configuration override")
    parser.add_argument("--models", default="demo/models")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--lesions", action="store_true", help="print every lesion series")
    parser.add_argument("--record-operating-point", nargs="+", default=[], metavar="BATCH",
                        help="all-normal batches (names given to --batch) whose flags become the policy's "
                        "measured false-flag rate in codegraph3d/decision/operating_points.json")
    args = parser.parse_args(argv)
    config = configure(args.models, args.set)
    results: dict[str, Any] = {"settings": {"threshold": config.as_dict()["threshold"], "scoring": config.as_dict()["scoring"],
                                            "mask_interpolation": config.output.mask_interpolation,
                                            "score_interpolation": config.output.score_interpolation}}
    if args.batches_with_bank and not args.bank:
        parser.error("--batches-with-bank needs --bank")
    if args.batches_with_bank and args.record_operating_point:
        parser.error("--record-operating-point records batches scored alone; drop --batches-with-bank")
    bank = load_pooled(args.root, args.bank, config) if args.batches_with_bank else None
    for spec in args.batch:
        name, _, cohorts = spec.partition("=")
        results[name] = measure_batch(args.root, cohorts.split(","), config, bank=bank)
    for spec in args.normal_batch:
        name, _, cohorts = spec.partition("=")
        results[name] = measure_batch(args.root, cohorts.split(","), config, normals_only=True, bank=bank)
    if args.bank_studies:
        results["single studies vs bank"] = measure_bank_studies(args.root, args.bank_studies, args.bank, config,
                                                                 reuse=not args.fresh_bank_scores)
    results["study_level"] = {name: study_level(rows) for name, rows in _batches(results)}
    _print(results, args.lesions)
    _detection_limit(results)
    if args.record_operating_point:
        _record(results, args.record_operating_point, config)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


def _record(results: Mapping[str, Any], batches: Sequence[str], config: RunConfig) -> None:
    """Write the flags of all-normal batches as the policy's operating point, per contrast."""
    if len(_ENCODERS) != 1:
        raise SystemExit(f"the cohorts were encoded with {sorted(_ENCODERS)}; one encoder per operating point")
    policy = {"lesion": LESION_POLICY_NAME, "robust_z": POLICY_NAME, "bank": BANK_POLICY_NAME}[config.threshold.policy]
    table = json.loads(OPERATING_POINTS.read_text(encoding="utf-8"))
    by_contrast: dict[str, list[int]] = {}
    for name in batches:
        for contrast, row in results[name].items():
            if row["lesion_recall"] != "0/0":
                raise SystemExit(f"--record-operating-point {name}: {contrast} holds lesion series; use all-normal batches")
            flagged, normals = (int(v) for v in row["normals_flagged"].split("/"))
            counts = by_contrast.setdefault(contrast, [0, 0])
            counts[0] += flagged
            counts[1] += normals
    for contrast, (flagged, normals) in sorted(by_contrast.items()):
        key = {"policy": policy, "encoder": next(iter(_ENCODERS)), "contrast": contrast}
        settings = json.loads(json.dumps(config.decision_settings().record(contrast)))
        table["entries"] = [e for e in table["entries"] if {k: e[k] for k in key} != key or e["settings"] != settings]
        table["entries"].append({**key, "settings": settings, "flagged": flagged, "normal_series": normals,
                                 "measured_on": f"all-normal batches {', '.join(batches)} (synthetic cohorts, "
                                 "tools/make_decision_cohorts.sh; tools/measure_decisions.py)"})
    OPERATING_POINTS.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print(f"recorded operating points in {OPERATING_POINTS}: {by_contrast}")


VOLUME_BINS_ML = (0.0, 2.0, 4.0, 8.0, float("inf"))


def _detection_limit(results: Mapping[str, Any]) -> None:
    """Lesion-series recall by lesion volume (ml on the working grid), every batch pooled."""
    print("\n| contrast | " + " | ".join(f"{lo:g}-{hi:g} ml" for lo, hi in zip(VOLUME_BINS_ML, VOLUME_BINS_ML[1:])) + " |")
    print("|---|" + "---|" * (len(VOLUME_BINS_ML) - 1))
    contrasts = sorted({c for _, rows in _batches(results) for c in rows})
    for contrast in contrasts:
        lesions = [les for _, rows in _batches(results) for les in rows.get(contrast, {}).get("lesions", [])]
        cells = []
        for lo, hi in zip(VOLUME_BINS_ML, VOLUME_BINS_ML[1:]):
            inside = [les["flagged"] for les in lesions if lo <= les["lesion_ml"] < hi]
            cells.append(f"{sum(inside)}/{len(inside)}")
        print(f"| {contrast} | " + " | ".join(cells) + " |")


def _print(results: Mapping[str, Any], lesions: bool) -> None:
    print("| batch | contrast | lesion recall | normals flagged | hindsight recall | patient AUROC | Dice at threshold | Dice-max | Dice-max of z |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, by_contrast in _batches(results):
        for contrast, row in by_contrast.items():
            print(f"| {name} | {contrast} | {row['lesion_recall']} | {row['normals_flagged']} | {row['hindsight_recall']} | "
                  f"{row['patient_auroc']} | {row['dice_at_threshold']} | {row['dice_max']} | {row['dice_max_z']} |")
            for lesion in row["lesions"] if lesions else []:
                print(f"|   | {lesion['uid'][-12:]} | {lesion['lesion_ml']} ml | flagged {lesion['flagged']} | predicted {lesion['predicted_ml']} ml | | | {lesion['dice']} | |")
    # A study is flagged when any of its series is: what a worklist sorts on (report.json's studies).
    print("\n| batch | lesion studies flagged | normal studies flagged |\n|---|---|---|")
    for name, row in results["study_level"].items():
        print(f"| {name} | {row['lesion_studies_flagged']} | {row['normal_studies_flagged']} |")


if __name__ == "__main__":
    sys.exit(main())
