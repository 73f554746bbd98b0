"""Synthetic brain MR cohorts with ground truth, built from the MNI152 2009 template.

Everything comes from the tissue maps that nilearn ships inside its wheel (no download): a
subject is the template warped by a random affine and a smooth elastic deformation, optionally
carrying one or more smooth-edged lesions; each of its series renders that anatomy onto its own
acquisition grid (axial, sagittal or coronal, slightly oblique, anisotropic spacing) with a
contrast (T2w or T1w), a multiplicative bias field and Rician noise, and is written as one
MR Image Storage file per slice. The lesion and brain masks of each series are written as NIfTI on
the native grid of that series, outside the DICOM tree, so that nothing but the DICOM reaches the
application under test.

By default series are skull-stripped (0 outside the brain). Options of :func:`make_cohort` make
the data harder:

* ``head_fraction``: subjects rendered as whole heads (:func:`synthesize_head`): around the
  brain, in template space and warped with it, shells built on a smoothed closing of the brain
  mask (subarachnoid CSF, inner table, diploe, outer table, then galea/temporalis muscle,
  subcutaneous fat and skin, each 4-8 mm skull and 4-8 mm scalp varying smoothly over the head
  and between subjects), eyes in fat-filled orbits, sinuses, a face and a neck with the spinal
  cord; Rician noise fills the air. Their grids cover the whole head from the vertex to the
  upper neck, with a scanner-like field of view and matrix. The ``_brain`` truth is still the
  brain (the template's brain mask: GM, WM, deep structures and the CSF inside it), what a
  skull stripper should return; a ``_head`` truth is added.
* ``vary_fov``: skull-stripped series planned the same way (square field of view drawn from
  ``fov_mm``, matrix from ``matrix_size`` times ``matrix_scale``), so pixel spacing varies.
* ``mass_effect_fraction``: lesions that push the tissue around them outwards
  (:meth:`Lesion.mass_effect_pullback`), compressing ventricles and sulci nearby; the lesion
  truth is still exactly the rendered lesion.

Bad inputs for an application's input checks are written one series at a time:
:func:`write_knee_series` (not a brain; optionally with a header that does not say so),
:func:`write_truncated_series` (only the top of the head), :func:`write_slab_series` (one slice
or a thin slab) and :func:`write_anisotropic_series` (e.g. 0.5 x 0.5 x 5 mm voxels).

Conventions are those of :mod:`codegraph3d.core.volume`: arrays ``[z, y, x]``, index ``(x, y, z)``,
LPS millimetres, ``point = origin + direction @ (spacing * index)``. Template arrays keep
nibabel's ``[i, j, k]`` order, since they never leave this module.

Output of :func:`make_cohort`::

    out_dir/dicom/ST001/SE01/IM0001.dcm ...      one study per subject, one folder per series
    out_dir/truth/<SeriesInstanceUID>_lesion.nii.gz, _brain.nii.gz (, _head.nii.gz for heads)
    out_dir/labels.json

``labels.json`` (schema ``codegraph3d.synthetic-labels/1``) holds the generator's parameters and
``studies``: per study ``patient_id``, ``study_instance_uid``, ``folder``, ``has_lesion``,
``has_head``, ``has_mass_effect``, ``lesion_volume_ml``, ``lesions`` (template-space centres,
semi-axes and ``mass_effect_mm``), ``series`` and ``distractors`` (localizers, never to be
scored); per series ``series_instance_uid``, ``contrast``, ``orientation``, ``folder``,
``shape_zyx``, ``spacing_xyz_mm``, ``field_of_view_mm`` (in-plane, x and y), ``skull_stripped``,
``has_lesion``, ``lesion_voxels``, ``lesion_volume_ml`` (on that series' grid),
``brain_volume_ml``, ``head_volume_ml`` (heads only) and ``truth`` (paths of the masks, relative
to ``out_dir``).

Everything is a pure function of the parameters and the seed: with the same library versions a
rerun writes identical bytes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from codegraph3d.core.files import atomic_path
from codegraph3d.core.volume import LPS_TO_RAS, index_to_physical_matrix

__all__ = [
    "CONTRASTS",
    "ORIENTATIONS",
    "TISSUE_INTENSITIES",
    "LABELS_SCHEMA",
    "read_labels",
    "TissueMaps",
    "Lesion",
    "SubjectAnatomy",
    "AcquisitionGrid",
    "RenderedSeries",
    "load_tissue_maps",
    "synthesize_contrast",
    "random_subject",
    "orientation_direction",
    "acquisition_grid",
    "render_series",
    "lps_to_ras_affine",
    "write_mask_nifti",
    "write_series",
    "write_localizer",
    "make_cohort",
    "HEAD_TISSUE_INTENSITIES",
    "HeadTemplate",
    "HeadShape",
    "HeadVolumes",
    "load_head_template",
    "synthesize_head",
    "WrittenSeries",
    "write_knee_series",
    "write_truncated_series",
    "write_slab_series",
    "write_anisotropic_series",
]

logger = logging.getLogger(__name__)

CONTRASTS: tuple[str, ...] = ("T2w", "T1w")
ORIENTATIONS: tuple[str, ...] = ("axial", "coronal", "sagittal")
# The schema, UID namespace and generator name keep the module's first home (codegraph3d.synthetic):
# they enter every UID and file this module writes, so regenerated cohorts stay byte-identical.
LABELS_SCHEMA = "codegraph3d.synthetic-labels/1"
_GENERATOR_NAME = "codegraph3d.synthetic"

#: Relative tissue intensities before the per-subject jitter. The lesion is a brightness
#: between the rim and the core value, like oedema around a tumour core: clearly above GM and WM
#: on T2w (but below CSF, so that CSF is not the easy "anomaly") and below them on T1w.
TISSUE_INTENSITIES: dict[str, dict[str, float]] = {
    "T2w": {"csf": 1.00, "gm": 0.55, "wm": 0.40, "lesion_rim": 0.78, "lesion_core": 0.90},
    "T1w": {"csf": 0.20, "gm": 0.60, "wm": 0.85, "lesion_rim": 0.40, "lesion_core": 0.30},
}

# RAS <-> LPS: both flip x and y; the same matrix is its own inverse.
_FLIP_LPS_RAS = LPS_TO_RAS[:3, :3]

# Unit LPS direction columns (x, y, z index axes) of the three standard planes, with z the slice
# normal x cross y, which is the order a loader that sorts slices by position produces.
_BASE_DIRECTIONS: dict[str, NDArray[np.float64]] = {
    "axial": np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]).T,
    "coronal": np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]).T,
    "sagittal": np.array([[0, 1.0, 0], [0, 0, -1.0], [-1.0, 0, 0]]).T,
}
_ORIENTATION_CODES = {"axial": "AX", "coronal": "COR", "sagittal": "SAG"}

# Mass effect: the push grows from 0 at the brain's surface to full strength at this depth (mm).
_MASS_EFFECT_DEPTH_MM = 10.0

_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_UID_NAMESPACE = _GENERATOR_NAME
_DEFAULT_IMAGE_TYPE: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND")


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_range(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """Return ``value`` as float after checking ``lo <= value <= hi`` (``lo < value`` if open)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number; got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite; got {value!r}")
    below = number <= lo if lo_open else number < lo
    if below or number > hi:
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {bracket}{lo}, {hi}]; got {value!r}")
    return number


def _check_interval(
    name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False
) -> tuple[float, float]:
    """Return a ``(low, high)`` pair inside ``[lo, hi]`` with ``low <= high``."""
    try:
        low, high = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (low, high) pair; got {value!r}") from None
    low = _check_range(f"{name}[0]", low, lo, hi, lo_open=lo_open)
    high = _check_range(f"{name}[1]", high, lo, hi, lo_open=lo_open)
    if low > high:
        raise ValueError(f"{name} must satisfy low <= high; got {value!r}")
    return low, high


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    if value < lo or (hi is not None and value > hi):
        upper = "" if hi is None else f" and <= {hi}"
        raise ValueError(f"{name} must be >= {lo}{upper}; got {value!r}")
    return int(value)


def _check_contrast(contrast: str) -> str:
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}; got {contrast!r}")
    return contrast


def _check_int_pair(name: str, value: Any, lo: int, hi: int) -> tuple[int, int]:
    """Return a ``(low, high)`` pair of integers in ``[lo, hi]`` with ``low <= high``."""
    try:
        low, high = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (low, high) pair; got {value!r}") from None
    low = _check_int(f"{name}[0]", low, lo, hi)
    return low, _check_int(f"{name}[1]", high, low, hi)


def _check_flags(*flags: tuple[str, Any]) -> None:
    """Refuse any ``(name, value)`` whose value is not a bool (``1`` or ``"yes"`` included)."""
    for name, flag in flags:
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False; got {flag!r}")


def _check_placement(placement: str) -> str:
    """Refuse a lesion placement that is not one of :data:`LESION_PLACEMENTS`."""
    if placement not in LESION_PLACEMENTS:
        raise ValueError(f"lesion_placement must be one of {', '.join(LESION_PLACEMENTS)}; "
                         f"got {placement!r}")
    return placement


def _as_vector3(name: str, value: ArrayLike) -> NDArray[np.float64]:
    array = np.asarray(value, dtype=float)
    if array.shape != (3,):
        raise ValueError(f"{name} must have 3 elements; got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite; got {array.tolist()}")
    return array


def _as_direction(name: str, value: ArrayLike) -> NDArray[np.float64]:
    array = np.asarray(value, dtype=float)
    if array.shape != (3, 3):
        raise ValueError(f"{name} must be a 3x3 matrix; got shape {array.shape}")
    if not np.allclose(array.T @ array, np.eye(3), atol=1e-4):
        raise ValueError(
            f"{name} must be orthonormal (columns = x, y, z axes); got {array.tolist()}"
        )
    return array


def _random_rotation(rng: np.random.Generator, max_angle_deg: float) -> NDArray[np.float64]:
    """Rotation by a uniform angle in ``[0, max_angle_deg]`` about a uniformly random axis."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(0.0, max_angle_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)


def _euler_rotation(angles_deg: ArrayLike) -> NDArray[np.float64]:
    """``Rz @ Ry @ Rx`` for angles (degrees) about the x, y and z axes."""
    ax, ay, az = np.radians(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_unit_vectors(rng: np.random.Generator, n: int) -> NDArray[np.float64]:
    vectors = rng.normal(size=(n, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# template
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TissueMaps:
    """MNI152 2009 tissue probability maps on the template grid (arrays ``[i, j, k]``).

    Attributes
    ----------
    gm, wm, csf : numpy.ndarray
        Tissue probabilities in ``[0, 1]``, ``float32``, zero outside the brain mask.
        CSF is the brain mask minus GM and WM, which is how the template defines it implicitly.
    brain : numpy.ndarray
        Brain mask, ``float32`` 0/1 (kept float so that it can be interpolated).
    depth_mm : numpy.ndarray
        Distance (mm) from each brain voxel to the nearest non-brain voxel; 0 outside.
    outside_mm : numpy.ndarray
        Distance (mm) from each non-brain voxel to the nearest brain voxel; 0 inside.
    affine_ras : numpy.ndarray
        nibabel affine, voxel ``(i, j, k)`` -> RAS mm.
    resolution : int
        Template resolution in mm (1 or 2).
    """

    gm: NDArray[np.float32]
    wm: NDArray[np.float32]
    csf: NDArray[np.float32]
    brain: NDArray[np.float32]
    depth_mm: NDArray[np.float32]
    outside_mm: NDArray[np.float32]
    affine_ras: NDArray[np.float64]
    resolution: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """Template grid size ``(i, j, k)``."""
        return tuple(self.brain.shape)  # type: ignore[return-value]

    @property
    def index_to_lps(self) -> NDArray[np.float64]:
        """4x4 matrix from template voxel ``(i, j, k)`` to LPS mm."""
        flip = np.eye(4)
        flip[:3, :3] = _FLIP_LPS_RAS
        return flip @ self.affine_ras

    @property
    def lps_to_index(self) -> NDArray[np.float64]:
        """4x4 matrix from LPS mm to template voxel ``(i, j, k)``."""
        return np.linalg.inv(self.index_to_lps)

    @functools.cached_property
    def brain_points_lps(self) -> NDArray[np.float64]:
        """LPS mm of the brain-mask surface voxels, used to size field-of-views."""
        inside = self.brain > 0.5
        shell = inside & (self.depth_mm <= 1.5 * self.resolution)
        ijk = np.argwhere(shell).astype(float)
        return ijk @ self.index_to_lps[:3, :3].T + self.index_to_lps[:3, 3]

    @functools.cached_property
    def brain_centre_lps(self) -> NDArray[np.float64]:
        """Centre (mm, LPS) of the brain mask's bounding box."""
        points = self.brain_points_lps
        return 0.5 * (points.min(axis=0) + points.max(axis=0))


# The files behind nilearn.datasets.load_mni152_{template,gm_template,wm_template}.
_NILEARN_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# nilearn's load_mni152_brain_mask default: template / max > 0.2.
_BRAIN_THRESHOLD = 0.2


def _load_nilearn_arrays(resolution: int) -> tuple[dict[str, NDArray[np.float32]], NDArray]:
    """Template T1, GM and WM scaled to [0, 1] exactly as nilearn's loaders return them.

    Reading the packaged files directly takes about 0.5 s; ``nilearn.datasets`` costs several
    seconds to import (scikit-learn) and resamples with a cubic spline. At 2 mm its grid shares
    the 1 mm grid's origin, so its result is the 1 mm data at every second voxel, which is what
    this returns (checked to 1e-16). If the files are not where this nilearn keeps them, fall
    back to the public loaders.
    """
    import importlib.resources

    try:
        import nibabel as nib

        root = importlib.resources.files("nilearn") / "datasets" / "data"
        arrays: dict[str, NDArray[np.float32]] = {}
        affine = None
        for name, filename in _NILEARN_FILES.items():
            image = nib.load(str(root / filename))
            data = np.asarray(image.dataobj, dtype=np.float32)
            data /= data.max()
            arrays[name] = np.ascontiguousarray(data[::resolution, ::resolution, ::resolution])
            affine = image.affine.copy()
        assert affine is not None
        affine[:3, :3] *= resolution
        return arrays, affine
    except (FileNotFoundError, ModuleNotFoundError, OSError):
        from nilearn import datasets

        images = {
            "t1": datasets.load_mni152_template(resolution=resolution),
            "gm": datasets.load_mni152_gm_template(resolution=resolution),
            "wm": datasets.load_mni152_wm_template(resolution=resolution),
        }
        arrays = {k: np.asarray(v.get_fdata(), dtype=np.float32) for k, v in images.items()}
        return arrays, np.asarray(images["t1"].affine, dtype=float)


@functools.lru_cache(maxsize=2)
def load_tissue_maps(resolution: int = 2) -> TissueMaps:
    """Load the MNI152 2009 template tissue maps that nilearn ships (no network access).

    The values equal ``nilearn.datasets.load_mni152_{gm,wm}_template(resolution)`` and
    ``load_mni152_brain_mask(resolution)``, read from the files inside the nilearn package.

    Parameters
    ----------
    resolution : int, default 2
        1 or 2 (mm). Every acquisition is interpolated from it; 2 mm loads faster and only
        softens tissue edges.

    Returns
    -------
    TissueMaps
        Read-only arrays, shared between calls (the result is cached).
    """
    if isinstance(resolution, bool) or resolution not in (1, 2):
        raise ValueError(f"resolution must be 1 or 2 (mm); got {resolution!r}")
    from scipy import ndimage

    arrays, affine = _load_nilearn_arrays(int(resolution))
    brain = (arrays["t1"] > _BRAIN_THRESHOLD).astype(np.float32)
    # The probability maps leak slightly outside the mask and carry -0.0 values: clip and mask.
    gm = (np.clip(arrays["gm"], 0, 1) * brain).astype(np.float32)
    wm = (np.clip(arrays["wm"], 0, 1) * brain).astype(np.float32)
    csf = (np.clip(brain - gm - wm, 0, 1) * brain).astype(np.float32)
    depth = ndimage.distance_transform_edt(brain > 0.5, sampling=float(resolution))
    maps = TissueMaps(
        gm=gm,
        wm=wm,
        csf=csf,
        brain=brain,
        depth_mm=depth.astype(np.float32),
        outside_mm=ndimage.distance_transform_edt(brain < 0.5, sampling=float(resolution)).astype(
            np.float32),
        affine_ras=np.asarray(affine, dtype=float),
        resolution=int(resolution),
    )
    for array in (maps.gm, maps.wm, maps.csf, maps.brain, maps.depth_mm, maps.outside_mm,
                  maps.affine_ras):
        array.setflags(write=False)
    return maps


def synthesize_contrast(
    maps: TissueMaps, contrast: str, intensities: Mapping[str, float] | None = None
) -> NDArray[np.float32]:
    """Render a skull-stripped contrast on the template grid as a tissue-weighted sum.

    Parameters
    ----------
    maps : TissueMaps
        Template tissue maps.
    contrast : {"T2w", "T1w"}
        T2w: CSF bright, GM mid, WM dark. T1w: WM bright, GM mid, CSF dark.
    intensities : mapping, optional
        ``{"csf", "gm", "wm"}`` overrides of :data:`TISSUE_INTENSITIES`.

    Returns
    -------
    numpy.ndarray
        ``float32`` array ``[i, j, k]``, 0 outside the brain.
    """
    _check_contrast(contrast)
    values = dict(TISSUE_INTENSITIES[contrast])
    if intensities is not None:
        unknown = set(intensities) - set(values)
        if unknown:
            raise ValueError(f"unknown tissue names {sorted(unknown)}; expected {sorted(values)}")
        values.update({k: float(v) for k, v in intensities.items()})
    image = values["csf"] * maps.csf + values["gm"] * maps.gm + values["wm"] * maps.wm
    return image.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# subject anatomy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lesion:
    """A smooth-edged, slightly irregular ellipsoid defined in template LPS space.

    Defining it in template space (rather than subject space) makes it deform with the anatomy,
    so it stays inside the brain and is identical in every series of the subject.

    Attributes
    ----------
    centre_lps : numpy.ndarray
        Centre, template LPS mm.
    axes : numpy.ndarray
        3x3 rotation; columns are the ellipsoid's principal directions (LPS).
    semi_axes_mm : numpy.ndarray
        Semi-axis lengths (mm) along the columns of ``axes``.
    lobe_directions, lobe_amplitudes, lobe_frequencies, lobe_phases : numpy.ndarray
        Low-order perturbation of the radius by direction (the "blob" shape): the boundary is at
        normalised radius ``1 + sum_m a_m sin(pi f_m (u . d_m) + phi_m)``.
    edge_mm : float
        Width (mm) of the logistic edge of the intensity blend.
    intensity_scale : float
        Multiplier of the contrast's lesion intensities for this lesion.
    mass_effect_mm : float, default 0
        Mass effect: how far (mm) the tissue at the lesion's boundary is pushed outwards, away
        from the centre. 0 is a lesion without mass effect. See :meth:`mass_effect_pullback`.
    mass_effect_range_mm : float, default 0
        Distance (mm) past the boundary at which the push has faded to 0.
    appearance : tuple of (contrast, rim, core), default ()
        This lesion's own rim and core intensities per contrast (``lesion_appearance="varied"``),
        replacing the subject's ``lesion_rim`` / ``lesion_core``; empty: the subject's values.
    stripe_period_mm, stripe_amplitude : float, default 0
        A laminated texture: ``stripe_amplitude * sin(2 pi x / stripe_period_mm)`` added to the
        lesion's intensity, ``x`` the template left-right coordinate (the stripes belong to the
        tissue, so they follow the subject's deformation). Amplitude 0: no texture.
    placement : {"deep", "cortical"}, default "deep"
        Where :func:`random_subject` placed it (see :data:`LESION_PLACEMENTS`). A ``cortical``
        lesion reaches the brain's surface, so :func:`render_series` confines its intensity
        change to the brain (blend weighted by the interpolated brain mask): the CSF, skull and
        scalp around it keep their values, and the ground truth (lesion and brain) is the region
        that changed. A ``deep`` lesion sits wholly in tissue and is blended as always.
    """

    centre_lps: NDArray[np.float64]
    axes: NDArray[np.float64]
    semi_axes_mm: NDArray[np.float64]
    lobe_directions: NDArray[np.float64]
    lobe_amplitudes: NDArray[np.float64]
    lobe_frequencies: NDArray[np.float64]
    lobe_phases: NDArray[np.float64]
    edge_mm: float
    intensity_scale: float
    mass_effect_mm: float = 0.0
    mass_effect_range_mm: float = 0.0
    appearance: tuple[tuple[str, float, float], ...] = ()
    stripe_period_mm: float = 0.0
    stripe_amplitude: float = 0.0
    placement: str = "deep"

    @property
    def max_extent_mm(self) -> float:
        """Largest distance (mm) from the centre at which the boundary can lie."""
        return float(self.semi_axes_mm.max() * (1.0 + np.abs(self.lobe_amplitudes).sum()))

    def radius_ratio(self, points_lps: NDArray[np.floating]) -> NDArray[np.float64]:
        """Normalised radius of template LPS points, ``(N, 3)`` -> ``(N,)``; ``<= 1`` is inside."""
        local = (np.asarray(points_lps, float) - self.centre_lps) @ self.axes / self.semi_axes_mm
        rho = np.linalg.norm(local, axis=1)
        unit = local / np.maximum(rho, 1e-9)[:, None]
        lobes = np.sin(
            math.pi * (unit @ self.lobe_directions.T) * self.lobe_frequencies + self.lobe_phases
        )
        return rho / (1.0 + lobes @ self.lobe_amplitudes)

    def membership(self, ratio: NDArray[np.floating]) -> NDArray[np.float64]:
        """Soft lesion fraction in ``[0, 1]`` from :meth:`radius_ratio` (0.5 on the boundary)."""
        scale = float(self.semi_axes_mm.mean()) / self.edge_mm
        return 1.0 / (1.0 + np.exp(np.clip((np.asarray(ratio) - 1.0) * scale, -50, 50)))

    @property
    def mass_effect_reach_mm(self) -> float:
        """Largest distance (mm) from the centre at which the mass effect moves anything."""
        if self.mass_effect_mm <= 0:
            return 0.0
        return self.max_extent_mm + self.mass_effect_range_mm

    def mass_effect_pullback(
        self, points_lps: NDArray[np.floating], depth_mm: NDArray[np.floating]
    ) -> NDArray[np.float64]:
        """Where the anatomy seen at template points ``(N, 3)`` came from before the lesion grew.

        The lesion pushes the tissue around it radially outwards, as brain tissue does, which
        is nearly incompressible: a point seen at distance ``rho`` from the centre, where the
        boundary along that ray is at ``R``, shows the anatomy from distance
        ``(rho^3 - R^3 + (R - A)^3)^(1/3)`` (volume conserved: what filled the sphere of radius
        ``R - A`` now fills the lesion, and every shell outside is pushed out by the volume it
        gained), tapered smoothly to no push at :attr:`mass_effect_range_mm` past the boundary,
        where the tissue is compressed instead. Inside the lesion the anatomy it replaced is
        compressed uniformly (``rho (R - A) / R``). A nearby ventricle is thus shifted away
        and narrowed along the push, its near wall moving more than its far wall. The push
        fades from full strength at 10 mm depth to 0 at the brain's surface (``depth_mm``: the
        template brain depth at each point), so the brain's outline and the skull do not move.
        Along each ray the map is monotonic (a diffeomorphism) while ``A`` is below ``R``,
        which :func:`random_subject` guarantees.
        """
        points = np.asarray(points_lps, dtype=float)
        if self.mass_effect_mm <= 0:
            return points.copy()
        offset = points - self.centre_lps
        rho = np.linalg.norm(offset, axis=1)
        ratio = np.maximum(self.radius_ratio(points), 1e-9)
        boundary = rho / ratio  # the boundary's distance from the centre along each ray
        push_mm = np.minimum(self.mass_effect_mm, 0.95 * boundary)
        gained = boundary**3 - (boundary - push_mm) ** 3
        outside = np.cbrt(np.maximum(rho**3 - gained, 0.0))
        beyond = np.maximum(rho - boundary, 0.0)
        taper = np.clip(1.0 - (beyond / self.mass_effect_range_mm) ** 2, 0.0, 1.0) ** 2
        push = np.where(ratio <= 1.0, push_mm * ratio, (rho - outside) * taper)
        depth = np.clip(np.asarray(depth_mm, dtype=float) / _MASS_EFFECT_DEPTH_MM, 0.0, 1.0)
        push *= depth * depth * (3.0 - 2.0 * depth)
        unit = offset / np.maximum(rho, 1e-9)[:, None]
        return points - push[:, None] * unit


