"""Do two runs of the app on the same input agree? (A container run against a plain one, say.)

Two runs agree when they made the same decision for every series (scored or skipped, and why),
their scores differ by at most ``score_tolerance`` and their binary SEG masks differ in at most
``mask_tolerance`` of the source voxels. Bitwise equality is not asked for: BLAS thread counts
change the last bits of the scores, and a voxel whose upsampled score sits on the threshold can
flip.

Command line::

    codegraph3d run-diff OUTPUT_A OUTPUT_B [--score-tolerance 1e-4] [--mask-tolerance 1e-3]

prints one line per series and exits 0 when the runs agree, 1 when they do not, 2 on bad input.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

__all__ = ["RunDifference", "SeriesDifference", "binary_seg_difference", "compare_runs", "read_report"]


@dataclass(frozen=True)
class SeriesDifference:
    """How one series' results differ between the runs."""

    series_instance_uid: str
    status_a: str | None
    status_b: str | None
    reason_a: str | None = None
    reason_b: str | None = None
    score_difference: float | None = None
    differing_voxels: int | None = None
    source_voxels: int | None = None
    flagged_a: bool | None = None
    flagged_b: bool | None = None

    @property
    def mask_fraction(self) -> float | None:
        """Differing voxels as a fraction of the source series' voxels."""
        if self.differing_voxels is None or not self.source_voxels:
            return None
        return self.differing_voxels / self.source_voxels


@dataclass
class RunDifference:
    """The comparison of two output folders; ``problems`` is empty when they agree."""

    series: list[SeriesDifference] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def agree(self) -> bool:
        return not self.problems

    @property
    def max_score_difference(self) -> float:
        values = [s.score_difference for s in self.series if s.score_difference is not None]
        return max(values, default=0.0)

    @property
    def max_mask_fraction(self) -> float:
        values = [s.mask_fraction for s in self.series if s.mask_fraction is not None]
        return max(values, default=0.0)


def read_report(folder: Path) -> dict[str, Any]:
    """The report.json of an output folder; a ``ValueError`` naming the file when it is not a run's report."""
    path = folder / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}; is {folder} an output folder of the app?") from error
    if not isinstance(report.get("series"), list):
        raise ValueError(f"{path} has no 'series' list; is it a codegraph3d report?")
    return report


def _frames_by_position(path: Path) -> tuple[dict[Hashable, np.ndarray], int]:
    """A binary SEG's frames keyed by (segment, source image), and the source series' voxel count.

    Empty frames may be left out of a SEG, so frames are matched by what they cover rather than by
    their order, and a frame one SEG lacks counts as all zeros.
    """
    dataset = pydicom.dcmread(path)
    if getattr(dataset, "SegmentationType", None) != "BINARY":
        raise ValueError(f"{path} is not a BINARY segmentation")
    pixels = np.asarray(dataset.pixel_array, dtype=bool)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    shared = dataset.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in dataset else None

    def item(group: Any, keyword: str) -> Any:
        # A functional group common to every frame lives in the shared sequence instead.
        if keyword in group:
            return group[keyword].value[0]
        if shared is not None and keyword in shared:
            return shared[keyword].value[0]
        return None

    frames: dict[Hashable, np.ndarray] = {}
    for index, group in enumerate(dataset.PerFrameFunctionalGroupsSequence):
        identification = item(group, "SegmentIdentificationSequence")
        segment = int(identification.ReferencedSegmentNumber) if identification is not None else 1
        derivation = item(group, "DerivationImageSequence")
        if derivation is not None and "SourceImageSequence" in derivation:
            where: Hashable = str(derivation.SourceImageSequence[0].ReferencedSOPInstanceUID)
        else:
            where = tuple(round(float(v), 3) for v in item(group, "PlanePositionSequence").ImagePositionPatient)
        frames[(segment, where)] = pixels[index]
    sources = sum(len(series.ReferencedInstanceSequence) for series in dataset.ReferencedSeriesSequence)
    return frames, int(dataset.Rows) * int(dataset.Columns) * sources


