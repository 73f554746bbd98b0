"""DICOM-SEG writers (codegraph3d.io.seg): round trip through highdicom and dciodvfy validation."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from codegraph3d.io.dicom import load_series_volume, scan_headers
from codegraph3d.io.seg import write_binary_seg, write_fractional_seg
from fixtures import COLS, ROWS, N, dciodvfy_errors, write_sources

@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    write_sources(folder)
    return load_series_volume(scan_headers(folder).series[0])


def _read_back(path: Path, loaded) -> np.ndarray:
    seg = hd.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=loaded.volume.sop_instance_uids, segment_numbers=[1]
    )
    return seg, pixels[..., 0]


def test_binary_round_trip_and_valid(tmp_path: Path, loaded) -> None:
    mask = np.zeros((N, ROWS, COLS), bool)
    mask[2:4, 5:9, 3:6] = True
    mask[6, 0, 0] = True
    out = write_binary_seg(
        loaded.datasets,
        mask,
        tmp_path / "x_binary.dcm",
        algorithm_version="0.1.0",
        encoder_description="DINOv2 ViT-L/14 sha256:0123abcd",
        series_number=901,
        encoder_warning="weight-free intensity encoder",
    )
    seg, back = _read_back(out, loaded)
    np.testing.assert_array_equal(back.astype(bool), mask)
    assert seg.SegmentationType == "BINARY" and int(seg.NumberOfFrames) == 3  # empty frames omitted
    assert seg.SeriesNumber == 901 and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == loaded.datasets[0].StudyInstanceUID
    for keyword in ("SeriesDescription", "ContentDescription"):
        assert len(seg.get(keyword)) <= 64
    assert (
        "not for clinical use" in seg.SeriesDescription and "weight-free" in seg.SeriesDescription
    )
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Anomaly" and segment.SegmentAlgorithmType == "AUTOMATIC"
    # The documented display colour (yellow), as viewers read it back from CIELab.
    lab = hd.color.CIELabColor.from_dicom_value(segment.RecommendedDisplayCIELabValue)
    assert tuple(lab.to_rgb()) == (255, 255, 0)
    assert len(segment.SegmentDescription) <= 64 and "DINOv2" in segment.SegmentDescription
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    algo = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "CoDeGraph3D" and algo.AlgorithmVersion == "0.1.0"
    assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert (
        "weight-free intensity encoder" in seg.ImageComments
        and "sha256:0123abcd" in seg.ImageComments
    )
    assert (
        seg.Manufacturer
        and seg.ManufacturerModelName
        and seg.SoftwareVersions
        and seg.DeviceSerialNumber
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_binary.dcm"]  # no temporary left
    assert dciodvfy_errors(out) == []


def test_empty_mask_still_valid(tmp_path: Path, loaded) -> None:
    warning = (
        "UNTRAINED ViT encoder: random weights, carries no anomaly signal, code-path test only"
    )
    out = write_binary_seg(
        loaded.datasets,
        np.zeros((N, ROWS, COLS), bool),
        tmp_path / "empty.dcm",
        encoder_description="seeded random ViT-S/14",
        series_number=902,
        encoder_warning=warning,
    )
    seg, back = _read_back(out, loaded)
    assert not back.any() and back.shape == (N, ROWS, COLS)
    # Long texts are cut to LO's 64 characters, never the clinical-use caveat; ImageComments
    # keeps them whole.
    assert len(seg.SeriesDescription) <= 64 and seg.SeriesDescription.endswith(
        "not for clinical use"
    )
    assert seg.SeriesDescription.startswith("CoDeGraph3D binary [UNTRAINED")
    assert seg.ContentDescription.startswith("UNTRAINED ViT") and len(seg.ContentDescription) <= 64
    assert warning in seg.ImageComments
    assert dciodvfy_errors(out) == []


def test_fractional_round_trip_and_valid(tmp_path: Path, loaded) -> None:
    unit = np.random.default_rng(0).random((N, ROWS, COLS)).astype(np.float32)
    unit[0] = 0.0
    out = write_fractional_seg(
        loaded.datasets,
        unit,
        tmp_path / "x_score.dcm",
        encoder_description="DINOv2 ViT-L/14",
        series_number=903,
        encoder_warning="UNTRAINED ViT, code-path test only",
    )
    seg, back = _read_back(out, loaded)
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    # highdicom rescales stored 0..255 back to [0, 1] on reading.
    np.testing.assert_allclose(back, unit, atol=0.5 / 255 + 1e-6)
    assert "UNTRAINED" in seg.SeriesDescription
    assert dciodvfy_errors(out) == []


def test_sources_without_pixels_from_header_read(tmp_path: Path, loaded) -> None:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in loaded.files]
    mask = np.zeros((N, ROWS, COLS), bool)
    mask[4, 2:5, 2:5] = True
    out = write_binary_seg(
        headers, mask, tmp_path / "h.dcm", encoder_description="e", series_number=1
    )
    _, back = _read_back(out, loaded)
    np.testing.assert_array_equal(back.astype(bool), mask)


def test_invalid_inputs_raise(tmp_path: Path, loaded) -> None:
    with pytest.raises(ValueError, match="8 source datasets"):
        write_binary_seg(
            loaded.datasets,
            np.zeros((N - 1, ROWS, COLS), bool),
            tmp_path / "a.dcm",
            encoder_description="e",
            series_number=1,
        )
    with pytest.raises(ValueError, match="source series grid"):
        write_binary_seg(
            loaded.datasets,
            np.zeros((N, ROWS, COLS + 1), bool),
            tmp_path / "a.dcm",
            encoder_description="e",
            series_number=1,
        )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_fractional_seg(
            loaded.datasets,
            np.full((N, ROWS, COLS), 1.5),
            tmp_path / "a.dcm",
            encoder_description="e",
            series_number=1,
        )
    with pytest.raises(ValueError, match="threshold"):
        write_binary_seg(
            loaded.datasets,
            np.full((N, ROWS, COLS), 0.5),
            tmp_path / "a.dcm",
            encoder_description="e",
            series_number=1,
        )
    assert not list(tmp_path.iterdir())
