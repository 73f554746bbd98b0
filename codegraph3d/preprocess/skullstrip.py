"""Skull stripping, N4 bias correction and intra-study brain-mask carry.

Clinical series show the whole head; the detector compares brains, so every series first loses its
skull, scalp and neck. Methods (``SKULL_STRIP_METHODS``):

* ``deepbet`` (default): the deepbet 1.0.2 convolutional brain extractor (two TorchScript models
  shipped in its wheel, nothing downloaded). deepbet expects an array in RAS canonical orientation;
  a series is reoriented exactly (axis flips and permutations, no interpolation), or, when it is
  strongly oblique, resampled onto an RAS-aligned isotropic grid. The mask comes back onto the
  source voxels through the inverse of the same map. Measured on the MNI152 brain seen through
  various grids (Dice against its mask): reorientation is as accurate as resampling for thick
  slices (1x1x5 mm: 0.971 both; 0.5x0.5x5 mm: 0.974 vs 0.968) and for up to ~13 degrees of
  obliquity (0.977 vs 0.976), and resampling wins beyond (32 degrees: 0.969 vs 0.976; 40 degrees,
  0.7x0.7x6 mm: 0.968 vs 0.976), so only strongly oblique series are resampled.
* ``template``: affine registration of the head to the brain-only MNI152 template
  (:mod:`codegraph3d.preprocess.registration`) and the template's brain mask warped back (nearest neighbour).
  Coarser than deepbet; a fallback when deepbet is unavailable.
* ``none``: the input is already skull-stripped; the mask is an intensity threshold.
* ``hd-bet``: HD-BET 2.x when it and its weights are installed under ``<model folder>/hd-bet/``.

:func:`n4_bias_correct` removes the smooth multiplicative receive-coil shading (SimpleITK N4) before
any of these. :func:`carry_mask` moves one series' brain mask onto another series of the same study
by a rigid, mutual-information registration, so that a study needs one network run, and the T2w or
FLAIR series inherits the mask of the T1w series, whose contrast deepbet was trained on.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from codegraph3d.preprocess.registration import Template, mattes_method, register_affine
from codegraph3d.core.optional import OptionalDependencyError, missing_message, missing_packages, optional_import
from codegraph3d.core.transforms import affine_transform, transform_matrix
from codegraph3d.core.volume import LPS_TO_RAS, Volume

__all__ = [
    "SKULL_STRIP_METHODS",
    "BrainMaskResult",
    "SkullStripError",
    "DeepBetStripper",
    "HDBetStripper",
    "brain_mask_from_intensity",
    "intensity_brain_mask",
    "template_brain_mask",
    "hdbet_available",
    "make_stripper",
    "head_mask",
    "n4_bias_correct",
    "n4_shrink_factors",
    "carry_mask",
    "carry_brain_mask",
]

SKULL_STRIP_METHODS = ("deepbet", "template", "none", "hd-bet")

DEEPBET_INSTALL = (
    "pip install deepbet==1.0.2 --no-deps && pip install connected-components-3d==4.1.1 fill_voids==2.1.2"
)
HDBET_FOLDER = "hd-bet"
HDBET_INSTALL = (
    "pip install hd-bet==2.0.1, then unpack HD-BET's released parameters (the folder holding "
    "dataset.json, plans.json and fold_all/checkpoint_final.pth) into MODEL_FOLDER/hd-bet/"
)
# A series is resampled for deepbet rather than reoriented when an index axis is more than this far
# from the nearest RAS axis (see the module docstring for the measurements behind it).
OBLIQUE_TOLERANCE_DEG = 20.0
# N4 fits its field on at most about this many voxels (a 1 mm 256 x 256 x 180 head shrunk by 4).
N4_MAX_FIT_VOXELS = 200_000
# The resampled working grid is capped so that a huge field of view cannot exhaust memory.
MAX_WORKING_VOXELS = 64_000_000
# Final Mattes metric of a rigid intra-study registration above which it is flagged as doubtful.
CARRY_DOUBTFUL_METRIC = -0.15
# Between two series of one session the head rarely moves more than this; a larger recovered motion
# is more likely a failed registration than a real one.
CARRY_PLAUSIBLE_SHIFT_MM = 20.0
CARRY_PLAUSIBLE_ROTATION_DEG = 15.0


class SkullStripError(ValueError):
    """Raised when a brain mask cannot be produced; the message names the series and the fix."""


@dataclass
class BrainMaskResult:
    """A brain mask on the source grid of one series, with the method that made it and its QA.

    Attributes
    ----------
    mask : numpy.ndarray
        Boolean, shape ``(z, y, x)`` of the source series.
    method : str
        The method that produced it, e.g. ``"deepbet"``, ``"template"``, ``"intensity"``,
        ``"deepbet (carried from T1w series <uid>)"``.
    qa : dict
        JSON-serialisable record: ``seconds``, ``brain_volume_ml``, method details and a
        ``warnings`` list.
    """

    mask: np.ndarray
    method: str
    qa: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# small helpers


def _series_name(volume: Volume) -> str:
    return f"series {volume.series_instance_uid or '<no SeriesInstanceUID>'}"


def _voxel_ml(volume: Volume) -> float:
    return float(np.prod(volume.spacing)) / 1000.0


def _check_mask_shape(name: str, mask: np.ndarray, volume: Volume) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != volume.array.shape:
        raise ValueError(
            f"{name} has shape {mask.shape} but {_series_name(volume)} has shape {volume.array.shape} "
            "(z, y, x); pass a mask computed on this series' grid"
        )
    return mask.astype(bool)


def _brain_qa(mask: np.ndarray, volume: Volume, warnings: list[str]) -> dict[str, Any]:
    """Volume of the mask (its plausibility is judged by the preprocessing QA, with configured ranges)."""
    brain_ml = float(mask.sum()) * _voxel_ml(volume)
    return {"brain_volume_ml": round(brain_ml, 2)}


def _mask_image(mask: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(mask, dtype=np.uint8))
    image.CopyInformation(like)
    return image


def _largest_component_filled(mask: np.ndarray) -> np.ndarray:
    """Largest 26-connected component with its interior holes filled (all False if empty)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))


