"""Preprocessing, first version: intensity brain mask, cubic brain crop, resampling, [0, 1] scaling.

The working grid is a cube of ``size^3`` voxels aligned with the LPS axes (identity direction), so
"orientation to LPS" is done by the resampling itself, without a separate reorientation step
that could lose half a voxel. The composed transform from the working grid to the source series
grid is one 4x4 affine (:attr:`PreprocessedVolume.grid_to_source`), so any map computed on the
working grid goes back onto the source voxels exactly (up to the interpolation of the map).

Atlas registration, skull stripping and Nyul standardisation are later additions; this module
assumes skull-stripped input (background near zero), as in the demo cohort.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .registration import Template, register_affine
from .volume import Volume, index_to_physical_matrix

__all__ = [
    "PreprocessConfig",
    "PreprocessedVolume",
    "brain_mask_from_intensity",
    "preprocess_volume",
    "resample_to_source",
    "resample_from_source",
]


class EmptyBrainMaskError(ValueError):
    """Raised when no brain can be found in a series."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of the first-version preprocessing.

    Parameters
    ----------
    size : int
        Edge of the cubic working grid in voxels (224 for ViT-L/14 on a 16^3 token grid).
    mask_threshold : float
        A voxel is brain when its intensity exceeds this fraction of the 99th percentile of the
        non-zero voxels. Skull-stripped data has a background near zero, so a low fraction keeps
        dark CSF while dropping the noise floor.
    crop_margin : float
        Margin added on each side of the brain's bounding box, as a fraction of its largest extent.
    clip_percentiles : tuple of float
        Brain intensities are clipped to these percentiles before scaling to [0, 1], so one hot
        voxel cannot compress the rest of the range (``intensity_scaling="percentile"``).
    intensity_scaling : {"landmarks", "percentile"}
        ``landmarks``: piecewise-linear histogram standardisation (Nyul-style) of the brain
        intensities: the percentiles ``landmark_percentiles`` map to equally spaced values in
        [0, 1], so tissues land at the same values whatever the scanner gain and bias (with
        uniform reference landmarks, until per-contrast reference landmarks exist).
        ``percentile``: a linear map of ``clip_percentiles`` to [0, 1].
    landmark_percentiles : tuple of float
        Landmarks of ``landmarks`` scaling, increasing, the first mapped to 0 and the last to 1.
    min_brain_ml : float
        Fewer millilitres of brain than this is treated as an empty mask.
    registration : {"none", "affine"}
        ``none``: the working grid is the brain's bounding cube in the series' own space.
        ``affine``: the series is registered to the MNI152 brain template
        (:mod:`codegraph3d.registration`) and the working grid is the central ``crop_mm`` cube of
        the template, so the same anatomy lands in the same token across volumes.
    crop_mm : float
        Edge (mm) of the template-space cube with ``registration="affine"`` (156 in the paper).
    resolution_fwhm_mm : float
        When positive, each series is smoothed so that its effective resolution is this FWHM
        along every axis (an axis already coarser is left alone). Batch scoring compares volumes
        token by token: a 3 mm-slice series among 1 mm ones differs everywhere by its blur alone,
        which swamps lesions. 0 disables it (the paper's data was already isotropic).
    """

    size: int = 224
    mask_threshold: float = 0.05
    crop_margin: float = 0.04
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    intensity_scaling: str = "landmarks"
    landmark_percentiles: tuple[float, ...] = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
    min_brain_ml: float = 1.0
    resolution_fwhm_mm: float = 0.0
    registration: str = "none"
    crop_mm: float = 156.0

    def __post_init__(self) -> None:
        if self.registration not in ("none", "affine"):
            raise ValueError(f"preprocess.registration must be 'none' or 'affine'; got {self.registration!r}")
        if not self.crop_mm > 0:
            raise ValueError(f"preprocess.crop_mm must be positive; got {self.crop_mm}")
        if self.intensity_scaling not in ("landmarks", "percentile"):
            raise ValueError(
                f"preprocess.intensity_scaling must be 'landmarks' or 'percentile'; got {self.intensity_scaling!r}"
            )
        marks = np.asarray(self.landmark_percentiles, float)
        if marks.size < 2 or np.any(np.diff(marks) <= 0) or marks[0] < 0 or marks[-1] > 100:
            raise ValueError(
                "preprocess.landmark_percentiles must be at least two increasing values in [0, 100]; "
                f"got {self.landmark_percentiles}"
            )
        if self.resolution_fwhm_mm < 0:
            raise ValueError(f"preprocess.resolution_fwhm_mm must be >= 0; got {self.resolution_fwhm_mm}")
        if self.size < 8:
            raise ValueError(f"preprocess.size must be at least 8; got {self.size}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"preprocess.mask_threshold must lie in (0, 1); got {self.mask_threshold}")
        if not 0.0 <= self.crop_margin < 1.0:
            raise ValueError(f"preprocess.crop_margin must lie in [0, 1); got {self.crop_margin}")
        low, high = self.clip_percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(
                f"preprocess.clip_percentiles must satisfy 0 <= low < high <= 100; got {self.clip_percentiles}"
            )


@dataclass
class PreprocessedVolume:
    """A volume on the cubic LPS working grid, with the way back to its source grid.

    Attributes
    ----------
    image : numpy.ndarray
        ``(size, size, size)`` float32 in [0, 1], indexed ``[z, y, x]``; 0 outside the brain.
    brain_mask : numpy.ndarray
        Boolean brain mask on the working grid.
    grid_origin : numpy.ndarray
        LPS position (mm) of working voxel ``(0, 0, 0)``.
    grid_spacing : float
        Isotropic working voxel size (mm).
    grid_to_source : numpy.ndarray
        4x4 matrix mapping a continuous working index ``(x, y, z, 1)`` to the continuous source
        index ``(x, y, z, 1)``; its inverse maps source to working grid.
    source_shape_zyx : tuple of int
        Shape of the source array.
    source_origin, source_spacing, source_direction : numpy.ndarray
        Geometry of the source series grid.
    brain_volume_ml : float
        Brain volume measured on the source grid.
    qa : dict
        Quality record of the preprocessing (registration metric, stop condition, warnings).
    """

    image: np.ndarray
    brain_mask: np.ndarray
    grid_origin: np.ndarray
    grid_spacing: float
    grid_to_source: np.ndarray
    source_shape_zyx: tuple[int, int, int]
    source_origin: np.ndarray
    source_spacing: np.ndarray
    source_direction: np.ndarray
    brain_volume_ml: float
    qa: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Edge of the working grid (the image may have been released to save memory)."""
        return int(self.brain_mask.shape[0])

    @property
    def grid_index_to_physical(self) -> np.ndarray:
        """4x4 matrix from a working ``(x, y, z)`` index to the grid's LPS mm (template space when registered)."""
        return index_to_physical_matrix(self.grid_origin, np.full(3, self.grid_spacing), np.eye(3))

    @property
    def grid_to_source_physical(self) -> np.ndarray:
        """4x4 map from the grid's physical space to the series' LPS mm (identity without registration)."""
        source = index_to_physical_matrix(self.source_origin, self.source_spacing, self.source_direction)
        return source @ self.grid_to_source @ np.linalg.inv(self.grid_index_to_physical)

    def to_dict(self) -> dict:
        """The geometry (not the arrays), JSON-serialisable, for the QA record and caches."""
        return {
            "grid_size": self.size,
            "grid_origin_lps_mm": self.grid_origin.tolist(),
            "grid_spacing_mm": float(self.grid_spacing),
            "grid_to_source": self.grid_to_source.tolist(),
            "source_shape_zyx": list(self.source_shape_zyx),
        }


def brain_mask_from_intensity(array: np.ndarray, threshold_fraction: float) -> np.ndarray:
    """Brain mask of a skull-stripped image: threshold, largest component, holes filled.

    Parameters
    ----------
    array : numpy.ndarray
        Image, any shape (3-D expected).
    threshold_fraction : float
        Fraction of the 99th percentile of the positive voxels used as the threshold.

    Returns
    -------
    numpy.ndarray
        Boolean mask; all False when the image holds no positive voxel.
    """
    positive = array[array > 0]
    if positive.size == 0:
        return np.zeros(array.shape, dtype=bool)
    threshold = threshold_fraction * float(np.percentile(positive, 99.0))
    mask = array > threshold
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    # Noise specks outside the head survive a low threshold; the brain is the largest component.
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    # Dark ventricles and lesions can fall under the threshold: the brain has no interior holes.
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3, 3)), iterations=1)
    return ndimage.binary_fill_holes(mask)


