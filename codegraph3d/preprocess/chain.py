"""Preprocessing: N4, skull stripping, atlas registration, central crop, resampling, Nyul scaling.

The chain, per series. The paper registers the whole head to a with-skull atlas first and strips
afterwards; this product strips first and registers brain to brain (a brain-only template), so
the order differs from the paper's:

1. **N4 bias-field correction** (``bias_correction: n4``) inside the head, so that the skull
   stripper and the histogram landmarks see one tissue at one intensity across the field.
2. **Skull stripping** (``skull_strip``): deepbet, a warped template brain mask, HD-BET, or
   ``none`` (an intensity mask of already-stripped input); see :mod:`codegraph3d.preprocess.skullstrip`.
   Within a study, the T1w series' mask is carried to the other series by rigid registration
   (:func:`preprocess_study`), since deepbet was trained on T1w.
3. **Affine registration** of the brain to the brain-only MNI152 template
   (:mod:`codegraph3d.preprocess.registration`); the working grid is the template's central ``crop_mm``
   cube (156 mm), resampled to ``size^3`` (224) voxels: linear or B-spline for the image,
   nearest neighbour for the mask. Without registration the working grid is the brain's
   bounding cube in the series' own space.
4. **Nyul standardisation** of the brain intensities to the contrast's reference landmarks, then
   [0, 1] (:mod:`codegraph3d.preprocess.intensity`).
5. **QA** per series: brain volume, Dice of the brain mask against the warped template mask, the
   template brain's coverage by the field of view, anisotropy, the registration's own record;
   implausible values are warnings, impossible ones a :class:`PreprocessQAError` (the series is
   skipped with the reason).

The working grid is a cube aligned with the LPS axes (identity direction), so orientation is
handled by the resampling itself. The composed map from the working grid to the source series
grid is one 4x4 affine (:attr:`PreprocessedVolume.grid_to_source`), so any map computed on the
working grid goes back onto the source voxels exactly (up to the interpolation of the map).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from codegraph3d.preprocess.registration import RegistrationResult, Template, register_affine
from codegraph3d.core.transforms import affine_transform
from codegraph3d.core.volume import Volume, index_to_physical_matrix

if TYPE_CHECKING:  # run-time imports are local: skullstrip and intensity import this module
    from codegraph3d.preprocess.intensity import ReferenceLandmarks
    from codegraph3d.preprocess.skullstrip import BrainMaskResult

logger = logging.getLogger(__name__)

__all__ = [
    "EmptyBrainMaskError",
    "PreprocessConfig",
    "PreprocessQAError",
    "PreprocessedVolume",
    "SKULL_STRIP_CHOICES",
    "preprocess_study",
    "preprocess_volume",
    "resample_to_source",
    "resample_from_source",
]


SKULL_STRIP_CHOICES = ("none", "deepbet", "template", "hd-bet")


class EmptyBrainMaskError(ValueError):
    """Raised when no brain can be found in a series."""


class PreprocessQAError(ValueError):
    """A series fails quality control (not a brain, failed registration, brain mostly outside the
    field of view): it is skipped with this message as the reason, never scored silently.

    ``qa`` holds the measurements that failed it, for the report.
    """

    def __init__(self, message: str, qa: dict | None = None) -> None:
        super().__init__(message)
        self.qa = qa or {}


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
        (:mod:`codegraph3d.preprocess.registration`) and the working grid is the central ``crop_mm`` cube of
        the template, so the same anatomy lands in the same token across volumes.
    crop_mm : float
        Edge (mm) of the template-space cube with ``registration="affine"`` (156 in the paper).
    resolution_fwhm_mm : float
        When positive, each series is smoothed so that its effective resolution is this FWHM
        along every axis (an axis already coarser is left alone). Batch scoring compares volumes
        token by token: a 3 mm-slice series among 1 mm ones differs everywhere by its blur alone,
        which swamps lesions. 0 disables it (the paper's data was already isotropic).
    skull_strip : {"none", "deepbet", "template", "hd-bet"}
        ``none``: the input is already skull-stripped; the brain is an intensity mask.
        ``deepbet``: the deepbet CNN (weights in its wheel). ``template``: the template's brain
        mask warped onto the series by an affine registration of the head. ``hd-bet``: HD-BET,
        when installed with its weights under the model folder.
    carry_t1w_mask : bool
        Within a study, strip the T1w series (what deepbet was trained on) and carry its mask to
        the study's other series by rigid registration; a doubtful carry falls back to
        stripping that series itself.
    carry_t1w_registration : bool
        With a carried mask, also reuse the T1w series' template registration for the other
        series, composed with the rigid intra-study transform, instead of registering each
        contrast to the (T1w) template on its own; a doubtful T1w registration is not carried.
    bias_correction : {"none", "n4"}
        N4 bias-field correction (SimpleITK) before skull stripping and intensity scaling.
    interpolation : {"linear", "bspline"}
        Image interpolation onto the working grid (masks always use nearest neighbour).
    landmark_region : {"brain", "template"}
        Where the Nyul landmarks are measured: the whole brain mask, or (with registration) the
        part of it inside the registered template brain, so that masks of different extent (a
        skull stripper taking in more or less CSF) do not shift the landmarks.
    analysis_mask : {"subject", "template_intersection"}
        The region that is standardised, tokenised and scored: the subject's brain mask, or (with
        registration) its intersection with the registered template brain mask dilated by
        ``analysis_margin_mm``. Batch scoring compares every token with the same position in the
        other volumes; where subject masks end at different places (a stripper that takes in more
        or less of the CSF around the brain, input stripped elsewhere), the boundary tokens differ
        by the mask alone and score as anomalies. The intersection gives every volume nearly the
        same outer boundary. Lesions beyond the template brain (by more than the margin) are cut.
    analysis_margin_mm : float
        Dilation (mm) of the registered template brain mask for ``template_intersection``.
    brain_ml_warn : tuple of float
        Brain volumes (ml) outside this range are a QA warning (adult brains: about 1000-1700).
    brain_ml_fail : tuple of float
        Brain volumes outside this range mean the series is not a brain, or stripping failed:
        the series is skipped with the reason.
    template_dice_warn, template_dice_fail : float
        Dice of the subject's brain mask against the warped template mask on the working grid
        (registration only): below ``warn`` a warning, below ``fail`` a skip.
    fov_coverage_warn, fov_coverage_fail : float
        Fraction of the template brain (registration) that the series' field of view contains:
        below ``warn`` a "truncated field of view" warning (a skip when the registration is also
        doubtful: a partial brain is what misleads it), below ``fail`` a skip.
    anisotropy_warn : float
        Ratio of the largest to the smallest voxel edge above which a warning says that the
        series' through-plane resolution limits what tokens can show.
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
    skull_strip: str = "none"
    carry_t1w_mask: bool = True
    carry_t1w_registration: bool = False
    bias_correction: str = "none"
    interpolation: str = "linear"
    landmark_region: str = "brain"
    analysis_mask: str = "subject"
    analysis_margin_mm: float = 0.0
    # No volume bounds by default (phantoms, animal or paediatric data); the product's
    # configuration (default_config.yaml) sets adult brain ranges.
    brain_ml_warn: tuple[float, float] = (0.0, float("inf"))
    brain_ml_fail: tuple[float, float] = (0.0, float("inf"))
    template_dice_warn: float = 0.85
    template_dice_fail: float = 0.6
    fov_coverage_warn: float = 0.97
    fov_coverage_fail: float = 0.5
    anisotropy_warn: float = 4.0

    def __post_init__(self) -> None:
        if self.registration not in ("none", "affine"):
            raise ValueError(f"preprocess.registration must be 'none' or 'affine'; got {self.registration!r}")
        if self.skull_strip not in SKULL_STRIP_CHOICES:
            raise ValueError(
                f"preprocess.skull_strip must be one of {', '.join(SKULL_STRIP_CHOICES)}; got {self.skull_strip!r}"
            )
        if self.bias_correction not in ("none", "n4"):
            raise ValueError(f"preprocess.bias_correction must be 'none' or 'n4'; got {self.bias_correction!r}")
        if self.landmark_region not in ("brain", "template"):
            raise ValueError(f"preprocess.landmark_region must be 'brain' or 'template'; got {self.landmark_region!r}")
        if self.analysis_mask not in ("subject", "template_intersection"):
            raise ValueError(
                f"preprocess.analysis_mask must be 'subject' or 'template_intersection'; got {self.analysis_mask!r}"
            )
        if not self.analysis_margin_mm >= 0:
            raise ValueError(f"preprocess.analysis_margin_mm must be >= 0; got {self.analysis_margin_mm}")
        if self.interpolation not in ("linear", "bspline"):
            raise ValueError(f"preprocess.interpolation must be 'linear' or 'bspline'; got {self.interpolation!r}")
        for name in ("brain_ml_warn", "brain_ml_fail"):
            low, high = getattr(self, name)
            if not 0 <= low < high:
                raise ValueError(f"preprocess.{name} must be [low, high] with 0 <= low < high; got {getattr(self, name)}")
        for name in ("template_dice", "fov_coverage"):
            warn, fail = getattr(self, f"{name}_warn"), getattr(self, f"{name}_fail")
            if not 0.0 <= fail <= warn <= 1.0:
                raise ValueError(
                    f"preprocess.{name}_fail and {name}_warn must satisfy 0 <= fail <= warn <= 1; got {fail}, {warn}"
                )
        if not self.anisotropy_warn >= 1.0:
            raise ValueError(f"preprocess.anisotropy_warn must be >= 1; got {self.anisotropy_warn}")
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


def _scale_from_reference(
    image: np.ndarray,
    brain: np.ndarray,
    config: PreprocessConfig,
    reference: "ReferenceLandmarks | None",
    template_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Nyul standardisation to the contrast's reference (or the first version's uniform rule)."""
    if config.intensity_scaling == "landmarks" and reference is not None:
        from codegraph3d.preprocess.intensity import standardise

        qa = {"reference": reference.contrast, "source": reference.source, "landmark_region": "brain mask"}
        region = None
        if config.landmark_region == "template" and template_mask is not None:
            overlap = brain & template_mask
            # A region much smaller than the brain means a failed registration: QA reports that;
            # the landmarks then fall back to the whole mask rather than to a sliver.
            if overlap.sum() >= 0.5 * brain.sum():
                region = overlap
                qa["landmark_region"] = "brain mask within the registered template brain"
        return standardise(image, brain, reference, landmark_mask=region), qa
    return scale_intensities(image, brain, config), {"reference": config.intensity_scaling}


