"""Skull stripping, N4 and mask carry on the MNI152 template seen through known geometries."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from codegraph3d.preprocess.registration import Template, nilearn_template
from codegraph3d.preprocess.skullstrip import (
    SKULL_STRIP_METHODS,
    DeepBetStripper,
    HDBetStripper,
    SkullStripError,
    carry_mask,
    hdbet_available,
    head_mask,
    intensity_brain_mask,
    make_stripper,
    n4_shrink_factors,
    n4_bias_correct,
    template_brain_mask,
)
from codegraph3d.core.volume import Volume

SAGITTAL = np.column_stack([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])  # x->P, y->I, z->L


def _rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / (a.sum() + b.sum()))


def _template_2mm() -> Template:
    """The MNI152 brain template at 2 mm (the registration target, smaller for speed)."""
    full = sitk.Cast(sitk.ReadImage(str(nilearn_template())), sitk.sitkFloat32)
    size = [round(n * s / 2.0) for n, s in zip(full.GetSize(), full.GetSpacing())]
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing((2.0, 2.0, 2.0))
    reference.SetDirection(full.GetDirection())
    reference.SetOrigin(full.TransformContinuousIndexToPhysicalPoint([0.5, 0.5, 0.5]))
    image = sitk.Resample(full, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    array = sitk.GetArrayFromImage(image)
    mask = sitk.GetImageFromArray((array > 0.2 * array.max()).astype(np.uint8))
    mask.CopyInformation(image)
    z, y, x = np.nonzero(array > 0.2 * array.max())
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([float(x.mean()), float(y.mean()), float(z.mean())]))
    return Template(image=image, mask=mask, centre_lps=centre, path=nilearn_template())


def _synthetic_head(template: Template) -> tuple[sitk.Image, sitk.Image]:
    """The template brain inside a synthetic head: dark CSF/skull ring, bright scalp, noisy air."""
    brain = sitk.GetArrayFromImage(template.image)
    mask = sitk.GetArrayFromImage(template.mask).astype(bool)
    outside_mm = ndimage.distance_transform_edt(~mask, sampling=2.0)
    peak = float(brain.max())
    head_array = brain.copy()
    head_array[(outside_mm > 0) & (outside_mm <= 6)] = 0.08 * peak
    head_array[(outside_mm > 6) & (outside_mm <= 12)] = 0.75 * peak
    # A larger field of view than the template's, so the scalp is not cut by the border.
    padded = np.pad(head_array, 8)
    image = sitk.GetImageFromArray(padded.astype(np.float32))
    image.SetSpacing(template.image.GetSpacing())
    image.SetDirection(template.image.GetDirection())
    image.SetOrigin(template.image.TransformIndexToPhysicalPoint([-8, -8, -8]))
    truth = sitk.GetImageFromArray(np.pad(mask, 8).astype(np.uint8))
    truth.CopyInformation(image)
    return image, truth


@pytest.fixture(scope="module")
def template() -> Template:
    return _template_2mm()


@pytest.fixture(scope="module")
def head(template: Template) -> tuple[sitk.Image, sitk.Image]:
    return _synthetic_head(template)


def _acquire(
    image: sitk.Image,
    truth: sitk.Image,
    centre: np.ndarray,
    direction: np.ndarray,
    spacing: tuple[float, float, float],
    extent_mm: tuple[float, float, float],
    *,
    motion: np.ndarray | None = None,
    seed: int = 0,
    uid: str = "1.2.826.0.1.3680043.9.7.1",
) -> tuple[Volume, np.ndarray]:
    """Sample ``image`` (and its truth mask) on a new grid; ``motion`` maps grid points to image points."""
    size = [int(np.ceil(e / s)) for e, s in zip(extent_mm, spacing)]
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing(tuple(float(s) for s in spacing))
    reference.SetDirection(tuple(np.asarray(direction, float).flatten()))
    reference.SetOrigin(tuple(centre - direction @ (np.array(spacing) * (np.array(size) - 1) / 2.0)))
    transform = sitk.Transform() if motion is None else sitk.AffineTransform(3)
    if motion is not None:
        transform.SetMatrix(tuple(motion[:3, :3].flatten()))
        transform.SetTranslation(tuple(motion[:3, 3]))
    sampled = sitk.GetArrayFromImage(sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    mask = sitk.GetArrayFromImage(sitk.Resample(truth, reference, transform, sitk.sitkNearestNeighbor, 0)).astype(bool)
    rng = np.random.default_rng(seed)
    noisy = sampled + 0.02 * float(sampled.max()) * np.abs(rng.standard_normal(sampled.shape))
    volume = Volume(
        array=noisy,
        origin=np.array(reference.GetOrigin()),
        spacing=np.array(spacing, float),
        direction=np.asarray(direction, float),
        series_instance_uid=uid,
    )
    return volume, mask


@pytest.fixture(scope="module")
def stripper() -> DeepBetStripper:
    return DeepBetStripper(device="cpu", num_threads=2)


def test_deepbet_oblique_anisotropic_sagittal_series(stripper, head, template):
    image, truth = head
    direction = _rotation((18.0, -10.0, 22.0)) @ SAGITTAL
    volume, expected = _acquire(image, truth, template.centre_lps, direction, (1.6, 1.6, 4.0), (230, 210, 200))
    assert stripper.needs_resampling(volume)
    result = stripper(volume)
    assert result.method == "deepbet" and result.qa["mode"] == "resampled"
    assert result.mask.shape == volume.array.shape and result.mask.dtype == bool
    assert _dice(result.mask, expected) >= 0.9
    assert result.qa["seconds"] > 0 and result.qa["brain_volume_ml"] > 0


def test_deepbet_masks_follow_flips_and_permutations(stripper, head, template):
    image, truth = head
    canonical, expected = _acquire(image, truth, template.centre_lps, np.eye(3), (2.0, 2.0, 3.0), (190, 220, 190))
    # Flipping and permuting index axes changes no physical position: the same voxels, relabelled.
    moved = sitk.PermuteAxes(sitk.Flip(canonical.to_sitk(), [True, False, True]), [2, 0, 1])
    permuted = Volume.from_sitk(moved, series_instance_uid=canonical.series_instance_uid)
    assert not np.allclose(permuted.direction, np.eye(3))
    first, second = stripper(canonical), stripper(permuted)
    assert first.qa["mode"] == second.qa["mode"] == "reoriented"
    back = sitk.GetImageFromArray(second.mask.astype(np.uint8))
    back.CopyInformation(moved)
    back = sitk.Resample(back, canonical.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    assert np.array_equal(sitk.GetArrayFromImage(back).astype(bool), first.mask)
    assert _dice(first.mask, expected) >= 0.9


def test_deepbet_blank_series_names_the_series(stripper):
    blank = Volume(array=np.zeros((20, 40, 40)), origin=np.zeros(3), spacing=np.ones(3), direction=np.eye(3),
                   series_instance_uid="1.2.3.blank")
    with pytest.raises(SkullStripError, match=r"1\.2\.3\.blank"):
        stripper(blank)


def _bias_phantom(spacing: tuple[float, float, float], shape_zyx: tuple[int, int, int]) -> tuple[Volume, np.ndarray, np.ndarray]:
    """A uniform ellipsoid (value 100, 1 % noise) under a smooth multiplicative field of about +-35 %."""
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape_zyx, spacing[::-1])], indexing="ij")
    inside = (x / 70.0) ** 2 + (y / 85.0) ** 2 + (z / 60.0) ** 2 <= 1.0
    rng = np.random.default_rng(3)
    clean = np.where(inside, 100.0, 0.0) * (1.0 + 0.01 * rng.standard_normal(shape_zyx)) + 0.5 * np.abs(rng.standard_normal(shape_zyx))
    field = np.exp(0.3 * x / 70.0 - 0.2 * (y / 85.0) ** 2 + 0.15 * z / 60.0)
    volume = Volume(array=clean * field, origin=np.array([-80.0, -90.0, -65.0]), spacing=np.array(spacing),
                    direction=_rotation((0.0, 0.0, 10.0)), series_instance_uid="1.2.3.n4")
    core = ndimage.binary_erosion(inside, iterations=3)
    return volume, core, field


def test_n4_removes_a_smooth_multiplicative_field_and_keeps_geometry():
    volume, core, _ = _bias_phantom((1.5, 1.5, 4.0), (34, 120, 100))
    corrected, qa = n4_bias_correct(volume, shrink_factor=4, iterations=(50, 50, 30))
    before = volume.array[core]
    after = corrected.array[core]
    cv_before, cv_after = before.std() / before.mean(), after.std() / after.mean()
    assert cv_before > 0.1
    assert cv_after < cv_before / 4.0, (cv_before, cv_after)
    # In-plane 1.5 mm -> 6 mm; the 4 mm slices only by 2 (8 mm, 17 slices left).
    assert qa["shrink_factors"] == [4, 4, 2]
    # A 512 x 512 x 30 matrix would keep 491k voxels at 2 x 2 x 5 mm; the fit is capped near 200k.
    assert n4_shrink_factors(np.array([0.5, 0.5, 5.0]), (512, 512, 30), 4) == [8, 8, 1]
    assert n4_shrink_factors(np.array([1.0, 1.0, 1.0]), (256, 256, 40), 4) == [4, 4, 2]
    assert qa["field_max"] / qa["field_min"] > 1.5
    assert corrected.array.dtype == np.float32 and corrected.array.shape == volume.array.shape
    for name in ("origin", "spacing", "direction"):
        assert np.array_equal(getattr(corrected, name), getattr(volume, name))
    assert corrected.series_instance_uid == volume.series_instance_uid
    assert corrected is not volume and np.array_equal(volume.array, _bias_phantom((1.5, 1.5, 4.0), (34, 120, 100))[0].array)


def test_head_mask_fills_the_dark_ring_and_ignores_noise(head, template):
    image, truth = head
    volume, brain = _acquire(image, truth, template.centre_lps, np.eye(3), (2.0, 2.0, 2.0), (200, 230, 200))
    mask = head_mask(volume)
    # The brain and the dark ring around it are inside the head (but a few brainstem voxels, where
    # the synthetic head is open below the foramen magnum).
    assert mask[brain].mean() > 0.999
    assert mask.sum() < 0.6 * mask.size  # the air is not
    assert np.array_equal(head_mask(volume.to_sitk()), mask)
    # A field of view that cuts through the head at the top and bottom leaves no hole behind.
    cut, cut_brain = _acquire(image, truth, template.centre_lps, np.eye(3), (2.0, 2.0, 2.0), (200, 230, 100))
    assert cut_brain[0].any() and cut_brain[-1].any()
    assert head_mask(cut)[cut_brain].mean() > 0.999


def _motion(angles_deg: tuple[float, float, float], shift_mm: tuple[float, float, float], centre: np.ndarray) -> np.ndarray:
    """Rigid map about ``centre``: new-series point -> reference point."""
    matrix = np.eye(4)
    matrix[:3, :3] = _rotation(angles_deg)
    matrix[:3, 3] = centre + np.array(shift_mm) - matrix[:3, :3] @ centre
    return matrix


def test_carry_mask_recovers_motion_between_differently_oriented_series(head, template):
    image, truth = head
    centre = template.centre_lps
    source, source_mask = _acquire(image, truth, centre, np.eye(3), (2.0, 2.0, 2.5), (200, 230, 190), seed=1)
    # A T2-like contrast: brain inverted, scalp dark, on a coronal grid after a head motion.
    t2_like = sitk.GetArrayFromImage(image)
    peak = float(t2_like.max())
    t2_like = np.where(sitk.GetArrayFromImage(truth) > 0, 1.1 * peak - t2_like, 0.3 * t2_like)
    t2_image = sitk.GetImageFromArray(t2_like.astype(np.float32))
    t2_image.CopyInformation(image)
    coronal = np.column_stack([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    motion = _motion((4.0, -3.0, 5.0), (4.0, -3.0, 2.0), centre)
    target, expected = _acquire(t2_image, truth, centre, coronal, (1.8, 1.8, 3.5), (210, 200, 240), motion=motion, seed=2)
    carried, qa = carry_mask(source, source_mask, target)
    assert carried.shape == target.array.shape
    assert _dice(carried, expected) >= 0.9
    assert not qa["doubtful"], qa
    # target -> source recovered within 1.5 mm over the brain.
    recovered = np.array(qa["target_to_source"])
    z, y, x = np.nonzero(expected[::3, ::3, ::3])
    points = target.index_to_physical @ np.stack([3 * x, 3 * y, 3 * z, np.ones(x.size)])
    error = np.linalg.norm((recovered @ points)[:3] - (motion @ points)[:3], axis=0)
    assert error.max() < 1.5, error.max()
    identity = np.mean(np.linalg.norm((motion @ points)[:3] - points[:3], axis=0))
    assert identity > 4.0  # the motion is real: without registration the mask would be off


def test_template_brain_mask_recovers_the_mask_under_a_known_affine(head, template):
    image, truth = head
    centre = template.centre_lps
    affine = _motion((6.0, -4.0, 8.0), (6.0, -5.0, 4.0), centre)
    affine[:3, :3] = affine[:3, :3] @ np.diag([1.05, 0.97, 1.02])
    affine[:3, 3] = centre + np.array([6.0, -5.0, 4.0]) - affine[:3, :3] @ centre
    volume, expected = _acquire(image, truth, centre, SAGITTAL, (2.0, 2.0, 3.0), (240, 220, 200), motion=affine)
    result = template_brain_mask(volume, template)
    assert result.method == "template"
    assert _dice(result.mask, expected) >= 0.9, _dice(result.mask, expected)
    assert "registration" in result.qa and not result.qa["registration"]["doubtful"]


def test_intensity_mask_for_already_stripped_input(head, template):
    volume, expected = _acquire(template.image, template.mask, template.centre_lps, np.eye(3), (2.0, 2.0, 2.0),
                                (180, 220, 180))
    volume.array[~expected] = 0.0
    result = make_stripper("none")(volume)
    assert result.method == "intensity"
    assert _dice(result.mask, expected) >= 0.95
    blank = Volume(array=np.zeros((4, 5, 6)), origin=np.zeros(3), spacing=np.ones(3), direction=np.eye(3),
                   series_instance_uid="9.9.blank")
    with pytest.raises(SkullStripError, match=r"9\.9\.blank"):
        intensity_brain_mask(blank)


def test_make_stripper_validates_its_arguments(tmp_path: Path):
    assert SKULL_STRIP_METHODS == ("deepbet", "template", "none", "hd-bet")
    with pytest.raises(ValueError, match="unknown skull stripping method 'bet2'.*deepbet, template, none, hd-bet"):
        make_stripper("bet2")
    with pytest.raises(SkullStripError, match="needs the registration template.*template install"):
        make_stripper("template")
    with pytest.raises(ValueError, match="takes no option"):
        make_stripper("deepbet", iterations=3)
    with pytest.raises(ValueError, match="threshold must be in"):
        make_stripper("deepbet", threshold=1.5)
    with pytest.raises(SkullStripError, match="not a torch device"):
        make_stripper("deepbet", device="tpu-ish")
    if not importlib.util.find_spec("torch") or not __import__("torch").cuda.is_available():
        with pytest.raises(SkullStripError, match="no CUDA device.*'cpu'"):
            make_stripper("deepbet", device="cuda")


def test_missing_hdbet_gives_the_install_instructions(tmp_path: Path):
    installed = importlib.util.find_spec("HD_BET") is not None and importlib.util.find_spec("nnunetv2") is not None
    # Weights alone are not enough when the package is missing, and the reverse.
    weights = tmp_path / "hd-bet"
    assert not hdbet_available(tmp_path)
    assert not hdbet_available(None)
    message = (r"'hd-bet' needs HD_BET, nnunetv2, which are not installed \(and its weights are missing.*"
               r"pip install hd-bet.*deepbet" if not installed else r"'hd-bet' is not available: its weights are missing")
    with pytest.raises(SkullStripError, match=message):
        make_stripper("hd-bet", model_path=tmp_path)
    (weights / "fold_all").mkdir(parents=True)
    for name in ("dataset.json", "plans.json", "fold_all/checkpoint_final.pth"):
        (weights / name).write_text("{}", encoding="utf-8")
    assert hdbet_available(tmp_path) == installed
    if not installed:
        with pytest.raises(SkullStripError, match="HD_BET.*not installed"):
            HDBetStripper(tmp_path)
