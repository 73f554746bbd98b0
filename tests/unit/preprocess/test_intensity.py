"""Nyul histogram standardisation: exact landmark mapping, invariance, training, files and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from codegraph3d.preprocess import intensity
from fixtures import ROOT
from codegraph3d.cli import main as codegraph3d_command
from codegraph3d.preprocess.intensity import (
    DEFAULT_PERCENTILES,
    PACKAGE_LANDMARKS,
    SCHEMA,
    ReferenceLandmarks,
    learn_reference,
    load_reference_landmarks,
    read_landmarks_file,
    standardise,
    uniform_reference,
    volume_landmarks,
)

PERCENTILES = np.asarray(DEFAULT_PERCENTILES)
# A non-uniform reference, so that a test cannot pass by equal spacing alone.
REFERENCE = ReferenceLandmarks(
    contrast="T2w",
    percentiles=DEFAULT_PERCENTILES,
    values=(0.0, 0.05, 0.12, 0.2, 0.3, 0.42, 0.55, 0.68, 0.8, 0.9, 1.0),
    source="test reference",
)


def _quantile_volume(quantile, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1001 brain voxels holding quantile(u) at u = 0, 0.001, ..., 1, shuffled, in a 0 background.

    With 1001 values, np.percentile's p-th percentile is exactly the value at u = p / 100, so the
    landmarks are known in closed form and are themselves voxel values.
    """
    values = quantile(np.linspace(0.0, 1.0, 1001))
    image = np.zeros((9, 13, 15))
    mask = np.zeros(image.shape, bool)
    mask[1:8, 1:12, 1:14] = True  # 7 * 11 * 13 = 1001 voxels
    image[mask] = rng.permutation(values)
    return image, mask


