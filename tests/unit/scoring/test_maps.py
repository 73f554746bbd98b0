"""Token maps to voxel maps (codegraph3d.scoring.maps): masked interpolation over kept tokens."""

from __future__ import annotations

import numpy as np
import pytest

from codegraph3d.scoring.maps import kept_token_grid, token_voxel_map, upsample_token_map

SIZE, GRID = 112, 8  # 14-voxel tokens, as on the product's grid


def _ellipsoid_brain() -> tuple[np.ndarray, np.ndarray]:
    """A brain phantom and the tokens kept at >= 90 % brain, as the product keeps them."""
    z, y, x = np.mgrid[:SIZE, :SIZE, :SIZE]
    centre = (SIZE - 1) / 2
    brain = ((z - centre) / 50) ** 2 + ((y - centre) / 42) ** 2 + ((x - centre) / 36) ** 2 <= 1
    patch = SIZE // GRID
    fraction = brain.reshape(GRID, patch, GRID, patch, GRID, patch).mean(axis=(1, 3, 5))
    return brain, np.argwhere(fraction >= 0.9)


def test_masked_interpolation_keeps_the_rim_at_the_tokens_value():
    brain, coords = _ellipsoid_brain()
    ones = np.ones(len(coords))
    zero = token_voxel_map(ones, coords, (GRID,) * 3, SIZE, brain, "zero")[brain]
    masked = token_voxel_map(ones, coords, (GRID,) * 3, SIZE, brain, "masked")[brain]
    # Dropped rim tokens pull the first version's map down near the surface ...
    assert (zero < 0.5).mean() > 0.1
    # ... the masked map takes every brain voxel's value from kept tokens only.
    np.testing.assert_allclose(masked, 1.0, rtol=1e-6)


def test_masked_interpolation_is_a_weighted_mean_of_kept_tokens():
    brain, coords = _ellipsoid_brain()
    rng = np.random.default_rng(0)
    values = rng.uniform(2.0, 5.0, len(coords))
    masked = token_voxel_map(values, coords, (GRID,) * 3, SIZE, brain, "masked")
    inside = masked[brain]
    assert inside.min() >= values.min() - 1e-5 and inside.max() <= values.max() + 1e-5
    assert (masked[~brain] == 0).all()
    # Where every token in reach was kept, masked and plain trilinear interpolation agree.
    zero = token_voxel_map(values, coords, (GRID,) * 3, SIZE, brain, "zero")
    deep = brain & (zero > 0)
    kept = kept_token_grid(coords, (GRID,) * 3)
    interior = np.repeat(np.repeat(np.repeat(kept, 14, 0), 14, 1), 14, 2)
    for axis in range(3):
        for shift in (-7, 7):
            interior &= np.roll(interior, shift, axis)
    assert interior.sum() > 1000
    np.testing.assert_allclose(masked[interior & deep], zero[interior & deep], rtol=1e-5)


def test_no_kept_token_gives_zeros_and_bad_inputs_are_refused():
    empty = np.zeros((GRID,) * 3, np.float32)
    assert upsample_token_map(empty, SIZE, kept=np.zeros((GRID,) * 3, bool)).max() == 0
    with pytest.raises(ValueError, match="interpolation must be one of"):
        token_voxel_map(np.ones(1), np.zeros((1, 3), int), (GRID,) * 3, SIZE, interpolation="cubic")
    with pytest.raises(ValueError, match="not a multiple"):
        upsample_token_map(empty, SIZE + 1)
    with pytest.raises(ValueError, match="does not match the token map"):
        upsample_token_map(empty, SIZE, kept=np.ones((4, 4, 4), bool))
    assert kept_token_grid(np.array([[1, 2, 3]]), (GRID,) * 3).sum() == 1


def test_specks_smaller_than_the_minimum_are_dropped():
    from types import SimpleNamespace

    from codegraph3d.run.pipeline import drop_small_components

    prepared = SimpleNamespace(source_spacing=np.array([1.0, 1.0, 2.0]))  # 2 microlitres a voxel
    mask = np.zeros((20, 20, 20), bool)
    mask[2:7, 2:7, 2:7] = True  # 125 voxels = 0.25 ml
    mask[15, 15, 15] = True  # 0.002 ml
    mask[15:17, 2, 2] = True  # 0.004 ml
    kept = drop_small_components(mask, prepared, 0.1)
    assert kept.sum() == 125 and kept[2:7, 2:7, 2:7].all()
    assert drop_small_components(mask, prepared, 0.0) is mask
    assert not drop_small_components(mask, prepared, 1.0).any()
