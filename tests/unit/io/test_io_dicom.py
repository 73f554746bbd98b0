"""Header scan and series loading (codegraph3d.io.dicom) on tiny pydicom-made MR series."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from codegraph3d.io.dicom import chunk_studies, load_series_volume, scan_headers
from fixtures import N, write_sources


def write_mr_series(
    folder: Path,
    *,
    n: int = 24,
    rows: int = 16,
    cols: int = 12,
    row_dir=(1.0, 0.0, 0.0),
    col_dir=(0.0, 1.0, 0.0),
    pixel_spacing=(1.0, 1.0),
    slice_positions=None,
    slice_spacing: float = 1.5,
    origin=(0.0, 0.0, 0.0),
    description: str = "T2 TSE AX",
    study_uid: str | None = None,
    patient_id: str = "P1",
    slope: float = 1.0,
    intercept: float = 0.0,
    seed: int = 0,
) -> tuple[list[Path], np.ndarray]:
    """Write a single-frame MR series; return files and pixels, both in ascending slice order.

    File names are the random SOP Instance UIDs and InstanceNumber runs backwards, so neither
    path order nor InstanceNumber gives the geometric order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid, for_uid = generate_uid(), generate_uid()
    r, c = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(r, c)
    offsets = (
        np.arange(n) * slice_spacing
        if slice_positions is None
        else np.asarray(slice_positions, float)
    )
    data = (
        np.random.default_rng(seed)
        .integers(0, 1000, size=(len(offsets), rows, cols))
        .astype(np.uint16)
    )
    paths = []
    for k, offset in enumerate(offsets):
        sop = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            study_uid,
            series_uid,
            for_uid,
        )
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = (
            patient_id,
            "Test^" + patient_id,
            "",
            "O",
        )
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = (
            "20240101",
            "120000",
            "",
            "",
        )
        ds.StudyID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "1", "MR", 3, len(offsets) - k
        ds.Manufacturer, ds.SeriesDescription = "TEST", description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.PositionReferenceIndicator = ""
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = (
            "SE",
            "SK",
            "",
            "2D",
        )
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = 100.0, 4000.0, 1
        ds.ImagePositionPatient = [
            round(float(v), 6) for v in np.asarray(origin, float) + normal * offset
        ]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*r, *c)]
        ds.PixelSpacing, ds.SliceThickness = list(pixel_spacing), slice_spacing
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, 16, 12, 11
        ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept = 0, slope, intercept
        ds.PixelData = data[k].tobytes()
        path = folder / f"{sop}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, data


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def test_scan_ignores_non_dicom_and_records_truncated(tmp_path: Path, caplog) -> None:
    paths, _ = write_mr_series(tmp_path / "study" / "series")
    (tmp_path / "study" / "notes.txt").write_text("not DICOM")
    (tmp_path / "study" / "series" / "thumbs.db").write_bytes(b"\x00" * 50)
    truncated = tmp_path / "study" / "series" / "zz_truncated.dcm"
    truncated.write_bytes(paths[0].read_bytes()[:300])  # ends inside the header
    garbage = tmp_path / "study" / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 4)

    with caplog.at_level(logging.WARNING, logger="codegraph3d.io.dicom"):
        scan = scan_headers(tmp_path)

    assert len(scan.studies) == 1 and len(scan.series) == 1
    series = scan.series[0]
    assert series.number_of_slices == 24
    assert series.files == sorted(paths, key=str)
    bad = {p: reason for p, reason in scan.bad_files}
    assert set(bad) == {truncated, garbage}
    assert {tmp_path / "study" / "notes.txt", tmp_path / "study" / "series" / "thumbs.db"} <= set(
        scan.ignored_files
    )
    assert str(truncated) in caplog.text and str(garbage) in caplog.text
    assert series.modality == "MR" and series.series_description == "T2 TSE AX"
    assert series.echo_time == 100.0 and series.repetition_time == 4000.0
    assert series.image_type[0] == "ORIGINAL" and (series.rows, series.columns) == (16, 12)


