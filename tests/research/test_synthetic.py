"""Tests of the synthetic cohort generator on a tiny cohort (~40-voxel matrices, seconds)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from codegraph3d_research import synthetic
from codegraph3d_research.synthetic import lps_to_ras_affine, make_cohort, write_series

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


# --------------------------------------------------------------------------------------------
# heads, varied field of view, mass effect, bad inputs
# --------------------------------------------------------------------------------------------

HEADS = dict(
    n_subjects=2,
    lesion_fraction=1.0,
    mass_effect_fraction=0.5,
    head_fraction=1.0,
    seed=11,
    with_localizer_fraction=0.5,
    matrix_scale=0.2,
    lesion_radius_mm=(10.0, 12.0),
)


@pytest.fixture(scope="module")
def head_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("heads")
    labels = make_cohort(out, **HEADS)
    return out, labels


def _read_volume_xyz(folder: Path) -> np.ndarray:
    datasets = _sorted_by_position(_read_series(folder))
    volume = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                       for ds in datasets])
    return volume.transpose(2, 1, 0)


def _identity_subject(maps: synthetic.TissueMaps, **options: object) -> synthetic.SubjectAnatomy:
    """A subject whose space is the template's (no pose change, no elastic warp)."""
    return synthetic.random_subject(
        np.random.default_rng(0), maps, deformation_mm=0.0, max_rotation_deg=0.0,
        max_translation_mm=0.0, max_scaling=0.0, **options)


def test_default_cohort_is_skull_stripped(cohort: tuple[Path, dict]) -> None:
    out, labels = cohort
    assert labels["n_head_studies"] == 0 and labels["n_mass_effect_studies"] == 0
    for study in labels["studies"]:
        assert not study["has_head"] and not study["has_mass_effect"]
        assert all(item["mass_effect_mm"] == 0 for item in study["lesions"])
        for series in study["series"]:
            assert series["skull_stripped"] is True
            assert set(series["truth"]) == {"lesion", "brain"}
    assert not list((out / "truth").glob("*_head.nii.gz"))


def test_head_series_show_a_noisy_head_around_the_brain(head_cohort: tuple[Path, dict]) -> None:
    out, labels = head_cohort
    assert labels["n_head_studies"] == HEADS["n_subjects"]
    assert labels["n_mass_effect_studies"] == 1
    for study in labels["studies"]:
        assert study["has_head"]
        for series in study["series"]:
            assert series["skull_stripped"] is False
            volume = _read_volume_xyz(out / series["folder"])
            brain = np.asarray(nib.load(out / series["truth"]["brain"]).dataobj).astype(bool)
            head = np.asarray(nib.load(out / series["truth"]["head"]).dataobj).astype(bool)
            lesion = np.asarray(nib.load(out / series["truth"]["lesion"]).dataobj).astype(bool)
            assert head.shape == brain.shape == volume.shape
            assert not np.any(brain & ~head) and not np.any(lesion & ~brain)
            assert series["head_volume_ml"] > 1.6 * series["brain_volume_ml"]
            brain_mean = volume[brain].mean()
            # Skull, scalp, face and neck carry signal ...
            assert volume[head & ~brain].mean() > 0.25 * brain_mean
            # ... and the air is Rician noise: almost never exactly 0, far below tissue.
            air = ~head
            assert air.sum() > 0.1 * air.size
            assert np.mean(volume[air] > 0) > 0.9
            assert volume[air].mean() < 0.15 * brain_mean
            if lesion.any():
                inside, rest = volume[lesion].mean(), volume[brain & ~lesion].mean()
                assert inside > 1.15 * rest if series["contrast"] == "T2w" else inside < 0.85 * rest


