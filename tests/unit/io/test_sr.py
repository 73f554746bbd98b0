"""DICOM SR writer (codegraph3d.io.sr): TID 1500 content read back by highdicom, dciodvfy, bad input.

Round trips check dciodvfy last: it skips the test where dciodvfy is missing.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from fixtures import COLS, ROWS, N, dciodvfy_errors, write_sources

from codegraph3d.io.dicom import load_series_volume, scan_headers
from codegraph3d.io.seg import write_binary_seg
from codegraph3d.io.sr import (
    CODING_SCHEME,
    CONCEPTS,
    MAX_FINDING_GROUPS,
    MaskFinding,
    SeriesFinding,
    policy_concept,
    write_study_sr,
)


@pytest.fixture(scope="module")
def segs(tmp_path_factory) -> list[pydicom.Dataset]:
    """Binary SEGs of two series of one study (the second a copy with its own series UID)."""
    folder = tmp_path_factory.mktemp("sr_sources")
    write_sources(folder / "a")
    loaded = load_series_volume(scan_headers(folder / "a").series[0])
    second = [pydicom.Dataset(d) for d in loaded.datasets]
    series_uid = generate_uid()
    for dataset in second:
        dataset.SeriesInstanceUID, dataset.SOPInstanceUID = series_uid, generate_uid()
    mask = np.zeros((N, ROWS, COLS), bool)
    mask[2:4, 5:9, 3:6] = True
    written = []
    for index, sources in enumerate((loaded.datasets, second)):
        path = folder / f"seg{index}.dcm"
        write_binary_seg(sources, mask, path, encoder_description="intensity", series_number=9901)
        written.append(pydicom.dcmread(path, stop_before_pixels=True))
    return written


def finding(seg: pydicom.Dataset, **changes) -> SeriesFinding:
    values = dict(seg=seg, score=0.4321, rank=2, batch_size=12, percentile=91.67, threshold=0.4,
                  flagged=True, anomalous_volume_ml=3.25)
    values.update(changes)
    return SeriesFinding(**values)


def test_round_trip_and_valid(tmp_path: Path, segs) -> None:
    path = write_study_sr([finding(segs[0]), finding(segs[1], rank=7, flagged=False, score=0.1)],
                          tmp_path / "sr.dcm", series_number=9903)
    sr = hd.sr.srread(path)
    assert sr.StudyInstanceUID == segs[0].StudyInstanceUID and sr.PatientID == segs[0].PatientID
    assert sr.SeriesNumber == 9903 and "not for clinical use" in sr.SeriesDescription
    assert CODING_SCHEME in {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    # The SEGs are the evidence the report rests on.
    evidence = {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert evidence == {seg.SOPInstanceUID for seg in segs}
    groups = hd.sr.MeasurementReport.from_sequence([sr]).get_volumetric_roi_measurement_groups()
    assert [g.referenced_segment.referenced_sop_instance_uid for g in groups] == [s.SOPInstanceUID for s in segs]
    first = {m.name.meaning: (m.value, m.unit.value) for m in groups[0].get_measurements()}
    assert first[CONCEPTS["score"].meaning] == (pytest.approx(0.4321), "1")
    assert first[CONCEPTS["rank"].meaning][0] == 2 and first[CONCEPTS["batch_size"].meaning][0] == 12
    assert first[CONCEPTS["percentile"].meaning] == (pytest.approx(91.67), "%")
    assert first["Volume"] == (pytest.approx(3.25), "ml")
    assert groups[0].get_qualitative_evaluations()[0].value.meaning == "Yes"
    assert groups[1].get_qualitative_evaluations()[0].value.meaning == "No"
    for group, seg in zip(groups, segs):
        source = group.referenced_segment.source_series_for_segmentation
        assert source.value == seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank": 13}, "outside the batch"),
        ({"score": float("nan")}, "finite"),
        ({"percentile": 101.0}, "percentile"),
        ({"anomalous_volume_ml": -1.0}, "volume"),
    ],
)
def test_bad_findings_are_refused(segs, change, message) -> None:
    with pytest.raises(ValueError, match=message):
        finding(segs[0], **change)


def test_bad_calls_are_refused(tmp_path: Path, segs) -> None:
    with pytest.raises(ValueError, match="at least one"):
        write_study_sr([], tmp_path / "sr.dcm", series_number=1)
    other_study = copy.deepcopy(segs[1])  # pydicom.Dataset(ds) would share, and change, the fixture
    other_study.StudyInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="2 studies"):
        write_study_sr([finding(segs[0]), dataclasses.replace(finding(segs[1]), seg=other_study)],
                       tmp_path / "sr.dcm", series_number=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_study_sr([finding(segs[0])], tmp_path / "missing" / "sr.dcm", series_number=1)
    not_a_seg = copy.deepcopy(segs[0])
    not_a_seg.Modality = "MR"
    with pytest.raises(ValueError, match="DICOM-SEG"):
        finding(not_a_seg)
    assert not list(tmp_path.iterdir())


def test_non_ascii_patient_and_study_text_survive_in_seg_and_sr(tmp_path: Path) -> None:
    """UTF-8 names (SpecificCharacterSet ISO_IR 192) are carried into both objects, still valid."""
    write_sources(tmp_path / "src")
    for path in (tmp_path / "src").glob("*.dcm"):
        dataset = pydicom.dcmread(path)
        dataset.SpecificCharacterSet = "ISO_IR 192"
        dataset.PatientName = "Müller^Jürgen"
        dataset.StudyDescription = "Schädel MRT"
        dataset.save_as(path)
    loaded = load_series_volume(scan_headers(tmp_path / "src").series[0])
    mask = np.zeros((N, ROWS, COLS), bool)
    mask[2:4, 3:6, 3:6] = True
    seg_path = write_binary_seg(loaded.datasets, mask, tmp_path / "seg.dcm", encoder_description="intensity", series_number=9901)
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    sr_path = write_study_sr([finding(seg, rank=1, batch_size=3)], tmp_path / "sr.dcm", series_number=9903)
    for path in (seg_path, sr_path):
        dataset = pydicom.dcmread(path)
        assert str(dataset.PatientName) == "Müller^Jürgen" and dataset.SpecificCharacterSet == "ISO_IR 192"
        assert dciodvfy_errors(path) == []


# --- findings, policy and operating point ------------------------------------------------------

POLICY = "position-z-findings/1"
TWO = (MaskFinding(1.5, (-12.25, 30.5, 41.0), 0.875), MaskFinding(0.25, (8.0, -4.5, 12.75), 0.5))


def _groups(path: Path) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    sr = hd.sr.srread(path)
    return hd.sr.MeasurementReport.from_sequence([sr]).get_volumetric_roi_measurement_groups()


def _values(group) -> dict[str, tuple[float, str]]:
    return {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}


def _answers(group) -> dict[str, str]:
    return {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}


def test_findings_policy_and_measured_rate_round_trip(tmp_path: Path, segs) -> None:
    flagged = finding(segs[0], findings=TWO, policy=POLICY, threshold_units="z", threshold=3.0,
                      false_flag_rate=0.05)
    path = write_study_sr([flagged, finding(segs[1], rank=7, flagged=False, score=0.1)],
                          tmp_path / "sr.dcm", series_number=9903)
    groups = _groups(path)
    assert [g.tracking_identifier for g in groups] == [
        "Anomaly 1", "Anomaly 1 finding 1 of 2", "Anomaly 1 finding 2 of 2", "Anomaly 2"]
    series = _values(groups[0])
    assert series[CONCEPTS["n_findings"].meaning] == (2, "1")
    assert series[CONCEPTS["false_flag_rate"].meaning] == (pytest.approx(5.0), "%")
    assert series[CONCEPTS["score"].meaning] == (pytest.approx(0.4321), "1")  # existing content kept
    assert _answers(groups[0]) == {"Anomaly flagged": "Yes", "Operating point measured": "Yes"}
    for group, expected in zip(groups[1:3], TWO):
        values = _values(group)
        assert values["Volume"] == (pytest.approx(expected.volume_ml), "ml")
        assert values[CONCEPTS["peak_score"].meaning] == (pytest.approx(expected.peak_score), "1")
        centroid = [values[CONCEPTS[f"centroid_{axis}"].meaning] for axis in "xyz"]
        assert centroid == [(pytest.approx(c), "mm") for c in expected.centroid_lps_mm]
        assert group.referenced_segment.referenced_sop_instance_uid == segs[0].SOPInstanceUID
        assert group.referenced_segment.source_series_for_segmentation.value == \
            segs[0].ReferencedSeriesSequence[0].SeriesInstanceUID
        assert group.finding_type.meaning == "Lesion" and group.get_qualitative_evaluations() == []
    # The policy is each group's measurement method: a private code whose meaning is its name.
    for group in groups[:3]:
        assert group.method == policy_concept(POLICY)
        assert group.method.meaning == POLICY and group.method.scheme_designator == CODING_SCHEME
        assert len(group.method.value) <= 16 and group.method.value.startswith("POLICY_")
    assert groups[3].method is None  # no policy given: no method
    assert _values(groups[3])[CONCEPTS["n_findings"].meaning][0] == 0
    assert dciodvfy_errors(path) == []


def test_unmeasured_operating_point_says_no(tmp_path: Path, segs) -> None:
    path = write_study_sr([finding(segs[0], findings=TWO, policy=POLICY)], tmp_path / "sr.dcm", series_number=1)
    series = _groups(path)[0]
    assert CONCEPTS["false_flag_rate"].meaning not in _values(series)
    assert _answers(series)["Operating point measured"] == "No"


@pytest.mark.parametrize(("units", "used", "unused", "unit"), [("z", "evidence_threshold", "threshold", "ml"),
                                                                ("score", "threshold", "evidence_threshold", "1")])
def test_threshold_concept_follows_its_units(tmp_path: Path, segs, units, used, unused, unit) -> None:
    # The lesion policy's bound is a finding's evidence, robust SDs x ml: its unit is the ml.
    path = write_study_sr([finding(segs[0], threshold_units=units, threshold=2.5)], tmp_path / "sr.dcm",
                          series_number=1)
    values = _values(_groups(path)[0])
    assert values[CONCEPTS[used].meaning] == (pytest.approx(2.5), unit)
    assert CONCEPTS[unused].meaning not in values


def test_the_rim_bound_is_written_beside_the_evidence_threshold_only_when_set(tmp_path: Path, segs) -> None:
    path = write_study_sr([finding(segs[0], threshold_units="z", threshold=1.9, rim_threshold=4.1)],
                          tmp_path / "sr.dcm", series_number=1)
    values = _values(_groups(path)[0])
    assert values[CONCEPTS["rim_evidence_threshold"].meaning] == (pytest.approx(4.1), "ml")
    assert values[CONCEPTS["evidence_threshold"].meaning] == (pytest.approx(1.9), "ml")
    plain = write_study_sr([finding(segs[0], threshold_units="z", threshold=1.9)], tmp_path / "plain.dcm",
                           series_number=1)
    assert CONCEPTS["rim_evidence_threshold"].meaning not in _values(_groups(plain)[0])
    with pytest.raises(ValueError, match="rim_threshold must be None or a finite number"):
        finding(segs[0], threshold_units="score", threshold=1.0, rim_threshold=4.1)


def test_at_most_ten_finding_groups_with_the_true_count(tmp_path: Path, segs) -> None:
    many = [MaskFinding(20.0 - k, (float(k), 0.0, 0.0), 1.0) for k in range(13)]  # a list is accepted
    series = finding(segs[0], findings=many, policy=POLICY)
    assert isinstance(series.findings, tuple) and len(series.findings) == 13
    path = write_study_sr([series], tmp_path / "sr.dcm", series_number=1)
    groups = _groups(path)
    assert len(groups) == 1 + MAX_FINDING_GROUPS == 11
    assert _values(groups[0])[CONCEPTS["n_findings"].meaning][0] == 13
    assert groups[-1].tracking_identifier == "Anomaly 1 finding 10 of 13"
    assert [_values(g)["Volume"][0] for g in groups[1:]] == [20.0 - k for k in range(10)]  # the largest


def test_policy_code_is_stable_short_and_distinct() -> None:
    code = policy_concept(POLICY)
    assert code == policy_concept(POLICY) and code.meaning == POLICY
    assert len(code.value) == 16 and code.value.replace("_", "").isalnum()
    assert code.value != policy_concept("position-z-findings/2").value
    with pytest.raises(ValueError, match="non-empty"):
        policy_concept("")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(volume_ml=1.0, centroid_lps_mm=(0.0, float("nan"), 0.0), peak_score=1.0), r"centroid_lps_mm must be finite"),
        (dict(volume_ml=1.0, centroid_lps_mm=(0.0, float("inf"), 0.0), peak_score=1.0), r"centroid_lps_mm must be finite"),
        (dict(volume_ml=1.0, centroid_lps_mm=(0.0, 0.0), peak_score=1.0), r"centroid_lps_mm must be 3 coordinates"),
        (dict(volume_ml=-0.5, centroid_lps_mm=(0.0, 0.0, 0.0), peak_score=1.0), r"volume_ml must be >= 0"),
        (dict(volume_ml=float("nan"), centroid_lps_mm=(0.0, 0.0, 0.0), peak_score=1.0), r"volume_ml must be a finite"),
        (dict(volume_ml=1.0, centroid_lps_mm=(0.0, 0.0, 0.0), peak_score=float("inf")), r"peak_score must be a finite"),
    ],
)
def test_bad_mask_findings_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        MaskFinding(**kwargs)


def test_mask_finding_normalises_its_centroid() -> None:
    item = MaskFinding(np.float32(2.0), np.array([1, 2.5, -3]), np.float64(0.5))
    assert item.centroid_lps_mm == (1.0, 2.5, -3.0) and type(item.volume_ml) is float


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"threshold_units": "sd"}, r"threshold_units must be one of \('score', 'z'\); got 'sd'"),
        ({"false_flag_rate": 1.5}, r"false_flag_rate must be None or a fraction within \[0, 1\]"),
        ({"false_flag_rate": -0.01}, r"false_flag_rate must be None or a fraction"),
        ({"false_flag_rate": float("nan")}, r"false_flag_rate must be None or a fraction"),
        ({"findings": (TWO[1], TWO[0])}, r"findings must be sorted largest volume first"),
        ({"findings": ((1.0, (0, 0, 0), 1.0),)}, r"findings\[0\] must be a MaskFinding"),
        ({"findings": TWO[0]}, r"findings must be a sequence of MaskFinding"),
        ({"policy": "x" * 65}, r"policy must be at most 64 printable ASCII"),
        ({"policy": "a\\b"}, r"policy must be at most 64"),
        ({"policy": None}, r"policy must be a string"),
    ],
)
def test_bad_series_extras_are_refused(segs, change, message) -> None:
    with pytest.raises(ValueError, match=message):
        finding(segs[0], **change)