# --------------------------------------------------------------------------------------------------
# head mask and N4


def head_mask(volume_or_image: Volume | sitk.Image | np.ndarray) -> np.ndarray:
    """Where the head is: Otsu foreground, closed, largest component, holes filled.

    Parameters
    ----------
    volume_or_image : Volume, SimpleITK.Image or numpy.ndarray
        A 3-D head image (array ``[z, y, x]``).

    Returns
    -------
    numpy.ndarray
        Boolean mask of the array's shape; all False for a constant image.
    """
    if isinstance(volume_or_image, Volume):
        array = volume_or_image.array
    elif isinstance(volume_or_image, sitk.Image):
        array = sitk.GetArrayFromImage(volume_or_image)
    else:
        array = np.asarray(volume_or_image)
    if array.ndim != 3:
        raise ValueError(f"head_mask needs a 3-D image; got shape {array.shape}")
    array = np.nan_to_num(np.asarray(array, dtype=np.float32))
    low, high = np.percentile(array, [0.5, 99.5])
    if not high > low:
        return np.zeros(array.shape, dtype=bool)
    # A few hot voxels (vessels, fat, artefacts) would pull Otsu's threshold up into the tissue.
    clipped = sitk.GetImageFromArray(np.clip(array, low, high))
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(128)
    otsu.Execute(clipped)
    foreground = array > otsu.GetThreshold()
    # The dark skull separates scalp from brain; a closing bridges thin gaps before the component.
    # (Edge padding: scipy's erosion treats outside the array as background and would peel the
    # head off a face the field of view cuts through.)
    padded = np.pad(foreground, 2, mode="edge")
    foreground = ndimage.binary_closing(padded, structure=np.ones((3, 3, 3)), iterations=2)[2:-2, 2:-2, 2:-2]
    mask = _largest_component_filled(foreground)
    # A field of view that cuts through the head (the neck, often the vertex) leaves the interior
    # open at that face, where a 3-D fill cannot reach; filling the planes parallel to the face
    # closes it.
    for axis in range(3):
        if not (np.take(mask, 0, axis=axis).any() or np.take(mask, -1, axis=axis).any()):
            continue
        filled = np.stack(
            [ndimage.binary_fill_holes(plane) for plane in np.moveaxis(mask, axis, 0)], axis=0
        )
        mask |= np.moveaxis(filled, 0, axis)
    return mask


# template_brain_mask takes a ``head_mask`` argument, which hides the function inside it.
_head_mask = head_mask


