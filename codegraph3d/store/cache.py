"""Token cache: the encoder's output per series on disk, so that rescoring costs seconds.

Encoding (preprocessing plus the 2D encoder on 3 x 224 slices) is the whole cost of a run; the
projection, the choice of views and layers, and scoring are cheap. The cache therefore stores what
:func:`codegraph3d.features.tokens.encode_volume` returns (pooled, normalised, *unprojected* features of the
kept cubes, their coordinates and brain fractions) plus what mapping scores back needs (the
working-grid brain mask and the :class:`~codegraph3d.preprocess.chain.PreprocessedVolume` geometry) and
the series' SOP Instance UIDs in z order (to read the headers a DICOM-SEG references without
reading pixels).

Layout::

    <folder>/<settings id>/<SeriesInstanceUID>.npz    the arrays (float32 features, packed mask)
    <folder>/<settings id>/<SeriesInstanceUID>.json   key material, key, SHA-256 of the .npz bytes

The *settings id* (16 hex digits) digests everything but the series: preprocessing, token grid and
brain-fraction rule, the encoder's identity (name, weights SHA-256, layers, patch size, width,
normalisation, description) and :data:`CACHE_FORMAT_VERSION`; runs with other such settings use
other folders and never see each other's entries. The entry *key* digests the settings, the series
UID and the sorted SOP Instance UIDs found by the header scan (a series that gained or lost files
is a different entry). Projection size and seed, views, layer subsets and every scoring setting
apply after the cache and are not part of the key.

Both files are written atomically, the ``.npz`` first. An entry is used only when its sidecar's
key equals the requested key and the ``.npz`` bytes hash to the recorded SHA-256; anything else (a
truncated or corrupt file, a sidecar of another entry, arrays that do not fit the settings) is
logged with the file and the reason and rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from codegraph3d.core.files import atomic_path, write_json_atomic
from codegraph3d.features.encoders import SliceEncoder
from codegraph3d.io.dicom import SeriesHeader
from codegraph3d.io.selection import is_valid_uid
from codegraph3d.preprocess.chain import PreprocessedVolume
from codegraph3d.features.tokens import EncodedVolume

__all__ = [
    "canonical_json",
    "TokenRecipe",
    "CACHE_FORMAT",
    "CACHE_FORMAT_VERSION",
    "CacheEntryError",
    "CacheLookup",
    "CachedSeries",
    "TokenCache",
    "encoder_material",
    "cache_key",
    "key_material",
    "read_entry",
    "read_source_headers",
    "settings_id",
    "settings_material",
]

logger = logging.getLogger(__name__)

#: Bump when what is stored, or how tokens are computed before projection, changes.
CACHE_FORMAT_VERSION = 1
CACHE_FORMAT = f"codegraph3d.token-cache/{CACHE_FORMAT_VERSION}"
_ENCODER_KEYS = ("name", "pretrained", "weights_sha256", "description", "layers", "patch_size", "dim", "normalisation")
_ARRAYS = (
    "features", "coords", "brain_fraction", "layer_names", "mask_packed", "mask_shape", "grid_origin",
    "grid_spacing", "grid_to_source", "source_shape_zyx", "source_origin", "source_spacing",
    "source_direction", "brain_volume_ml", "sop_instance_uids", "files", "skipped_files",
)


class CacheEntryError(ValueError):
    """A cache entry that cannot be used; the message names the file and why."""


@dataclass
class CachedSeries:
    """One cache entry in memory.

    Attributes
    ----------
    encoded : EncodedVolume
        The unprojected features; :func:`codegraph3d.features.tokens.project` turns them into tokens.
    prepared : PreprocessedVolume
        Geometry and working-grid brain mask; ``image`` is empty (pixels are not cached).
    sop_instance_uids : list of str
        SOP Instance UIDs of the loaded slices, in the volume's z order.
    files : list of str
        The file of each of those slices when the entry was built (informative: headers are read
        from the current scan's files, matched by SOP Instance UID).
    skipped_files : list of (str, str)
        Files of the series left out when loading (unreadable pixels) and why.
    series : dict
        ``study_instance_uid``, ``patient_id``, ``series_description``, ``contrast`` as the
        selector saw them (not part of the key).
    """

    encoded: EncodedVolume
    prepared: PreprocessedVolume
    sop_instance_uids: list[str]
    files: list[str]
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)


@dataclass
class CacheLookup:
    """Outcome of :meth:`TokenCache.load`: ``hit`` (``entry`` set), ``miss``, or ``invalid`` (``reason``)."""

    status: Literal["hit", "miss", "invalid"]
    entry: CachedSeries | None = None
    reason: str = ""


def canonical_json(payload: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): what settings ids and keys hash."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class TokenRecipe:
    """The settings that turn a series into tokens: what a cached or banked series is comparable by.

    Attributes
    ----------
    preprocess : mapping
        The preprocessing settings as the configuration records them (``preprocess`` without
        ``workers``, which spreads a run over processes and does not change what a series becomes).
        Kept as recorded, not as :class:`~codegraph3d.preprocess.chain.PreprocessConfig`: the
        identities hash these exact values, so caches and banks made before stay valid.
    grid_size, min_brain_fraction
        The token grid and the brain-fraction rule (``tokens.*``).
    projection_dim, projection_seed
        The seeded projection after the cache (``tokens.*``; part of the bank's identity only).
    """

    preprocess: Mapping[str, Any]
    grid_size: int
    min_brain_fraction: float
    projection_dim: int
    projection_seed: int


def encoder_material(encoder: SliceEncoder | Mapping[str, Any]) -> dict[str, Any]:
    """The part of an encoder's identity that the cached arrays depend on (the settings' ``encoder``).

    Raises
    ------
    ValueError
        When a mapping lacks one of the identity's keys.
    """
    identity = encoder.identity() if isinstance(encoder, SliceEncoder) else dict(encoder)
    missing = [key for key in _ENCODER_KEYS if key not in identity]
    if missing:
        raise ValueError(f"encoder identity lacks {missing}; pass a SliceEncoder or its identity()")
    return {key: identity[key] for key in _ENCODER_KEYS}


def settings_material(
    recipe: TokenRecipe,
    encoder: SliceEncoder | Mapping[str, Any],
    landmarks: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What, besides the series, determines the cached arrays.

    Parameters
    ----------
    recipe : TokenRecipe
        The preprocessing and token settings.
    encoder : SliceEncoder or mapping
        The encoder, or its :meth:`~codegraph3d.features.encoders.SliceEncoder.identity`.
    landmarks : mapping, optional
        The Nyul reference landmarks in effect per contrast (they may come from the model folder,
        so the configuration alone does not fix them).
    """
    return {
        "format": CACHE_FORMAT_VERSION,
        "preprocess": {key: value for key, value in recipe.preprocess.items() if key != "workers"},
        "tokens": {"grid_size": recipe.grid_size, "min_brain_fraction": recipe.min_brain_fraction},
        "encoder": encoder_material(encoder),
        # The references' values and percentiles, not their "source" text: that names files as
        # they were written (relative or absolute) and commands, which change nothing cached.
        **({"landmarks": _landmark_values(landmarks)} if landmarks else {}),
    }


def _landmark_values(landmarks: Mapping[str, Any]) -> dict[str, Any]:
    """Each contrast's reference landmarks without the descriptive ``source`` (as the bank keeps them)."""
    return {
        contrast: {key: value for key, value in item.items() if key != "source"} if isinstance(item, Mapping) else item
        for contrast, item in landmarks.items()
    }


def key_material(
    series_instance_uid: str,
    sop_instance_uids: Sequence[str],
    recipe: TokenRecipe,
    encoder: SliceEncoder | Mapping[str, Any],
    landmarks: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The full key material of one series' entry (see the module docstring).

    Parameters
    ----------
    series_instance_uid : str
        The series.
    sop_instance_uids : sequence of str
        SOP Instance UIDs of every file the header scan found for the series (any order).
    recipe, encoder, landmarks
        As in :func:`settings_material`.
    """
    if not is_valid_uid(series_instance_uid):
        # The UID names the entry's files: a hostile UID must never become a path.
        raise ValueError(f"SeriesInstanceUID {series_instance_uid!r} is not a valid DICOM UID; it cannot name a cache entry")
    sources = hashlib.sha256("\n".join(sorted(sop_instance_uids)).encode("utf-8")).hexdigest()
    return {
        "series_instance_uid": series_instance_uid,
        "source_sop_instance_uids_sha256": sources,
        "settings": settings_material(recipe, encoder, landmarks),
    }


def cache_key(material: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of the key material."""
    return hashlib.sha256(canonical_json(material)).hexdigest()


def settings_id(material: Mapping[str, Any]) -> str:
    """Folder name of the settings: 16 hex digits of the SHA-256 of ``material['settings']``."""
    return hashlib.sha256(canonical_json(material["settings"])).hexdigest()[:16]


def _pack_arrays(entry: CachedSeries) -> dict[str, np.ndarray]:
    prepared = entry.prepared
    mask = np.asarray(prepared.brain_mask, dtype=bool)
    skipped = np.array([[str(p), str(r)] for p, r in entry.skipped_files], dtype=str).reshape(-1, 2)
    return {
        "features": np.ascontiguousarray(entry.encoded.features, dtype=np.float32),
        "coords": entry.encoded.coords.astype(np.int32),
        "brain_fraction": np.asarray(entry.encoded.brain_fraction, dtype=np.float64),
        "layer_names": np.array(entry.encoded.layer_names, dtype=str),
        "mask_packed": np.packbits(mask.ravel()),
        "mask_shape": np.array(mask.shape, dtype=np.int64),
        "grid_origin": np.asarray(prepared.grid_origin, dtype=np.float64),
        "grid_spacing": np.array(prepared.grid_spacing, dtype=np.float64),
        "grid_to_source": np.asarray(prepared.grid_to_source, dtype=np.float64),
        "source_shape_zyx": np.array(prepared.source_shape_zyx, dtype=np.int64),
        "source_origin": np.asarray(prepared.source_origin, dtype=np.float64),
        "source_spacing": np.asarray(prepared.source_spacing, dtype=np.float64),
        "source_direction": np.asarray(prepared.source_direction, dtype=np.float64),
        "brain_volume_ml": np.array(prepared.brain_volume_ml, dtype=np.float64),
        "sop_instance_uids": np.array(entry.sop_instance_uids, dtype=str),
        "files": np.array([str(f) for f in entry.files], dtype=str),
        "skipped_files": skipped,
    }


def _expect_shape(npz_path: Path, name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise CacheEntryError(f"{npz_path}: array {name!r} has shape {array.shape}; expected {shape}")


def _unpack_arrays(npz_path: Path, arrays: Mapping[str, np.ndarray], settings: Mapping[str, Any]) -> CachedSeries:
    """Rebuild the entry and check every array against the settings it was keyed with."""
    missing = [name for name in _ARRAYS if name not in arrays]
    if missing:
        raise CacheEntryError(f"{npz_path}: arrays {missing} are missing")
    features = arrays["features"]
    layers, grid, size = _check_token_arrays(npz_path, arrays, settings)
    n = features.shape[2]
    source_shape, sop_uids, files = _check_source_arrays(npz_path, arrays)
    try:
        encoded = EncodedVolume(
            features=np.ascontiguousarray(features),
            coords=arrays["coords"].astype(np.int64),
            grid_shape=(grid,) * 3,
            layer_names=layers,
            brain_fraction=arrays["brain_fraction"].astype(np.float64),
        )
    except ValueError as error:
        raise CacheEntryError(f"{npz_path}: {error}") from error
    coords = encoded.coords
    if n and (coords.min() < 0 or coords.max() >= grid):
        raise CacheEntryError(f"{npz_path}: token coordinates fall outside the {grid}^3 grid")
    mask = np.unpackbits(arrays["mask_packed"], count=size**3).astype(bool).reshape((size,) * 3)
    prepared = PreprocessedVolume(
        image=np.zeros((0, 0, 0), np.float32),
        brain_mask=mask,
        grid_origin=arrays["grid_origin"].astype(np.float64),
        grid_spacing=float(arrays["grid_spacing"]),
        grid_to_source=arrays["grid_to_source"].astype(np.float64),
        source_shape_zyx=source_shape,  # type: ignore[arg-type]
        source_origin=arrays["source_origin"].astype(np.float64),
        source_spacing=arrays["source_spacing"].astype(np.float64),
        source_direction=arrays["source_direction"].astype(np.float64),
        brain_volume_ml=float(arrays["brain_volume_ml"]),
    )
    skipped = [(str(p), str(r)) for p, r in arrays["skipped_files"].tolist()]
    return CachedSeries(encoded=encoded, prepared=prepared, sop_instance_uids=sop_uids, files=files, skipped_files=skipped)


def _check_token_arrays(
    npz_path: Path, arrays: Mapping[str, np.ndarray], settings: Mapping[str, Any]
) -> tuple[list[str], int, int]:
    """Check the token arrays against the encoder and grid of the settings; return the layers, grid and working size."""
    features = arrays["features"]
    encoder = settings["encoder"]
    grid = int(settings["tokens"]["grid_size"])
    size = grid * int(encoder["patch_size"])
    layers = [str(v) for v in arrays["layer_names"].tolist()]
    if layers != list(encoder["layers"]):
        raise CacheEntryError(f"{npz_path}: layers {layers} differ from the encoder's {encoder['layers']}")
    if features.dtype != np.float32 or features.ndim != 4:
        raise CacheEntryError(f"{npz_path}: features are {features.dtype} {features.shape}; expected float32 (L, 3, N, dim)")
    n = features.shape[2]
    _expect_shape(npz_path, "features", features, (len(layers), 3, n, int(encoder["dim"])))
    _expect_shape(npz_path, "coords", arrays["coords"], (n, 3))
    _expect_shape(npz_path, "brain_fraction", arrays["brain_fraction"], (grid,) * 3)
    if tuple(int(v) for v in arrays["mask_shape"]) != (size,) * 3:
        raise CacheEntryError(f"{npz_path}: mask shape {arrays['mask_shape'].tolist()} is not the working grid {(size,) * 3}")
    _expect_shape(npz_path, "mask_packed", arrays["mask_packed"], ((size**3 + 7) // 8,))
    if not np.isfinite(features).all():
        raise CacheEntryError(f"{npz_path}: features contain non-finite values")
    return layers, grid, size


def _check_source_arrays(npz_path: Path, arrays: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], list[str], list[str]]:
    """Check the source geometry, instances and skipped files; return the source shape, SOP UIDs and files."""
    for name, shape in (("grid_origin", (3,)), ("grid_spacing", ()), ("grid_to_source", (4, 4)),
                        ("source_shape_zyx", (3,)), ("source_origin", (3,)), ("source_spacing", (3,)),
                        ("source_direction", (3, 3)), ("brain_volume_ml", ())):
        _expect_shape(npz_path, name, arrays[name], shape)
    source_shape = tuple(int(v) for v in arrays["source_shape_zyx"])
    sop_uids = [str(v) for v in arrays["sop_instance_uids"].tolist()]
    files = [str(v) for v in arrays["files"].tolist()]
    if len(sop_uids) != source_shape[0] or len(files) != source_shape[0]:
        raise CacheEntryError(
            f"{npz_path}: {len(sop_uids)} SOP Instance UIDs and {len(files)} files for {source_shape[0]} source slices"
        )
    if arrays["skipped_files"].ndim != 2 or arrays["skipped_files"].shape[1] != 2:
        raise CacheEntryError(f"{npz_path}: skipped_files has shape {arrays['skipped_files'].shape}; expected (M, 2)")
    return source_shape, sop_uids, files


def read_entry(npz_path: str | os.PathLike, expected_key: str | None = None) -> tuple[dict[str, Any], CachedSeries]:
    """Read and verify one entry; return its sidecar and contents.

    Parameters
    ----------
    npz_path : path-like
        The entry's ``.npz``; the sidecar is the same path with ``.json``.
    expected_key : str, optional
        The key the caller computed; without it the sidecar's key is checked against its own key
        material only (the ablation command, which has no DICOM to compute keys from).

    Raises
    ------
    CacheEntryError
        Naming the file and the reason: missing or unreadable files, a key mismatch, a checksum
        mismatch (truncated or corrupt ``.npz``), arrays that do not fit the settings.
    """
    npz_path = Path(npz_path)
    sidecar_path = npz_path.with_suffix(".json")
    if not npz_path.is_file():
        raise CacheEntryError(f"{npz_path}: no such cache entry")
    if not sidecar_path.is_file():
        raise CacheEntryError(f"{sidecar_path}: the entry's sidecar is missing (interrupted write?)")
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheEntryError(f"{sidecar_path}: unreadable sidecar ({error})") from error
    if not isinstance(sidecar, dict) or sidecar.get("format") != CACHE_FORMAT:
        found = sidecar.get("format") if isinstance(sidecar, dict) else type(sidecar).__name__
        raise CacheEntryError(f"{sidecar_path}: format {found!r} is not {CACHE_FORMAT!r}")
    material = sidecar.get("key_material")
    if not isinstance(material, dict) or "settings" not in material:
        raise CacheEntryError(f"{sidecar_path}: no key material")
    if cache_key(material) != sidecar.get("key"):
        raise CacheEntryError(f"{sidecar_path}: the recorded key does not match its key material (edited sidecar?)")
    if expected_key is not None and sidecar["key"] != expected_key:
        raise CacheEntryError(
            f"{sidecar_path}: key {str(sidecar['key'])[:12]}... is not the requested {expected_key[:12]}... "
            "(entry of another series or source file set)"
        )
    try:
        data = npz_path.read_bytes()
    except OSError as error:
        raise CacheEntryError(f"{npz_path}: unreadable ({error})") from error
    if len(data) != sidecar.get("npz_bytes"):
        raise CacheEntryError(f"{npz_path}: {len(data)} bytes, the sidecar records {sidecar.get('npz_bytes')} (truncated?)")
    if hashlib.sha256(data).hexdigest() != sidecar.get("npz_sha256"):
        raise CacheEntryError(f"{npz_path}: SHA-256 of the file does not match the sidecar (corrupt)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise CacheEntryError(f"{npz_path}: not a readable .npz ({type(error).__name__}: {error})") from error
    entry = _unpack_arrays(npz_path, arrays, material["settings"])
    entry.series = dict(sidecar.get("series") or {})
    return sidecar, entry


def read_source_headers(series: SeriesHeader, sop_instance_uids: Sequence[str]) -> list[Dataset]:
    """Read the headers (no pixels) of a series' slices in the cached z order.

    Files are found in the current header scan by SOP Instance UID, so an input folder that moved
    still matches its entries.

    Raises
    ------
    CacheEntryError
        When a slice is not in the scan or its file does not hold the expected instance.
    """
    by_uid = {s.sop_instance_uid: s.path for s in series.slices}
    datasets = []
    for uid in sop_instance_uids:
        path = by_uid.get(uid)
        if path is None:
            raise CacheEntryError(f"series {series.series_instance_uid}: instance {uid} is not in the input any more")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError, ValueError, AttributeError) as error:
            raise CacheEntryError(f"{path}: header unreadable ({type(error).__name__}: {error})") from error
        if str(ds.get("SOPInstanceUID", "")) != uid:
            raise CacheEntryError(f"{path}: holds instance {ds.get('SOPInstanceUID')!r}, expected {uid}")
        datasets.append(ds)
    return datasets


class TokenCache:
    """A folder of token cache entries (see the module docstring).

    Parameters
    ----------
    folder : path-like
        Created when missing; relative paths are relative to the working directory.

    Raises
    ------
    ValueError
        When the folder cannot be used (a file of that name, no permission).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        path = Path(folder).expanduser().absolute()
        if path.exists() and not path.is_dir():
            raise ValueError(f"cache.folder {path} is a file; point cache.folder at a folder (or '' to turn the cache off)")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cache.folder {path} cannot be created ({error}); choose a writable folder") from error
        self.folder = path

    def paths(self, material: Mapping[str, Any]) -> tuple[Path, Path]:
        """The ``.npz`` and sidecar paths of the entry for ``material``."""
        # Not with_suffix: a UID's dots would be taken for a suffix.
        folder, uid = self.folder / settings_id(material), material["series_instance_uid"]
        return folder / f"{uid}.npz", folder / f"{uid}.json"

    def load(self, material: Mapping[str, Any]) -> CacheLookup:
        """Look up the entry of ``material``; a bad entry is logged and reported as ``invalid``."""
        npz_path, sidecar_path = self.paths(material)
        if not npz_path.exists() and not sidecar_path.exists():
            return CacheLookup("miss")
        try:
            _, entry = read_entry(npz_path, cache_key(material))
        except CacheEntryError as error:
            logger.warning("token cache entry not used, rebuilding it: %s", error)
            return CacheLookup("invalid", reason=str(error))
        return CacheLookup("hit", entry=entry)

    def store(self, material: Mapping[str, Any], entry: CachedSeries, build_seconds: float | None = None) -> Path:
        """Write the entry of ``material`` atomically (``.npz`` first, then the sidecar); return the ``.npz`` path."""
        npz_path, sidecar_path = self.paths(material)
        buffer = io.BytesIO()
        np.savez(buffer, **_pack_arrays(entry))
        data = buffer.getvalue()
        with atomic_path(npz_path) as temporary:
            temporary.write_bytes(data)
        write_json_atomic(sidecar_path, {
            "format": CACHE_FORMAT,
            "key": cache_key(material),
            "npz_sha256": hashlib.sha256(data).hexdigest(),
            "npz_bytes": len(data),
            "series": dict(entry.series),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": None if build_seconds is None else round(float(build_seconds), 2),
            "key_material": material,
        })
        return npz_path