def test_fov_and_matrix_vary_between_series(head_cohort: tuple[Path, dict], tmp_path: Path) -> None:
    _, labels = head_cohort
    brains = make_cohort(tmp_path / "fov", **{**TINY, "n_subjects": 2, "vary_fov": True,
                                              "with_localizer_fraction": 0.0})
    series = [s for lab in (labels, brains) for st in lab["studies"] for s in st["series"]]
    spacings = {tuple(s["spacing_xyz_mm"]) for s in series}
    matrices = {tuple(s["shape_zyx"][1:]) for s in series}
    fovs = [s["field_of_view_mm"] for s in series]
    assert len(spacings) == len(series) and len(matrices) >= 3
    for s, (fov_x, fov_y) in zip(series, fovs, strict=True):
        assert s["spacing_xyz_mm"][0] == s["spacing_xyz_mm"][1]  # square pixels
        assert s["shape_zyx"][1] == s["shape_zyx"][2]  # square field of view
        assert fov_x == pytest.approx(fov_y) and fov_x >= 200.0 - 1e-6
    assert len({round(f[0]) for f in fovs}) >= 3


def test_dark_bone_shell_between_brain_and_scalp() -> None:
    maps = synthetic.load_tissue_maps(2)
    subject = _identity_subject(maps, with_head=True)
    centre = maps.brain_centre_lps
    n, pixel = 240, 1.0
    direction = synthetic.orientation_direction("coronal")
    origin = centre - direction[:, :2] @ (np.array([pixel, pixel]) * (n - 1) / 2.0)
    grid = synthetic.AcquisitionGrid((1, n, n), origin, np.array([pixel, pixel, 2.0]),
                                     direction, "coronal")
    for contrast in ("T1w", "T2w"):
        rendered = synthetic.render_series(maps, subject, grid, contrast, np.random.default_rng(0),
                                           noise_fraction=0.0, bias_strength=0.0)
        image, brain, head = rendered.image[0], rendered.brain[0], rendered.head[0]
        brain_level = float(np.median(image[brain]))
        mid = n // 2
        # Rays from the centre: up (towards the vertex: coronal rows run inferior), left, right.
        rays = {"superior": (image[::-1, mid][mid:], brain[::-1, mid][mid:], head[::-1, mid][mid:]),
                "left": (image[mid, mid:], brain[mid, mid:], head[mid, mid:]),
                "right": (image[mid, ::-1][mid:], brain[mid, ::-1][mid:], head[mid, ::-1][mid:])}
        for name, (profile, in_brain, in_head) in rays.items():
            last_brain = int(np.flatnonzero(in_brain).max())
            first_air = int(np.flatnonzero(~in_head & (np.arange(in_head.size) > last_brain))[0])
            assert first_air - last_brain >= 8, f"{contrast} {name}: head shell too thin"
            shell = profile[last_brain + 1:first_air]
            darkest = int(np.argmin(shell))
            assert shell[darkest] < 0.15 * brain_level, f"{contrast} {name}: no dark bone"
            # Scalp fat outside the bone is bright on both contrasts.
            assert darkest < shell.size - 2
            assert shell[darkest + 1:].max() > 1.1 * brain_level, f"{contrast} {name}: no scalp"
            assert np.all(profile[first_air + 3:] == 0)  # noise-free air


def test_head_leaves_the_brain_unchanged() -> None:
    maps = synthetic.load_tissue_maps(2)
    rng = np.random.default_rng(4)
    with_head = synthetic.random_subject(rng, maps, n_lesions=1, lesion_radius_mm=(8.0, 9.0),
                                         with_head=True)
    without = dataclasses.replace(with_head, head=None)
    grid = synthetic.acquisition_grid(maps, without, orientation="axial",
                                      spacing=[4.0, 4.0, 5.0], rng=np.random.default_rng(1))
    for contrast in ("T1w", "T2w"):
        a = synthetic.render_series(maps, with_head, grid, contrast, np.random.default_rng(2),
                                    noise_fraction=0.0, bias_strength=0.0)
        b = synthetic.render_series(maps, without, grid, contrast, np.random.default_rng(2),
                                    noise_fraction=0.0, bias_strength=0.0)
        assert b.head is None and a.head is not None
        np.testing.assert_array_equal(a.brain, b.brain)
        np.testing.assert_array_equal(a.lesion, b.lesion)
        assert a.lesion.any()
        # Brain voxels away from its edge have the same intensity; the only exceptions are
        # next to the few holes of the template's brain mask, where CSF replaces 0.
        from scipy import ndimage

        core = ndimage.binary_erosion(a.brain, iterations=1)
        same = np.isclose(a.image[core], b.image[core], rtol=1e-6)
        assert same.mean() > 0.999
        np.testing.assert_allclose(a.image[core], b.image[core], rtol=0.01)
        assert np.all(b.image[~b.brain] == 0) and np.mean(a.image[~a.brain] > 0) > 0.3
        assert np.all(a.head[a.brain])