def test_oblique_anisotropic_geometry(tmp_path: Path) -> None:
    rot = _rotation(0.3, -0.2, 0.5)
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    origin = np.array([-80.5, 20.25, 33.0])
    # PixelSpacing = [between rows (y), between columns (x)]: deliberately different.
    paths, data = write_mr_series(
        tmp_path,
        n=24,
        row_dir=row_dir,
        col_dir=col_dir,
        pixel_spacing=(0.8, 1.3),
        slice_spacing=2.5,
        origin=origin,
        slope=2.0,
        intercept=-10.0,
    )
    loaded = load_series_volume(scan_headers(tmp_path).series[0])
    vol = loaded.volume
    assert vol.array.shape == (24, 16, 12)
    np.testing.assert_allclose(vol.spacing, [1.3, 0.8, 2.5], atol=1e-6)
    assert abs(np.linalg.det(vol.direction) - 1) < 1e-6

    by_uid = {pydicom.dcmread(p).SOPInstanceUID: p for p in paths}
    z, y, x = 17, 11, 7
    src = pydicom.dcmread(by_uid[vol.sop_instance_uids[z]])
    ipp = np.array(src.ImagePositionPatient, float)
    iop = np.array(src.ImageOrientationPatient, float)
    expected = (
        ipp + iop[:3] * float(src.PixelSpacing[1]) * x + iop[3:] * float(src.PixelSpacing[0]) * y
    )
    point = (vol.index_to_physical @ np.array([x, y, z, 1.0]))[:3]
    np.testing.assert_allclose(point, expected, atol=1e-4)
    assert vol.array[z, y, x] == pytest.approx(float(src.pixel_array[y, x]) * 2.0 - 10.0)

    # An independent reader agrees on the geometry.
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    np.testing.assert_allclose(image.GetOrigin(), vol.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), vol.spacing, atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), vol.direction, atol=1e-4)


def test_shuffled_files_sorted_along_normal_with_headers(tmp_path: Path) -> None:
    # Positions written out of order: file order, InstanceNumber and position all disagree.
    positions = np.random.default_rng(1).permutation(24) * 2.0
    paths, data = write_mr_series(
        tmp_path, slice_positions=positions, row_dir=(0, 1, 0), col_dir=(0, 0, -1)
    )
    loaded = load_series_volume(scan_headers(tmp_path).series[0])
    order = np.argsort(positions)
    np.testing.assert_array_equal(loaded.volume.array, data[order].astype(np.float32))
    assert loaded.files == [paths[i] for i in order]
    assert [ds.SOPInstanceUID for ds in loaded.datasets] == loaded.volume.sop_instance_uids
    assert all("PixelData" not in ds for ds in loaded.datasets)
    along = [
        np.dot(ds.ImagePositionPatient, np.cross((0, 1, 0), (0, 0, -1))) for ds in loaded.datasets
    ]
    assert np.all(np.diff(along) > 0)
    assert loaded.volume.metadata["series_description"] == "T2 TSE AX"


