"""Tokenisation: shapes, coordinates, masking, projection and patch-aligned pooling on 32^3 volumes."""

from __future__ import annotations

import numpy as np
import pytest

from codegraph3d.features.encoders import CombinedEncoder, IntensityEncoder, untrained_vit
from codegraph3d.features.tokens import EncodedVolume, TokenSet, encode_volume, parse_views, project, projection_matrix, tokenise

P, G = 4, 8
S = P * G


@pytest.fixture(scope="module")
def tiny_vit():
    return untrained_vit("tiny", seed=0, device="cpu")


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.random.default_rng(0).random((S, S, S), dtype=np.float32)


@pytest.fixture(scope="module")
def vit_full(tiny_vit, volume) -> TokenSet:
    """Every cube kept, every slice encoded, no projection (128 <= k)."""
    return tokenise(volume, np.ones_like(volume, dtype=bool), tiny_vit, grid_size=G,
                    projection_dim=128, batch_size=32)


def _rows(full: TokenSet, coords: np.ndarray) -> list[int]:
    """Rows of ``full`` (all cubes, C order) holding the given grid coordinates."""
    return [int(np.ravel_multi_index(tuple(c), full.grid_shape)) for c in coords]


def _sphere(radius: float) -> np.ndarray:
    z, y, x = np.mgrid[:S, :S, :S] - (S - 1) / 2
    return z**2 + y**2 + x**2 <= radius**2


def test_intensity_tokens_match_a_numpy_reference_on_all_three_axes(volume):
    enc = IntensityEncoder(patch_size=P, pooled=P)  # 4x4 pooled = every pixel of the patch
    full = np.ones_like(volume, dtype=bool)
    ts = tokenise(volume, full, enc, grid_size=G, projection_dim=128)
    assert ts.tokens[0].shape == (G**3, 3 * P * P)  # 16 <= 128: no projection
    for row, (bz, by, bx) in enumerate(ts.coords[[0, 77, 300, G**3 - 1]]):
        cube = volume[bz * P:(bz + 1) * P, by * P:(by + 1) * P, bx * P:(bx + 1) * P]
        token = ts.tokens[0][ts.coords.tolist().index([bz, by, bx])]
        # axial: mean over z of (y, x); coronal: over y of (z, x); sagittal: over x of (z, y)
        reference = np.concatenate([cube.mean(axis=a).reshape(-1) for a in (0, 1, 2)])
        np.testing.assert_allclose(token, reference, rtol=1e-5, atol=1e-6)


def test_bright_cube_lands_in_its_grid_cell_for_every_axis():
    image = np.zeros((S, S, S), dtype=np.float32)
    cell = (2, 5, 3)
    image[tuple(slice(c * P, (c + 1) * P) for c in cell)] = 1.0
    ts = tokenise(image, np.ones_like(image, dtype=bool), IntensityEncoder(P, pooled=2), grid_size=G)
    per_axis = ts.tokens[0].reshape(-1, 3, 4).mean(axis=2)  # (N, axis)
    for axis in range(3):
        grid = ts.to_grid(per_axis[:, axis])
        assert grid[cell] == pytest.approx(1.0)
        assert np.count_nonzero(grid) == 1, f"axis {axis} leaked the cube into other cells"


def test_masking_keeps_only_mostly_brain_cubes_in_c_order(volume):
    mask = _sphere(12.0)
    ts = tokenise(volume, mask, IntensityEncoder(P, pooled=2), grid_size=G, min_brain_fraction=0.9)
    fraction = mask.reshape(G, P, G, P, G, P).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(ts.brain_fraction, fraction)
    np.testing.assert_array_equal(ts.coords, np.argwhere(fraction >= 0.9))
    assert 0 < ts.n_tokens < G**3 and ts.coords.dtype == np.int64
    assert ((fraction > 0) & (fraction < 0.9)).any(), "the test sphere must have boundary cubes"
    assert ts.keep_mask.sum() == ts.n_tokens
    grid = ts.to_grid(np.arange(1, ts.n_tokens + 1, dtype=np.float32))
    assert grid[~ts.keep_mask].max() == 0 and grid.dtype == np.float32
    assert grid[tuple(ts.coords[5])] == 6


