"""Preprocessing and the way back: geometry round trips on an oblique, anisotropic series."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from codegraph3d.scoring.maps import token_grid_map, upsample_token_map
from codegraph3d.preprocess.chain import (
    PreprocessConfig,
    preprocess_volume,
    resample_to_source,
)
from codegraph3d.preprocess.skullstrip import brain_mask_from_intensity
from codegraph3d.core.volume import Volume


def _oblique_brain(shape_zyx=(30, 40, 36), spacing=(1.1, 0.9, 2.5)) -> Volume:
    """An ellipsoidal 'brain' in a sagittally acquired, oblique, anisotropic series."""
    direction = Rotation.from_euler("xyz", [12, -7, 20], degrees=True).as_matrix()
    # Sagittal acquisition: slices step along L-R, rows along S-I.
    sagittal = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float).T
    direction = direction @ sagittal
    volume = Volume(np.zeros(shape_zyx), origin=(-20.0, 15.0, 30.0), spacing=spacing, direction=direction)
    z, y, x = np.indices(shape_zyx)
    points = volume.index_to_physical @ np.stack([x.ravel(), y.ravel(), z.ravel(), np.ones(x.size)])
    centre = volume.index_to_physical @ np.array([shape_zyx[2] / 2, shape_zyx[1] / 2, shape_zyx[0] / 2, 1])
    offset = (points[:3].T - centre[:3]) / np.array([14.0, 16.0, 13.0])
    inside = (offset**2).sum(axis=1) < 1.0
    volume.array = np.where(inside, 100.0 + 20.0 * np.sin(points[0] / 3.0), 0.0).reshape(shape_zyx).astype(np.float32)
    return volume


def test_points_round_trip_below_half_a_voxel():
    volume = _oblique_brain()
    prepared = preprocess_volume(volume, PreprocessConfig(size=32))
    rng = np.random.default_rng(0)
    source_points = np.c_[rng.uniform(0, 35, 20), rng.uniform(0, 39, 20), rng.uniform(0, 29, 20), np.ones(20)]
    grid_points = np.linalg.inv(prepared.grid_to_source) @ source_points.T
    back = prepared.grid_to_source @ grid_points
    np.testing.assert_allclose(back.T, source_points, atol=1e-9)
    # The same physical point through both geometries.
    physical_from_source = volume.index_to_physical @ source_points.T
    physical_from_grid = prepared.grid_index_to_physical @ grid_points
    np.testing.assert_allclose(physical_from_grid, physical_from_source, atol=1e-6)


def test_linear_map_lands_on_the_right_source_voxels():
    volume = _oblique_brain()
    prepared = preprocess_volume(volume, PreprocessConfig(size=32))
    # A map linear in LPS position: linear interpolation reproduces it exactly inside the grid.
    z, y, x = np.indices(prepared.image.shape)
    grid_index = np.stack([x.ravel(), y.ravel(), z.ravel(), np.ones(x.size)])
    physical = prepared.grid_index_to_physical @ grid_index
    coefficients = np.array([0.3, -0.2, 0.5])
    grid_map = (coefficients @ physical[:3]).reshape(prepared.image.shape).astype(np.float32)
    on_source = resample_to_source(grid_map, prepared)
    sz, sy, sx = np.indices(volume.array.shape)
    source_physical = volume.index_to_physical @ np.stack([sx.ravel(), sy.ravel(), sz.ravel(), np.ones(sx.size)])
    expected = (coefficients @ source_physical[:3]).reshape(volume.array.shape)
    brain = volume.array > 0
    np.testing.assert_allclose(on_source[brain], expected[brain], atol=1e-3)


def test_painted_block_maps_back_to_its_source_voxels():
    volume = _oblique_brain()
    prepared = preprocess_volume(volume, PreprocessConfig(size=32))
    labels = np.zeros(prepared.image.shape, np.float32)
    labels[12:20, 10:18, 14:22] = 1.0
    on_source = resample_to_source(labels, prepared, order=0) > 0.5
    sz, sy, sx = np.nonzero(on_source)
    grid_index = np.linalg.inv(prepared.grid_to_source) @ np.stack([sx, sy, sz, np.ones(sx.size)])
    rounded = np.rint(grid_index[:3])
    assert on_source.sum() > 50
    assert rounded[0].min() >= 14 and rounded[0].max() <= 21  # x
    assert rounded[1].min() >= 10 and rounded[1].max() <= 17  # y
    assert rounded[2].min() >= 12 and rounded[2].max() <= 19  # z


def test_output_is_scaled_and_background_zero():
    prepared = preprocess_volume(_oblique_brain(), PreprocessConfig(size=32))
    assert prepared.image.shape == (32, 32, 32)
    assert prepared.image.min() >= 0.0 and prepared.image.max() <= 1.0
    assert np.all(prepared.image[~prepared.brain_mask] == 0.0)
    assert 0.2 < prepared.brain_mask.mean() < 0.7
    assert prepared.brain_volume_ml == pytest.approx(4 / 3 * np.pi * 14 * 16 * 13 / 1000, rel=0.15)


def test_empty_series_raises_clear_error():
    volume = _oblique_brain()
    volume.array[:] = 0
    volume.series_instance_uid = "1.2.3"
    # The skull-stripping stage finds no brain and names the series (a ValueError: skipped, not a crash).
    with pytest.raises(ValueError, match="1.2.3.*blank"):
        preprocess_volume(volume, PreprocessConfig(size=32))


def test_mask_fills_dark_interior():
    array = np.zeros((20, 20, 20), np.float32)
    array[4:16, 4:16, 4:16] = 100.0
    array[8:12, 8:12, 8:12] = 0.0  # a dark 'ventricle'
    assert brain_mask_from_intensity(array, 0.05)[10, 10, 10]


def test_upsampling_places_token_values_at_cube_centres():
    token_map = token_grid_map(np.array([2.0]), np.array([[2, 2, 2]]), (5, 5, 5))
    upsampled = upsample_token_map(token_map, 20)
    # Token 2 covers voxels 8..11: its centre 9.5 lies midway between voxels 9 and 10.
    assert upsampled[9, 9, 9] == pytest.approx(upsampled[10, 10, 10])
    assert upsampled[9, 9, 9] == pytest.approx(2.0 * 0.875**3)
    assert upsampled[9, 9, 9] == upsampled.max()
    assert upsample_token_map(token_map, 20, np.zeros((20, 20, 20), bool)).max() == 0.0


def test_landmark_scaling_removes_gain_and_offset():
    from codegraph3d.preprocess.chain import scale_intensities

    rng = np.random.default_rng(0)
    image = rng.gamma(4.0, 1.0, size=(16, 16, 16)).astype(np.float32)
    brain = np.ones(image.shape, bool)
    brain[:2] = False
    config = PreprocessConfig(size=16)
    a = scale_intensities(image, brain, config)
    b = scale_intensities(3.0 * image + 50.0, brain, config)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert a[~brain].max() == 0.0 and 0.0 <= a.min() and a.max() <= 1.0
    # Each decile of the brain lands on its reference value.
    assert np.median(a[brain]) == pytest.approx(0.5, abs=0.02)


def test_resolution_harmonisation_blurs_only_the_fine_axes():
    import SimpleITK as sitk

    from codegraph3d.preprocess.chain import harmonise_resolution

    array = np.zeros((20, 20, 20), np.float32)
    array[10, 10, 10] = 1.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 3.0))
    smoothed = sitk.GetArrayFromImage(harmonise_resolution(image, 3.0))
    # In-plane (x, y: 1 mm) the impulse spreads; along z (already 3 mm) it does not.
    assert smoothed[10, 10, 11] > 0.01 and smoothed[10, 11, 10] > 0.01
    assert smoothed[11, 10, 10] < 1e-6
    with pytest.raises(ValueError, match="resolution_fwhm_mm"):
        PreprocessConfig(resolution_fwhm_mm=-1.0)
    with pytest.raises(ValueError, match="landmark_percentiles"):
        PreprocessConfig(landmark_percentiles=(50.0, 10.0))