def _smooth_brain(rng: np.random.Generator, shape=(24, 24, 24)) -> tuple[np.ndarray, np.ndarray]:
    """A positive, spatially smooth image inside a ball (a stand-in for a brain), 0 outside."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    image = np.exp(3.0 * noise / noise.std()) * 100.0 + 50.0
    zz, yy, xx = np.indices(shape)
    centre = (np.asarray(shape) - 1) / 2.0
    mask = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= (shape[0] * 0.42) ** 2
    return np.where(mask, image, 0.0), mask


# --------------------------------------------------------------------------------------------
# the mapping


def test_landmarks_map_exactly_onto_the_reference_values() -> None:
    image, mask = _quantile_volume(lambda u: 30.0 + 900.0 * u**2.5, np.random.default_rng(0))
    out = standardise(image, mask, REFERENCE)
    landmarks = 30.0 + 900.0 * (PERCENTILES / 100.0) ** 2.5
    for landmark, value in zip(landmarks, REFERENCE.values, strict=True):
        voxels = np.isclose(image, landmark, rtol=0, atol=1e-9) & mask
        assert voxels.sum() == 1
        assert out[voxels][0] == pytest.approx(value, abs=1e-6)
    # Between landmarks it is the piecewise-linear interpolation, clipped outside (an oracle for
    # untied landmarks).
    expected = np.interp(image[mask], volume_landmarks(image, mask, PERCENTILES), REFERENCE.values)
    np.testing.assert_allclose(out[mask], expected, atol=1e-6)
    assert out.dtype == np.float32 and np.all(out[~mask] == 0.0)
    assert out[mask].min() == 0.0 and out[mask].max() == 1.0


def test_outside_the_mask_is_zero_whatever_it_holds() -> None:
    image, mask = _smooth_brain(np.random.default_rng(1))
    image[~mask] = 5000.0
    out = standardise(image, mask, REFERENCE)
    assert np.all(out[~mask] == 0.0)
    assert np.all((out[mask] >= 0.0) & (out[mask] <= 1.0))


@pytest.mark.parametrize(
    ("name", "transform", "mean_tol", "max_tol"),
    [
        ("gain and offset", lambda x: 3.7 * x + 120.0, 1e-6, 1e-5),
        ("gamma 0.6", lambda x: 1000.0 * (x / 1000.0) ** 0.6, 0.01, 0.03),
        ("gain, offset and gamma 1.5", lambda x: 0.2 * x**1.5 + 40.0, 0.01, 0.03),
        ("log", lambda x: 500.0 * np.log1p(x), 0.01, 0.03),
    ],
)
def test_monotone_intensity_transforms_standardise_alike(name, transform, mean_tol, max_tol) -> None:
    image, mask = _smooth_brain(np.random.default_rng(2))
    changed = np.where(mask, transform(image), 0.0)
    difference = np.abs(standardise(changed, mask, REFERENCE) - standardise(image, mask, REFERENCE))[mask]
    # Measured: 0 (gain/offset); mean 0.0022 / 0.0027 / 0.0057, max 0.007 / 0.008 / 0.018 (gamma
    # 0.6, gamma 1.5, log): only the curvature between landmarks remains.
    assert difference.mean() < mean_tol and difference.max() < max_tol, (name, difference.mean(), difference.max())
    if name != "gain and offset":
        # A linear p1-p99 rescale keeps the whole distortion (measured mean 0.026-0.29).
        def linear(array: np.ndarray) -> np.ndarray:
            low, high = np.percentile(array[mask], (1.0, 99.0))
            return np.clip((array - low) / (high - low), 0.0, 1.0)

        linear_difference = np.abs(linear(changed) - linear(image))[mask]
        assert linear_difference.mean() > 5.0 * difference.mean(), (linear_difference.mean(), difference.mean())


def test_landmark_mask_keeps_a_wider_mask_from_shifting_the_landmarks() -> None:
    rng = np.random.default_rng(4)
    image, brain = _smooth_brain(rng)
    # A wider mask takes in a dark rim (CSF around the brain, as some skull strippers keep).
    wide = np.zeros_like(brain)
    wide[1:-1, 1:-1, 1:-1] = True
    with_rim = np.where(wide & ~brain, 5.0, image)
    plain = standardise(image, brain, REFERENCE)
    shifted = standardise(with_rim, wide, REFERENCE)
    anchored = standardise(with_rim, wide, REFERENCE, landmark_mask=brain)
    assert np.abs(shifted[brain] - plain[brain]).max() > 0.02  # the rim moves the landmarks
    np.testing.assert_allclose(anchored[brain], plain[brain], atol=1e-6)
    assert np.all(anchored[wide & ~brain] == 0.0)  # the rim itself lies below the first landmark
    with pytest.raises(ValueError, match="landmark_mask shape"):
        standardise(image, brain, REFERENCE, landmark_mask=brain[:-1])


def test_tied_landmarks_map_the_flat_stretch_to_the_middle_of_its_values() -> None:
    rng = np.random.default_rng(3)
    # 35 % below 5, 40 % exactly 5, 25 % above: p40, p50, p60 and p70 all equal 5.
    values = np.r_[rng.uniform(0.0, 5.0, 350), np.full(400, 5.0), rng.uniform(5.0 + 1e-3, 10.0, 250)]
    image = rng.permutation(values).reshape(10, 10, 10)
    mask = np.ones(image.shape, bool)
    landmarks = volume_landmarks(image, mask, PERCENTILES)
    assert np.all(landmarks[4:8] == 5.0) and landmarks[3] < 5.0 < landmarks[8]
    out = standardise(image, mask, REFERENCE)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[image == 5.0], 0.5 * (REFERENCE.values[4] + REFERENCE.values[7]), atol=1e-7)
    # Monotone in the intensity: sorting by intensity sorts the output.
    order = np.argsort(image, axis=None, kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= -1e-7)
    # Just below the tie the segment ends at values[4]; just above it starts at values[7].
    below = (image < 5.0) & (image > landmarks[3])
    above = (image > 5.0) & (image < landmarks[8])
    assert below.any() and above.any()
    assert REFERENCE.values[3] < out[below].max() <= REFERENCE.values[4] + 1e-6
    assert REFERENCE.values[7] - 1e-6 <= out[above].min() < REFERENCE.values[8]
    # The other landmarks are untied and still exact.
    for index in (0, 1, 2, 3, 8, 9, 10):
        hit = np.isclose(image, landmarks[index], rtol=0, atol=1e-12)
        if hit.any():
            assert out[hit][0] == pytest.approx(REFERENCE.values[index], abs=1e-6)


def test_tie_at_the_lowest_landmarks_and_a_constant_brain() -> None:
    rng = np.random.default_rng(4)
    values = np.r_[np.zeros(250), rng.uniform(1.0, 100.0, 750)]  # p1, p10 and p20 are 0
    image = rng.permutation(values).reshape(10, 10, 10)
    mask = np.ones(image.shape, bool)
    out = standardise(image, mask, REFERENCE)
    np.testing.assert_allclose(out[image == 0.0], 0.5 * (REFERENCE.values[0] + REFERENCE.values[2]), atol=1e-7)
    assert np.all(out[image > 0] > REFERENCE.values[2] - 1e-6)
    constant = np.full((6, 6, 6), 42.0)
    np.testing.assert_allclose(standardise(constant, np.ones(constant.shape, bool), REFERENCE), 0.5)


# --------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"percentiles": (1.0, 50.0, 50.0), "values": (0.0, 0.5, 1.0)}, "strictly increasing values in"),
        ({"percentiles": (1.0, 120.0), "values": (0.0, 1.0)}, "in \\[0, 100\\]"),
        ({"percentiles": (1.0, 50.0, 99.0), "values": (0.0, 0.7, 0.6)}, "values must be finite and strictly"),
        ({"percentiles": (1.0, 50.0, 99.0), "values": (0.0, 0.5)}, "2 values for 3 percentiles"),
        ({"percentiles": (1.0, 50.0, 99.0), "values": (0.1, 0.5, 1.0)}, "first value must be 0"),
        ({"percentiles": (1.0, 50.0, 99.0), "values": (0.0, 0.5, 0.9)}, "the last 1"),
        ({"percentiles": (1.0, 99.0), "values": (0.0, 1.0), "source": " "}, "source must say"),
        ({"percentiles": (1.0, 99.0), "values": (0.0, 1.0), "contrast": ""}, "need a contrast name"),
    ],
)
def test_reference_validation(kwargs, message) -> None:
    fields = {"contrast": "T1w", "source": "test", **kwargs}
    with pytest.raises(ValueError, match=message):
        ReferenceLandmarks(**fields)


def test_reference_dict_round_trip_and_unknown_keys() -> None:
    assert ReferenceLandmarks.from_dict(REFERENCE.to_dict()) == REFERENCE
    assert json.loads(json.dumps(REFERENCE.to_dict())) == REFERENCE.to_dict()
    with pytest.raises(ValueError, match="unknown keys \\['scale'\\]"):
        ReferenceLandmarks.from_dict({**REFERENCE.to_dict(), "scale": 1})
    with pytest.raises(ValueError, match="missing keys \\['source'\\]"):
        ReferenceLandmarks.from_dict({k: v for k, v in REFERENCE.to_dict().items() if k != "source"})


def test_volume_landmarks_and_standardise_validation() -> None:
    image = np.ones((4, 4, 4))
    with pytest.raises(ValueError, match="mask shape"):
        volume_landmarks(image, np.ones((4, 4, 3), bool), PERCENTILES)
    with pytest.raises(ValueError, match="the mask is empty"):
        volume_landmarks(image, np.zeros(image.shape, bool), PERCENTILES)
    with pytest.raises(ValueError, match="non-finite"):
        volume_landmarks(np.where(image > 0, np.nan, 0.0), np.ones(image.shape, bool), PERCENTILES)
    with pytest.raises(ValueError, match="strictly increasing"):
        volume_landmarks(image, np.ones(image.shape, bool), (50.0, 10.0))
    with pytest.raises(TypeError, match="ReferenceLandmarks"):
        standardise(image, np.ones(image.shape, bool), REFERENCE.to_dict())


def test_unknown_schema_and_wrong_percentiles_are_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "landmarks" / "reference_landmarks.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"schema": "codegraph3d.landmarks/0", "contrasts": {}}), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown landmarks schema 'codegraph3d.landmarks/0'"):
        load_reference_landmarks("T1w", tmp_path)
    path.write_text(json.dumps({"schema": SCHEMA, "contrasts": {"T1w": REFERENCE.to_dict()}}), encoding="utf-8")
    with pytest.raises(ValueError, match="the entry under 'T1w' is for contrast 'T2w'"):
        load_reference_landmarks("T1w", tmp_path)
    path.write_text(json.dumps({"schema": SCHEMA, "contrasts": {"T2w": REFERENCE.to_dict()}}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"computed at percentiles .* but preprocess.landmark_percentiles is \[2\.0"):
        load_reference_landmarks("T2w", tmp_path, percentiles=(2.0, 25.0, 50.0, 75.0, 98.0))
    # The shipped T1w reference is at the default percentiles: other ones need a recomputed one.
    with pytest.raises(ValueError, match="landmarks template MODEL_FOLDER --percentiles 2 50 98"):
        load_reference_landmarks("T1w", None, percentiles=(2.0, 50.0, 98.0))
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_reference_landmarks("T2w", tmp_path)


# --------------------------------------------------------------------------------------------
# training


def test_learn_reference_reproduces_a_known_reference() -> None:
    rng = np.random.default_rng(5)
    families = [lambda u: u, lambda u: u**3, lambda u: np.sqrt(u)]
    landmark_sets, normalised = [], []
    for family in families:
        shape = family(PERCENTILES / 100.0)
        normalised.append((shape - shape[0]) / (shape[-1] - shape[0]))
        for gain, offset in ((1.0, 0.0), (850.0, 37.0), (0.02, 5.0)):
            image, mask = _quantile_volume(lambda u, f=family, g=gain, o=offset: g * f(u) + o, rng)
            landmark_sets.append(volume_landmarks(image, mask, PERCENTILES))
    reference = learn_reference(landmark_sets, PERCENTILES, contrast="FLAIR", source="synthetic")
    np.testing.assert_allclose(reference.values, np.mean(normalised, axis=0), atol=1e-12)
    assert reference.values[0] == 0.0 and reference.values[-1] == 1.0
    assert reference.contrast == "FLAIR" and reference.source == "synthetic"
    # Every training scan of one family standardises onto that family's own normalised landmarks
    # only when it is the whole training set.
    single = learn_reference(landmark_sets[3:6], PERCENTILES, contrast="FLAIR", source="u^3")
    np.testing.assert_allclose(single.values, normalised[1], atol=1e-12)


def test_learn_reference_validation() -> None:
    good = np.linspace(10.0, 100.0, PERCENTILES.size)
    with pytest.raises(ValueError, match="at least one training scan"):
        learn_reference([], PERCENTILES, contrast="T2w", source="x")
    with pytest.raises(ValueError, match="training scan 1: expected 11 finite landmarks"):
        learn_reference([good, good[:5]], PERCENTILES, contrast="T2w", source="x")
    with pytest.raises(ValueError, match="training scan 0: landmarks must be non-decreasing"):
        learn_reference([good[::-1]], PERCENTILES, contrast="T2w", source="x")
    with pytest.raises(ValueError, match="p1 and p99 are equal"):
        learn_reference([np.full(PERCENTILES.size, 3.0)], PERCENTILES, contrast="T2w", source="x")
    tied = good.copy()
    tied[5] = tied[4]
    with pytest.raises(ValueError, match="tied landmarks \\(p40=p50\\)"):
        learn_reference([tied], PERCENTILES, contrast="T2w", source="x")


# --------------------------------------------------------------------------------------------
# template, files, load order


def test_template_command_is_deterministic_and_matches_the_shipped_file(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert codegraph3d_command(["landmarks", "template", str(first)]) == 0
    assert codegraph3d_command(["landmarks", "template", str(second)]) == 0
    assert first.read_bytes() == second.read_bytes()
    reference = read_landmarks_file(first)["T1w"]
    assert reference.percentiles == DEFAULT_PERCENTILES
    assert np.all(np.diff(reference.values) > 0)
    assert "MNI152" in reference.source and "nilearn" in reference.source
    # The packaged file is this command's output (regenerate it with the command, never by hand).
    assert read_landmarks_file(PACKAGE_LANDMARKS) == {"T1w": reference}
    # T1w on the template: WM (bright) fills the upper half of the brain histogram, so the
    # learnt reference is not the uniform one.
    assert not reference.is_uniform


def test_template_into_a_model_folder_merges_with_other_contrasts(tmp_path: Path) -> None:
    intensity.merge_landmarks_file(intensity.model_landmarks_path(tmp_path), REFERENCE)
    assert codegraph3d_command(["landmarks", "template", str(tmp_path)]) == 0
    stored = read_landmarks_file(tmp_path / "landmarks" / "reference_landmarks.json")
    assert set(stored) == {"T2w", "T1w"} and stored["T2w"] == REFERENCE
    assert not list((tmp_path / "landmarks").glob(".*partial"))


def test_load_order_model_folder_then_package_then_uniform(tmp_path: Path) -> None:
    package_t1w = load_reference_landmarks("T1w")
    assert "MNI152" in package_t1w.source
    # A model folder without a landmarks file, or without the contrast: the package's entry.
    assert load_reference_landmarks("T1w", tmp_path) == package_t1w
    intensity.merge_landmarks_file(intensity.model_landmarks_path(tmp_path), REFERENCE)
    assert load_reference_landmarks("T1w", tmp_path) == package_t1w
    # The model folder's entry beats the package.
    site_t1w = ReferenceLandmarks("T1w", DEFAULT_PERCENTILES, REFERENCE.values, "site T1w")
    intensity.merge_landmarks_file(intensity.model_landmarks_path(tmp_path), site_t1w)
    assert load_reference_landmarks("T1w", tmp_path) == site_t1w
    assert load_reference_landmarks("T2w", tmp_path) == REFERENCE
    # No entry anywhere: uniform, and the source says so and how to learn one.
    flair = load_reference_landmarks("FLAIR", tmp_path)
    assert flair.values == uniform_reference("FLAIR", DEFAULT_PERCENTILES).values and flair.is_uniform
    assert flair.source.startswith("uniform reference") and "no FLAIR landmarks" in flair.source
    assert "learn --contrast FLAIR" in flair.source
    custom = load_reference_landmarks("FLAIR", None, percentiles=(5.0, 50.0, 95.0))
    assert custom.percentiles == (5.0, 50.0, 95.0) and custom.values == (0.0, 0.5, 1.0)


# --------------------------------------------------------------------------------------------
# command line


def _ball_brain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 'brain' ball with a skewed histogram (values 200..1000) in a zero background."""
    shape = (20, 22, 24)
    zz, yy, xx = np.indices(shape)
    mask = ((zz - 9.5) / 8.5) ** 2 + ((yy - 10.5) / 9.5) ** 2 + ((xx - 11.5) / 10.5) ** 2 <= 1.0
    image = np.zeros(shape)
    image[mask] = 200.0 + 800.0 * rng.beta(2.0, 5.0, int(mask.sum()))
    return image, mask