# Without registration, a brain cut by the field of view shows at least this fraction of its
# largest cross-section on a face of the array; a whole brain (tapering to vertex and poles) less.
TRUNCATION_EDGE_FRACTION = 0.4


def _within_template(brain: np.ndarray, template: np.ndarray, margin_voxels: float) -> np.ndarray:
    """``brain`` restricted to ``template`` dilated by ``margin_voxels``; ``brain`` if that empties it."""
    region = template
    if margin_voxels > 0:
        region = ndimage.distance_transform_edt(~template) <= margin_voxels
    kept = brain & region
    # A registration bad enough to miss the brain is QA's to report; scoring nothing helps no one.
    return kept if kept.any() else brain


def _edge_fraction(mask: np.ndarray) -> float:
    """Largest brain cross-section on a face of the array, relative to the axis' largest one.

    A brain tapers to its edges (vertex, poles), so a whole brain touches a face of its field of
    view with a small cross-section at most; a cut through the brain leaves a large one there.
    """
    worst = 0.0
    for axis in range(3):
        counts = mask.sum(axis=tuple(a for a in range(3) if a != axis)).astype(float)
        peak = counts.max()
        if peak > 0:
            worst = max(worst, counts[0] / peak, counts[-1] / peak)
    return float(worst)


def _fov_coverage(template_mask_grid: np.ndarray, grid_to_source: np.ndarray, source_shape_zyx: tuple) -> float:
    """Fraction of the template brain (on the working grid) whose source position is inside the FOV."""
    z, y, x = np.nonzero(template_mask_grid[::2, ::2, ::2])
    if x.size == 0:
        return 0.0
    points = grid_to_source @ np.stack([2.0 * x, 2.0 * y, 2.0 * z, np.ones(x.size)])
    upper = np.array(source_shape_zyx[::-1], float)[:, None] - 0.5
    inside = np.all((points[:3] >= -0.5) & (points[:3] <= upper), axis=0)
    return float(inside.mean())


