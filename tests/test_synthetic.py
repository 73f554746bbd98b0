"""Tests of the synthetic cohort generator on a tiny cohort (~40-voxel matrices, seconds)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from codegraph3d import synthetic
from codegraph3d.synthetic import lps_to_ras_affine, make_cohort, write_series

TINY = dict(
    n_subjects=6,
    lesion_fraction=1.0 / 3.0,
    seed=7,
    with_localizer_fraction=0.5,
    matrix_scale=0.2,
    lesion_radius_mm=(14.0, 18.0),
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cohort")
    labels = make_cohort(out, **TINY)
    return out, labels


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(path) for path in sorted(folder.glob("IM*.dcm"))]
    assert datasets, f"no files in {folder}"
    return datasets


def _sorted_by_position(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    orientation = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(datasets, key=lambda ds: float(np.dot(normal, ds.ImagePositionPatient)))


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_layout_and_dicom_files_are_readable(cohort: tuple[Path, dict]) -> None:
    out, labels = cohort
    assert sorted(p.name for p in out.iterdir()) == ["dicom", "labels.json", "truth"]
    files = sorted((out / "dicom").rglob("*"))
    dicom_files = [f for f in files if f.is_file()]
    assert dicom_files
    sop_uids = set()
    for path in dicom_files:
        assert re.fullmatch(r"ST\d{3}/SE\d{2}/IM\d{4}\.dcm",
                            path.relative_to(out / "dicom").as_posix())
        ds = pydicom.dcmread(path)
        assert ds.preamble is not None
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.MRImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert ds.Modality == "MR"
        assert ds.pixel_array.dtype == np.uint16
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == len(dicom_files)
    n_expected = sum(s["n_files"] for st in labels["studies"] for s in st["series"])
    n_expected += sum(d["n_files"] for st in labels["studies"] for d in st["distractors"])
    assert n_expected == len(dicom_files)


def test_labels_content(cohort: tuple[Path, dict]) -> None:
    out, labels = cohort
    assert json.loads((out / "labels.json").read_text()) == labels
    assert labels["schema"] == synthetic.LABELS_SCHEMA
    studies = labels["studies"]
    assert labels["n_studies"] == len(studies) == TINY["n_subjects"]
    assert labels["n_lesion_studies"] == round(TINY["lesion_fraction"] * TINY["n_subjects"])
    assert sum(s["has_lesion"] for s in studies) == labels["n_lesion_studies"]
    assert len({s["patient_id"] for s in studies}) == len(studies)
    assert len({s["study_instance_uid"] for s in studies}) == len(studies)
    for study in studies:
        assert sorted(s["contrast"] for s in study["series"]) == ["T1w", "T2w"]
        folder = out / study["folder"]
        for series in study["series"]:
            ds = _read_series(out / series["folder"])[0]
            assert ds.PatientID == study["patient_id"]
            assert ds.StudyInstanceUID == study["study_instance_uid"]
            assert ds.SeriesInstanceUID == series["series_instance_uid"]
            assert ds.SeriesDescription == series["series_description"]
            assert (out / series["folder"]).parent == folder
            for kind in ("lesion", "brain"):
                path = out / series["truth"][kind]
                assert path.parent == out / "truth"
                assert path.name == f"{series['series_instance_uid']}_{kind}.nii.gz"
            if study["has_lesion"]:
                assert series["has_lesion"] and series["lesion_volume_ml"] > 0
            else:
                assert not series["has_lesion"] and series["lesion_volume_ml"] == 0
            if series["contrast"] == "T2w":
                assert 80 <= float(ds.EchoTime) <= 120 and float(ds.RepetitionTime) >= 3000
            else:
                assert float(ds.EchoTime) <= 15 and 400 <= float(ds.RepetitionTime) <= 2000
        expected = np.mean([s["lesion_volume_ml"] for s in study["series"]])
        assert study["lesion_volume_ml"] == pytest.approx(expected, abs=1e-3)


def test_geometry_round_trip_and_lesion_contrast(cohort: tuple[Path, dict]) -> None:
    out, labels = cohort
    flip = np.diag([-1.0, -1.0, 1.0])
    n_lesion_series = 0
    orientations = set()
    for study in labels["studies"]:
        for series in study["series"]:
            orientations.add(series["orientation"])
            datasets = _sorted_by_position(_read_series(out / series["folder"]))
            lesion_img = nib.load(out / series["truth"]["lesion"])
            brain_img = nib.load(out / series["truth"]["brain"])
            lesion = np.asarray(lesion_img.dataobj).astype(bool)  # [x, y, z]
            brain = np.asarray(brain_img.dataobj).astype(bool)
            assert np.allclose(lesion_img.affine, brain_img.affine)
            assert lesion.shape == (datasets[0].Columns, datasets[0].Rows, len(datasets))
            assert list(lesion.shape[::-1]) == series["shape_zyx"]
            assert int(lesion.sum()) == series["lesion_voxels"]
            assert not np.any(lesion & ~brain)

            # Physical points of every brain voxel: NIfTI affine (RAS -> LPS) vs DICOM tags.
            ijk = np.argwhere(brain)
            nifti_lps = (ijk @ lesion_img.affine[:3, :3].T + lesion_img.affine[:3, 3]) @ flip
            orientation = np.array(datasets[0].ImageOrientationPatient, dtype=float)
            row_dir, col_dir = orientation[:3], orientation[3:]
            row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)
            positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
            dicom_lps = (positions[ijk[:, 2]] + np.outer(ijk[:, 0] * col_spacing, row_dir)
                         + np.outer(ijk[:, 1] * row_spacing, col_dir))
            np.testing.assert_allclose(nifti_lps, dicom_lps, atol=1e-3)

            volume = np.stack([
                ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                for ds in datasets
            ])  # [z, y, x]
            volume_xyz = volume.transpose(2, 1, 0)
            assert np.all(volume_xyz[~brain] == 0)
            if lesion.any():
                n_lesion_series += 1
                inside = volume_xyz[lesion].mean()
                rest = volume_xyz[brain & ~lesion].mean()
                if series["contrast"] == "T2w":
                    assert inside > 1.15 * rest
                else:
                    assert inside < 0.85 * rest
    assert n_lesion_series == 2 * labels["n_lesion_studies"]
    assert len(orientations) >= 2


def test_simpleitk_reads_the_same_geometry(cohort: tuple[Path, dict]) -> None:
    sitk = pytest.importorskip("SimpleITK")
    out, labels = cohort
    series = labels["studies"][0]["series"][0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(out / series["folder"])))
    image = reader.Execute()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    expected = lps_to_ras_affine(image.GetOrigin(), image.GetSpacing(), direction)
    affine = nib.load(out / series["truth"]["brain"]).affine
    np.testing.assert_allclose(affine, expected, atol=1e-4)


def test_localizer_present_when_asked(cohort: tuple[Path, dict]) -> None:
    out, labels = cohort
    with_localizer = [s for s in labels["studies"] if s["distractors"]]
    assert len(with_localizer) == round(TINY["with_localizer_fraction"] * TINY["n_subjects"])
    for study in with_localizer:
        (distractor,) = study["distractors"]
        assert distractor["kind"] == "localizer"
        datasets = _read_series(out / distractor["folder"])
        assert len(datasets) == 3
        normals = set()
        for ds in datasets:
            assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            assert ds.SeriesDescription == "localizer"
            assert ds.StudyInstanceUID == study["study_instance_uid"]
            assert ds.FrameOfReferenceUID == study["frame_of_reference_uid"]
            iop = np.array(ds.ImageOrientationPatient, dtype=float)
            normals.add(tuple(np.round(np.abs(np.cross(iop[:3], iop[3:])))))
        assert len(normals) == 3
    for study in labels["studies"]:
        scored = {s["series_instance_uid"] for s in study["series"]}
        assert not scored & {d["series_instance_uid"] for d in study["distractors"]}


def test_same_seed_same_bytes_other_seed_differs(
    cohort: tuple[Path, dict], tmp_path: Path
) -> None:
    out, _ = cohort
    again = make_cohort(tmp_path / "again", **TINY)
    assert _tree_digest(tmp_path / "again") == _tree_digest(out)
    other = make_cohort(tmp_path / "other", **{**TINY, "seed": TINY["seed"] + 1, "n_subjects": 2})
    assert other["studies"][0]["study_instance_uid"] != again["studies"][0]["study_instance_uid"]


def test_existing_cohort_is_not_overwritten(cohort: tuple[Path, dict]) -> None:
    out, _ = cohort
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_cohort(out, **TINY)


@pytest.mark.parametrize(
    ("option", "value", "error", "message"),
    [
        ("lesion_fraction", 1.5, ValueError, "lesion_fraction"),
        ("n_subjects", 0, ValueError, "n_subjects"),
        ("contrasts", ("T2w", "FLAIR"), ValueError, "contrast"),
        ("contrasts", "T2w", TypeError, "contrasts"),
        ("lesion_radius_mm", (10.0, 5.0), ValueError, "low <= high"),
        ("matrix_scale", 0.0, ValueError, "matrix_scale"),
        ("seed", -1, ValueError, "seed"),
        ("max_rotation_deg", float("nan"), ValueError, "max_rotation_deg"),
    ],
)
def test_invalid_options_fail_before_writing(
    tmp_path: Path, option: str, value: object, error: type[Exception], message: str
) -> None:
    target = tmp_path / "never"
    with pytest.raises(error, match=message):
        make_cohort(target, **{**TINY, option: value})
    assert not target.exists()


def test_write_series_oblique_geometry_and_rescale(tmp_path: Path) -> None:
    angle = np.radians(3.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                     [0, np.sin(angle), np.cos(angle)]])
    direction = synthetic.orientation_direction("coronal", tilt)
    origin = np.array([-90.5, 20.25, 60.0])
    spacing = np.array([0.9, 1.1, 3.0])
    rng = np.random.default_rng(0)
    volume = rng.uniform(0.0, 1234.5, size=(4, 5, 6))
    paths = write_series(
        volume, origin, spacing, direction, tmp_path / "series",
        patient_id="P1", patient_name="TEST^ONE", study_uid="1.2.3.4", series_uid="1.2.3.4.5",
        series_description="T2 TSE COR", series_number=3, echo_time=100.0,
        repetition_time=4000.0, frame_of_reference_uid="1.2.3.4.6",
    )
    assert [p.name for p in paths] == [f"IM{k:04d}.dcm" for k in range(1, 5)]
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        np.testing.assert_allclose(ds.ImagePositionPatient,
                                   origin + direction[:, 2] * spacing[2] * k, atol=1e-6)
        np.testing.assert_allclose(ds.ImageOrientationPatient,
                                   np.concatenate([direction[:, 0], direction[:, 1]]), atol=1e-7)
        np.testing.assert_allclose(ds.PixelSpacing, [1.1, 0.9])
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 3.0
        assert ds.InstanceNumber == k + 1 and ds.SeriesNumber == 3
        assert (ds.Rows, ds.Columns) == (5, 6)
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(values, volume[k], atol=float(ds.RescaleSlope))
    with pytest.raises(FileExistsError):
        write_series(volume, origin, spacing, direction, tmp_path / "series", patient_id="P1",
                     patient_name="TEST^ONE", study_uid="1.2.3.4", series_uid="1.2.3.4.5",
                     series_description="x", series_number=3, echo_time=1.0,
                     repetition_time=2.0, frame_of_reference_uid="1.2.3.4.6")
    with pytest.raises(ValueError, match="orthonormal"):
        write_series(volume, origin, spacing, 2 * direction, tmp_path / "bad", patient_id="P1",
                     patient_name="TEST^ONE", study_uid="1.2.3.4", series_uid="1.2.3.4.5",
                     series_description="x", series_number=3, echo_time=1.0,
                     repetition_time=2.0, frame_of_reference_uid="1.2.3.4.6")


def test_lps_to_ras_affine_maps_index_to_ras() -> None:
    direction = synthetic.orientation_direction("sagittal")
    affine = lps_to_ras_affine([10.0, -20.0, 30.0], [1.0, 2.0, 3.0], direction)
    # Index (1, 0, 0) moves 1 mm posterior (LPS +y), i.e. RAS y decreases by 1.
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [-10.0, 20.0, 30.0, 1.0])
    np.testing.assert_allclose(affine @ [1, 0, 0, 1], [-10.0, 19.0, 30.0, 1.0])
    # Index (0, 0, 1) moves 3 mm to the patient's right (LPS -x), RAS x increases by 3.
    np.testing.assert_allclose(affine @ [0, 0, 1, 1], [-7.0, 20.0, 30.0, 1.0])


def test_tissue_maps_match_nilearn_definition() -> None:
    maps = synthetic.load_tissue_maps(2)
    assert maps.shape == (99, 117, 95)
    np.testing.assert_allclose(np.diag(maps.affine_ras)[:3], [2.0, 2.0, 2.0])
    total = maps.gm + maps.wm + maps.csf
    assert np.all(total[maps.brain == 0] == 0)
    assert np.all(total[maps.brain == 1] >= 0.999)
    t2 = synthetic.synthesize_contrast(maps, "T2w")
    t1 = synthetic.synthesize_contrast(maps, "T1w")
    wm, csf = maps.wm > 0.9, maps.csf > 0.9
    assert t2[csf].mean() > t2[wm].mean() and t1[wm].mean() > t1[csf].mean()