def n4_shrink_factors(spacing: np.ndarray, size_xyz: tuple[int, int, int], shrink_factor: int) -> list[int]:
    """Per-axis shrink factors that bring voxels towards ``shrink_factor`` times the finest spacing.

    A 0.5 x 0.5 x 5 mm series shrinks in-plane only; no axis is shrunk below 16 voxels (or at all
    when it has fewer), so the B-spline fit keeps support along thick-slice axes. When the shrunk
    image would still exceed ``N4_MAX_FIT_VOXELS`` (fine in-plane matrices), the target spacing
    grows until it does not: the fit's cost is proportional to its voxels, and a field with a few
    control points per axis needs no finer sampling.
    """
    target = shrink_factor * float(np.min(spacing))
    while True:
        factors = []
        for step, size in zip(spacing, size_xyz):
            factor = max(1, round(target / float(step)))
            factors.append(max(1, min(factor, size // 16)))
        shrunk = np.prod([size // factor for size, factor in zip(size_xyz, factors)])
        if shrunk <= N4_MAX_FIT_VOXELS or all(f == max(1, size // 16) for f, size in zip(factors, size_xyz)):
            return factors
        target *= 1.25


def n4_bias_correct(
    volume: Volume,
    *,
    shrink_factor: int = 4,
    iterations: tuple[int, ...] = (50, 50, 30),
    mask: np.ndarray | None = None,
    convergence_threshold: float = 1e-3,
) -> tuple[Volume, dict[str, Any]]:
    """Remove a smooth multiplicative bias field with SimpleITK's N4.

    The field is fitted on a shrunk copy (fast) and its log, a B-spline defined over the whole
    physical extent, is evaluated at full resolution and divided out, so the result is not blurred.

    Parameters
    ----------
    volume : Volume
        The series (any geometry, any intensity scale).
    shrink_factor : int
        Shrinking of the finest axis for the fit; coarser axes shrink less, and fine matrices more
        (see ``n4_shrink_factors``).
    iterations : tuple of int
        Maximum iterations per fitting level; the number of entries is the number of levels.
    mask : numpy.ndarray, optional
        Voxels that drive the fit, shape ``(z, y, x)``; default :func:`head_mask`. Non-positive
        voxels are always excluded (N4 works on log intensities).
    convergence_threshold : float
        N4's convergence threshold per level.

    Returns
    -------
    tuple of (Volume, dict)
        The corrected volume (same geometry, provenance and metadata, ``float32``), and a QA record:
        ``seconds``, ``shrink_factors``, ``iterations`` (run per level), ``field_min``/``field_max``
        (the multiplicative field inside the mask), ``warnings``.
    """
    if shrink_factor < 1:
        raise ValueError(f"n4 shrink_factor must be >= 1; got {shrink_factor}")
    if len(iterations) == 0 or any(int(v) < 1 for v in iterations):
        raise ValueError(f"n4 iterations must be a non-empty tuple of positive integers; got {iterations}")
    start = time.perf_counter()
    warnings: list[str] = []
    fit_mask = head_mask(volume) if mask is None else _check_mask_shape("n4 mask", mask, volume)
    fit_mask = fit_mask & (volume.array > 0)
    if fit_mask.sum() < 1000:
        raise SkullStripError(
            f"{_series_name(volume)}: N4 bias correction found only {int(fit_mask.sum())} positive head "
            "voxels; the series is blank or tiny. Check the series or exclude it from the input."
        )
    image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    mask_image = _mask_image(fit_mask, image)
    factors = n4_shrink_factors(volume.spacing, volume.shape_xyz, int(shrink_factor))
    small = sitk.Shrink(image, factors)
    small_mask = sitk.Shrink(mask_image, factors)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(v) for v in iterations])
    corrector.SetConvergenceThreshold(float(convergence_threshold))
    corrector.Execute(small, small_mask)
    # float32 throughout, in place: at full resolution each float64 copy of a 0.5 mm series is
    # about half a gigabyte, and the field is smooth and near 1, far from float32's limits.
    field = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image)).astype(np.float32, copy=False)
    np.exp(field, out=field)
    corrected = np.divide(volume.array, field, dtype=np.float32)
    inside = field[fit_mask].astype(np.float64)
    del field
    qa: dict[str, Any] = {
        "seconds": round(time.perf_counter() - start, 3),
        "shrink_factors": factors,
        "iterations": [int(v) for v in iterations],
        "field_min": round(float(inside.min()), 4),
        "field_max": round(float(inside.max()), 4),
        "warnings": warnings,
    }
    if inside.max() / inside.min() > 5.0:
        warnings.append(
            f"N4 bias field spans a factor {inside.max() / inside.min():.1f} inside the head; "
            "the coil shading is extreme or the fit diverged"
        )
    result = replace(
        volume,
        array=corrected,
        origin=volume.origin.copy(),
        spacing=volume.spacing.copy(),
        direction=volume.direction.copy(),
        sop_instance_uids=list(volume.sop_instance_uids),
        metadata=dict(volume.metadata),
    )
    return result, qa


# --------------------------------------------------------------------------------------------------
# deepbet

# The RAS-aligned grid written in LPS: index x grows towards Right, y towards Anterior, z Superior.
_RAS_GRID_DIRECTION = LPS_TO_RAS[:3, :3]


def _obliquity_deg(direction: np.ndarray) -> float:
    """Largest angle (degrees) between an index axis and the physical axis nearest to it."""
    cosines = np.abs(np.asarray(direction)).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


def _ras_working_grid(volume: Volume, spacing_mm: float) -> sitk.Image:
    """An RAS-aligned isotropic grid covering the physical extent of the series' voxels."""
    size = np.array(volume.shape_xyz, dtype=float)
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size], indexing="ij")).reshape(3, -1)
    points = (volume.index_to_physical @ np.vstack([corners, np.ones(corners.shape[1])]))[:3]
    grid_coords = _RAS_GRID_DIRECTION.T @ points
    low, high = grid_coords.min(axis=1), grid_coords.max(axis=1)
    spacing = float(spacing_mm)
    while np.prod(np.ceil((high - low) / spacing)) > MAX_WORKING_VOXELS:
        spacing *= 1.25
    shape = np.maximum(np.ceil((high - low) / spacing).astype(int), 1)
    origin = _RAS_GRID_DIRECTION @ (low + spacing / 2.0)
    reference = sitk.Image([int(v) for v in shape], sitk.sitkFloat32)
    reference.SetOrigin(tuple(float(v) for v in origin))
    reference.SetSpacing((spacing,) * 3)
    reference.SetDirection(tuple(_RAS_GRID_DIRECTION.flatten()))
    return reference


def _reorientation(volume: Volume) -> np.ndarray:
    """nibabel orientation (axis, flip) taking the ``[x, y, z]`` array to RAS canonical."""
    import nibabel as nib

    return nib.io_orientation(LPS_TO_RAS @ volume.index_to_physical)


def _device(device: str) -> Any:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise SkullStripError(f"skull stripping device {device!r} is not a torch device; use 'cpu' or 'cuda'") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise SkullStripError(
            f"skull stripping device {device!r} was requested but torch sees no CUDA device; use device 'cpu'"
        )
    return parsed