def _quality_control(
    volume: Volume,
    brain_source: np.ndarray,
    brain_ml: float,
    brain_grid: np.ndarray,
    template_mask_grid: np.ndarray | None,
    grid_to_source: np.ndarray,
    config: PreprocessConfig,
    qa: dict,
) -> None:
    """Fill ``qa`` with the series' measurements and warnings; raise on an impossible series."""
    uid = volume.series_instance_uid or "(unnamed series)"
    warnings: list[str] = qa.setdefault("warnings", [])
    failures: list[str] = []
    _check_brain_volume(brain_ml, config, qa, warnings, failures)
    _check_voxels(volume, config, qa, warnings)
    edge = _edge_fraction(brain_source)
    qa["brain_edge_fraction"] = round(edge, 3)
    if template_mask_grid is None and edge > TRUNCATION_EDGE_FRACTION:
        warnings.append(
            f"truncated field of view: the brain is cut at the edge of the series (a cross-section "
            f"{edge:.0%} of its largest lies on the border)"
        )
    if template_mask_grid is not None:
        coverage = _fov_coverage(template_mask_grid, grid_to_source, tuple(volume.array.shape))
        _check_template_fit(brain_grid, template_mask_grid, coverage, config, qa, warnings, failures)
    registration_warning = qa.get("registration", {}).get("warning")
    if registration_warning:
        warnings.append(registration_warning)
    qa["status"] = "failed" if failures else ("warning" if warnings else "ok")
    if failures:
        qa["failures"] = failures
        raise PreprocessQAError(f"series {uid} fails quality control: " + "; ".join(failures), qa)


