"""DICOM-SEG writers (highdicom): a BINARY anomaly mask and a FRACTIONAL anomaly score map.

One segment, "Anomaly":

* segmented property category SCT 49755003 "Morphologically abnormal structure" (CID 7150),
* segmented property type SCT 52988006 "Lesion" (CID 7159) -- the method finds deviations from a
  cohort, not a specific disease, so the most general abnormal-finding code is used,
* anatomic region SCT 12738006 "Brain",
* algorithm type AUTOMATIC, AlgorithmIdentificationSequence name "CoDeGraph3D", the given version,
  family DCM 123110 "Artificial Intelligence" (CID 7162).

Text limits: SeriesDescription, ContentDescription and SegmentDescription are LO (at most 64
characters) and ContentLabel is CS (16, upper case); they get short texts that name the method,
the encoder and any weight-free / untrained-encoder warning and say "not for clinical use". The
full, untruncated text goes to ImageComments (LT, up to 10240 characters).

Source datasets may lack Pixel Data (read with ``stop_before_pixels`` or as returned by
:func:`codegraph3d.io.dicom.load_series_volume`): highdicom only needs their headers (checked by
the tests). Files appear whole: they are written to a temporary name in the target folder and
renamed (:func:`codegraph3d.core.files.atomic_path`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from codegraph3d import ALGORITHM_NAME, __version__
from codegraph3d.core.files import atomic_path

__all__ = ["write_binary_seg", "write_fractional_seg", "LO_MAX", "SEGMENT_LABEL", "DISPLAY_RGB"]

logger = logging.getLogger(__name__)

LO_MAX = 64
_LT_MAX = 10240
SEGMENT_LABEL = "Anomaly"
#: The segment's recommended display colour (sRGB; written as CIELab): yellow, which no grey MR
#: pixel has, so viewers that honour it (OHIF does) draw the anomaly distinctly from the image.
DISPLAY_RGB = (255, 255, 0)
_NOT_CLINICAL = "not for clinical use"


def _clean(text: str) -> str:
    # Default character set is ASCII; backslash separates values and control characters are
    # not allowed in LO.
    text = text.encode("ascii", "replace").decode("ascii").replace("\\", "/")
    return " ".join(text.split())


def _fit(text: str, limit: int = LO_MAX) -> str:
    text = _clean(text)
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _check_sources(source_datasets: Sequence[Dataset], shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 3:
        raise ValueError(f"{what} must be 3-D (z, y, x); got shape {shape}")
    if len(source_datasets) != shape[0]:
        raise ValueError(
            f"{what} has {shape[0]} slices but {len(source_datasets)} source datasets were given; "
            "pass the datasets of the series in the volume's z order (LoadedSeries.datasets)"
        )
    if not source_datasets:
        raise ValueError("no source datasets given")
    for ds in source_datasets:
        size = (int(ds.Rows), int(ds.Columns))
        if size != tuple(shape[1:]):
            raise ValueError(
                f"{what} slices are {shape[1]}x{shape[2]} but source {ds.SOPInstanceUID} is "
                f"{size[0]}x{size[1]}; the mask must be on the source series grid"
            )
    series = {str(ds.SeriesInstanceUID) for ds in source_datasets}
    if len(series) != 1:
        raise ValueError(
            f"source datasets come from {len(series)} series; a SEG references one series"
        )


@dataclass(frozen=True)
class _SegTexts:
    """The descriptive texts of one SEG.

    Parameters
    ----------
    series_description : str
        SeriesDescription (LO).
    short : str
        ContentDescription and SegmentDescription (LO).
    image_comments : str
        ImageComments (LT): the full, untruncated text.
    """

    series_description: str
    short: str
    image_comments: str


def _check_write_args(out_path: Path, encoder_description: str, series_number: int) -> None:
    """Refuse a missing output folder, an unnamed encoder or a bad SeriesNumber."""
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output folder {out_path.parent} does not exist; create it first")
    if not encoder_description.strip():
        raise ValueError("encoder_description must name the encoder (e.g. 'DINOv2 ViT-L/14')")
    if not isinstance(series_number, (int, np.integer)) or series_number < 0:
        raise ValueError(f"series_number must be a non-negative integer; got {series_number!r}")


def _seg_texts(
    kind: str,
    *,
    algorithm_version: str,
    encoder_description: str,
    encoder_warning: str | None,
    details: str | None,
    series_description: str | None,
) -> _SegTexts:
    """Build the SEG's texts within their VR limits (a given ``series_description`` is checked)."""
    warning = _clean(encoder_warning) if encoder_warning else ""
    if series_description is None:
        # "not for clinical use" must survive the 64-character limit: only the warning is cut.
        base = f"{ALGORITHM_NAME} {kind}"
        room = LO_MAX - len(base) - len(_NOT_CLINICAL) - 5
        flag = f" [{_fit(warning, room)}]" if warning else ""
        series_description = _fit(f"{base}{flag}, {_NOT_CLINICAL}")
    elif len(series_description) > LO_MAX:
        raise ValueError(
            f"series_description has {len(series_description)} characters; DICOM LO allows {LO_MAX}"
        )
    # The warning leads, so truncation cuts the encoder's tail (kept whole in ImageComments).
    if warning:
        short = _fit(f"{warning}: {encoder_description}")
    else:
        short = _fit(f"{ALGORITHM_NAME} {algorithm_version}, encoder {encoder_description}")
    comments = [
        f"{ALGORITHM_NAME} {algorithm_version}: training-free zero-shot anomaly detection "
        f"(batch-based mutual scoring of 2D foundation-model tokens). {kind} segment "
        f"'{SEGMENT_LABEL}'. Research software, {_NOT_CLINICAL}.",
        f"Encoder: {encoder_description}.",
    ]
    if warning:
        comments.append(f"WARNING: {warning}.")
    if details:
        comments.append(details)
    return _SegTexts(series_description, short, _clean(" ".join(comments))[:_LT_MAX])