class DeepBetStripper:
    """deepbet brain extraction of a :class:`Volume`, mask returned on the source grid.

    Parameters
    ----------
    device : str
        Torch device for the two networks (``"cpu"``, ``"cuda"``, ``"cuda:1"``). deepbet itself
        would take any GPU it sees; here the models go where this says.
    threshold : float
        Probability above which a voxel is brain.
    resample_mm : float or None
        Isotropic spacing of the RAS-aligned grid onto which strongly oblique series (an axis more
        than ``OBLIQUE_TOLERANCE_DEG`` from the nearest RAS axis) are resampled for the network.
        ``None``: never resample; every series is only reoriented (axis flips and permutations),
        its voxels passed as they are.
    num_threads : int, optional
        When given, ``torch.set_num_threads`` (process-wide) before inference.

    Raises
    ------
    SkullStripError
        When deepbet is not installed (the message gives the pip command) or the device is absent.
    """

    def __init__(
        self,
        device: str = "cpu",
        threshold: float = 0.5,
        resample_mm: float | None = 1.0,
        *,
        num_threads: int | None = None,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"deepbet threshold must be in (0, 1); got {threshold}")
        if resample_mm is not None and not 0.25 <= resample_mm <= 4.0:
            raise ValueError(f"deepbet resample_mm must be in [0.25, 4] mm or None; got {resample_mm}")
        import torch

        try:
            BrainExtraction = optional_import(
                "deepbet.bet", "skull stripping method 'deepbet'", DEEPBET_INSTALL,
                "choose preprocess.skull_strip 'template' or 'none'",
            ).BrainExtraction
        except OptionalDependencyError as error:
            raise SkullStripError(str(error)) from error
        self.device = _device(device)
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        # no_gpu=True keeps deepbet from choosing a device itself; the models then move to ours.
        self._bet = BrainExtraction(no_gpu=True)
        self._bet.model.to(self.device)
        self._bet.bbox_model.to(self.device)
        self.threshold = float(threshold)
        self.resample_mm = None if resample_mm is None else float(resample_mm)

    def needs_resampling(self, volume: Volume) -> bool:
        """Whether ``volume`` goes through the resampled path (see ``resample_mm``)."""
        if self.resample_mm is None:
            return False
        return _obliquity_deg(volume.direction) > OBLIQUE_TOLERANCE_DEG

    def _predict(self, ras: np.ndarray, volume: Volume) -> np.ndarray:
        """deepbet's probability map -> thresholded, largest component, voids filled (RAS array)."""
        try:
            probability = self._bet.run_model(np.ascontiguousarray(ras, dtype=np.float32))
            mask = probability > self.threshold
            if not mask.any():
                raise ValueError("no voxel above threshold")
            mask = self._bet.postprocess(mask)
        except (ValueError, AssertionError) as error:
            raise SkullStripError(
                f"{_series_name(volume)}: deepbet found no brain ({error}); the series may be blank, a "
                "localizer or not a head. Check the series, exclude it, or use preprocess skull_strip "
                "'template' (registration) or 'none' (already skull-stripped input)"
            ) from error
        return np.asarray(mask, dtype=bool)

    def __call__(self, volume: Volume) -> BrainMaskResult:
        """Brain mask of ``volume`` on its own grid.

        Raises
        ------
        SkullStripError
            When deepbet finds no brain, naming the series.
        """
        start = time.perf_counter()
        warnings: list[str] = []
        details: dict[str, Any] = {
            "device": str(self.device),
            "threshold": self.threshold,
            "obliquity_deg": round(_obliquity_deg(volume.direction), 2),
        }
        if self.needs_resampling(volume):
            source = volume.to_sitk()
            reference = _ras_working_grid(volume, self.resample_mm)
            working = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            # The grid's x, y, z index axes point to R, A, S, so [z, y, x] transposed is RAS [i, j, k].
            ras = sitk.GetArrayFromImage(working).transpose(2, 1, 0)
            mask_ras = self._predict(ras, volume)
            mask_working = _mask_image(mask_ras.transpose(2, 1, 0), reference)
            # Linear interpolation of the binary mask, cut at 0.5, puts the boundary half-way
            # between working voxels wherever the source grid samples it.
            back = sitk.Resample(
                sitk.Cast(mask_working, sitk.sitkFloat32), source, sitk.Transform(), sitk.sitkLinear, 0.0,
                sitk.sitkFloat32,
            )
            mask = _largest_component_filled(sitk.GetArrayFromImage(back) >= 0.5)
            details.update(
                mode="resampled",
                working_spacing_mm=float(reference.GetSpacing()[0]),
                working_shape_xyz=list(reference.GetSize()),
            )
        else:
            import nibabel as nib

            orientation = _reorientation(volume)
            ras = nib.apply_orientation(volume.array.transpose(2, 1, 0), orientation)
            mask_ras = self._predict(ras, volume)
            inverse = nib.orientations.ornt_transform(np.array([[0, 1], [1, 1], [2, 1]]), orientation)
            mask = nib.apply_orientation(mask_ras, inverse).transpose(2, 1, 0).astype(bool)
            details.update(mode="reoriented", orientation=orientation.astype(int).tolist())
        if not mask.any():
            raise SkullStripError(
                f"{_series_name(volume)}: the deepbet brain mask is empty on the source grid; the series "
                "may be a thin slab or not a head. Check the series or exclude it from the input."
            )
        touching = [
            name
            for name, axis in (("x", 2), ("y", 1), ("z", 0))
            if np.take(mask, 0, axis=axis).any() or np.take(mask, -1, axis=axis).any()
        ]
        if touching:
            warnings.append(
                f"the brain mask touches the field-of-view border along {', '.join(touching)}; part of "
                "the brain may lie outside the series"
            )
        qa: dict[str, Any] = {"method": "deepbet", **details}
        qa.update(_brain_qa(mask, volume, warnings))
        qa["seconds"] = round(time.perf_counter() - start, 3)
        qa["warnings"] = warnings
        return BrainMaskResult(mask=mask, method="deepbet", qa=qa)