def _check_brain_volume(
    brain_ml: float, config: PreprocessConfig, qa: dict, warnings: list[str], failures: list[str]
) -> None:
    """The brain mask's volume against the plausible (warn) and possible (fail) ranges."""
    qa["brain_volume_ml"] = round(brain_ml, 1)
    low, high = config.brain_ml_fail
    if not low <= brain_ml <= high:
        failures.append(
            f"brain volume {brain_ml:.0f} ml is outside [{low:.0f}, {high:.0f}] ml: not a brain MR series, "
            "or skull stripping failed"
        )
    elif not config.brain_ml_warn[0] <= brain_ml <= config.brain_ml_warn[1]:
        warnings.append(
            f"implausible brain volume {brain_ml:.0f} ml (expected {config.brain_ml_warn[0]:.0f}-"
            f"{config.brain_ml_warn[1]:.0f} ml)"
        )


def _check_voxels(volume: Volume, config: PreprocessConfig, qa: dict, warnings: list[str]) -> None:
    """The voxel size and its anisotropy (thick slices hide small lesions along one axis)."""
    spacing = np.asarray(volume.spacing, float)
    anisotropy = float(spacing.max() / spacing.min())
    qa["voxel_mm"] = [round(float(v), 3) for v in spacing]
    qa["anisotropy"] = round(anisotropy, 2)
    if anisotropy > config.anisotropy_warn:
        warnings.append(
            f"anisotropic voxels {anisotropy:.1f}:1 ({spacing.max():.2f} mm): detail finer than that is "
            "lost along one axis, so small lesions may be missed"
        )


def _check_template_fit(
    brain_grid: np.ndarray,
    template_mask_grid: np.ndarray,
    coverage: float,
    config: PreprocessConfig,
    qa: dict,
    warnings: list[str],
    failures: list[str],
) -> None:
    """The brain mask against the registered template's: field-of-view coverage and overlap (Dice)."""
    overlap = np.logical_and(brain_grid, template_mask_grid).sum()
    dice = float(2.0 * overlap / max(brain_grid.sum() + template_mask_grid.sum(), 1))
    qa["template_dice"] = round(dice, 4)
    qa["fov_coverage"] = round(coverage, 4)
    if coverage < config.fov_coverage_fail:
        failures.append(f"only {coverage:.0%} of the template brain lies inside the field of view (truncated series)")
    elif coverage < config.fov_coverage_warn:
        if qa.get("registration", {}).get("doubtful"):
            # Part of the brain is missing and the alignment of the rest is in doubt: its tokens
            # would be compared with the wrong anatomy in every other volume.
            failures.append(
                f"truncated field of view ({1 - coverage:.0%} of the template brain outside the series) "
                "and a doubtful registration"
            )
        else:
            warnings.append(f"truncated field of view: {1 - coverage:.0%} of the template brain lies outside the series")
    if dice < config.template_dice_fail:
        failures.append(
            f"the brain mask matches the registered template mask with Dice {dice:.2f} < "
            f"{config.template_dice_fail}: registration or skull stripping failed"
        )
    elif dice < config.template_dice_warn:
        warnings.append(f"brain mask vs registered template mask Dice {dice:.2f} < {config.template_dice_warn}")


def _brain_mask_of(
    volume: Volume, config: PreprocessConfig, stripper: "Callable[[Volume], BrainMaskResult] | None"
) -> "BrainMaskResult":
    from codegraph3d.preprocess.skullstrip import intensity_brain_mask

    if config.skull_strip == "none" or stripper is None:
        if config.skull_strip != "none":
            raise ValueError(f"preprocess.skull_strip is {config.skull_strip!r} but no skull stripper was given")
        return intensity_brain_mask(volume, config.mask_threshold)
    return stripper(volume)


def _bias_corrected(volume: Volume, config: PreprocessConfig) -> tuple[Volume, dict]:
    if config.bias_correction == "none":
        return volume, {}
    from codegraph3d.preprocess.skullstrip import n4_bias_correct

    corrected, n4_qa = n4_bias_correct(volume)
    return corrected, {"bias_correction": n4_qa}


@dataclass(frozen=True)
class _WorkingGrid:
    """Where the cubic working grid lies, and how its physical space maps onto the series.

    Parameters
    ----------
    origin : numpy.ndarray
        Physical position (mm) of working voxel ``(0, 0, 0)``: template space when registered,
        else the series' LPS.
    spacing : float
        Isotropic working voxel size (mm).
    grid_to_subject : numpy.ndarray
        4x4 map from the grid's physical space to the series' LPS: identity, or the
        registration's template -> subject map.
    """

    origin: np.ndarray
    spacing: float
    grid_to_subject: np.ndarray


