"""Synthetic brain MR cohorts with ground truth, built from the MNI152 2009 template.

Everything comes from the tissue maps that nilearn ships inside its wheel (no download): a
subject is the template warped by a random affine and a smooth elastic deformation, optionally
carrying one or more smooth-edged lesions; each of its series renders that anatomy onto its own
acquisition grid (axial, sagittal or coronal, slightly oblique, anisotropic spacing) with a
contrast (T2w or T1w), a multiplicative bias field and Rician noise, and is written as one
MR Image Storage file per slice. The lesion and brain masks of each series are written as NIfTI on
the native grid of that series, outside the DICOM tree, so that nothing but the DICOM reaches the
application under test.

Conventions are those of :mod:`codegraph3d.volume`: arrays ``[z, y, x]``, index ``(x, y, z)``,
LPS millimetres, ``point = origin + direction @ (spacing * index)``. Template arrays keep
nibabel's ``[i, j, k]`` order, since they never leave this module.

Output of :func:`make_cohort`::

    out_dir/dicom/ST001/SE01/IM0001.dcm ...      one study per subject, one folder per series
    out_dir/truth/<SeriesInstanceUID>_lesion.nii.gz, _brain.nii.gz
    out_dir/labels.json

``labels.json`` (schema ``codegraph3d.synthetic-labels/1``) holds the generator's parameters and
``studies``: per study ``patient_id``, ``study_instance_uid``, ``folder``, ``has_lesion``,
``lesion_volume_ml``, ``lesions`` (template-space centres and semi-axes), ``series`` and
``distractors`` (localizers, never to be scored); per series ``series_instance_uid``,
``contrast``, ``orientation``, ``folder``, ``shape_zyx``, ``spacing_xyz_mm``, ``has_lesion``,
``lesion_voxels``, ``lesion_volume_ml`` (on that series' grid), ``brain_volume_ml`` and ``truth``
(paths of the two masks, relative to ``out_dir``).

Everything is a pure function of the parameters and the seed: with the same library versions a
rerun writes identical bytes.
"""

from __future__ import annotations

import datetime as _dt
import functools
import gzip
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from codegraph3d.volume import index_to_physical_matrix

__all__ = [
    "CONTRASTS",
    "ORIENTATIONS",
    "TISSUE_INTENSITIES",
    "LABELS_SCHEMA",
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
]

logger = logging.getLogger(__name__)

CONTRASTS: tuple[str, ...] = ("T2w", "T1w")
ORIENTATIONS: tuple[str, ...] = ("axial", "coronal", "sagittal")
LABELS_SCHEMA = "codegraph3d.synthetic-labels/1"

#: Relative tissue intensities before the per-subject jitter. The lesion is a brightness
#: between the rim and the core value, like oedema around a tumour core: clearly above GM and WM
#: on T2w (but below CSF, so that CSF is not the easy "anomaly") and below them on T1w.
TISSUE_INTENSITIES: dict[str, dict[str, float]] = {
    "T2w": {"csf": 1.00, "gm": 0.55, "wm": 0.40, "lesion_rim": 0.78, "lesion_core": 0.90},
    "T1w": {"csf": 0.20, "gm": 0.60, "wm": 0.85, "lesion_rim": 0.40, "lesion_core": 0.30},
}

# RAS <-> LPS: both flip x and y; the same matrix is its own inverse.
_FLIP_LPS_RAS = np.diag([-1.0, -1.0, 1.0])

# Unit LPS direction columns (x, y, z index axes) of the three standard planes, with z the slice
# normal x cross y, which is the order a loader that sorts slices by position produces.
_BASE_DIRECTIONS: dict[str, NDArray[np.float64]] = {
    "axial": np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]).T,
    "coronal": np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]).T,
    "sagittal": np.array([[0, 1.0, 0], [0, 0, -1.0], [-1.0, 0, 0]]).T,
}
_ORIENTATION_CODES = {"axial": "AX", "coronal": "COR", "sagittal": "SAG"}