def test_empty_mask_is_rejected(volume):
    with pytest.raises(ValueError, match="empty brain mask"):
        tokenise(volume, np.zeros_like(volume, dtype=bool), IntensityEncoder(P), grid_size=G)
    tiny = _sphere(2.0)  # a few voxels: no cube reaches 90 %
    with pytest.raises(ValueError, match="empty brain mask"):
        tokenise(volume, tiny, IntensityEncoder(P), grid_size=G)


def test_vit_tokens_are_normalised_and_projected(tiny_vit, volume, vit_full):
    blocks = vit_full.tokens[1].reshape(-1, 3, 128)  # 128 <= k: unprojected
    np.testing.assert_allclose(np.linalg.norm(blocks, axis=2), 1.0, rtol=1e-5)

    mask = _sphere(14.0)
    projected = tokenise(volume, mask, tiny_vit, grid_size=G, projection_dim=16, batch_size=5)
    assert projected.layer_names == ["block1", "block2"]
    assert [t.shape for t in projected.tokens] == [(projected.n_tokens, 48)] * 2
    assert projected.tokens[0].dtype == np.float32
    rows = _rows(vit_full, projected.coords)
    for layer in range(2):
        unprojected = vit_full.tokens[layer][rows].reshape(-1, 3, 128)
        for axis in range(3):
            # the fixed per-axis matrix on the normalised tokens; batch size 5 vs 32 changes nothing
            expected = unprojected[:, axis] @ projection_matrix(128, 16, 0, axis)
            got = projected.tokens[layer][:, 16 * axis:16 * (axis + 1)]
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_projection_matrix_is_fixed():
    m = projection_matrix(64, 8, seed=0, axis=1)
    assert m.shape == (64, 8) and m.dtype == np.float32
    np.testing.assert_array_equal(m, projection_matrix(64, 8, seed=0, axis=1))
    assert not np.allclose(m, projection_matrix(64, 8, seed=0, axis=0))
    big = projection_matrix(256, 512, seed=0, axis=0)
    assert big.var() == pytest.approx(1 / 512, rel=0.05)


def test_skipped_slabs_do_not_change_kept_tokens(tiny_vit, volume, vit_full):
    corner = np.zeros_like(volume, dtype=bool)
    corner[:8, 8:16, 20:] = True  # only cubes (0..1, 2..3, 5..7) are brain
    part = tokenise(volume, corner, tiny_vit, grid_size=G, projection_dim=128)
    assert part.n_tokens == 2 * 2 * 3
    rows = _rows(vit_full, part.coords)
    for layer in range(2):
        np.testing.assert_allclose(part.tokens[layer], vit_full.tokens[layer][rows], rtol=1e-5, atol=1e-6)


def test_invalid_inputs_are_rejected(volume):
    enc = IntensityEncoder(P)
    mask = np.ones_like(volume, dtype=bool)
    with pytest.raises(ValueError, match=r"expected \(32, 32, 32\)"):
        tokenise(volume[:-1], mask[:-1], enc, grid_size=G)
    with pytest.raises(ValueError, match="grid_size 16"):
        tokenise(volume, mask, enc)  # default grid 16 needs 64^3 here
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tokenise(volume * 2, mask, enc, grid_size=G)
    with pytest.raises(ValueError, match="brain_mask must be boolean"):
        tokenise(volume, mask.astype(np.float32), enc, grid_size=G)
    with pytest.raises(ValueError, match="min_brain_fraction"):
        tokenise(volume, mask, enc, grid_size=G, min_brain_fraction=0)
    accepted = tokenise(volume, mask.astype(np.uint8), enc, grid_size=G)
    assert accepted.n_tokens == G**3
    with pytest.raises(ValueError, match="values must have shape"):
        accepted.to_grid(np.zeros(3))


def test_tokenset_validates_its_fields():
    with pytest.raises(ValueError, match="layer names"):
        TokenSet([np.zeros((1, 2))], np.zeros((1, 3), int), (2, 2, 2), [], np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="outside the grid"):
        TokenSet([np.zeros((1, 2))], np.full((1, 3), 2), (2, 2, 2), ["a"], np.zeros((2, 2, 2)))