def _corrected_and_stripped(
    volume: Volume,
    config: PreprocessConfig,
    stripper: "Callable[[Volume], BrainMaskResult] | None",
    brain: "BrainMaskResult | None",
    bias_corrected: bool,
    qa: dict,
    steps: dict[str, float],
) -> tuple[Volume, "BrainMaskResult"]:
    """N4-correct the series unless done already, and skull-strip it unless a mask was given.

    The N4 QA goes into ``qa`` and the seconds of each step run into ``steps``.
    """
    clock = time.perf_counter()
    if not bias_corrected:
        volume, n4_qa = _bias_corrected(volume, config)
        qa.update(n4_qa)
        steps["bias_correction"] = time.perf_counter() - clock
    clock = time.perf_counter()
    if brain is None:
        brain = _brain_mask_of(volume, config, stripper)
        steps["skull_strip"] = time.perf_counter() - clock
    return volume, brain


def _checked_brain_mask(
    volume: Volume, brain: "BrainMaskResult", config: PreprocessConfig, qa: dict
) -> tuple[np.ndarray, float]:
    """The brain mask as booleans and its volume (ml); the stripper's QA goes into ``qa``.

    Raises
    ------
    ValueError
        When the mask is not on the series grid.
    EmptyBrainMaskError
        When it holds less than ``config.min_brain_ml``.
    """
    mask = np.asarray(brain.mask, bool)
    if mask.shape != volume.array.shape:
        raise ValueError(
            f"series {volume.series_instance_uid}: brain mask shape {mask.shape} does not match the series {volume.array.shape}"
        )
    qa["skull_strip"] = {"method": brain.method, **{k: v for k, v in brain.qa.items() if k != "warnings"}}
    qa["warnings"].extend(brain.qa.get("warnings", []))
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    brain_ml = float(mask.sum()) * voxel_ml
    if brain_ml < config.min_brain_ml:
        raise EmptyBrainMaskError(
            f"series {volume.series_instance_uid}: the brain mask is empty ({brain_ml:.2f} ml of tissue, "
            f"method {brain.method}); the series may be blank, not a brain, or not skull-stripped while "
            "preprocess.skull_strip is 'none'. Check the series, or set preprocess.skull_strip."
        )
    return mask, brain_ml


def _series_images(volume: Volume, mask: np.ndarray) -> tuple[sitk.Image, sitk.Image]:
    """The series as a float32 SimpleITK image, and its brain mask (uint8) on the same grid."""
    source_image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    mask_image = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_image.CopyInformation(source_image)
    return source_image, mask_image


def _place_working_grid(
    volume: Volume,
    mask: np.ndarray,
    source_image: sitk.Image,
    mask_image: sitk.Image,
    config: PreprocessConfig,
    template: Template | None,
    registration: RegistrationResult | None,
    qa: dict,
) -> _WorkingGrid:
    """Register the brain to the template (unless a registration is given) and place the grid.

    Without registration the grid is the brain's bounding cube in the series' own space. The
    registration's QA goes into ``qa``.
    """
    if config.registration != "affine":
        origin, spacing = _working_grid(volume, mask, config)
        return _WorkingGrid(origin, spacing, np.eye(4))
    if template is None:
        raise ValueError("preprocess.registration is 'affine' but no template was given")
    # Brain to brain: the template is skull-stripped, so the subject's brain alone is registered.
    if registration is None:
        moving = sitk.Mask(source_image, mask_image)
        registration = register_affine(moving, template)
    qa["registration"] = {
        **registration.qa,
        "template_to_subject": [[round(float(v), 6) for v in row] for row in registration.matrix],
    }
    spacing = config.crop_mm / config.size
    origin = template.centre_lps - config.crop_mm / 2.0 + spacing / 2.0
    return _WorkingGrid(origin, spacing, registration.matrix)


