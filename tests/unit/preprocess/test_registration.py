"""Affine registration to the MNI152 brain template: a known misalignment is recovered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from codegraph3d.preprocess.chain import PreprocessConfig, preprocess_volume, resample_to_source
from codegraph3d.preprocess.registration import coarsen_to_spacing, install_template, load_template, register_affine
from codegraph3d.core.volume import Volume


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("models")
    install_template(folder)
    return load_template(folder)


def _misaligned_subject(template, angles_deg, shift_mm, spacing=(2.5, 2.5, 3.0)):
    """The template seen through a known rigid motion, on a coarse, anisotropic grid."""
    rotation = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    centre = template.centre_lps
    true = np.eye(4)  # template point -> subject point
    true[:3, :3] = rotation
    true[:3, 3] = centre + np.asarray(shift_mm) - rotation @ centre
    # Subject grid: axis-aligned in subject space, covering the moved brain.
    size = [int(200 / s) for s in spacing]
    origin = true[:3, :3] @ (centre - 100.0) + true[:3, 3]
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing(spacing)
    reference.SetOrigin(tuple(origin))
    reference.SetDirection(tuple(rotation.flatten()))
    inverse = np.linalg.inv(true)  # subject point -> template point, what Resample needs
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(inverse[:3, :3].flatten()))
    transform.SetTranslation(tuple(inverse[:3, 3]))
    image = sitk.Resample(template.image, reference, transform, sitk.sitkLinear, 0.0)
    return Volume.from_sitk(image, series_instance_uid="1.2.3"), true


def test_known_motion_is_recovered_within_2_mm(template):
    volume, true = _misaligned_subject(template, (6.0, -4.0, 8.0), (7.0, -5.0, 4.0))
    result = register_affine(volume.to_sitk(), template)
    z, y, x = np.nonzero(sitk.GetArrayFromImage(template.mask)[::8, ::8, ::8])
    points = np.stack([x * 8, y * 8, z * 8]).T.astype(float)
    physical = np.array([template.image.TransformContinuousIndexToPhysicalPoint(p) for p in points])
    homogeneous = np.c_[physical, np.ones(len(physical))].T
    error = np.linalg.norm((result.matrix @ homogeneous - true @ homogeneous)[:3], axis=0)
    assert error.mean() < 2.0 and error.max() < 4.0, (error.mean(), error.max(), result.qa)
    assert not result.doubtful, result.qa
    assert "stop_condition" in result.qa and result.qa["metric"] < -0.2


def test_registered_grid_round_trips_onto_the_source(template):
    volume, _ = _misaligned_subject(template, (3.0, 2.0, -5.0), (4.0, 3.0, -2.0))
    prepared = preprocess_volume(volume, PreprocessConfig(size=64, registration="affine"), template)
    assert prepared.qa["registration"]["stop_condition"]
    # A map linear in the source's physical position comes back exactly (linear interpolation).
    z, y, x = np.indices(prepared.brain_mask.shape)
    grid_index = np.stack([x.ravel(), y.ravel(), z.ravel(), np.ones(x.size)])
    source_physical = volume.index_to_physical @ prepared.grid_to_source @ grid_index
    grid_map = (np.array([0.2, -0.1, 0.3]) @ source_physical[:3]).reshape(prepared.brain_mask.shape)
    on_source = resample_to_source(grid_map.astype(np.float32), prepared)
    sz, sy, sx = np.indices(volume.array.shape)
    physical = volume.index_to_physical @ np.stack([sx.ravel(), sy.ravel(), sz.ravel(), np.ones(sx.size)])
    expected = (np.array([0.2, -0.1, 0.3]) @ physical[:3]).reshape(volume.array.shape)
    # Source voxels inside the working grid (the 156 mm crop cuts the brain's front and back).
    on_grid = np.linalg.inv(prepared.grid_to_source) @ np.stack([sx.ravel(), sy.ravel(), sz.ravel(), np.ones(sx.size)])
    inside = np.all((on_grid[:3] >= 0.5) & (on_grid[:3] <= prepared.size - 1.5), axis=0).reshape(volume.array.shape)
    assert inside.sum() > 1000
    np.testing.assert_allclose(on_source[inside], expected[inside], atol=1e-2)


def test_missing_template_names_the_install_command(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="codegraph3d template install"):
        load_template(tmp_path)
    with pytest.raises(ValueError, match="no template"):
        preprocess_volume(Volume(np.ones((30, 30, 30)), (0, 0, 0), (1, 1, 1), np.eye(3)), PreprocessConfig(size=16, registration="affine"))


def test_template_intersection_gives_every_volume_the_template_boundary(template):
    """A subject whose mask takes in a rim beyond the brain is scored within the template brain."""
    volume, _ = _misaligned_subject(template, (2.0, -3.0, 4.0), (3.0, -2.0, 1.0))
    brain = volume.array > 0.05 * np.percentile(volume.array[volume.array > 0], 99)
    # A 4 mm bright rim around the brain, as a stripper that keeps the CSF would leave.
    rim_voxels = 4.0 / np.asarray(volume.spacing)[::-1]
    distance = ndimage.distance_transform_edt(~brain, sampling=1.0 / rim_voxels)
    array = volume.array.copy()
    array[(distance > 0) & (distance <= 1.0)] = np.percentile(volume.array[brain], 99)
    rimmed = Volume(array, volume.origin, volume.spacing, volume.direction, series_instance_uid="1.2.3")

    def prepare(**changes):
        config = PreprocessConfig(size=64, registration="affine", mask_threshold=0.02, **changes)
        return preprocess_volume(rimmed, config, template)

    subject = prepare()
    within = prepare(analysis_mask="template_intersection")
    margin = prepare(analysis_mask="template_intersection", analysis_margin_mm=5.0)
    spacing = 156.0 / 64
    grid = sitk.Image([64] * 3, sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetOrigin(tuple(template.centre_lps - 78.0 + spacing / 2))
    template_grid = sitk.GetArrayFromImage(sitk.Resample(template.mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    assert not (within.brain_mask & ~template_grid).any()
    assert (subject.brain_mask & ~template_grid).sum() > 0.05 * subject.brain_mask.sum()
    assert within.brain_mask.sum() < margin.brain_mask.sum() < subject.brain_mask.sum()
    assert (within.image[~within.brain_mask] == 0).all()
    assert within.qa["analysis_mask"]["fraction_of_brain_kept"] < 0.95
    assert "analysis_mask" not in subject.qa
    # QA still describes the subject's own mask.
    assert within.brain_volume_ml == subject.brain_volume_ml


def test_analysis_mask_is_validated():
    with pytest.raises(ValueError, match="analysis_mask must be 'subject' or 'template_intersection'"):
        PreprocessConfig(analysis_mask="template")
    with pytest.raises(ValueError, match="analysis_margin_mm must be >= 0"):
        PreprocessConfig(analysis_margin_mm=-1.0)


def test_t1w_registration_is_carried_to_the_other_series_of_the_study(template):
    from codegraph3d.preprocess.chain import preprocess_study
    from codegraph3d.preprocess.skullstrip import intensity_brain_mask

    t1w, _ = _misaligned_subject(template, (4.0, -3.0, 5.0), (5.0, -4.0, 2.0))
    t1w.series_instance_uid = "1.2.1"
    # The same head, moved between the two acquisitions, seen with another contrast (inverted
    # brain intensities) on another grid.
    t2w_grid, t2w_true = _misaligned_subject(template, (7.0, -1.0, 2.0), (9.0, -1.0, 5.0), spacing=(2.0, 2.0, 4.0))
    brain = t2w_grid.array > 0.05 * np.percentile(t2w_grid.array[t2w_grid.array > 0], 99)
    array = np.where(brain, t2w_grid.array.max() * 1.1 - t2w_grid.array, 0.0).astype(np.float32)
    t2w = Volume(array, t2w_grid.origin, t2w_grid.spacing, t2w_grid.direction, series_instance_uid="1.2.2")

    def run(carry: bool):
        config = PreprocessConfig(size=32, registration="affine", skull_strip="deepbet", carry_t1w_registration=carry)
        return preprocess_study([(t2w, "T2w"), (t1w, "T1w")], config, template, stripper=lambda v: intensity_brain_mask(v, 0.02))

    carried_t2w, carried_t1w = run(True)
    own_t2w, _ = run(False)
    for result in (carried_t2w, carried_t1w, own_t2w):
        assert not isinstance(result, Exception), result
    assert carried_t2w.qa["registration"]["carried_from"]["series_instance_uid"] == "1.2.1"
    assert "carried_from" not in own_t2w.qa["registration"] and "carried_from" not in carried_t1w.qa["registration"]
    # The carried map follows the head's motion between the acquisitions: template points land
    # where the T2w series really shows them, not where the T1w series does.
    z, y, x = np.nonzero(sitk.GetArrayFromImage(template.mask)[::8, ::8, ::8])
    points = np.stack([x * 8, y * 8, z * 8]).T.astype(float)
    physical = np.array([template.image.TransformContinuousIndexToPhysicalPoint(p) for p in points])
    homogeneous = np.c_[physical, np.ones(len(physical))].T
    t1w_map = np.asarray(carried_t1w.qa["registration"]["template_to_subject"])
    t2w_map = np.asarray(carried_t2w.qa["registration"]["template_to_subject"])
    error = np.linalg.norm((t2w_map @ homogeneous - t2w_true @ homogeneous)[:3], axis=0)
    assert error.mean() < 2.0 and error.max() < 4.0, (error.mean(), error.max())
    assert np.linalg.norm((t1w_map @ homogeneous - t2w_true @ homogeneous)[:3], axis=0).mean() > 5.0


def test_moving_images_much_finer_than_the_template_are_block_averaged():
    """0.5 mm axes are halved against a 1 mm template; 0.6 mm and coarser axes are left alone."""
    fine = sitk.Image([40, 30, 20], sitk.sitkFloat32)
    fine.SetSpacing((0.5, 0.6, 0.45))
    fine.SetOrigin((10.0, -5.0, 3.0))
    fine = sitk.Add(fine, 2.0)
    shrunk, factors = coarsen_to_spacing(fine, (1.0, 1.0, 1.0))
    assert factors == [2, 1, 2]
    assert shrunk.GetSize() == (20, 30, 10) and shrunk.GetSpacing() == pytest.approx((1.0, 0.6, 0.9))
    # The physical extent is kept: the first block's centre sits between the first two voxels.
    assert shrunk.GetOrigin() == pytest.approx((10.25, -5.0, 3.225))
    assert sitk.GetArrayViewFromImage(shrunk) == pytest.approx(2.0)  # averaging, not summing
    usual = sitk.Image([8, 8, 8], sitk.sitkFloat32)
    usual.SetSpacing((0.9, 0.9, 1.2))
    same, factors = coarsen_to_spacing(usual, (1.0, 1.0, 1.0))
    assert same is usual and factors == [1, 1, 1]