def harmonise_resolution(image: sitk.Image, fwhm_mm: float) -> sitk.Image:
    """Smooth ``image`` so that each axis' effective resolution (FWHM) is at least ``fwhm_mm``.

    A voxel of size ``s`` is treated as a resolution of FWHM ``s``; Gaussian FWHMs add in
    quadrature, so the added kernel has FWHM ``sqrt(fwhm^2 - s^2)`` on axes finer than the target.
    """
    fwhm_to_sigma = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    variances = [
        (np.sqrt(max(fwhm_mm**2 - spacing**2, 0.0)) * fwhm_to_sigma) ** 2 for spacing in image.GetSpacing()
    ]
    if not any(variances):
        return image
    return sitk.DiscreteGaussian(image, variances, 32, 0.01, True)


def scale_intensities(image: np.ndarray, brain: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Map brain intensities to [0, 1] by the configured rule; background becomes 0."""
    values = image[brain]
    if config.intensity_scaling == "landmarks":
        landmarks = np.percentile(values, config.landmark_percentiles)
        # Flat stretches of the histogram give tied landmarks; np.interp needs them increasing.
        landmarks = landmarks + np.arange(landmarks.size) * 1e-6 * max(float(np.ptp(values)), 1e-6)
        reference = np.linspace(0.0, 1.0, landmarks.size)
        scaled = np.interp(image, landmarks, reference).astype(np.float32)
    else:
        low, high = np.percentile(values, config.clip_percentiles)
        scale = float(high - low) if high > low else 1.0
        scaled = np.clip((image - low) / scale, 0.0, 1.0).astype(np.float32)
    scaled[~brain] = 0.0
    return scaled


def _working_grid(volume: Volume, mask: np.ndarray, config: PreprocessConfig) -> tuple[np.ndarray, float]:
    """Origin and spacing of the LPS cube enclosing the brain's bounding box plus margin."""
    z, y, x = np.nonzero(mask)
    # Physical extent of the voxel centres themselves: the corners of an index-space box would
    # inflate the crop for oblique series.
    points = (volume.index_to_physical @ np.stack([x, y, z, np.ones(x.size)]).astype(float))[:3]
    half_voxel = float(volume.spacing.max()) / 2.0
    low, high = points.min(axis=1) - half_voxel, points.max(axis=1) + half_voxel
    extent = float((high - low).max())
    side = extent * (1.0 + 2.0 * config.crop_margin)
    spacing = side / config.size
    centre = (low + high) / 2.0
    origin = centre - side / 2.0 + spacing / 2.0
    return origin, spacing


def _grid_reference(origin: np.ndarray, spacing: float, size: int) -> sitk.Image:
    reference = sitk.Image([size] * 3, sitk.sitkFloat32)
    reference.SetOrigin(tuple(float(v) for v in origin))
    reference.SetSpacing((spacing,) * 3)
    reference.SetDirection(tuple(np.eye(3).flatten()))
    return reference


def _sitk_affine(matrix: np.ndarray) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(np.asarray(matrix[:3, :3], float).flatten()))
    transform.SetTranslation(tuple(float(v) for v in matrix[:3, 3]))
    return transform


