"""Measure brain masks against the truth of a synthetic cohort.

``python -m codegraph3d_research.mask_quality COHORT_FOLDER --models MODEL_FOLDER
[--methods deepbet carried template] [--n4/--no-n4] [--limit N] [--out results.md --out results.json]``

For every series of a cohort written by :func:`codegraph3d_research.synthetic.make_cohort` (or
``tools/make_demo_cohort.py``), optionally only of its first ``N`` studies, each requested method
makes a brain mask on the series' own grid, and the mask is compared with the series' ``_brain``
truth (``labels.json`` -> ``truth.brain``):

* ``deepbet``: :class:`codegraph3d.preprocess.skullstrip.DeepBetStripper` on the series itself;
* ``carried``: for a series other than T1w in a study that has a T1w series, the T1w series'
  deepbet mask moved onto it by :func:`codegraph3d.preprocess.skullstrip.carry_mask` (rigid, intra-study),
  with the carry's ``doubtful`` flag; T1w series, and studies without one, get ``n/a``. The raw
  carry is measured: the application's fallback (stripping the series itself when the carry is
  doubtful) is not applied, so the flag can be judged against the Dice it warned about;
* ``template``: :func:`codegraph3d.preprocess.skullstrip.template_brain_mask` (affine registration to the
  MNI152 brain template installed under the model folder).

With ``--n4`` (the default, as in the application) each series is first corrected by
:func:`codegraph3d.preprocess.skullstrip.n4_bias_correct`, and every method sees the corrected series.

What is measured, per (series, method):

* Dice ``2 |M & T| / (|M| + |T|)`` of the mask ``M`` and the truth ``T``, voxel-wise on the
  series grid;
* the volumes of both (ml) and the signed volume error ``mask - truth`` (ml);
* the seconds the method took (N4 excluded; it is shared by all methods and reported per series as
  ``n4_seconds``). A carry's seconds exclude the T1w series' deepbet run.

The truth ``brain`` is the template's brain mask warped with the subject: grey and white matter,
the deep structures and the CSF enclosed by them (the ventricles). It excludes the subarachnoid CSF
shell between the brain and the inner table of the skull, which the synthetic heads render as a
separate shell. A mask that includes that shell (as some extractors, trained on masks that do, will)
is penalised here: its Dice drops and its volume error is positive although it follows the skull
correctly. Read a consistent positive volume error with a still-high Dice in that light.

The summary groups the rows by contrast x input (``head`` or ``skull-stripped``, from the series'
``skull_stripped`` flag) x method: number of series measured, failures, mean and minimum Dice, mean
signed and mean absolute volume error (ml), mean seconds. It is written as a Markdown table (with
the per-series rows below it) and as JSON (``rows`` and ``summary``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import SimpleITK as sitk

from codegraph3d.io.dicom import SeriesHeader, load_series_volume, scan_headers
from codegraph3d.preprocess.skullstrip import (
    BrainMaskResult,
    SkullStripError,
    carry_mask,
    make_stripper,
    n4_bias_correct,
)
from .synthetic import read_labels
from codegraph3d.core.volume import Volume

__all__ = [
    "MASK_QUALITY_SCHEMA",
    "METHODS",
    "SUMMARY_HEADER",
    "CohortLabelsError",
    "SeriesLabel",
    "StudyLabel",
    "build_parser",
    "dice",
    "load_labels",
    "main",
    "measure_cohort",
    "read_truth_brain",
    "summarize",
    "to_markdown",
]

MASK_QUALITY_SCHEMA = "codegraph3d.mask-quality/1"
METHODS: tuple[str, ...] = ("deepbet", "carried", "template")
SUMMARY_HEADER = (
    "| contrast | input | method | n | failed | mean Dice | min Dice | mean volume error (ml) "
    "| mean abs. volume error (ml) | mean seconds |"
)
# Grid agreement between a truth mask and its series: far above float32 header rounding, far
# below any real misfit (the same tolerances as codegraph3d_research.evaluate).
_LINEAR_TOLERANCE = 1e-3
_ORIGIN_TOLERANCE_MM = 1e-2

# One series ready for the methods: the (N4-corrected) volume, its truth, the N4 seconds.
_Prepared = tuple[Volume, np.ndarray, float | None]


class CohortLabelsError(ValueError):
    """The cohort folder or its ``labels.json`` cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class SeriesLabel:
    """One series of ``labels.json`` with the fields this module uses.

    Attributes
    ----------
    series_instance_uid, contrast : str
        Identity and true contrast.
    skull_stripped : bool
        False for a whole head (skull, scalp, neck), True for a brain-only series.
    brain_path : pathlib.Path
        Absolute path of the ``_brain`` truth (NIfTI, on the series' own grid).
    """

    series_instance_uid: str
    contrast: str
    skull_stripped: bool
    brain_path: Path


