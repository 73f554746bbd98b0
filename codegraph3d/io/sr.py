"""DICOM SR writer (highdicom): one TID 1500 measurement report per study.

For every scored series of the study, one volumetric ROI group (TID 1411) references the
series' binary SEG segment "Anomaly" and the source series, and holds:

* the anomaly score, its rank in the contrast batch (1 = most anomalous) and the batch size, its
  percentile in the batch, and the decision threshold: on the anomaly score scale
  (``BATCH_THRESHOLD``) or, for the lesion policy, a bound on a finding's evidence in robust
  standard deviations (``EVIDENCE_THRESH``). These are codes of this product's own scheme,
  ``99CDG3D``: no standard code names a batch-relative anomaly score;
* the anomalous volume, SCT 118565006 "Volume", in ml, and the number of findings (connected
  components of the binary mask);
* the decision policy, as the group's "Measurement Method" (SCT 370129005): a private code
  ``POLICY_`` + 9 hex digits of the SHA-256 of the policy name, whose meaning is the name itself
  (e.g. "position-z-findings/2");
* the policy's operating point: "False flag rate per normal series" in percent when it was measured
  for this encoder and contrast on all-normal batches, and always a qualitative evaluation
  "Operating point measured" (SCT Yes / No), so "not measured" differs from a missing value;
* a qualitative evaluation "Anomaly flagged": SCT Yes / No.

Each finding of a series (the 10 largest at most; "Number of findings" gives the true count) gets
one more volumetric ROI group, tracked as "Anomaly {series} finding {k} of {n}", referencing the
same SEG segment and source series, with the same method, holding the finding's volume (ml), its
peak anomaly score and its centroid in patient LPS mm as three measurements (``CENTROID_LPS_X``,
``_Y``, ``_Z``). TID 1411 takes exactly one ROI reference per group, the segment here, so the
centroid is not also given as a 3D POINT.

Viewers and PACS that understand TID 1500 show these beside the SEG. The report is a
Comprehensive 3D SR whose evidence is the SEGs it references; patient and study come from them.
Files appear whole (written to a temporary name and renamed).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from codegraph3d import ALGORITHM_NAME, __version__
from codegraph3d.core.files import atomic_path

__all__ = [
    "CODING_SCHEME", "CONCEPTS", "MAX_FINDING_GROUPS", "MaskFinding", "SeriesFinding", "declare_scheme", "measure",
    "observation_context", "policy_concept", "save_measurement_report", "write_study_sr", "yes_no",
]

logger = logging.getLogger(__name__)

#: Private coding scheme of this product, for concepts no standard terminology has. Every code
#: value fits DICOM SH (16 characters), so it is written as CodeValue, which every reader knows
#: (longer ones would go to LongCodeValue).
CODING_SCHEME = "99CDG3D"
CONCEPTS: dict[str, hd.sr.CodedConcept] = {
    "score": hd.sr.CodedConcept("ANOMALY_SCORE", CODING_SCHEME, "Anomaly score"),
    "rank": hd.sr.CodedConcept("BATCH_RANK", CODING_SCHEME, "Rank of anomaly score in batch"),
    "batch_size": hd.sr.CodedConcept("BATCH_SIZE", CODING_SCHEME, "Number of series in batch"),
    "percentile": hd.sr.CodedConcept("BATCH_PERCENTILE", CODING_SCHEME, "Percentile of anomaly score in batch"),
    "threshold": hd.sr.CodedConcept("BATCH_THRESHOLD", CODING_SCHEME, "Anomaly score threshold of batch"),
    "evidence_threshold": hd.sr.CodedConcept(
        "EVIDENCE_THRESH", CODING_SCHEME, "Finding evidence threshold (robust SD x ml)"
    ),
    "rim_evidence_threshold": hd.sr.CodedConcept(
        "EVID_THRESH_RIM", CODING_SCHEME, "Finding evidence threshold at brain rim (robust SD x ml)"
    ),
    "flagged": hd.sr.CodedConcept("ANOMALY_FLAGGED", CODING_SCHEME, "Anomaly flagged"),
    "n_findings": hd.sr.CodedConcept("FINDING_COUNT", CODING_SCHEME, "Number of findings"),
    "false_flag_rate": hd.sr.CodedConcept("FALSE_FLAG_RATE", CODING_SCHEME, "False flag rate per normal series"),
    "operating_point_measured": hd.sr.CodedConcept("OPPOINT_MEASURED", CODING_SCHEME, "Operating point measured"),
    "peak_score": hd.sr.CodedConcept("PEAK_ANOM_SCORE", CODING_SCHEME, "Peak anomaly score of finding"),
    "centroid_x": hd.sr.CodedConcept("CENTROID_LPS_X", CODING_SCHEME, "Finding centroid, patient LPS x"),
    "centroid_y": hd.sr.CodedConcept("CENTROID_LPS_Y", CODING_SCHEME, "Finding centroid, patient LPS y"),
    "centroid_z": hd.sr.CodedConcept("CENTROID_LPS_Z", CODING_SCHEME, "Finding centroid, patient LPS z"),
}
#: At most this many findings of a series get their own ROI group (the largest ones).
MAX_FINDING_GROUPS = 10
_THRESHOLD_UNITS = ("score", "z")
_NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
_PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
_MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_MILLIMETRE = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
_VOLUME = hd.sr.CodedConcept("118565006", "SCT", "Volume")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class MaskFinding:
    """One finding: a connected component of a series' binary anomaly mask.

    Attributes
    ----------
    volume_ml : float
        Volume of the component, ml (finite, >= 0).
    centroid_lps_mm : tuple of 3 float
        Centroid of the component in patient LPS coordinates, mm (finite). Any length-3 sequence
        is accepted and stored as a tuple of floats.
    peak_score : float
        Highest anomaly score within the component (finite).
    """

    volume_ml: float
    centroid_lps_mm: tuple[float, float, float]
    peak_score: float

    def __post_init__(self) -> None:
        for name in ("volume_ml", "peak_score"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"MaskFinding.{name} must be a finite number; got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.volume_ml < 0:
            raise ValueError(f"MaskFinding.volume_ml must be >= 0; got {self.volume_ml!r}")
        centroid = self.centroid_lps_mm
        if isinstance(centroid, (str, bytes)) or not isinstance(centroid, (Sequence, np.ndarray)) or len(centroid) != 3:
            raise ValueError(f"MaskFinding.centroid_lps_mm must be 3 coordinates (x, y, z); got {centroid!r}")
        if not all(_is_number(c) and math.isfinite(c) for c in centroid):
            raise ValueError(f"MaskFinding.centroid_lps_mm must be finite numbers; got {centroid!r}")
        object.__setattr__(self, "centroid_lps_mm", tuple(float(c) for c in centroid))


def _validate_policy(policy: object) -> None:
    # The policy name becomes a CodeMeaning (LO): at most 64 characters of the default
    # repertoire, without backslash (LO's value separator).
    if not isinstance(policy, str):
        raise ValueError(f"SeriesFinding.policy must be a string; got {policy!r}")
    if len(policy) > 64 or not all(" " <= c <= "~" and c != "\\" for c in policy) or policy != policy.strip():
        raise ValueError(
            "SeriesFinding.policy must be at most 64 printable ASCII characters without backslash or "
            f"surrounding blanks; got {policy!r}"
        )


@dataclass(frozen=True)
class SeriesFinding:
    """What the SR says about one scored series.

    Attributes
    ----------
    seg : Dataset
        The series' binary SEG (headers suffice); its segment 1 is referenced.
    score, threshold : float
        The anomaly score and the decision threshold (its scale: ``threshold_units``).
    rank, batch_size : int
        Rank in the contrast batch (1 = most anomalous) and the batch's size.
    percentile : float
        Percentile of the score in the batch, 0-100.
    flagged : bool
        Whether the series is flagged as anomalous.
    anomalous_volume_ml : float
        Volume of the binary mask, ml.
    findings : tuple of MaskFinding
        The mask's connected components, largest volume first (the caller sorts; the order is
        checked). A list or other sequence is accepted and stored as a tuple.
    policy : str
        Decision policy, ``name/version`` (e.g. ``"position-z-findings/2"``); ``""`` = not given,
        no method is then written. At most 64 printable ASCII characters.
    threshold_units : {"score", "z"}
        ``"score"``: ``threshold`` is on the anomaly score scale; ``"z"``: it bounds a finding's
        evidence in robust standard deviations (the lesion policy).
    false_flag_rate : float or None
        Fraction (0-1) of normal series the policy flags, as measured for this encoder and
        contrast on all-normal batches; ``None`` = not measured.
    rim_threshold : float or None
        With ``threshold_units`` ``"z"``: the evidence bound of findings that peak at the brain's
        rim, where it differs from ``threshold``; ``None`` = one bound everywhere.
    """

    seg: Dataset
    score: float
    rank: int
    batch_size: int
    percentile: float
    threshold: float
    flagged: bool
    anomalous_volume_ml: float
    findings: tuple[MaskFinding, ...] = ()
    policy: str = ""
    threshold_units: str = "score"
    false_flag_rate: float | None = None
    rim_threshold: float | None = None

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
        self._check_findings()
        _validate_policy(self.policy)
        if self.threshold_units not in _THRESHOLD_UNITS:
            raise ValueError(
                f"SeriesFinding.threshold_units must be one of {_THRESHOLD_UNITS}; got {self.threshold_units!r}"
            )
        rate = self.false_flag_rate
        if rate is not None:
            if not _is_number(rate) or not 0.0 <= rate <= 1.0:
                raise ValueError(
                    f"SeriesFinding.false_flag_rate must be None or a fraction within [0, 1]; got {rate!r}"
                )
            object.__setattr__(self, "false_flag_rate", float(rate))
        rim = self.rim_threshold
        if rim is not None and (self.threshold_units != "z" or not _is_number(rim) or not np.isfinite(rim)):
            raise ValueError(f"SeriesFinding.rim_threshold must be None or a finite number with threshold_units "
                             f"'z'; got {rim!r} with {self.threshold_units!r}")

    def _check_findings(self) -> None:
        if isinstance(self.findings, (str, bytes)) or not isinstance(self.findings, Sequence):
            raise ValueError(f"SeriesFinding.findings must be a sequence of MaskFinding; got {self.findings!r}")
        findings = tuple(self.findings)
        for k, item in enumerate(findings):
            if not isinstance(item, MaskFinding):
                raise ValueError(f"SeriesFinding.findings[{k}] must be a MaskFinding; got {type(item).__name__}")
        volumes = [f.volume_ml for f in findings]
        if any(later > earlier for earlier, later in zip(volumes, volumes[1:])):
            raise ValueError(f"SeriesFinding.findings must be sorted largest volume first; got volumes {volumes}")
        object.__setattr__(self, "findings", findings)


def policy_concept(policy: str) -> hd.sr.CodedConcept:
    """The private code of a decision policy, carried as an ROI group's measurement method.

    Parameters
    ----------
    policy : str
        Policy name, ``name/version`` (non-empty; see `SeriesFinding.policy`).

    Returns
    -------
    highdicom.sr.CodedConcept
        Code ``POLICY_`` + the first 9 hex digits of the SHA-256 of the name (16 characters, DICOM
        SH), scheme ``99CDG3D``, meaning the name itself. The code is the same for the same name
        in every SR and differs between names, and the meaning keeps the name whole (a code cut
        from the name would lose the version and could collide).
    """
    if not policy:
        raise ValueError("a policy concept needs a non-empty policy name")
    _validate_policy(policy)
    digest = hashlib.sha256(policy.encode("ascii")).hexdigest()[:9].upper()
    return hd.sr.CodedConcept(f"POLICY_{digest}", CODING_SCHEME, policy)


def _source_series_uid(seg: Dataset) -> str:
    return str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)


def _algorithm() -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=__version__)


def measure(concept: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept) -> hd.sr.Measurement:
    """A numeric measurement made by this product (its algorithm identified)."""
    return hd.sr.Measurement(name=concept, value=float(value), unit=unit, algorithm_id=_algorithm())


def yes_no(concept: hd.sr.CodedConcept, answer: bool) -> hd.sr.QualitativeEvaluation:
    """A qualitative evaluation answered SCT Yes or No."""
    return hd.sr.QualitativeEvaluation(concept, codes.SCT.Yes if answer else codes.SCT.No)


def _group(
    finding: SeriesFinding,
    identifier: str,
    measurements: list[hd.sr.Measurement],
    evaluations: list[hd.sr.QualitativeEvaluation],
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """One TID 1411 group on the series' SEG segment 1, with the policy as measurement method."""
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=identifier),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(finding.seg.SOPClassUID),
            sop_instance_uid=str(finding.seg.SOPInstanceUID),
            segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(_source_series_uid(finding.seg)),
        ),
        finding_type=codes.SCT.Lesion,
        method=policy_concept(finding.policy) if finding.policy else None,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Brain)],
        algorithm_id=_algorithm(),
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _roi_group(finding: SeriesFinding, index: int) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """The series' group: score, batch context, threshold, volume, findings count, operating point."""
    threshold = CONCEPTS["evidence_threshold" if finding.threshold_units == "z" else "threshold"]
    measurements = [
        measure(CONCEPTS["score"], finding.score, _NO_UNITS),
        measure(CONCEPTS["rank"], finding.rank, _NO_UNITS),
        measure(CONCEPTS["batch_size"], finding.batch_size, _NO_UNITS),
        measure(CONCEPTS["percentile"], finding.percentile, _PERCENT),
        # The lesion policy's bound is on sum(z - token_z) x token volume: robust SDs times ml.
        measure(threshold, finding.threshold, _MILLILITRE if finding.threshold_units == "z" else _NO_UNITS),
        *([] if finding.rim_threshold is None else
          [measure(CONCEPTS["rim_evidence_threshold"], finding.rim_threshold, _MILLILITRE)]),
        measure(_VOLUME, finding.anomalous_volume_ml, _MILLILITRE),
        measure(CONCEPTS["n_findings"], len(finding.findings), _NO_UNITS),
    ]
    if finding.false_flag_rate is not None:
        measurements.append(measure(CONCEPTS["false_flag_rate"], 100.0 * finding.false_flag_rate, _PERCENT))
    evaluations = [
        yes_no(CONCEPTS["flagged"], finding.flagged),
        yes_no(CONCEPTS["operating_point_measured"], finding.false_flag_rate is not None),
    ]
    return _group(finding, f"Anomaly {index}", measurements, evaluations)