def _template_mask_on_grid(
    template: Template | None, reference_grid: sitk.Image, config: PreprocessConfig
) -> np.ndarray | None:
    """The registered template's brain mask on the working grid; ``None`` without registration."""
    if config.registration != "affine":
        return None
    return sitk.GetArrayFromImage(
        sitk.Resample(template.mask, reference_grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    ).astype(bool)


def _resample_onto_grid(
    source_image: sitk.Image,
    mask_image: sitk.Image,
    reference_grid: sitk.Image,
    transform: sitk.AffineTransform,
    config: PreprocessConfig,
    volume: Volume,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample the image and its brain mask onto the working grid.

    Returns
    -------
    image : numpy.ndarray
        float32 ``(size, size, size)``.
    brain_grid : numpy.ndarray
        The boolean brain mask on the grid.

    Raises
    ------
    EmptyBrainMaskError
        When no brain voxel lands on the grid.
    """
    interpolator = sitk.sitkBSpline if config.interpolation == "bspline" else sitk.sitkLinear
    resampled = sitk.Resample(source_image, reference_grid, transform, interpolator, 0.0, sitk.sitkFloat32)
    resampled_mask = sitk.Resample(mask_image, reference_grid, transform, sitk.sitkNearestNeighbor, 0)

    image = sitk.GetArrayFromImage(resampled).astype(np.float32)
    if config.interpolation == "bspline":
        # B-splines overshoot at edges; intensities are non-negative magnitudes.
        np.maximum(image, 0.0, out=image)
    brain_grid = sitk.GetArrayFromImage(resampled_mask).astype(bool)
    if not brain_grid.any():
        raise EmptyBrainMaskError(
            f"series {volume.series_instance_uid}: the brain mask is empty on the working grid; "
            "the series is too small or its geometry is broken."
        )
    return image, brain_grid


def _grid_to_source(volume: Volume, grid: _WorkingGrid) -> np.ndarray:
    """4x4 map from a continuous working index to the continuous source index."""
    grid_to_physical = index_to_physical_matrix(grid.origin, np.full(3, grid.spacing), np.eye(3))
    return np.linalg.inv(volume.index_to_physical) @ grid.grid_to_subject @ grid_to_physical


def _standardise_on_grid(
    image: np.ndarray,
    brain_grid: np.ndarray,
    template_mask_grid: np.ndarray | None,
    spacing: float,
    config: PreprocessConfig,
    reference: "ReferenceLandmarks | None",
    qa: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose the analysis mask and standardise the intensities within it.

    Returns
    -------
    image : numpy.ndarray
        The standardised image.
    analysis_grid : numpy.ndarray
        The analysis mask: the brain, or the brain within the registered template brain.
    """
    analysis_grid = brain_grid
    if config.analysis_mask == "template_intersection" and template_mask_grid is not None:
        analysis_grid = _within_template(brain_grid, template_mask_grid, config.analysis_margin_mm / spacing)
        qa["analysis_mask"] = {
            "region": "brain mask within the registered template brain",
            "margin_mm": config.analysis_margin_mm,
            "fraction_of_brain_kept": round(float(analysis_grid.sum()) / float(brain_grid.sum()), 4),
        }
    image, scaling_qa = _scale_from_reference(image, analysis_grid, config, reference, template_mask_grid)
    qa["intensity"] = scaling_qa
    return image, analysis_grid


def preprocess_volume(
    volume: Volume,
    config: PreprocessConfig | None = None,
    template: Template | None = None,
    *,
    stripper: "Callable[[Volume], BrainMaskResult] | None" = None,
    brain: "BrainMaskResult | None" = None,
    reference: "ReferenceLandmarks | None" = None,
    bias_corrected: bool = False,
    registration: RegistrationResult | None = None,
) -> PreprocessedVolume:
    """Bias-correct, skull-strip, register, crop, resample to ``size^3`` and standardise one series.

    Parameters
    ----------
    volume : Volume
        Source series with its geometry.
    config : PreprocessConfig, optional
        Settings; the dataclass defaults are the paper's 224^3 grid on skull-stripped,
        unregistered input (the product's configuration turns on N4, deepbet and registration).
    template : Template, optional
        Registration target; required when ``config.registration`` is ``affine``.
    stripper : callable, optional
        ``Volume -> BrainMaskResult`` (:func:`codegraph3d.preprocess.skullstrip.make_stripper`); required
        unless ``config.skull_strip`` is ``none`` or ``brain`` is given.
    brain : BrainMaskResult, optional
        A brain mask already made for this series (e.g. carried from the study's T1w series).
    reference : ReferenceLandmarks, optional
        Nyul reference of the series' contrast; ``None`` = uniform landmarks.
    bias_corrected : bool
        ``volume`` is already N4-corrected (skip that step).
    registration : RegistrationResult, optional
        A template registration already made for this series (e.g. the study's T1w registration
        carried by the rigid intra-study transform); used instead of registering it again.

    Returns
    -------
    PreprocessedVolume

    Raises
    ------
    EmptyBrainMaskError
        When the brain mask holds less than ``config.min_brain_ml`` of tissue.
    PreprocessQAError
        When the series fails quality control (see :class:`PreprocessConfig`).
    """
    config = config or PreprocessConfig()
    qa: dict = {"warnings": []}
    steps: dict[str, float] = {}
    volume, brain = _corrected_and_stripped(volume, config, stripper, brain, bias_corrected, qa, steps)
    mask, brain_ml = _checked_brain_mask(volume, brain, config, qa)
    source_image, mask_image = _series_images(volume, mask)
    clock = time.perf_counter()
    grid = _place_working_grid(volume, mask, source_image, mask_image, config, template, registration, qa)
    steps["registration"] = time.perf_counter() - clock
    clock = time.perf_counter()
    reference_grid = _grid_reference(grid.origin, grid.spacing, config.size)
    template_mask_grid = _template_mask_on_grid(template, reference_grid, config)
    # Smoothed here, not in a helper, so that the unsmoothed copy is released at once.
    if config.resolution_fwhm_mm > 0:
        source_image = harmonise_resolution(source_image, config.resolution_fwhm_mm)
    image, brain_grid = _resample_onto_grid(
        source_image, mask_image, reference_grid, affine_transform(grid.grid_to_subject), config, volume
    )
    steps["resample"] = time.perf_counter() - clock
    clock = time.perf_counter()
    image, analysis_grid = _standardise_on_grid(
        image, brain_grid, template_mask_grid, grid.spacing, config, reference, qa
    )
    steps["standardise"] = time.perf_counter() - clock

    grid_to_source = _grid_to_source(volume, grid)
    clock = time.perf_counter()
    _quality_control(volume, mask, brain_ml, brain_grid, template_mask_grid, grid_to_source, config, qa)
    steps["quality_control"] = time.perf_counter() - clock
    qa["step_seconds"] = {name: round(value, 3) for name, value in steps.items()}
    return PreprocessedVolume(
        image=image.astype(np.float32),
        brain_mask=analysis_grid,
        grid_origin=grid.origin,
        grid_spacing=float(grid.spacing),
        grid_to_source=grid_to_source,
        source_shape_zyx=tuple(int(v) for v in volume.array.shape),
        source_origin=volume.origin.copy(),
        source_spacing=volume.spacing.copy(),
        source_direction=volume.direction.copy(),
        brain_volume_ml=brain_ml,
        qa=qa,
    )


def _bias_correct_all(
    series: Sequence[tuple[Volume, str]], config: PreprocessConfig
) -> list[tuple[Volume, dict] | Exception]:
    """N4-correct each series; its QA carries the seconds under ``_seconds``, a failure its error."""
    corrected: list[tuple[Volume, dict] | Exception] = []
    for volume, _ in series:
        clock = time.perf_counter()
        try:
            volume_corrected, n4_qa = _bias_corrected(volume, config)
            corrected.append((volume_corrected, {**n4_qa, "_seconds": time.perf_counter() - clock}))
        except (ValueError, RuntimeError) as error:
            corrected.append(error)
    return corrected


def _carried_brain(
    anchor_volume: Volume, anchor_brain: "BrainMaskResult", target: Volume
) -> tuple["BrainMaskResult | None", float | None]:
    """The T1w brain mask carried onto ``target``.

    Returns
    -------
    brain : BrainMaskResult or None
        ``None`` when the carry failed or is doubtful: the series is then stripped itself.
    seconds : float or None
        Time the carry took; ``None`` when it raised.
    """
    from codegraph3d.preprocess.skullstrip import BrainMaskResult, carry_mask

    seconds = None
    clock = time.perf_counter()
    try:
        carried, carry_qa = carry_mask(anchor_volume, anchor_brain.mask, target)
        seconds = time.perf_counter() - clock
    except (ValueError, RuntimeError) as error:
        carried, carry_qa = None, {"doubtful": True, "error": str(error)}
    if carried is None or carry_qa.get("doubtful"):
        logger.warning(
            "series %s: carrying the T1w brain mask was doubtful (%s); stripping the series itself",
            target.series_instance_uid, carry_qa,
        )
        return None, seconds
    brain = BrainMaskResult(
        mask=carried,
        method=f"{anchor_brain.method} (carried from T1w series {anchor_volume.series_instance_uid})",
        qa={"carry": carry_qa, "t1w": anchor_brain.qa},
    )
    return brain, seconds


def _strip_with_t1w_carry(
    corrected: Sequence[tuple[Volume, dict] | Exception],
    anchor: int,
    stripper: "Callable[[Volume], BrainMaskResult]",
) -> tuple[list["BrainMaskResult | None"], list[float | None]]:
    """Strip the T1w series and carry its mask to the other series of the study.

    Returns
    -------
    brains : list
        Per series, its brain mask, or ``None`` where the series must be stripped itself.
    strip_seconds : list
        Per series, the seconds its mask took (stripping or carrying), or ``None``.
    """
    strip_seconds: list[float | None] = [None] * len(corrected)
    brains: list["BrainMaskResult | None"] = [None] * len(corrected)
    anchor_volume = corrected[anchor][0]
    clock = time.perf_counter()
    try:
        brains[anchor] = stripper(anchor_volume)
        strip_seconds[anchor] = time.perf_counter() - clock
    except (ValueError, RuntimeError) as error:
        logger.warning("series %s: T1w skull stripping failed (%s); each series is stripped alone",
                       anchor_volume.series_instance_uid, error)
    if brains[anchor] is None:
        return brains, strip_seconds
    for i, item in enumerate(corrected):
        if i == anchor or isinstance(item, Exception):
            continue
        brains[i], seconds = _carried_brain(anchor_volume, brains[anchor], item[0])
        if seconds is not None:
            strip_seconds[i] = seconds
    return brains, strip_seconds


def _record_study_steps(
    prepared: PreprocessedVolume,
    n4_qa: dict,
    n4_seconds: float,
    strip_seconds: float | None,
    config: PreprocessConfig,
) -> None:
    """Add the study-level N4 QA and the N4 and stripping times to a series' QA record."""
    prepared.qa.update(n4_qa)
    steps = prepared.qa["step_seconds"]
    if config.bias_correction != "none":
        steps["bias_correction"] = round(n4_seconds, 3)
    if strip_seconds is not None:
        steps["skull_strip"] = round(strip_seconds, 3)


def preprocess_study(
    series: Sequence[tuple[Volume, str]],
    config: PreprocessConfig | None = None,
    template: Template | None = None,
    *,
    stripper: "Callable[[Volume], BrainMaskResult] | None" = None,
    references: "Mapping[str, ReferenceLandmarks] | None" = None,
) -> list["PreprocessedVolume | Exception"]:
    """Preprocess the series of one study, sharing the T1w brain mask between them.

    deepbet (and HD-BET) were trained on T1w heads; when the study has a T1w series and
    ``config.carry_t1w_mask`` is on, that series is stripped and its mask carried to each other
    series by rigid intra-study registration (same head, same session). A doubtful carry falls
    back to stripping the series itself.

    Parameters
    ----------
    series : sequence of (Volume, contrast)
        The study's selected series and their contrasts (``"T1w"``, ``"T2w"``, ...).
    references : mapping, optional
        Nyul reference landmarks per contrast.

    Returns
    -------
    list
        Per input series, its :class:`PreprocessedVolume`, or the ``ValueError`` / ``OSError`` /
        ``RuntimeError`` that stopped it (so one bad series does not cost the others).
    """
    config = config or PreprocessConfig()
    references = references or {}
    corrected = _bias_correct_all(series, config)
    strip_seconds: list[float | None] = [None] * len(series)
    brains: list["BrainMaskResult | None"] = [None] * len(series)
    carries = config.carry_t1w_mask and config.skull_strip in ("deepbet", "hd-bet") and stripper is not None
    anchor = next(
        (i for i, (_, contrast) in enumerate(series) if contrast == "T1w" and not isinstance(corrected[i], Exception)),
        None,
    )
    if carries and anchor is not None and len(series) > 1:
        brains, strip_seconds = _strip_with_t1w_carry(corrected, anchor, stripper)
    results: list[PreprocessedVolume | Exception | None] = [None] * len(series)
    anchor_registration = None
    # The T1w series first: its registration may be carried to the others.
    order = sorted(range(len(series)), key=lambda i: i != anchor)
    for i in order:
        (_, contrast), item = series[i], corrected[i]
        if isinstance(item, Exception):
            results[i] = item
            continue
        volume, n4_qa = item
        n4_seconds = n4_qa.pop("_seconds")
        registration = None
        carry = (brains[i].qa or {}).get("carry") if brains[i] is not None and i != anchor else None
        if anchor_registration is not None and carry and "target_to_source" in carry:
            registration = _carried_registration(anchor_registration, carry, series[anchor][0])
        try:
            prepared = preprocess_volume(
                volume, config, template, stripper=stripper, brain=brains[i],
                reference=references.get(contrast), bias_corrected=True, registration=registration,
            )
            if (i == anchor and config.registration == "affine" and config.carry_t1w_registration
                    and not prepared.qa["registration"].get("doubtful")):
                anchor_registration = prepared.qa["registration"]
            _record_study_steps(prepared, n4_qa, n4_seconds, strip_seconds[i], config)
            results[i] = prepared
        except (ValueError, RuntimeError, OSError) as error:
            results[i] = error
    return results  # type: ignore[return-value]  # every slot is filled


def _carried_registration(anchor_qa: Mapping[str, Any], carry_qa: Mapping[str, Any], anchor: Volume) -> RegistrationResult:
    """The T1w series' template registration moved onto another series of the study.

    ``template -> T1w`` (the T1w registration) followed by ``T1w -> series`` (the inverse of the
    rigid carry's ``target_to_source``) maps template points onto the series.
    """
    template_to_anchor = np.asarray(anchor_qa["template_to_subject"], float)
    target_to_source = np.asarray(carry_qa["target_to_source"], float)
    matrix = np.linalg.inv(target_to_source) @ template_to_anchor
    qa = {key: value for key, value in anchor_qa.items() if key != "template_to_subject"}
    qa["carried_from"] = {
        "series_instance_uid": anchor.series_instance_uid,
        "rigid_metric": carry_qa.get("metric"),
        "rotation_deg": carry_qa.get("rotation_deg"),
        "translation_mm": carry_qa.get("translation_mm"),
    }
    return RegistrationResult(matrix=matrix, qa=qa)


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
        _source_image(prepared, source_map), _grid_image(prepared), affine_transform(prepared.grid_to_source_physical),
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
    to_grid = affine_transform(np.linalg.inv(prepared.grid_to_source_physical))
    result = sitk.Resample(moving, reference, to_grid, interpolator, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(result)