@dataclass(frozen=True)
class StudyLabel:
    """One study of ``labels.json``: its patient and its series (localizers excluded)."""

    patient_id: str
    study_instance_uid: str
    series: tuple[SeriesLabel, ...]


def load_labels(cohort: str | Path) -> list[StudyLabel]:
    """Read and validate ``<cohort>/labels.json``.

    Parameters
    ----------
    cohort : str or Path
        A cohort folder holding ``labels.json``, ``truth/`` and ``dicom/``.

    Returns
    -------
    list of StudyLabel
        The studies in file order.

    Raises
    ------
    CohortLabelsError
        When ``labels.json`` is missing, is not JSON, or lacks a field this module needs.
    """
    root = Path(cohort)
    path = root / "labels.json"
    try:
        labels = read_labels(root)
    except ValueError as error:
        raise CohortLabelsError(str(error)) from error
    studies: list[StudyLabel] = []
    for s_index, study in enumerate(labels["studies"]):
        if not isinstance(study, Mapping) or not isinstance(study.get("series"), list):
            raise CohortLabelsError(f"{path}: studies[{s_index}] lacks a 'series' list")
        series: list[SeriesLabel] = []
        for entry in study["series"]:
            try:
                skull_stripped = entry["skull_stripped"]
                if not isinstance(skull_stripped, bool):
                    raise TypeError(f"'skull_stripped' must be true or false, got {skull_stripped!r}")
                series.append(SeriesLabel(
                    series_instance_uid=str(entry["series_instance_uid"]),
                    contrast=str(entry["contrast"]),
                    skull_stripped=skull_stripped,
                    brain_path=root / str(entry["truth"]["brain"]),
                ))
            except (KeyError, TypeError) as error:
                raise CohortLabelsError(
                    f"{path}: a series of studies[{s_index}] is unusable ({error!s}); each series needs "
                    "series_instance_uid, contrast, skull_stripped (bool) and truth.brain. Cohorts written "
                    "before whole heads existed lack skull_stripped: regenerate the cohort"
                ) from error
        studies.append(StudyLabel(
            patient_id=str(study.get("patient_id", "")),
            study_instance_uid=str(study.get("study_instance_uid", "")),
            series=tuple(series),
        ))
    return studies


def read_truth_brain(path: str | Path, volume: Volume) -> np.ndarray:
    """The ``_brain`` truth of a series as a boolean ``[z, y, x]`` array on the series' grid.

    Parameters
    ----------
    path : str or Path
        The truth NIfTI.
    volume : Volume
        The series it belongs to (from :func:`codegraph3d.io.dicom.load_series_volume`).

    Raises
    ------
    CohortLabelsError
        When the file is missing, or its shape or geometry is not the series'.
    """
    path = Path(path)
    name = f"series {volume.series_instance_uid}"
    if not path.is_file():
        raise CohortLabelsError(f"{name}: the brain truth {path} does not exist; restore it or regenerate the cohort")
    image = sitk.ReadImage(str(path))
    mask = sitk.GetArrayFromImage(image) > 0
    if mask.shape != volume.array.shape:
        raise CohortLabelsError(
            f"{name}: the brain truth {path.name} has shape {mask.shape} (z, y, x) but the series has "
            f"{volume.array.shape}; the truth belongs to another series or grid"
        )
    truth_volume = Volume.from_sitk(sitk.Cast(image, sitk.sitkUInt8))
    expected = volume.index_to_physical
    found = truth_volume.index_to_physical
    if not (np.allclose(found[:3, :3], expected[:3, :3], atol=_LINEAR_TOLERANCE)
            and np.allclose(found[:3, 3], expected[:3, 3], atol=_ORIGIN_TOLERANCE_MM)):
        raise CohortLabelsError(
            f"{name}: the brain truth {path.name} is not on the series' grid (index-to-LPS "
            f"{np.round(found, 3).tolist()}, series {np.round(expected, 3).tolist()}); regenerate the cohort"
        )
    return mask