def binary_seg_difference(path_a: Path, path_b: Path) -> tuple[int, int]:
    """Voxels that differ between two binary SEGs of the same series, and the series' voxel count."""
    frames_a, voxels_a = _frames_by_position(path_a)
    frames_b, voxels_b = _frames_by_position(path_b)
    if voxels_a != voxels_b:
        raise ValueError(f"{path_a} and {path_b} do not cover the same source voxels ({voxels_a} vs {voxels_b})")
    differing = 0
    for key in set(frames_a) | set(frames_b):
        a, b = frames_a.get(key), frames_b.get(key)
        if a is None:
            differing += int(np.count_nonzero(b))
        elif b is None:
            differing += int(np.count_nonzero(a))
        else:
            differing += int(np.count_nonzero(a != b))
    return differing, voxels_a


def compare_runs(output_a: Path, output_b: Path, score_tolerance: float = 1e-4, mask_tolerance: float = 1e-3) -> RunDifference:
    """Compare two output folders of the app on the same input.

    Parameters
    ----------
    output_a, output_b
        Output folders (each with report.json and SEG/).
    score_tolerance
        Largest allowed absolute difference of a series' anomaly score.
    mask_tolerance
        Largest allowed fraction of a series' source voxels on which the binary SEGs differ.
    """
    if score_tolerance < 0 or not 0 <= mask_tolerance <= 1:
        raise ValueError("score_tolerance must be >= 0 and mask_tolerance within [0, 1]")
    output_a, output_b = Path(output_a), Path(output_b)
    report_a, report_b = read_report(output_a), read_report(output_b)
    result = RunDifference()
    if report_a.get("status") != report_b.get("status"):
        result.problems.append(f"run status {report_a.get('status')!r} vs {report_b.get('status')!r}")
    for key, what in (("sr", "an SR"), ("sr_key_slices", "a key-slice SR")):
        with_sr_a = {s["study_instance_uid"] for s in report_a.get("studies", []) if s.get(key)}
        with_sr_b = {s["study_instance_uid"] for s in report_b.get("studies", []) if s.get(key)}
        for uid in sorted(with_sr_a ^ with_sr_b):
            result.problems.append(f"study {uid}: {what} was written in only one run")
    series_a = {s["series_instance_uid"]: s for s in report_a["series"]}
    series_b = {s["series_instance_uid"]: s for s in report_b["series"]}
    for uid in sorted(set(series_a) ^ set(series_b)):
        result.problems.append(f"series {uid} is in only one of the reports")
    for uid in sorted(set(series_a) & set(series_b)):
        a, b = series_a[uid], series_b[uid]
        score_difference = differing = voxels = None
        if a["status"] != b["status"] or a.get("reason") != b.get("reason"):
            result.problems.append(f"series {uid}: {a['status']} ({a.get('reason')}) vs {b['status']} ({b.get('reason')})")
        elif a["status"] == "scored":
            score_difference = abs(float(a["score"]) - float(b["score"]))
            if not score_difference <= score_tolerance:
                result.problems.append(f"series {uid}: scores differ by {score_difference:.3g} > {score_tolerance:g}")
            if a.get("seg_binary") and b.get("seg_binary"):
                differing, voxels = binary_seg_difference(output_a / a["seg_binary"], output_b / b["seg_binary"])
                if differing > mask_tolerance * voxels:
                    result.problems.append(
                        f"series {uid}: binary masks differ in {differing} of {voxels} voxels "
                        f"({differing / voxels:.3%} > {mask_tolerance:.3%})"
                    )
            elif bool(a.get("seg_binary")) != bool(b.get("seg_binary")):
                result.problems.append(f"series {uid}: a binary SEG was written in only one run")
        result.series.append(
            SeriesDifference(
                uid, a["status"], b["status"], a.get("reason"), b.get("reason"), score_difference,
                differing, voxels, a.get("flagged"), b.get("flagged"),
            )
        )
    return result