# --------------------------------------------------------------------------------------------------
# intensity and template masks


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


def intensity_brain_mask(volume: Volume, threshold_fraction: float = 0.05) -> BrainMaskResult:
    """Brain mask of already skull-stripped input: intensity threshold, largest component, filled.

    Wraps :func:`brain_mask_from_intensity`.

    Raises
    ------
    SkullStripError
        When nothing is above the threshold (a blank series), naming the series.
    """
    if not 0.0 < threshold_fraction < 1.0:
        raise ValueError(f"threshold_fraction must be in (0, 1); got {threshold_fraction}")
    start = time.perf_counter()
    mask = brain_mask_from_intensity(volume.array, threshold_fraction)
    if not mask.any():
        raise SkullStripError(
            f"{_series_name(volume)}: no voxel above {threshold_fraction:.0%} of the 99th intensity "
            "percentile; the series is blank. Check the series or exclude it from the input."
        )
    warnings: list[str] = []
    qa: dict[str, Any] = {"method": "intensity", "threshold_fraction": float(threshold_fraction)}
    qa.update(_brain_qa(mask, volume, warnings))
    qa["seconds"] = round(time.perf_counter() - start, 3)
    qa["warnings"] = warnings
    return BrainMaskResult(mask=mask, method="intensity", qa=qa)


def template_brain_mask(
    volume: Volume, template: Template, *, head_mask: np.ndarray | None = None
) -> BrainMaskResult:
    """Brain mask from an affine registration of the head to the brain-only MNI152 template.

    The (bias-corrected) head, background zeroed outside ``head_mask``, is registered with
    :func:`codegraph3d.preprocess.registration.register_affine` (Mattes MI sampled inside the template brain,
    so scalp and skull weigh little); the template's brain mask is then warped onto the source grid
    (nearest neighbour) and kept inside the head.

    Parameters
    ----------
    volume : Volume
        Whole-head series, preferably N4-corrected.
    template : Template
        The registration template (``load_template``).
    head_mask : numpy.ndarray, optional
        Where the head is on the source grid; default :func:`head_mask`.

    Raises
    ------
    SkullStripError
        When the warped mask is empty (registration failed), naming the series.
    """
    start = time.perf_counter()
    warnings: list[str] = []
    head = _head_mask(volume) if head_mask is None else _check_mask_shape("head_mask", head_mask, volume)
    if not head.any():
        raise SkullStripError(
            f"{_series_name(volume)}: no head found (the image is constant); check the series or exclude it"
        )
    source = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    moving = sitk.Mask(source, _mask_image(head, source))
    result = register_affine(moving, template)
    # result.matrix maps template points to subject points; Resample pulls each source voxel's
    # template point, so it needs the inverse.
    to_template = affine_transform(np.linalg.inv(result.matrix))
    warped = sitk.Resample(template.mask, source, to_template, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    mask = sitk.GetArrayFromImage(warped).astype(bool) & head
    if not mask.any():
        raise SkullStripError(
            f"{_series_name(volume)}: the template brain mask lands outside the head after registration "
            f"({result.qa.get('stop_condition', '')}); the series may not be a head. Check it or exclude it."
        )
    if result.doubtful:
        warnings.append(str(result.qa.get("warning", "template registration doubtful")))
    qa: dict[str, Any] = {"method": "template", "registration": result.qa}
    qa.update(_brain_qa(mask, volume, warnings))
    qa["seconds"] = round(time.perf_counter() - start, 3)
    qa["warnings"] = warnings
    return BrainMaskResult(mask=mask, method="template", qa=qa)


# --------------------------------------------------------------------------------------------------
# HD-BET


def _hdbet_weights(model_path: str | Path | None) -> Path | None:
    if model_path is None:
        return None
    folder = Path(model_path) / HDBET_FOLDER
    checkpoint = folder / "fold_all" / "checkpoint_final.pth"
    if checkpoint.is_file() and (folder / "plans.json").is_file() and (folder / "dataset.json").is_file():
        return folder
    return None


def _hdbet_where(model_path: str | Path | None) -> str:
    return "no model folder was given" if model_path is None else f"{Path(model_path) / HDBET_FOLDER}"


def hdbet_available(model_path: str | Path | None) -> bool:
    """True when HD-BET (and nnU-Net v2, which runs it) is importable and its weights are installed.

    The weights are HD-BET 2.x's released nnU-Net model folder, expected at
    ``<model_path>/hd-bet/`` (``dataset.json``, ``plans.json``, ``fold_all/checkpoint_final.pth``).
    Nothing is downloaded.
    """
    return not missing_packages("HD_BET", "nnunetv2") and _hdbet_weights(model_path) is not None


class HDBetStripper:
    """HD-BET 2.x brain extraction through nnU-Net v2's predictor, on the RAS canonical array.

    Parameters
    ----------
    model_path : str or Path
        Model folder holding ``hd-bet/`` (see :func:`hdbet_available`).
    device : str
        Torch device.

    Raises
    ------
    SkullStripError
        When HD-BET, nnU-Net v2 or the weights are missing; the message says how to install them.
    """

    def __init__(self, model_path: str | Path | None, device: str = "cpu") -> None:
        missing = missing_packages("HD_BET", "nnunetv2")
        weights = _hdbet_weights(model_path)
        if missing:
            raise SkullStripError(missing_message(
                "skull stripping method 'hd-bet'", missing, HDBET_INSTALL, "use the default method 'deepbet'",
                detail="" if weights is not None else f"and its weights are missing: {_hdbet_where(model_path)}",
            ))
        if weights is None:
            raise SkullStripError(
                f"skull stripping method 'hd-bet' is not available: its weights are missing "
                f"({_hdbet_where(model_path)}); install them as {HDBET_INSTALL} says, or use the default method 'deepbet'"
            )
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.device = _device(device)
        self._predictor = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=True,
            device=self.device, verbose=False, verbose_preprocessing=False,
        )
        self._predictor.initialize_from_trained_model_folder(str(weights), "all")

    def __call__(self, volume: Volume) -> BrainMaskResult:
        """Brain mask of ``volume`` on its own grid (exact reorientation, no resampling)."""
        import nibabel as nib

        start = time.perf_counter()
        orientation = _reorientation(volume)
        ras = nib.apply_orientation(volume.array.transpose(2, 1, 0), orientation)
        # orientation[n] = (RAS axis, flip) of source index axis n (x, y, z).
        spacing_ijk = np.empty(3)
        for axis_n, (ras_axis, _) in enumerate(orientation):
            spacing_ijk[int(ras_axis)] = volume.spacing[axis_n]
        # nnU-Net takes [channel, *spatial] with the spacing of each spatial axis, in the order that
        # SimpleITK reads an RAS NIfTI: [k, j, i].
        image = np.ascontiguousarray(ras.transpose(2, 1, 0)[None], dtype=np.float32)
        segmentation = self._predictor.predict_single_npy_array(
            image, {"spacing": [float(v) for v in spacing_ijk[::-1]]}, None, None, False
        )
        mask_ras = np.asarray(segmentation).transpose(2, 1, 0) > 0
        inverse = nib.orientations.ornt_transform(np.array([[0, 1], [1, 1], [2, 1]]), orientation)
        mask = _largest_component_filled(nib.apply_orientation(mask_ras, inverse).transpose(2, 1, 0))
        if not mask.any():
            raise SkullStripError(
                f"{_series_name(volume)}: HD-BET found no brain; check the series or exclude it from the input"
            )
        warnings: list[str] = []
        qa: dict[str, Any] = {"method": "hd-bet", "device": str(self.device)}
        qa.update(_brain_qa(mask, volume, warnings))
        qa["seconds"] = round(time.perf_counter() - start, 3)
        qa["warnings"] = warnings
        return BrainMaskResult(mask=mask, method="hd-bet", qa=qa)