@dataclass(frozen=True)
class SubjectAnatomy:
    """One synthetic subject: a warp of the template plus its lesions and tissue contrast.

    The warp is a pull-back: a subject (scanner) LPS point ``p`` is found in the template at
    ``q + u(q)`` with ``q = pullback @ p`` (affine) and ``u`` a sum of long-wavelength sinusoids
    (smooth, cheap to evaluate anywhere, and invertible for the amplitudes used).

    Attributes
    ----------
    pullback : numpy.ndarray
        4x4 affine, subject LPS mm -> template LPS mm.
    wavevectors : numpy.ndarray
        ``(K, 3)`` rad/mm.
    amplitudes : numpy.ndarray
        ``(K, 3)`` mm, displacement vector of each sinusoid.
    phases : numpy.ndarray
        ``(K,)`` rad.
    lesions : tuple of Lesion
        Empty for a healthy subject.
    intensities : dict
        Per contrast, the subject's tissue intensities (jittered :data:`TISSUE_INTENSITIES`).
    head : HeadShape or None, default None
        Skull, scalp, face and neck around the brain; None renders skull-stripped data.
    """

    pullback: NDArray[np.float64]
    wavevectors: NDArray[np.float64]
    amplitudes: NDArray[np.float64]
    phases: NDArray[np.float64]
    lesions: tuple[Lesion, ...]
    intensities: dict[str, dict[str, float]]
    head: HeadShape | None = None

    @property
    def has_lesion(self) -> bool:
        return bool(self.lesions)

    @property
    def has_head(self) -> bool:
        """Whether series of this subject show a whole head (not skull-stripped)."""
        return self.head is not None

    @property
    def has_mass_effect(self) -> bool:
        return any(item.mass_effect_mm > 0 for item in self.lesions)

    def to_template(self, points_lps: ArrayLike) -> NDArray[np.float64]:
        """Map subject LPS points ``(N, 3)`` to template LPS points (affine, then elastic)."""
        points = np.atleast_2d(np.asarray(points_lps, dtype=float))
        q = points @ self.pullback[:3, :3].T + self.pullback[:3, 3]
        return q + np.sin(q @ self.wavevectors.T + self.phases) @ self.amplitudes

    def to_subject_affine(self, points_template_lps: ArrayLike) -> NDArray[np.float64]:
        """Map template points to subject space through the inverse affine (elastic ignored)."""
        forward = np.linalg.inv(self.pullback)
        points = np.atleast_2d(np.asarray(points_template_lps, dtype=float))
        return points @ forward[:3, :3].T + forward[:3, 3]

    def to_subject(
        self, points_template_lps: ArrayLike, iterations: int = 6
    ) -> NDArray[np.float64]:
        """Map template points to subject space, inverting :meth:`to_template` (elastic included).

        Fixed-point iteration ``p <- A^-1 (q - u(A p))``: the displacement's gradient is at most
        ``2 pi / 80 mm`` times its amplitude, far below 1, so each step shrinks the error by
        that factor (sub-micrometre after the default 6).
        """
        target = np.atleast_2d(np.asarray(points_template_lps, dtype=float))
        forward = np.linalg.inv(self.pullback)
        points = target @ forward[:3, :3].T + forward[:3, 3]
        for _ in range(iterations):
            q = points @ self.pullback[:3, :3].T + self.pullback[:3, 3]
            shift = np.sin(q @ self.wavevectors.T + self.phases) @ self.amplitudes
            points = (target - shift) @ forward[:3, :3].T + forward[:3, 3]
        return points


def _random_lesion(
    rng: np.random.Generator,
    maps: TissueMaps,
    radius_mm: tuple[float, float],
    irregularity: float,
    edge_mm: float,
    placement: str = "deep",
) -> Lesion:
    _check_placement(placement)
    radius = rng.uniform(*radius_mm)
    semi_axes = radius * rng.uniform(0.8, 1.2, size=3)
    n_lobes = 3
    amplitudes = rng.uniform(-1.0, 1.0, size=n_lobes)
    amplitudes *= irregularity / max(np.abs(amplitudes).sum(), 1e-9)
    extent = float(semi_axes.max() * (1.0 + irregularity))
    if placement == "cortical":
        # Centre in grey matter a fraction of the extent below the brain's surface (the distance
        # to the nearest non-brain voxel, a sulcus included): the blob reaches the surface, as a
        # cortical / juxtacortical lesion or a cortical metastasis does, while most of it lies
        # in the brain. render_series confines its intensity change to the brain.
        low, high = _CORTICAL_DEPTH[0] * extent, _CORTICAL_DEPTH[1] * extent
        candidates = np.argwhere((maps.depth_mm >= low) & (maps.depth_mm <= high)
                                 & (maps.gm > 0.5))
        if candidates.size == 0:
            raise ValueError(
                f"no grey-matter position lies {low:.1f}-{high:.1f} mm below the brain surface, "
                f"as a cortical lesion of extent {extent:.1f} mm needs: change lesion_radius_mm "
                f"(got {radius_mm}); the template's brain voxels are at least "
                f"{float(maps.resolution):.0f} mm deep"
            )
    else:
        # Centre deep enough that the whole blob and its soft edge sit in brain tissue, and not
        # in a ventricle, so that the ground truth is the region that really changed intensity.
        tissue = maps.gm + maps.wm
        candidates = np.argwhere((maps.depth_mm >= extent + 2.0 * edge_mm + 2.0) & (tissue > 0.5))
        if candidates.size == 0:
            raise ValueError(
                f"no brain position can hold a lesion of extent {extent:.1f} mm: "
                f"lower lesion_radius_mm (got {radius_mm}); the template brain is at most "
                f"{float(maps.depth_mm.max()):.0f} mm deep"
            )
    ijk = candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, size=3)
    centre = maps.index_to_lps[:3, :3] @ ijk + maps.index_to_lps[:3, 3]
    return Lesion(
        centre_lps=centre,
        axes=_random_rotation(rng, 180.0),
        semi_axes_mm=semi_axes,
        lobe_directions=_random_unit_vectors(rng, n_lobes),
        lobe_amplitudes=amplitudes,
        lobe_frequencies=rng.integers(1, 4, size=n_lobes).astype(float),
        lobe_phases=rng.uniform(0.0, 2.0 * math.pi, size=n_lobes),
        edge_mm=edge_mm,
        intensity_scale=float(rng.uniform(0.92, 1.08)),
        placement=placement,
    )


def random_subject(
    rng: np.random.Generator, maps: TissueMaps, *, n_lesions: int = 0,
    lesion_radius_mm: tuple[float, float] = (6.0, 15.0), lesion_irregularity: float = 0.2,
    lesion_edge_mm: float = 1.0, deformation_mm: float = 3.0, max_rotation_deg: float = 5.0,
    max_translation_mm: float = 10.0, max_scaling: float = 0.05, intensity_jitter: float = 0.05,
    n_modes: int = 6, mass_effect: bool = False,
    mass_effect_ratio: tuple[float, float] = (0.25, 0.45), with_head: bool = False,
    eyes: bool = True, lesion_appearance: str = "typical", lesion_placement: str = "deep",
) -> SubjectAnatomy:
    """Draw one subject: affine + elastic warp of the template, tissue jitter and lesions.

    The draws for the options added last (mass effect, head) come after all others, so a
    subject drawn without them is unchanged by their existence.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of all randomness (same state -> same subject).
    maps : TissueMaps
        The template, used to place lesions inside the brain.
    n_lesions : int, default 0
        Number of lesions.
    lesion_radius_mm : (float, float), default (6, 15)
        Range of the mean semi-axis (mm); each axis varies by +-20 %.
    lesion_irregularity : float, default 0.2
        Largest relative radius change of the blob's lobes (0 = ellipsoid).
    lesion_edge_mm : float, default 1.0
        Width of the lesion's soft edge.
    deformation_mm : float, default 3.0
        RMS magnitude (mm) of the elastic displacement; wavelengths are 80-160 mm.
    max_rotation_deg : float, default 5.0
        Each Euler angle of the head rotation is uniform in ``+-max_rotation_deg``.
    max_translation_mm : float, default 10.0
        Each translation component is uniform in ``+-max_translation_mm``.
    max_scaling : float, default 0.05
        Each axis scale is uniform in ``1 +- max_scaling``.
    intensity_jitter : float, default 0.05
        Relative jitter of each tissue intensity, per subject and contrast.
    n_modes : int, default 6
        Number of sinusoids in the elastic displacement.
    mass_effect : bool, default False
        Give every lesion a mass effect (:meth:`Lesion.mass_effect_pullback`).
    mass_effect_ratio : (float, float), default (0.25, 0.45)
        Range of the push at the lesion's boundary relative to its mean semi-axis (a 10 mm
        lesion pushes 2.5-4.5 mm); it is kept below 0.6 times the smallest boundary radius.
        The push fades out over three mean semi-axes (at least 20 mm) past the boundary.
    with_head : bool, default False
        Draw a :class:`HeadShape` (skull, scalp, face, neck) so that series show a whole head.
    eyes : bool, default True
        With ``with_head``: draw the eyes and orbits.
    lesion_appearance : {"typical", "varied", "distinct", "striped"}, default "typical"
        ``typical``: every lesion takes the contrast's lesion intensities (bright T2w, dark T1w
        core; the subject's jitter and +-8 % per lesion), so lesions of different subjects look
        alike: a *consistent* anomaly. ``varied``: each lesion draws its own rim and core
        intensity per contrast (hyper- or hypointense, homogeneous or ring-like), so lesions are
        unlike each other. ``distinct``: every lesion takes :data:`DISTINCT_APPEARANCE`, unlike
        any normal tissue (the typical appearance lies between grey matter and CSF on T2w, so
        intensity tokens of such lesions find lookalikes at every CSF border), yet identical
        across subjects. Measured with the intensity encoder, a *uniform* lesion of any
        intensity is not anomalous (normal brains hold near-uniform tokens at every standardised
        intensity), so ``distinct`` lesions are consistent but barely anomalous. ``striped``:
        every lesion takes :data:`STRIPED_APPEARANCE`, a laminated texture no normal tissue has,
        identical across subjects: the consistent anomaly that CoDeGraph targets.
    lesion_placement : {"deep", "cortical"}, default "deep"
        ``deep``: each lesion, soft edge included, lies wholly in brain tissue (its centre at
        least its extent plus two edge widths plus 2 mm below the brain's surface, in grey or
        white matter). ``cortical``: each lesion's centre is in grey matter (probability above
        0.5) between 0.3 and 0.8 times the lesion's extent (its largest possible radius) below
        the brain's surface, so it reaches the cortical surface but lies mostly in the brain,
        like a cortical / juxtacortical lesion or a cortical metastasis; only its part inside
        the brain changes intensity (:attr:`Lesion.placement`).
    """
    radius_mm, irregularity, edge = _checked_lesion_options(
        n_lesions, lesion_radius_mm, lesion_irregularity, lesion_edge_mm, lesion_appearance,
        lesion_placement)
    deformation = _check_range("deformation_mm", deformation_mm, 0.0, 10.0)
    rotation = _check_range("max_rotation_deg", max_rotation_deg, 0.0, 45.0)
    translation = _check_range("max_translation_mm", max_translation_mm, 0.0, 100.0)
    scaling = _check_range("max_scaling", max_scaling, 0.0, 0.3)
    jitter = _check_range("intensity_jitter", intensity_jitter, 0.0, 0.3)
    n_modes = _check_int("n_modes", n_modes, 1, 64)
    push_ratio = _check_interval("mass_effect_ratio", mass_effect_ratio, 0.0, 0.6, lo_open=True)
    _check_flags(("mass_effect", mass_effect), ("with_head", with_head), ("eyes", eyes))
    # Draws in a fixed order (see above), so that a given stream keeps giving the same subject.
    pullback = _random_pullback(rng, maps.brain_centre_lps, rotation, scaling, translation)
    wavevectors, amplitudes, phases = _random_elastic_modes(rng, n_modes, deformation)
    intensities = _jittered_intensities(rng, TISSUE_INTENSITIES, jitter)
    lesions = tuple(_random_lesion(rng, maps, radius_mm, irregularity, edge, lesion_placement)
                    for _ in range(n_lesions))
    if mass_effect:
        lesions = tuple(_with_mass_effect(rng, item, push_ratio) for item in lesions)
    head = _random_head(rng, jitter, eyes) if with_head else None
    lesions = _with_appearance(rng, lesions, lesion_appearance, intensities)
    return SubjectAnatomy(pullback=pullback, wavevectors=wavevectors, amplitudes=amplitudes,
                          phases=phases, lesions=lesions, intensities=intensities, head=head)


def _checked_lesion_options(
    n_lesions: int,
    lesion_radius_mm: tuple[float, float],
    lesion_irregularity: float,
    lesion_edge_mm: float,
    lesion_appearance: str,
    lesion_placement: str,
) -> tuple[tuple[float, float], float, float]:
    """Check :func:`random_subject`'s lesion options, the first it checks, in its order.

    Returns
    -------
    radius_mm : (float, float)
    irregularity, edge_mm : float
    """
    if lesion_appearance not in LESION_APPEARANCES:
        raise ValueError(f"lesion_appearance must be one of {', '.join(LESION_APPEARANCES)}; "
                         f"got {lesion_appearance!r}")
    _check_placement(lesion_placement)
    _check_int("n_lesions", n_lesions, 0, 10)
    radius_mm = _check_interval("lesion_radius_mm", lesion_radius_mm, 0.0, 60.0, lo_open=True)
    irregularity = _check_range("lesion_irregularity", lesion_irregularity, 0.0, 0.5)
    edge = _check_range("lesion_edge_mm", lesion_edge_mm, 0.0, 10.0, lo_open=True)
    return radius_mm, irregularity, edge


def _random_pullback(
    rng: np.random.Generator,
    centre: NDArray[np.float64],
    rotation: float,
    scaling: float,
    translation: float,
) -> NDArray[np.float64]:
    """Draw a head pose; return its 4x4 pull-back (subject LPS mm -> template LPS mm).

    Parameters
    ----------
    rng : numpy.random.Generator
        Draws the Euler angles, then the axis scales, then the translation.
    centre : numpy.ndarray
        Template LPS point that rotation and scaling keep fixed (the brain centre).
    rotation, scaling, translation : float
        Largest Euler angle (degrees), relative scale change and shift (mm) per axis.
    """
    angles = rng.uniform(-rotation, rotation, size=3)
    scales = 1.0 + rng.uniform(-scaling, scaling, size=3)
    shift = rng.uniform(-translation, translation, size=3)
    # Forward (template -> subject): rotate and scale about the brain centre, then translate.
    linear = _euler_rotation(angles) @ np.diag(scales)
    forward = np.eye(4)
    forward[:3, :3] = linear
    forward[:3, 3] = centre + shift - linear @ centre
    return np.linalg.inv(forward)