def test_mass_effect_pushes_the_ventricle_away() -> None:
    from scipy import ndimage

    maps = synthetic.load_tissue_maps(2)
    subject = _identity_subject(maps, n_lesions=1)
    # The body of the left lateral ventricle (LPS +x), and a 14 mm lesion 8 mm lateral to its
    # wall pushing 6 mm at its boundary.
    ijk = np.argwhere((maps.csf > 0.5) & (maps.depth_mm > 15.0))
    lps = ijk @ maps.index_to_lps[:3, :3].T + maps.index_to_lps[:3, 3]
    in_body = (lps[:, 0] > 2.0) & (lps[:, 0] < 30.0) & (np.abs(lps[:, 2] - 20.0) <= 6.0)
    body = lps[in_body]
    body_centre = body.mean(axis=0)
    row = body[np.all(np.abs(body[:, 1:] - body_centre[1:]) <= 2.0, axis=1)]
    radius = 14.0
    centre = np.array([row[:, 0].max() + 8.0 + radius, body_centre[1], body_centre[2]])
    lesion = dataclasses.replace(subject.lesions[0], centre_lps=centre, axes=np.eye(3),
                                 semi_axes_mm=np.full(3, radius), lobe_amplitudes=np.zeros(3))
    still = dataclasses.replace(subject, lesions=(lesion,))
    pushed = dataclasses.replace(subject, lesions=(dataclasses.replace(
        lesion, mass_effect_mm=6.0, mass_effect_range_mm=3.0 * radius),))
    assert pushed.has_mass_effect and not still.has_mass_effect
    grid = synthetic.acquisition_grid(maps, still, orientation="axial", spacing=[2.0, 2.0, 2.0],
                                      rng=np.random.default_rng(0), max_oblique_deg=0.0)
    marker = np.zeros(maps.shape, dtype=np.float32)  # renders "how much ventricle body"
    marker[tuple(ijk[in_body].T)] = maps.csf[tuple(ijk[in_body].T)]
    rendered = {}
    for name, item in (("still", still), ("pushed", pushed)):
        rendered[name] = tuple(
            synthetic.render_series(maps, item, grid, "T2w", np.random.default_rng(0),
                                    noise_fraction=0.0, bias_strength=0.0, template_image=image)
            for image in (marker, None))
    # The lesion truth does not move (the lesion is what pushes) ...
    lesion_mask = rendered["pushed"][0].lesion
    np.testing.assert_array_equal(rendered["still"][0].lesion, lesion_mask)
    assert lesion_mask.sum() > 500
    # ... and rendering agrees with it: bright on T2w inside the truth, against its surroundings.
    image = rendered["pushed"][1].image
    ring = (ndimage.binary_dilation(lesion_mask, iterations=3)
            & ~ndimage.binary_dilation(lesion_mask, iterations=1) & rendered["pushed"][1].brain)
    assert image[lesion_mask].mean() > 1.2 * image[ring].mean()

    zz, yy, xx = np.nonzero(np.ones(grid.shape_zyx, dtype=bool))
    index = np.stack([xx, yy, zz], axis=1).astype(float)
    points = index @ grid.index_to_physical[:3, :3].T + grid.index_to_physical[:3, 3]
    keep = ~ndimage.binary_dilation(lesion_mask, iterations=2).ravel()
    stats = {}
    for name in ("still", "pushed"):
        weight = rendered[name][0].image.ravel()[keep]
        centroid = (points[keep] * weight[:, None]).sum(axis=0) / weight.sum()
        stats[name] = (float(np.linalg.norm(centroid - centre)), float(weight.sum()))
    # The ventricle moves away from the lesion, and shrinks a little.
    assert stats["pushed"][0] > stats["still"][0] + 0.4
    assert stats["pushed"][1] < stats["still"][1]
    # Beyond the push's reach nothing moves.
    far = np.linalg.norm(points - centre, axis=1) > pushed.lesions[0].mass_effect_reach_mm + 5.0
    assert far.sum() > 1000
    np.testing.assert_array_equal(rendered["still"][1].image.ravel()[far],
                                  rendered["pushed"][1].image.ravel()[far])