def _anomaly_segment(algorithm_version: str, short: str) -> hd.seg.SegmentDescription:
    """The single "Anomaly" segment, described by ``short``."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=_fit(algorithm_version),
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.cid7159.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[codes.SCT.Brain],
        display_color=hd.color.CIELabColor.from_rgb(*DISPLAY_RGB),
    )
    segment.SegmentDescription = short
    return segment


def _segmentation_type_kwargs(fractional: bool) -> dict[str, Any]:
    """The ``hd.seg.Segmentation`` arguments that differ between BINARY and FRACTIONAL."""
    kwargs: dict[str, Any] = {
        "segmentation_type": (
            hd.seg.SegmentationTypeValues.FRACTIONAL
            if fractional
            else hd.seg.SegmentationTypeValues.BINARY
        ),
        "content_label": "ANOMALY_SCORE" if fractional else "ANOMALY",
    }
    if fractional:
        kwargs["fractional_type"] = hd.seg.SegmentationFractionalTypeValues.PROBABILITY
        kwargs["max_fractional_value"] = 255
    return kwargs


def _save(
    seg: hd.seg.Segmentation, out_path: Path, kind: str, empty: bool, series_uid: str
) -> None:
    """Write ``seg`` atomically to ``out_path`` and log it."""
    with atomic_path(out_path) as temporary:
        seg.save_as(temporary, enforce_file_format=True)
    logger.info(
        "Wrote %s SEG %s (%d frames, %s) for series %s",
        kind,
        out_path,
        int(seg.NumberOfFrames),
        "empty" if empty else "non-empty",
        series_uid,
    )


def _write(
    kind: str,
    source_datasets: Sequence[Dataset],
    pixel_array: np.ndarray,
    out_path: Path | str,
    *,
    algorithm_version: str,
    encoder_description: str,
    series_number: int,
    encoder_warning: str | None,
    details: str | None,
    series_description: str | None,
    series_instance_uid: str | None,
    sop_instance_uid: str | None,
    manufacturer: str,
    manufacturer_model_name: str,
    software_versions: str,
    device_serial_number: str,
    fractional: bool,
) -> Path:
    out_path = Path(out_path)
    _check_write_args(out_path, encoder_description, series_number)
    texts = _seg_texts(
        kind,
        algorithm_version=algorithm_version,
        encoder_description=encoder_description,
        encoder_warning=encoder_warning,
        details=details,
        series_description=series_description,
    )
    segment = _anomaly_segment(algorithm_version, texts.short)
    empty = not np.any(pixel_array)
    seg = hd.seg.Segmentation(
        source_images=list(source_datasets),
        pixel_array=pixel_array,
        segment_descriptions=[segment],
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=_fit(manufacturer),
        manufacturer_model_name=_fit(manufacturer_model_name),
        software_versions=_fit(software_versions),
        device_serial_number=_fit(device_serial_number),
        content_description=texts.short,
        content_creator_name=None,
        # An all-empty mask keeps every frame: explicit and valid (highdicom would otherwise
        # fall back to that itself, with a warning).
        omit_empty_frames=not empty,
        **_segmentation_type_kwargs(fractional),
    )
    seg.SeriesDescription = texts.series_description
    seg.ImageComments = texts.image_comments
    _save(seg, out_path, kind, empty, source_datasets[0].SeriesInstanceUID)
    return out_path


def write_binary_seg(
    source_datasets: Sequence[Dataset],
    mask_zyx: np.ndarray,
    out_path: Path | str,
    *,
    algorithm_version: str = __version__,
    encoder_description: str,
    series_number: int,
    encoder_warning: str | None = None,
    details: str | None = None,
    series_description: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    manufacturer: str = "CoDeGraph3D project",
    manufacturer_model_name: str = ALGORITHM_NAME,
    software_versions: str = __version__,
    device_serial_number: str = "0",
) -> Path:
    """Write a BINARY DICOM-SEG of the anomaly mask, referencing the source slices.

    Parameters
    ----------
    source_datasets : sequence of pydicom.dataset.Dataset
        Source slice headers in the mask's z order (``LoadedSeries.datasets``); Pixel Data not
        needed.
    mask_zyx : numpy.ndarray
        Boolean (or 0/1) mask, shape ``(len(source_datasets), Rows, Columns)``. May be all False:
        the SEG then holds every frame, empty.
    out_path : pathlib.Path or str
        Target file; its folder must exist. Written atomically.
    algorithm_version : str
        Version in AlgorithmIdentificationSequence and descriptions.
    encoder_description : str
        Encoder identity, e.g. ``"DINOv2 ViT-L/14 sha256:1a2b3c4d"``.
    series_number : int
        SeriesNumber of the SEG series (deterministic, unlike the SDK writer's random one).
    encoder_warning : str, optional
        E.g. ``"weight-free intensity encoder"`` or ``"UNTRAINED ViT, no anomaly signal"``; shown
        in SeriesDescription, ContentDescription, SegmentDescription and ImageComments.
    details : str, optional
        Extra text for ImageComments (threshold, batch, weights hash ...).
    series_description : str, optional
        Overrides the generated one (at most 64 characters).
    series_instance_uid, sop_instance_uid : str, optional
        UIDs of the new instance; generated when omitted.
    manufacturer, manufacturer_model_name, software_versions, device_serial_number : str
        General / Enhanced General Equipment attributes of the SEG.

    Returns
    -------
    pathlib.Path
        ``out_path``.
    """
    mask = np.asarray(mask_zyx)
    _check_sources(source_datasets, mask.shape, "mask_zyx")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(
                "mask_zyx must be boolean or hold only 0 and 1; threshold the score map first"
            )
        mask = mask.astype(bool)
    return _write(
        "binary",
        source_datasets,
        mask.astype(np.uint8),
        out_path,
        algorithm_version=algorithm_version,
        encoder_description=encoder_description,
        series_number=series_number,
        encoder_warning=encoder_warning,
        details=details,
        series_description=series_description,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        device_serial_number=device_serial_number,
        fractional=False,
    )


def write_fractional_seg(
    source_datasets: Sequence[Dataset],
    unit_map_zyx: np.ndarray,
    out_path: Path | str,
    *,
    algorithm_version: str = __version__,
    encoder_description: str,
    series_number: int,
    encoder_warning: str | None = None,
    details: str | None = None,
    series_description: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    manufacturer: str = "CoDeGraph3D project",
    manufacturer_model_name: str = ALGORITHM_NAME,
    software_versions: str = __version__,
    device_serial_number: str = "0",
) -> Path:
    """Write a FRACTIONAL (PROBABILITY, 8-bit) DICOM-SEG of the anomaly score map in [0, 1].

    The values are anomaly scores mapped to [0, 1] within the contrast batch, not calibrated
    probabilities; DICOM has no better fractional type, and ImageComments says so. Stored as
    ``round(255 * value)``, so readers get the value back to within 1/510.

    Parameters
    ----------
    unit_map_zyx : numpy.ndarray
        Float map, shape ``(len(source_datasets), Rows, Columns)``, finite, within [0, 1].

    Other parameters are those of :func:`write_binary_seg`.
    """
    unit = np.asarray(unit_map_zyx, dtype=np.float32)
    _check_sources(source_datasets, unit.shape, "unit_map_zyx")
    if not np.all(np.isfinite(unit)):
        raise ValueError("unit_map_zyx holds NaN or infinite values; set background to 0 first")
    lo, hi = float(unit.min()), float(unit.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"unit_map_zyx must lie in [0, 1]; got [{lo:.4g}, {hi:.4g}]; clip or rescale it"
        )
    note = "Fractional values are batch-normalised anomaly scores, not calibrated probabilities."
    return _write(
        "score",
        source_datasets,
        unit,
        out_path,
        algorithm_version=algorithm_version,
        encoder_description=encoder_description,
        series_number=series_number,
        encoder_warning=encoder_warning,
        details=f"{note} {details}" if details else note,
        series_description=series_description,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        device_serial_number=device_serial_number,
        fractional=True,
    )