def _random_elastic_modes(
    rng: np.random.Generator, n_modes: int, deformation: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Draw the sinusoids of an elastic warp with RMS displacement ``deformation`` (mm).

    Returns
    -------
    wavevectors, amplitudes, phases : numpy.ndarray
        ``(K, 3)`` rad/mm (wavelengths 80-160 mm), ``(K, 3)`` mm and ``(K,)`` rad.
    """
    wavelengths = rng.uniform(80.0, 160.0, size=n_modes)
    wavevectors = _random_unit_vectors(rng, n_modes) * (2.0 * math.pi / wavelengths)[:, None]
    # E|u|^2 = K * 3 sigma^2 * E[sin^2] = 1.5 K sigma^2, hence sigma for the requested RMS.
    sigma = deformation / math.sqrt(1.5 * n_modes)
    amplitudes = rng.normal(0.0, sigma, size=(n_modes, 3))
    phases = rng.uniform(0.0, 2.0 * math.pi, size=n_modes)
    return wavevectors, amplitudes, phases


def _jittered_intensities(
    rng: np.random.Generator, table: Mapping[str, Mapping[str, float]], jitter: float
) -> dict[str, dict[str, float]]:
    """Per contrast of :data:`CONTRASTS`, ``table``'s intensities each scaled by ``1 +- jitter``.

    Draws one uniform value per contrast and tissue, in :data:`CONTRASTS` and table order.
    """
    return {
        contrast: {name: float(value * (1.0 + rng.uniform(-jitter, jitter)))
                   for name, value in table[contrast].items()}
        for contrast in CONTRASTS
    }


def _with_appearance(
    rng: np.random.Generator,
    lesions: tuple[Lesion, ...],
    lesion_appearance: str,
    intensities: Mapping[str, Mapping[str, float]],
) -> tuple[Lesion, ...]:
    """``lesions`` with the look ``lesion_appearance`` gives them (see :func:`random_subject`).

    ``typical`` lesions keep the contrast's lesion intensities; ``varied`` ones each draw
    their own from ``rng`` against the subject's ``intensities``.
    """
    if lesion_appearance == "varied":
        return tuple(dataclasses.replace(item, appearance=_varied_appearance(rng, intensities))
                     for item in lesions)
    if lesion_appearance == "distinct":
        return tuple(dataclasses.replace(item, appearance=DISTINCT_APPEARANCE) for item in lesions)
    if lesion_appearance == "striped":
        return tuple(
            dataclasses.replace(item, appearance=STRIPED_APPEARANCE,
                                stripe_period_mm=STRIPE_PERIOD_MM,
                                stripe_amplitude=STRIPE_AMPLITUDE)
            for item in lesions
        )
    return lesions


#: Lesion appearance models of :func:`random_subject`.
LESION_APPEARANCES = ("typical", "varied", "distinct", "striped")

#: Lesion placements of :func:`random_subject` (``lesion_placement``).
LESION_PLACEMENTS = ("deep", "cortical")
# A cortical lesion's centre lies this range of its extent below the brain's surface.
_CORTICAL_DEPTH = (0.3, 0.8)

#: ``lesion_appearance="distinct"``: one (rim, core) per contrast for every lesion, chosen unlike
#: any normal tissue of the contrast (darker than white matter on T2w, yet above the intensity
#: brain-mask threshold; brighter than white matter on T1w), so that a lesion token is anomalous
#: against every normal brain yet near-identical to the lesions of other subjects.
DISTINCT_APPEARANCE: tuple[tuple[str, float, float], ...] = (("T2w", 0.15, 0.1), ("T1w", 1.1, 1.2))

#: ``lesion_appearance="striped"``: a mid-grey base per contrast (near grey matter) with stripes of
#: :data:`STRIPE_AMPLITUDE` and period :data:`STRIPE_PERIOD_MM` across it. Normal anatomy is smooth
#: at this scale, so a striped token is far from every normal token (intensity encoder: nearest
#: normal-volume distance about twice the normal tokens' 99th percentile), while the lesions of
#: all subjects share the texture. The period (8 mm) spans about three pooling bins of a token
#: and is resolved by slices up to 3 mm thick.
STRIPED_APPEARANCE: tuple[tuple[str, float, float], ...] = (("T2w", 0.55, 0.55), ("T1w", 0.6, 0.6))
STRIPE_PERIOD_MM = 8.0
STRIPE_AMPLITUDE = 0.35


def _varied_appearance(
    rng: np.random.Generator, intensities: Mapping[str, Mapping[str, float]]
) -> tuple[tuple[str, float, float], ...]:
    """A lesion's own (rim, core) per contrast, visibly unlike the grey and white matter.

    Core and rim are uniform in [0.05, 1.0], redrawn until the core differs from the subject's
    white matter by at least 0.2 and from its grey matter by at least 0.15, so the lesion is
    visible whatever its polarity.
    """
    appearance = []
    for contrast in CONTRASTS:
        wm, gm = intensities[contrast]["wm"], intensities[contrast]["gm"]
        while True:
            rim, core = (float(v) for v in rng.uniform(0.05, 1.0, size=2))
            if abs(core - wm) >= 0.2 and abs(core - gm) >= 0.15:
                break
        appearance.append((contrast, round(rim, 4), round(core, 4)))
    return tuple(appearance)


def _with_mass_effect(
    rng: np.random.Generator, lesion: Lesion, push_ratio: tuple[float, float]
) -> Lesion:
    """``lesion`` with a drawn push at its boundary and a decay length that keep the map 1:1."""
    mean_radius = float(lesion.semi_axes_mm.mean())
    # The boundary is nowhere closer to the centre than this (lobes shrink it by at most
    # sum |a_m|); the inside is compressed by push / radius, which must stay well below 1.
    min_radius = float(lesion.semi_axes_mm.min()) * (1.0 - float(np.abs(
        lesion.lobe_amplitudes).sum()))
    push = min(float(rng.uniform(*push_ratio)) * mean_radius, 0.6 * min_radius)
    # The push fades out over three radii (at least 20 mm), as the rest of the brain, the
    # falx and the skull take it up.
    reach = max(3.0 * mean_radius, 20.0)
    return dataclasses.replace(lesion, mass_effect_mm=push, mass_effect_range_mm=reach)


# --------------------------------------------------------------------------------------------
# head: skull, scalp, face and neck around the template brain
# --------------------------------------------------------------------------------------------

#: Relative intensities of the tissues around the brain, on the scale of
#: :data:`TISSUE_INTENSITIES` (air is 0; the CSF around the brain takes the subject's CSF value).
#: Cortical bone has almost no signal on either contrast; fatty marrow (diploe), subcutaneous
#: and orbital fat are bright on T1w and fairly bright on (turbo spin echo) T2w; muscle is darker
#: than grey matter on both; the vitreous body is fluid like CSF.
HEAD_TISSUE_INTENSITIES: dict[str, dict[str, float]] = {
    "T1w": {"bone": 0.04, "marrow": 0.72, "fat": 0.95, "skin": 0.55, "muscle": 0.42,
            "vitreous": 0.12, "cord": 0.80},
    "T2w": {"bone": 0.04, "marrow": 0.45, "fat": 0.78, "skin": 0.45, "muscle": 0.26,
            "vitreous": 1.05, "cord": 0.42},
}

# Where the structures the brain-only template lacks sit, in MNI coordinates (RAS mm, the way
# atlases quote them), fitted against the template brain: the lowest orbital surface of the
# frontal lobes is at z = -20 mm (x = +-32, y = 44..60), the medulla ends at (0, -46, -72), the
# frontal pole is at y = 72 and the occipital pole at y = -106.
_EYE_RAS = (32.0, 56.0, -40.0)  # right eye centre; the left one mirrors x
_EYE_RADIUS_MM = 12.0
_ORBIT_OFFSET_RAS = (0.0, -8.0, 0.0)  # orbital fat sits behind and around the globe
_ORBIT_SEMI_MM = (16.0, 20.0, 15.0)
_FACE_RAS, _FACE_SEMI_MM = (0.0, 30.0, -55.0), (60.0, 46.0, 50.0)
_NOSE_RAS, _NOSE_SEMI_MM = (0.0, 78.0, -48.0), (11.0, 14.0, 22.0)
_MAXILLARY_RAS, _MAXILLARY_SEMI_MM = (26.0, 46.0, -64.0), (12.0, 15.0, 14.0)
_NASAL_RAS, _NASAL_SEMI_MM = (0.0, 56.0, -54.0), (7.0, 20.0, 16.0)
_NECK_AXIS_RAS, _NECK_SEMI_MM, _NECK_TOP_Z = (0.0, -25.0), (54.0, 52.0), -40.0
_CANAL_AXIS_RAS = (0.0, -46.0)  # the spinal canal runs straight down from the medulla's tip
_CORD_RADIUS_MM, _CANAL_RADIUS_MM, _CANAL_WALL_MM = 5.0, 8.0, 4.0
_FORAMEN_MAGNUM_Z, _MEDULLA_TIP_Z = -58.0, -70.0
_VERTEBRA_AXIS_RAS, _VERTEBRA_SEMI_MM, _VERTEBRA_TOP_Z = (0.0, -24.0), (15.0, 11.0), -80.0
# Grid padding (mm) of the template, (RAS low side, RAS high side) per axis: room for the scalp,
# the nose, and 84 mm of neck below the template's floor.
_HEAD_PADDING_MM = ((16, 16), (8, 24), (84, 8))
# Axial coverage of a head series reaches this far below the brain (MNI z), about the level of
# the second cervical vertebra, as a routine brain protocol does.
_COVER_FLOOR_Z = -95.0
# Upper bound of CSF + skull + scalp + temporalis (mm), for planning fields of view.
_MAX_SHELL_MM = 3.0 + 8.0 + 8.0 + 6.0
_MAX_SHAPE_SCALE = 1.08

# Per-subject ranges of the head's layers (mm) and shapes.
_CSF_SHELL_MM = (1.5, 3.0)
_SKULL_MM = (4.0, 8.0)
_SCALP_MM = (4.0, 8.0)


def _ras_to_lps(point: Sequence[float]) -> NDArray[np.float64]:
    out = np.asarray(point, dtype=float).copy()
    out[:2] *= -1.0
    return out


@dataclass(frozen=True)
class HeadTemplate:
    """The template grid padded to hold a whole head, with the brain's intracranial envelope.

    The brain-only template is padded (mostly downwards, for the neck) and the brain mask is
    closed into a smooth envelope, the inner surface of the cerebrospinal fluid layer: the skull
    and scalp of :class:`HeadShape` are shells at given distances outside it.

    Attributes
    ----------
    brain : numpy.ndarray
        The template brain mask on the padded grid, ``float32`` 0/1, ``[i, j, k]``.
    envelope_mm : numpy.ndarray
        Signed distance (mm, ``float32``) to the envelope: negative inside, positive outside,
        slightly smoothed so that shells built on it have no voxel steps.
    axes_lps : tuple of numpy.ndarray
        The LPS coordinate (mm) of each index along ``i``, ``j`` and ``k`` (the grid is axis
        aligned).
    index_to_lps : numpy.ndarray
        4x4 matrix from padded voxel ``(i, j, k)`` to template LPS mm.
    pad_voxels : numpy.ndarray
        Voxels added before ``i``, ``j``, ``k`` (template voxel = padded voxel - pad).
    cover_points_lps : numpy.ndarray
        ``(N, 3)`` template LPS points on the surface of the largest head any subject can have,
        above the coverage floor: what an acquisition of a head must contain.
    resolution : int
        Voxel size (mm).
    """

    brain: NDArray[np.float32]
    envelope_mm: NDArray[np.float32]
    axes_lps: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]
    index_to_lps: NDArray[np.float64]
    pad_voxels: NDArray[np.int64]
    cover_points_lps: NDArray[np.float64]
    resolution: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """Padded grid size ``(i, j, k)``."""
        return tuple(self.brain.shape)  # type: ignore[return-value]

    @property
    def lps_to_index(self) -> NDArray[np.float64]:
        """4x4 matrix from template LPS mm to padded voxel ``(i, j, k)``."""
        return np.linalg.inv(self.index_to_lps)

    def coordinates(self) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """LPS coordinate arrays shaped for broadcasting over the grid (``(n,1,1)``, ...)."""
        x, y, z = self.axes_lps
        return x[:, None, None], y[None, :, None], z[None, None, :]


def _ellipsoid_sdf(
    coords: tuple[NDArray[np.float64], ...], centre: ArrayLike, semi_axes: ArrayLike
) -> NDArray[np.float32]:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid (negative inside).

    ``k0 (k0 - 1) / k1`` with ``k0 = |p / r|`` and ``k1 = |p / r^2|``: exact on the axes and
    close elsewhere, which is all that a soft tissue boundary needs.
    """
    centre = np.asarray(centre, dtype=float)
    semi = np.asarray(semi_axes, dtype=float)
    k0 = np.zeros(1, dtype=np.float32)
    k1 = np.zeros(1, dtype=np.float32)
    for axis in range(len(semi)):
        delta = (coords[axis] - centre[axis]).astype(np.float32)
        k0 = k0 + (delta / np.float32(semi[axis])) ** 2
        k1 = k1 + (delta / np.float32(semi[axis] ** 2)) ** 2
    k0 = np.sqrt(k0)
    k1 = np.sqrt(k1)
    return (k0 * (k0 - 1.0) / np.maximum(k1, np.float32(1e-6))).astype(np.float32)


def _smooth_min(a: NDArray[np.floating], b: NDArray[np.floating], k: float) -> NDArray[np.float32]:
    """Polynomial smooth minimum of two signed distances: a union with a ``k`` mm rounded seam."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return (b * (1.0 - h) + a * h - k * h * (1.0 - h)).astype(np.float32)


def _inside(sdf: NDArray[np.floating], width: float) -> NDArray[np.float32]:
    """Soft indicator of ``sdf < 0``: a linear ramp ``width`` mm wide, as partial volume gives."""
    return np.clip(0.5 - np.asarray(sdf, dtype=np.float32) / np.float32(width), 0.0, 1.0)


@functools.lru_cache(maxsize=2)
def load_head_template(resolution: int = 2) -> HeadTemplate:
    """Pad the template grid for a head and build the brain's intracranial envelope.

    Parameters
    ----------
    resolution : int, default 2
        1 or 2 (mm), that of :func:`load_tissue_maps`.

    Returns
    -------
    HeadTemplate
        Read-only arrays, shared between calls (the result is cached).
    """
    from scipy import ndimage

    maps = load_tissue_maps(resolution)
    res = float(maps.resolution)
    pads = [(int(round(lo / res)), int(round(hi / res))) for lo, hi in _HEAD_PADDING_MM]
    brain = np.pad(maps.brain, pads).astype(np.float32)
    # The template affine is diagonal and positive (RAS), so index i grows with RAS x.
    ras = maps.affine_ras.copy()
    ras[:3, 3] -= ras[:3, :3] @ np.array([lo for lo, _ in pads], dtype=float)
    flip = np.eye(4)
    flip[:3, :3] = _FLIP_LPS_RAS
    index_to_lps = flip @ ras
    axes = tuple(
        index_to_lps[axis, axis] * np.arange(brain.shape[axis]) + index_to_lps[axis, 3]
        for axis in range(3)
    )
    # Envelope: closing the brain by a Gaussian blur (sigma 4 mm) and a low threshold fills the
    # sulci and the narrow gaps between lobes, as the arachnoid does; the skull follows it.
    inside = (ndimage.gaussian_filter(brain, 4.0 / res) > 0.25) | (brain > 0.5)
    inside = ndimage.binary_fill_holes(inside)
    signed = (ndimage.distance_transform_edt(~inside, sampling=res)
              - ndimage.distance_transform_edt(inside, sampling=res))
    envelope = ndimage.gaussian_filter(signed.astype(np.float32), 1.0)
    template = HeadTemplate(
        brain=brain,
        envelope_mm=envelope.astype(np.float32),
        axes_lps=axes,  # type: ignore[arg-type]
        index_to_lps=index_to_lps,
        pad_voxels=np.array([lo for lo, _ in pads], dtype=np.int64),
        cover_points_lps=np.zeros((0, 3)),
        resolution=maps.resolution,
    )
    # The largest head any subject can have: thickest shells, largest face and nose, widest neck.
    coords = template.coordinates()
    scale = _MAX_SHAPE_SCALE
    bound = envelope < _MAX_SHELL_MM
    bound |= _ellipsoid_sdf(coords, _ras_to_lps(_FACE_RAS), np.multiply(_FACE_SEMI_MM, scale)) < 0
    bound |= _ellipsoid_sdf(coords, _ras_to_lps(_NOSE_RAS), np.multiply(_NOSE_SEMI_MM, scale)) < 0
    neck = _ellipsoid_sdf(coords[:2], _ras_to_lps((*_NECK_AXIS_RAS, 0.0))[:2],
                          np.multiply(_NECK_SEMI_MM, scale)) < 0
    bound |= neck & (coords[2] <= _NECK_TOP_Z)
    bound &= np.broadcast_to(coords[2] >= _COVER_FLOOR_Z, bound.shape)
    surface = bound & ~ndimage.binary_erosion(bound)
    ijk = np.argwhere(surface).astype(float)
    cover = ijk @ index_to_lps[:3, :3].T + index_to_lps[:3, 3]
    template = dataclasses.replace(template, cover_points_lps=cover)
    for array in (template.brain, template.envelope_mm, template.index_to_lps,
                  template.pad_voxels, template.cover_points_lps, *template.axes_lps):
        array.setflags(write=False)
    return template


@dataclass(frozen=True)
class HeadShape:
    """One subject's skull, scalp, face and neck, in template space.

    Every layer is a shell around the template's intracranial envelope (see
    :class:`HeadTemplate`) whose thickness varies smoothly over the head: a sum of sinusoids
    with 70-160 mm wavelengths, ``mean + amplitude * field`` with ``field`` in ``[-1, 1]``.
    From the brain outwards: cerebrospinal fluid, inner table (cortical bone), diploe (marrow),
    outer table, then the scalp: galea and muscle (thicker over the temples, where the
    temporalis lies), subcutaneous fat and skin. The face (with the eyes in fat-filled orbits,
    the maxillary sinuses and the nasal cavity) and the neck (with the spinal cord in its canal
    and the vertebral bodies) are smooth shapes joined to the scalp.

    Attributes
    ----------
    wavevectors : numpy.ndarray
        ``(K, 3)`` rad/mm of the thickness field's sinusoids.
    phases : numpy.ndarray
        ``(K,)`` rad.
    weights : numpy.ndarray
        ``(3, K)``, rows for the CSF, skull and scalp fields; each row's absolute values sum
        to 1, so each field stays in ``[-1, 1]``.
    means_mm, amplitudes_mm : numpy.ndarray
        ``(3,)`` mean and amplitude of the CSF, skull and scalp thicknesses.
    inner_table_fraction, outer_table_fraction : float
        Shares of the skull thickness taken by the two cortical tables; the diploe is the rest.
    skin_mm : float
        Thickness of the skin.
    fat_fraction : float
        Share of the scalp (less the skin) that is subcutaneous fat; galea and muscle are the rest.
    temporalis_mm : float
        Extra muscle thickness over the temples.
    face_scale : numpy.ndarray
        ``(3,)`` scale of the face and nose around their template shapes.
    neck_scale : numpy.ndarray
        ``(2,)`` scale of the neck's cross-section.
    eye_offset_mm : numpy.ndarray
        ``(3,)`` LPS shift of both eyes from their template position.
    eyes : bool
        Whether eyes and orbits are drawn.
    intensities : dict
        Per contrast, the subject's :data:`HEAD_TISSUE_INTENSITIES` (jittered).
    """

    wavevectors: NDArray[np.float64]
    phases: NDArray[np.float64]
    weights: NDArray[np.float64]
    means_mm: NDArray[np.float64]
    amplitudes_mm: NDArray[np.float64]
    inner_table_fraction: float
    outer_table_fraction: float
    skin_mm: float
    fat_fraction: float
    temporalis_mm: float
    face_scale: NDArray[np.float64]
    neck_scale: NDArray[np.float64]
    eye_offset_mm: NDArray[np.float64]
    eyes: bool
    intensities: dict[str, dict[str, float]]

    def thickness_fields(
        self, coords: tuple[NDArray[np.floating], ...]
    ) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
        """CSF, skull and scalp thicknesses (mm) at LPS ``coords`` (broadcastable arrays)."""
        fields = [np.zeros(1, dtype=np.float32) for _ in range(3)]
        for k, (wave, phase) in enumerate(zip(self.wavevectors, self.phases, strict=True)):
            argument = (np.float32(wave[0]) * coords[0].astype(np.float32)
                        + np.float32(wave[1]) * coords[1].astype(np.float32)
                        + np.float32(wave[2]) * coords[2].astype(np.float32)
                        + np.float32(phase))
            wave_values = np.sin(argument)
            for layer in range(3):
                fields[layer] = fields[layer] + np.float32(self.weights[layer, k]) * wave_values
        return tuple(  # type: ignore[return-value]
            (np.float32(self.means_mm[layer]) + np.float32(self.amplitudes_mm[layer])
             * fields[layer]).astype(np.float32)
            for layer in range(3)
        )


def _random_head(
    rng: np.random.Generator, intensity_jitter: float, eyes: bool, n_modes: int = 4
) -> HeadShape:
    wavelengths = rng.uniform(70.0, 160.0, size=n_modes)
    wavevectors = _random_unit_vectors(rng, n_modes) * (2.0 * math.pi / wavelengths)[:, None]
    phases = rng.uniform(0.0, 2.0 * math.pi, size=n_modes)
    weights = rng.normal(size=(3, n_modes))
    weights /= np.abs(weights).sum(axis=1, keepdims=True)
    means, amplitudes = [], []
    for lo, hi in (_CSF_SHELL_MM, _SKULL_MM, _SCALP_MM):
        # A mean in the middle half of the range and an amplitude that keeps the field inside it.
        mean = rng.uniform(lo + 0.25 * (hi - lo), hi - 0.25 * (hi - lo))
        means.append(mean)
        amplitudes.append(min(mean - lo, hi - mean))
    intensities = _jittered_intensities(rng, HEAD_TISSUE_INTENSITIES, intensity_jitter)
    return HeadShape(
        wavevectors=wavevectors,
        phases=phases,
        weights=weights,
        means_mm=np.array(means),
        amplitudes_mm=np.array(amplitudes),
        inner_table_fraction=float(rng.uniform(0.25, 0.35)),
        outer_table_fraction=float(rng.uniform(0.25, 0.35)),
        skin_mm=float(rng.uniform(1.2, 2.0)),
        fat_fraction=float(rng.uniform(0.5, 0.75)),
        temporalis_mm=float(rng.uniform(2.0, 6.0)),
        face_scale=rng.uniform(2.0 - _MAX_SHAPE_SCALE, _MAX_SHAPE_SCALE, size=3),
        neck_scale=rng.uniform(0.9, _MAX_SHAPE_SCALE, size=2),
        eye_offset_mm=rng.uniform(-2.0, 2.0, size=3),
        eyes=bool(eyes),
        intensities=intensities,
    )


@dataclass(frozen=True)
class HeadVolumes:
    """A subject's head rendered on the padded template grid (arrays ``[i, j, k]``).

    Attributes
    ----------
    images : dict
        Per contrast, ``float32`` relative intensities: the brain exactly as
        :func:`synthesize_contrast` renders it inside the brain mask, the head's tissues around
        it, 0 in the air.
    head : numpy.ndarray
        ``float32`` soft head mask in ``[0, 1]`` (everything that is not air).
    template : HeadTemplate
        The grid.
    """

    images: dict[str, NDArray[np.float32]]
    head: NDArray[np.float32]
    template: HeadTemplate

    @functools.cached_property
    def cover_points_lps(self) -> NDArray[np.float64]:
        """Template LPS points of this head's surface above the coverage floor (about C2)."""
        from scipy import ndimage

        above = self.template.axes_lps[2] >= _COVER_FLOOR_Z
        inside = (self.head >= 0.5) & above[None, None, :]
        surface = inside & ~ndimage.binary_erosion(inside)
        ijk = np.argwhere(surface).astype(float)
        return ijk @ self.template.index_to_lps[:3, :3].T + self.template.index_to_lps[:3, 3]


def synthesize_head(
    maps: TissueMaps,
    subject: SubjectAnatomy,
    contrasts: Sequence[str] = CONTRASTS,
    *,
    brain_images: Mapping[str, NDArray[np.float32]] | None = None,
) -> HeadVolumes:
    """Render a subject's whole head (brain, skull, scalp, face, neck) on the padded template grid.

    The head's tissues are those :func:`render_series` evaluates at each voxel of a series
    (:func:`_paint_head`), here on the template grid with a one-voxel soft edge; the brain is
    set last with its hard mask, so brain intensities are exactly those of the skull-stripped
    rendering. Acquisition planning uses the result's head surface; it is also the way to look
    at a subject's head in template space.

    Parameters
    ----------
    maps : TissueMaps
        The template.
    subject : SubjectAnatomy
        Must carry a :class:`HeadShape` (``random_subject(..., with_head=True)``).
    contrasts : sequence of {"T2w", "T1w"}
        Images to render.
    brain_images : mapping, optional
        Per contrast, a precomputed :func:`synthesize_contrast` of the subject's brain.

    Returns
    -------
    HeadVolumes
    """
    if subject.head is None:
        raise ValueError("subject has no head: draw it with random_subject(..., with_head=True)")
    contrasts = tuple(_check_contrast(c) for c in contrasts)
    template = load_head_template(maps.resolution)
    images, head_mask = _paint_head(subject, template.coordinates(), template.envelope_mm,
                                    contrasts, float(template.resolution))
    brain = template.brain > 0.5
    pads = [(int(p), int(n - p - s)) for p, n, s in
            zip(template.pad_voxels, template.shape, maps.shape, strict=True)]
    for contrast in contrasts:
        if brain_images is not None and contrast in brain_images:
            brain_image = np.asarray(brain_images[contrast], dtype=np.float32)
            if brain_image.shape != maps.shape:
                raise ValueError(f"brain_images[{contrast!r}] must have the template shape "
                                 f"{maps.shape}; got {brain_image.shape}")
        else:
            brain_image = synthesize_contrast(
                maps, contrast, {k: subject.intensities[contrast][k] for k in ("csf", "gm", "wm")})
        images[contrast] = np.broadcast_to(images[contrast], template.shape).copy()
        images[contrast][brain] = np.pad(brain_image, pads)[brain]
    head_mask = np.maximum(np.broadcast_to(head_mask, template.shape), template.brain)
    return HeadVolumes(images=images, head=head_mask.astype(np.float32), template=template)


def _paint_head(
    subject: SubjectAnatomy,
    coords: tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]],
    envelope: NDArray[np.floating],
    contrasts: Sequence[str],
    width: float,
) -> tuple[dict[str, NDArray[np.float32]], NDArray[np.float32]]:
    """The head's tissues around the brain at template LPS points, brain not included.

    Tissues are painted from the outside in, each over the previous ones with a soft edge of
    ``width`` mm (the partial volume of a voxel that size): head soft tissue (muscle),
    subcutaneous fat and skin under the head's surface, orbital fat and eyes, air in the
    sinuses, the vertebral bodies and the canal's wall, the skull shells (outer table, diploe,
    inner table, CSF), then the spinal canal and cord through the foramen magnum.

    Parameters
    ----------
    subject : SubjectAnatomy
        With a head.
    coords : tuple of numpy.ndarray
        Template LPS x, y, z (broadcastable arrays).
    envelope : numpy.ndarray
        :attr:`HeadTemplate.envelope_mm` at the same points.
    contrasts : sequence of str
        Images to paint.
    width : float
        Soft edge width (mm).

    Returns
    -------
    images : dict
        Per contrast, relative intensities (0 in the air).
    head : numpy.ndarray
        Soft mask of the head (skull included).
    """
    head = subject.head
    assert head is not None
    res = float(width)
    t_csf, t_skull, t_scalp = head.thickness_fields(coords)
    # Outer boundaries of the skull's layers, in mm outside the envelope: CSF, inner table,
    # diploe, outer table.
    b1 = t_csf
    b2 = b1 + np.float32(head.inner_table_fraction) * t_skull
    b4 = b1 + t_skull
    b3 = b4 - np.float32(head.outer_table_fraction) * t_skull
    envelope = np.asarray(envelope, dtype=np.float32)
    surface = _head_surface(head, coords, envelope, b4 + t_scalp)

    images: dict[str, NDArray[np.float32]] = {
        c: np.zeros(np.broadcast_shapes(surface.shape, envelope.shape), dtype=np.float32)
        for c in contrasts}
    values = {c: dict(head.intensities[c], csf=subject.intensities[c]["csf"], air=0.0)
              for c in contrasts}

    def paint(mask: NDArray[np.float32], tissue: str) -> None:
        for contrast in contrasts:
            image = images[contrast]
            image -= mask * (image - np.float32(values[contrast][tissue]))

    in_head = _paint_scalp(paint, head, surface, t_scalp, res)
    del surface, t_scalp
    _paint_face_cavities(paint, head, coords, res)
    _paint_vertebra(paint, coords, res)
    canal, below_foramen = _spinal_canal(coords, res)
    paint(below_foramen * _inside(canal - (_CANAL_RADIUS_MM + _CANAL_WALL_MM), res), "bone")
    skull = _paint_skull(paint, envelope, (b1, b2, b3, b4), res)
    head_mask = np.maximum(in_head, skull)
    # Large arrays on the template grid: free them before the last two layers.
    del in_head, skull, b1, b2, b3, b4, t_csf, t_skull
    paint(below_foramen * _inside(canal - _CANAL_RADIUS_MM, res), "csf")
    paint(_inside(coords[2] - _MEDULLA_TIP_Z, res) * _inside(canal - _CORD_RADIUS_MM, res), "cord")
    return images, head_mask


