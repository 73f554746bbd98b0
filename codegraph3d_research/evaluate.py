"""Score a run's outputs against ground truth.

``python -m codegraph3d_research.evaluate --run OUTPUT_FOLDER --truth TRUTH_FOLDER [--out DIR] [--no-plots]``

Inputs
------
``OUTPUT_FOLDER``
    The app's output folder: ``report.json`` (status ``completed``), ``SEG/*_binary.dcm`` per
    scored series and, for voxel-level metrics, ``SEG/*_score.dcm`` (run with
    ``output.fractional: true``; without them only patient-level metrics and the Dice of the
    BINARY masks are computed, and the output says so).
``TRUTH_FOLDER``
    A cohort folder in the demo cohort's format (:func:`codegraph3d_research.synthetic.make_cohort`):

    * ``labels.json``: ``{"studies": [{"patient_id", "study_instance_uid", "series": [...],
      "distractors": [...]}, ...]}``; each entry of ``series`` holds ``series_instance_uid``,
      ``contrast``, ``has_lesion`` (bool) and ``truth: {"lesion": PATH, "brain": PATH}``, paths
      relative to the folder; ``distractors`` (localizers) hold ``series_instance_uid`` and
      ``kind`` and have no truth;
    * ``truth/*.nii.gz``: uint8 masks (non-zero = inside) on each series' native grid, NIfTI voxel
      ``(i, j, k)`` = the series' ``(x, y, z)`` index, RAS affine of the series' geometry;
    * ``dicom/``: the source series the run was given (read for slice order and geometry).

Every series in ``labels.json`` must appear in the run's report and every scored series must be
in ``labels.json``; a truth mask must exist, match its source series in shape and geometry and
agree with ``has_lesion``; a scored series' SEG files must exist. Any violation raises
:class:`TruthMismatchError` or :class:`RunOutputError` naming every offending series; nothing is
silently skipped. Series the run skipped are listed with their reasons and counted.

Metrics, per contrast batch (the run's batches)
-----------------------------------------------
patient AUROC / AP
    One score per series (report.json) against ``has_lesion``; ``null`` with a note when the batch
    lacks lesion or normal series (AP is defined, 1.0, when every series has a lesion).
voxel AUROC / AP, Dice-max (+ its threshold on the unit scale and the IoU there)
    Pooled over the truth brain voxels of every scored series, from the FRACTIONAL SEGs (unit
    scores, one linear mapping per batch), in streaming histograms
    (:class:`codegraph3d_research.metrics.StreamingBinaryMetrics`), so no voxel array is ever sorted.
Dice / IoU at the product's threshold
    Of the BINARY SEGs over whole volumes (what a user gets), pooled over the batch.

Outputs (``--out``, default ``<run>/../<run name>-evaluation``; never inside the run folder, which
holds only ``SEG/`` and ``report.json``): ``metrics.json`` (schema ``codegraph3d.evaluation/1``),
``metrics.md`` and the pictures of :mod:`codegraph3d_research.plots`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import highdicom as hd
import nibabel as nib
import numpy as np

from codegraph3d.core.files import atomic_path
from codegraph3d.run.diff import read_report
from codegraph3d.io.dicom import SeriesHeader, load_series_volume, scan_headers
from .metrics import StreamingBinaryMetrics, patient_auroc, patient_average_precision
from codegraph3d.core.volume import LPS_TO_RAS, Volume

if TYPE_CHECKING:
    from .plots import CaseSlices

__all__ = [
    "EVALUATION_SCHEMA",
    "BatchAccumulator",
    "Evaluation",
    "EvaluationInputError",
    "RunOutputError",
    "SERIES_HISTOGRAMS",
    "SeriesTruth",
    "TruthCohort",
    "TruthMismatchError",
    "check_out_dir",
    "default_out_dir",
    "evaluate",
    "evaluate_run",
    "excluded_summary",
    "finite_or_none",
    "lps_ras_affine",
    "main",
    "metrics_markdown",
    "metrics_table",
    "notes_and_exclusions",
    "series_dice",
    "write_evaluation",
    "write_json",
    "write_series_histograms",
    "write_text",
]

logger = logging.getLogger(__name__)

EVALUATION_SCHEMA = "codegraph3d.evaluation/1"

# RAS <-> LPS flips x and y.


class EvaluationInputError(ValueError):
    """The run or the truth cannot be evaluated; the message names the series and the fix."""


class TruthMismatchError(EvaluationInputError):
    """The truth folder does not describe the run (missing, extra or mismatched series)."""


class RunOutputError(EvaluationInputError):
    """The run's output folder is incomplete (no report, a missing or unreadable SEG)."""


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: undefined metrics are ``null`` (with a note saying why)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _list_uids(uids: Iterable[str], limit: int = 10) -> str:
    uids = list(uids)
    shown = ", ".join(uids[:limit])
    return shown + (f" and {len(uids) - limit} more" if len(uids) > limit else "")


