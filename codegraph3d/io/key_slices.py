"""DICOM SR of the findings on their key slices (TID 1500, planar ROIs), for image viewers.

The study's measurement report (:mod:`codegraph3d.io.sr`) describes each finding as a volumetric
ROI on the binary SEG's segment (TID 1411): what PACS and archives read. Image viewers such as
OHIF draw SR measurements only as regions on an image (SCOORD), and OHIF 3 cannot open a report
in which some groups have no such region. This second report therefore holds planar groups
only (TID 1410), one per finding (the 10 largest of each series), each with:

* a closed polyline (SCOORD POLYLINE, image pixel coordinates, (0, 0) the top left corner of
  the top left pixel) around the finding on its **key slice**, the source image that holds
  most of its voxels: the bounding rectangle of the finding's pixels there;
* the finding's volume (ml, of the whole 3D finding, not the slice) and peak anomaly score, the
  series' "Anomaly flagged" answer, and the tracking identifier
  "Anomaly {series} finding {k} of {n}" the measurement report uses for the same finding.

The report's evidence is the key slices' source images; patient and study come from them. A
study without findings gets no such report. Files appear whole (temporary name, then renamed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from codegraph3d.io.sr import (
    CONCEPTS,
    MAX_FINDING_GROUPS,
    SeriesFinding,
    measure,
    policy_concept,
    save_measurement_report,
    yes_no,
)

__all__ = ["KeySlice", "write_key_slice_sr"]

logger = logging.getLogger(__name__)

_NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
_MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_VOLUME = hd.sr.CodedConcept("118565006", "SCT", "Volume")


@dataclass(frozen=True)
class KeySlice:
    """Where a finding is drawn: its source image and its pixel rectangle there.

    Attributes
    ----------
    image : Dataset
        Header of the source image (slice) holding most of the finding's voxels.
    rows, columns : tuple of 2 int
        First and last pixel row and column (0-based, inclusive) of the finding on that image.
    """

    image: Dataset
    rows: tuple[int, int]
    columns: tuple[int, int]

    def __post_init__(self) -> None:
        for attribute in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns"):
            if attribute not in self.image:
                raise ValueError(f"KeySlice.image lacks {attribute}: pass the source image's header")
        limits = {"rows": int(self.image.Rows), "columns": int(self.image.Columns)}
        for name, limit in limits.items():
            first, last = (int(v) for v in getattr(self, name))
            if not 0 <= first <= last < limit:
                raise ValueError(f"KeySlice.{name} must be 0 <= first <= last < {limit}; got {getattr(self, name)!r}")
            object.__setattr__(self, name, (first, last))

    def polyline(self) -> np.ndarray:
        """The closed rectangle around the finding's pixels, ``(5, 2)`` (column, row) float32."""
        (r0, r1), (c0, c1) = self.rows, self.columns
        # Pixel edges: the rectangle encloses whole pixels r0..r1 and c0..c1.
        corners = [(c0, r0), (c1 + 1, r0), (c1 + 1, r1 + 1), (c0, r1 + 1), (c0, r0)]
        return np.asarray(corners, dtype=np.float32)


def _planar_group(
    series: SeriesFinding, index: int, k: int, key: KeySlice
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The TID 1410 group of finding ``k`` (1-based) of series ``index`` (1-based)."""
    item = series.findings[k - 1]
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=key.polyline(),
        source_image=hd.sr.SourceImageForRegion(str(key.image.SOPClassUID), str(key.image.SOPInstanceUID)),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"Anomaly {index} finding {k} of {len(series.findings)}",
        ),
        referenced_region=region,
        finding_type=codes.SCT.Lesion,
        method=policy_concept(series.policy) if series.policy else None,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Brain)],
        measurements=[
            measure(_VOLUME, item.volume_ml, _MILLILITRE),
            measure(CONCEPTS["peak_score"], item.peak_score, _NO_UNITS),
        ],
        qualitative_evaluations=[yes_no(CONCEPTS["flagged"], series.flagged)],
    )


def _groups(
    series: Sequence[SeriesFinding], key_slices: Sequence[Sequence[KeySlice]]
) -> tuple[list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations], list[Dataset]]:
    """Every finding's group (the largest ``MAX_FINDING_GROUPS`` per series) and their images."""
    groups, images = [], {}
    for index, (entry, keys) in enumerate(zip(series, key_slices), start=1):
        if len(keys) != len(entry.findings):
            raise ValueError(
                f"series {index} has {len(entry.findings)} findings but {len(keys)} key slices; give one per finding"
            )
        for k, key in enumerate(keys[:MAX_FINDING_GROUPS], start=1):
            groups.append(_planar_group(entry, index, k, key))
            images[str(key.image.SOPInstanceUID)] = key.image
    return groups, list(images.values())


def write_key_slice_sr(
    series: Sequence[SeriesFinding],
    key_slices: Sequence[Sequence[KeySlice]],
    out_path: Path | str,
    *,
    series_number: int,
    manufacturer: str = "CoDeGraph3D project",
) -> Path | None:
    """Write one study's findings as planar ROIs on their key slices (module docstring).

    Parameters
    ----------
    series : sequence of SeriesFinding
        The study's scored series, in the order of its measurement report (the same indices
        name the same findings in both reports).
    key_slices : sequence of sequences of KeySlice
        Per series, one key slice per finding, in the order of ``SeriesFinding.findings``.
    out_path : path-like
        Target file; its folder must exist. Written atomically.
    series_number : int
        SeriesNumber of the SR.
    manufacturer : str
        Manufacturer of the SR (the device that made it).

    Returns
    -------
    Path or None
        ``out_path``, or None (nothing written) when no series has a finding.
    """
    out_path = Path(out_path)
    if len(series) != len(key_slices):
        raise ValueError(f"{len(series)} series but {len(key_slices)} lists of key slices; give one list per series")
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output folder {out_path.parent} does not exist; create it first")
    groups, images = _groups(series, key_slices)
    if not groups:
        return None
    save_measurement_report(
        groups, images, out_path, series_number=series_number, manufacturer=manufacturer,
        description="CoDeGraph3D findings on key slices, not for clinical use",
    )
    logger.info("Wrote key-slice SR %s (%d findings on %d images)", out_path, len(groups), len(images))
    return out_path