#: Paints one tissue over the images painted so far: ``(soft mask, tissue name)``.
_Paint = Callable[[NDArray[np.float32], str], None]


def _face_point(head: HeadShape, ras: Sequence[float]) -> NDArray[np.float64]:
    """LPS position of a template face landmark (RAS mm), scaled with the subject's face."""
    face_centre = _ras_to_lps(_FACE_RAS)
    return face_centre + (_ras_to_lps(ras) - face_centre) * head.face_scale


def _head_surface(
    head: HeadShape,
    coords: tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]],
    envelope: NDArray[np.float32],
    scalp_outer: NDArray[np.float32],
) -> NDArray[np.float32]:
    """Signed distance (mm, negative inside) to the skin: cranium, face, nose and neck joined.

    Parameters
    ----------
    head : HeadShape
        The subject's head.
    coords : tuple of numpy.ndarray
        Template LPS x, y, z (broadcastable arrays).
    envelope : numpy.ndarray
        Signed distance to the intracranial envelope at ``coords``.
    scalp_outer : numpy.ndarray
        Depth (mm) of the scalp's outer surface outside the envelope (CSF, skull and scalp),
        before the temporalis.
    """
    x, y, z = coords
    # The temporalis: extra muscle over the temples (|x| > 40 mm, around the level of the
    # lateral ventricles' floor), none over the vertex and the occiput.
    lateral = np.clip((np.abs(x) - 40.0) / 25.0, 0.0, 1.0)
    temporal = (head.temporalis_mm * lateral * lateral * (3.0 - 2.0 * lateral)
                * np.exp(-(((z - 5.0) / 28.0) ** 2)) * (y < 60.0)).astype(np.float32)
    cranium = envelope - (scalp_outer + temporal)
    del temporal
    face = _ellipsoid_sdf(coords, _ras_to_lps(_FACE_RAS),
                          np.multiply(_FACE_SEMI_MM, head.face_scale))
    nose = _ellipsoid_sdf(coords, _face_point(head, _NOSE_RAS),
                          np.multiply(_NOSE_SEMI_MM, head.face_scale))
    neck_axis = _ras_to_lps((*_NECK_AXIS_RAS, 0.0))[:2]
    neck = np.maximum(
        _ellipsoid_sdf(coords[:2], neck_axis, np.multiply(_NECK_SEMI_MM, head.neck_scale)),
        (z - _NECK_TOP_Z).astype(np.float32),
    )
    return _smooth_min(_smooth_min(cranium, _smooth_min(face, nose, 6.0), 12.0), neck, 20.0)


def _paint_scalp(
    paint: _Paint,
    head: HeadShape,
    surface: NDArray[np.float32],
    t_scalp: NDArray[np.float32],
    res: float,
) -> NDArray[np.float32]:
    """Paint muscle under the skin, then subcutaneous fat and skin; return the head's mask."""
    in_head = _inside(surface, res)
    paint(in_head, "muscle")
    skin = np.float32(head.skin_mm)
    fat = skin + np.float32(head.fat_fraction) * np.maximum(t_scalp - skin, 0.0)
    paint(in_head * _inside(-surface - fat, res), "fat")
    paint(in_head * _inside(-surface - skin, res), "skin")
    return in_head


def _paint_face_cavities(
    paint: _Paint,
    head: HeadShape,
    coords: tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]],
    res: float,
) -> None:
    """Paint the eyes in their orbital fat (if the head has eyes), then the air of the sinuses."""
    if head.eyes:
        for side in (1.0, -1.0):
            eye = _ras_to_lps((side * _EYE_RAS[0], *_EYE_RAS[1:])) + head.eye_offset_mm
            paint(_inside(_ellipsoid_sdf(coords, eye + _ras_to_lps(_ORBIT_OFFSET_RAS),
                                         _ORBIT_SEMI_MM), res), "fat")
            paint(_inside(_ellipsoid_sdf(coords, eye, (_EYE_RADIUS_MM,) * 3), res), "vitreous")
    for side in (1.0, -1.0):
        sinus = _face_point(head, (side * _MAXILLARY_RAS[0], *_MAXILLARY_RAS[1:]))
        paint(_inside(_ellipsoid_sdf(coords, sinus, _MAXILLARY_SEMI_MM), res), "air")
    nasal = _face_point(head, _NASAL_RAS)
    paint(_inside(_ellipsoid_sdf(coords, nasal, _NASAL_SEMI_MM), res), "air")


def _paint_vertebra(
    paint: _Paint,
    coords: tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]],
    res: float,
) -> None:
    """Paint the vertebral bodies below their top: a cortical shell around fatty marrow."""
    below = _inside(coords[2] - _VERTEBRA_TOP_Z, res)
    vertebra_axis = _ras_to_lps((*_VERTEBRA_AXIS_RAS, 0.0))[:2]
    vertebra = _ellipsoid_sdf(coords[:2], vertebra_axis, _VERTEBRA_SEMI_MM)
    paint(below * _inside(vertebra, res), "bone")
    paint(below * _inside(vertebra + 1.5, res), "marrow")


def _spinal_canal(
    coords: tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]],
    res: float,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Distance (mm) to the spinal canal's axis and the soft mask below the foramen magnum."""
    x, y, z = coords
    canal_axis = _ras_to_lps((*_CANAL_AXIS_RAS, 0.0))[:2]
    canal = (np.sqrt((x - canal_axis[0]) ** 2 + (y - canal_axis[1]) ** 2)).astype(np.float32)
    return canal, _inside(z - _FORAMEN_MAGNUM_Z, res)


def _paint_skull(
    paint: _Paint,
    envelope: NDArray[np.float32],
    bounds: tuple[NDArray[np.float32], ...],
    res: float,
) -> NDArray[np.float32]:
    """Paint the skull's shells from the outside in; return the skull's soft mask.

    ``bounds`` are the outer boundaries (mm outside the envelope) of the CSF, inner table,
    diploe and outer table.
    """
    b1, b2, b3, b4 = bounds
    skull = _inside(envelope - b4, res)
    paint(skull, "bone")
    paint(_inside(envelope - b3, res), "marrow")
    paint(_inside(envelope - b2, res), "bone")
    paint(_inside(envelope - b1, res), "csf")
    return skull


# --------------------------------------------------------------------------------------------
# acquisition grids and rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcquisitionGrid:
    """The voxel grid of one series (the Volume geometry contract, without voxels).

    Attributes
    ----------
    shape_zyx : tuple of int
        ``(slices, rows, columns)``.
    origin : numpy.ndarray
        LPS mm of the centre of voxel ``(0, 0, 0)`` (= ImagePositionPatient of the first slice).
    spacing : numpy.ndarray
        ``(column spacing, row spacing, slice spacing)`` mm.
    direction : numpy.ndarray
        3x3, columns = LPS directions of the x (along a row), y (down a column) and z (slice) axes.
    orientation : str
        "axial", "coronal" or "sagittal" (the nearest standard plane).
    """

    shape_zyx: tuple[int, int, int]
    origin: NDArray[np.float64]
    spacing: NDArray[np.float64]
    direction: NDArray[np.float64]
    orientation: str

    @property
    def index_to_physical(self) -> NDArray[np.float64]:
        """4x4 matrix from a continuous ``(x, y, z)`` index to LPS mm."""
        return index_to_physical_matrix(self.origin, self.spacing, self.direction)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def orientation_direction(
    orientation: str, oblique: NDArray[np.floating] | None = None
) -> NDArray[np.float64]:
    """Direction matrix (columns x, y, z in LPS) of a standard plane, optionally tilted.

    Parameters
    ----------
    orientation : {"axial", "coronal", "sagittal"}
        Axial: rows run to the patient's left, columns to posterior, slices to superior.
        Coronal: rows left, columns inferior, slices posterior. Sagittal: rows posterior,
        columns inferior, slices to the right. The slice axis is always ``x cross y``.
    oblique : numpy.ndarray, optional
        3x3 rotation applied on the left (a small tilt of the whole slab).
    """
    if orientation not in _BASE_DIRECTIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}; got {orientation!r}")
    direction = _BASE_DIRECTIONS[orientation].copy()
    if oblique is not None:
        direction = _as_direction("oblique", oblique) @ direction
    return direction


def acquisition_grid(
    maps: TissueMaps,
    subject: SubjectAnatomy,
    *,
    orientation: str,
    spacing: ArrayLike,
    rng: np.random.Generator,
    max_oblique_deg: float = 4.0,
    margin_mm: float = 5.0,
    max_extra_voxels: int = 12,
    field_of_view_mm: float | None = None,
    head_volumes: HeadVolumes | None = None,
) -> AcquisitionGrid:
    """Plan a series' grid that covers the subject's whole brain or head, as a technologist would.

    A subject with a head (:attr:`SubjectAnatomy.head`) is covered from the vertex to below the
    skull base (about the second cervical vertebra) including the face and the scalp; the neck
    below leaves the field of view as in real scans. Otherwise the brain is covered.

    Parameters
    ----------
    maps, subject : TissueMaps, SubjectAnatomy
        The brain to cover.
    orientation : {"axial", "coronal", "sagittal"}
        Nearest standard plane.
    spacing : array-like
        ``(column, row, slice)`` spacing in mm.
    rng : numpy.random.Generator
        Draws the oblique tilt, the slab position jitter and the extra matrix size.
    max_oblique_deg : float, default 4.0
        Largest tilt of the slab away from the standard plane.
    margin_mm : float, default 5.0
        Field-of-view margin around the brain on each side, on top of a bound on the elastic
        displacement.
    max_extra_voxels : int, default 12
        Each in-plane matrix size grows by a random 0..max_extra_voxels, so that matrices vary
        (only without ``field_of_view_mm``).
    field_of_view_mm : float, optional
        A square in-plane field of view, as scanners are set: the matrix is
        ``round(field_of_view_mm / spacing)`` on both axes (``spacing[0]`` must equal
        ``spacing[1]``), grown when that would not cover the object. Without it, the matrix is
        the object's extent plus margins, plus ``max_extra_voxels``.
    head_volumes : HeadVolumes, optional
        The subject's :func:`synthesize_head`: its own head surface, mapped through the whole
        warp, is covered (plus ``margin_mm``). Without it a subject with a head is covered by
        the largest head any subject can have, with a bound on the elastic displacement.
    """
    spacing = _as_vector3("spacing", spacing)
    if np.any(spacing <= 0):
        raise ValueError(f"spacing must be positive; got {spacing.tolist()}")
    tilt = _check_range("max_oblique_deg", max_oblique_deg, 0.0, 45.0)
    margin = _check_range("margin_mm", margin_mm, 0.0, 100.0)
    extra = _check_int("max_extra_voxels", max_extra_voxels, 0, 1000)
    if field_of_view_mm is not None:
        fov = _check_range("field_of_view_mm", field_of_view_mm, 0.0, 1000.0, lo_open=True)
        if not math.isclose(spacing[0], spacing[1], rel_tol=1e-9):
            raise ValueError(f"a field_of_view_mm needs square pixels (spacing[0] == spacing[1]); "
                             f"got spacing {spacing.tolist()}")

    direction = orientation_direction(orientation, _random_rotation(rng, tilt))
    # The elastic warp is ignored below, so widen the margin by a bound on it: |u| <= sum |a_k|
    # (plus 10 % for the affine's scaling).
    slack = margin + 1.1 * float(np.linalg.norm(subject.amplitudes, axis=1).sum())
    if head_volumes is not None:
        if subject.head is None:
            raise ValueError("head_volumes given for a subject without a head")
        # The exact surface of this head, so only the margin (and a voxel) is needed around it.
        slack = margin + float(head_volumes.template.resolution)
        points = subject.to_subject(head_volumes.cover_points_lps)
    elif subject.head is not None:
        points = subject.to_subject_affine(load_head_template(maps.resolution).cover_points_lps)
    else:
        points = subject.to_subject_affine(maps.brain_points_lps)
    projected = points @ direction  # coordinates along x, y, z axes
    low = projected.min(axis=0) - slack
    high = projected.max(axis=0) + slack
    n = np.ceil((high - low) / spacing).astype(int) + 1
    if field_of_view_mm is None:
        n[:2] += rng.integers(0, extra + 1, size=2)
    else:
        n[:2] = max(int(n[0]), int(n[1]), int(round(fov / spacing[0])))
    centre = 0.5 * (low + high) + rng.uniform(-2.0, 2.0, size=3)
    origin_local = centre - 0.5 * (n - 1) * spacing
    origin = direction @ origin_local
    return AcquisitionGrid(
        shape_zyx=(int(n[2]), int(n[1]), int(n[0])),
        origin=origin,
        spacing=spacing,
        direction=direction,
        orientation=orientation,
    )


@dataclass(frozen=True)
class RenderedSeries:
    """One series rendered on its grid: arrays ``[z, y, x]``.

    Attributes
    ----------
    image : numpy.ndarray
        ``float32`` intensities (arbitrary scanner units), 0 outside the brain of a
        skull-stripped series.
    brain : numpy.ndarray
        ``bool`` brain mask.
    lesion : numpy.ndarray
        ``bool`` lesion ground truth (inside the brain mask).
    grid : AcquisitionGrid
        The geometry of the arrays.
    head : numpy.ndarray or None
        ``bool`` head mask (everything but air) of a subject with a head; None when the series
        is skull-stripped.
    """

    image: NDArray[np.float32]
    brain: NDArray[np.bool_]
    lesion: NDArray[np.bool_]
    grid: AcquisitionGrid
    head: NDArray[np.bool_] | None = None


def _linear_values(
    coef_xyz: NDArray[np.floating], offset: float, index_xyz: tuple[NDArray[np.float32], ...]
) -> NDArray[np.float32]:
    """``coef . (x, y, z) + offset`` at the given voxel indices (``float32``)."""
    x, y, z = index_xyz
    out = np.float32(coef_xyz[0]) * x
    out += np.float32(coef_xyz[1]) * y
    out += np.float32(coef_xyz[2]) * z
    out += np.float32(offset)
    return out


def _brain_candidates(
    maps: TissueMaps,
    index_to_voxel: NDArray[np.float64],
    grid: AcquisitionGrid,
    reach_mm: float,
    stride: int = 4,
) -> NDArray[np.bool_]:
    """Grid voxels that may sample brain, found on a grid ``stride`` times coarser.

    Three quarters of a field of view is background; testing a coarse grid (affine part of the
    warp only) against the brain mask dilated by everything the test ignores (the distance to
    the nearest coarse point, the elastic displacement, the interpolation support) skips them
    without changing any rendered voxel.
    """
    from scipy import ndimage

    positions = []
    for n in grid.shape_zyx[::-1]:  # x, y, z
        # Coarse points every `stride` voxels plus the last one, so that every voxel is within
        # stride / 2 of the coarse point that np.rint(index / stride) names.
        count = int(math.ceil((n - 1) / stride)) + 1
        positions.append(np.minimum(np.arange(count) * stride, n - 1).astype(np.float32))
    x, y, z = np.meshgrid(*positions, indexing="ij")
    coords = np.stack([_linear_values(index_to_voxel[c, :3], index_to_voxel[c, 3], (x, y, z))
                       for c in range(3)])
    distance = ndimage.map_coordinates(maps.outside_mm, coords, order=1, mode="constant",
                                       cval=1e9, prefilter=False, output=np.float32)
    nearest_mm = 0.5 * stride * float(np.linalg.norm(grid.spacing))
    coarse_ok = distance <= reach_mm + 1.1 * nearest_mm  # [x, y, z]
    nz, ny, nx = grid.shape_zyx
    kx, ky, kz = (np.rint(np.arange(n) / stride).astype(int) for n in (nx, ny, nz))
    return coarse_ok.transpose(2, 1, 0)[np.ix_(kz, ky, kx)]


def render_series(
    maps: TissueMaps,
    subject: SubjectAnatomy,
    grid: AcquisitionGrid,
    contrast: str,
    rng: np.random.Generator,
    *,
    noise_fraction: float = 0.03,
    bias_strength: float = 0.1,
    gain: float = 1000.0,
    template_image: NDArray[np.float32] | None = None,
) -> RenderedSeries:
    """Render one series of a subject onto ``grid``.

    Each voxel centre is pulled back through the subject warp into the template (and, around a
    lesion with mass effect, through :meth:`Lesion.mass_effect_pullback`), the contrast and
    brain mask are interpolated there (trilinear) and the lesions are evaluated analytically at
    the template point before the mass effect, so lesion and anatomy can never disagree between
    series. A skull-stripped subject is exactly 0 outside the brain mask. A subject with a head
    (:attr:`SubjectAnatomy.head`) shows skull, scalp, face and neck around the brain, evaluated
    at the same template point (only the smooth envelope distance is interpolated, so the thin
    bone tables stay sharp at the series' resolution, with partial volume over its voxel size),
    and Rician noise in the air around it, as a scanner's magnitude image does.

    Parameters
    ----------
    maps : TissueMaps
        The template.
    subject : SubjectAnatomy
        Warp, intensities, lesions and (optionally) head.
    grid : AcquisitionGrid
        Output geometry.
    contrast : {"T2w", "T1w"}
        Contrast to synthesise.
    rng : numpy.random.Generator
        Draws the bias field and the noise.
    noise_fraction : float, default 0.03
        Rician noise sigma relative to the brightest brain tissue intensity.
    bias_strength : float, default 0.1
        RMS of the log bias field (0.1 is about +-10 %).
    gain : float, default 1000
        Scanner units per unit of relative intensity.
    template_image : numpy.ndarray, optional
        A precomputed :func:`synthesize_contrast` of this subject's intensities (saves time when
        several series share a contrast).
    """
    _check_contrast(contrast)
    noise = _check_range("noise_fraction", noise_fraction, 0.0, 1.0)
    bias = _check_range("bias_strength", bias_strength, 0.0, 1.0)
    gain = _check_range("gain", gain, 0.0, 1e6, lo_open=True)
    intensities = subject.intensities[contrast]
    if template_image is None:
        template_image = synthesize_contrast(
            maps, contrast, {k: intensities[k] for k in ("csf", "gm", "wm")}
        )
    elif template_image.shape != maps.shape:
        raise ValueError(f"template_image must have the template shape {maps.shape}; "
                         f"got {template_image.shape}")
    where, index_xyz, coords = _template_voxel_coordinates(maps, subject, grid)
    # Lesions are evaluated where the voxel lands in the template before any mass effect: the
    # lesion is what displaced the tissue, not displaced itself.
    blends = _lesion_blends(maps, subject, contrast, coords)
    for item in subject.lesions:
        if item.mass_effect_mm > 0:
            _apply_mass_effect(maps, item, coords, maps.index_to_lps, maps.lps_to_index)
    values, inside, in_lesion, in_head = _composite_values(maps, subject, contrast, grid,
                                                           template_image, coords, blends)
    del coords
    if bias > 0:
        values *= np.exp(_log_bias_field(rng, grid, index_xyz, bias))
    values *= np.float32(gain)
    if noise > 0:
        sigma = np.float32(noise * gain * max(intensities["csf"], intensities["gm"],
                                              intensities["wm"]))
        values = _rician(values, sigma, rng)
    return _rendered_series(grid, where, values, inside, in_lesion, in_head)


#: A lesion's blend into the rendered values: indices of the points it may reach, its weight
#: and intensity there, whether each lies inside the lesion, and whether it is confined to the
#: brain (a cortical lesion).
_Blend = tuple[NDArray[np.intp], NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_], bool]


def _template_voxel_coordinates(
    maps: TissueMaps, subject: SubjectAnatomy, grid: AcquisitionGrid
) -> tuple[tuple[NDArray[np.intp], ...], tuple[NDArray[np.float32], ...], NDArray[np.float32]]:
    """The grid voxels to render and the template voxel each lands on through the subject warp.

    Returns
    -------
    where : tuple of numpy.ndarray
        ``numpy.nonzero`` of the voxels rendered (every voxel of a head; those that may sample
        the brain otherwise).
    index_xyz : tuple of numpy.ndarray
        Their x, y and z grid indices (``float32``).
    coords : numpy.ndarray
        ``(3, N)`` ``float32`` template voxel coordinates, elastic displacement included.
    """
    lps_to_voxel = maps.lps_to_index
    # grid index -> subject LPS -> (affine) template LPS -> template voxel is affine; the
    # elastic displacement is added in template-voxel units.
    index_to_template = subject.pullback @ grid.index_to_physical
    index_to_voxel = lps_to_voxel @ index_to_template
    if subject.head is not None:
        # Air is noisy too, so every voxel is rendered.
        candidates = np.ones(grid.shape_zyx, dtype=bool)
    else:
        elastic_bound_mm = float(np.linalg.norm(subject.amplitudes, axis=1).sum())
        # A mass effect only moves points inside the brain (its push is 0 at the surface).
        candidates = _brain_candidates(maps, index_to_voxel, grid,
                                       reach_mm=elastic_bound_mm + 1.5 * maps.resolution)
    where = np.nonzero(candidates)
    index_xyz = tuple(where[axis].astype(np.float32) for axis in (2, 1, 0))

    coords = np.stack([_linear_values(index_to_voxel[c, :3], index_to_voxel[c, 3], index_xyz)
                       for c in range(3)])
    lin, off = index_to_template[:3, :3], index_to_template[:3, 3]
    for k in range(len(subject.phases)):
        wave = subject.wavevectors[k]
        wave_values = np.sin(_linear_values(lin.T @ wave, float(wave @ off + subject.phases[k]),
                                            index_xyz))
        step = lps_to_voxel[:3, :3] @ subject.amplitudes[k]
        for c in range(3):
            coords[c] += np.float32(step[c]) * wave_values
    return where, index_xyz, coords


def _lesion_blends(
    maps: TissueMaps, subject: SubjectAnatomy, contrast: str, coords: NDArray[np.float32]
) -> list[_Blend]:
    """Each lesion's blend at the template voxel coordinates ``coords`` (see :data:`_Blend`)."""
    index_to_lps_sample = maps.index_to_lps
    voxel_size = float(maps.resolution)
    blends: list[_Blend] = []
    for item in subject.lesions:
        near = _near_points(coords, maps.lps_to_index, item.centre_lps,
                            (item.max_extent_mm + 6.0 * item.edge_mm) / voxel_size)
        if near.size == 0:
            continue
        points = (coords[:, near].T.astype(float) @ index_to_lps_sample[:3, :3].T
                  + index_to_lps_sample[:3, 3])
        ratio = item.radius_ratio(points)
        weight = item.membership(ratio)
        lesion_value = _lesion_values(item, contrast, subject.intensities[contrast], points,
                                      ratio)
        blends.append((near, weight, lesion_value, ratio <= 1.0, item.placement == "cortical"))
    return blends