_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_UID_NAMESPACE = "codegraph3d.synthetic"
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
    """

    pullback: NDArray[np.float64]
    wavevectors: NDArray[np.float64]
    amplitudes: NDArray[np.float64]
    phases: NDArray[np.float64]
    lesions: tuple[Lesion, ...]
    intensities: dict[str, dict[str, float]]

    @property
    def has_lesion(self) -> bool:
        return bool(self.lesions)

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


def _random_lesion(
    rng: np.random.Generator,
    maps: TissueMaps,
    radius_mm: tuple[float, float],
    irregularity: float,
    edge_mm: float,
) -> Lesion:
    radius = rng.uniform(*radius_mm)
    semi_axes = radius * rng.uniform(0.8, 1.2, size=3)
    n_lobes = 3
    amplitudes = rng.uniform(-1.0, 1.0, size=n_lobes)
    amplitudes *= irregularity / max(np.abs(amplitudes).sum(), 1e-9)
    extent = float(semi_axes.max() * (1.0 + irregularity))
    # Centre deep enough that the whole blob and its soft edge sit in brain tissue, and not in a
    # ventricle, so that the ground truth is the region that really changed intensity.
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
    )


def random_subject(
    rng: np.random.Generator,
    maps: TissueMaps,
    *,
    n_lesions: int = 0,
    lesion_radius_mm: tuple[float, float] = (6.0, 15.0),
    lesion_irregularity: float = 0.2,
    lesion_edge_mm: float = 1.0,
    deformation_mm: float = 3.0,
    max_rotation_deg: float = 5.0,
    max_translation_mm: float = 10.0,
    max_scaling: float = 0.05,
    intensity_jitter: float = 0.05,
    n_modes: int = 6,
) -> SubjectAnatomy:
    """Draw one subject: affine + elastic warp of the template, tissue jitter and lesions.

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
    """
    _check_int("n_lesions", n_lesions, 0, 10)
    radius_mm = _check_interval("lesion_radius_mm", lesion_radius_mm, 0.0, 60.0, lo_open=True)
    irregularity = _check_range("lesion_irregularity", lesion_irregularity, 0.0, 0.5)
    edge = _check_range("lesion_edge_mm", lesion_edge_mm, 0.0, 10.0, lo_open=True)
    deformation = _check_range("deformation_mm", deformation_mm, 0.0, 10.0)
    rotation = _check_range("max_rotation_deg", max_rotation_deg, 0.0, 45.0)
    translation = _check_range("max_translation_mm", max_translation_mm, 0.0, 100.0)
    scaling = _check_range("max_scaling", max_scaling, 0.0, 0.3)
    jitter = _check_range("intensity_jitter", intensity_jitter, 0.0, 0.3)
    n_modes = _check_int("n_modes", n_modes, 1, 64)

    centre = maps.brain_centre_lps
    angles = rng.uniform(-rotation, rotation, size=3)
    scales = 1.0 + rng.uniform(-scaling, scaling, size=3)
    shift = rng.uniform(-translation, translation, size=3)
    # Forward (template -> subject): rotate and scale about the brain centre, then translate.
    linear = _euler_rotation(angles) @ np.diag(scales)
    forward = np.eye(4)
    forward[:3, :3] = linear
    forward[:3, 3] = centre + shift - linear @ centre
    pullback = np.linalg.inv(forward)

    wavelengths = rng.uniform(80.0, 160.0, size=n_modes)
    wavevectors = _random_unit_vectors(rng, n_modes) * (2.0 * math.pi / wavelengths)[:, None]
    # E|u|^2 = K * 3 sigma^2 * E[sin^2] = 1.5 K sigma^2, hence sigma for the requested RMS.
    sigma = deformation / math.sqrt(1.5 * n_modes)
    amplitudes = rng.normal(0.0, sigma, size=(n_modes, 3))
    phases = rng.uniform(0.0, 2.0 * math.pi, size=n_modes)

    intensities: dict[str, dict[str, float]] = {}
    for contrast in CONTRASTS:
        intensities[contrast] = {
            name: float(value * (1.0 + rng.uniform(-jitter, jitter)))
            for name, value in TISSUE_INTENSITIES[contrast].items()
        }
    lesions = tuple(
        _random_lesion(rng, maps, radius_mm, irregularity, edge) for _ in range(n_lesions)
    )
    return SubjectAnatomy(
        pullback=pullback,
        wavevectors=wavevectors,
        amplitudes=amplitudes,
        phases=phases,
        lesions=lesions,
        intensities=intensities,
    )


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
) -> AcquisitionGrid:
    """Plan a series' grid that covers the subject's whole brain, as a technologist would.

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
        Each in-plane matrix size grows by a random 0..max_extra_voxels, so that matrices vary.
    """
    spacing = _as_vector3("spacing", spacing)
    if np.any(spacing <= 0):
        raise ValueError(f"spacing must be positive; got {spacing.tolist()}")
    tilt = _check_range("max_oblique_deg", max_oblique_deg, 0.0, 45.0)
    margin = _check_range("margin_mm", margin_mm, 0.0, 100.0)
    extra = _check_int("max_extra_voxels", max_extra_voxels, 0, 1000)

    direction = orientation_direction(orientation, _random_rotation(rng, tilt))
    # The elastic warp is ignored below, so widen the margin by a bound on it: |u| <= sum |a_k|
    # (plus 10 % for the affine's scaling).
    slack = margin + 1.1 * float(np.linalg.norm(subject.amplitudes, axis=1).sum())
    brain = subject.to_subject_affine(maps.brain_points_lps)
    projected = brain @ direction  # coordinates along x, y, z axes
    low = projected.min(axis=0) - slack
    high = projected.max(axis=0) + slack
    n = np.ceil((high - low) / spacing).astype(int) + 1
    n[:2] += rng.integers(0, extra + 1, size=2)
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
        ``float32`` intensities (arbitrary scanner units), 0 outside the brain.
    brain : numpy.ndarray
        ``bool`` brain mask.
    lesion : numpy.ndarray
        ``bool`` lesion ground truth (inside the brain mask).
    grid : AcquisitionGrid
        The geometry of the arrays.
    """

    image: NDArray[np.float32]
    brain: NDArray[np.bool_]
    lesion: NDArray[np.bool_]
    grid: AcquisitionGrid


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

    Each voxel centre is pulled back through the subject warp into the template, the contrast
    and brain mask are interpolated there (trilinear) and the lesions are evaluated analytically
    at the same template point, so lesion and anatomy can never disagree between series.
    Outside the brain mask the image is exactly 0 (skull-stripped data).

    Parameters
    ----------
    maps : TissueMaps
        The template.
    subject : SubjectAnatomy
        Warp, intensities and lesions.
    grid : AcquisitionGrid
        Output geometry.
    contrast : {"T2w", "T1w"}
        Contrast to synthesise.
    rng : numpy.random.Generator
        Draws the bias field and the noise.
    noise_fraction : float, default 0.03
        Rician noise sigma relative to the brightest tissue intensity.
    bias_strength : float, default 0.1
        RMS of the log bias field (0.1 is about +-10 %).
    gain : float, default 1000
        Scanner units per unit of relative intensity.
    template_image : numpy.ndarray, optional
        A precomputed :func:`synthesize_contrast` of this subject's intensities (saves time when
        several series share a contrast).
    """
    from scipy import ndimage

    _check_contrast(contrast)
    noise = _check_range("noise_fraction", noise_fraction, 0.0, 1.0)
    bias = _check_range("bias_strength", bias_strength, 0.0, 1.0)
    gain = _check_range("gain", gain, 0.0, 1e6, lo_open=True)
    shape = grid.shape_zyx
    intensities = subject.intensities[contrast]
    if template_image is None:
        template_image = synthesize_contrast(
            maps, contrast, {k: intensities[k] for k in ("csf", "gm", "wm")}
        )

    # grid index -> subject LPS -> (affine) template LPS -> template voxel is affine; the
    # elastic displacement is added in template-voxel units.
    index_to_template = subject.pullback @ grid.index_to_physical
    lps_to_voxel = maps.lps_to_index
    index_to_voxel = lps_to_voxel @ index_to_template
    elastic_bound_mm = float(np.linalg.norm(subject.amplitudes, axis=1).sum())
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

    values = ndimage.map_coordinates(template_image, coords, order=1, mode="constant", cval=0.0,
                                     prefilter=False, output=np.float32)
    inside = ndimage.map_coordinates(maps.brain, coords, order=1, mode="constant", cval=0.0,
                                     prefilter=False, output=np.float32) >= 0.5
    in_lesion = np.zeros(values.shape, dtype=bool)
    voxel_to_lps = maps.index_to_lps
    voxel_size = float(maps.resolution)
    for item in subject.lesions:
        centre = lps_to_voxel[:3, :3] @ item.centre_lps + lps_to_voxel[:3, 3]
        reach = (item.max_extent_mm + 6.0 * item.edge_mm) / voxel_size
        near = np.abs(coords[0] - np.float32(centre[0])) <= reach
        for c in (1, 2):
            near &= np.abs(coords[c] - np.float32(centre[c])) <= reach
        near = np.flatnonzero(near)
        if near.size == 0:
            continue
        points = coords[:, near].T.astype(float) @ voxel_to_lps[:3, :3].T + voxel_to_lps[:3, 3]
        ratio = item.radius_ratio(points)
        weight = item.membership(ratio)
        # Brighter (T2w) or darker (T1w) core fading to the rim value at the boundary.
        core_fraction = np.clip(1.0 - ratio, 0.0, 1.0)
        lesion_value = item.intensity_scale * (
            intensities["lesion_rim"]
            + (intensities["lesion_core"] - intensities["lesion_rim"]) * core_fraction
        )
        values[near] = ((1.0 - weight) * values[near] + weight * lesion_value).astype(np.float32)
        in_lesion[near] |= ratio <= 1.0
    del coords

    if bias > 0:
        # Coil sensitivity: smooth in scanner space (not anatomy), hence on grid points.
        index_to_lps = grid.index_to_physical
        n_bias = 4
        waves = _random_unit_vectors(rng, n_bias) * (
            2.0 * math.pi / rng.uniform(200.0, 400.0, size=n_bias)
        )[:, None]
        weights = rng.normal(0.0, bias * math.sqrt(2.0 / n_bias), size=n_bias)
        phases = rng.uniform(0.0, 2.0 * math.pi, size=n_bias)
        log_bias = np.zeros(values.shape, dtype=np.float32)
        for wave, weight, phase0 in zip(waves, weights, phases, strict=True):
            log_bias += np.float32(weight) * np.sin(_linear_values(
                index_to_lps[:3, :3].T @ wave, float(wave @ index_to_lps[:3, 3] + phase0),
                index_xyz))
        values *= np.exp(log_bias)
    values *= np.float32(gain)
    if noise > 0:
        sigma = np.float32(noise * gain * max(intensities["csf"], intensities["gm"],
                                              intensities["wm"]))
        real = values + sigma * rng.standard_normal(values.shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(values.shape, dtype=np.float32)
        values = np.sqrt(real * real + imag * imag)

    image = np.zeros(shape, dtype=np.float32)
    brain = np.zeros(shape, dtype=bool)
    lesion = np.zeros(shape, dtype=bool)
    image[where] = np.where(inside, values, np.float32(0.0))  # exact zero background
    brain[where] = inside
    lesion[where] = in_lesion & inside
    return RenderedSeries(image=image, brain=brain, lesion=lesion, grid=grid)


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))
    os.replace(tmp, path)
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
    from pydicom.dataset import Dataset

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

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = _MR_IMAGE_STORAGE
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.AcquisitionDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = study_time
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
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex
    if patient_age:
        ds.PatientAge = patient_age
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
    ds.ImagingFrequency = _ds(42.577478 * magnetic_field_strength)
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = _ds(magnetic_field_strength)
    ds.EchoTrainLength = echo_train_length if echo_train_length is not None else ""
    ds.SoftwareVersions = "codegraph3d.synthetic"
    ds.ProtocolName = protocol_name or series_description
    if flip_angle is not None:
        ds.FlipAngle = _ds(flip_angle)
    ds.PatientPosition = patient_position
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
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    return ds


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
    volume_array_zyx: ArrayLike,
    origin: ArrayLike,
    spacing: ArrayLike,
    direction: ArrayLike,
    out_dir: str | os.PathLike[str],
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    series_description: str,
    series_number: int,
    echo_time: float,
    repetition_time: float,
    frame_of_reference_uid: str,
    modality: str = "MR",
    scanning_sequence: str = "SE",
    sequence_variant: str = "SK\\SP",
    scan_options: str = "",
    mr_acquisition_type: str = "2D",
    inversion_time: float | None = None,
    echo_train_length: int | None = None,
    flip_angle: float | None = None,
    sequence_name: str | None = None,
    protocol_name: str | None = None,
    image_type: Sequence[str] = _DEFAULT_IMAGE_TYPE,
    study_date: str = "20240101",
    study_time: str = "080000",
    series_time: str | None = None,
    study_id: str = "1",
    accession_number: str = "",
    patient_birth_date: str = "19700101",
    patient_sex: str = "O",
    patient_age: str | None = None,
    manufacturer: str = "CoDeGraph3D Synthetic",
    manufacturer_model_name: str = "MNI152-2009 phantom",
    institution_name: str = "Synthetic Hospital",
    station_name: str = "SYNTH01",
    magnetic_field_strength: float = 3.0,
    body_part_examined: str = "BRAIN",
    patient_position: str = "HFS",
    slice_thickness: float | None = None,
    bits_stored: int = 12,
    rescale: tuple[float, float] | None = None,
    extra_attributes: Mapping[str, Any] | None = None,
    overwrite: bool = False,
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
    if mr_acquisition_type not in ("2D", "3D"):
        raise ValueError(f"mr_acquisition_type must be '2D' or '3D'; got {mr_acquisition_type!r}")
    ds = _base_dataset(
        patient_id=patient_id, patient_name=patient_name, study_uid=study_uid,
        series_uid=series_uid, series_description=series_description,
        series_number=series_number, modality=modality,
        frame_of_reference_uid=frame_of_reference_uid, image_type=image_type,
        study_date=study_date, study_time=study_time, series_time=series_time,
        study_id=study_id, accession_number=accession_number,
        patient_birth_date=patient_birth_date, patient_sex=patient_sex, patient_age=patient_age,
        manufacturer=manufacturer, manufacturer_model_name=manufacturer_model_name,
        institution_name=institution_name, station_name=station_name,
        magnetic_field_strength=magnetic_field_strength, body_part_examined=body_part_examined,
        patient_position=patient_position, protocol_name=protocol_name,
        scanning_sequence=scanning_sequence, sequence_variant=sequence_variant,
        scan_options=scan_options, mr_acquisition_type=mr_acquisition_type,
        echo_time=echo_time, repetition_time=repetition_time, inversion_time=inversion_time,
        echo_train_length=echo_train_length, flip_angle=flip_angle, sequence_name=sequence_name,
        extra=extra_attributes,
    )
    orientation = np.concatenate([direction[:, 0], direction[:, 1]])
    step = direction[:, 2] * spacing[2]
    pixel_spacing = (float(spacing[1]), float(spacing[0]))
    slices = [(volume[k], origin + step * k, orientation, pixel_spacing)
              for k in range(volume.shape[0])]
    return _write_slices(
        ds, slices, Path(out_dir),
        slice_thickness=float(spacing[2]) if slice_thickness is None else slice_thickness,
        spacing_between_slices=float(spacing[2]), bits_stored=bits_stored, rescale=rescale,
        overwrite=overwrite,
    )


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
    maps: TissueMaps, subject: SubjectAnatomy, rng: np.random.Generator, matrix_scale: float
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
    out_dir: str | os.PathLike[str],
    *,
    n_subjects: int = 12,
    lesion_fraction: float = 1.0 / 3.0,
    seed: int = 0,
    contrasts: Sequence[str] = ("T2w", "T1w"),
    with_localizer_fraction: float = 0.5,
    matrix_scale: float = 1.0,
    lesion_radius_mm: tuple[float, float] = (6.0, 15.0),
    lesions_per_subject: tuple[int, int] = (1, 1),
    deformation_mm: float = 3.0,
    max_rotation_deg: float = 5.0,
    max_translation_mm: float = 10.0,
    max_scaling: float = 0.05,
    max_oblique_deg: float = 4.0,
    in_plane_mm: tuple[float, float] = (1.0, 1.2),
    slice_mm: tuple[float, float] = (1.5, 3.0),
    noise_fraction: float = 0.03,
    bias_strength: float = 0.1,
    template_resolution: int = 2,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate a synthetic multi-study brain MR cohort with ground truth.

    Each subject becomes one study (its own patient) holding one series per contrast, each on its
    own grid (orientation, tilt, spacing, matrix), and optionally a localizer distractor.
    Exactly ``round(lesion_fraction * n_subjects)`` subjects carry lesions, present in all of
    their series. Subjects draw from independent streams seeded by ``(seed, subject index)``, so
    a subject does not change when ``n_subjects`` does (the choice of lesioned subjects does).

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
    lesion_radius_mm : (float, float), default (6, 15)
        Range of a lesion's mean semi-axis (mm, in template space).
    lesions_per_subject : (int, int), default (1, 1)
        Inclusive range of the number of lesions of a lesioned subject.
    deformation_mm : float, default 3.0
        RMS elastic displacement.
    max_rotation_deg, max_translation_mm, max_scaling : float
        Head pose and size variation.
    max_oblique_deg : float, default 4.0
        Largest tilt of a slab from its standard plane.
    in_plane_mm, slice_mm : (float, float)
        Ranges of pixel spacing and slice spacing (before ``matrix_scale``).
    noise_fraction : float, default 0.03
        Rician noise relative to the brightest tissue.
    bias_strength : float, default 0.1
        RMS of the log bias field.
    template_resolution : {1, 2}, default 2
    overwrite : bool, default False
        Replace an existing cohort's ``dicom/``, ``truth/`` and ``labels.json``.

    Returns
    -------
    dict
        The content of ``labels.json``.
    """
    n_subjects = _check_int("n_subjects", n_subjects, 1, 100_000)
    lesion_fraction = _check_range("lesion_fraction", lesion_fraction, 0.0, 1.0)
    seed = _check_int("seed", seed, 0)
    if isinstance(contrasts, str):
        raise TypeError(f"contrasts must be a sequence of names, not the string {contrasts!r}")
    contrasts = tuple(contrasts)
    if not contrasts:
        raise ValueError("contrasts must name at least one of " + ", ".join(CONTRASTS))
    for contrast in contrasts:
        _check_contrast(contrast)
    if len(set(contrasts)) != len(contrasts):
        raise ValueError(f"contrasts must not repeat; got {contrasts}")
    localizer_fraction = _check_range("with_localizer_fraction", with_localizer_fraction, 0.0, 1.0)
    matrix_scale = _check_range("matrix_scale", matrix_scale, 0.05, 4.0)
    lesion_radius_mm = _check_interval("lesion_radius_mm", lesion_radius_mm, 0.0, 60.0,
                                       lo_open=True)
    try:
        lesions_lo, lesions_hi = lesions_per_subject
    except (TypeError, ValueError):
        raise TypeError(f"lesions_per_subject must be a (low, high) pair; "
                        f"got {lesions_per_subject!r}") from None
    lesions_lo = _check_int("lesions_per_subject[0]", lesions_lo, 1, 10)
    lesions_hi = _check_int("lesions_per_subject[1]", lesions_hi, lesions_lo, 10)
    in_plane_mm = _check_interval("in_plane_mm", in_plane_mm, 0.0, 20.0, lo_open=True)
    slice_mm = _check_interval("slice_mm", slice_mm, 0.0, 50.0, lo_open=True)
    max_oblique_deg = _check_range("max_oblique_deg", max_oblique_deg, 0.0, 45.0)
    subject_options = dict(
        lesion_radius_mm=lesion_radius_mm, deformation_mm=deformation_mm,
        max_rotation_deg=max_rotation_deg, max_translation_mm=max_translation_mm,
        max_scaling=max_scaling,
    )
    # Validate the remaining subject and rendering options before anything is written.
    random_subject(np.random.default_rng(0), load_tissue_maps(template_resolution), n_lesions=0,
                   **subject_options)
    _check_range("noise_fraction", noise_fraction, 0.0, 1.0)
    _check_range("bias_strength", bias_strength, 0.0, 1.0)

    out = Path(out_dir)
    _resolve_out_dir(out, overwrite)
    maps = load_tissue_maps(template_resolution)

    cohort_rng = np.random.default_rng([seed, 0xC0DE])
    n_lesioned = int(round(lesion_fraction * n_subjects))
    lesioned = set(cohort_rng.choice(n_subjects, size=n_lesioned, replace=False).tolist())
    n_localizer = int(round(localizer_fraction * n_subjects))
    with_localizer = set(cohort_rng.choice(n_subjects, size=n_localizer, replace=False).tolist())

    studies: list[dict[str, Any]] = []
    for index in range(n_subjects):
        rng = np.random.default_rng([seed, index, 1])
        n_lesions = int(rng.integers(lesions_lo, lesions_hi + 1)) if index in lesioned else 0
        subject = random_subject(rng, maps, n_lesions=n_lesions, **subject_options)
        studies.append(_write_study(
            out, maps, subject, rng, seed=seed, index=index, contrasts=contrasts,
            with_localizer=index in with_localizer, matrix_scale=matrix_scale,
            in_plane_mm=in_plane_mm, slice_mm=slice_mm, max_oblique_deg=max_oblique_deg,
            noise_fraction=noise_fraction, bias_strength=bias_strength,
        ))
        logger.info("study %d/%d written (%s, lesion=%s)", index + 1, n_subjects,
                    studies[-1]["patient_id"], studies[-1]["has_lesion"])

    labels: dict[str, Any] = {
        "schema": LABELS_SCHEMA,
        "generator": {
            "module": __name__,
            "template": f"MNI152 2009 (nilearn), {maps.resolution} mm",
            "n_subjects": n_subjects, "lesion_fraction": lesion_fraction, "seed": seed,
            "contrasts": list(contrasts), "with_localizer_fraction": localizer_fraction,
            "matrix_scale": matrix_scale, "lesion_radius_mm": list(lesion_radius_mm),
            "lesions_per_subject": [lesions_lo, lesions_hi], "deformation_mm": deformation_mm,
            "max_rotation_deg": max_rotation_deg, "max_translation_mm": max_translation_mm,
            "max_scaling": max_scaling, "max_oblique_deg": max_oblique_deg,
            "in_plane_mm": list(in_plane_mm), "slice_mm": list(slice_mm),
            "noise_fraction": noise_fraction, "bias_strength": bias_strength,
        },
        "n_studies": len(studies),
        "n_series": sum(len(s["series"]) for s in studies),
        "n_lesion_studies": sum(1 for s in studies if s["has_lesion"]),
        "studies": studies,
    }
    tmp = out / "labels.json.tmp"
    tmp.write_text(json.dumps(labels, indent=1) + "\n")
    os.replace(tmp, out / "labels.json")
    return labels