# ---------------------------------------------------------------------------------------------
# truth


@dataclass(frozen=True)
class SeriesTruth:
    """One series of ``labels.json``.

    Attributes
    ----------
    series_instance_uid, study_instance_uid, patient_id, contrast : str
        Identity and true contrast of the series.
    has_lesion : bool
        Whether the lesion mask is non-empty.
    lesion_path, brain_path : pathlib.Path
        Absolute paths of the truth masks.
    """

    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    contrast: str
    has_lesion: bool
    lesion_path: Path
    brain_path: Path


@dataclass
class TruthCohort:
    """The ground truth of a cohort folder (see the module docstring for the format).

    Attributes
    ----------
    root : pathlib.Path
        The cohort folder.
    series : dict of str to SeriesTruth
        Series with truth, by SeriesInstanceUID.
    distractors : dict of str to str
        Series without truth (localizers), by UID, with their kind.
    """

    root: Path
    series: dict[str, SeriesTruth]
    distractors: dict[str, str]

    @classmethod
    def load(cls, root: str | Path) -> TruthCohort:
        """Read and validate ``<root>/labels.json``; the mask files are checked when loaded.

        Raises
        ------
        TruthMismatchError
            For a missing or malformed ``labels.json``.
        """
        from .synthetic import read_labels

        root = Path(root)
        path = root / "labels.json"
        try:
            labels = read_labels(root)
        except ValueError as error:
            raise TruthMismatchError(f"--truth: {error}") from error
        series: dict[str, SeriesTruth] = {}
        distractors: dict[str, str] = {}
        for s_index, study in enumerate(labels["studies"]):
            if not isinstance(study, Mapping) or not isinstance(study.get("series"), list):
                raise TruthMismatchError(f"{path}: studies[{s_index}] lacks a 'series' list")
            for entry in study["series"]:
                try:
                    uid = str(entry["series_instance_uid"])
                    item = SeriesTruth(
                        series_instance_uid=uid,
                        study_instance_uid=str(study.get("study_instance_uid", "")),
                        patient_id=str(study.get("patient_id", "")),
                        contrast=str(entry["contrast"]),
                        has_lesion=bool(entry["has_lesion"]),
                        lesion_path=root / entry["truth"]["lesion"],
                        brain_path=root / entry["truth"]["brain"],
                    )
                except (KeyError, TypeError) as error:
                    raise TruthMismatchError(
                        f"{path}: a series of studies[{s_index}] lacks the field {error}; each series needs "
                        "series_instance_uid, contrast, has_lesion and truth.lesion / truth.brain"
                    ) from error
                if uid in series:
                    raise TruthMismatchError(f"{path}: series {uid} is listed twice")
                series[uid] = item
            for entry in study.get("distractors", []) or []:
                distractors[str(entry.get("series_instance_uid", ""))] = str(entry.get("kind", "distractor"))
        return cls(root=root, series=series, distractors=distractors)

    def check_series(self, scored: Iterable[str], present: Iterable[str], source: str) -> None:
        """Check that the truth and a run describe the same series.

        Parameters
        ----------
        scored : iterable of str
            UIDs the run scored: each must be in ``labels.json`` (with truth).
        present : iterable of str
            UIDs the run knows about, scored or skipped: every ``labels.json`` series must be here.
        source : str
            What the run is, for the message (e.g. the report's path).

        Raises
        ------
        TruthMismatchError
            Naming every offending series.
        """
        present = set(present)
        problems = []
        unknown = [uid for uid in scored if uid not in self.series]
        if unknown:
            listed_as = [f"{uid} (a {self.distractors[uid]} in labels.json)" if uid in self.distractors else uid
                         for uid in unknown]
            problems.append(
                f"{len(unknown)} scored series have no truth in {self.root / 'labels.json'}: {_list_uids(listed_as)}"
            )
        absent = [uid for uid in self.series if uid not in present]
        if absent:
            problems.append(
                f"{len(absent)} series of {self.root / 'labels.json'} are absent from {source}: {_list_uids(absent)}"
            )
        if problems:
            raise TruthMismatchError(
                "; ".join(problems) + ". The truth folder does not belong to this run: pass the cohort folder "
                "whose dicom/ was the run's input."
            )

    def load_masks(self, uid: str, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
        """Load and validate the lesion and brain masks of one series on its source grid.

        Parameters
        ----------
        uid : str
            The series.
        volume : Volume
            Its source volume (from :func:`codegraph3d.io.dicom.load_series_volume`).

        Returns
        -------
        tuple of numpy.ndarray
            ``(lesion, brain)``, boolean, shape ``volume.array.shape`` (``[z, y, x]``).

        Raises
        ------
        TruthMismatchError
            When a file is missing, a mask's shape or geometry differs from the source series, or
            the lesion mask disagrees with ``has_lesion``.
        """
        entry = self.series[uid]
        masks = []
        expected = lps_ras_affine(volume)
        for kind, path in (("lesion", entry.lesion_path), ("brain", entry.brain_path)):
            if not path.is_file():
                raise TruthMismatchError(
                    f"series {uid}: the {kind} truth mask {path} does not exist; restore it or regenerate the cohort"
                )
            image = nib.load(str(path))
            # NIfTI voxel (i, j, k) is the series' (x, y, z) index.
            mask = np.asarray(image.dataobj).transpose(2, 1, 0) > 0
            if mask.shape != volume.array.shape:
                raise TruthMismatchError(
                    f"series {uid}: the {kind} truth mask {path.name} has shape {mask.shape} (z, y, x) but the "
                    f"source series has {volume.array.shape}; the mask belongs to another series or grid"
                )
            # 0.01 mm and 1e-3 per axis: far above float32 header rounding, far below any real misfit.
            affine = np.asarray(image.affine, dtype=float)
            if not (np.allclose(affine[:3, :3], expected[:3, :3], atol=1e-3)
                    and np.allclose(affine[:3, 3], expected[:3, 3], atol=1e-2)):
                raise TruthMismatchError(
                    f"series {uid}: the {kind} truth mask {path.name} is not on the source series' grid "
                    f"(NIfTI affine {np.round(affine, 3).tolist()}, series {np.round(expected, 3).tolist()})"
                )
            masks.append(mask)
        lesion, brain = masks
        if bool(lesion.any()) != entry.has_lesion:
            raise TruthMismatchError(
                f"series {uid}: labels.json says has_lesion={entry.has_lesion} but the lesion mask "
                f"{entry.lesion_path.name} holds {int(lesion.sum())} voxels; fix labels.json or the mask"
            )
        return lesion, brain


def lps_ras_affine(volume: Volume) -> np.ndarray:
    """The NIfTI (RAS) affine of a volume's ``(x, y, z)`` index grid."""
    return LPS_TO_RAS @ volume.index_to_physical


# ---------------------------------------------------------------------------------------------
# accumulation


@dataclass
class BatchAccumulator:
    """Everything one contrast batch's metrics need, filled series by series.

    Used by :func:`evaluate` (the product) and :mod:`codegraph3d_research.baseline`, so both report the
    same metrics computed the same way.

    Parameters
    ----------
    contrast : str
        Name of the batch.
    low, high : float
        Range of the voxel scores' histogram (``[0, 1]`` for the product's unit scores).
    n_bins : int
        Histogram bins.
    product_threshold_unit : float, optional
        The product's voxel threshold on the same scale as the voxel scores (for the plots).
    """

    contrast: str
    low: float = 0.0
    high: float = 1.0
    n_bins: int = 1000
    product_threshold_unit: float | None = None
    uids: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    flagged: list[bool] = field(default_factory=list)
    voxel: StreamingBinaryMetrics | None = None
    binary: list[int] | None = None  # tp, fp, fn over whole volumes
    excluded: list[dict[str, str]] = field(default_factory=list)
    cases: list[CaseSlices] = field(default_factory=list)  # lesion series, for the montage
    notes: list[str] = field(default_factory=list)
    # Per series (uid, lesion-voxel counts, other brain-voxel counts) per bin: what a bootstrap
    # over series needs to recompute the pooled voxel metrics (codegraph3d_research.compare).
    series_histograms: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)

    def add_volume(self, uid: str, score: float, has_lesion: bool, flagged: bool | None = None) -> None:
        """Add one scored series' volume score."""
        if not math.isfinite(float(score)):
            raise RunOutputError(f"series {uid}: its volume score {score!r} is not finite")
        self.uids.append(uid)
        self.scores.append(float(score))
        self.labels.append(bool(has_lesion))
        if flagged is not None:
            self.flagged.append(bool(flagged))

    def add_voxels(self, scores: np.ndarray, lesion: np.ndarray, uid: str | None = None) -> StreamingBinaryMetrics:
        """Add one series' brain voxels; return that series' own histogram (for per-series Dice-max).

        Parameters
        ----------
        scores : numpy.ndarray
            Voxel scores inside the truth brain (1-D).
        lesion : numpy.ndarray
            Same shape, bool.
        uid : str, optional
            The series; when given, its histogram is kept in ``series_histograms``.
        """
        own = StreamingBinaryMetrics(self.low, self.high, n_bins=self.n_bins)
        own.update(scores, lesion)
        if uid is not None:
            self.series_histograms.append((uid, own.pos.copy(), own.neg.copy()))
        if self.voxel is None:
            self.voxel = StreamingBinaryMetrics(self.low, self.high, n_bins=self.n_bins)
        self.voxel.merge(own)
        return own

    def add_binary(self, binary: np.ndarray, lesion: np.ndarray) -> tuple[int, int, int]:
        """Add one series' BINARY mask against its lesion mask (whole volume); return (tp, fp, fn)."""
        tp = int(np.count_nonzero(binary & lesion))
        fp = int(np.count_nonzero(binary & ~lesion))
        fn = int(np.count_nonzero(~binary & lesion))
        if self.binary is None:
            self.binary = [0, 0, 0]
        self.binary[0] += tp
        self.binary[1] += fp
        self.binary[2] += fn
        return tp, fp, fn

    def add_excluded(self, uid: str, reason: str) -> None:
        """Record a series of this contrast (with truth) that was not scored."""
        self.excluded.append({"series_instance_uid": uid, "reason": reason})

    def summary(self) -> dict[str, Any]:
        """The batch's metrics, JSON-ready: undefined values are ``None`` with a note saying why."""
        y = np.array(self.labels, dtype=bool)
        s = np.array(self.scores, dtype=np.float64)
        n, p = int(y.size), int(y.sum())
        notes = list(self.notes)
        item: dict[str, Any] = {
            "n_series": n,
            "n_lesion": p,
            "n_normal": n - p,
            "n_flagged": int(sum(self.flagged)) if self.flagged else None,
            "n_excluded": len(self.excluded),
            "excluded_by_reason": dict(Counter(e["reason"] for e in self.excluded)),
            "patient_auroc": None,
            "patient_ap": None,
            "voxel_auroc": None,
            "voxel_ap": None,
            "dice_max": None,
            "dice_max_threshold": None,
            "iou_at_dice_max": None,
            "dice_at_product_threshold": None,
            "iou_at_product_threshold": None,
            "product_threshold_unit": finite_or_none(self.product_threshold_unit),
            "n_brain_voxels": None,
            "n_lesion_voxels": None,
        }
        if n == 0:
            notes.append("no series of this batch was scored: every metric is undefined")
        elif p == 0:
            notes.append("patient AUROC and AP undefined: no lesion series in the batch (all normal)")
        elif p == n:
            notes.append("patient AUROC undefined: every series has a lesion (no normal series); AP is 1 by definition")
        if n:
            item["patient_auroc"] = finite_or_none(patient_auroc(s, y))
            item["patient_ap"] = finite_or_none(patient_average_precision(s, y))
        if self.voxel is not None:
            voxel = self.voxel
            item["n_brain_voxels"] = voxel.n_positive + voxel.n_negative
            item["n_lesion_voxels"] = voxel.n_positive
            dice, threshold, iou = voxel.dice_max()
            item.update(
                voxel_auroc=finite_or_none(voxel.auroc()),
                voxel_ap=finite_or_none(voxel.average_precision()),
                dice_max=finite_or_none(dice),
                dice_max_threshold=finite_or_none(threshold),
                iou_at_dice_max=finite_or_none(iou),
            )
            if voxel.n_positive == 0:
                notes.append("voxel AUROC, AP and Dice-max undefined: no lesion voxel in the batch")
        if self.binary is not None:
            tp, fp, fn = self.binary
            if tp + fp + fn == 0:
                notes.append("Dice at the product's threshold undefined: no lesion voxel and nothing predicted")
            else:
                item["dice_at_product_threshold"] = 2 * tp / (2 * tp + fp + fn)
                item["iou_at_product_threshold"] = tp / (tp + fp + fn)
        item["notes"] = notes
        return item


