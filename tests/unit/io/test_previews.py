"""Preview PNGs of a flagged series: layout, outline placement, plane choice, validation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from codegraph3d.io.previews import (
    MAX_PANEL_PX,
    OUTLINE_RGB,
    PreviewPlanes,
    panel_boxes,
    preview_planes,
    write_preview,
)

SHAPE = (40, 50, 60)
SPACING = (2.0, 1.0, 0.8)  # anisotropic, so every panel is resampled by a non-integer factor
CUBE = (slice(10, 20), slice(15, 27), slice(30, 42))  # z, y, x


def _volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.uniform(100.0, 200.0, SHAPE).astype(np.float32)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[CUBE] = True
    return image, mask


def _displayed_rows(source: range, n: int, n_out: int, *, flipped: bool) -> tuple[int, int]:
    """First and last display pixel whose nearest source index (documented rule) is in ``source``."""
    index = ((2 * np.arange(n_out) + 1) * n) // (2 * n_out)
    if flipped:
        index = n - 1 - index
    hits = np.flatnonzero((index >= source.start) & (index < source.stop))
    return int(hits[0]), int(hits[-1])


def _red(png: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    return np.all(png[top:bottom, left:right] == OUTLINE_RGB, axis=2)


def test_png_is_written_whole_with_three_panels(tmp_path):
    image, mask = _volume()
    target = write_preview(tmp_path / "finding.png", image, mask, SPACING, title="T2w  finding 1 of 1  1.9 ml")
    assert target == tmp_path / "finding.png"
    with Image.open(target) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        width, height = png.size
    planes = preview_planes(image, mask, SPACING)
    panel_widths = sum(p.display_shape[1] for p in planes.planes)
    assert width >= panel_widths
    assert height >= max(p.display_shape[0] for p in planes.planes)
    boxes = panel_boxes(planes, "T2w  finding 1 of 1  1.9 ml")
    assert boxes[-1][2] <= width and max(b[3] for b in boxes) <= height
    # Physical aspect: one mm per pixel scale for every panel.
    mm = planes.mm_per_pixel
    assert planes.planes[0].display_shape == (round(50 * 1.0 / mm), round(60 * 0.8 / mm))
    assert planes.planes[1].display_shape == (round(40 * 2.0 / mm), round(60 * 0.8 / mm))
    assert planes.planes[2].display_shape == (round(40 * 2.0 / mm), round(50 * 1.0 / mm))
    # (5) nothing else, in particular no temporary file, is left in the folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finding.png"]


def test_outline_is_exactly_the_cube_boundary_in_each_panel(tmp_path):
    assert OUTLINE_RGB == (255, 0, 0)  # the documented colour
    image, mask = _volume()
    path = write_preview(tmp_path / "cube.png", image, mask, SPACING)
    planes = preview_planes(image, mask, SPACING)
    assert planes.centre_zyx == (15, 21, 36)  # centroid (14.5, 20.5, 35.5) rounded half up
    assert (planes.n_components, planes.component_voxels) == (1, 10 * 12 * 12)
    with Image.open(path) as opened:
        png = np.asarray(opened.convert("RGB"))
    # (rows source range, rows n, rows flipped, cols source range, cols n) per panel
    z, y, x = (range(s.start, s.stop) for s in CUBE)
    layout = {"axial": (y, 50, False, x, 60), "coronal": (z, 40, True, x, 60), "sagittal": (z, 40, True, y, 50)}
    boxes = panel_boxes(planes)
    all_red = np.all(png == OUTLINE_RGB, axis=2)
    assert all_red.sum() == sum(_red(png, box).sum() for box in boxes)  # no red outside panels
    for plane, box in zip(planes.planes, boxes):
        rows_src, n_rows, flipped, cols_src, n_cols = layout[plane.name]
        top, bottom = _displayed_rows(rows_src, n_rows, plane.display_shape[0], flipped=flipped)
        left, right = _displayed_rows(cols_src, n_cols, plane.display_shape[1], flipped=False)
        expected = np.zeros(plane.display_shape, dtype=bool)
        expected[top : bottom + 1, left : right + 1] = True
        expected[top + 1 : bottom, left + 1 : right] = False  # a one-pixel rectangle outline
        red = _red(png, box)
        assert red.shape == expected.shape
        np.testing.assert_array_equal(red, expected, err_msg=plane.name)


def test_planes_go_through_the_larger_component(tmp_path):
    image, mask = _volume()  # cube of 1440 voxels around (14.5, 20.5, 35.5)
    mask[30:33, 40:43, 5:8] = True  # a separate 27-voxel component
    planes = preview_planes(image, mask, SPACING)
    assert planes.n_components == 2
    assert planes.component_voxels == 1440
    assert planes.centre_zyx == (15, 21, 36)
    assert [p.index for p in planes.planes] == [15, 21, 36]
    # The small component is far from every plane: only the cube's outline is drawn.
    path = write_preview(tmp_path / "two.png", image, mask, SPACING)
    with Image.open(path) as opened:
        png = np.asarray(opened.convert("RGB"))
    axial_red = _red(png, panel_boxes(planes)[0])
    rows, cols = np.nonzero(axial_red)
    mm = planes.mm_per_pixel
    assert rows.min() == pytest.approx(15 * 1.0 / mm, abs=1.5)
    assert cols.min() == pytest.approx(30 * 0.8 / mm, abs=1.5)

    # Make the second component the larger one: the planes move to it.
    mask[25:35, 35:45, 2:12] = True  # 1000 voxels containing the small one, 26-connected
    mask[10:20, 15:27, 30:36] = False  # cube shrinks to 720 voxels
    planes = preview_planes(image, mask, SPACING)
    assert planes.component_voxels == 1000
    assert planes.centre_zyx == (30, 40, 7)  # centroid (29.5, 39.5, 6.5) rounded half up


def test_diagonal_neighbours_are_one_component():
    image = np.zeros((5, 5, 5), dtype=np.float32)
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # 26-connected only
    mask[4, 4, 0] = True
    planes = preview_planes(image, mask, (1.0, 1.0, 1.0))
    assert isinstance(planes, PreviewPlanes)
    assert (planes.n_components, planes.component_voxels, planes.centre_zyx) == (2, 3, (1, 1, 1))


def test_empty_mask_is_refused(tmp_path):
    image, mask = _volume()
    with pytest.raises(ValueError, match="empty"):
        preview_planes(image, np.zeros_like(mask), SPACING)
    with pytest.raises(ValueError, match="empty"):
        write_preview(tmp_path / "none.png", image, np.zeros_like(mask), SPACING)
    assert list(tmp_path.iterdir()) == []


def test_shape_mismatch_names_both_shapes(tmp_path):
    image, mask = _volume()
    with pytest.raises(ValueError, match=r"\(40, 50, 60\).*\(40, 50, 59\)"):
        write_preview(tmp_path / "bad.png", image, mask[:, :, :59], SPACING)
    with pytest.raises(ValueError, match=r"\(50, 60\).*\(50, 60\)"):
        preview_planes(image[0], mask[0], SPACING)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spacing", [(0.0, 1.0, 1.0), (1.0, -1.0, 1.0), (1.0, float("nan"), 1.0), (1.0, 1.0)])
def test_bad_spacing_is_refused(spacing):
    image, mask = _volume()
    with pytest.raises(ValueError, match="spacing_zyx"):
        preview_planes(image, mask, spacing)


def test_bad_path_and_title_are_refused(tmp_path):
    image, mask = _volume()
    missing = tmp_path / "no-such-folder" / "p.png"
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        write_preview(missing, image, mask, SPACING)
    with pytest.raises(ValueError, match=r"\.png"):
        write_preview(tmp_path / "p.jpg", image, mask, SPACING)
    with pytest.raises(ValueError, match="Latin-1"):
        write_preview(tmp_path / "p.png", image, mask, SPACING, title="line one\nline two")
    with pytest.raises(ValueError, match="binary"):
        write_preview(tmp_path / "p.png", image, mask * 0.5, SPACING)
    assert list(tmp_path.iterdir()) == []


def test_large_series_is_shrunk_and_tiny_finding_stays_visible(tmp_path):
    shape = (30, 400, 1200)
    image = np.ones(shape, dtype=np.int16)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[15, 200, 600] = 1  # one voxel; shrinking by 2x must not lose it
    path = write_preview(tmp_path / "big.png", image, mask, (1.0, 0.5, 0.5))
    planes = preview_planes(image, mask, (1.0, 0.5, 0.5))
    assert max(max(p.display_shape) for p in planes.planes) <= MAX_PANEL_PX
    with Image.open(path) as opened:
        png = np.asarray(opened.convert("RGB"))
    for box in panel_boxes(planes):
        assert _red(png, box).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png"]


def test_existing_file_is_replaced_and_output_is_deterministic(tmp_path):
    image, mask = _volume()
    target = tmp_path / "same.png"
    target.write_bytes(b"old")
    write_preview(target, image, mask, SPACING, title="FLAIR  finding 1 of 1")
    first = target.read_bytes()
    write_preview(target, image, mask, SPACING, title="FLAIR  finding 1 of 1")
    assert target.read_bytes() == first != b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.png"]