def test_encode_then_project_is_tokenise(tiny_vit, volume):
    mask = _sphere(14.0)
    encoded = encode_volume(volume, mask, tiny_vit, grid_size=G, batch_size=32)
    assert encoded.features.shape == (2, 3, encoded.n_tokens, 128) and encoded.dim == 128
    fresh = tokenise(volume, mask, tiny_vit, grid_size=G, projection_dim=16, projection_seed=3, batch_size=32)
    projected = project(encoded, projection_dim=16, projection_seed=3)
    np.testing.assert_array_equal(projected.coords, fresh.coords)
    np.testing.assert_array_equal(projected.brain_fraction, fresh.brain_fraction)
    for got, expected in zip(projected.tokens, fresh.tokens):
        np.testing.assert_array_equal(got, expected)  # the same arithmetic, not merely close
    # features stay unprojected and normalised per axis
    np.testing.assert_allclose(np.linalg.norm(encoded.features, axis=3), 1.0, rtol=1e-5)


def test_views_and_layers_select_columns_and_layers(tiny_vit, volume):
    encoded = encode_volume(volume, _sphere(14.0), tiny_vit, grid_size=G, batch_size=32)
    full = project(encoded, projection_dim=16)
    axial_sagittal = project(encoded, projection_dim=16, views="S+A")
    assert axial_sagittal.tokens[0].shape[1] == 32
    for layer in range(2):  # each axis keeps its own matrix: a subset is a column subset
        expected = np.concatenate([full.tokens[layer][:, :16], full.tokens[layer][:, 32:]], axis=1)
        np.testing.assert_array_equal(axial_sagittal.tokens[layer], expected)
    assert parse_views("C+A") == parse_views(["axial", "coronal"]) == parse_views("AC") == ("axial", "coronal")
    second = project(encoded, projection_dim=16, views=("coronal",), layers=["block2"])
    assert second.layer_names == ["block2"]
    np.testing.assert_array_equal(second.tokens[0], full.tokens[1][:, 16:32])
    with pytest.raises(ValueError, match="unknown view 'X'"):
        project(encoded, views="A+X")
    with pytest.raises(ValueError, match="given twice"):
        parse_views("A+A")
    with pytest.raises(ValueError, match="subset of the encoded layers"):
        project(encoded, layers=["block7"])
    with pytest.raises(ValueError, match="projection seed"):
        project(encoded, projection_seed=-1)


def test_encoded_volume_validates_its_fields():
    features = np.zeros((1, 3, 2, 4), np.float32)
    coords = np.zeros((2, 3), np.int64)
    fraction = np.ones((2, 2, 2))
    EncodedVolume(features, coords, (2, 2, 2), ["a"], fraction)
    with pytest.raises(ValueError, match="float32"):
        EncodedVolume(features.astype(np.float64), coords, (2, 2, 2), ["a"], fraction)
    with pytest.raises(ValueError, match="2 layer names"):
        EncodedVolume(features, coords, (2, 2, 2), ["a", "b"], fraction)
    with pytest.raises(ValueError, match="coords must be an \\(2, 3\\)"):
        EncodedVolume(features, coords[:1], (2, 2, 2), ["a"], fraction)


class _UnitIntensity(IntensityEncoder):
    """The intensity layer under another name, asking for L2 normalisation (as a learnt encoder does)."""

    normalisation = "l2"

    def __init__(self) -> None:
        super().__init__(P, pooled=2)
        self.layer_names = ["unit"]


def test_a_combined_encoders_layers_keep_their_own_normalisation(volume: np.ndarray) -> None:
    # A learnt part's layers are L2-normalised; the intensity layer keeps its brightness.
    mask = _sphere(14.0)
    combined = CombinedEncoder("unit+intensity", [_UnitIntensity(), IntensityEncoder(P)])
    encoded = encode_volume(volume, mask, combined, grid_size=G, batch_size=32)
    plain = encode_volume(volume, mask, IntensityEncoder(P), grid_size=G, batch_size=32)
    assert encoded.features.shape[0] == 2 and encoded.layer_names == ["unit", "intensity"]
    np.testing.assert_allclose(np.linalg.norm(encoded.features[0], axis=2), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(encoded.features[1], plain.features[0])
    assert not np.allclose(np.linalg.norm(encoded.features[1], axis=2), 1.0)
