"""Per-position intensity z-score baseline, scored like the product.

``python -m codegraph3d_research.baseline --input DICOM_DIR --truth TRUTH_DIR [--out DIR] [--config FILE]
[--compare PRODUCT_METRICS_JSON]``

The simplest batch-based zero-shot detector: a voxel is anomalous when its intensity is far from
the same working-grid voxel of the other patients' volumes. It shares everything with the
product except the scoring, so the product has to beat it to show that its tokens add anything:

* **input and preprocessing**: :func:`codegraph3d.run.pipeline.scan_input` and
  :func:`~codegraph3d.run.pipeline.select_input`, then per series
  :func:`codegraph3d.io.dicom.load_series_volume` and
  :func:`codegraph3d.preprocess.chain.preprocess_volume` with the run configuration
  (:func:`codegraph3d.run.config.load_config`, so ``CODEGRAPH3D_CONFIG`` applies), on the same
  brain-aligned ``grid_size x patch`` working grid (224^3 by default; a smaller grid through the
  configuration, e.g. ``tokens.grid_size: 8``, cuts memory and time);
* **batches**: one per contrast, volumes never compared with volumes of the same patient
  (``scoring.exclude_same``, :func:`codegraph3d.run.pipeline.reference_groups`);
* **score**: for volume ``i`` and working voxel ``v`` inside its brain,
  ``|z| = |x_i(v) - mean_j x_j(v)| / max(std_j x_j(v), std_floor)`` over the other-patient
  volumes ``j`` whose brain mask holds ``v`` (sample standard deviation; 0 where fewer than two
  such volumes exist); then a Gaussian of ``smoothing_sigma_mm`` (0 = none) and the brain mask;
* **volume score**: the ``volume_percentile`` percentile of the smoothed map over the brain;
  the default 100 is the maximum, as the product's volume score is its maximum token score;
* **map back**: :func:`codegraph3d.preprocess.chain.resample_to_source` (linear) onto each series'
  native grid;
* **metrics**: :class:`codegraph3d_research.evaluate.BatchAccumulator` against the truth folder, exactly as
  :mod:`codegraph3d_research.evaluate` does for the product (same truth checks; the voxel histogram spans
  ``[0, the batch's largest |z|]``). The baseline has no binary threshold, so there is no "Dice at
  the product's threshold".

Memory: the batch's working-grid images (``S^3`` float32, 45 MB at 224^3) and masks are held
together, plus two float64 sums; about 1 GB for a batch of 12 at 224^3.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import defaultdict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from codegraph3d.run.config import ConfigError, RunConfig, config_hash, load_config
from .evaluate import (
    BatchAccumulator,
    Evaluation,
    EvaluationInputError,
    SeriesTruth,
    TruthCohort,
    check_out_dir,
    excluded_summary,
    finite_or_none,
    metrics_table,
    notes_and_exclusions,
    write_evaluation,
)
from codegraph3d.io.dicom import load_series_volume
from codegraph3d.io.selection import SeriesDecision
from codegraph3d.run.pipeline import CohortError, reference_groups, scan_input, select_input
from codegraph3d.preprocess.chain import (
    PreprocessConfig,
    PreprocessedVolume,
    preprocess_volume,
    resample_to_source,
)
from codegraph3d.core.volume import Volume

__all__ = [
    "BASELINE_SCHEMA",
    "BaselineSettings",
    "baseline_markdown",
    "comparison_table",
    "main",
    "run_baseline",
    "smooth_map",
    "volume_score",
    "zscore_maps",
]

logger = logging.getLogger(__name__)

# Kept from the module's first home (codegraph3d.baseline): readers of saved results check it.
BASELINE_SCHEMA = "codegraph3d.baseline/1"


@dataclass(frozen=True)
class BaselineSettings:
    """Settings of the z-score baseline.

    Parameters
    ----------
    std_floor : float
        Smallest standard deviation used (intensities are standardised to [0, 1]; landmarks
        10 percentiles apart are 0.1 apart). Where every reference agrees to within noise, a
        small real difference would otherwise give ``|z|`` in the hundreds and set the volume
        maximum; 0.05 is half a decile step.
    smoothing_sigma_mm : float
        Gaussian sigma (mm) applied to the ``|z|`` map; 0 disables it. Single-voxel noise and
        misalignment edges are thinner than any lesion worth finding; 2 mm keeps 5 mm lesions.
    volume_percentile : float
        Percentile of the brain's smoothed ``|z|`` giving the volume score; 100 = maximum.
    n_bins : int
        Bins of the voxel histogram over ``[0, the batch's largest |z|]``.
    """

    std_floor: float = 0.05
    smoothing_sigma_mm: float = 2.0
    volume_percentile: float = 100.0
    n_bins: int = 2000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.std_floor) and self.std_floor > 0):
            raise ValueError(f"std_floor must be a positive number; got {self.std_floor}")
        if not (math.isfinite(self.smoothing_sigma_mm) and self.smoothing_sigma_mm >= 0):
            raise ValueError(f"smoothing_sigma_mm must be >= 0 (0 = no smoothing); got {self.smoothing_sigma_mm}")
        if not 0.0 < self.volume_percentile <= 100.0:
            raise ValueError(f"volume_percentile must lie in (0, 100] (100 = maximum); got {self.volume_percentile}")
        if isinstance(self.n_bins, bool) or not isinstance(self.n_bins, int) or self.n_bins < 10:
            raise ValueError(f"n_bins must be an integer >= 10; got {self.n_bins!r}")


def zscore_maps(
    images: Sequence[np.ndarray],
    brains: Sequence[np.ndarray],
    groups: Sequence[Hashable],
    std_floor: float,
) -> Iterator[np.ndarray]:
    """Yield each volume's ``|z|`` against the other groups' volumes at the same voxel.

    Parameters
    ----------
    images : sequence of numpy.ndarray
        Same-shape volumes on one working grid.
    brains : sequence of numpy.ndarray
        Their boolean brain masks: a volume is a reference at a voxel only inside its brain.
    groups : sequence of hashable
        Group label per volume (the patient): volumes of the same group never reference each
        other.
    std_floor : float
        Smallest standard deviation used.

    Yields
    ------
    numpy.ndarray
        float32 ``|z|`` per volume, in input order; 0 outside its brain and where fewer than two
        reference volumes cover the voxel.

    Notes
    -----
    One pass of running sums (float64) over the batch plus one per group, not one per pair, so a
    batch of ``B`` volumes costs ``O(B)`` volume operations.
    """
    if not (len(images) == len(brains) == len(groups)) or not images:
        raise ValueError(
            f"need the same positive number of images, brains and groups; got {len(images)}, {len(brains)}, {len(groups)}"
        )
    shape = images[0].shape
    for index, (image, brain) in enumerate(zip(images, brains)):
        if image.shape != shape or brain.shape != shape:
            raise ValueError(f"volume {index}: image {image.shape} / brain {brain.shape} differ from {shape}")
    total1 = np.zeros(shape, np.float64)
    total2 = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.int32)
    for image, brain in zip(images, brains):
        values = image[brain].astype(np.float64)
        total1[brain] += values
        total2[brain] += values * values
        count += brain
    members: dict[Hashable, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    for index in range(len(images)):
        # In-place arithmetic throughout: at 224^3 each float64 temporary is 90 MB.
        s1, s2, n = total1.copy(), total2.copy(), count.copy()
        for j in members[groups[index]]:
            values = images[j][brains[j]].astype(np.float64)
            s1[brains[j]] -= values
            s2[brains[j]] -= values * values
            n -= brains[j]
        valid = brains[index] & (n >= 2)
        np.maximum(n, 2, out=n)
        mean = s1
        mean /= n
        # Sample variance (s2 - n mean^2) / (n - 1), clipped at 0 against rounding.
        square = np.multiply(mean, mean)
        square *= n
        variance = s2
        variance -= square
        del square
        variance /= n - 1
        np.maximum(variance, 0.0, out=variance)
        std = np.sqrt(variance, out=variance)
        np.maximum(std, std_floor, out=std)
        z = np.subtract(images[index], mean, dtype=np.float64)
        np.abs(z, out=z)
        z /= std
        z[~valid] = 0.0
        yield z.astype(np.float32)


def smooth_map(z: np.ndarray, brain: np.ndarray, sigma_voxels: float) -> np.ndarray:
    """Gaussian-smooth a ``|z|`` map and zero it outside the brain (``sigma_voxels`` 0: mask only).

    Values outside the brain are zeroed first as well, so nothing outside leaks in.
    """
    z = np.where(brain, z, 0.0).astype(np.float32)
    if sigma_voxels > 0:
        z = ndimage.gaussian_filter(z, sigma=float(sigma_voxels), mode="constant", truncate=3.0)
    return np.where(brain, z, 0.0).astype(np.float32)


def volume_score(z: np.ndarray, brain: np.ndarray, percentile: float) -> float:
    """The ``percentile`` of ``z`` over the brain (100 = maximum); 0 for an empty brain."""
    values = z[brain]
    if values.size == 0:
        return 0.0
    return float(values.max() if percentile >= 100.0 else np.percentile(values, percentile))


@dataclass
class _Member:
    """One series of a batch between loading and scoring."""

    decision: SeriesDecision
    prepared: PreprocessedVolume
    volume: Volume | None  # the source volume, kept for lesion series' montage slices only
    lesion: np.ndarray
    brain: np.ndarray
    lesion_ml: float


def _load_member(decision: SeriesDecision, pre: PreprocessConfig, cohort: TruthCohort,
                 keep_cases: bool) -> _Member:
    if decision.series is None:
        raise ValueError(f"series {decision.series_instance_uid}: the selection kept no header to load it from")
    volume = load_series_volume(decision.series).volume
    volume.series_instance_uid = decision.series_instance_uid
    prepared = preprocess_volume(volume, pre)
    lesion, brain = cohort.load_masks(decision.series_instance_uid, volume)
    entry = cohort.series[decision.series_instance_uid]
    return _Member(
        decision=decision,
        prepared=prepared,
        volume=volume if (keep_cases and entry.has_lesion) else None,
        lesion=lesion,
        brain=brain,
        lesion_ml=round(float(lesion.sum()) * float(np.prod(volume.spacing)) / 1000.0, 3),
    )


@dataclass
class _BaselineRun:
    """What the batches of one baseline run fill in: per-contrast accumulators and the series rows."""

    cohort: TruthCohort
    settings: BaselineSettings
    accumulators: dict[str, BatchAccumulator] = field(default_factory=dict)
    series_rows: list[dict[str, Any]] = field(default_factory=list)
    excluded_rows: list[dict[str, Any]] = field(default_factory=list)

    def accumulator(self, contrast: str) -> BatchAccumulator:
        """The contrast's accumulator, made on first use (so the batches keep first-seen order)."""
        if contrast not in self.accumulators:
            self.accumulators[contrast] = BatchAccumulator(contrast, 0.0, 1.0, self.settings.n_bins)
            self.accumulators[contrast].notes.append(
                "Dice at the product's threshold: not applicable, the baseline has no binary threshold"
            )
        return self.accumulators[contrast]

    def exclude(self, decision: SeriesDecision, reason: str) -> None:
        """List a series that was not scored; one with truth also counts in its batch's exclusions."""
        uid = decision.series_instance_uid
        entry = self.cohort.series.get(uid)
        contrast = decision.contrast or (entry.contrast if entry else None)
        self.excluded_rows.append({
            "series_instance_uid": uid,
            "patient_id": decision.patient_id,
            "contrast": contrast,
            "status": "skipped",
            "reason": reason,
            "in_truth": "series" if entry else ("distractor" if uid in self.cohort.distractors else "none"),
            "has_lesion": entry.has_lesion if entry else None,
        })
        if entry is not None:
            self.accumulator(str(contrast)).add_excluded(uid, reason)


def _load_members(decisions: Sequence[SeriesDecision], pre: PreprocessConfig, state: _BaselineRun,
                  keep_cases: bool) -> list[_Member]:
    """Load and preprocess a batch's series; one that fails is excluded with the reason, not fatal.

    Returns
    -------
    list of _Member
        The series that loaded, in input order.
    """
    members: list[_Member] = []
    for decision in decisions:
        try:
            members.append(_load_member(decision, pre, state.cohort, keep_cases))
        except EvaluationInputError:
            # Truth that does not fit its series is the user's error: it stops the run.
            raise
        except (ValueError, OSError) as error:
            reason = f"could not be loaded or preprocessed: {error}"
            logger.warning("series %s skipped: %s", decision.series_instance_uid, reason)
            state.exclude(decision, reason)
    return members


def _score_members(members: list[_Member], groups: list[Hashable], settings: BaselineSettings,
                   acc: BatchAccumulator) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[float]]:
    """Score a batch: ``|z|`` maps, smoothed, mapped back to each series' native grid.

    Lesion series' montage slices go into ``acc.cases``; the working images are released.

    Returns
    -------
    voxel_values : list of (numpy.ndarray, numpy.ndarray)
        Per member, the native-grid scores and lesion labels inside its truth brain.
    volume_scores : list of float
        Per member, its volume score.
    """
    from .plots import case_slices

    images = [m.prepared.image for m in members]
    brains = [m.prepared.brain_mask for m in members]
    voxel_values: list[tuple[np.ndarray, np.ndarray]] = []
    volume_scores: list[float] = []
    for member, z in zip(members, zscore_maps(images, brains, groups, settings.std_floor)):
        z = smooth_map(z, member.prepared.brain_mask, settings.smoothing_sigma_mm / member.prepared.grid_spacing)
        volume_scores.append(volume_score(z, member.prepared.brain_mask, settings.volume_percentile))
        native = resample_to_source(z, member.prepared, order=1)
        voxel_values.append((native[member.brain], member.lesion[member.brain]))
        if member.volume is not None:
            acc.cases.append(case_slices(
                member.volume, member.lesion, score=native, binary=None,
                uid=member.decision.series_instance_uid, patient_id=member.decision.patient_id,
                dice=None, dice_max=None,
            ))
            member.volume = None
    for member in members:  # the working images are no longer needed
        member.prepared.image = np.zeros((0, 0, 0), np.float32)
    return voxel_values, volume_scores