# --------------------------------------------------------------------------------------------------
# method selection


def make_stripper(
    method: str,
    *,
    model_path: str | Path | None = None,
    template: Template | None = None,
    device: str = "cpu",
    **options: Any,
) -> Callable[[Volume], BrainMaskResult]:
    """The skull stripper for ``method``, built once and applied to each volume.

    Parameters
    ----------
    method : str
        One of ``SKULL_STRIP_METHODS``.
    model_path : str or Path, optional
        Model folder (HD-BET weights under ``hd-bet/``).
    template : Template, optional
        Required by ``"template"``.
    device : str
        Torch device for ``"deepbet"`` and ``"hd-bet"``.
    **options
        Extra keyword arguments of :class:`DeepBetStripper` (``threshold``, ``resample_mm``,
        ``num_threads``) or of :func:`intensity_brain_mask` (``threshold_fraction``).

    Raises
    ------
    ValueError
        For an unknown method or options it does not take.
    SkullStripError
        When the method's requirements are missing (package, weights, template).
    """
    if method not in SKULL_STRIP_METHODS:
        raise ValueError(
            f"unknown skull stripping method {method!r}; choose one of {', '.join(SKULL_STRIP_METHODS)}"
        )
    allowed = {"deepbet": {"threshold", "resample_mm", "num_threads"}, "none": {"threshold_fraction"}}
    unexpected = sorted(set(options) - allowed.get(method, set()))
    if unexpected:
        raise ValueError(
            f"skull stripping method {method!r} takes no option(s) {', '.join(unexpected)}; "
            f"it takes {sorted(allowed.get(method, set())) or 'none'}"
        )
    if method == "deepbet":
        return DeepBetStripper(device=device, **options)
    if method == "none":
        return functools.partial(intensity_brain_mask, **options)
    if method == "template":
        if template is None:
            raise SkullStripError(
                "skull stripping method 'template' needs the registration template; pass -m MODEL_FOLDER "
                "and run 'python -m codegraph3d template install MODEL_FOLDER'"
            )
        return functools.partial(template_brain_mask, template=template)
    return HDBetStripper(model_path, device=device)


# --------------------------------------------------------------------------------------------------
# carrying a mask between series of one study


def _bin_factors(spacing: np.ndarray, working_mm: float) -> list[int]:
    """Integer block-averaging factors per axis bringing ``spacing`` up to about ``working_mm``."""
    return [max(1, round(working_mm / float(step))) for step in spacing]