def _write_study(
    out: Path,
    maps: TissueMaps,
    subject: SubjectAnatomy,
    rng: np.random.Generator,
    *,
    seed: int,
    index: int,
    contrasts: tuple[str, ...],
    with_localizer: bool,
    matrix_scale: float,
    in_plane_mm: tuple[float, float],
    slice_mm: tuple[float, float],
    max_oblique_deg: float,
    noise_fraction: float,
    bias_strength: float,
) -> dict[str, Any]:
    number = index + 1
    study_folder = Path("dicom") / f"ST{number:03d}"
    study_uid = _uid(seed, index, "study")
    frame_uid = _uid(seed, index, "frame-of-reference")
    date = _dt.date(2024, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365)))
    start = _dt.datetime.combine(date, _dt.time(7, 0)) + _dt.timedelta(
        minutes=int(rng.integers(0, 11 * 60)))
    age = int(rng.integers(20, 86))
    sex = "F" if rng.random() < 0.5 else "M"
    identity = dict(
        patient_id=f"SYN{seed}-{number:03d}",
        patient_name=f"SYNTHETIC^SUBJECT{number:03d}",
        study_uid=study_uid,
        frame_of_reference_uid=frame_uid,
    )
    study_attributes = dict(
        study_date=date.strftime("%Y%m%d"), study_time=start.strftime("%H%M%S"),
        study_id=str(number), accession_number=f"A{seed % 10**6:06d}{number:05d}",
        patient_birth_date=f"{date.year - age:04d}0101", patient_sex=sex,
        patient_age=f"{age:03d}Y", magnetic_field_strength=float(rng.choice([1.5, 3.0])),
    )

    order = [contrasts[i] for i in rng.permutation(len(contrasts))]
    series_records: list[dict[str, Any]] = []
    distractors: list[dict[str, Any]] = []
    series_number = 0
    if with_localizer:
        series_number += 1
        uid = _uid(seed, index, "series", "localizer")
        folder = study_folder / f"SE{series_number:02d}"
        planes = _localizer_planes(maps, subject, _series_rng(seed, index, series_number),
                                   matrix_scale)
        write_localizer(planes, out / folder, series_uid=uid, series_number=series_number,
                        series_time=start.strftime("%H%M%S"), **identity, **study_attributes)
        distractors.append({"kind": "localizer", "series_instance_uid": uid,
                            "series_number": series_number, "folder": folder.as_posix(),
                            "n_files": len(planes)})

    template_images = {
        contrast: synthesize_contrast(
            maps, contrast, {k: subject.intensities[contrast][k] for k in ("csf", "gm", "wm")})
        for contrast in order
    }
    for contrast in order:
        series_number += 1
        weights = _ORIENTATION_WEIGHTS[contrast]
        orientation = str(rng.choice(list(weights), p=list(weights.values())))
        pixel = float(rng.uniform(*in_plane_mm))
        spacing = np.array([pixel, pixel, float(rng.uniform(*slice_mm))]) / matrix_scale
        grid = acquisition_grid(maps, subject, orientation=orientation, spacing=spacing, rng=rng,
                                max_oblique_deg=max_oblique_deg,
                                max_extra_voxels=max(0, int(round(12 * matrix_scale))))
        rendered = render_series(
            maps, subject, grid, contrast, _series_rng(seed, index, series_number),
            noise_fraction=noise_fraction,
            bias_strength=bias_strength, gain=float(rng.uniform(600.0, 1400.0)),
            template_image=template_images[contrast],
        )
        protocol = _protocol(contrast, orientation, rng)
        uid = _uid(seed, index, "series", contrast)
        folder = study_folder / f"SE{series_number:02d}"
        series_time = (start + _dt.timedelta(minutes=4 * series_number)).strftime("%H%M%S")
        files = write_series(
            rendered.image, grid.origin, grid.spacing, grid.direction, out / folder,
            series_uid=uid, series_number=series_number, series_time=series_time,
            **identity, **study_attributes, **protocol,
        )
        truth = {
            "lesion": f"truth/{uid}_lesion.nii.gz",
            "brain": f"truth/{uid}_brain.nii.gz",
        }
        write_mask_nifti(rendered.lesion, grid.origin, grid.spacing, grid.direction,
                         out / truth["lesion"])
        write_mask_nifti(rendered.brain, grid.origin, grid.spacing, grid.direction,
                         out / truth["brain"])
        lesion_voxels = int(rendered.lesion.sum())
        series_records.append({
            "series_instance_uid": uid,
            "series_number": series_number,
            "series_description": protocol["series_description"],
            "contrast": contrast,
            "orientation": orientation,
            "folder": folder.as_posix(),
            "n_files": len(files),
            "shape_zyx": list(grid.shape_zyx),
            "spacing_xyz_mm": [round(float(v), 6) for v in grid.spacing],
            "echo_time_ms": protocol["echo_time"],
            "repetition_time_ms": protocol["repetition_time"],
            "has_lesion": lesion_voxels > 0,
            "lesion_voxels": lesion_voxels,
            "lesion_volume_ml": round(lesion_voxels * grid.voxel_volume_ml, 4),
            "brain_volume_ml": round(int(rendered.brain.sum()) * grid.voxel_volume_ml, 2),
            "truth": truth,
        })

    volumes = [s["lesion_volume_ml"] for s in series_records]
    return {
        "patient_id": identity["patient_id"],
        "patient_name": identity["patient_name"],
        "study_instance_uid": study_uid,
        "frame_of_reference_uid": frame_uid,
        "folder": study_folder.as_posix(),
        "study_date": study_attributes["study_date"],
        # A study has a lesion when one was placed; each series says whether its grid caught it.
        "has_lesion": subject.has_lesion,
        # Mean over the series: each grid measures the same lesion with its own partial volumes.
        "lesion_volume_ml": round(float(np.mean(volumes)), 4) if volumes else 0.0,
        "lesions": [
            {"centre_template_lps_mm": [round(float(v), 3) for v in item.centre_lps],
             "semi_axes_mm": [round(float(v), 3) for v in item.semi_axes_mm]}
            for item in subject.lesions
        ],
        "series": series_records,
        "distractors": distractors,
    }
