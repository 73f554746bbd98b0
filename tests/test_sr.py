"""DICOM SR writer (codegraph3d.io.sr): TID 1500 content read back by highdicom, dciodvfy, bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from test_seg import COLS, ROWS, N, _dciodvfy_errors, write_sources

from codegraph3d.io.dicom import load_series_volume, scan_headers
from codegraph3d.io.seg import write_binary_seg
from codegraph3d.io.sr import CODING_SCHEME, CONCEPTS, SeriesFinding, write_study_sr


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
    assert _dciodvfy_errors(path) == []
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
    other_study = pydicom.Dataset(segs[1])
    other_study.StudyInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="2 studies"):
        write_study_sr([finding(segs[0]), dataclasses.replace(finding(segs[1]), seg=other_study)],
                       tmp_path / "sr.dcm", series_number=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_study_sr([finding(segs[0])], tmp_path / "missing" / "sr.dcm", series_number=1)
    not_a_seg = pydicom.Dataset(segs[0])
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
        assert _dciodvfy_errors(path) == []