def test_random_subject_mass_effect_is_bounded() -> None:
    maps = synthetic.load_tissue_maps(2)
    plain = synthetic.random_subject(np.random.default_rng(5), maps, n_lesions=2)
    pushed = synthetic.random_subject(np.random.default_rng(5), maps, n_lesions=2,
                                      mass_effect=True)
    for a, b in zip(plain.lesions, pushed.lesions, strict=True):
        np.testing.assert_array_equal(a.centre_lps, b.centre_lps)  # same lesions, plus a push
        assert a.mass_effect_mm == 0 and a.mass_effect_reach_mm == 0
        assert 0 < b.mass_effect_mm <= 0.45 * b.semi_axes_mm.mean() + 1e-9
        assert b.mass_effect_range_mm >= 20.0
        # Along a ray points keep their order, the push is largest at the boundary, and it is
        # 0 at the surface of the brain and beyond the reach.
        distances = np.linspace(0.0, b.mass_effect_reach_mm + 10.0, 600)
        ray = b.centre_lps + np.outer(distances, [0.6, 0.0, 0.8])
        moved = b.mass_effect_pullback(ray, np.full(len(ray), 30.0))
        radius = np.linalg.norm(moved - b.centre_lps, axis=1)
        assert np.all(np.diff(radius) > 0)
        push = distances - radius
        assert push.max() == pytest.approx(b.mass_effect_mm, rel=0.05)
        assert np.all(np.abs(push[distances > b.mass_effect_reach_mm]) < 1e-9)
        np.testing.assert_array_equal(b.mass_effect_pullback(ray, np.zeros(len(ray))), ray)


def test_knee_series_header_and_geometry(tmp_path: Path) -> None:
    written = synthetic.write_knee_series(
        tmp_path / "knee", contrast="T2w", matrix=48, n_slices=6, patient_id="BAD1",
        study_uid="1.2.826.0.1.1", series_uid="1.2.826.0.1.1.2", series_number=7)
    neutral = synthetic.write_knee_series(tmp_path / "neutral", contrast="T1w", matrix=48,
                                          n_slices=6, neutral_header=True, patient_id="BAD1",
                                          study_uid="1.2.826.0.1.1", series_number=8)
    assert written.shape_zyx == (6, 48, 48) and len(written.files) == 6
    datasets = _read_series(tmp_path / "knee")
    for ds in datasets:
        assert ds.BodyPartExamined == "KNEE" and "KNEE" in ds.SeriesDescription
        assert ds.SeriesInstanceUID == "1.2.826.0.1.1.2" and ds.StudyInstanceUID == "1.2.826.0.1.1"
        assert ds.PatientID == "BAD1" and ds.SeriesNumber == 7
        np.testing.assert_allclose(ds.PixelSpacing, [160.0 / 48] * 2)
        assert float(ds.SpacingBetweenSlices) == 3.0 and (ds.Rows, ds.Columns) == (48, 48)
    volume = _read_volume_xyz(tmp_path / "knee")
    # A leg: bright tissue in the middle, noise in the corners.
    assert volume[20:28, 20:28].mean() > 5 * volume[:4, :4].mean()
    ds = _read_series(tmp_path / "neutral")[0]
    assert ds.SeriesDescription == "T1 AX" and ds.BodyPartExamined == ""
    assert "KNEE" not in ds.StudyDescription and ds.PatientPosition == "HFS"
    assert neutral.study_instance_uid == written.study_instance_uid
    assert neutral.series_instance_uid != written.series_instance_uid
    again = synthetic.write_knee_series(tmp_path / "again", contrast="T2w", matrix=48, n_slices=6,
                                        patient_id="BAD1", study_uid="1.2.826.0.1.1",
                                        series_uid="1.2.826.0.1.1.2", series_number=7)
    assert _tree_digest(tmp_path / "again") == _tree_digest(tmp_path / "knee")
    assert again.files[0].name == "IM0001.dcm"