def _series_row(member: _Member, entry: SeriesTruth, contrast: str, score: float, rank: int,
                dice_max: float | None) -> dict[str, Any]:
    """One scored series' row of ``metrics.json``, in the product evaluation's layout.

    Returns
    -------
    dict
        The row; the product's binary-mask fields are ``None`` (the baseline has no threshold).
    """
    return {
        "series_instance_uid": member.decision.series_instance_uid,
        "study_instance_uid": member.decision.study_instance_uid,
        "patient_id": member.decision.patient_id,
        "contrast": contrast,
        "truth_contrast": entry.contrast,
        "status": "scored",
        "reason": "",
        "has_lesion": entry.has_lesion,
        "lesion_ml": member.lesion_ml,
        "score": score,
        "rank": rank,
        "flagged": None,
        "predicted_ml": None,
        "dice_at_product_threshold": None,
        "dice_max": dice_max,
    }


def _record_batch(contrast: str, members: list[_Member], voxel_values: list[tuple[np.ndarray, np.ndarray]],
                  volume_scores: list[float], state: _BaselineRun, acc: BatchAccumulator) -> None:
    """Add a scored batch to its accumulator and its series rows (rank 1 = highest score)."""
    # The voxel histogram spans [0, the batch's largest |z|]; the floor keeps that range positive.
    acc.high = max([float(values.max()) for values, _ in voxel_values if values.size] + [1e-6])
    order = np.argsort(-np.array(volume_scores), kind="stable")
    ranks = np.empty(len(members), int)
    ranks[order] = np.arange(1, len(members) + 1)
    dice_by_uid: dict[str, float | None] = {}
    for index, (member, (values, lesion)) in enumerate(zip(members, voxel_values)):
        uid = member.decision.series_instance_uid
        entry = state.cohort.series[uid]
        acc.add_volume(uid, volume_scores[index], entry.has_lesion)
        own = acc.add_voxels(values, lesion, uid=uid)
        dice_by_uid[uid] = finite_or_none(own.dice_max()[0]) if entry.has_lesion else None
        state.series_rows.append(
            _series_row(member, entry, contrast, volume_scores[index], int(ranks[index]), dice_by_uid[uid])
        )
    # The montage slices were cut before the Dice-max was known.
    for case in acc.cases:
        case.dice_max = dice_by_uid.get(case.series_instance_uid)