def _lesion_values(
    lesion: Lesion,
    contrast: str,
    intensities: Mapping[str, float],
    points: NDArray[np.float64],
    ratio: NDArray[np.float64],
) -> NDArray[np.float64]:
    """A lesion's relative intensity at template LPS ``points`` (``ratio``: their radius ratio).

    The lesion takes its own (rim, core) for ``contrast`` if it has one, else the subject's
    lesion intensities; stripes, if any, run along template x.
    """
    # Brighter (T2w) or darker (T1w) core fading to the rim value at the boundary.
    core_fraction = np.clip(1.0 - ratio, 0.0, 1.0)
    rim, core = intensities["lesion_rim"], intensities["lesion_core"]
    for name, own_rim, own_core in lesion.appearance:
        if name == contrast:
            rim, core = own_rim, own_core
    lesion_value = lesion.intensity_scale * (rim + (core - rim) * core_fraction)
    if lesion.stripe_amplitude > 0:
        lesion_value = np.maximum(lesion_value + lesion.stripe_amplitude * np.sin(
            2.0 * math.pi * points[:, 0] / lesion.stripe_period_mm), 0.0)
    return lesion_value


def _composite_values(
    maps: TissueMaps,
    subject: SubjectAnatomy,
    contrast: str,
    grid: AcquisitionGrid,
    template_image: NDArray[np.float32],
    coords: NDArray[np.float32],
    blends: list[_Blend],
) -> tuple[NDArray[np.float32], NDArray[np.bool_], NDArray[np.bool_], NDArray[np.bool_] | None]:
    """Relative intensities at template voxel coordinates: brain, head around it, lesions.

    Returns
    -------
    values : numpy.ndarray
        ``float32`` relative intensities.
    inside, in_lesion : numpy.ndarray
        Brain and lesion masks (the latter not yet limited to the brain).
    in_head : numpy.ndarray or None
        Head mask of a subject with a head, else None.
    """
    from scipy import ndimage

    values = ndimage.map_coordinates(template_image, coords, order=1, mode="constant", cval=0.0,
                                     prefilter=False, output=np.float32)
    brain_weight = ndimage.map_coordinates(maps.brain, coords, order=1, mode="constant",
                                           cval=0.0, prefilter=False, output=np.float32)
    inside = brain_weight >= 0.5
    in_head = None
    if subject.head is not None:
        # The brain image is 0 outside the brain, so interpolating it and adding the head's
        # value times the non-brain weight interpolates the composite (brain in its mask, head
        # tissues around it) without a dark seam at the brain's edge.
        head_values, in_head = _head_at(maps, subject, contrast, coords, grid)
        values += (np.float32(1.0) - brain_weight) * head_values
        del head_values
    in_lesion = np.zeros(values.shape, dtype=bool)
    for near, weight, lesion_value, within, confined in blends:
        if confined:
            # A lesion at the brain's surface changes only the brain: outside it (CSF, skull,
            # scalp) its weight fades with the interpolated brain mask to 0.
            weight = weight * brain_weight[near]
        values[near] = ((1.0 - weight) * values[near] + weight * lesion_value).astype(np.float32)
        in_lesion[near] |= within
    return values, inside, in_lesion, in_head


def _log_bias_field(
    rng: np.random.Generator,
    grid: AcquisitionGrid,
    index_xyz: tuple[NDArray[np.float32], ...],
    bias: float,
) -> NDArray[np.float32]:
    """Draw a log bias field of RMS ``bias`` and evaluate it at grid indices ``index_xyz``."""
    # Coil sensitivity: smooth in scanner space (not anatomy), hence on grid points.
    index_to_lps = grid.index_to_physical
    n_bias = 4
    waves = _random_unit_vectors(rng, n_bias) * (
        2.0 * math.pi / rng.uniform(200.0, 400.0, size=n_bias)
    )[:, None]
    weights = rng.normal(0.0, bias * math.sqrt(2.0 / n_bias), size=n_bias)
    phases = rng.uniform(0.0, 2.0 * math.pi, size=n_bias)
    log_bias = np.zeros(index_xyz[0].shape, dtype=np.float32)
    for wave, weight, phase0 in zip(waves, weights, phases, strict=True):
        log_bias += np.float32(weight) * np.sin(_linear_values(
            index_to_lps[:3, :3].T @ wave, float(wave @ index_to_lps[:3, 3] + phase0),
            index_xyz))
    return log_bias


def _rician(
    values: NDArray[np.float32], sigma: np.float32, rng: np.random.Generator
) -> NDArray[np.float32]:
    """Magnitude of ``values`` plus complex Gaussian noise of ``sigma``: a scanner's Rician noise.

    Draws the real part's noise, then the imaginary part's.
    """
    real = values + sigma * rng.standard_normal(values.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(values.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def _rendered_series(
    grid: AcquisitionGrid,
    where: tuple[NDArray[np.intp], ...],
    values: NDArray[np.float32],
    inside: NDArray[np.bool_],
    in_lesion: NDArray[np.bool_],
    in_head: NDArray[np.bool_] | None,
) -> RenderedSeries:
    """Scatter the rendered voxels ``where`` into the grid's arrays.

    Without a head (``in_head`` None) the image is exactly 0 outside the brain.
    """
    shape = grid.shape_zyx
    image = np.zeros(shape, dtype=np.float32)
    brain = np.zeros(shape, dtype=bool)
    lesion = np.zeros(shape, dtype=bool)
    head = None
    if in_head is not None:
        image[where] = values
        head = np.zeros(shape, dtype=bool)
        head[where] = in_head | inside
    else:
        image[where] = np.where(inside, values, np.float32(0.0))  # exact zero background
    brain[where] = inside
    lesion[where] = in_lesion & inside
    return RenderedSeries(image=image, brain=brain, lesion=lesion, grid=grid, head=head)


def _head_at(
    maps: TissueMaps,
    subject: SubjectAnatomy,
    contrast: str,
    coords: NDArray[np.float32],
    grid: AcquisitionGrid,
    chunk: int = 1 << 20,
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Head tissue intensity (brain excluded) and head mask at template voxel coordinates."""
    from scipy import ndimage

    template = load_head_template(maps.resolution)
    to_lps = maps.index_to_lps
    to_padded = template.lps_to_index @ to_lps
    # Partial volume over the series' voxel: a soft edge as wide as the voxel (geometric mean).
    width = max(0.5, float(np.prod(grid.spacing)) ** (1.0 / 3.0))
    n = coords.shape[1]
    values = np.empty(n, dtype=np.float32)
    in_head = np.empty(n, dtype=bool)
    for start in range(0, n, chunk):
        part = coords[:, start:start + chunk].astype(np.float64)
        padded = to_padded[:3, :3] @ part + to_padded[:3, 3:4]
        # Beyond the padded grid the nearest envelope distance is still far outside the head.
        envelope = ndimage.map_coordinates(template.envelope_mm, padded, order=1, mode="nearest",
                                           prefilter=False, output=np.float32)
        lps = to_lps[:3, :3] @ part + to_lps[:3, 3:4]
        images, soft = _paint_head(subject, (lps[0], lps[1], lps[2]), envelope, (contrast,),
                                   width)
        values[start:start + chunk] = images[contrast]
        in_head[start:start + chunk] = soft >= 0.5
    return values, in_head


def _near_points(
    coords: NDArray[np.float32], lps_to_voxel: NDArray[np.float64], centre_lps: NDArray[np.float64],
    reach_voxels: float,
) -> NDArray[np.intp]:
    """Indices of the voxel coordinates ``(3, N)`` within a box of ``reach_voxels`` of a centre."""
    centre = lps_to_voxel[:3, :3] @ centre_lps + lps_to_voxel[:3, 3]
    near = np.abs(coords[0] - np.float32(centre[0])) <= reach_voxels
    for c in (1, 2):
        near &= np.abs(coords[c] - np.float32(centre[c])) <= reach_voxels
    return np.flatnonzero(near)


def _apply_mass_effect(
    maps: TissueMaps,
    lesion: Lesion,
    coords: NDArray[np.float32],
    index_to_lps: NDArray[np.float64],
    lps_to_voxel: NDArray[np.float64],
) -> None:
    """Move voxel coordinates ``(3, N)`` (in place) through the lesion's mass-effect pull-back."""
    from scipy import ndimage

    near = _near_points(coords, lps_to_voxel, lesion.centre_lps,
                        lesion.mass_effect_reach_mm / float(maps.resolution))
    if near.size == 0:
        return
    points = coords[:, near].T.astype(float) @ index_to_lps[:3, :3].T + index_to_lps[:3, 3]
    template_voxels = points @ maps.lps_to_index[:3, :3].T + maps.lps_to_index[:3, 3]
    depth = ndimage.map_coordinates(maps.depth_mm, template_voxels.T, order=1, mode="constant",
                                    cval=0.0, prefilter=False)
    moved = lesion.mass_effect_pullback(points, depth)
    coords[:, near] = (moved @ lps_to_voxel[:3, :3].T + lps_to_voxel[:3, 3]).T.astype(np.float32)


# --------------------------------------------------------------------------------------------
# NIfTI ground truth
# --------------------------------------------------------------------------------------------


def lps_to_ras_affine(origin: ArrayLike, spacing: ArrayLike, direction: ArrayLike) -> NDArray:
    """NIfTI affine (voxel ``(i, j, k)`` = ``(x, y, z)`` -> RAS mm) of a Volume-style geometry."""
    matrix = index_to_physical_matrix(
        _as_vector3("origin", origin), _as_vector3("spacing", spacing),
        _as_direction("direction", direction),
    )
    flip = np.eye(4)
    flip[:3, :3] = _FLIP_LPS_RAS
    return flip @ matrix


def read_labels(cohort: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``<cohort>/labels.json`` as written by :func:`make_cohort`, checking its outline.

    Raises
    ------
    ValueError
        When the file is missing, not JSON, or not an object with a ``studies`` list; the message
        names the file and how to make one.
    """
    path = Path(cohort) / "labels.json"
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist; the folder must be a synthetic cohort with labels.json, truth/ and "
            "dicom/ (write one with tools/make_demo_cohort.py or codegraph3d_research.synthetic.make_cohort)"
        )
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read it as JSON ({error}); regenerate the cohort") from error
    if not isinstance(labels, Mapping) or not isinstance(labels.get("studies"), list):
        raise ValueError(f"{path}: expected an object with a 'studies' list; regenerate the cohort")
    return dict(labels)


def write_mask_nifti(
    mask_zyx: NDArray[Any],
    origin: ArrayLike,
    spacing: ArrayLike,
    direction: ArrayLike,
    path: str | os.PathLike[str],
) -> Path:
    """Write a mask ``[z, y, x]`` as a gzipped NIfTI-1 (uint8, ``[x, y, z]``, RAS affine).

    qform and sform both carry the scanner affine (code 1). The gzip header's timestamp is zeroed
    so that reruns write identical bytes.
    """
    import nibabel as nib

    mask = np.asarray(mask_zyx)
    if mask.ndim != 3:
        raise ValueError(f"mask_zyx must be 3-D (z, y, x); got shape {mask.shape}")
    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise ValueError(f"path must end with .nii.gz; got {path.name!r}")
    affine = lps_to_ras_affine(origin, spacing, direction)
    data = np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))
    return path


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def _ds(value: float) -> Any:
    from pydicom.valuerep import DS

    # DS is limited to 16 characters; auto_format keeps the most precision that fits.
    return DS(float(value), auto_format=True)


def _rescale(
    volume: NDArray[np.floating], bits_stored: int, rescale: tuple[float, float] | None
) -> tuple[NDArray[np.uint16], float, float]:
    """Quantise to unsigned integers; return ``(stored, slope, intercept)``."""
    max_stored = (1 << bits_stored) - 1
    if rescale is None:
        low = min(0.0, float(volume.min()))
        high = float(volume.max())
        slope = (high - low) / max_stored if high > low else 1.0
        # Round to what the DS text keeps, so that stored * slope + intercept is what is read.
        slope = float(f"{slope:.6g}")
        intercept = float(f"{low:.6g}")
    else:
        slope, intercept = (float(v) for v in rescale)
        if slope <= 0:
            raise ValueError(f"rescale slope must be positive; got {slope}")
    stored = np.rint((volume - intercept) / slope)
    if stored.min() < 0 or stored.max() > max_stored:
        raise ValueError(
            f"values need stored range [{stored.min():.0f}, {stored.max():.0f}] which does not fit "
            f"in {bits_stored} bits with slope {slope} and intercept {intercept}"
        )
    return stored.astype("<u2"), slope, intercept


def _window(volume: NDArray[np.floating]) -> tuple[float, float]:
    foreground = volume[volume > 0]
    if foreground.size == 0:
        return 0.5, 1.0
    sample = foreground[:: max(1, foreground.size // 200_000)]
    low, high = np.percentile(sample, [1.0, 99.5])
    width = max(float(high - low), 1.0)
    return float(low + width / 2.0), width


def _base_dataset(
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    series_description: str,
    series_number: int,
    modality: str,
    frame_of_reference_uid: str,
    image_type: Sequence[str],
    study_date: str,
    study_time: str,
    series_time: str | None,
    study_id: str,
    accession_number: str,
    patient_birth_date: str,
    patient_sex: str,
    patient_age: str | None,
    manufacturer: str,
    manufacturer_model_name: str,
    institution_name: str,
    station_name: str,
    magnetic_field_strength: float,
    body_part_examined: str,
    patient_position: str,
    protocol_name: str | None,
    scanning_sequence: str,
    sequence_variant: str,
    scan_options: str,
    mr_acquisition_type: str,
    echo_time: float,
    repetition_time: float,
    inversion_time: float | None,
    echo_train_length: int | None,
    flip_angle: float | None,
    sequence_name: str | None,
    extra: Mapping[str, Any] | None,
) -> Any:
    """The dataset of the attributes that every file of a series shares, values checked first."""
    from pydicom.dataset import Dataset

    _check_dataset_values(
        modality=modality, patient_id=patient_id, study_uid=study_uid, series_uid=series_uid,
        frame_of_reference_uid=frame_of_reference_uid, study_date=study_date,
        patient_birth_date=patient_birth_date, image_type=image_type, patient_sex=patient_sex,
        echo_time=echo_time, repetition_time=repetition_time, series_number=series_number,
    )
    ds = Dataset()
    # Set in the order they always were, so that pydicom's complaints about invalid values
    # (warnings, or errors where it is set to raise) come in the same order.
    _set_study_description(
        ds, image_type=image_type, study_date=study_date, study_time=study_time,
        series_time=series_time, accession_number=accession_number, modality=modality,
        manufacturer=manufacturer, institution_name=institution_name, station_name=station_name,
        series_description=series_description, manufacturer_model_name=manufacturer_model_name,
    )
    _set_patient(ds, patient_name=patient_name, patient_id=patient_id,
                 patient_birth_date=patient_birth_date, patient_sex=patient_sex,
                 patient_age=patient_age)
    _set_acquisition(
        ds, body_part_examined=body_part_examined, scanning_sequence=scanning_sequence,
        sequence_variant=sequence_variant, scan_options=scan_options,
        mr_acquisition_type=mr_acquisition_type, sequence_name=sequence_name,
        repetition_time=repetition_time, echo_time=echo_time, inversion_time=inversion_time,
        magnetic_field_strength=magnetic_field_strength, echo_train_length=echo_train_length,
        protocol_name=protocol_name or series_description, flip_angle=flip_angle,
        patient_position=patient_position,
    )
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    # Set last, so that they override.
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    return ds


def _check_dataset_values(
    *,
    modality: str,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    study_date: str,
    patient_birth_date: str,
    image_type: Sequence[str],
    patient_sex: str,
    echo_time: float,
    repetition_time: float,
    series_number: int,
) -> None:
    """Refuse values that :func:`write_series` cannot write as a valid MR Image Storage file."""
    if modality != "MR":
        raise ValueError(f"only MR Image Storage is written; got modality {modality!r}")
    for name, value in (("patient_id", patient_id), ("study_uid", study_uid),
                        ("series_uid", series_uid), ("frame_of_reference_uid",
                                                     frame_of_reference_uid)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string; got {value!r}")
    for name, value in (("study_date", study_date), ("patient_birth_date", patient_birth_date)):
        if len(value) != 8 or not value.isdigit():
            raise ValueError(f"{name} must be YYYYMMDD; got {value!r}")
    if len(image_type) < 2 or image_type[0] not in ("ORIGINAL", "DERIVED"):
        raise ValueError(f"image_type must start with ORIGINAL or DERIVED; got {list(image_type)}")
    if patient_sex not in ("M", "F", "O", ""):
        raise ValueError(f"patient_sex must be M, F, O or empty; got {patient_sex!r}")
    _check_range("echo_time", echo_time, 0.0, 1e5)
    _check_range("repetition_time", repetition_time, 0.0, 1e6)
    _check_int("series_number", series_number, 0)


def _set_study_description(
    ds: Any,
    *,
    image_type: Sequence[str],
    study_date: str,
    study_time: str,
    series_time: str | None,
    accession_number: str,
    modality: str,
    manufacturer: str,
    institution_name: str,
    station_name: str,
    series_description: str,
    manufacturer_model_name: str,
) -> None:
    """Set the SOP class, dates and times, equipment and descriptions of a series."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = _MR_IMAGE_STORAGE
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.AcquisitionDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = study_time
    # Without a series time the series is taken to start with the study.
    ds.SeriesTime = series_time or study_time
    ds.AcquisitionTime = series_time or study_time
    ds.ContentTime = series_time or study_time
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.InstitutionName = institution_name
    ds.ReferringPhysicianName = ""
    ds.StationName = station_name
    ds.StudyDescription = "MRI BRAIN"
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = manufacturer_model_name


def _set_patient(
    ds: Any,
    *,
    patient_name: str,
    patient_id: str,
    patient_birth_date: str,
    patient_sex: str,
    patient_age: str | None,
) -> None:
    """Set the patient's identification and demographics (PatientAge only when given)."""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex
    if patient_age:
        ds.PatientAge = patient_age


def _set_acquisition(
    ds: Any,
    *,
    body_part_examined: str,
    scanning_sequence: str,
    sequence_variant: str,
    scan_options: str,
    mr_acquisition_type: str,
    sequence_name: str | None,
    repetition_time: float,
    echo_time: float,
    inversion_time: float | None,
    magnetic_field_strength: float,
    echo_train_length: int | None,
    protocol_name: str,
    flip_angle: float | None,
    patient_position: str,
) -> None:
    """Set the MR acquisition attributes; optional ones only when given.

    Backslash-separated values become multi-valued attributes.
    """
    ds.BodyPartExamined = body_part_examined
    ds.ScanningSequence = scanning_sequence.split("\\")
    ds.SequenceVariant = sequence_variant.split("\\")
    ds.ScanOptions = scan_options.split("\\") if scan_options else ""
    ds.MRAcquisitionType = mr_acquisition_type
    if sequence_name:
        ds.SequenceName = sequence_name
    ds.RepetitionTime = _ds(repetition_time)
    ds.EchoTime = _ds(echo_time)
    if inversion_time is not None:
        ds.InversionTime = _ds(inversion_time)
    ds.NumberOfAverages = _ds(1)
    # The 1H Larmor frequency: 42.577478 MHz per tesla.
    ds.ImagingFrequency = _ds(42.577478 * magnetic_field_strength)
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = _ds(magnetic_field_strength)
    ds.EchoTrainLength = echo_train_length if echo_train_length is not None else ""
    ds.SoftwareVersions = _GENERATOR_NAME
    ds.ProtocolName = protocol_name
    if flip_angle is not None:
        ds.FlipAngle = _ds(flip_angle)
    ds.PatientPosition = patient_position


def _write_slices(
    ds: Any,
    slices: Sequence[tuple[NDArray[np.floating], NDArray[np.float64], NDArray[np.float64],
                           tuple[float, float]]],
    out_dir: Path,
    *,
    slice_thickness: float,
    spacing_between_slices: float | None,
    bits_stored: int,
    rescale: tuple[float, float] | None,
    overwrite: bool,
) -> list[Path]:
    """Write ``(image_yx, position, orientation6, (row_spacing, col_spacing))`` slices.

    The elements common to every slice are encoded once and only the per-slice ones (UIDs,
    position, pixels, ...) per file: letting pydicom encode ~80 elements per file made writing
    the slower half of generating a cohort.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    _check_int("bits_stored", bits_stored, 8, 16)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob("IM*.dcm"))
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {len(existing)} IM*.dcm files")
    stack = [np.asarray(s[0], dtype=float) for s in slices]
    low = min(float(image.min()) for image in stack)
    high = max(float(image.max()) for image in stack)
    # One slope and intercept for the whole series, chosen from its overall range.
    _, slope, intercept = _rescale(np.array([low, high]), bits_stored, rescale)
    stored_slices = [_rescale(image, bits_stored, (slope, intercept))[0] for image in stack]
    center, width = _window(np.concatenate([image.ravel() for image in stack]))

    ds.SliceThickness = _ds(slice_thickness)
    if spacing_between_slices is not None:
        ds.SpacingBetweenSlices = _ds(spacing_between_slices)
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.WindowCenter = _ds(center)
    ds.WindowWidth = _ds(width)
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleType = "US"
    common = _encode_elements(ds)
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CODEGRAPH3D"
    meta_common = _encode_elements(meta)

    paths: list[Path] = []
    series_uid = str(ds.SeriesInstanceUID)
    for number, (_, position, orientation, pixel_spacing) in enumerate(slices, start=1):
        stored = stored_slices[number - 1]
        sop_uid = generate_uid(entropy_srcs=[_UID_NAMESPACE, series_uid, "sop", str(number)])
        per_slice = Dataset()
        per_slice.SOPInstanceUID = sop_uid
        per_slice.InstanceNumber = number
        per_slice.ImagePositionPatient = [_ds(v) for v in position]
        per_slice.ImageOrientationPatient = [_ds(round(float(v), 8)) for v in orientation]
        normal = np.cross(orientation[:3], orientation[3:])
        per_slice.SliceLocation = _ds(float(np.dot(normal, position)))
        per_slice.Rows = int(stored.shape[0])
        per_slice.Columns = int(stored.shape[1])
        per_slice.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
        per_slice.add_new(0x7FE00010, "OW", np.ascontiguousarray(stored).tobytes())
        elements = {**common, **_encode_elements(per_slice)}
        body = b"".join(elements[tag] for tag in sorted(elements))
        path = out_dir / f"IM{number:04d}.dcm"
        path.write_bytes(b"\x00" * 128 + b"DICM" + _file_meta_group(meta_common, sop_uid) + body)
        paths.append(path)
    return paths


def _encode_elements(ds: Any) -> dict[int, bytes]:
    """Explicit VR Little Endian encoding of each top-level element of ``ds``, by tag."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    encoded: dict[int, bytes] = {}
    for element in ds:
        buffer = DicomBytesIO()
        buffer.is_little_endian = True
        buffer.is_implicit_VR = False
        write_data_element(buffer, element)
        encoded[int(element.tag)] = buffer.getvalue()
    return encoded


def _file_meta_group(encoded: dict[int, bytes], sop_instance_uid: str) -> bytes:
    """File Meta Information group for one file, from the elements common to the series.

    Only (0002,0003) differs between files, so it is encoded here (UI padded with NUL to an
    even length) and the group length (0002,0000) recomputed.
    """
    value = sop_instance_uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    elements = dict(encoded)
    elements[0x00020003] = (
        struct.pack("<HH", 0x0002, 0x0003) + b"UI" + struct.pack("<H", len(value)) + value
    )
    elements.pop(0x00020000, None)
    body = b"".join(elements[tag] for tag in sorted(elements))
    return struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<HI", 4, len(body)) + body


def write_series(
    volume_array_zyx: ArrayLike, origin: ArrayLike, spacing: ArrayLike, direction: ArrayLike,
    out_dir: str | os.PathLike[str], *, patient_id: str, patient_name: str, study_uid: str,
    series_uid: str, series_description: str, series_number: int, echo_time: float,
    repetition_time: float, frame_of_reference_uid: str, modality: str = "MR",
    scanning_sequence: str = "SE", sequence_variant: str = "SK\\SP", scan_options: str = "",
    mr_acquisition_type: str = "2D", inversion_time: float | None = None,
    echo_train_length: int | None = None, flip_angle: float | None = None,
    sequence_name: str | None = None, protocol_name: str | None = None,
    image_type: Sequence[str] = _DEFAULT_IMAGE_TYPE, study_date: str = "20240101",
    study_time: str = "080000", series_time: str | None = None, study_id: str = "1",
    accession_number: str = "", patient_birth_date: str = "19700101", patient_sex: str = "O",
    patient_age: str | None = None, manufacturer: str = "CoDeGraph3D Synthetic",
    manufacturer_model_name: str = "MNI152-2009 phantom",
    institution_name: str = "Synthetic Hospital", station_name: str = "SYNTH01",
    magnetic_field_strength: float = 3.0, body_part_examined: str = "BRAIN",
    patient_position: str = "HFS", slice_thickness: float | None = None, bits_stored: int = 12,
    rescale: tuple[float, float] | None = None,
    extra_attributes: Mapping[str, Any] | None = None, overwrite: bool = False,
) -> list[Path]:
    """Write a 3D volume as an MR Image Storage series, one file per slice.

    Files are Explicit VR Little Endian Part-10 files named ``IM0001.dcm``, ``IM0002.dcm``, ... in
    slice order (never from tag values). SOP Instance UIDs are derived from ``series_uid`` and the
    instance number, so rewriting the same series gives identical files.

    Parameters
    ----------
    volume_array_zyx : array-like
        Voxel values ``[z, y, x]`` (float); stored as uint16 with RescaleSlope/Intercept.
    origin, spacing, direction : array-like
        Volume geometry (LPS): slice ``k``'s ImagePositionPatient is
        ``origin + direction[:, 2] * spacing[2] * k``; ImageOrientationPatient is the x and y
        direction columns; PixelSpacing is ``[spacing[1], spacing[0]]`` (row, column spacing).
    out_dir : path-like
        Series folder; created if missing.
    patient_id, patient_name, study_uid, series_uid, series_description, series_number
        Identification.
    echo_time, repetition_time : float
        ms.
    frame_of_reference_uid : str
        Shared by every series of the same patient position.
    modality : str, default "MR"
        Only "MR" is supported.
    scanning_sequence, sequence_variant, scan_options : str
        Backslash-separated multi-values, e.g. ``"GR\\IR"``.
    mr_acquisition_type : {"2D", "3D"}
    inversion_time, echo_train_length, flip_angle, sequence_name, protocol_name : optional
        Further MR acquisition attributes.
    image_type : sequence of str, default ORIGINAL\\PRIMARY\\M\\ND
    study_date, study_time, series_time, study_id, accession_number : str
        DICOM DA / TM / SH values.
    patient_birth_date, patient_sex, patient_age : str
        Patient demographics.
    manufacturer, manufacturer_model_name, institution_name, station_name : str
        Equipment.
    magnetic_field_strength : float, default 3.0
        Tesla (also sets ImagingFrequency for 1H).
    body_part_examined, patient_position : str
    slice_thickness : float, optional
        Defaults to the slice spacing (contiguous slices).
    bits_stored : int, default 12
        Stored bits; the slope is chosen so that the maximum fits.
    rescale : (slope, intercept), optional
        Fixed rescale instead of the automatic one.
    extra_attributes : mapping, optional
        ``{keyword: value}`` set on every slice last (overrides).
    overwrite : bool, default False
        Allow writing into a folder that already holds ``IM*.dcm`` files.

    Returns
    -------
    list of pathlib.Path
        The written files, in instance order.
    """
    # Only the parameters are bound yet. Those that describe the series (all but the pixels,
    # their geometry and how they are stored) are _base_dataset's keywords, by the same names.
    given = dict(locals())
    header = {name: value for name, value in given.items() if name not in _SERIES_STORAGE_KEYWORDS}
    volume, origin, spacing, direction = _checked_volume_geometry(volume_array_zyx, origin,
                                                                  spacing, direction)
    if mr_acquisition_type not in ("2D", "3D"):
        raise ValueError(f"mr_acquisition_type must be '2D' or '3D'; got {mr_acquisition_type!r}")
    ds = _base_dataset(extra=extra_attributes, **header)
    return _write_slices(
        ds, _volume_slices(volume, origin, spacing, direction), Path(out_dir),
        slice_thickness=float(spacing[2]) if slice_thickness is None else slice_thickness,
        spacing_between_slices=float(spacing[2]), bits_stored=bits_stored, rescale=rescale,
        overwrite=overwrite,
    )


# The parameters of write_series that are not dataset attributes: the pixels, their geometry
# and how they are stored.
_SERIES_STORAGE_KEYWORDS = frozenset({
    "volume_array_zyx", "origin", "spacing", "direction", "out_dir", "slice_thickness",
    "bits_stored", "rescale", "extra_attributes", "overwrite",
})


def _checked_volume_geometry(
    volume_array_zyx: ArrayLike, origin: ArrayLike, spacing: ArrayLike, direction: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """A volume and its geometry as float arrays, refused if empty, not finite or degenerate."""
    volume = np.asarray(volume_array_zyx, dtype=float)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"volume_array_zyx must be a non-empty 3-D array; got {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise ValueError("volume_array_zyx contains NaN or infinite values")
    origin = _as_vector3("origin", origin)
    spacing = _as_vector3("spacing", spacing)
    if np.any(spacing <= 0):
        raise ValueError(f"spacing must be positive; got {spacing.tolist()}")
    direction = _as_direction("direction", direction)
    return volume, origin, spacing, direction


def _volume_slices(
    volume: NDArray[np.float64],
    origin: NDArray[np.float64],
    spacing: NDArray[np.float64],
    direction: NDArray[np.float64],
) -> list[tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64],
                tuple[float, float]]]:
    """The ``(image_yx, position, orientation6, (row, column spacing))`` of each slice."""
    orientation = np.concatenate([direction[:, 0], direction[:, 1]])
    step = direction[:, 2] * spacing[2]
    pixel_spacing = (float(spacing[1]), float(spacing[0]))
    return [(volume[k], origin + step * k, orientation, pixel_spacing)
            for k in range(volume.shape[0])]


def write_localizer(
    planes: Sequence[tuple[ArrayLike, ArrayLike, ArrayLike, ArrayLike]],
    out_dir: str | os.PathLike[str],
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    series_number: int = 1,
    series_description: str = "localizer",
    slice_thickness: float = 7.0,
    overwrite: bool = False,
    **study_attributes: Any,
) -> list[Path]:
    """Write a scout (localizer) distractor series: one file per plane, each its own orientation.

    ImageType is ORIGINAL\\PRIMARY\\LOCALIZER and the sequence a fast 2D gradient echo, as
    scanners write their tri-plane scouts; a series selector must skip it.

    Parameters
    ----------
    planes : sequence of (image_yx, origin, spacing, direction)
        2-D images with the geometry of a 1-slice volume: ``origin`` is the LPS centre of pixel
        (0, 0), ``spacing`` ``(column, row[, slice])`` mm, ``direction`` 3x3 (columns x, y, z).
    out_dir : path-like
        Series folder.
    patient_id, patient_name, study_uid, series_uid, frame_of_reference_uid : str
        Identification.
    series_number : int, default 1
    series_description : str, default "localizer"
    slice_thickness : float, default 7.0
    overwrite : bool, default False
    **study_attributes
        Any further keyword of :func:`write_series` (study_date, patient_sex, ...).
    """
    if not planes:
        raise ValueError("planes must hold at least one (image, origin, spacing, direction)")
    slices = []
    for number, plane in enumerate(planes, start=1):
        try:
            image, origin, spacing, direction = plane
        except (TypeError, ValueError):
            raise ValueError(
                f"plane {number} must be (image_yx, origin, spacing, direction); got {plane!r}"
            ) from None
        image = np.asarray(image, dtype=float)
        if image.ndim != 2:
            raise ValueError(f"plane {number} image must be 2-D (rows, columns); got {image.shape}")
        spacing = np.asarray(spacing, dtype=float).reshape(-1)
        if spacing.size not in (2, 3) or np.any(spacing <= 0):
            raise ValueError(
                f"plane {number} spacing must be 2 or 3 positive values; got {spacing}"
            )
        direction = _as_direction(f"plane {number} direction", direction)
        orientation = np.concatenate([direction[:, 0], direction[:, 1]])
        slices.append((image, _as_vector3(f"plane {number} origin", origin), orientation,
                       (float(spacing[1]), float(spacing[0]))))
    # Everything write_series takes at study or acquisition level, less what a scout fixes.
    fixed = {"series_description", "series_number", "slice_thickness", "overwrite", "rescale",
             "bits_stored", "extra_attributes"}
    allowed = {"echo_time", "repetition_time"} | (set(write_series.__kwdefaults__) - fixed)
    unknown = set(study_attributes) - allowed
    if unknown:
        raise TypeError(f"write_localizer got unexpected keyword arguments {sorted(unknown)}")
    settings: dict[str, Any] = {
        key: value for key, value in write_series.__kwdefaults__.items() if key in allowed
    }
    settings.update(
        scanning_sequence="GR", sequence_variant="SP", scan_options="", mr_acquisition_type="2D",
        echo_time=4.0, repetition_time=8.6, flip_angle=20.0, sequence_name="*fl2d1",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), echo_train_length=1,
    )
    settings.update(study_attributes)
    ds = _base_dataset(
        patient_id=patient_id, patient_name=patient_name, study_uid=study_uid,
        series_uid=series_uid, series_description=series_description,
        series_number=series_number, frame_of_reference_uid=frame_of_reference_uid,
        extra=None, **settings,
    )
    return _write_slices(
        ds, slices, Path(out_dir), slice_thickness=slice_thickness, spacing_between_slices=None,
        bits_stored=12, rescale=None, overwrite=overwrite,
    )


# --------------------------------------------------------------------------------------------
# bad inputs: series an application must refuse or flag
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrittenSeries:
    """What a bad-input writer wrote.

    Attributes
    ----------
    kind : str
        "knee", "truncated", "slab" or "anisotropic".
    folder : pathlib.Path
        The series folder.
    files : tuple of pathlib.Path
        The files, in instance order.
    patient_id, study_instance_uid, series_instance_uid, frame_of_reference_uid : str
        Identification written.
    series_description, body_part_examined : str
        As written (BodyPartExamined may be empty).
    contrast : str
        "T1w" or "T2w".
    shape_zyx : tuple of int
        ``(slices, rows, columns)``.
    spacing_xyz_mm : tuple of float
        ``(column, row, slice)`` spacing.
    origin : numpy.ndarray
        LPS mm of the first voxel.
    direction : numpy.ndarray
        3x3, columns = LPS directions of the x, y, z axes.
    """

    kind: str
    folder: Path
    files: tuple[Path, ...]
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    series_description: str
    body_part_examined: str
    contrast: str
    shape_zyx: tuple[int, int, int]
    spacing_xyz_mm: tuple[float, float, float]
    origin: NDArray[np.float64]
    direction: NDArray[np.float64]


# Knee tissues on the scale of TISSUE_INTENSITIES: fatty marrow is bright on both contrasts,
# joint fluid is the bright T2w / dark T1w structure, hyaline cartilage is intermediate.
_KNEE_INTENSITIES: dict[str, dict[str, float]] = {
    "T1w": {"bone": 0.04, "marrow": 0.90, "fat": 0.95, "skin": 0.55, "muscle": 0.42,
            "fluid": 0.15, "cartilage": 0.50},
    "T2w": {"bone": 0.04, "marrow": 0.60, "fat": 0.78, "skin": 0.45, "muscle": 0.26,
            "fluid": 1.00, "cartilage": 0.45},
}


# write_series keywords that the bad-input writers set themselves.
_BAD_SERIES_OWN = frozenset({
    "patient_id", "patient_name", "study_uid", "series_uid", "frame_of_reference_uid",
    "series_number", "series_description", "body_part_examined", "patient_position",
    "extra_attributes", "overwrite",
})


def _check_bad_attributes(study_attributes: Mapping[str, Any]) -> None:
    """Refuse extra keywords that :func:`write_series` lacks or that the writer sets itself."""
    own = set(study_attributes) & _BAD_SERIES_OWN
    if own:
        raise TypeError(f"{sorted(own)} are set by this writer's own parameters; pass them "
                        "there, not as extra keywords")
    allowed = set(write_series.__kwdefaults__) | {"echo_time", "repetition_time"}
    unknown = set(study_attributes) - allowed
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}; extra keywords must "
                        "be write_series keywords (study_date, patient_sex, echo_time, ...)")