def _write_nifti(path: Path, array_zyx: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)).astype(np.float32), np.eye(4)), path)
    return path


def test_cli_learn_show_round_trip(tmp_path: Path) -> None:
    from codegraph3d_research.synthetic import write_series

    rng = np.random.default_rng(6)
    base, mask = _ball_brain(rng)
    landmarks = volume_landmarks(base, mask, PERCENTILES)
    expected = (landmarks - landmarks[0]) / (landmarks[-1] - landmarks[0])
    data = tmp_path / "data"
    data.mkdir()
    inputs: list[str] = []
    for number, (gain, offset) in enumerate(((1.0, 0.0), (3.0, 100.0))):
        # Scanner background outside the brain is excluded by the given mask.
        scan = np.where(mask, gain * base + offset, 55.0)
        inputs += [str(_write_nifti(data / f"t2_{number}.nii.gz", scan)), "--mask",
                   str(_write_nifti(data / f"t2_{number}_mask.nii.gz", mask.astype(np.float32)))]
    inputs.append(str(_write_nifti(data / "t2_stripped.nii.gz", 2.0 * base)))  # intensity mask
    write_series(
        0.5 * base, np.zeros(3), np.ones(3), np.eye(3), data / "dicom_t2",
        patient_id="P1", patient_name="Test^Landmarks", study_uid="1.2.826.0.1.3680043.99.1",
        series_uid="1.2.826.0.1.3680043.99.1.1", series_description="T2 TSE AX", series_number=2,
        echo_time=90.0, repetition_time=5000.0, frame_of_reference_uid="1.2.826.0.1.3680043.99.1.0",
    )
    inputs.append(str(data / "dicom_t2"))
    models = tmp_path / "models"
    assert codegraph3d_command(["landmarks", "learn", "--contrast", "T2w", "--output", str(models), *inputs]) == 0
    learnt_file = models / "landmarks" / "reference_landmarks.json"
    payload = json.loads(learnt_file.read_text(encoding="utf-8"))
    assert payload["schema"] == SCHEMA and list(payload["contrasts"]) == ["T2w"]
    learnt = load_reference_landmarks("T2w", models)
    assert learnt.source.startswith("learnt from 4 normal T2w scan(s)")
    # Exact for the masked NIfTI scans; the intensity mask and 12-bit DICOM storage move it a little.
    # (measured: 4e-5).
    np.testing.assert_allclose(learnt.values, expected, atol=5e-4)
    # A second contrast merges into the same file.
    assert codegraph3d_command(["landmarks", "learn", "--contrast", "FLAIR", "--output", str(models), inputs[0], "--mask", inputs[2]]) == 0
    assert set(read_landmarks_file(learnt_file)) == {"T2w", "FLAIR"}
    # float32 NIfTI storage: exact up to single precision.
    np.testing.assert_allclose(load_reference_landmarks("FLAIR", models).values, expected, atol=1e-6)

    shown = subprocess.run(
        [sys.executable, "-m", "codegraph3d", "landmarks", "show", str(models)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    lines = shown.splitlines()
    assert any(line.startswith("T2w: learnt from 4 normal T2w scan(s)") for line in lines), shown
    assert any(line.startswith("T1w: MNI152 2009c T1 brain template") for line in lines), shown
    assert any(line.startswith("T1w-CE: uniform reference") for line in lines), shown


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--mask", "m.nii.gz"], "--mask must follow the NIfTI image"),
        (["missing.nii.gz"], "not a NIfTI file"),
        (["a.txt"], "not a NIfTI file"),
        ([], "at least one NIfTI image"),
    ],
)
def test_cli_learn_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments, message) -> None:
    code = codegraph3d_command(["landmarks", "learn", "--contrast", "T2w", "--output", str(tmp_path / "models"), *arguments])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "models" / "landmarks" / "reference_landmarks.json").exists()


def test_cli_learn_rejects_a_mismatched_mask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, mask = _ball_brain(np.random.default_rng(7))
    scan = _write_nifti(tmp_path / "scan.nii.gz", image)
    wrong = _write_nifti(tmp_path / "mask.nii.gz", mask[:-1].astype(np.float32))
    assert codegraph3d_command(["landmarks", "learn", "--contrast", "T2w", "--output", str(tmp_path), str(scan), "--mask", str(wrong)]) == 2
    assert "does not match" in capsys.readouterr().err