def _score_contrast(contrast: str, decisions: Sequence[SeriesDecision], config: RunConfig, state: _BaselineRun,
                    keep_cases: bool, timings: defaultdict[str, float]) -> None:
    """Load, score and record one contrast batch; a batch of fewer than two patients is excluded."""
    acc = state.accumulator(contrast)
    t0 = time.perf_counter()
    members = _load_members(decisions, config.preprocess.chain, state, keep_cases)
    timings["load_and_preprocess"] += time.perf_counter() - t0
    groups = reference_groups([m.decision for m in members], config.scoring.exclude_same.value)
    if len(set(groups)) < 2:
        for member in members:
            state.exclude(member.decision, f"{contrast} batch not scored: the batch needs series of at least two "
                                           f"different patients; it has {len(set(groups))}")
        return
    t0 = time.perf_counter()
    voxel_values, volume_scores = _score_members(members, groups, state.settings, acc)
    timings["score_and_map_back"] += time.perf_counter() - t0
    _record_batch(contrast, members, voxel_values, volume_scores, state, acc)


def _baseline_metrics(input_dir: str | Path, truth: str | Path, config: RunConfig, state: _BaselineRun,
                      timings: Mapping[str, float], start: float) -> dict[str, Any]:
    """The run's ``metrics.json`` content (schema ``codegraph3d.baseline/1``).

    Returns
    -------
    dict
        JSON-ready; ``timings_s`` closes with the total since ``start``.
    """
    return {
        "schema": BASELINE_SCHEMA,
        "what": "z-score baseline",
        "score_name": "|z|",
        "input": str(Path(input_dir).resolve()),
        "truth": str(Path(truth).resolve()),
        "encoder": None,
        "settings": asdict(state.settings),
        "working_grid_size": config.preprocess.chain.size,
        "config_sha256": config_hash(config),
        "config_sources": list(config.sources),
        "batches": {contrast: acc.summary() for contrast, acc in state.accumulators.items()},
        "excluded": excluded_summary(state.excluded_rows),
        "series": state.series_rows + state.excluded_rows,
        "timings_s": {**{k: round(v, 2) for k, v in timings.items()}, "total": round(time.perf_counter() - start, 2)},
    }


