"""Nyul histogram standardisation of brain intensities with per-contrast reference landmarks.

Method (Nyul & Udupa 1999; Nyul, Udupa & Zhang 2000). Each volume's landmarks are percentiles of
its brain (foreground) histogram, ``landmark_percentiles`` (by default p1, p10, p20, ..., p90,
p99). They are mapped piecewise linearly onto the *reference landmarks* of the contrast, so the
same tissue lands at the same standardised value whatever the scanner gain, offset or a monotone
distortion of the intensity scale. Values below the first landmark go to 0 and above the last to
1 (the reference is scaled so that its first landmark is 0 and its last 1).

Training (:func:`learn_reference`): each training scan's landmarks are mapped linearly so that
its first and last landmark span [s1, s2] = [0, 1]; the reference is the mean of the mapped
landmarks. Tissues that take a larger share of the intensity range in normal scans keep it, which
a uniform reference (equally spaced values) does not preserve.

Where the references come from (:func:`load_reference_landmarks`):

1. ``<model folder>/landmarks/reference_landmarks.json``, written by
   ``codegraph3d landmarks learn`` from a site's own normal studies;
2. the package's ``reference_landmarks.json``: T1w learnt from the MNI152 2009c T1 brain template
   that nilearn ships (``codegraph3d landmarks template``; the template is the average
   of 152 normal T1 scans, so its histogram is a normal T1w histogram);
3. otherwise the uniform reference (equally spaced values), with its ``source`` saying so.

T2w and FLAIR have no template here, hence no shipped reference, and use the uniform reference.
That is sound for batch scoring, which compares volumes of one contrast with each other: what
matters is that every volume of a batch is mapped onto the *same* reference, and the uniform
reference does that (it equalises the histogram at the landmarks). A learnt reference keeps the
relative spacing of tissues more natural; a site can learn its own T2w and FLAIR references from
normal studies with the ``learn`` command. Contrast-enhanced T1 (``T1w-CE``) also falls back to
the uniform reference: enhancement changes the histogram, so the T1w template does not describe it.

Why not a library: torchio's ``HistogramStandardization`` (1.2.1) fixes its own landmark set
(cut-offs, quartiles, deciles) and a [0, 100] scale, works on torch tensors and would add seven
packages (deprecated, einops, humanize, jaxtyping, ...); ``intensity-normalization`` (3.0.1) adds
scikit-fuzzy and its ``interp1d`` mapping breaks on tied landmarks. The method is a few lines of
numpy, written and tested here.

Command line: ``codegraph3d landmarks {template,learn,show}`` (:mod:`codegraph3d.cli.landmarks`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from codegraph3d.core.files import write_json_atomic

__all__ = [
    "SCHEMA",
    "DEFAULT_PERCENTILES",
    "LANDMARKS_FOLDER",
    "LANDMARKS_FILE",
    "PACKAGE_LANDMARKS",
    "ReferenceLandmarks",
    "volume_landmarks",
    "learn_reference",
    "standardise",
    "uniform_reference",
    "load_reference_landmarks",
    "read_landmarks_file",
    "merge_landmarks_file",
    "template_reference",
]

SCHEMA = "codegraph3d.landmarks/1"
#: The configured default (``preprocess.landmark_percentiles`` in default_config.yaml).
DEFAULT_PERCENTILES: tuple[float, ...] = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
LANDMARKS_FOLDER = "landmarks"
LANDMARKS_FILE = "reference_landmarks.json"
PACKAGE_LANDMARKS = Path(__file__).with_name(LANDMARKS_FILE)
#: Contrasts that ``show`` always lists (those the series selection can name, except "other").
KNOWN_CONTRASTS: tuple[str, ...] = ("T1w", "T1w-CE", "T2w", "FLAIR")
# nilearn's brain-mask rule for the MNI152 template (load_mni152_brain_mask): intensity > 0.2 x max.
_TEMPLATE_MASK_FRACTION = 0.2
# Percentile lists are equal when they agree to this (they are written as decimal JSON numbers).
_PERCENTILE_ATOL = 1e-9


def _check_percentiles(percentiles: Any, what: str) -> np.ndarray:
    """Return ``percentiles`` as a float array after checking: >= 2 values, increasing, in [0, 100]."""
    marks = np.asarray(percentiles, dtype=float)
    if marks.ndim != 1 or marks.size < 2 or not np.all(np.isfinite(marks)):
        raise ValueError(f"{what} must be at least two finite numbers; got {percentiles!r}")
    if np.any(np.diff(marks) <= 0) or marks[0] < 0 or marks[-1] > 100:
        raise ValueError(f"{what} must be strictly increasing values in [0, 100]; got {marks.tolist()}")
    return marks


def _same_percentiles(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and bool(np.allclose(a, b, rtol=0.0, atol=_PERCENTILE_ATOL))


@dataclass(frozen=True)
class ReferenceLandmarks:
    """The standard scale of one contrast: where each landmark percentile goes in [0, 1].

    Attributes
    ----------
    contrast : str
        Contrast name as the series selection writes it (``T1w``, ``T2w``, ``FLAIR``, ...).
    percentiles : tuple of float
        Landmark percentiles of the brain histogram, strictly increasing, in [0, 100].
    values : tuple of float
        Standardised value of each landmark, strictly increasing, first 0 and last 1.
    source : str
        Where the values come from, human-readable (printed by ``show``, kept in QA records).
    """

    contrast: str
    percentiles: tuple[float, ...]
    values: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.contrast, str) or not self.contrast.strip():
            raise ValueError(f"reference landmarks need a contrast name; got {self.contrast!r}")
        marks = _check_percentiles(self.percentiles, f"reference landmarks of {self.contrast}: percentiles")
        values = np.asarray(self.values, dtype=float)
        if values.ndim != 1 or values.size != marks.size:
            raise ValueError(
                f"reference landmarks of {self.contrast}: {values.size} values for {marks.size} percentiles; "
                "there must be one value per percentile"
            )
        if not np.all(np.isfinite(values)) or np.any(np.diff(values) <= 0):
            raise ValueError(
                f"reference landmarks of {self.contrast}: values must be finite and strictly increasing; "
                f"got {values.tolist()}"
            )
        if abs(values[0]) > 1e-9 or abs(values[-1] - 1.0) > 1e-9:
            raise ValueError(
                f"reference landmarks of {self.contrast}: the first value must be 0 and the last 1 "
                f"(the standard scale is [0, 1]); got {values[0]!r} and {values[-1]!r}"
            )
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"reference landmarks of {self.contrast}: source must say where they come from")
        # Frozen: normalise through object.__setattr__ so that equal inputs compare equal.
        object.__setattr__(self, "percentiles", tuple(float(v) for v in marks))
        object.__setattr__(self, "values", tuple(float(v) for v in values))

    @property
    def is_uniform(self) -> bool:
        """True when the values are equally spaced (no learnt reference)."""
        return bool(np.allclose(self.values, np.linspace(0.0, 1.0, len(self.values)), rtol=0.0, atol=1e-12))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the entry of one contrast in a landmarks file)."""
        return {
            "contrast": self.contrast,
            "percentiles": list(self.percentiles),
            "values": list(self.values),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReferenceLandmarks":
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming missing or unknown keys."""
        if not isinstance(d, dict):
            raise ValueError(f"reference landmarks must be a JSON object; got {type(d).__name__}")
        expected = {"contrast", "percentiles", "values", "source"}
        missing, unknown = expected - set(d), set(d) - expected
        if missing or unknown:
            raise ValueError(
                f"reference landmarks entry: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; "
                f"expected exactly {sorted(expected)}"
            )
        return cls(
            contrast=d["contrast"],
            percentiles=tuple(d["percentiles"]),
            values=tuple(d["values"]),
            source=d["source"],
        )


def uniform_reference(contrast: str, percentiles: Sequence[float]) -> ReferenceLandmarks:
    """The reference with equally spaced values: it equalises the histogram at the landmarks."""
    marks = _check_percentiles(percentiles, "landmark percentiles")
    return ReferenceLandmarks(
        contrast=contrast,
        percentiles=tuple(marks),
        values=tuple(np.linspace(0.0, 1.0, marks.size)),
        source="uniform reference (equally spaced values)",
    )


def volume_landmarks(image: np.ndarray, mask: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """Percentiles of the intensities of ``image`` inside ``mask``.

    Parameters
    ----------
    image : numpy.ndarray
        Intensities, any shape.
    mask : numpy.ndarray
        Foreground (brain) mask of the same shape; non-zero is inside.
    percentiles : sequence of float
        Strictly increasing, in [0, 100].

    Returns
    -------
    numpy.ndarray
        float64, one landmark per percentile, non-decreasing (ties where the histogram is flat).
    """
    marks = _check_percentiles(percentiles, "landmark percentiles")
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.shape != mask.shape:
        raise ValueError(f"image shape {image.shape} and mask shape {mask.shape} differ; the mask must match")
    values = image[mask.astype(bool)]
    if values.size == 0:
        raise ValueError("the mask is empty: no foreground voxel to take the landmarks from")
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"the image holds {int((~np.isfinite(values)).sum())} non-finite values inside the mask; "
            "fix the input (NaN/inf intensities)"
        )
    return np.percentile(values.astype(np.float64, copy=False), marks)


def learn_reference(
    landmark_sets: Sequence[np.ndarray], percentiles: Sequence[float], *, contrast: str, source: str
) -> ReferenceLandmarks:
    """Nyul training: the mean of the training scans' landmarks, each mapped linearly onto [0, 1].

    Parameters
    ----------
    landmark_sets : sequence of numpy.ndarray
        One :func:`volume_landmarks` result per training scan (normal scans of one contrast).
    percentiles : sequence of float
        The percentiles the landmarks were taken at.
    contrast, source : str
        Stored in the result.

    Raises
    ------
    ValueError
        For no scans, a set of the wrong length, a decreasing set, a scan whose first and last
        landmark coincide (a constant brain cannot be scaled), or a mean with tied landmarks.
    """
    marks = _check_percentiles(percentiles, "landmark percentiles")
    if len(landmark_sets) == 0:
        raise ValueError(f"learning the {contrast} reference needs at least one training scan; got none")
    mapped = []
    for number, landmarks in enumerate(landmark_sets):
        landmarks = np.asarray(landmarks, dtype=float)
        if landmarks.shape != marks.shape or not np.all(np.isfinite(landmarks)):
            raise ValueError(
                f"training scan {number}: expected {marks.size} finite landmarks (one per percentile "
                f"{marks.tolist()}); got {landmarks.tolist()}"
            )
        if np.any(np.diff(landmarks) < 0):
            raise ValueError(f"training scan {number}: landmarks must be non-decreasing; got {landmarks.tolist()}")
        span = landmarks[-1] - landmarks[0]
        if not span > 0:
            raise ValueError(
                f"training scan {number}: its p{marks[0]:g} and p{marks[-1]:g} are equal ({landmarks[0]!r}), "
                "so it cannot be scaled; leave this scan (blank or constant brain) out of the training set"
            )
        mapped.append((landmarks - landmarks[0]) / span)
    values = np.mean(mapped, axis=0)
    # Exact ends: the mapping makes them 0 and 1 up to rounding.
    values[0], values[-1] = 0.0, 1.0
    if np.any(np.diff(values) <= 0):
        tied = [f"p{marks[i]:g}=p{marks[i + 1]:g}" for i in np.flatnonzero(np.diff(values) <= 0)]
        raise ValueError(
            f"the learnt {contrast} reference has tied landmarks ({', '.join(tied)}): every training scan "
            "has a flat histogram there; use fewer landmark percentiles or other training scans"
        )
    return ReferenceLandmarks(contrast=contrast, percentiles=tuple(marks), values=tuple(values), source=source)


def standardise(
    image: np.ndarray,
    mask: np.ndarray,
    reference: ReferenceLandmarks,
    *,
    landmark_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Map the intensities inside ``mask`` onto ``reference``: piecewise linear between landmarks.

    The volume's landmark at ``reference.percentiles[i]`` goes to ``reference.values[i]``;
    intensities below the first landmark go to 0, above the last to 1.

    Tied landmarks (a flat stretch of the histogram, e.g. many voxels of one value): if landmarks
    ``i..j`` share one intensity, that intensity holds the percentiles ``i..j`` of the brain, so it
    maps to the middle of ``values[i]..values[j]``; intensities just below it follow the segment
    ending at ``values[i]`` and just above it the segment starting at ``values[j]``. A constant
    brain maps to 0.5.

    Parameters
    ----------
    image : numpy.ndarray
        Intensities, any shape.
    mask : numpy.ndarray
        Foreground (brain) mask of the same shape; the landmarks are taken inside it.
    reference : ReferenceLandmarks
        The contrast's standard scale.
    landmark_mask : numpy.ndarray, optional
        Where the landmarks are measured (default ``mask``): the same anatomical region in every
        volume keeps masks of different extent (with or without the CSF around the brain) from
        shifting the landmarks.

    Returns
    -------
    numpy.ndarray
        float32 of the image's shape, in [0, 1] inside the mask and 0 outside.
    """
    if not isinstance(reference, ReferenceLandmarks):
        raise TypeError(f"reference must be ReferenceLandmarks; got {type(reference).__name__}")
    if landmark_mask is not None and np.shape(landmark_mask) != np.shape(image):
        raise ValueError(f"landmark_mask shape {np.shape(landmark_mask)} differs from the image's {np.shape(image)}")
    landmarks = volume_landmarks(image, mask if landmark_mask is None else landmark_mask, reference.percentiles)
    reference_values = np.asarray(reference.values)
    # Collapse each run of equal landmarks into one knot carrying the value where the run starts
    # (reached from below), where it ends (left from above), and its middle (at the knot itself).
    knots, starts = np.unique(landmarks, return_index=True)
    ends = np.r_[starts[1:], landmarks.size] - 1
    below, above = reference_values[starts], reference_values[ends]
    at_knot = 0.5 * (below + above)

    inside = np.asarray(mask).astype(bool)
    values = np.asarray(image)[inside].astype(np.float64, copy=False)
    segment = np.searchsorted(knots, values, side="right") - 1  # knots[k] <= v < knots[k + 1]
    mapped = np.where(segment < 0, 0.0, 1.0)  # clip outside the first and last landmark
    between = (segment >= 0) & (segment < knots.size - 1)
    if np.any(between):
        k = segment[between]
        t = (values[between] - knots[k]) / (knots[k + 1] - knots[k])
        mapped[between] = above[k] + t * (below[k + 1] - above[k])
    on_knot = segment >= 0
    on_knot[on_knot] = values[on_knot] == knots[segment[on_knot]]
    mapped[on_knot] = at_knot[segment[on_knot]]

    result = np.zeros(np.shape(image), dtype=np.float32)
    result[inside] = np.clip(mapped, 0.0, 1.0)
    return result


# --------------------------------------------------------------------------------------------
# landmark files


def read_landmarks_file(path: str | Path) -> dict[str, ReferenceLandmarks]:
    """Read a landmarks JSON file: ``{"schema": SCHEMA, "contrasts": {name: entry}}``.

    Raises
    ------
    ValueError
        Naming the file, for invalid JSON, another schema, or an invalid entry.
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not valid JSON ({error}); regenerate it with python -m codegraph3d landmarks"
        ) from None
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA:
        found = payload.get("schema") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: unknown landmarks schema {found!r}; expected {SCHEMA!r}")
    contrasts = payload.get("contrasts")
    if not isinstance(contrasts, dict):
        raise ValueError(f"{path}: 'contrasts' must be an object mapping contrast names to landmarks")
    references = {}
    for name, entry in contrasts.items():
        try:
            reference = ReferenceLandmarks.from_dict(entry)
        except ValueError as error:
            raise ValueError(f"{path}: contrast {name!r}: {error}") from None
        if reference.contrast != name:
            raise ValueError(f"{path}: the entry under {name!r} is for contrast {reference.contrast!r}")
        references[name] = reference
    return references


def merge_landmarks_file(path: str | Path, reference: ReferenceLandmarks) -> Path:
    """Write ``reference`` into the landmarks file ``path`` (replacing its contrast), atomically."""
    path = Path(path)
    existing = read_landmarks_file(path) if path.is_file() else {}
    existing[reference.contrast] = reference
    payload = {"schema": SCHEMA, "contrasts": {name: ref.to_dict() for name, ref in existing.items()}}
    return write_json_atomic(path, payload)


def model_landmarks_path(model_path: str | Path) -> Path:
    """Where ``learn`` writes a model folder's references."""
    return Path(model_path) / LANDMARKS_FOLDER / LANDMARKS_FILE


def load_reference_landmarks(
    contrast: str, model_path: str | Path | None = None, percentiles: Sequence[float] | None = None
) -> ReferenceLandmarks:
    """The reference in effect for ``contrast``: model folder, else package, else uniform.

    Parameters
    ----------
    contrast : str
        Contrast name.
    model_path : path-like, optional
        Model folder; its ``landmarks/reference_landmarks.json`` wins over the package's file.
    percentiles : sequence of float, optional
        The configured ``landmark_percentiles`` (default :data:`DEFAULT_PERCENTILES`); the found
        reference must have been computed at exactly these.

    Raises
    ------
    ValueError
        When the reference found was computed at other percentiles (naming both lists and how to
        recompute it), or a landmarks file is invalid.
    """
    marks = _check_percentiles(DEFAULT_PERCENTILES if percentiles is None else percentiles, "landmark percentiles")
    candidates = []
    if model_path is not None:
        candidates.append(model_landmarks_path(model_path))
    candidates.append(PACKAGE_LANDMARKS)
    searched = []
    for path in candidates:
        if not path.is_file():
            searched.append(f"{path} (absent)")
            continue
        searched.append(str(path))
        references = read_landmarks_file(path)
        if contrast not in references:
            continue
        reference = references[contrast]
        if not _same_percentiles(reference.percentiles, marks):
            listed = " ".join(f"{m:g}" for m in marks)
            command = (
                f"python -m codegraph3d landmarks template MODEL_FOLDER --percentiles {listed}"
                if contrast == "T1w"
                else f"python -m codegraph3d landmarks learn --contrast {contrast} --percentiles {listed} "
                "--output MODEL_FOLDER ..."
            )
            raise ValueError(
                f"{path}: the {contrast} reference landmarks were computed at percentiles "
                f"{list(reference.percentiles)} but preprocess.landmark_percentiles is {marks.tolist()}; "
                f"set landmark_percentiles back, or recompute the reference into the model folder with '{command}'"
            )
        return reference
    return replace(
        uniform_reference(contrast, marks),
        source=(
            f"uniform reference (equally spaced values): no {contrast} landmarks in {'; '.join(searched)}; "
            f"learn them from normal studies with 'python -m codegraph3d landmarks learn --contrast {contrast}'"
        ),
    )


# --------------------------------------------------------------------------------------------
# sources of training intensities


def template_reference(percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> ReferenceLandmarks:
    """T1w reference from the MNI152 2009c T1 brain template that nilearn ships.

    The brain mask is nilearn's rule for this template, intensity > 0.2 x max. The preprocessing's
    intensity mask of the same image (threshold, largest component, holes filled) holds 0.2 % more
    voxels (dark CSF) and would move the reference values by at most 0.016.
    """
    import importlib.metadata

    import nibabel as nib

    from codegraph3d.preprocess.registration import TEMPLATE_FILE, nilearn_template

    path = nilearn_template()
    array = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
    mask = array > _TEMPLATE_MASK_FRACTION * float(array.max())
    landmarks = volume_landmarks(array, mask, percentiles)
    version = importlib.metadata.version("nilearn")
    return learn_reference(
        [landmarks],
        percentiles,
        contrast="T1w",
        source=(
            f"MNI152 2009c T1 brain template shipped with nilearn {version} ({TEMPLATE_FILE}), "
            f"brain = intensity > {_TEMPLATE_MASK_FRACTION:g} x max ({int(mask.sum())} voxels)"
        ),
    )
