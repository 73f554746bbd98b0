"""Key-slice SR (codegraph3d.io.key_slices): planar ROIs read back by highdicom, dciodvfy, bad input."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fixtures import dciodvfy_errors, write_sources

from codegraph3d.io.dicom import load_series_volume, scan_headers
from codegraph3d.io.key_slices import KeySlice, write_key_slice_sr
from codegraph3d.io.seg import write_binary_seg
from codegraph3d.io.sr import CONCEPTS, MaskFinding, SeriesFinding
from codegraph3d.run.pipeline import key_slice


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> tuple[list[pydicom.Dataset], pydicom.Dataset, np.ndarray]:
    """Source slice headers, their binary SEG and its mask (one box, most voxels on slice 3)."""
    folder = tmp_path_factory.mktemp("key_slice_sources")
    write_sources(folder / "a")
    loaded = load_series_volume(scan_headers(folder / "a").series[0])
    mask = np.zeros((len(loaded.datasets), int(loaded.datasets[0].Rows), int(loaded.datasets[0].Columns)), bool)
    mask[2, 6:8, 4:5] = True
    mask[3, 5:9, 3:6] = True
    write_binary_seg(loaded.datasets, mask, folder / "seg.dcm", encoder_description="intensity", series_number=9901)
    return loaded.datasets, pydicom.dcmread(folder / "seg.dcm", stop_before_pixels=True), mask


def _finding(seg: pydicom.Dataset, n_findings: int = 1, flagged: bool = True) -> SeriesFinding:
    items = tuple(MaskFinding(2.0 / (k + 1), (1.0, 2.0, 3.0), 0.9) for k in range(n_findings))
    return SeriesFinding(seg=seg, score=0.5, rank=1, batch_size=8, percentile=100.0, threshold=30.0,
                         flagged=flagged, anomalous_volume_ml=2.0, findings=items, policy="position-z-findings/2",
                         threshold_units="z")


def test_key_slice_is_the_fullest_slice_and_its_extent(series) -> None:
    _, _, mask = series
    box = (slice(2, 4), slice(5, 9), slice(3, 6))
    assert key_slice(mask[box], box) == {"index": 3, "rows": [5, 8], "columns": [3, 5]}


def test_round_trip_planar_rectangle_on_the_key_slice(tmp_path: Path, series) -> None:
    datasets, seg, _ = series
    key = KeySlice(datasets[3], (5, 8), (3, 5))
    path = write_key_slice_sr([_finding(seg)], [[key]], tmp_path / "key.dcm", series_number=9904)
    sr = hd.sr.srread(path)
    assert sr.StudyInstanceUID == datasets[3].StudyInstanceUID and sr.SeriesNumber == 9904
    evidence = {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series_item in study.ReferencedSeriesSequence for item in series_item.ReferencedSOPSequence}
    assert evidence == {datasets[3].SOPInstanceUID}
    content = hd.sr.MeasurementReport.from_sequence([sr])
    assert content.get_volumetric_roi_measurement_groups() == []
    (group,) = content.get_planar_roi_measurement_groups()
    assert group.tracking_identifier == "Anomaly 1 finding 1 of 1"
    region = group.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    # The rectangle encloses pixels rows 5-8 and columns 3-5 whole: (column, row) pixel edges.
    np.testing.assert_array_equal(region.value, [[3, 5], [6, 5], [6, 9], [3, 9], [3, 5]])
    # The image it is drawn on: a SELECTED FROM child of the SCOORD item.
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == datasets[3].SOPInstanceUID
    values = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
    assert values["Volume"] == (pytest.approx(2.0), "ml")
    assert values[CONCEPTS["peak_score"].meaning][0] == pytest.approx(0.9)
    assert group.get_qualitative_evaluations()[0].value.meaning == "Yes"
    assert dciodvfy_errors(path) == []


def test_no_findings_writes_nothing(tmp_path: Path, series) -> None:
    _, seg, _ = series
    assert write_key_slice_sr([_finding(seg, 0, flagged=False)], [[]], tmp_path / "none.dcm", series_number=1) is None
    assert not (tmp_path / "none.dcm").exists()


def test_bad_input_is_refused_with_what_to_give(tmp_path: Path, series) -> None:
    datasets, seg, _ = series
    with pytest.raises(ValueError, match=r"KeySlice.rows must be 0 <= first <= last < 16"):
        KeySlice(datasets[0], (5, 16), (0, 1))
    with pytest.raises(ValueError, match="KeySlice.image lacks SOPClassUID"):
        KeySlice(pydicom.Dataset(), (0, 1), (0, 1))
    key = KeySlice(datasets[0], (0, 1), (0, 1))
    with pytest.raises(ValueError, match="series 1 has 2 findings but 1 key slices; give one per finding"):
        write_key_slice_sr([_finding(seg, 2)], [[key]], tmp_path / "x.dcm", series_number=1)
    with pytest.raises(ValueError, match="1 series but 2 lists of key slices"):
        write_key_slice_sr([_finding(seg)], [[key], [key]], tmp_path / "x.dcm", series_number=1)
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        write_key_slice_sr([_finding(seg)], [[key]], tmp_path / "missing" / "x.dcm", series_number=1)
    assert not list(tmp_path.iterdir())