def _bad_identity(
    kind: str,
    seed: int,
    series_number: int,
    patient_id: str,
    patient_name: str,
    study_uid: str | None,
    series_uid: str | None,
    frame_of_reference_uid: str | None,
) -> dict[str, Any]:
    """Identification of a bad-input series; UIDs default to ones derived from the patient."""
    _check_int("series_number", series_number, 0)
    for name, value in (("patient_id", patient_id), ("patient_name", patient_name)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string; got {value!r}")
    # Default study and frame of reference are per (patient, seed), so that bad series written
    # for the same patient form one study; the series UID is per kind and series number.
    return dict(
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid or _uid("bad-input", patient_id, seed, "study"),
        series_uid=series_uid or _uid("bad-input", patient_id, seed, kind, series_number),
        frame_of_reference_uid=frame_of_reference_uid or _uid("bad-input", patient_id, seed,
                                                               "frame-of-reference"),
    )


def _write_bad_series(
    kind: str,
    image: NDArray[np.float32],
    grid: AcquisitionGrid,
    out_dir: str | os.PathLike[str],
    *,
    contrast: str,
    identity: Mapping[str, Any],
    series_number: int,
    series_description: str | None,
    body_part_examined: str,
    rng: np.random.Generator,
    study_attributes: Mapping[str, Any],
    extra_attributes: Mapping[str, Any] | None = None,
    patient_position: str = "HFS",
) -> WrittenSeries:
    protocol = _protocol(contrast, grid.orientation, rng)
    if series_description is not None:
        protocol["series_description"] = series_description
    settings: dict[str, Any] = {**protocol, **study_attributes}
    files = write_series(
        image, grid.origin, grid.spacing, grid.direction, out_dir,
        series_number=series_number, body_part_examined=body_part_examined,
        patient_position=patient_position, extra_attributes=extra_attributes,
        **identity, **settings,
    )
    return WrittenSeries(
        kind=kind,
        folder=Path(out_dir),
        files=tuple(files),
        patient_id=identity["patient_id"],
        study_instance_uid=identity["study_uid"],
        series_instance_uid=identity["series_uid"],
        frame_of_reference_uid=identity["frame_of_reference_uid"],
        series_description=settings["series_description"],
        body_part_examined=body_part_examined,
        contrast=contrast,
        shape_zyx=tuple(int(n) for n in image.shape),  # type: ignore[arg-type]
        spacing_xyz_mm=tuple(float(v) for v in grid.spacing),  # type: ignore[arg-type]
        origin=np.asarray(grid.origin, dtype=float),
        direction=np.asarray(grid.direction, dtype=float),
    )


def _bad_subject(
    seed: int, head: bool, template_resolution: int
) -> tuple[TissueMaps, SubjectAnatomy, HeadVolumes | None, np.random.Generator]:
    seed = _check_int("seed", seed, 0)
    if not isinstance(head, (bool, np.bool_)):
        raise TypeError(f"head must be True or False; got {head!r}")
    maps = load_tissue_maps(template_resolution)
    rng = np.random.default_rng([seed, 0xBAD])
    subject = random_subject(rng, maps, with_head=bool(head))
    volumes = synthesize_head(maps, subject, ()) if head else None
    return maps, subject, volumes, rng


def _subgrid(grid: AcquisitionGrid, first: int, count: int) -> AcquisitionGrid:
    """Slices ``first .. first + count - 1`` of ``grid``."""
    origin = grid.origin + grid.direction[:, 2] * grid.spacing[2] * first
    return AcquisitionGrid((count, grid.shape_zyx[1], grid.shape_zyx[2]), origin, grid.spacing,
                           grid.direction, grid.orientation)




def write_truncated_series(
    out_dir: str | os.PathLike[str],
    *,
    contrast: str = "T1w",
    keep_fraction: float = 0.4,
    head: bool = True,
    field_of_view_mm: float = 240.0,
    matrix: int = 128,
    slice_mm: float = 3.0,
    seed: int = 0,
    patient_id: str = "SYNBAD-001",
    patient_name: str = "SYNTHETIC^BADINPUT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str | None = None,
    template_resolution: int = 2,
    **study_attributes: Any,
) -> WrittenSeries:
    """Write an axial series whose slices cover only the top of the head (or brain).

    The slab is planned as for a whole head, then only the slices in the top ``keep_fraction``
    of the head's (or, with ``head=False``, the brain's) superior-inferior extent are kept: a
    field of view that misses the skull base, cerebellum and most of the brain.

    Parameters
    ----------
    out_dir : path-like
        Series folder (created; must not already hold ``IM*.dcm``).
    contrast : {"T1w", "T2w"}, default "T1w"
    keep_fraction : float, default 0.4
        Top fraction of the object's height covered, in ``(0, 1)``.
    head : bool, default True
        A whole head; False writes skull-stripped data.
    field_of_view_mm, matrix, slice_mm : float, int, float
        In-plane field of view and matrix (square pixels ``field_of_view_mm / matrix``) and the
        slice spacing.
    seed : int, default 0
        Draws the subject, the protocol and the noise.
    patient_id, patient_name, study_uid, series_uid, frame_of_reference_uid : str
        Identification; the UIDs default to ones derived from ``patient_id``, ``seed`` and the
        kind of series (so that bad series of one patient share a study).
    series_number : int, default 1
    series_description : str, optional
        Defaults to the routine protocol's (e.g. "T1 SE AX").
    template_resolution : {1, 2}, default 2
    **study_attributes
        Further :func:`write_series` keywords (study_date, patient_sex, echo_time, ...).

    Returns
    -------
    WrittenSeries
    """
    _check_contrast(contrast)
    keep = _check_range("keep_fraction", keep_fraction, 0.0, 1.0, lo_open=True)
    if keep >= 1.0:
        raise ValueError(f"keep_fraction must be below 1 (a truncated series); got {keep_fraction}")
    fov = _check_range("field_of_view_mm", field_of_view_mm, 0.0, 1000.0, lo_open=True)
    matrix = _check_int("matrix", matrix, 4, 2048)
    slice_mm = _check_range("slice_mm", slice_mm, 0.0, 50.0, lo_open=True)
    _check_bad_attributes(study_attributes)
    identity = _bad_identity("truncated", seed, series_number, patient_id, patient_name,
                             study_uid, series_uid, frame_of_reference_uid)
    maps, subject, volumes, rng = _bad_subject(seed, head, template_resolution)
    pixel = fov / matrix
    full = acquisition_grid(maps, subject, orientation="axial", spacing=[pixel, pixel, slice_mm],
                            rng=rng, max_oblique_deg=0.0, field_of_view_mm=fov,
                            head_volumes=volumes)
    points = (subject.to_subject(volumes.cover_points_lps) if volumes is not None
              else subject.to_subject(maps.brain_points_lps))
    along = points @ full.direction[:, 2]
    top, bottom = float(along.max()), float(along.min())
    slice_positions = (float(full.origin @ full.direction[:, 2])
                       + full.spacing[2] * np.arange(full.shape_zyx[0]))
    kept = np.flatnonzero(slice_positions >= top - keep * (top - bottom))
    grid = _subgrid(full, int(kept[0]), int(kept.size))
    image = render_series(maps, subject, grid, contrast, np.random.default_rng([seed, 1])).image
    return _write_bad_series("truncated", image, grid, out_dir, contrast=contrast,
                             identity=identity, series_number=series_number,
                             series_description=series_description, body_part_examined="BRAIN",
                             rng=rng, study_attributes=study_attributes)


def write_slab_series(
    out_dir: str | os.PathLike[str],
    *,
    contrast: str = "T1w",
    n_slices: int = 3,
    orientation: str = "axial",
    head: bool = True,
    field_of_view_mm: float = 240.0,
    matrix: int = 128,
    slice_mm: float = 5.0,
    seed: int = 0,
    patient_id: str = "SYNBAD-001",
    patient_name: str = "SYNTHETIC^BADINPUT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str | None = None,
    template_resolution: int = 2,
    **study_attributes: Any,
) -> WrittenSeries:
    """Write a thin slab through the brain's centre: ``n_slices=1`` is a 2-D series.

    Parameters
    ----------
    out_dir : path-like
        Series folder.
    contrast : {"T1w", "T2w"}, default "T1w"
    n_slices : int, default 3
        Number of slices (1 to 8), centred on the brain.
    orientation : {"axial", "coronal", "sagittal"}, default "axial"
    head, field_of_view_mm, matrix, slice_mm, seed, patient_id, patient_name, study_uid,
    series_uid, frame_of_reference_uid, series_number, series_description,
    template_resolution, **study_attributes
        As for :func:`write_truncated_series`.

    Returns
    -------
    WrittenSeries
    """
    _check_contrast(contrast)
    n_slices = _check_int("n_slices", n_slices, 1, 8)
    fov = _check_range("field_of_view_mm", field_of_view_mm, 0.0, 1000.0, lo_open=True)
    matrix = _check_int("matrix", matrix, 4, 2048)
    slice_mm = _check_range("slice_mm", slice_mm, 0.0, 50.0, lo_open=True)
    _check_bad_attributes(study_attributes)
    identity = _bad_identity(f"slab{n_slices}", seed, series_number, patient_id, patient_name,
                             study_uid, series_uid, frame_of_reference_uid)
    maps, subject, volumes, rng = _bad_subject(seed, head, template_resolution)
    pixel = fov / matrix
    full = acquisition_grid(maps, subject, orientation=orientation,
                            spacing=[pixel, pixel, slice_mm], rng=rng, max_oblique_deg=0.0,
                            field_of_view_mm=fov, head_volumes=volumes)
    centre = subject.to_subject(maps.brain_centre_lps[None])[0]
    middle = float((centre - full.origin) @ full.direction[:, 2]) / full.spacing[2]
    first = int(np.clip(round(middle - (n_slices - 1) / 2.0), 0, full.shape_zyx[0] - n_slices))
    grid = _subgrid(full, first, n_slices)
    image = render_series(maps, subject, grid, contrast, np.random.default_rng([seed, 2])).image
    return _write_bad_series("slab", image, grid, out_dir, contrast=contrast, identity=identity,
                             series_number=series_number, series_description=series_description,
                             body_part_examined="BRAIN", rng=rng,
                             study_attributes=study_attributes)


def write_anisotropic_series(
    out_dir: str | os.PathLike[str],
    *,
    contrast: str = "T2w",
    spacing: tuple[float, float, float] = (0.5, 0.5, 5.0),
    orientation: str = "axial",
    head: bool = True,
    seed: int = 0,
    patient_id: str = "SYNBAD-001",
    patient_name: str = "SYNTHETIC^BADINPUT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str | None = None,
    template_resolution: int = 2,
    **study_attributes: Any,
) -> WrittenSeries:
    """Write a whole-head (or brain) series with extremely anisotropic voxels.

    The default 0.5 x 0.5 x 5 mm (10:1) makes a ~480 x 480 x 45 volume (several seconds);
    a coarser spacing with the same ratio, e.g. (2, 2, 20), is as anisotropic and fast.

    Parameters
    ----------
    out_dir : path-like
        Series folder.
    contrast : {"T1w", "T2w"}, default "T2w"
    spacing : (float, float, float), default (0.5, 0.5, 5.0)
        ``(column, row, slice)`` spacing in mm; the matrix fits the object plus 5 mm margins.
    orientation : {"axial", "coronal", "sagittal"}, default "axial"
    head, seed, patient_id, patient_name, study_uid, series_uid, frame_of_reference_uid,
    series_number, series_description, template_resolution, **study_attributes
        As for :func:`write_truncated_series`.

    Returns
    -------
    WrittenSeries
    """
    _check_contrast(contrast)
    spacing_xyz = _as_vector3("spacing", spacing)
    if np.any(spacing_xyz <= 0):
        raise ValueError(f"spacing must be positive; got {spacing_xyz.tolist()}")
    _check_bad_attributes(study_attributes)
    identity = _bad_identity("anisotropic", seed, series_number, patient_id, patient_name,
                             study_uid, series_uid, frame_of_reference_uid)
    maps, subject, volumes, rng = _bad_subject(seed, head, template_resolution)
    grid = acquisition_grid(maps, subject, orientation=orientation, spacing=spacing_xyz, rng=rng,
                            max_oblique_deg=0.0, max_extra_voxels=0, head_volumes=volumes)
    image = render_series(maps, subject, grid, contrast, np.random.default_rng([seed, 3])).image
    return _write_bad_series("anisotropic", image, grid, out_dir, contrast=contrast,
                             identity=identity, series_number=series_number,
                             series_description=series_description, body_part_examined="BRAIN",
                             rng=rng, study_attributes=study_attributes)


def write_knee_series(
    out_dir: str | os.PathLike[str],
    *,
    contrast: str = "T2w",
    neutral_header: bool = False,
    body_part_examined: str | None = None,
    field_of_view_mm: float = 160.0,
    matrix: int = 128,
    n_slices: int = 24,
    slice_mm: float = 3.0,
    noise_fraction: float = 0.03,
    seed: int = 0,
    patient_id: str = "SYNBAD-001",
    patient_name: str = "SYNTHETIC^BADINPUT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str | None = None,
    **study_attributes: Any,
) -> WrittenSeries:
    """Write an axial MR series of a knee: a series that is not a brain at all.

    The knee is analytic: a leg of skin, subcutaneous fat and muscle around the femur above the
    joint line and the tibia below it (fatty marrow in a cortical shell, widening into the
    condyles), hyaline cartilage on both articular surfaces, joint fluid between them and in the
    suprapatellar recess, and the patella in front. Slices are axial through the joint.

    Parameters
    ----------
    out_dir : path-like
        Series folder.
    contrast : {"T1w", "T2w"}, default "T2w"
    neutral_header : bool, default False
        False: SeriesDescription names the knee ("T2 TSE AX KNEE"), BodyPartExamined "KNEE",
        StudyDescription "MRI KNEE", PatientPosition "FFS" (feet first). True: a header that
        says nothing of the body part ("T2 AX" / "T1 AX", BodyPartExamined empty, the brain
        study's description, head first), which header-based series selection accepts, so that
        only image checks can catch it.
    body_part_examined : str, optional
        Overrides BodyPartExamined.
    field_of_view_mm, matrix, n_slices, slice_mm : float, int, int, float
        Square in-plane field of view and matrix, number and spacing of slices.
    noise_fraction : float, default 0.03
        Rician noise sigma relative to the brightest tissue.
    seed, patient_id, patient_name, study_uid, series_uid, frame_of_reference_uid,
    series_number, series_description, **study_attributes
        As for :func:`write_truncated_series`.

    Returns
    -------
    WrittenSeries
    """
    _check_contrast(contrast)
    _check_flags(("neutral_header", neutral_header))
    fov = _check_range("field_of_view_mm", field_of_view_mm, 0.0, 1000.0, lo_open=True)
    matrix = _check_int("matrix", matrix, 4, 2048)
    n_slices = _check_int("n_slices", n_slices, 1, 512)
    slice_mm = _check_range("slice_mm", slice_mm, 0.0, 50.0, lo_open=True)
    noise = _check_range("noise_fraction", noise_fraction, 0.0, 1.0)
    seed = _check_int("seed", seed, 0)
    _check_bad_attributes(study_attributes)
    identity = _bad_identity("knee", seed, series_number, patient_id, patient_name, study_uid,
                             series_uid, frame_of_reference_uid)
    rng = np.random.default_rng([seed, 0x4EE])

    pixel = fov / matrix
    grid, coords = _knee_grid(pixel, matrix, n_slices, slice_mm)
    values = dict(_KNEE_INTENSITIES[contrast], air=0.0)
    image = _paint_knee(coords, grid.shape_zyx, values, float(min(pixel, slice_mm)), rng)
    gain = np.float32(rng.uniform(600.0, 1400.0))
    image *= gain
    if noise > 0:
        sigma = np.float32(noise) * gain * np.float32(max(values.values()))
        image = _rician(image, sigma, rng)

    description, body_part, extra, position = _knee_header(contrast, neutral_header)
    if body_part_examined is not None:
        body_part = str(body_part_examined)
    return _write_bad_series(
        "knee", image.astype(np.float32), grid, out_dir, contrast=contrast, identity=identity,
        series_number=series_number,
        series_description=description if series_description is None else series_description,
        body_part_examined=body_part, rng=rng, study_attributes=study_attributes,
        extra_attributes=extra, patient_position=position,
    )


def _knee_grid(
    pixel: float, matrix: int, n_slices: int, slice_mm: float
) -> tuple[AcquisitionGrid, tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]]:
    """An axial grid centred on the joint line, and its voxel centres in the knee's frame.

    Returns
    -------
    grid : AcquisitionGrid
    coords : tuple of numpy.ndarray
        LPS x, y, z (mm; +x left, +y posterior, +z towards the hip, joint line at z = 0),
        shaped to broadcast over ``[z, y, x]``.
    """
    spacing = np.array([pixel, pixel, slice_mm])
    direction = orientation_direction("axial")
    shape = (n_slices, matrix, matrix)
    origin = -0.5 * (np.array([matrix, matrix, n_slices]) - 1) * spacing
    grid = AcquisitionGrid(shape, origin, spacing, direction, "axial")
    z, y, x = (origin[a] + spacing[a] * np.arange(n) for a, n in ((2, n_slices), (1, matrix),
                                                                  (0, matrix)))
    return grid, (x[None, None, :], y[None, :, None], z[:, None, None])