def test_truncated_slab_and_anisotropic_series(tmp_path: Path) -> None:
    common = dict(patient_id="BAD2", head=True, seed=3)
    truncated = synthetic.write_truncated_series(tmp_path / "trunc", contrast="T1w",
                                                 keep_fraction=0.4, matrix=48, slice_mm=6.0,
                                                 **common)
    one = synthetic.write_slab_series(tmp_path / "one", contrast="T2w", n_slices=1, matrix=48,
                                      series_number=2, **common)
    three = synthetic.write_slab_series(tmp_path / "three", contrast="T1w", n_slices=3, matrix=48,
                                        orientation="sagittal", series_number=3, **common)
    aniso = synthetic.write_anisotropic_series(tmp_path / "aniso", contrast="T2w",
                                               spacing=(2.5, 2.5, 25.0), series_number=4,
                                               **common)
    assert len({w.study_instance_uid for w in (truncated, one, three, aniso)}) == 1
    assert len({w.series_instance_uid for w in (truncated, one, three, aniso)}) == 4

    # Truncated: axial slices over the top 40 % of a ~200 mm head only, all above the brain's
    # centre, and the top slice still inside the head.
    datasets = _sorted_by_position(_read_series(tmp_path / "trunc"))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    assert len(datasets) == truncated.shape_zyx[0]
    assert 50.0 <= (z.max() - z.min() + 6.0) <= 110.0
    maps = synthetic.load_tissue_maps(2)
    assert z.min() > maps.brain_centre_lps[2] + 5.0
    volume = _read_volume_xyz(tmp_path / "trunc")
    assert volume[:, :, -3].max() > 0.3 * volume.max()

    for written, n in ((one, 1), (three, 3)):
        datasets = _read_series(written.folder)
        assert len(datasets) == n == written.shape_zyx[0]
        assert (datasets[0].Rows, datasets[0].Columns) == written.shape_zyx[1:]
        assert float(datasets[0].SpacingBetweenSlices) == 5.0
    iop = np.array(_read_series(three.folder)[0].ImageOrientationPatient, dtype=float)
    assert abs(np.cross(iop[:3], iop[3:])[0]) == pytest.approx(1.0)  # sagittal
    # The 2-D slice goes through the brain: it is not mostly air.
    image = _read_volume_xyz(one.folder)[:, :, 0]
    assert np.mean(image > 0.2 * image.max()) > 0.2

    datasets = _read_series(tmp_path / "aniso")
    np.testing.assert_allclose(datasets[0].PixelSpacing, [2.5, 2.5])
    assert float(datasets[0].SpacingBetweenSlices) == 25.0
    assert aniso.spacing_xyz_mm == (2.5, 2.5, 25.0)
    assert len(datasets) == aniso.shape_zyx[0] and 6 <= len(datasets) <= 12

    with pytest.raises(ValueError, match="keep_fraction"):
        synthetic.write_truncated_series(tmp_path / "bad", keep_fraction=1.0, **common)
    with pytest.raises(ValueError, match="n_slices"):
        synthetic.write_slab_series(tmp_path / "bad", n_slices=0, **common)
    with pytest.raises(TypeError, match="body_part_examined"):
        synthetic.write_slab_series(tmp_path / "bad", body_part_examined="HEAD", **common)
    with pytest.raises(TypeError, match="colour"):
        synthetic.write_anisotropic_series(tmp_path / "bad", colour="red", **common)
    assert not (tmp_path / "bad").exists()