def preprocess_volume(
    volume: Volume, config: PreprocessConfig | None = None, template: Template | None = None
) -> PreprocessedVolume:
    """Mask, crop, resample to ``size^3`` and scale one skull-stripped volume.

    Parameters
    ----------
    volume : Volume
        Source series with its geometry.
    config : PreprocessConfig, optional
        Settings; the defaults are the paper's 224^3 grid.

    Returns
    -------
    PreprocessedVolume

    Raises
    ------
    EmptyBrainMaskError
        When the intensity mask holds less than ``config.min_brain_ml`` of tissue.
    """
    config = config or PreprocessConfig()
    mask = brain_mask_from_intensity(volume.array, config.mask_threshold)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    brain_ml = float(mask.sum()) * voxel_ml
    if brain_ml < config.min_brain_ml:
        raise EmptyBrainMaskError(
            f"series {volume.series_instance_uid}: the brain mask is empty ({brain_ml:.2f} ml of tissue "
            f"above {config.mask_threshold:.0%} of the 99th intensity percentile); the series may be "
            "blank or not skull-stripped. Check the series or exclude it from the input."
        )
    source_image = volume.to_sitk()
    mask_image = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_image.CopyInformation(source_image)
    qa: dict = {}
    # grid physical space -> series LPS: identity, or the registration's template -> subject map
    grid_to_subject = np.eye(4)
    if config.registration == "affine":
        if template is None:
            raise ValueError("preprocess.registration is 'affine' but no template was given")
        moving = sitk.Mask(sitk.Cast(source_image, sitk.sitkFloat32), mask_image)
        result = register_affine(moving, template)
        grid_to_subject = result.matrix
        qa["registration"] = result.qa
        spacing = config.crop_mm / config.size
        origin = template.centre_lps - config.crop_mm / 2.0 + spacing / 2.0
    else:
        origin, spacing = _working_grid(volume, mask, config)
    reference = _grid_reference(origin, spacing, config.size)
    transform = _sitk_affine(grid_to_subject)

    if config.resolution_fwhm_mm > 0:
        source_image = harmonise_resolution(source_image, config.resolution_fwhm_mm)
    resampled = sitk.Resample(source_image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    resampled_mask = sitk.Resample(mask_image, reference, transform, sitk.sitkNearestNeighbor, 0)

    image = sitk.GetArrayFromImage(resampled).astype(np.float32)
    brain = sitk.GetArrayFromImage(resampled_mask).astype(bool)
    if not brain.any():
        raise EmptyBrainMaskError(
            f"series {volume.series_instance_uid}: the brain mask is empty on the working grid; "
            "the series is too small or its geometry is broken."
        )
    image = scale_intensities(image, brain, config)

    grid_to_physical = index_to_physical_matrix(origin, np.full(3, spacing), np.eye(3))
    grid_to_source = np.linalg.inv(volume.index_to_physical) @ grid_to_subject @ grid_to_physical
    return PreprocessedVolume(
        image=image.astype(np.float32),
        brain_mask=brain,
        grid_origin=origin,
        grid_spacing=float(spacing),
        grid_to_source=grid_to_source,
        source_shape_zyx=tuple(int(v) for v in volume.array.shape),
        source_origin=volume.origin.copy(),
        source_spacing=volume.spacing.copy(),
        source_direction=volume.direction.copy(),
        brain_volume_ml=brain_ml,
        qa=qa,
    )


def _grid_image(prepared: PreprocessedVolume) -> sitk.Image:
    return _grid_reference(prepared.grid_origin, prepared.grid_spacing, prepared.size)


def _source_image(prepared: PreprocessedVolume, array: np.ndarray | None = None) -> sitk.Image:
    if array is None:
        image = sitk.Image([int(v) for v in prepared.source_shape_zyx[::-1]], sitk.sitkFloat32)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetOrigin(tuple(float(v) for v in prepared.source_origin))
    image.SetSpacing(tuple(float(v) for v in prepared.source_spacing))
    image.SetDirection(tuple(prepared.source_direction.flatten()))
    return image


def resample_from_source(source_map: np.ndarray, prepared: PreprocessedVolume, *, order: int = 1) -> np.ndarray:
    """Carry an array on the source series grid (e.g. a ground-truth mask) onto the working grid.

    Parameters
    ----------
    source_map : numpy.ndarray
        Array of the source shape ``(z, y, x)``.
    prepared : PreprocessedVolume
        The preprocessing record of the same series.
    order : int
        1 for linear interpolation, 0 for nearest neighbour.
    """
    if tuple(source_map.shape) != tuple(prepared.source_shape_zyx):
        raise ValueError(f"array shape {source_map.shape} does not match the source grid {prepared.source_shape_zyx}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1; got {order}")
    interpolator = sitk.sitkLinear if order == 1 else sitk.sitkNearestNeighbor
    result = sitk.Resample(
        _source_image(prepared, source_map), _grid_image(prepared), _sitk_affine(prepared.grid_to_source_physical),
        interpolator, 0.0, sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(result)


def resample_to_source(grid_map: np.ndarray, prepared: PreprocessedVolume, *, order: int = 1) -> np.ndarray:
    """Carry a map on the working grid back onto the source series grid.

    Parameters
    ----------
    grid_map : numpy.ndarray
        ``(size, size, size)`` array on the working grid, indexed ``[z, y, x]``.
    prepared : PreprocessedVolume
        The preprocessing record of the same series.
    order : int
        1 for linear interpolation (scores), 0 for nearest neighbour (labels).

    Returns
    -------
    numpy.ndarray
        float32 array of the source shape ``(z, y, x)``; 0 where the source lies outside the grid.
    """
    if grid_map.shape != prepared.brain_mask.shape:
        raise ValueError(
            f"map shape {grid_map.shape} does not match the working grid {prepared.brain_mask.shape}"
        )
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1; got {order}")
    moving = sitk.GetImageFromArray(np.ascontiguousarray(grid_map, dtype=np.float32))
    moving.CopyInformation(_grid_image(prepared))
    reference = _source_image(prepared)
    interpolator = sitk.sitkLinear if order == 1 else sitk.sitkNearestNeighbor
    to_grid = _sitk_affine(np.linalg.inv(prepared.grid_to_source_physical))
    result = sitk.Resample(moving, reference, to_grid, interpolator, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(result)