def test_duplicate_positions_raise_naming_files(tmp_path: Path) -> None:
    paths, _ = write_mr_series(tmp_path, n=6)
    ds = pydicom.dcmread(paths[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    copy = tmp_path / "second_echo.dcm"
    ds.save_as(copy, enforce_file_format=True)
    series = scan_headers(tmp_path).series[0]
    with pytest.raises(ValueError, match="duplicate slice positions") as err:
        load_series_volume(series)
    assert series.series_instance_uid in str(err.value)
    assert copy.name in str(err.value) and paths[2].name in str(err.value)


def test_truncated_pixels_at_stack_end_are_skipped(tmp_path: Path, caplog) -> None:
    paths, data = write_mr_series(tmp_path, n=24)
    last = paths[-1]
    last.write_bytes(last.read_bytes()[:-100])
    series = scan_headers(tmp_path).series[0]
    assert [s.problem is not None for s in series.slices].count(True) == 1
    with caplog.at_level(logging.WARNING, logger="codegraph3d.io.dicom"):
        loaded = load_series_volume(series)
    assert loaded.volume.array.shape[0] == 23
    np.testing.assert_array_equal(loaded.volume.array, data[:23].astype(np.float32))
    assert [p for p, _ in loaded.skipped_files] == [last]
    assert str(last) in caplog.text


def test_truncated_pixels_mid_stack_raise_naming_file(tmp_path: Path) -> None:
    paths, _ = write_mr_series(tmp_path, n=24)
    middle = paths[10]
    middle.write_bytes(middle.read_bytes()[:-100])
    with pytest.raises(ValueError, match="non-uniform slice spacing") as err:
        load_series_volume(scan_headers(tmp_path).series[0])
    assert str(middle) in str(err.value)


def test_non_uniform_spacing_raises(tmp_path: Path) -> None:
    write_mr_series(tmp_path, slice_positions=[0, 1, 2, 3, 5, 6, 7])
    with pytest.raises(ValueError, match="non-uniform slice spacing"):
        load_series_volume(scan_headers(tmp_path).series[0])


def test_studies_grouped_sorted_and_chunked(tmp_path: Path) -> None:
    uids = sorted(generate_uid() for _ in range(3))
    for i, uid in enumerate(reversed(uids)):
        write_mr_series(tmp_path / f"s{i}", n=3, study_uid=uid, patient_id=f"P{i}")
    scan = scan_headers(tmp_path)
    assert [s.study_instance_uid for s in scan.studies] == uids
    chunks = list(chunk_studies(scan.studies, 2))
    assert [len(c) for c in chunks] == [2, 1]
    with pytest.raises(ValueError, match="positive integer"):
        list(chunk_studies(scan.studies, 0))


def test_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_headers(tmp_path / "nope")


def test_duplicate_sop_instance_recorded(tmp_path: Path) -> None:
    paths, _ = write_mr_series(tmp_path / "a", n=4)
    shutil.copy(paths[0], tmp_path / "a" / "zz_copy.dcm")
    scan = scan_headers(tmp_path)
    assert scan.series[0].number_of_slices == 4
    assert [p.name for p, _ in scan.bad_files] == ["zz_copy.dcm"]


def test_multi_frame_rejected_before_decoding(tmp_path: Path) -> None:
    paths, _ = write_mr_series(tmp_path, n=3)
    ds = pydicom.dcmread(paths[1])
    ds.NumberOfFrames = 2
    ds.save_as(paths[1], enforce_file_format=True)
    with pytest.raises(ValueError, match="multi-frame instances"):
        load_series_volume(scan_headers(tmp_path).series[0])


def test_linked_study_folders_are_followed_once_and_broken_links_reported(tmp_path: Path) -> None:
    # A cohort laid out as researchers do: a folder of links into an archive.
    archive, cohort = tmp_path / "archive", tmp_path / "cohort"
    write_sources(archive / "study1")
    cohort.mkdir()
    (cohort / "patient1").symlink_to(archive / "study1", target_is_directory=True)
    (cohort / "patient1_again").symlink_to(archive / "study1", target_is_directory=True)  # read once
    (cohort / "patient1" / "loop").symlink_to(cohort, target_is_directory=True)  # a loop back up
    (cohort / "missing.dcm").symlink_to(tmp_path / "gone.dcm")
    scan = scan_headers(cohort)
    assert len(scan.studies) == 1 and len(scan.series) == 1
    assert len(scan.series[0].slices) == N
    # Every file was read once: no duplicate instance was reported for the second link.
    assert [(path.name, reason.split(" (")[0]) for path, reason in scan.bad_files] == [
        ("missing.dcm", f"symbolic link to {tmp_path / 'gone.dcm'} cannot be read")
    ]