def series_dice(tp: int, fp: int, fn: int) -> float | None:
    """Dice of one series' counts; ``None`` when there is neither lesion nor prediction."""
    return None if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


# ---------------------------------------------------------------------------------------------
# evaluation


@dataclass
class Evaluation:
    """An evaluation's JSON-ready metrics and the in-memory data behind the pictures.

    Attributes
    ----------
    metrics : dict
        What ``metrics.json`` holds.
    batches : dict of str to BatchAccumulator
        Per contrast batch: volume scores, voxel histogram, lesion cases' slices.
    """

    metrics: dict[str, Any]
    batches: dict[str, BatchAccumulator]


def _seg_array(path: Path, sop_uids: list[str], uid: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        seg = hd.seg.segread(path)
        pixels = seg.get_pixels_by_source_instance(sop_uids, segment_numbers=[1], rescale_fractional=True)
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise RunOutputError(
            f"series {uid}: {path} cannot be read as a SEG of that series' slices ({error}); rerun the app"
        ) from error
    array = np.asarray(pixels[..., 0], dtype=np.float32)
    if array.shape != tuple(shape):
        raise RunOutputError(f"series {uid}: {path.name} holds shape {array.shape}, the source series {tuple(shape)}")
    return array


def _read_report(run: Path) -> dict[str, Any]:
    path = run / "report.json"
    if not path.is_file():
        raise RunOutputError(f"{path} does not exist; --run must be the app's output folder (-o)")
    try:
        report = read_report(run)
    except ValueError as error:
        raise RunOutputError(str(error)) from error
    if report.get("status") != "completed":
        raise RunOutputError(f"{path}: the run did not complete ({report.get('message')}); nothing to evaluate")
    return report


def excluded_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Count of the series not scored, by reason, and how many of them had truth."""
    return {
        "n_series": len(rows),
        "n_with_truth": sum(1 for row in rows if row.get("in_truth") == "series"),
        "by_reason": dict(Counter(row["reason"] for row in rows)),
    }


def _check_seg_files(run: Path, scored: list[dict[str, Any]], fractional: bool) -> None:
    """Fail unless every scored series' SEG files are named in the report and exist.

    Raises
    ------
    RunOutputError
        Naming every missing file, so that one rerun fixes them all.
    """
    problems: list[str] = []
    for row in scored:
        uid = row["series_instance_uid"]
        needed = [("seg_binary", row.get("seg_binary"))] + ([("seg_score", row.get("seg_score"))] if fractional else [])
        for kind, rel in needed:
            if not rel:
                problems.append(f"{uid} (no {kind} in report.json)")
            elif not (run / rel).is_file():
                problems.append(f"{uid} ({run / rel} missing)")
    if problems:
        raise RunOutputError(
            f"{len(problems)} SEG file(s) of scored series are missing: {_list_uids(problems)}; the output folder "
            "is incomplete: rerun the app into an empty folder"
        )


def _source_headers(truth_root: Path, scored: list[dict[str, Any]]) -> dict[str, SeriesHeader]:
    """The headers of the scored series' source DICOM in ``truth_root/dicom``, by series UID.

    Returns
    -------
    dict of str to SeriesHeader
        Empty when nothing was scored (the folder is then not read).

    Raises
    ------
    TruthMismatchError
        When the folder is missing or lacks a scored series.
    """
    if not scored:
        return {}
    dicom_root = truth_root / "dicom"
    if not dicom_root.is_dir():
        raise TruthMismatchError(f"{dicom_root} does not exist; the truth folder needs the source DICOM in dicom/")
    headers = {s.series_instance_uid: s for s in scan_headers(dicom_root).series}
    missing = [row["series_instance_uid"] for row in scored if row["series_instance_uid"] not in headers]
    if missing:
        raise TruthMismatchError(
            f"{len(missing)} scored series are not in {dicom_root}: {_list_uids(missing)}; "
            "the truth folder does not belong to this run"
        )
    return headers


@dataclass
class _RunBatches:
    """A run's batch accumulators by contrast, each made on first use.

    Attributes
    ----------
    info : dict
        The report's batches that carry ``score_to_unit``, by contrast.
    n_bins : int
        Bins of the voxel histograms.
    fractional : bool
        Whether the run wrote FRACTIONAL SEGs.
    batches : dict of str to BatchAccumulator
        The accumulators made so far, in order of first use.
    """

    info: dict[str, dict[str, Any]]
    n_bins: int
    fractional: bool
    batches: dict[str, BatchAccumulator] = field(default_factory=dict)

    def __call__(self, contrast: str) -> BatchAccumulator:
        """The contrast's accumulator, with the product's threshold on the unit scale where known."""
        if contrast not in self.batches:
            threshold = None
            info = self.info.get(contrast)
            # The lesion policy's mask bound is on standardised scores, not on this map's scale.
            if info is not None and info.get("threshold_units", "score") == "score":
                low, high = info["score_to_unit"]["low"], info["score_to_unit"]["high"]
                threshold = float(np.clip((info["voxel_threshold"] - low) / (high - low), 0.0, 1.0))
            self.batches[contrast] = BatchAccumulator(
                contrast, 0.0, 1.0, self.n_bins, product_threshold_unit=threshold
            )
            if not self.fractional:
                self.batches[contrast].notes.append(
                    "voxel AUROC, AP and Dice-max need FRACTIONAL SEGs: the run had output.fractional: false"
                )
        return self.batches[contrast]


def _skipped_record(row: dict[str, Any], entry: SeriesTruth | None, cohort: TruthCohort,
                    batch: _RunBatches) -> dict[str, Any]:
    """The row of a series the run did not score; one with truth also counts in its batch.

    Returns
    -------
    dict
        The series' row of ``metrics.json``.
    """
    uid = row["series_instance_uid"]
    in_truth = "series" if entry else ("distractor" if uid in cohort.distractors else "none")
    record = {
        "series_instance_uid": uid,
        "patient_id": row.get("patient_id"),
        "contrast": row.get("contrast") or (entry.contrast if entry else None),
        "status": "skipped",
        "reason": row.get("reason") or "skipped (no reason recorded)",
        "in_truth": in_truth,
        "has_lesion": entry.has_lesion if entry else None,
    }
    if entry is not None:
        batch(record["contrast"]).add_excluded(uid, record["reason"])
    return record


def _scored_record(row: dict[str, Any], entry: SeriesTruth, volume: Volume, lesion: np.ndarray,
                   dice: float | None) -> dict[str, Any]:
    """The row of a scored series, before its Dice-max is known.

    Returns
    -------
    dict
        The series' row of ``metrics.json``, ``dice_max`` ``None``.
    """
    return {
        "series_instance_uid": row["series_instance_uid"],
        "study_instance_uid": row.get("study_instance_uid"),
        "patient_id": row.get("patient_id"),
        "contrast": row["contrast"],
        "truth_contrast": entry.contrast,
        "status": "scored",
        "reason": "",
        "has_lesion": entry.has_lesion,
        "lesion_ml": round(float(lesion.sum()) * float(np.prod(volume.spacing)) / 1000.0, 3),
        "score": row["score"],
        "rank": row.get("rank"),
        "flagged": row.get("flagged"),
        "predicted_ml": row.get("anomalous_volume_ml"),
        "dice_at_product_threshold": dice,
        "dice_max": None,
    }


def _evaluate_series(row: dict[str, Any], entry: SeriesTruth, acc: BatchAccumulator, *, run: Path,
                     truth_root: Path, headers: Mapping[str, SeriesHeader], cohort: TruthCohort,
                     fractional: bool, keep_cases: bool) -> dict[str, Any]:
    """Add one scored series to its batch: patient score, BINARY mask, FRACTIONAL scores, slices.

    Returns
    -------
    dict
        The series' row of ``metrics.json``.

    Raises
    ------
    TruthMismatchError, RunOutputError
        For a source series that cannot be loaded, or an unreadable or mis-shaped SEG.
    """
    from .plots import case_slices  # numpy only; keeps matplotlib out of this import

    uid = row["series_instance_uid"]
    acc.add_volume(uid, row["score"], entry.has_lesion, row.get("flagged"))
    try:
        volume = load_series_volume(headers[uid]).volume
    except ValueError as error:
        raise TruthMismatchError(f"series {uid}: its source series in {truth_root / 'dicom'} cannot be loaded ({error})") from error
    lesion, brain = cohort.load_masks(uid, volume)
    binary = _seg_array(run / row["seg_binary"], volume.sop_instance_uids, uid, volume.array.shape) > 0.5
    tp, fp, fn = acc.add_binary(binary, lesion)
    record = _scored_record(row, entry, volume, lesion, series_dice(tp, fp, fn))
    score = None
    if fractional:
        score = _seg_array(run / row["seg_score"], volume.sop_instance_uids, uid, volume.array.shape)
        own = acc.add_voxels(score[brain], lesion[brain], uid=uid)
        if entry.has_lesion:
            record["dice_max"] = finite_or_none(own.dice_max()[0])
    if keep_cases and entry.has_lesion:
        acc.cases.append(case_slices(
            volume, lesion, score=score, binary=binary, uid=uid, patient_id=str(row.get("patient_id", "")),
            dice=record["dice_at_product_threshold"], dice_max=record["dice_max"],
        ))
    return record


def evaluate(run: str | Path, truth: str | Path, n_bins: int = 1000, keep_cases: bool = True) -> Evaluation:
    """Evaluate one run against one cohort's ground truth; see the module docstring.

    Parameters
    ----------
    run : path-like
        The app's output folder.
    truth : path-like
        The cohort folder (labels.json, truth/, dicom/).
    n_bins : int
        Bins of the voxel histograms over the unit scores ``[0, 1]`` (the FRACTIONAL SEG stores
        255 levels, so 1000 bins keep every level apart).
    keep_cases : bool
        Keep three orthogonal slices through each lesion for the montage pictures.

    Raises
    ------
    TruthMismatchError, RunOutputError
        For truth that does not describe the run or an incomplete run folder.
    """
    start = time.perf_counter()
    run, truth_root = Path(run), Path(truth)
    report = _read_report(run)
    cohort = TruthCohort.load(truth_root)
    rows = report.get("series", [])
    scored = [row for row in rows if row.get("status") == "scored"]
    cohort.check_series([row["series_instance_uid"] for row in scored],
                        [row["series_instance_uid"] for row in rows], str(run / "report.json"))
    fractional = bool((report.get("config") or {}).get("output", {}).get("fractional"))
    # Every input is checked before the first series is read: a broken run fails in seconds.
    _check_seg_files(run, scored, fractional)
    headers = _source_headers(truth_root, scored)
    t_loaded = time.perf_counter()

    batch = _RunBatches({b["contrast"]: b for b in report.get("batches", []) if "score_to_unit" in b},
                        n_bins, fractional)
    for info in report.get("batches", []):  # the report's batches first, in its order
        batch(info["contrast"])
    series_rows: list[dict[str, Any]] = []
    excluded_rows: list[dict[str, Any]] = []
    for row in rows:
        entry = cohort.series.get(row["series_instance_uid"])
        if row.get("status") != "scored":
            excluded_rows.append(_skipped_record(row, entry, cohort, batch))
            continue
        assert entry is not None  # check_series guarantees it
        series_rows.append(_evaluate_series(
            row, entry, batch(row["contrast"]), run=run, truth_root=truth_root, headers=headers, cohort=cohort,
            fractional=fractional, keep_cases=keep_cases,
        ))

    metrics: dict[str, Any] = {
        "schema": EVALUATION_SCHEMA,
        "what": "product",
        "score_name": "unit score",
        "run": str(run.resolve()),
        "truth": str(truth_root.resolve()),
        "encoder": report.get("encoder"),
        "encoder_warning": report.get("encoder_warning"),
        "config_sha256": report.get("config_sha256"),
        "fractional_segs": fractional,
        "n_bins": n_bins,
        "batches": {contrast: acc.summary() for contrast, acc in batch.batches.items()},
        "excluded": excluded_summary(excluded_rows),
        "series": series_rows + excluded_rows,
        "timings_s": {
            "read_report_and_headers": round(t_loaded - start, 2),
            "total": round(time.perf_counter() - start, 2),
        },
    }
    return Evaluation(metrics=metrics, batches=batch.batches)


def evaluate_run(run: str | Path, truth: str | Path, n_bins: int = 1000) -> dict[str, Any]:
    """The metrics of :func:`evaluate` alone (no slices kept for pictures)."""
    return evaluate(run, truth, n_bins=n_bins, keep_cases=False).metrics


# ---------------------------------------------------------------------------------------------
# writing


def default_out_dir(run: str | Path) -> Path:
    """``<run>/../<run name>-evaluation``: beside the run, never in it."""
    run = Path(run).resolve()
    return run.parent / f"{run.name}-evaluation"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_TABLE_COLUMNS = (
    ("patient_auroc", "patient AUROC"),
    ("patient_ap", "patient AP"),
    ("voxel_auroc", "voxel AUROC"),
    ("voxel_ap", "voxel AP"),
    ("dice_max", "Dice-max"),
    ("iou_at_dice_max", "IoU at Dice-max"),
    ("dice_at_product_threshold", "Dice at the product's threshold"),
)


def metrics_table(batches: Mapping[str, Mapping[str, Any]], columns: Iterable[tuple[str, str]] = _TABLE_COLUMNS) -> str:
    """The per-batch Markdown table (undefined values shown as n/a)."""
    columns = list(columns)
    lines = [
        "| batch | series (lesion) | excluded | " + " | ".join(title for _, title in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for contrast, item in batches.items():
        lines.append(
            f"| {contrast} | {item['n_series']} ({item['n_lesion']}) | {item['n_excluded']} | "
            + " | ".join(_fmt(item.get(key)) for key, _ in columns) + " |"
        )
    return "\n".join(lines)


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """``metrics.md``: the batch table, notes, exclusions and the per-series table."""
    encoder = metrics.get("encoder") or {}
    lines = [
        f"# Evaluation of {metrics['run']}",
        "",
        f"Truth: {metrics['truth']}  ",
        f"Encoder: {encoder.get('description', 'unknown')}"
        + (f" (**{metrics['encoder_warning']}**)" if metrics.get("encoder_warning") else ""),
        "",
        metrics_table(metrics["batches"]),
        "",
    ]
    lines += notes_and_exclusions(metrics)
    lines += [
        "## Series",
        "",
        "| series | patient | contrast | lesion ml | score | rank | flagged | predicted ml | Dice at threshold | Dice-max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in metrics["series"]:
        if row["status"] != "scored":
            continue
        lines.append(
            f"| ...{row['series_instance_uid'][-8:]} | {row['patient_id']} | {row['contrast']} | "
            f"{_fmt(row['lesion_ml'], 2)} | {_fmt(row['score'], 4)} | {_fmt(row['rank'])} | {_fmt(row['flagged'])} | "
            f"{_fmt(row['predicted_ml'], 2)} | {_fmt(row['dice_at_product_threshold'])} | {_fmt(row['dice_max'])} |"
        )
    return "\n".join(lines) + "\n"


def notes_and_exclusions(metrics: Mapping[str, Any]) -> list[str]:
    """Markdown lines: the batches' notes, then the excluded series by reason."""
    lines: list[str] = []
    notes = [f"{contrast}: {note}" for contrast, item in metrics["batches"].items() for note in item["notes"]]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    excluded = metrics["excluded"]
    lines += [
        f"## Excluded series: {excluded['n_series']} ({excluded['n_with_truth']} with truth)",
        "",
    ]
    lines += [f"- {count} x {reason}" for reason, count in excluded["by_reason"].items()]
    for row in metrics["series"]:
        if row["status"] != "scored" and row.get("in_truth") == "series":
            lines.append(f"- series {row['series_instance_uid']} ({row['contrast']}, has truth): {row['reason']}")
    return lines + [""]


def check_out_dir(out_dir: Path, forbidden: Iterable[Path]) -> None:
    """Refuse an output folder inside (or equal to) any ``forbidden`` folder."""
    out = out_dir.resolve()
    for folder in forbidden:
        folder = folder.resolve()
        if out == folder or folder in out.parents:
            raise EvaluationInputError(
                f"--out {out_dir} lies inside {folder}, which must hold only the run's SEG/ and report.json "
                "(or the cohort); choose a folder outside it"
            )


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write strict JSON (no NaN) atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def write_text(path: Path, text: str) -> Path:
    """Write text atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


#: Per-series voxel histograms beside metrics.json (for bootstrap confidence intervals).
SERIES_HISTOGRAMS = "series_histograms.npz"


def write_series_histograms(path: Path, batches: Mapping[str, BatchAccumulator]) -> Path | None:
    """Write every batch's per-series voxel histograms (``None`` when no batch kept any).

    The file holds, per contrast ``C``: ``C/uids`` (series UIDs), ``C/lesion`` and ``C/other``
    (``(n_series, n_bins)`` voxel counts of lesion and other brain voxels per score bin) and
    ``C/range`` (``low, high`` of the bins).
    """
    arrays: dict[str, np.ndarray] = {}
    for contrast, acc in batches.items():
        if not acc.series_histograms:
            continue
        uids, lesion, other = zip(*acc.series_histograms)
        arrays[f"{contrast}/uids"] = np.array(uids)
        arrays[f"{contrast}/lesion"] = np.stack(lesion)
        arrays[f"{contrast}/other"] = np.stack(other)
        arrays[f"{contrast}/range"] = np.array([acc.low, acc.high])
    if not arrays:
        return None
    temporary = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(temporary, **arrays)
    temporary.replace(path)
    return path


def write_evaluation(
    evaluation: Evaluation,
    out_dir: str | Path,
    plots: bool = True,
    forbidden: Iterable[Path] | None = None,
    markdown: Callable[[Mapping[str, Any]], str] | None = None,
) -> list[Path]:
    """Write ``metrics.json``, ``metrics.md`` and (unless ``plots`` is false) the pictures.

    Parameters
    ----------
    evaluation : Evaluation
        From :func:`evaluate` or :func:`codegraph3d_research.baseline.run_baseline`.
    out_dir : path-like
        Created when missing.
    plots : bool
        Also draw the pictures of :mod:`codegraph3d_research.plots`.
    forbidden : iterable of path-like, optional
        Folders ``out_dir`` must not lie in; default the run folder (``metrics["run"]``).
    markdown : callable, optional
        Renders ``metrics.md``; default :func:`metrics_markdown`.

    Raises
    ------
    EvaluationInputError
        When ``out_dir`` lies inside a forbidden folder.
    """
    out = Path(out_dir)
    check_out_dir(out, [Path(evaluation.metrics["run"])] if forbidden is None else [Path(f) for f in forbidden])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    written = []
    if plots:
        from .plots import write_plots

        written += write_plots(evaluation, out)
        evaluation.metrics["timings_s"]["plots"] = round(time.perf_counter() - start, 2)
    histograms = write_series_histograms(out / SERIES_HISTOGRAMS, evaluation.batches)
    if histograms is not None:
        written.append(histograms)
    written.append(write_json(out / "metrics.json", evaluation.metrics))
    written.append(write_text(out / "metrics.md", (markdown or metrics_markdown)(evaluation.metrics)))
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit code (0 done, 2 bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m codegraph3d_research.evaluate",
        description="Score a CoDeGraph3D run's outputs against a cohort's ground truth.",
    )
    parser.add_argument("--run", required=True, help="the app's output folder (report.json, SEG/)")
    parser.add_argument("--truth", required=True, help="cohort folder with labels.json, truth/ and dicom/")
    parser.add_argument("--out", help="where metrics.json, metrics.md and the PNGs go "
                                      "(default: <run>/../<run name>-evaluation)")
    parser.add_argument("--n-bins", type=int, default=1000, help="voxel histogram bins over [0, 1] (default 1000)")
    parser.add_argument("--no-plots", action="store_true", help="write the metrics only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = Path(args.out) if args.out else default_out_dir(args.run)
    try:
        check_out_dir(out, [Path(args.run)])
        evaluation = evaluate(args.run, args.truth, n_bins=args.n_bins, keep_cases=not args.no_plots)
        written = write_evaluation(evaluation, out, plots=not args.no_plots)
    except EvaluationInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metrics = evaluation.metrics
    print(f"encoder: {(metrics['encoder'] or {}).get('description', 'unknown')}")
    print(metrics_table(metrics["batches"]))
    for line in notes_and_exclusions(metrics):
        if line.startswith("- "):
            print(line)
    print(f"timings (s): {metrics['timings_s']}")
    print(f"wrote {len(written)} files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