def dice(mask: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two boolean arrays of one shape (1.0 when both are empty).

    Raises
    ------
    ValueError
        When the shapes differ.
    """
    mask = np.asarray(mask, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if mask.shape != truth.shape:
        raise ValueError(f"dice needs masks of one shape; got {mask.shape} and {truth.shape}")
    total = int(mask.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * float(np.logical_and(mask, truth).sum()) / total


# --------------------------------------------------------------------------------------------------
# measuring


def _voxel_ml(volume: Volume) -> float:
    return float(np.prod(volume.spacing)) / 1000.0


def _row(
    study: StudyLabel, label: SeriesLabel, method: str, truth_ml: float | None, n4_seconds: float | None
) -> dict[str, Any]:
    """A row with the identity filled in and every measurement empty (``status`` set by the caller)."""
    return {
        "patient_id": study.patient_id,
        "study_instance_uid": study.study_instance_uid,
        "series_instance_uid": label.series_instance_uid,
        "contrast": label.contrast,
        "input": "skull-stripped" if label.skull_stripped else "head",
        "method": method,
        "status": "",
        "dice": None,
        "mask_ml": None,
        "truth_ml": None if truth_ml is None else round(truth_ml, 2),
        "volume_error_ml": None,
        "seconds": None,
        "n4_seconds": n4_seconds,
        "doubtful": None,
        "note": "",
    }


def _measured(row: dict[str, Any], mask: np.ndarray, truth: np.ndarray, volume: Volume, seconds: float) -> None:
    mask_ml = float(mask.sum()) * _voxel_ml(volume)
    truth_ml = float(truth.sum()) * _voxel_ml(volume)
    row.update(
        status="ok",
        dice=round(dice(mask, truth), 4),
        mask_ml=round(mask_ml, 2),
        volume_error_ml=round(mask_ml - truth_ml, 2),
        seconds=round(seconds, 3),
    )


def _failed(row: dict[str, Any], error: Exception) -> None:
    row.update(status="failed", note=f"{type(error).__name__}: {error}")


def _not_applicable(row: dict[str, Any], why: str) -> None:
    row.update(status="n/a", note=why)


def measure_cohort(
    cohort: str | Path,
    *,
    models: str | Path | None = None,
    methods: Sequence[str] = METHODS,
    n4: bool = True,
    limit: int | None = None,
    device: str = "cpu",
    progress: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Make each method's brain mask for every series of a cohort and measure it against the truth.

    Parameters
    ----------
    cohort : str or Path
        Synthetic cohort folder (``labels.json``, ``truth/``, ``dicom/``).
    models : str or Path, optional
        Model folder; the ``template`` method needs the registration template installed there.
    methods : sequence of str
        Any of ``METHODS``, each once.
    n4 : bool
        N4-correct each series before any method (as the application does).
    limit : int, optional
        Only the first ``limit`` studies of ``labels.json``.
    device : str
        Torch device for deepbet.
    progress : text stream, optional
        Receives one line per series as it is measured.

    Returns
    -------
    list of dict
        One row per (series, method), series in ``labels.json`` order, methods in ``methods``
        order. ``status`` is ``ok`` (``dice``, ``mask_ml``, ``truth_ml``, ``volume_error_ml``,
        ``seconds`` set), ``n/a`` (the method does not apply; ``note`` says why) or ``failed``
        (``note`` holds the error). ``doubtful`` is the carry's flag for ``carried`` rows.

    Raises
    ------
    CohortLabelsError
        For an unusable ``labels.json``, a series missing from ``dicom/`` or a truth off its grid.
    ValueError
        For unknown or repeated methods or a limit below 1.
    SkullStripError, FileNotFoundError
        When a method's requirements are missing (deepbet package, template).
    """
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct names from {', '.join(METHODS)}; got {list(methods)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (a number of studies); got {limit}")
    root = Path(cohort)
    studies = load_labels(root)[:limit]
    dicom_folder = root / "dicom"
    if not dicom_folder.is_dir():
        raise CohortLabelsError(f"{dicom_folder} does not exist; the cohort folder must hold the series under dicom/")
    headers = {header.series_instance_uid: header for header in scan_headers(dicom_folder).series}
    missing = [s.series_instance_uid for study in studies for s in study.series if s.series_instance_uid not in headers]
    if missing:
        raise CohortLabelsError(
            f"{len(missing)} series of {root / 'labels.json'} are not under {dicom_folder}: {', '.join(missing[:5])}; "
            "the labels belong to another cohort"
        )
    # Build the expensive objects once, and only those asked for.
    deepbet: Callable[[Volume], BrainMaskResult] | None = None
    if "deepbet" in methods or "carried" in methods:
        deepbet = make_stripper("deepbet", model_path=models, device=device)
    template_stripper: Callable[[Volume], BrainMaskResult] | None = None
    if "template" in methods:
        from codegraph3d.preprocess.registration import load_template

        template_stripper = make_stripper("template", model_path=models, template=load_template(models))

    rows: list[dict[str, Any]] = []
    n_series = sum(len(study.series) for study in studies)
    done = 0
    for study in studies:
        # Every series of the study first: the carry needs the T1w series (as N4-corrected) and its mask.
        prepared = _prepare_study(study, headers, n4)
        anchor = next(
            (i for i, label in enumerate(study.series)
             if label.contrast == "T1w" and not isinstance(prepared[i], Exception)),
            None,
        )
        deepbet_masks = _DeepBetMasks(deepbet, prepared)
        for index, label in enumerate(study.series):
            series_rows = _measure_series(
                study, index, prepared, anchor, methods, deepbet_masks, template_stripper
            )
            rows.extend(series_rows)
            done += 1
            if progress is not None:
                print(_progress_line(f"[{done}/{n_series}]", study, label, series_rows), file=progress, flush=True)
    return rows


def _prepare_study(
    study: StudyLabel, headers: Mapping[str, SeriesHeader], n4: bool
) -> list[_Prepared | Exception]:
    """Load each series of a study with its truth and N4-correct it; an N4 failure stays in the list."""
    prepared: list[_Prepared | Exception] = []
    for label in study.series:
        volume = load_series_volume(headers[label.series_instance_uid]).volume
        truth = read_truth_brain(label.brain_path, volume)
        try:
            n4_seconds: float | None = None
            if n4:
                clock = time.perf_counter()
                volume, _ = n4_bias_correct(volume)
                n4_seconds = round(time.perf_counter() - clock, 3)
            prepared.append((volume, truth, n4_seconds))
        except (ValueError, RuntimeError) as error:
            prepared.append(error)
    return prepared


class _DeepBetMasks:
    """deepbet masks of one study's series, each computed once (the carry reuses the T1w one)."""

    def __init__(
        self, stripper: Callable[[Volume], BrainMaskResult] | None, prepared: Sequence[_Prepared | Exception]
    ) -> None:
        self._stripper = stripper
        self._prepared = prepared
        self._done: dict[int, tuple[np.ndarray, float] | Exception] = {}

    def __call__(self, index: int) -> tuple[np.ndarray, float]:
        """Mask and seconds of series ``index``; re-raises the error of a failed run."""
        if index not in self._done:
            item = self._prepared[index]
            if self._stripper is None or isinstance(item, Exception):
                raise RuntimeError(f"internal: no deepbet run possible for series {index} of the study")
            clock = time.perf_counter()
            try:
                self._done[index] = (self._stripper(item[0]).mask, time.perf_counter() - clock)
            except (ValueError, RuntimeError) as error:
                self._done[index] = error
        result = self._done[index]
        if isinstance(result, Exception):
            raise result
        return result

    def failed(self, index: int) -> bool:
        """Whether deepbet ran on series ``index`` and failed."""
        return isinstance(self._done.get(index), Exception)


def _measure_series(
    study: StudyLabel,
    index: int,
    prepared: Sequence[_Prepared | Exception],
    anchor: int | None,
    methods: Sequence[str],
    deepbet_masks: _DeepBetMasks,
    template_stripper: Callable[[Volume], BrainMaskResult] | None,
) -> list[dict[str, Any]]:
    """The rows of series ``index`` of ``study``, one per method (``anchor``: its T1w series)."""
    label = study.series[index]
    item = prepared[index]
    rows = []
    for method in methods:
        if method == "carried" and label.contrast == "T1w":
            row = _row(study, label, method, None, None)
            _not_applicable(row, "T1w series: it is the source of the carried mask")
            rows.append(row)
            continue
        if isinstance(item, Exception):
            row = _row(study, label, method, None, None)
            _failed(row, item)
            rows.append(row)
            continue
        volume, truth, n4_seconds = item
        row = _row(study, label, method, float(truth.sum()) * _voxel_ml(volume), n4_seconds)
        rows.append(row)
        try:
            if method == "deepbet":
                mask, seconds = deepbet_masks(index)
                _measured(row, mask, truth, volume, seconds)
            elif method == "template":
                if template_stripper is None:
                    raise RuntimeError("internal: the template method was not set up")
                clock = time.perf_counter()
                mask = template_stripper(volume).mask
                _measured(row, mask, truth, volume, time.perf_counter() - clock)
            elif anchor is None:
                _not_applicable(row, "the study has no usable T1w series to carry a mask from")
            else:
                source_mask, _ = deepbet_masks(anchor)
                source = prepared[anchor]
                assert not isinstance(source, Exception)  # anchor is chosen among the prepared series
                clock = time.perf_counter()
                mask, carry_qa = carry_mask(source[0], source_mask, volume)
                _measured(row, mask, truth, volume, time.perf_counter() - clock)
                row["doubtful"] = bool(carry_qa["doubtful"])
                row["note"] = "; ".join(carry_qa.get("warnings", []))
        except (ValueError, RuntimeError) as error:
            if method == "carried" and anchor is not None and deepbet_masks.failed(anchor):
                row.update(status="failed", note=f"the T1w series' deepbet mask failed: {error}")
            else:
                _failed(row, error)
    return rows


def _progress_line(counter: str, study: StudyLabel, label: SeriesLabel, rows: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for row in rows:
        if row["status"] == "ok":
            flag = ", doubtful" if row["doubtful"] else ""
            parts.append(f"{row['method']} Dice {row['dice']:.3f} ({row['seconds']:.1f} s{flag})")
        else:
            parts.append(f"{row['method']} {row['status']}")
    n4_seconds = rows[0]["n4_seconds"] if rows else None
    n4_text = f", N4 {n4_seconds:.1f} s" if n4_seconds else ""
    kind = "skull-stripped" if label.skull_stripped else "head"
    return (
        f"{counter} {study.patient_id} {label.contrast} {kind} {label.series_instance_uid}{n4_text}: "
        + "; ".join(parts)
    )


# --------------------------------------------------------------------------------------------------
# summary and output


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group rows by contrast x input x method.

    ``n/a`` rows are left out. Per group: ``n`` (series measured), ``failed``, ``mean_dice``,
    ``min_dice``, ``mean_volume_error_ml`` (signed, mask - truth), ``mean_abs_volume_error_ml``,
    ``mean_seconds`` (``None`` where nothing was measured). Groups are sorted by contrast, input,
    then method in ``METHODS`` order.
    """
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["status"] == "n/a":
            continue
        groups.setdefault((row["contrast"], row["input"], row["method"]), []).append(row)
    order = {method: i for i, method in enumerate(METHODS)}
    summary = []
    for (contrast, kind, method), members in sorted(
        groups.items(), key=lambda item: (item[0][0], item[0][1], order.get(item[0][2], len(order)))
    ):
        ok = [row for row in members if row["status"] == "ok"]
        dices = [float(row["dice"]) for row in ok]
        errors = [float(row["volume_error_ml"]) for row in ok]
        seconds = [float(row["seconds"]) for row in ok]

        def mean(values: list[float]) -> float | None:
            return round(float(np.mean(values)), 4) if values else None

        summary.append({
            "contrast": contrast,
            "input": kind,
            "method": method,
            "n": len(ok),
            "failed": len(members) - len(ok),
            "mean_dice": mean(dices),
            "min_dice": round(min(dices), 4) if dices else None,
            "mean_volume_error_ml": mean(errors),
            "mean_abs_volume_error_ml": mean([abs(v) for v in errors]),
            "mean_seconds": mean(seconds),
        })
    return summary


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def to_markdown(rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """The report: settings, the summary table (``SUMMARY_HEADER``) and the per-series rows."""
    lines = [
        "# Brain mask quality",
        "",
        (
            f"Cohort `{settings.get('cohort')}`; methods {', '.join(settings.get('methods', []))}; "
            f"N4 {'on' if settings.get('n4') else 'off'}; {settings.get('n_studies')} studies, "
            f"{settings.get('n_series')} series."
        ),
        "",
        (
            "Dice and volumes against the `_brain` truth, which excludes the subarachnoid CSF shell "
            "(a mask that includes it is penalised). Volume error = mask - truth. Seconds exclude N4."
        ),
        "",
        "## Summary",
        "",
        SUMMARY_HEADER,
        "|" + "---|" * SUMMARY_HEADER.count(" | ") + "---|",
    ]
    for group in summary:
        lines.append(
            f"| {group['contrast']} | {group['input']} | {group['method']} | {group['n']} | {group['failed']} "
            f"| {_cell(group['mean_dice'], 3)} | {_cell(group['min_dice'], 3)} "
            f"| {_cell(group['mean_volume_error_ml'], 1)} | {_cell(group['mean_abs_volume_error_ml'], 1)} "
            f"| {_cell(group['mean_seconds'], 1)} |"
        )
    header = (
        "| patient | series | contrast | input | method | status | Dice | mask (ml) | truth (ml) "
        "| volume error (ml) | seconds | doubtful | note |"
    )
    lines += ["", "## Per series", "", header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        note = str(row.get("note") or "").replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {row['patient_id']} | {row['series_instance_uid']} | {row['contrast']} | {row['input']} "
            f"| {row['method']} | {row['status']} | {_cell(row['dice'], 3)} | {_cell(row['mask_ml'], 1)} "
            f"| {_cell(row['truth_ml'], 1)} | {_cell(row['volume_error_ml'], 1)} | {_cell(row['seconds'], 1)} "
            f"| {_cell(row['doubtful'], 0) if row['doubtful'] is not None else ''} | {note} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m codegraph3d_research.mask_quality``."""
    parser = argparse.ArgumentParser(
        prog="python -m codegraph3d_research.mask_quality",
        description="Measure brain masks (deepbet, carried T1w mask, template) against a synthetic "
        "cohort's _brain truth: Dice, volumes (ml), seconds, summarised by contrast x input x method.",
    )
    parser.add_argument("cohort", type=Path, help="synthetic cohort folder (labels.json, truth/, dicom/)")
    parser.add_argument("--models", type=Path, default=None,
                        help="model folder; the template method needs its registration template "
                        "('python -m codegraph3d template install MODEL_FOLDER')")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to measure (default: all)")
    parser.add_argument("--n4", action=argparse.BooleanOptionalAction, default=True,
                        help="N4-correct each series before the methods, as the application does (default on)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N studies of labels.json")
    parser.add_argument("--device", default="cpu", help="torch device for deepbet (default cpu)")
    parser.add_argument("--out", type=Path, action="append", default=[],
                        help="write the report here: .md (Markdown) or .json (rows and summary); repeatable")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0, or 2 for unusable input)."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1; got {args.limit}")
    if len(set(args.methods)) != len(args.methods):
        parser.error(f"--methods must not repeat; got {args.methods}")
    bad = [str(path) for path in args.out if path.suffix.lower() not in (".md", ".json")]
    if bad:
        parser.error(f"--out must end with .md or .json; got {', '.join(bad)}")
    try:
        rows = measure_cohort(
            args.cohort, models=args.models, methods=args.methods, n4=args.n4, limit=args.limit,
            device=args.device, progress=sys.stdout,
        )
    except (CohortLabelsError, SkullStripError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = summarize(rows)
    settings = {
        "cohort": str(args.cohort),
        "methods": list(args.methods),
        "n4": bool(args.n4),
        "limit": args.limit,
        "device": args.device,
        "n_studies": len({row["study_instance_uid"] for row in rows}),
        "n_series": len({row["series_instance_uid"] for row in rows}),
    }
    markdown = to_markdown(rows, summary, settings)
    for path in args.out:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".md":
            path.write_text(markdown, encoding="utf-8")
        else:
            document = {"schema": MASK_QUALITY_SCHEMA, "settings": settings, "summary": summary, "rows": rows}
            path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    print(markdown.split("## Per series")[0].rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