def run_baseline(
    input_dir: str | Path,
    truth: str | Path,
    config: RunConfig | None = None,
    settings: BaselineSettings | None = None,
    keep_cases: bool = True,
) -> Evaluation:
    """Score ``input_dir`` with the z-score baseline and evaluate it against ``truth``.

    Parameters
    ----------
    input_dir : path-like
        The DICOM folder (the product's ``-i``).
    truth : path-like
        The cohort folder (labels.json, truth/); see :mod:`codegraph3d_research.evaluate`.
    config : RunConfig, optional
        Run configuration; default :func:`codegraph3d.run.config.load_config` (``CODEGRAPH3D_CONFIG``
        applies).
    settings : BaselineSettings, optional
        The baseline's own settings.
    keep_cases : bool
        Keep the lesion series' slices for the montage pictures.

    Returns
    -------
    Evaluation
        Metrics in the product evaluation's layout (schema ``codegraph3d.baseline/1``).

    Raises
    ------
    CohortError
        When the input holds nothing to score.
    TruthMismatchError
        When the truth does not describe the input (see :mod:`codegraph3d_research.evaluate`).
    """
    start = time.perf_counter()
    config = config if config is not None else load_config()
    settings = settings or BaselineSettings()
    scan = scan_input(input_dir)
    selection = select_input(scan, config)
    cohort = TruthCohort.load(truth)
    taken = selection.taken
    # Checked before any pixel is read: a wrong truth folder fails in seconds.
    cohort.check_series([d.series_instance_uid for d in taken],
                        [d.series_instance_uid for d in selection.decisions], f"the input {input_dir}")
    timings: defaultdict[str, float] = defaultdict(float)
    timings["scan_and_select"] = time.perf_counter() - start

    by_contrast: dict[str, list[SeriesDecision]] = defaultdict(list)
    for decision in taken:
        by_contrast[str(decision.contrast)].append(decision)
    state = _BaselineRun(cohort, settings)
    # Recorded before any batch is scored: this also fixes the order of the batches in metrics.json.
    for decision in selection.decisions:
        if not decision.taken:
            state.exclude(decision, decision.reason)
    for contrast, decisions in by_contrast.items():
        _score_contrast(contrast, decisions, config, state, keep_cases, timings)
    metrics = _baseline_metrics(input_dir, truth, config, state, timings, start)
    return Evaluation(metrics=metrics, batches=state.accumulators)