def _paint_knee(
    coords: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]],
    shape: tuple[int, int, int],
    values: Mapping[str, float],
    res: float,
    rng: np.random.Generator,
) -> NDArray[np.float32]:
    """Relative intensities of the knee at ``coords``: each tissue over the previous ones.

    ``res`` is the soft edge width (mm); ``rng`` draws the subcutaneous fat's thickness.
    """
    image = np.zeros(shape, dtype=np.float32)

    def paint(mask: NDArray[np.float32], tissue: str) -> None:
        nonlocal image
        image = image - mask * (image - np.float32(values[tissue]))

    leg = _ellipsoid_sdf(coords[:2], (0.0, 0.0), (62.0, 55.0))
    paint(_inside(leg, res), "muscle")
    fat = float(rng.uniform(6.0, 10.0))
    paint(_inside(leg, res) * _inside(-leg - fat, res), "fat")
    paint(_inside(leg, res) * _inside(-leg - 1.5, res), "skin")
    crosses = _knee_bone_sections(coords)
    # Joint fluid in the 3 mm between the two cartilage caps.
    joint = np.minimum(crosses[0][1], crosses[1][1])
    paint(_inside(joint, res) * _inside(np.abs(coords[2]) - 1.5, res), "fluid")
    for sign, cross in crosses:
        # Cartilage is the 2 mm cap of the bone's articular end; the shaft has none.
        paint(_inside(np.maximum(cross, 1.5 - sign * coords[2]), res), "cartilage")
        bone = np.maximum(cross, 3.5 - sign * coords[2])
        paint(_inside(bone, res), "bone")
        paint(_inside(bone + 2.0, res), "marrow")
    recess = _ellipsoid_sdf(coords, (0.0, -36.0, 28.0), (26.0, 4.0, 18.0))
    paint(_inside(recess, res), "fluid")
    patella = _ellipsoid_sdf(coords, (0.0, -46.0, 12.0), (22.0, 9.0, 18.0))
    paint(_inside(patella, res), "bone")
    paint(_inside(patella + 2.0, res), "marrow")
    return image


def _knee_bone_sections(
    coords: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]],
) -> list[tuple[float, NDArray[np.float32]]]:
    """Femur (``+1``, above the joint line) and tibia (``-1``): signed distance to each shaft.

    Each is an elliptic cross-section (mm, negative inside) that widens into the condyles /
    plateau towards the joint line.
    """
    widen = (0.37 + 0.63 * np.exp(-np.abs(coords[2]) / 22.0)).astype(np.float32)
    crosses = []
    for sign, centre_y, semi in ((1.0, 4.0, (38.0, 30.0)), (-1.0, 8.0, (35.0, 28.0))):
        semi_x, semi_y = np.float32(semi[0]) * widen, np.float32(semi[1]) * widen
        dx, dy = coords[0].astype(np.float32), (coords[1] - centre_y).astype(np.float32)
        k0 = np.sqrt((dx / semi_x) ** 2 + (dy / semi_y) ** 2)
        k1 = np.sqrt((dx / semi_x**2) ** 2 + (dy / semi_y**2) ** 2)
        crosses.append((sign, k0 * (k0 - 1.0) / np.maximum(k1, np.float32(1e-6))))
    return crosses


def _knee_header(
    contrast: str, neutral_header: bool
) -> tuple[str, str, dict[str, Any] | None, str]:
    """SeriesDescription, BodyPartExamined, extra attributes and PatientPosition of a knee.

    A neutral header says nothing of the body part and is written head first, as a brain
    series is; otherwise the header names the knee and the patient lies feet first.
    """
    code = "T2" if contrast == "T2w" else "T1"
    if neutral_header:
        return f"{code} AX", "", None, "HFS"
    description = f"{code} TSE AX KNEE" if contrast == "T2w" else f"{code} SE AX KNEE"
    return description, "KNEE", {"StudyDescription": "MRI KNEE"}, "FFS"


# --------------------------------------------------------------------------------------------
# cohort
# --------------------------------------------------------------------------------------------


def _protocol(contrast: str, orientation: str, rng: np.random.Generator) -> dict[str, Any]:
    """Scanner protocol attributes of a series, drawn like a site's routine brain protocol."""
    code = _ORIENTATION_CODES[orientation]
    if contrast == "T2w":
        return dict(
            series_description=f"T2 TSE {code}", scanning_sequence="SE",
            sequence_variant="SK\\SP\\OSP", scan_options="PFP", mr_acquisition_type="2D",
            echo_time=round(float(rng.uniform(90.0, 110.0)), 1),
            repetition_time=round(float(rng.uniform(3500.0, 5000.0)), 0),
            echo_train_length=int(rng.integers(12, 19)), flip_angle=150.0,
            sequence_name="*tse2d1_15", inversion_time=None,
        )
    if rng.random() < 0.5:
        return dict(
            series_description=f"T1 MPRAGE {code}", scanning_sequence="GR\\IR",
            sequence_variant="SK\\SP\\MP", scan_options="IR", mr_acquisition_type="3D",
            echo_time=round(float(rng.uniform(2.5, 4.0)), 2),
            repetition_time=round(float(rng.uniform(1700.0, 2000.0)), 0),
            echo_train_length=1, flip_angle=9.0, sequence_name="*tfl3d1_16ns",
            inversion_time=round(float(rng.uniform(850.0, 1000.0)), 0),
        )
    return dict(
        series_description=f"T1 SE {code}", scanning_sequence="SE", sequence_variant="SP",
        scan_options="", mr_acquisition_type="2D",
        echo_time=round(float(rng.uniform(8.0, 15.0)), 1),
        repetition_time=round(float(rng.uniform(450.0, 700.0)), 0),
        echo_train_length=1, flip_angle=90.0, sequence_name="*se2d1", inversion_time=None,
    )


_ORIENTATION_WEIGHTS = {
    "T2w": {"axial": 0.6, "coronal": 0.2, "sagittal": 0.2},
    "T1w": {"axial": 0.4, "coronal": 0.2, "sagittal": 0.4},
}


def _scaled_matrix(matrix: int, matrix_scale: float) -> int:
    """An in-plane matrix size scaled by ``matrix_scale``: even, as scanners use, and >= 16."""
    return max(16, 2 * int(round(matrix * matrix_scale / 2.0)))


def _series_rng(seed: int, index: int, series_number: int) -> np.random.Generator:
    """Noise and bias stream of one series, apart from the subject's stream.

    The number of noise draws depends on the brain's size on the grid and must not shift what
    the subject draws next (the next series' orientation, spacing, protocol).
    """
    return np.random.default_rng([seed, index, 2, series_number])


def _uid(*parts: Any) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[_UID_NAMESPACE, *(str(p) for p in parts)]))


def _localizer_planes(
    maps: TissueMaps, subject: SubjectAnatomy, rng: np.random.Generator, matrix_scale: float,
) -> list[tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.float64],
                NDArray[np.float64]]]:
    """Axial, coronal and sagittal scouts through the brain centre (T1-like, noisy, 1 slice)."""
    centre = subject.to_subject_affine(maps.brain_centre_lps[None])[0]
    n = max(16, int(round(192 * matrix_scale)))
    pixel = 260.0 / n  # a 260 mm square field of view, as scouts use
    planes = []
    for orientation in ORIENTATIONS:
        direction = orientation_direction(orientation)
        spacing = np.array([pixel, pixel, 7.0])
        origin = centre - direction[:, :2] @ (spacing[:2] * (n - 1) / 2.0)
        grid = AcquisitionGrid((1, n, n), origin, spacing, direction, orientation)
        rendered = render_series(maps, subject, grid, "T1w", rng, noise_fraction=0.05,
                                 bias_strength=0.2)
        planes.append((rendered.image[0], origin, spacing, direction))
    return planes


def _resolve_out_dir(out_dir: Path, overwrite: bool) -> None:
    owned = [out_dir / "dicom", out_dir / "truth", out_dir / "labels.json"]
    present = [p for p in owned if p.exists()]
    if present and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds a cohort ({', '.join(p.name for p in present)}); "
            "pass overwrite=True to replace it"
        )
    for path in present:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def make_cohort(
    out_dir: str | os.PathLike[str], *, n_subjects: int = 12, lesion_fraction: float = 1.0 / 3.0,
    seed: int = 0, contrasts: Sequence[str] = ("T2w", "T1w"), with_localizer_fraction: float = 0.5,
    matrix_scale: float = 1.0, lesion_radius_mm: tuple[float, float] = (6.0, 15.0),
    lesions_per_subject: tuple[int, int] = (1, 1), deformation_mm: float = 3.0,
    max_rotation_deg: float = 5.0, max_translation_mm: float = 10.0, max_scaling: float = 0.05,
    max_oblique_deg: float = 4.0, in_plane_mm: tuple[float, float] = (1.0, 1.2),
    slice_mm: tuple[float, float] = (1.5, 3.0), noise_fraction: float = 0.03,
    bias_strength: float = 0.1, template_resolution: int = 2, head_fraction: float = 0.0,
    eyes: bool = True, mass_effect_fraction: float = 0.0,
    mass_effect_ratio: tuple[float, float] = (0.25, 0.45), vary_fov: bool = False,
    fov_mm: tuple[float, float] = (200.0, 260.0), matrix_size: tuple[int, int] = (192, 320),
    lesion_appearance: str = "typical", lesion_placement: str = "deep", overwrite: bool = False,
) -> dict[str, Any]:
    """Generate a synthetic multi-study brain MR cohort with ground truth.

    Each subject becomes one study (its own patient) holding one series per contrast, each on its
    own grid (orientation, tilt, spacing, matrix), and optionally a localizer distractor.
    Exactly ``round(lesion_fraction * n_subjects)`` subjects carry lesions, present in all of
    their series. Subjects draw from independent streams seeded by ``(seed, subject index)``, so
    a subject does not change when ``n_subjects`` does (the choice of lesioned subjects does).
    Exactly ``round(head_fraction * n_subjects)`` subjects are rendered as whole heads (skull,
    scalp, face, neck; see :func:`synthesize_head`), the others skull-stripped, and
    ``round(mass_effect_fraction * n_lesioned)`` of the lesioned subjects have lesions with mass
    effect. With the defaults (no heads, no mass effect, ``vary_fov=False``,
    ``lesion_placement="deep"``) the cohort is the one earlier versions of this module wrote,
    byte for byte.

    Parameters
    ----------
    out_dir : path-like
        Receives ``dicom/``, ``truth/`` and ``labels.json``.
    n_subjects : int, default 12
    lesion_fraction : float, default 1/3
        Fraction of subjects with lesions.
    seed : int, default 0
        Non-negative; the same seed and parameters write identical files.
    contrasts : sequence of {"T2w", "T1w"}, default both
        Series per study (written in a per-study random order).
    with_localizer_fraction : float, default 0.5
        Fraction of studies that also hold a 3-plane localizer series.
    matrix_scale : float, default 1.0
        Scales every matrix size (spacings divide by it): 0.2 gives ~32-48 voxel matrices.
    lesion_radius_mm, lesions_per_subject : (float, float), (int, int), default (6, 15), (1, 1)
        Range of a lesion's mean semi-axis (mm, in template space); inclusive range of the
        number of lesions of a lesioned subject.
    deformation_mm, max_rotation_deg, max_translation_mm, max_scaling : float
        RMS elastic displacement (default 3.0); head pose and size variation.
    max_oblique_deg : float, default 4.0
        Largest tilt of a slab from its standard plane.
    in_plane_mm, slice_mm : (float, float)
        Ranges of pixel spacing and slice spacing (before ``matrix_scale``).
    noise_fraction, bias_strength : float, default 0.03, 0.1
        Rician noise relative to the brightest tissue; RMS of the log bias field.
    template_resolution : {1, 2}, default 2
    head_fraction : float, default 0
        Fraction of subjects whose series show the whole head (not skull-stripped). Their
        fields of view always follow ``fov_mm`` and ``matrix_size``.
    eyes : bool, default True
        Heads have eyes in fat-filled orbits.
    mass_effect_fraction : float, default 0
        Fraction of the lesioned subjects whose lesions push the surrounding anatomy outwards.
    mass_effect_ratio : (float, float), default (0.25, 0.45)
        Range of the push at a lesion's boundary relative to its mean semi-axis.
    vary_fov : bool, default False
        Plan skull-stripped series too as scanners do: a square field of view drawn from
        ``fov_mm`` and a matrix drawn from ``matrix_size`` (so the pixel spacing is
        FOV / matrix) instead of ``in_plane_mm`` and a brain-fitted matrix.
    fov_mm, matrix_size : (float, float), (int, int), default (200, 260), (192, 320)
        Ranges of the in-plane field of view (mm; it grows when the object would not fit) and
        of the in-plane matrix before ``matrix_scale`` (rounded to even numbers, at least 16).
    lesion_appearance : {"typical", "varied", "distinct", "striped"}, default "typical"
        See :func:`random_subject`: ``typical`` lesions look alike across subjects (a consistent
        anomaly); ``varied`` lesions each draw their own intensities; ``distinct`` and ``striped``
        share one appearance unlike normal tissue (``striped`` also to the intensity encoder).
    lesion_placement : {"deep", "cortical"}, default "deep"
        Where lesions sit (see :func:`random_subject`): ``deep`` lesions lie wholly in brain
        tissue; ``cortical`` lesions are centred in grey matter 0.3-0.8 times their extent below
        the brain's surface, so they reach the cortical surface (cortical / juxtacortical
        lesions, cortical metastases), and only their part inside the brain is painted and
        labelled. Recorded in ``labels.json`` (``generator["lesion_placement"]``) only when not
        ``deep``, so that default cohorts keep their bytes and UIDs.
    overwrite : bool, default False
        Replace an existing cohort's ``dicom/``, ``truth/`` and ``labels.json``.

    Returns
    -------
    dict
        The content of ``labels.json``.
    """
    # Only the parameters are bound yet. Each but out_dir and overwrite is a field of
    # _CohortOptions, so a parameter added without its field fails on every call.
    given = dict(locals())
    del given["out_dir"], given["overwrite"]
    options = _checked_cohort_options(_CohortOptions(**given))
    out = Path(out_dir)
    _resolve_out_dir(out, overwrite)
    return _write_cohort(out, load_tissue_maps(options.template_resolution), options)