def test_head_cohort_is_deterministic(head_cohort: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = head_cohort
    make_cohort(tmp_path / "again", **HEADS)
    assert _tree_digest(tmp_path / "again") == _tree_digest(out)


@pytest.mark.parametrize(
    ("option", "value", "error", "message"),
    [
        ("head_fraction", 1.5, ValueError, "head_fraction"),
        ("mass_effect_fraction", -0.1, ValueError, "mass_effect_fraction"),
        ("vary_fov", "yes", TypeError, "vary_fov"),
        ("fov_mm", (260.0, 200.0), ValueError, "low <= high"),
        ("matrix_size", (8, 64), ValueError, "matrix_size"),
        ("mass_effect_ratio", (0.2, 0.9), ValueError, "mass_effect_ratio"),
    ],
)
def test_invalid_new_options_fail_before_writing(
    tmp_path: Path, option: str, value: object, error: type[Exception], message: str
) -> None:
    target = tmp_path / "never"
    with pytest.raises(error, match=message):
        make_cohort(target, **{**TINY, option: value})
    assert not target.exists()


def test_varied_lesion_appearance_changes_only_the_lesions() -> None:
    maps = synthetic.load_tissue_maps(2)
    typical = synthetic.random_subject(np.random.default_rng(7), maps, n_lesions=1, lesion_radius_mm=(8.0, 9.0))
    varied = synthetic.random_subject(np.random.default_rng(7), maps, n_lesions=1, lesion_radius_mm=(8.0, 9.0),
                                      lesion_appearance="varied")
    np.testing.assert_array_equal(typical.pullback, varied.pullback)
    np.testing.assert_array_equal(typical.lesions[0].centre_lps, varied.lesions[0].centre_lps)
    assert typical.lesions[0].appearance == () and {c for c, _, _ in varied.lesions[0].appearance} == {"T1w", "T2w"}
    grid = synthetic.acquisition_grid(maps, typical, orientation="axial", spacing=[3.0, 3.0, 3.0],
                                      rng=np.random.default_rng(1))
    for contrast in ("T1w", "T2w"):
        a = synthetic.render_series(maps, typical, grid, contrast, np.random.default_rng(2), noise_fraction=0.0, bias_strength=0.0)
        b = synthetic.render_series(maps, varied, grid, contrast, np.random.default_rng(2), noise_fraction=0.0, bias_strength=0.0)
        np.testing.assert_array_equal(a.lesion, b.lesion)
        from scipy import ndimage

        far = ~ndimage.binary_dilation(a.lesion, iterations=4)
        # Equal up to the image-wide intensity scaling, which sees the lesion too.
        np.testing.assert_allclose(a.image[far], b.image[far], rtol=5e-3)
        assert not np.allclose(a.image[a.lesion], b.image[a.lesion], rtol=0.02)
    # Lesions of different subjects are unlike each other.
    cores = [synthetic.random_subject(np.random.default_rng(s), maps, n_lesions=1, lesion_appearance="varied")
             .lesions[0].appearance[0][2] for s in range(8)]
    assert np.ptp(cores) > 0.3
    with pytest.raises(ValueError, match="lesion_appearance must be one of typical, varied, distinct, striped"):
        synthetic.random_subject(np.random.default_rng(0), maps, lesion_appearance="odd")


def test_distinct_lesions_are_identical_across_subjects_and_unlike_normal_tissue() -> None:
    maps = synthetic.load_tissue_maps(2)
    subjects = [synthetic.random_subject(np.random.default_rng(s), maps, n_lesions=1, lesion_appearance="distinct")
                for s in range(3)]
    assert all(s.lesions[0].appearance == synthetic.DISTINCT_APPEARANCE for s in subjects)
    typical = synthetic.random_subject(np.random.default_rng(0), maps, n_lesions=1)
    np.testing.assert_array_equal(typical.pullback, subjects[0].pullback)
    grid = synthetic.acquisition_grid(maps, subjects[0], orientation="axial", spacing=[2.0, 2.0, 2.0],
                                      rng=np.random.default_rng(1))
    rendered = synthetic.render_series(maps, subjects[0], grid, "T2w", np.random.default_rng(2),
                                       noise_fraction=0.0, bias_strength=0.0)
    from scipy import ndimage

    core = ndimage.binary_erosion(rendered.lesion, iterations=2)
    white_matter_like = np.percentile(rendered.image[rendered.brain & ~rendered.lesion], 5)
    # The T2w core is darker than nearly all normal brain.
    assert np.median(rendered.image[core]) < white_matter_like


def test_striped_lesions_share_a_texture_that_normal_tissue_lacks() -> None:
    maps = synthetic.load_tissue_maps(2)
    subjects = [synthetic.random_subject(np.random.default_rng(s), maps, n_lesions=1, lesion_appearance="striped")
                for s in range(3)]
    for subject in subjects:
        lesion = subject.lesions[0]
        assert lesion.appearance == synthetic.STRIPED_APPEARANCE
        assert (lesion.stripe_period_mm, lesion.stripe_amplitude) == (synthetic.STRIPE_PERIOD_MM,
                                                                      synthetic.STRIPE_AMPLITUDE)
    typical = synthetic.random_subject(np.random.default_rng(0), maps, n_lesions=1)
    assert typical.lesions[0].stripe_amplitude == 0.0
    grid = synthetic.acquisition_grid(maps, subjects[0], orientation="axial", spacing=[1.0, 1.0, 2.0],
                                      rng=np.random.default_rng(1))
    rendered = synthetic.render_series(maps, subjects[0], grid, "T2w", np.random.default_rng(2),
                                       noise_fraction=0.0, bias_strength=0.0)
    from scipy import ndimage

    # Stripes: the lesion core alternates by about twice the amplitude over half a period, far
    # more than normal brain varies over the same distance.
    core = ndimage.binary_erosion(rendered.lesion, iterations=3)
    assert core.sum() > 100
    local_range = ndimage.maximum_filter(rendered.image, size=(1, 5, 5)) - ndimage.minimum_filter(
        rendered.image, size=(1, 5, 5))
    normal = ndimage.binary_erosion(rendered.brain & ~ndimage.binary_dilation(rendered.lesion, iterations=4),
                                    iterations=3)
    assert np.median(local_range[core]) > 0.4
    assert np.median(local_range[core]) > 2.0 * np.percentile(local_range[normal], 90)


def test_uids_are_reproducible_and_never_shared_by_cohorts_that_differ(tmp_path: Path) -> None:
    options = dict(TINY, n_subjects=2, with_localizer_fraction=0.0, contrasts=("T2w",))

    def uids(folder: Path, **changes) -> set[str]:
        labels = make_cohort(folder, **{**options, **changes})
        return {s["series_instance_uid"] for st in labels["studies"] for s in st["series"]} | {
            st["study_instance_uid"] for st in labels["studies"]}

    first = uids(tmp_path / "a")
    assert uids(tmp_path / "b") == first
    assert not uids(tmp_path / "c", lesion_fraction=1.0) & first


def _lesion_touches_non_brain(lesion: np.ndarray, brain: np.ndarray, voxels: int) -> bool:
    """Whether a non-brain voxel lies within ``voxels`` 26-neighbourhood steps of the lesion."""
    from scipy import ndimage

    near = ndimage.binary_dilation(lesion, structure=np.ones((3, 3, 3), bool), iterations=voxels)
    return bool(np.any(near & ~brain))


def test_cortical_lesions_reach_the_brain_surface_deep_lesions_do_not() -> None:
    maps = synthetic.load_tissue_maps(2)
    for seed in range(3):
        for placement in synthetic.LESION_PLACEMENTS:
            subject = synthetic.random_subject(np.random.default_rng(seed), maps, n_lesions=1,
                                               lesion_radius_mm=(6.0, 10.0),
                                               lesion_placement=placement)
            assert subject.lesions[0].placement == placement
            grid = synthetic.acquisition_grid(maps, subject, orientation="axial",
                                              spacing=[2.0, 2.0, 2.0], rng=np.random.default_rng(1))
            rendered = synthetic.render_series(maps, subject, grid, "T2w", np.random.default_rng(2),
                                               noise_fraction=0.0, bias_strength=0.0)
            lesion, brain = rendered.lesion, rendered.brain
            assert lesion.sum() > 50 and not np.any(lesion & ~brain)
            touches = _lesion_touches_non_brain(lesion, brain, voxels=1)
            assert touches == (placement == "cortical"), (seed, placement)
            if placement == "deep":
                assert not _lesion_touches_non_brain(lesion, brain, voxels=2)


def test_cortical_lesion_changes_only_the_brain() -> None:
    # A whole head, where the CSF, skull and scalp next to the lesion carry signal: the lesion
    # must leave them alone, so the truth (inside the brain) is the region that changed.
    from scipy import ndimage

    maps = synthetic.load_tissue_maps(2)
    subject = synthetic.random_subject(np.random.default_rng(3), maps, n_lesions=1,
                                       lesion_radius_mm=(8.0, 10.0), lesion_placement="cortical",
                                       with_head=True)
    healthy = dataclasses.replace(subject, lesions=())
    grid = synthetic.acquisition_grid(maps, healthy, orientation="coronal", spacing=[2.0, 2.0, 2.0],
                                      rng=np.random.default_rng(1))
    for contrast in ("T2w", "T1w"):
        a = synthetic.render_series(maps, subject, grid, contrast, np.random.default_rng(2),
                                    noise_fraction=0.0, bias_strength=0.0)
        b = synthetic.render_series(maps, healthy, grid, contrast, np.random.default_rng(2),
                                    noise_fraction=0.0, bias_strength=0.0)
        np.testing.assert_array_equal(a.brain, b.brain)
        assert a.lesion.any() and not b.lesion.any() and not np.any(a.lesion & ~a.brain)
        assert _lesion_touches_non_brain(a.lesion, a.brain, voxels=1)
        # Outside the brain (past the one-voxel partial-volume rim) nothing changed ...
        rim = ndimage.binary_dilation(a.brain, structure=np.ones((3, 3, 3), bool))
        np.testing.assert_array_equal(a.image[~rim], b.image[~rim])
        # ... while the truth did (a few voxels keep their value by chance: partial-volume CSF
        # about as bright as the lesion's rim).
        changed = np.abs(a.image - b.image) > 0.01 * np.abs(b.image)
        assert np.mean(changed[a.lesion]) > 0.9


def test_cortical_placement_cohort(cohort: tuple[Path, dict], tmp_path: Path) -> None:
    options = dict(TINY, n_subjects=2, lesion_fraction=1.0, with_localizer_fraction=0.0,
                   head_fraction=0.5, lesion_placement="cortical")
    labels = make_cohort(tmp_path / "cortical", **options)
    assert labels["generator"]["lesion_placement"] == "cortical"
    # The default is not recorded: it would change the UIDs of every earlier cohort.
    assert "lesion_placement" not in cohort[1]["generator"]
    for study in labels["studies"]:
        assert study["has_lesion"]
        for series in study["series"]:
            truth = {kind: np.asarray(nib.load(tmp_path / "cortical" / path).dataobj) > 0
                     for kind, path in series["truth"].items()}
            lesion, brain = truth["lesion"], truth["brain"]
            assert series["has_lesion"] and lesion.any() and not np.any(lesion & ~brain)
            assert _lesion_touches_non_brain(lesion, brain, voxels=1)
    deep = make_cohort(tmp_path / "deep", **{**options, "lesion_placement": "deep"})
    assert "lesion_placement" not in deep["generator"]
    assert not ({st["study_instance_uid"] for st in deep["studies"]}
                & {st["study_instance_uid"] for st in labels["studies"]})


def test_unknown_lesion_placement_fails_before_writing(tmp_path: Path) -> None:
    target = tmp_path / "never"
    message = "lesion_placement must be one of deep, cortical; got 'surface'"
    with pytest.raises(ValueError, match=message):
        make_cohort(target, **{**TINY, "lesion_placement": "surface"})
    assert not target.exists()
    with pytest.raises(ValueError, match=message):
        synthetic.random_subject(np.random.default_rng(0), synthetic.load_tissue_maps(2),
                                 n_lesions=1, lesion_placement="surface")