@dataclass(frozen=True)
class _RigidFit:
    """The rigid registration of a target series onto the source series of a mask carry.

    Parameters
    ----------
    transform : SimpleITK.Euler3DTransform
        Maps target LPS points to source LPS points.
    matrix : numpy.ndarray
        The same as a 4x4 matrix.
    stop : str
        The optimiser's stop condition.
    metric : float
        Final Mattes mutual information (negative; lower is better).
    iterations : int
        Optimiser iterations of the last level.
    rotation_deg, shift_mm : float
        Rotation angle, and displacement of the source brain centre.
    """

    transform: sitk.Euler3DTransform
    matrix: np.ndarray
    stop: str
    metric: float
    iterations: int
    rotation_deg: float
    shift_mm: float


def _frame_of_reference_warnings(source: Volume, target: Volume) -> list[str]:
    """A warning when the two series name different patient frames, else nothing."""
    warnings: list[str] = []
    frames = [v.metadata.get("frame_of_reference_uid") for v in (source, target)]
    if all(frames) and frames[0] != frames[1]:
        warnings.append(
            "the two series have different FrameOfReferenceUIDs; their patient frames may not coincide, "
            "so the identity start can be far off"
        )
    return warnings


def _carry_metric_region(
    source_mask_image: sitk.Image, fixed: sitk.Image, margin_mm: float, source: Volume, target: Volume
) -> tuple[sitk.Image, float]:
    """The metric's mask on the fixed (target) grid and the sampling fraction that goes with it.

    Raises
    ------
    SkullStripError
        When the source brain barely lands on the target grid.
    """
    # The metric is sampled on the fixed (target) grid, restricted to where the source brain lands
    # under the identity start, dilated: the target's own neck and shoulders stay out of it.
    landed = sitk.Resample(
        sitk.Cast(source_mask_image, sitk.sitkFloat32), fixed, sitk.Transform(), sitk.sitkLinear, 0.0
    )
    landed_array = sitk.GetArrayFromImage(landed) >= 0.5
    if landed_array.sum() < 100:
        raise SkullStripError(
            f"{_series_name(target)} does not overlap the brain of {_series_name(source)}; the two series "
            "do not cover the same anatomy, so the mask cannot be carried. Skull-strip the series on its own."
        )
    outside_mm = ndimage.distance_transform_edt(~landed_array, sampling=fixed.GetSpacing()[::-1])
    region = outside_mm <= margin_mm
    fixed_region = _mask_image(region, fixed)
    # A fixed number of samples (~60k, Mattes' accuracy saturates well below that) keeps the cost
    # independent of the grid.
    sampling = float(min(1.0, 60_000 / max(int(region.sum()), 1)))
    return fixed_region, sampling


