"""Preview PNG of one flagged series: three orthogonal planes through its largest finding.

Why: a researcher who wants to glance at what the detector flagged should not need a DICOM
viewer. :func:`write_preview` writes one small PNG per flagged series with three panels side by
side (axial, coronal, sagittal), each cut through the centroid of the LARGEST connected
component (26-connectivity) of the series' binary mask, with the mask's outline drawn over the
image in red.

Conventions
-----------
Arrays are ``(z, y, x)`` on the series' source grid (as :func:`codegraph3d.io.load_series_volume`
returns them, with ``spacing_zyx = tuple(volume.spacing[::-1])``). No direction cosines are
used, so the planes are named after index axes: axial = fixed ``z``, coronal = fixed ``y``,
sagittal = fixed ``x``. Which way up, in every panel:

* axial: rows are ``y`` increasing downwards, columns ``x`` increasing to the right;
* coronal: rows are ``z`` DEcreasing downwards (highest ``z`` at the top), columns ``x``;
* sagittal: rows are ``z`` decreasing downwards, columns ``y`` increasing to the right.

For an axial acquisition in the usual orientation (ImageOrientationPatient ``[1,0,0,0,1,0]``,
slices sorted along the normal, so ``x`` -> patient left, ``y`` -> posterior, ``z`` -> superior)
this gives: axial anterior up and the patient's right on the viewer's left (radiological),
coronal and sagittal superior up. For other acquisitions the "axial" panel is the acquired
plane.

Physical aspect: all three panels share one display pixel size :attr:`PreviewPlanes.mm_per_pixel`
(the finest voxel spacing, coarsened so that no panel side exceeds :data:`MAX_PANEL_PX` pixels
and refined so that the longest side reaches at least :data:`MIN_PANEL_PX`). A source axis of
``n`` voxels of spacing ``s`` becomes ``n_out = max(1, round(n * s / mm_per_pixel))`` pixels;
display pixel ``i`` shows source index ``floor((i + 0.5) * n / n_out)`` (nearest neighbour). The
mask is resampled the same way when enlarged; when shrunk, a pixel is in the mask if any voxel
of its block ``[floor(i * n / n_out), floor((i + 1) * n / n_out))`` is, so a small finding never
vanishes. The outline is then ``mask & ~binary_erosion(mask)`` (4-neighbour erosion, nothing
outside the panel) of the resampled 2-D mask, over the whole mask in that plane (every
component it cuts, not only the largest), painted in :data:`OUTLINE_RGB` = pure red
``(255, 0, 0)``. Grey pixels and text have R = G = B, so red pixels are exactly the outline.

Grey window: the 1st to 99th percentile of the finite, nonzero image values of the three planes
together (all finite values of the planes if none is nonzero), one window for all panels.

Layout (:func:`panel_boxes`): a black canvas; at the top, :data:`MARGIN_PX` then one text line of
:data:`LINE_PX` pixels for ``title`` (only when it is non-empty) and one line naming the cut
``(z, y, x)``; then the panels, top-aligned, left to right, :data:`MARGIN_PX` from the left edge
and :data:`GAP_PX` apart. Text uses Pillow's built-in bitmap font (Latin-1 only).

Privacy: nothing identifying is drawn. The only free text is ``title``, which callers must keep
to non-identifying content such as ``"T2w  finding 1 of 2  12.3 ml"`` -- never a patient name,
ID, birth date, study date, accession number or UID.

The file appears whole: it is written under a hidden temporary name in the same folder and
renamed (:func:`codegraph3d.core.files.atomic_path`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from codegraph3d.core.files import atomic_path

__all__ = [
    "GAP_PX",
    "LINE_PX",
    "MARGIN_PX",
    "MAX_PANEL_PX",
    "MIN_PANEL_PX",
    "OUTLINE_RGB",
    "PLANE_NAMES",
    "PreviewPlane",
    "PreviewPlanes",
    "panel_boxes",
    "preview_planes",
    "write_preview",
]

#: Colour of the mask outline: pure red, never used by the grey image or the text.
OUTLINE_RGB: tuple[int, int, int] = (255, 0, 0)
#: Panels, left to right, and the ``(z, y, x)`` axis each one holds fixed.
PLANE_NAMES: tuple[str, str, str] = ("axial", "coronal", "sagittal")
#: The longest panel side is at most this many pixels (large series are shrunk) ...
MAX_PANEL_PX = 512
#: ... and at least this many (small series are enlarged, nearest neighbour).
MIN_PANEL_PX = 256
#: Black border around the canvas, gap between panels and height of one text line, in pixels.
MARGIN_PX = 4
GAP_PX = 4
LINE_PX = 14

_TEXT_RGB = (255, 255, 255)


@dataclass(frozen=True)
class PreviewPlane:
    """One cut, oriented for display (see the module docstring), before resampling.

    Attributes
    ----------
    name : str
        ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    index : int
        The fixed source index (``z``, ``y`` or ``x`` respectively).
    image : numpy.ndarray
        2-D image values of the plane, rows top to bottom as displayed.
    mask : numpy.ndarray
        2-D boolean mask of the plane (all components), same orientation.
    spacing_rc : tuple of float
        Millimetres between rows and between columns of ``image``.
    display_shape : tuple of int
        ``(rows, columns)`` of the panel in the PNG.
    """

    name: str
    index: int
    image: np.ndarray
    mask: np.ndarray
    spacing_rc: tuple[float, float]
    display_shape: tuple[int, int]


@dataclass(frozen=True)
class PreviewPlanes:
    """The three planes through the largest finding, and where they cut.

    Attributes
    ----------
    centre_zyx : tuple of int
        Centroid of the largest component rounded half up: the voxel all three planes pass through.
    component_voxels : int
        Voxel count of the largest component.
    n_components : int
        Number of 26-connected components in the mask.
    mm_per_pixel : float
        Display pixel size shared by all panels.
    planes : tuple of PreviewPlane
        Axial, coronal, sagittal, in this order.
    """

    centre_zyx: tuple[int, int, int]
    component_voxels: int
    n_components: int
    mm_per_pixel: float
    planes: tuple[PreviewPlane, PreviewPlane, PreviewPlane]


def _validate_arrays(image: np.ndarray, mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> None:
    """Raise ``ValueError``/``TypeError`` unless image, mask and spacing describe one 3-D grid."""
    if not isinstance(image, np.ndarray) or not isinstance(mask, np.ndarray):
        raise TypeError(
            f"image and mask must be numpy arrays, got {type(image).__name__} and {type(mask).__name__}"
        )
    if image.ndim != 3 or mask.ndim != 3 or image.shape != mask.shape:
        raise ValueError(
            f"image and mask must be 3-D (z, y, x) arrays of the same shape, got image shape "
            f"{image.shape} and mask shape {mask.shape}"
        )
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
            or image.dtype == np.bool_):
        raise ValueError(f"image must hold real numbers, got dtype {image.dtype}")
    if mask.dtype != np.bool_:
        if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
            raise ValueError(f"mask must be boolean or hold 0/1, got dtype {mask.dtype}")
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError("mask must be binary: a non-boolean mask may only hold the values 0 and 1")
    try:
        spacing = [float(v) for v in spacing_zyx]
    except (TypeError, ValueError):
        raise ValueError(f"spacing_zyx must be three numbers (mm along z, y, x), got {spacing_zyx!r}") from None
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"spacing_zyx must be three positive finite numbers (mm along z, y, x), got {spacing_zyx!r}")


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Return (centroid (z, y, x) as floats, voxel count, number of components) of ``mask``.

    Labelling runs on the mask's bounding box only, so its memory follows the finding's extent,
    not the series'. Ties go to the component met first in C order.
    """
    occupied = (np.flatnonzero(np.any(mask, axis=other)) for other in ((1, 2), (0, 2), (0, 1)))
    box = tuple(slice(int(found[0]), int(found[-1]) + 1) for found in occupied)
    labels, n = ndimage.label(mask[box], structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    offset = np.array([s.start for s in box], dtype=float)
    centroid = np.argwhere(labels == largest).mean(axis=0) + offset
    return centroid, int(sizes[largest]), int(n)


def _display_pixel(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> float:
    """Shared display pixel size (mm): finest spacing, clamped by MIN/MAX_PANEL_PX."""
    longest_mm = max(n * s for n, s in zip(shape, spacing))
    mm = min(spacing)
    mm = max(mm, longest_mm / MAX_PANEL_PX)
    return min(mm, longest_mm / MIN_PANEL_PX)


def preview_planes(image: np.ndarray, mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> PreviewPlanes:
    """Cut axial, coronal and sagittal planes through the centroid of the largest finding.

    Parameters
    ----------
    image : numpy.ndarray
        3-D ``(z, y, x)`` real-valued source image.
    mask : numpy.ndarray
        Binary mask of the same shape (boolean, or 0/1 numbers); must not be empty.
    spacing_zyx : tuple of float
        Voxel spacing in mm along ``z``, ``y``, ``x`` (note: :class:`~codegraph3d.core.volume.Volume`
        stores x, y, z, so pass ``tuple(volume.spacing[::-1])``).

    Returns
    -------
    PreviewPlanes
        Copies of the three 2-D planes oriented for display (see the module docstring) through
        the rounded centroid of the largest 26-connected component. A connected component's
        extent along each axis has no gaps and contains its centroid, so every plane cuts it.

    Raises
    ------
    ValueError
        Shapes differ or are not 3-D, the mask is not binary, the spacing is not positive, or
        the mask is empty (a preview is only written for a flagged series with a finding).
    TypeError
        ``image`` or ``mask`` is not a numpy array.
    """
    _validate_arrays(image, mask, spacing_zyx)
    binary = mask if mask.dtype == np.bool_ else mask != 0
    if not binary.any():
        raise ValueError("mask is empty: a preview is only written for a flagged series with a non-empty mask")
    spacing = tuple(float(v) for v in spacing_zyx)
    centroid, voxels, n_components = _largest_component(binary)
    z, y, x = (int(np.clip(math.floor(float(c) + 0.5), 0, n - 1)) for c, n in zip(centroid, image.shape))
    mm = _display_pixel(image.shape, spacing)  # type: ignore[arg-type]
    sz, sy, sx = spacing
    cuts = (
        ("axial", z, lambda a: a[z, :, :], (sy, sx)),
        ("coronal", y, lambda a: a[::-1, y, :], (sz, sx)),
        ("sagittal", x, lambda a: a[::-1, :, x], (sz, sy)),
    )
    planes = []
    for name, index, take, spacing_rc in cuts:
        plane_image = np.array(take(image))
        rows, cols = plane_image.shape
        display = (max(1, round(rows * spacing_rc[0] / mm)), max(1, round(cols * spacing_rc[1] / mm)))
        planes.append(PreviewPlane(name, index, plane_image, np.array(take(binary)), spacing_rc, display))
    return PreviewPlanes((z, y, x), voxels, n_components, mm, tuple(planes))  # type: ignore[arg-type]


def _resample_axis(array: np.ndarray, n_out: int, axis: int, *, any_block: bool) -> np.ndarray:
    """Nearest-neighbour resampling of one axis to ``n_out`` samples (see the module docstring).

    With ``any_block`` and shrinking, each output sample is the maximum (logical or) of its block.
    """
    n = array.shape[axis]
    if any_block and n_out < n:
        starts = (np.arange(n_out) * n) // n_out
        return np.maximum.reduceat(array, starts, axis=axis)
    index = np.minimum(((2 * np.arange(n_out) + 1) * n) // (2 * n_out), n - 1)
    return np.take(array, index, axis=axis)


def _grey_window(planes: PreviewPlanes) -> tuple[float, float]:
    """1st and 99th percentile of the finite nonzero values of the three planes (see module doc)."""
    values = np.concatenate([p.image.astype(np.float64, copy=False).ravel() for p in planes.planes])
    values = values[np.isfinite(values)]
    nonzero = values[values != 0]
    if nonzero.size:
        values = nonzero
    if not values.size:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, [1.0, 99.0]))
    return low, (high if high > low else low + 1.0)


def _render_panel(plane: PreviewPlane, window: tuple[float, float]) -> np.ndarray:
    """RGB ``uint8`` panel: the grey image with the mask outline in OUTLINE_RGB."""
    rows, cols = plane.display_shape
    image = _resample_axis(_resample_axis(plane.image.astype(np.float64), rows, 0, any_block=False),
                           cols, 1, any_block=False)
    mask = _resample_axis(_resample_axis(plane.mask, rows, 0, any_block=True), cols, 1, any_block=True)
    low, high = window
    grey = np.clip((image - low) / (high - low), 0.0, 1.0)
    grey = np.where(np.isfinite(grey), grey, 0.0)
    rgb = np.repeat(np.round(grey * 255.0).astype(np.uint8)[:, :, None], 3, axis=2)
    outline = mask & ~ndimage.binary_erosion(mask, border_value=0)
    rgb[outline] = OUTLINE_RGB
    return rgb


def _text_lines(planes: PreviewPlanes, title: str) -> list[str]:
    """Header lines: the title (when given) and where the planes cut."""
    z, y, x = planes.centre_zyx
    cut = f"axial | coronal | sagittal through voxel (z, y, x) = ({z}, {y}, {x})"
    return ([title] if title else []) + [cut]


def panel_boxes(planes: PreviewPlanes, title: str = "") -> tuple[tuple[int, int, int, int], ...]:
    """Where :func:`write_preview` puts each panel: ``(left, top, right, bottom)`` PNG pixels.

    ``right`` and ``bottom`` are exclusive; order is axial, coronal, sagittal.
    """
    top = MARGIN_PX + LINE_PX * len(_text_lines(planes, title)) + MARGIN_PX
    boxes = []
    left = MARGIN_PX
    for plane in planes.planes:
        rows, cols = plane.display_shape
        boxes.append((left, top, left + cols, top + rows))
        left += cols + GAP_PX
    return tuple(boxes)


def _validate_title(title: str) -> None:
    """Raise ``ValueError`` unless ``title`` is one line of Latin-1 printable text."""
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    for char in title:
        if not char.isprintable() or ord(char) > 0xFF:
            raise ValueError(
                f"title {title!r} holds {char!r}: only one line of printable Latin-1 text can be drawn"
            )


def _compose(planes: PreviewPlanes, title: str) -> Image.Image:
    """The whole preview as an RGB image: header text over three panels (see :func:`panel_boxes`)."""
    window = _grey_window(planes)
    boxes = panel_boxes(planes, title)
    font = ImageFont.load_default_imagefont()
    lines = _text_lines(planes, title)
    text_width = max(math.ceil(font.getlength(line)) for line in lines)
    width = max(boxes[-1][2] + MARGIN_PX, text_width + 2 * MARGIN_PX)
    height = max(box[3] for box in boxes) + MARGIN_PX
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    for plane, (left, top, _right, _bottom) in zip(planes.planes, boxes):
        canvas.paste(Image.fromarray(_render_panel(plane, window)), (left, top))
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(lines):
        draw.text((MARGIN_PX, MARGIN_PX + number * LINE_PX), line, font=font, fill=_TEXT_RGB)
    return canvas


def write_preview(
    path: str | os.PathLike,
    image: np.ndarray,
    mask: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    *,
    title: str = "",
) -> Path:
    """Write the preview PNG of one flagged series (layout and conventions: module docstring).

    Parameters
    ----------
    path : str or os.PathLike
        Target ``.png`` file; its folder must exist. An existing file is replaced atomically.
    image : numpy.ndarray
        3-D ``(z, y, x)`` source image.
    mask : numpy.ndarray
        Binary mask of the same shape; must not be empty.
    spacing_zyx : tuple of float
        Voxel spacing in mm along ``z``, ``y``, ``x``.
    title : str, optional
        One line of NON-IDENTIFYING text drawn at the top, e.g.
        ``"T2w  finding 1 of 2  12.3 ml"``. Never pass a patient name, ID, birth or study
        date, accession number or UID: the PNG carries no identifier, and must stay so.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        Bad arrays, spacing or title (see :func:`preview_planes`), or ``path`` not ending in
        ``.png``.
    FileNotFoundError
        The folder of ``path`` does not exist.
    IsADirectoryError
        ``path`` is a folder.
    """
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"preview path {str(target)!r} must end in .png")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"folder of preview path {str(target)!r} does not exist: {str(target.parent)!r}")
    if target.is_dir():
        raise IsADirectoryError(f"preview path {str(target)!r} is a folder")
    _validate_title(title)
    canvas = _compose(preview_planes(image, mask, spacing_zyx), title)
    with atomic_path(target) as temporary:
        canvas.save(temporary, format="PNG")
    return target