def _finding_groups(
    finding: SeriesFinding, index: int
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """One group per finding of the series, the `MAX_FINDING_GROUPS` largest."""
    total = len(finding.findings)
    groups = []
    for k, item in enumerate(finding.findings[:MAX_FINDING_GROUPS], start=1):
        x, y, z = item.centroid_lps_mm
        measurements = [
            measure(_VOLUME, item.volume_ml, _MILLILITRE),
            measure(CONCEPTS["peak_score"], item.peak_score, _NO_UNITS),
            measure(CONCEPTS["centroid_x"], x, _MILLIMETRE),
            measure(CONCEPTS["centroid_y"], y, _MILLIMETRE),
            measure(CONCEPTS["centroid_z"], z, _MILLIMETRE),
        ]
        groups.append(_group(finding, f"Anomaly {index} finding {k} of {total}", measurements, []))
    return groups


def observation_context(manufacturer: str) -> hd.sr.ObservationContext:
    """The SR's observer: this product, as a device."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=hd.UID(), name=ALGORITHM_NAME, manufacturer_name=manufacturer, model_name=ALGORITHM_NAME,
            ),
        )
    )


def declare_scheme(document: Dataset, manufacturer: str) -> None:
    """Declare the private coding scheme in the object that uses it (PS3.3 C.12.1.1.2.1)."""
    scheme = Dataset()
    scheme.CodingSchemeDesignator = CODING_SCHEME
    scheme.CodingSchemeName = f"{ALGORITHM_NAME} anomaly report concepts"
    scheme.CodingSchemeResponsibleOrganization = manufacturer
    document.CodingSchemeIdentificationSequence = [
        *getattr(document, "CodingSchemeIdentificationSequence", []), scheme,
    ]


def save_measurement_report(
    groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations],
    evidence: Sequence[Dataset],
    out_path: Path,
    *,
    series_number: int,
    manufacturer: str,
    description: str,
) -> None:
    """Save a TID 1500 brain-MRI report of ``groups`` as a Comprehensive 3D SR, atomically.

    The observer is this product (a device), the private scheme is declared, and patient and
    study come from ``evidence`` (the instances the groups reference).
    """
    document = hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=hd.sr.MeasurementReport(
            observation_context=observation_context(manufacturer),
            procedure_reported=codes.LN.BrainMRI,
            imaging_measurements=list(groups),
        ),
        series_instance_uid=hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    document.SeriesDescription = description
    declare_scheme(document, manufacturer)
    with atomic_path(out_path) as temporary:
        document.save_as(temporary, enforce_file_format=True)


def write_study_sr(
    findings: Sequence[SeriesFinding],
    out_path: Path | str,
    *,
    series_number: int,
    manufacturer: str = "CoDeGraph3D project",
) -> Path:
    """Write one study's TID 1500 measurement report.

    Each series' group is followed by the groups of its findings (module docstring).

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

    Returns
    -------
    Path
        ``out_path``.
    """
    out_path = Path(out_path)
    if not findings:
        raise ValueError("an SR needs at least one scored series")
    studies = {str(f.seg.StudyInstanceUID) for f in findings}
    if len(studies) != 1:
        raise ValueError(f"the findings come from {len(studies)} studies; one SR reports one study")
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output folder {out_path.parent} does not exist; create it first")
    groups = [group for i, f in enumerate(findings) for group in (_roi_group(f, i + 1), *_finding_groups(f, i + 1))]
    save_measurement_report(
        groups, [f.seg for f in findings], out_path, series_number=series_number, manufacturer=manufacturer,
        description=f"{ALGORITHM_NAME} anomaly report, not for clinical use",
    )
    logger.info(
        "Wrote SR %s for study %s (%d series, %d findings)",
        out_path, next(iter(studies)), len(findings), sum(len(f.findings) for f in findings),
    )
    return out_path