def _rigid_fit(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_region: sitk.Image,
    sampling: float,
    seed: int,
    centre: np.ndarray,
) -> _RigidFit:
    """Register ``moving`` (source) to ``fixed`` (target) rigidly, rotating about ``centre``."""
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(float(v) for v in centre[:3]))
    method = mattes_method(sampling, seed)
    method.SetMetricFixedMask(fixed_region)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([4.0, 2.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    matrix = transform_matrix(transform)
    rotation_deg = float(np.degrees(np.arccos(np.clip((np.trace(matrix[:3, :3]) - 1.0) / 2.0, -1.0, 1.0))))
    shift_mm = float(np.linalg.norm(matrix[:3, :3] @ centre[:3] + matrix[:3, 3] - centre[:3]))
    return _RigidFit(
        transform=transform,
        matrix=matrix,
        stop=method.GetOptimizerStopConditionDescription(),
        metric=float(method.GetMetricValue()),
        iterations=int(method.GetOptimizerIteration()),
        rotation_deg=rotation_deg,
        shift_mm=shift_mm,
    )


def _carry_doubts(fit: _RigidFit, mask: np.ndarray) -> list[str]:
    """Why a carried mask should not be trusted (empty when it can be)."""
    reasons = []
    if "Maximum number of iterations" in fit.stop:
        reasons.append("the optimiser stopped at its iteration cap")
    if fit.metric > CARRY_DOUBTFUL_METRIC:
        reasons.append(f"weak final metric {fit.metric:.3f} (> {CARRY_DOUBTFUL_METRIC})")
    if fit.rotation_deg > CARRY_PLAUSIBLE_ROTATION_DEG or fit.shift_mm > CARRY_PLAUSIBLE_SHIFT_MM:
        reasons.append(
            f"implausible motion between series ({fit.rotation_deg:.1f} deg, {fit.shift_mm:.1f} mm at the brain centre)"
        )
    if not mask.any():
        reasons.append("the carried mask is empty on the target grid")
    return reasons


def _carry_qa(
    fit: _RigidFit,
    fixed: sitk.Image,
    sampling: float,
    reasons: list[str],
    start: float,
    warnings: list[str],
) -> dict[str, Any]:
    """The QA record of a mask carry (``start``: its :func:`time.perf_counter` at the outset)."""
    return {
        "method": "rigid Euler3D, Mattes MI, 3 levels",
        "working_spacing_mm": [round(float(v), 3) for v in fixed.GetSpacing()],
        "sampling_fraction": round(sampling, 4),
        "metric": round(fit.metric, 5),
        "stop_condition": fit.stop,
        "iterations": fit.iterations,
        "rotation_deg": round(fit.rotation_deg, 3),
        "translation_mm": round(fit.shift_mm, 3),
        "target_to_source": np.round(fit.matrix, 6).tolist(),
        "doubtful": bool(reasons),
        "seconds": round(time.perf_counter() - start, 3),
        "warnings": warnings,
    }


def carry_mask(
    source: Volume,
    source_mask: np.ndarray,
    target: Volume,
    *,
    seed: int = 1,
    margin_mm: float = 10.0,
    working_mm: float = 2.0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Move a brain mask from one series onto another series of the same session.

    Both series share the scanner's patient frame, so registration starts from identity and only
    corrects the motion between the two acquisitions: a rigid (Euler 3-D) transform, Mattes mutual
    information (different contrasts), sampled inside the source brain dilated by ``margin_mm``,
    regular-step gradient descent over a 3-level pyramid, on copies block-averaged to about 2 mm.

    Parameters
    ----------
    source : Volume
        The series whose mask is known (typically T1w).
    source_mask : numpy.ndarray
        Its brain mask, shape ``(z, y, x)`` of ``source``.
    target : Volume
        The series that needs a mask (any contrast, orientation, grid).
    seed : int
        Seed of the metric's random sampling.
    margin_mm : float
        Dilation of the source mask for the metric region: the brain edge and the CSF/skull around it
        carry most of the alignment information.
    working_mm : float
        Both series are block-averaged towards this spacing for the registration (axes already
        coarser are kept); the mask itself is resampled from the full-resolution source.

    Returns
    -------
    tuple of (numpy.ndarray, dict)
        The boolean mask on the target grid, and a QA record: ``metric``, ``stop_condition``,
        ``iterations``, ``seconds``, ``rotation_deg``, ``translation_mm``, ``target_to_source``
        (4x4, target LPS -> source LPS), ``doubtful``, ``warnings``.
    """
    if working_mm <= 0 or margin_mm < 0:
        raise ValueError(f"carry_mask needs working_mm > 0 and margin_mm >= 0; got {working_mm}, {margin_mm}")
    start = time.perf_counter()
    source_mask = _check_mask_shape("source_mask", source_mask, source)
    if not source_mask.any():
        raise SkullStripError(f"{_series_name(source)}: the source brain mask is empty; nothing to carry")
    warnings = _frame_of_reference_warnings(source, target)
    target_image = sitk.Cast(target.to_sitk(), sitk.sitkFloat32)
    source_image = sitk.Cast(source.to_sitk(), sitk.sitkFloat32)
    source_mask_image = _mask_image(source_mask, source_image)
    # Registration runs on block-averaged copies near ``working_mm`` (a 0.5 x 0.5 x 4 mm series has
    # 16x fewer voxels at 2 x 2 x 4 mm): a brain mask needs ~1 mm accuracy, not the in-plane detail.
    fixed = sitk.BinShrink(target_image, _bin_factors(target.spacing, working_mm))
    moving = sitk.BinShrink(source_image, _bin_factors(source.spacing, working_mm))
    fixed_region, sampling = _carry_metric_region(source_mask_image, fixed, margin_mm, source, target)
    z, y, x = np.nonzero(source_mask)
    centre = source.index_to_physical @ np.array([x.mean(), y.mean(), z.mean(), 1.0])
    fit = _rigid_fit(fixed, moving, fixed_region, sampling, seed, centre)
    # transform maps target points to source points: each target voxel pulls the source mask there.
    carried = sitk.Resample(
        sitk.Cast(source_mask_image, sitk.sitkFloat32), target_image, fit.transform, sitk.sitkLinear, 0.0,
        sitk.sitkFloat32,
    )
    mask = sitk.GetArrayFromImage(carried) >= 0.5
    reasons = _carry_doubts(fit, mask)
    if reasons:
        warnings.append("mask carry doubtful: " + "; ".join(reasons))
    return mask, _carry_qa(fit, fixed, sampling, reasons, start, warnings)


def carry_brain_mask(
    source_result: BrainMaskResult, source: Volume, target: Volume, *, source_label: str | None = None
) -> BrainMaskResult:
    """:func:`carry_mask` wrapped as a :class:`BrainMaskResult` for the target series.

    Parameters
    ----------
    source_result : BrainMaskResult
        The mask of ``source``.
    source, target : Volume
        The two series of one study.
    source_label : str, optional
        How the source is named in ``method``, e.g. ``"T1w"``; default its series description.

    Raises
    ------
    SkullStripError
        When the carried mask is empty on the target grid.
    """
    mask, carry_qa = carry_mask(source, source_result.mask, target)
    if not mask.any():
        raise SkullStripError(
            f"{_series_name(target)}: the brain mask carried from {_series_name(source)} is empty on this "
            "grid; skull-strip the series on its own"
        )
    label = source_label or str(source.metadata.get("series_description") or "").strip() or "source"
    warnings = list(carry_qa["warnings"])
    qa: dict[str, Any] = {"method": "carried", "source_method": source_result.method, "carry": carry_qa}
    qa.update(_brain_qa(mask, target, warnings))
    qa["seconds"] = carry_qa["seconds"]
    qa["warnings"] = warnings
    method = f"{source_result.method} (carried from {label} series {source.series_instance_uid})"
    return BrainMaskResult(mask=mask, method=method, qa=qa)
