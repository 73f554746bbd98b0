"""DICOM SR writer (highdicom): one TID 1500 measurement report per study.

For every scored series of the study, one volumetric ROI group (TID 1411) references the
series' binary SEG segment "Anomaly" and the source series, and holds:

* the anomaly score, its rank in the contrast batch (1 = most anomalous) and the batch size, its
  percentile in the batch and the batch's volume threshold (codes of this product's own scheme,
  ``99CDG3D``: no standard code names a batch-relative anomaly score),
* the anomalous volume, SCT 118565006 "Volume", in ml,
* a qualitative evaluation "Anomaly flagged": SCT Yes / No.

Viewers and PACS that understand TID 1500 show these beside the SEG. The report is a
Comprehensive 3D SR whose evidence is the SEGs it references; patient and study come from them.
Files appear whole (written to a temporary name and renamed).
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

from codegraph3d import ALGORITHM_NAME, __version__
from codegraph3d.atomic import atomic_path

__all__ = ["CODING_SCHEME", "CONCEPTS", "SeriesFinding", "write_study_sr"]

logger = logging.getLogger(__name__)

#: Private coding scheme of this product, for concepts no standard terminology has.
CODING_SCHEME = "99CDG3D"
CONCEPTS: dict[str, hd.sr.CodedConcept] = {
    "score": hd.sr.CodedConcept("ANOMALY_SCORE", CODING_SCHEME, "Anomaly score"),
    "rank": hd.sr.CodedConcept("BATCH_RANK", CODING_SCHEME, "Rank of anomaly score in batch"),
    "batch_size": hd.sr.CodedConcept("BATCH_SIZE", CODING_SCHEME, "Number of series in batch"),
    "percentile": hd.sr.CodedConcept("BATCH_PERCENTILE", CODING_SCHEME, "Percentile of anomaly score in batch"),
    "threshold": hd.sr.CodedConcept("BATCH_THRESHOLD", CODING_SCHEME, "Anomaly score threshold of batch"),
    "flagged": hd.sr.CodedConcept("ANOMALY_FLAGGED", CODING_SCHEME, "Anomaly flagged"),
}
_NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
_PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
_MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_VOLUME = hd.sr.CodedConcept("118565006", "SCT", "Volume")


@dataclass(frozen=True)
class SeriesFinding:
    """What the SR says about one scored series.

    Attributes
    ----------
    seg : Dataset
        The series' binary SEG (headers suffice); its segment 1 is referenced.
    score, threshold : float
        The anomaly score and the batch's volume threshold.
    rank, batch_size : int
        Rank in the contrast batch (1 = most anomalous) and the batch's size.
    percentile : float
        Percentile of the score in the batch, 0-100.
    flagged : bool
        Whether the series is flagged as anomalous.
    anomalous_volume_ml : float
        Volume of the binary mask, ml.
    """

    seg: Dataset
    score: float
    rank: int
    batch_size: int
    percentile: float
    threshold: float
    flagged: bool
    anomalous_volume_ml: float

    def __post_init__(self) -> None:
        if getattr(self.seg, "Modality", None) != "SEG":
            raise ValueError("SeriesFinding.seg must be a DICOM-SEG dataset")
        for name in ("score", "threshold", "percentile", "anomalous_volume_ml"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"SeriesFinding.{name} must be finite; got {getattr(self, name)!r}")
        if not 1 <= self.rank <= self.batch_size:
            raise ValueError(f"rank {self.rank} is outside the batch of {self.batch_size}")
        if not 0.0 <= self.percentile <= 100.0 or self.anomalous_volume_ml < 0:
            raise ValueError("percentile must be within [0, 100] and the volume >= 0")


def _source_series_uid(seg: Dataset) -> str:
    return str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)


def _roi_group(finding: SeriesFinding, index: int) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=__version__)

    def measure(concept: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=concept, value=float(value), unit=unit, algorithm_id=algorithm)

    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"Anomaly {index}"),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(finding.seg.SOPClassUID),
            sop_instance_uid=str(finding.seg.SOPInstanceUID),
            segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(_source_series_uid(finding.seg)),
        ),
        finding_type=codes.SCT.Lesion,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Brain)],
        algorithm_id=algorithm,
        measurements=[
            measure(CONCEPTS["score"], finding.score, _NO_UNITS),
            measure(CONCEPTS["rank"], finding.rank, _NO_UNITS),
            measure(CONCEPTS["batch_size"], finding.batch_size, _NO_UNITS),
            measure(CONCEPTS["percentile"], finding.percentile, _PERCENT),
            measure(CONCEPTS["threshold"], finding.threshold, _NO_UNITS),
            measure(_VOLUME, finding.anomalous_volume_ml, _MILLILITRE),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(CONCEPTS["flagged"], codes.SCT.Yes if finding.flagged else codes.SCT.No)
        ],
    )


def write_study_sr(
    findings: Sequence[SeriesFinding],
    out_path: Path | str,
    *,
    series_number: int,
    manufacturer: str = "CoDeGraph3D project",
) -> Path:
    """Write one study's TID 1500 measurement report.

    Parameters
    ----------
    findings : sequence of SeriesFinding
        The study's scored series (at least one), all of one study.
    out_path : path-like
        Target file; its folder must exist. Written atomically.
    series_number : int
        SeriesNumber of the SR.
    manufacturer : str
        Manufacturer of the SR (the device that made it).
    """
    out_path = Path(out_path)
    if not findings:
        raise ValueError("an SR needs at least one scored series")
    studies = {str(f.seg.StudyInstanceUID) for f in findings}
    if len(studies) != 1:
        raise ValueError(f"the findings come from {len(studies)} studies; one SR reports one study")
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output folder {out_path.parent} does not exist; create it first")
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=hd.UID(), name=ALGORITHM_NAME, manufacturer_name=manufacturer, model_name=ALGORITHM_NAME,
            ),
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.LN.BrainMRI,
        imaging_measurements=[_roi_group(f, i + 1) for i, f in enumerate(findings)],
    )
    document = hd.sr.Comprehensive3DSR(
        evidence=[f.seg for f in findings],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    document.SeriesDescription = f"{ALGORITHM_NAME} anomaly report, not for clinical use"
    # A private coding scheme must be declared in the object that uses it (PS3.3 C.12.1.1.2.1).
    scheme = Dataset()
    scheme.CodingSchemeDesignator = CODING_SCHEME
    scheme.CodingSchemeName = f"{ALGORITHM_NAME} anomaly report concepts"
    scheme.CodingSchemeResponsibleOrganization = manufacturer
    document.CodingSchemeIdentificationSequence = [
        *getattr(document, "CodingSchemeIdentificationSequence", []), scheme,
    ]
    with atomic_path(out_path) as temporary:
        document.save_as(temporary, enforce_file_format=True)
    logger.info("Wrote SR %s for study %s (%d series)", out_path, next(iter(studies)), len(findings))
    return out_path