# ---------------------------------------------------------------------------------------------
# reporting

_COMPARED = (
    ("patient_auroc", "patient AUROC"),
    ("patient_ap", "patient AP"),
    ("voxel_auroc", "voxel AUROC"),
    ("voxel_ap", "voxel AP"),
    ("dice_max", "Dice-max"),
    ("iou_at_dice_max", "IoU at Dice-max"),
)


def comparison_table(product: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
    """Markdown: each batch's metrics for the product (an evaluation's metrics.json) and the baseline."""
    lines = ["| batch | metric | product | z-score baseline |", "|---|---|---|---|"]
    for contrast, item in baseline["batches"].items():
        other = product.get("batches", {}).get(contrast, {})
        for key, title in _COMPARED:
            a, b = other.get(key), item.get(key)
            lines.append(f"| {contrast} | {title} | {'n/a' if a is None else f'{a:.3f}'} | "
                         f"{'n/a' if b is None else f'{b:.3f}'} |")
    return "\n".join(lines)


def baseline_markdown(metrics: Mapping[str, Any], product: Mapping[str, Any] | None = None) -> str:
    """``metrics.md`` of a baseline run (with the side-by-side table when ``product`` is given)."""
    s = metrics["settings"]
    lines = [
        f"# Z-score baseline on {metrics['input']}",
        "",
        f"Truth: {metrics['truth']}  ",
        (
            f"Working grid {metrics['working_grid_size']}^3; std floor {s['std_floor']}, smoothing sigma "
            f"{s['smoothing_sigma_mm']} mm, volume score = percentile {s['volume_percentile']} of |z| "
            f"(100 = maximum); configuration sources: {', '.join(metrics['config_sources']) or 'defaults'}"
        ),
        "",
        metrics_table(metrics["batches"], _COMPARED),
        "",
    ]
    if product is not None:
        lines += [f"## Side by side with {product.get('run', 'the product')}", "", comparison_table(product, metrics), ""]
    lines += notes_and_exclusions(metrics)
    lines += ["## Series", "", "| series | patient | contrast | lesion ml | score (|z|) | rank | Dice-max |",
              "|---|---|---|---|---|---|---|"]
    for row in metrics["series"]:
        if row["status"] == "scored":
            dice = "n/a" if row["dice_max"] is None else f"{row['dice_max']:.3f}"
            lines.append(f"| ...{row['series_instance_uid'][-8:]} | {row['patient_id']} | {row['contrast']} | "
                         f"{row['lesion_ml']:.2f} | {row['score']:.3f} | {row['rank']} | {dice} |")
    lines += ["", f"Timings (s): {metrics['timings_s']}"]
    return "\n".join(lines) + "\n"


def default_out_dir(truth: str | Path) -> Path:
    """``<truth>/../<truth name>-baseline``: beside the cohort, never in it."""
    truth = Path(truth).resolve()
    return truth.parent / f"{truth.name}-baseline"


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit code (0 done, 2 bad input or configuration)."""
    parser = argparse.ArgumentParser(
        prog="python -m codegraph3d_research.baseline",
        description="Per-position intensity z-score baseline on the product's preprocessing, evaluated like the product.",
    )
    parser.add_argument("--input", required=True, help="DICOM folder (the app's -i)")
    parser.add_argument("--truth", required=True, help="cohort folder with labels.json and truth/")
    parser.add_argument("--out", help="where metrics.json, metrics.md and the PNGs go (default <truth>/../<name>-baseline)")
    parser.add_argument("--config", help="configuration override file, applied after CODEGRAPH3D_CONFIG")
    parser.add_argument("--compare", help="an evaluation's metrics.json to put side by side in metrics.md")
    defaults = BaselineSettings()
    parser.add_argument("--std-floor", type=float, default=defaults.std_floor)
    parser.add_argument("--sigma-mm", type=float, default=defaults.smoothing_sigma_mm)
    parser.add_argument("--percentile", type=float, default=defaults.volume_percentile,
                        help="volume score percentile of |z| over the brain (100 = maximum)")
    parser.add_argument("--n-bins", type=int, default=defaults.n_bins)
    parser.add_argument("--no-plots", action="store_true", help="write the metrics only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = Path(args.out) if args.out else default_out_dir(args.truth)
    try:
        settings = BaselineSettings(args.std_floor, args.sigma_mm, args.percentile, args.n_bins)
    except ValueError as error:
        parser.error(str(error))
    try:
        check_out_dir(out, [Path(args.input), Path(args.truth)])
        product = None
        if args.compare:
            try:
                product = json.loads(Path(args.compare).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise EvaluationInputError(f"--compare {args.compare}: cannot read it as metrics.json ({error})") from error
        config = load_config(override=args.config)
        evaluation = run_baseline(args.input, args.truth, config, settings, keep_cases=not args.no_plots)
        written = write_evaluation(
            evaluation, out, plots=not args.no_plots, forbidden=[Path(args.input), Path(args.truth)],
            markdown=lambda metrics: baseline_markdown(metrics, product),
        )
    except (EvaluationInputError, CohortError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metrics = evaluation.metrics
    print(f"z-score baseline, working grid {metrics['working_grid_size']}^3, settings {metrics['settings']}")
    print(metrics_table(metrics["batches"], _COMPARED))
    if product is not None:
        print(comparison_table(product, metrics))
    print(f"timings (s): {metrics['timings_s']}")
    print(f"wrote {len(written)} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