@dataclass(frozen=True)
class _CohortOptions:
    """The options of :func:`make_cohort` as the cohort is generated from them.

    Options that :func:`make_cohort` checks itself hold the checked value (a float, an int, a
    tuple); the others keep the caller's value, since ``labels.json`` and the UID scope have
    always recorded them as given (a conversion, 3 to 3.0, would change both).
    """

    n_subjects: int
    lesion_fraction: float
    seed: int
    contrasts: Sequence[str]
    with_localizer_fraction: float
    matrix_scale: float
    lesion_radius_mm: tuple[float, float]
    lesions_per_subject: tuple[int, int]
    deformation_mm: float
    max_rotation_deg: float
    max_translation_mm: float
    max_scaling: float
    max_oblique_deg: float
    in_plane_mm: tuple[float, float]
    slice_mm: tuple[float, float]
    noise_fraction: float
    bias_strength: float
    template_resolution: int
    head_fraction: float
    eyes: bool
    mass_effect_fraction: float
    mass_effect_ratio: tuple[float, float]
    vary_fov: bool
    fov_mm: tuple[float, float]
    matrix_size: tuple[int, int]
    lesion_appearance: str
    lesion_placement: str

    def subject_options(self) -> dict[str, Any]:
        """The :func:`random_subject` keywords that every subject of the cohort shares."""
        return dict(
            lesion_radius_mm=self.lesion_radius_mm, deformation_mm=self.deformation_mm,
            max_rotation_deg=self.max_rotation_deg, max_translation_mm=self.max_translation_mm,
            max_scaling=self.max_scaling, lesion_placement=self.lesion_placement,
        )


@dataclass(frozen=True)
class _CohortGroups:
    """Subject indices drawn for each cohort-level choice."""

    lesioned: set[int]
    with_localizer: set[int]
    heads: set[int]
    mass_effect: set[int]


@dataclass(frozen=True)
class _Study:
    """What the series of one study share: identification, study attributes and UID stream."""

    seed: int
    index: int
    uid_scope: str
    folder: Path
    start: _dt.datetime
    identity: dict[str, str]
    attributes: dict[str, Any]

    def uid(self, *parts: Any) -> str:
        """A UID of this study's, unique to the cohort's options, seed and subject."""
        return _uid(self.uid_scope, self.seed, self.index, *parts)

    def series_rng(self, series_number: int) -> np.random.Generator:
        """The noise and bias stream of series ``series_number`` (:func:`_series_rng`)."""
        return _series_rng(self.seed, self.index, series_number)


def _check_contrast_list(contrasts: Sequence[str]) -> tuple[str, ...]:
    """``contrasts`` as a tuple of distinct known contrast names (a bare string is refused)."""
    if isinstance(contrasts, str):
        raise TypeError(f"contrasts must be a sequence of names, not the string {contrasts!r}")
    contrasts = tuple(contrasts)
    if not contrasts:
        raise ValueError("contrasts must name at least one of " + ", ".join(CONTRASTS))
    for contrast in contrasts:
        _check_contrast(contrast)
    if len(set(contrasts)) != len(contrasts):
        raise ValueError(f"contrasts must not repeat; got {contrasts}")
    return contrasts


def _checked_cohort_options(raw: _CohortOptions) -> _CohortOptions:
    """``raw`` with :func:`make_cohort`'s checks applied, in the order it has always used.

    The order decides which message a call with several bad options gets. Everything is
    checked before the output folder is touched.
    """
    n_subjects = _check_int("n_subjects", raw.n_subjects, 1, 100_000)
    lesion_fraction = _check_range("lesion_fraction", raw.lesion_fraction, 0.0, 1.0)
    seed = _check_int("seed", raw.seed, 0)
    contrasts = _check_contrast_list(raw.contrasts)
    localizer_fraction = _check_range("with_localizer_fraction", raw.with_localizer_fraction,
                                      0.0, 1.0)
    matrix_scale = _check_range("matrix_scale", raw.matrix_scale, 0.05, 4.0)
    lesion_radius_mm = _check_interval("lesion_radius_mm", raw.lesion_radius_mm, 0.0, 60.0,
                                       lo_open=True)
    lesions_per_subject = _check_int_pair("lesions_per_subject", raw.lesions_per_subject, 1, 10)
    in_plane_mm = _check_interval("in_plane_mm", raw.in_plane_mm, 0.0, 20.0, lo_open=True)
    slice_mm = _check_interval("slice_mm", raw.slice_mm, 0.0, 50.0, lo_open=True)
    max_oblique_deg = _check_range("max_oblique_deg", raw.max_oblique_deg, 0.0, 45.0)
    head_fraction = _check_range("head_fraction", raw.head_fraction, 0.0, 1.0)
    mass_effect_fraction = _check_range("mass_effect_fraction", raw.mass_effect_fraction,
                                        0.0, 1.0)
    _check_flags(("vary_fov", raw.vary_fov), ("eyes", raw.eyes))
    fov_mm = _check_interval("fov_mm", raw.fov_mm, 50.0, 500.0)
    matrix_size = _check_int_pair("matrix_size", raw.matrix_size, 16, 1024)
    _check_placement(raw.lesion_placement)
    checked = dataclasses.replace(
        raw, n_subjects=n_subjects, lesion_fraction=lesion_fraction, seed=seed,
        contrasts=contrasts, with_localizer_fraction=localizer_fraction,
        matrix_scale=matrix_scale, lesion_radius_mm=lesion_radius_mm,
        lesions_per_subject=lesions_per_subject, in_plane_mm=in_plane_mm, slice_mm=slice_mm,
        max_oblique_deg=max_oblique_deg, head_fraction=head_fraction,
        mass_effect_fraction=mass_effect_fraction, fov_mm=fov_mm, matrix_size=matrix_size,
    )
    # The remaining subject options are checked by drawing a throwaway subject, so that they
    # fail here, before anything is written, with random_subject's own messages.
    random_subject(np.random.default_rng(0), load_tissue_maps(raw.template_resolution),
                   n_lesions=0, mass_effect_ratio=raw.mass_effect_ratio, eyes=raw.eyes,
                   lesion_appearance=raw.lesion_appearance, **checked.subject_options())
    _check_range("noise_fraction", raw.noise_fraction, 0.0, 1.0)
    _check_range("bias_strength", raw.bias_strength, 0.0, 1.0)
    return checked


def _cohort_groups(options: _CohortOptions) -> _CohortGroups:
    """Draw which subjects carry lesions, a localizer, a whole head and a mass effect."""
    n_subjects, seed = options.n_subjects, options.seed
    cohort_rng = np.random.default_rng([seed, 0xC0DE])
    n_lesioned = int(round(options.lesion_fraction * n_subjects))
    lesioned = set(cohort_rng.choice(n_subjects, size=n_lesioned, replace=False).tolist())
    n_localizer = int(round(options.with_localizer_fraction * n_subjects))
    with_localizer = set(cohort_rng.choice(n_subjects, size=n_localizer, replace=False).tolist())
    # Streams of their own, so that the choices above do not change when these options do.
    n_heads = int(round(options.head_fraction * n_subjects))
    heads = set(np.random.default_rng([seed, 0x4EAD]).choice(
        n_subjects, size=n_heads, replace=False).tolist()) if n_heads else set()
    n_mass = int(round(options.mass_effect_fraction * n_lesioned))
    mass_effect = set(np.random.default_rng([seed, 0x3A55]).choice(
        sorted(lesioned), size=n_mass, replace=False).tolist()) if n_mass else set()
    return _CohortGroups(lesioned=lesioned, with_localizer=with_localizer, heads=heads,
                         mass_effect=mass_effect)


def _generator_record(options: _CohortOptions, maps: TissueMaps) -> dict[str, Any]:
    """``labels.json``'s ``generator``: the parameters the cohort was generated with."""
    o = options
    generator = {
        "module": _GENERATOR_NAME,
        "template": f"MNI152 2009 (nilearn), {maps.resolution} mm",
        "n_subjects": o.n_subjects, "lesion_fraction": o.lesion_fraction, "seed": o.seed,
        "contrasts": list(o.contrasts), "with_localizer_fraction": o.with_localizer_fraction,
        "matrix_scale": o.matrix_scale, "lesion_radius_mm": list(o.lesion_radius_mm),
        "lesions_per_subject": list(o.lesions_per_subject), "deformation_mm": o.deformation_mm,
        "max_rotation_deg": o.max_rotation_deg, "max_translation_mm": o.max_translation_mm,
        "max_scaling": o.max_scaling, "max_oblique_deg": o.max_oblique_deg,
        "in_plane_mm": list(o.in_plane_mm), "slice_mm": list(o.slice_mm),
        "noise_fraction": o.noise_fraction, "bias_strength": o.bias_strength,
        "head_fraction": o.head_fraction, "eyes": bool(o.eyes),
        "mass_effect_fraction": o.mass_effect_fraction,
        "mass_effect_ratio": [float(v) for v in o.mass_effect_ratio],
        "vary_fov": bool(o.vary_fov), "fov_mm": list(o.fov_mm),
        "matrix_size": list(o.matrix_size), "lesion_appearance": o.lesion_appearance,
    }
    if o.lesion_placement != "deep":
        # Only when not the default: the UIDs hash these parameters, so recording the default
        # would change every UID (and byte) of the cohorts written before the option existed.
        generator["lesion_placement"] = o.lesion_placement
    return generator


def _write_cohort(out: Path, maps: TissueMaps, options: _CohortOptions) -> dict[str, Any]:
    """Write every study of a checked cohort into ``out``, then ``labels.json``; return it."""
    groups = _cohort_groups(options)
    generator = _generator_record(options, maps)
    # UIDs are deterministic (a cohort regenerated alike has the same UIDs) but depend on every
    # generator option, not only on the seed: two cohorts that differ in any option must never
    # share a UID, or UID-keyed stores (the token cache, a cohort bank) would mix them up.
    uid_scope = hashlib.sha256(json.dumps(generator, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    studies: list[dict[str, Any]] = []
    for index in range(options.n_subjects):
        studies.append(_cohort_study(out, maps, options, groups, index, uid_scope))
        logger.info("study %d/%d written (%s, lesion=%s, head=%s)", index + 1, options.n_subjects,
                    studies[-1]["patient_id"], studies[-1]["has_lesion"], index in groups.heads)
    labels: dict[str, Any] = {
        "schema": LABELS_SCHEMA,
        "generator": generator,
        "n_studies": len(studies),
        "n_series": sum(len(s["series"]) for s in studies),
        "n_lesion_studies": sum(1 for s in studies if s["has_lesion"]),
        "n_head_studies": sum(1 for s in studies if s["has_head"]),
        "n_mass_effect_studies": sum(1 for s in studies if s["has_mass_effect"]),
        "studies": studies,
    }
    with atomic_path(out / "labels.json") as temporary:
        temporary.write_text(json.dumps(labels, indent=1) + "\n")
    return labels


def _cohort_study(
    out: Path,
    maps: TissueMaps,
    options: _CohortOptions,
    groups: _CohortGroups,
    index: int,
    uid_scope: str,
) -> dict[str, Any]:
    """Draw subject ``index`` from its own stream and write its study; return its record."""
    # A stream per subject, so that a subject does not change with n_subjects.
    rng = np.random.default_rng([options.seed, index, 1])
    lesions_lo, lesions_hi = options.lesions_per_subject
    n_lesions = int(rng.integers(lesions_lo, lesions_hi + 1)) if index in groups.lesioned else 0
    subject = random_subject(rng, maps, n_lesions=n_lesions,
                             mass_effect=index in groups.mass_effect,
                             mass_effect_ratio=options.mass_effect_ratio,
                             with_head=index in groups.heads, eyes=options.eyes,
                             lesion_appearance=options.lesion_appearance,
                             **options.subject_options())
    # Heads are always planned as scanners do; skull-stripped series only with vary_fov.
    plan_fov = options.vary_fov or index in groups.heads
    fov_plan = {"fov_mm": options.fov_mm, "matrix_size": options.matrix_size}
    return _write_study(out, maps, subject, rng, options, index=index, uid_scope=uid_scope,
                        with_localizer=index in groups.with_localizer,
                        fov_plan=fov_plan if plan_fov else None)


def _write_study(
    out: Path,
    maps: TissueMaps,
    subject: SubjectAnatomy,
    rng: np.random.Generator,
    options: _CohortOptions,
    *,
    index: int,
    uid_scope: str,
    with_localizer: bool,
    fov_plan: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Write one subject's study: an optional localizer, then one series per contrast.

    ``rng`` is the subject's stream; the study draws its date, patient, series order, grids,
    gains and protocols from it, in that order.
    """
    study = _study_header(rng, options.seed, index, uid_scope)
    order = [options.contrasts[i] for i in rng.permutation(len(options.contrasts))]
    # The head on the template grid gives the head's surface that acquisitions must cover.
    head_volumes = synthesize_head(maps, subject, ()) if subject.head is not None else None
    distractors: list[dict[str, Any]] = []
    series_number = 0
    if with_localizer:
        series_number += 1
        distractors.append(_write_localizer_distractor(out, maps, subject, study, series_number,
                                                       options.matrix_scale))
    template_images = {
        contrast: synthesize_contrast(
            maps, contrast, {k: subject.intensities[contrast][k] for k in ("csf", "gm", "wm")})
        for contrast in order
    }
    series_records: list[dict[str, Any]] = []
    for contrast in order:
        series_number += 1
        orientation, grid = _plan_series_grid(maps, subject, rng, contrast, options, fov_plan,
                                              head_volumes)
        series_records.append(_write_contrast_series(
            out, maps, subject, rng, study, options, contrast=contrast, orientation=orientation,
            grid=grid, series_number=series_number, template_image=template_images[contrast],
        ))
    return _study_record(study, subject, series_records, distractors)


def _study_header(rng: np.random.Generator, seed: int, index: int, uid_scope: str) -> _Study:
    """Draw a study's date, start time and patient; derive its identification and UIDs."""
    number = index + 1
    date = _dt.date(2024, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365)))
    start = _dt.datetime.combine(date, _dt.time(7, 0)) + _dt.timedelta(
        minutes=int(rng.integers(0, 11 * 60)))
    age = int(rng.integers(20, 86))
    sex = "F" if rng.random() < 0.5 else "M"
    identity = dict(
        patient_id=f"SYN{seed}-{number:03d}",
        patient_name=f"SYNTHETIC^SUBJECT{number:03d}",
        study_uid=_uid(uid_scope, seed, index, "study"),
        frame_of_reference_uid=_uid(uid_scope, seed, index, "frame-of-reference"),
    )
    attributes = dict(
        study_date=date.strftime("%Y%m%d"), study_time=start.strftime("%H%M%S"),
        study_id=str(number), accession_number=f"A{seed % 10**6:06d}{number:05d}",
        patient_birth_date=f"{date.year - age:04d}0101", patient_sex=sex,
        patient_age=f"{age:03d}Y", magnetic_field_strength=float(rng.choice([1.5, 3.0])),
    )
    return _Study(seed=seed, index=index, uid_scope=uid_scope,
                  folder=Path("dicom") / f"ST{number:03d}", start=start, identity=identity,
                  attributes=attributes)


def _write_localizer_distractor(
    out: Path,
    maps: TissueMaps,
    subject: SubjectAnatomy,
    study: _Study,
    series_number: int,
    matrix_scale: float,
) -> dict[str, Any]:
    """Write a study's 3-plane localizer; return its ``distractors`` record."""
    uid = study.uid("series", "localizer")
    folder = study.folder / f"SE{series_number:02d}"
    planes = _localizer_planes(maps, subject, study.series_rng(series_number), matrix_scale)
    write_localizer(planes, out / folder, series_uid=uid, series_number=series_number,
                    series_time=study.start.strftime("%H%M%S"), **study.identity,
                    **study.attributes)
    return {"kind": "localizer", "series_instance_uid": uid, "series_number": series_number,
            "folder": folder.as_posix(), "n_files": len(planes)}


def _plan_series_grid(
    maps: TissueMaps,
    subject: SubjectAnatomy,
    rng: np.random.Generator,
    contrast: str,
    options: _CohortOptions,
    fov_plan: Mapping[str, tuple[float, float]] | None,
    head_volumes: HeadVolumes | None,
) -> tuple[str, AcquisitionGrid]:
    """Draw a series' orientation and spacing and plan its grid.

    Without ``fov_plan`` the pixel spacing comes from ``in_plane_mm`` and the matrix fits the
    brain; with it, as scanners plan, from a square field of view and a matrix drawn from the
    plan's ranges.
    """
    weights = _ORIENTATION_WEIGHTS[contrast]
    orientation = str(rng.choice(list(weights), p=list(weights.values())))
    matrix_scale, slice_mm = options.matrix_scale, options.slice_mm
    if fov_plan is None:
        pixel = float(rng.uniform(*options.in_plane_mm))
        spacing = np.array([pixel, pixel, float(rng.uniform(*slice_mm))]) / matrix_scale
        grid = acquisition_grid(maps, subject, orientation=orientation, spacing=spacing,
                                rng=rng, max_oblique_deg=options.max_oblique_deg,
                                max_extra_voxels=max(0, int(round(12 * matrix_scale))))
        return orientation, grid
    fov = float(rng.uniform(*fov_plan["fov_mm"]))
    matrix = _scaled_matrix(int(rng.integers(fov_plan["matrix_size"][0],
                                             fov_plan["matrix_size"][1] + 1)), matrix_scale)
    pixel = fov / matrix
    spacing = np.array([pixel, pixel, float(rng.uniform(*slice_mm)) / matrix_scale])
    grid = acquisition_grid(maps, subject, orientation=orientation, spacing=spacing, rng=rng,
                            max_oblique_deg=options.max_oblique_deg, field_of_view_mm=fov,
                            head_volumes=head_volumes)
    return orientation, grid


def _write_contrast_series(
    out: Path,
    maps: TissueMaps,
    subject: SubjectAnatomy,
    rng: np.random.Generator,
    study: _Study,
    options: _CohortOptions,
    *,
    contrast: str,
    orientation: str,
    grid: AcquisitionGrid,
    series_number: int,
    template_image: NDArray[np.float32],
) -> dict[str, Any]:
    """Render and write one series on its planned grid, with its truth masks; return its record.

    The gain and then the protocol are drawn from the subject's stream ``rng``; bias and noise
    from the series' own stream.
    """
    rendered = render_series(
        maps, subject, grid, contrast, study.series_rng(series_number),
        noise_fraction=options.noise_fraction, bias_strength=options.bias_strength,
        gain=float(rng.uniform(600.0, 1400.0)), template_image=template_image,
    )
    protocol = _protocol(contrast, orientation, rng)
    uid = study.uid("series", contrast)
    folder = study.folder / f"SE{series_number:02d}"
    series_time = (study.start + _dt.timedelta(minutes=4 * series_number)).strftime("%H%M%S")
    files = write_series(
        rendered.image, grid.origin, grid.spacing, grid.direction, out / folder,
        series_uid=uid, series_number=series_number, series_time=series_time,
        **study.identity, **study.attributes, **protocol,
    )
    truth = _write_truth_masks(out, uid, rendered)
    return _series_record(uid, series_number, protocol, contrast, orientation, folder.as_posix(),
                          len(files), rendered, truth)


def _write_truth_masks(out: Path, uid: str, rendered: RenderedSeries) -> dict[str, str]:
    """Write a series' lesion, brain (and head) masks as NIfTI; return their paths under ``out``."""
    grid = rendered.grid
    truth = {
        "lesion": f"truth/{uid}_lesion.nii.gz",
        "brain": f"truth/{uid}_brain.nii.gz",
    }
    write_mask_nifti(rendered.lesion, grid.origin, grid.spacing, grid.direction,
                     out / truth["lesion"])
    write_mask_nifti(rendered.brain, grid.origin, grid.spacing, grid.direction,
                     out / truth["brain"])
    if rendered.head is not None:
        truth["head"] = f"truth/{uid}_head.nii.gz"
        write_mask_nifti(rendered.head, grid.origin, grid.spacing, grid.direction,
                         out / truth["head"])
    return truth


def _series_record(
    uid: str,
    series_number: int,
    protocol: Mapping[str, Any],
    contrast: str,
    orientation: str,
    folder: str,
    n_files: int,
    rendered: RenderedSeries,
    truth: dict[str, str],
) -> dict[str, Any]:
    """A series' entry in ``labels.json``: identification, geometry and truth volumes."""
    grid = rendered.grid
    lesion_voxels = int(rendered.lesion.sum())
    _, ny, nx = grid.shape_zyx
    record = {
        "series_instance_uid": uid,
        "series_number": series_number,
        "series_description": protocol["series_description"],
        "contrast": contrast,
        "orientation": orientation,
        "folder": folder,
        "n_files": n_files,
        "shape_zyx": list(grid.shape_zyx),
        "spacing_xyz_mm": [round(float(v), 6) for v in grid.spacing],
        "echo_time_ms": protocol["echo_time"],
        "repetition_time_ms": protocol["repetition_time"],
        "has_lesion": lesion_voxels > 0,
        "lesion_voxels": lesion_voxels,
        "lesion_volume_ml": round(lesion_voxels * grid.voxel_volume_ml, 4),
        "brain_volume_ml": round(int(rendered.brain.sum()) * grid.voxel_volume_ml, 2),
        "skull_stripped": rendered.head is None,
        "field_of_view_mm": [round(nx * float(grid.spacing[0]), 2),
                             round(ny * float(grid.spacing[1]), 2)],
        "truth": truth,
    }
    if rendered.head is not None:
        record["head_volume_ml"] = round(int(rendered.head.sum()) * grid.voxel_volume_ml, 2)
    return record


def _lesion_records(subject: SubjectAnatomy) -> list[dict[str, Any]]:
    """The ``lesions`` of a study's entry: template-space geometry and any own appearance."""
    return [
        {"centre_template_lps_mm": [round(float(v), 3) for v in item.centre_lps],
         "semi_axes_mm": [round(float(v), 3) for v in item.semi_axes_mm],
         "mass_effect_mm": round(float(item.mass_effect_mm), 3),
         **({"appearance": {c: {"rim": r, "core": k} for c, r, k in item.appearance}}
            if item.appearance else {}),
         **({"stripes": {"period_mm": item.stripe_period_mm, "amplitude": item.stripe_amplitude}}
            if item.stripe_amplitude > 0 else {})}
        for item in subject.lesions
    ]


def _study_record(
    study: _Study,
    subject: SubjectAnatomy,
    series_records: list[dict[str, Any]],
    distractors: list[dict[str, Any]],
) -> dict[str, Any]:
    """A study's entry in ``labels.json``."""
    volumes = [s["lesion_volume_ml"] for s in series_records]
    return {
        "patient_id": study.identity["patient_id"],
        "patient_name": study.identity["patient_name"],
        "study_instance_uid": study.identity["study_uid"],
        "frame_of_reference_uid": study.identity["frame_of_reference_uid"],
        "folder": study.folder.as_posix(),
        "study_date": study.attributes["study_date"],
        # A study has a lesion when one was placed; each series says whether its grid caught it.
        "has_lesion": subject.has_lesion,
        "has_head": subject.has_head,
        "has_mass_effect": subject.has_mass_effect,
        # Mean over the series: each grid measures the same lesion with its own partial volumes.
        "lesion_volume_ml": round(float(np.mean(volumes)), 4) if volumes else 0.0,
        "lesions": _lesion_records(subject),
        "series": series_records,
        "distractors": distractors,
    }
