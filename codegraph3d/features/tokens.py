"""Tokenisation: a preprocessed volume -> per-layer 3D patch tokens from a frozen 2D encoder.

For each of the three axes every slice goes through the encoder; the 2D patch tokens of each
block of ``p`` consecutive slices (``p`` = the encoder's patch size) are averaged, so that each
token describes one ``p x p x p`` cube of the ``(S, S, S)`` volume (``S = grid_size * p``). The
three axes' tokens of a cube are normalised (the encoder's rule), randomly projected and
concatenated. Only cubes that are (almost) entirely brain are kept.

Axis conventions (arrays are ``[z, y, x]``, see :mod:`codegraph3d.core.volume`):

========  ===============  ========================
axis      slices along     2D slice image (rows, columns)
========  ===============  ========================
axial     z                (y, x)
coronal   y                (z, x)
sagittal  x                (z, y)
========  ===============  ========================

Token columns are ``[axial | coronal | sagittal]``, each ``projection_dim`` wide (or the encoder's
``dim`` when that is not larger).

Tokenisation is two steps, so that the expensive one can be cached (:mod:`codegraph3d.store.cache`):
:func:`encode_volume` runs the encoder and keeps the pooled, normalised but *unprojected* features
of every axis and layer (:class:`EncodedVolume`); :func:`project` applies the seeded projection and
picks the views and layers (seconds). :func:`tokenise` is both with every view and layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from codegraph3d.features.encoders import SliceEncoder

__all__ = [
    "AXES",
    "VIEW_LETTERS",
    "EncodedVolume",
    "TokenSet",
    "brain_fraction_grid",
    "encode_volume",
    "parse_views",
    "project",
    "projection_matrix",
    "tokenise",
]

AXES: tuple[str, str, str] = ("axial", "coronal", "sagittal")
#: The paper's short names of the views: A(xial), C(oronal), S(agittal).
VIEW_LETTERS: dict[str, str] = {"A": "axial", "C": "coronal", "S": "sagittal"}


@dataclass
class TokenSet:
    """The kept tokens of one volume, per encoder layer.

    Attributes
    ----------
    tokens : list of numpy.ndarray
        One ``(N, D)`` float32 array per layer (``D = 3 * projection_dim`` for ViTs).
    coords : numpy.ndarray
        ``(N, 3)`` int64 grid indices ``(z, y, x)`` of the kept tokens, in C order of the grid;
        row ``i`` of every layer's tokens describes the cube at ``coords[i]``.
    grid_shape : tuple of int
        ``(grid, grid, grid)``.
    layer_names : list of str
        The encoder's layer names, one per entry of ``tokens``.
    brain_fraction : numpy.ndarray
        ``grid_shape`` float array: the fraction of brain voxels of every cube (kept or not).
    """

    tokens: list[np.ndarray]
    coords: np.ndarray
    grid_shape: tuple[int, int, int]
    layer_names: list[str]
    brain_fraction: np.ndarray

    def __post_init__(self) -> None:
        self.grid_shape = tuple(int(s) for s in self.grid_shape)  # type: ignore[assignment]
        self.coords = np.asarray(self.coords)
        if len(self.grid_shape) != 3:
            raise ValueError(f"grid_shape must have 3 entries; got {self.grid_shape}")
        if self.coords.ndim != 2 or self.coords.shape[1] != 3 or not np.issubdtype(self.coords.dtype, np.integer):
            raise ValueError(f"coords must be an (N, 3) integer array; got {self.coords.dtype} {self.coords.shape}")
        if len(self.tokens) != len(self.layer_names):
            raise ValueError(f"{len(self.tokens)} token arrays for {len(self.layer_names)} layer names")
        n = self.coords.shape[0]
        for name, layer in zip(self.layer_names, self.tokens):
            if layer.ndim != 2 or layer.shape[0] != n:
                raise ValueError(f"layer {name!r} tokens have shape {layer.shape}; expected ({n}, D)")
        if self.brain_fraction.shape != self.grid_shape:
            raise ValueError(
                f"brain_fraction has shape {self.brain_fraction.shape}; expected {self.grid_shape}"
            )
        if n and (self.coords.min() < 0 or np.any(self.coords.max(axis=0) >= np.array(self.grid_shape))):
            raise ValueError(f"coords fall outside the grid {self.grid_shape}")

    @property
    def n_tokens(self) -> int:
        """Number of kept tokens ``N``."""
        return int(self.coords.shape[0])

    @property
    def keep_mask(self) -> np.ndarray:
        """Boolean ``grid_shape`` array, True at the kept tokens."""
        mask = np.zeros(self.grid_shape, dtype=bool)
        mask[tuple(self.coords.T)] = True
        return mask

    def to_grid(self, values: Any) -> np.ndarray:
        """Scatter one value per kept token onto the grid; background (dropped cubes) is 0.

        Parameters
        ----------
        values : array-like
            Shape ``(N,)``, in the order of :attr:`coords`.

        Returns
        -------
        numpy.ndarray
            ``grid_shape``; float (the values' dtype when floating, else float64).
        """
        values = np.asarray(values)
        if values.shape != (self.n_tokens,):
            raise ValueError(f"values must have shape ({self.n_tokens},); got {values.shape}")
        dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.float64
        grid = np.zeros(self.grid_shape, dtype=dtype)
        grid[tuple(self.coords.T)] = values
        return grid


@dataclass
class EncodedVolume:
    """The encoder's view of one volume before projection: what the token cache stores.

    Attributes
    ----------
    features : numpy.ndarray
        ``(L, 3, N, dim)`` float32: per layer and axis (:data:`AXES` order), the patch-aligned
        pooled features of the kept cubes after the encoder's normalisation, not projected.
    coords : numpy.ndarray
        ``(N, 3)`` int64 grid indices ``(z, y, x)`` of the kept cubes, C order of the grid.
    grid_shape : tuple of int
        ``(grid, grid, grid)``.
    layer_names : list of str
        The encoder's layer names, one per entry of the first axis of ``features``.
    brain_fraction : numpy.ndarray
        ``grid_shape`` float64 array: the brain fraction of every cube (kept or not).
    """

    features: np.ndarray
    coords: np.ndarray
    grid_shape: tuple[int, int, int]
    layer_names: list[str]
    brain_fraction: np.ndarray

    def __post_init__(self) -> None:
        self.grid_shape = tuple(int(s) for s in self.grid_shape)  # type: ignore[assignment]
        self.coords = np.asarray(self.coords)
        self.layer_names = [str(name) for name in self.layer_names]
        if self.features.ndim != 4 or self.features.shape[1] != 3:
            raise ValueError(f"features must be (layers, 3, N, dim); got shape {self.features.shape}")
        if self.features.dtype != np.float32:
            raise ValueError(f"features must be float32; got {self.features.dtype}")
        if self.features.shape[0] != len(self.layer_names) or not self.layer_names:
            raise ValueError(
                f"features hold {self.features.shape[0]} layers for {len(self.layer_names)} layer names"
            )
        if len(set(self.layer_names)) != len(self.layer_names):
            raise ValueError(f"layer names must be distinct; got {self.layer_names}")
        if self.coords.shape != (self.features.shape[2], 3) or not np.issubdtype(self.coords.dtype, np.integer):
            raise ValueError(
                f"coords must be an ({self.features.shape[2]}, 3) integer array like the features; "
                f"got {self.coords.dtype} {self.coords.shape}"
            )
        if len(self.grid_shape) != 3 or self.brain_fraction.shape != self.grid_shape:
            raise ValueError(
                f"brain_fraction has shape {self.brain_fraction.shape}; expected the grid {self.grid_shape}"
            )

    @property
    def dim(self) -> int:
        """Feature width per axis (the encoder's ``dim``)."""
        return int(self.features.shape[3])

    @property
    def n_tokens(self) -> int:
        """Number of kept cubes ``N``."""
        return int(self.features.shape[2])


def projection_matrix(dim: int, k: int, seed: int, axis: int) -> np.ndarray:
    """The fixed Gaussian random projection of one axis: ``(dim, k)``, entries ``N(0, 1/k)``.

    One matrix per ``(seed, axis)``, shared by all layers of the same width and by every volume:
    tokens of different volumes are comparable only because they go through the same matrix. The
    generator is numpy's ``default_rng([seed, axis])``, which is the same on every platform.
    """
    for label, value in (("dim", dim), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{label} must be a positive integer; got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"projection seed must be a non-negative integer; got {seed!r}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2; got {axis!r}")
    rng = np.random.default_rng([int(seed), int(axis)])
    return (rng.standard_normal((int(dim), int(k))) / np.sqrt(k)).astype(np.float32)


def brain_fraction_grid(brain_mask: np.ndarray, patch_size: int) -> np.ndarray:
    """Fraction of brain voxels in every ``patch_size^3`` cube of a cubic mask, shape ``(g, g, g)``."""
    size = brain_mask.shape[0]
    g = size // patch_size
    blocks = np.asarray(brain_mask, dtype=np.float32).reshape(g, patch_size, g, patch_size, g, patch_size)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float64)


def _check_inputs(
    image: Any, brain_mask: Any, encoder: SliceEncoder, grid_size: int, projection_dim: int,
    min_brain_fraction: float, batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(encoder, SliceEncoder):
        raise TypeError(f"encoder must be a SliceEncoder; got {type(encoder).__name__}")
    for label, value in (("grid_size", grid_size), ("projection_dim", projection_dim),
                         ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{label} must be a positive integer; got {value!r}")
    if not 0.0 < float(min_brain_fraction) <= 1.0:
        raise ValueError(f"min_brain_fraction must be in (0, 1]; got {min_brain_fraction!r}")
    image = np.asarray(image)
    size = grid_size * encoder.patch_size
    expected = (size, size, size)
    if image.shape != expected:
        raise ValueError(
            f"image has shape {image.shape}; expected {expected} = grid_size {grid_size} x "
            f"patch size {encoder.patch_size} of encoder {encoder.name!r}"
        )
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image must be floating point in [0, 1]; got dtype {image.dtype}")
    image = image.astype(np.float32, copy=False)
    low, high = float(image.min()), float(image.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("image contains NaN or infinite values")
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(f"image values must lie in [0, 1] (preprocessed); found [{low:.4g}, {high:.4g}]")
    mask = np.asarray(brain_mask)
    if mask.shape != expected:
        raise ValueError(f"brain_mask has shape {mask.shape}; expected {expected} like the image")
    if mask.dtype != bool:
        # NIfTI/ITK masks often arrive as uint8: accept 0/1 integers, nothing else
        if not np.issubdtype(mask.dtype, np.integer) or not np.isin(np.unique(mask), (0, 1)).all():
            raise ValueError(f"brain_mask must be boolean (or 0/1 integers); got dtype {mask.dtype}")
        mask = mask.astype(bool)
    return image, mask


def parse_views(views: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise a views selection to axis names in :data:`AXES` order.

    Parameters
    ----------
    views : str or sequence of str
        Axis names (``"axial"``, ...), or the paper's letters as one string (``"A+C"``, ``"CS"``)
        or a sequence (``["A", "S"]``).

    Returns
    -------
    tuple of str
        Distinct axis names, in the order axial, coronal, sagittal (so ``"C+A"`` equals ``"A+C"``).
    """
    if isinstance(views, str):
        items = [part for part in views.replace("+", " ").replace(",", " ").split() if part]
        if len(items) == 1 and items[0] not in AXES and len(items[0]) > 1:
            items = list(items[0])  # "ACS"
    else:
        items = [str(v) for v in views]
    names = []
    for item in items:
        name = VIEW_LETTERS.get(item.upper(), item.lower()) if len(item) == 1 else item.lower()
        if name not in AXES:
            raise ValueError(
                f"unknown view {item!r}; use {', '.join(AXES)} or the letters A, C, S (e.g. 'A+C')"
            )
        if name in names:
            raise ValueError(f"view {name!r} given twice in {views!r}")
        names.append(name)
    if not names:
        raise ValueError("at least one view (axial, coronal, sagittal) must be selected")
    return tuple(axis for axis in AXES if axis in names)


def _check_positive(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{label} must be a positive integer; got {value!r}")


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"projection seed must be a non-negative integer; got {seed!r}")


def _kept_cubes(mask: np.ndarray, patch: int, min_brain_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Each cube's brain fraction and whether it is kept; "empty brain mask" when none is."""
    fraction = brain_fraction_grid(mask, patch)
    # a small tolerance so that 0.9 is not lost to float rounding of 2470/2744
    keep = (fraction >= float(min_brain_fraction) - 1e-9) & (fraction > 0)
    if not keep.any():
        raise ValueError(
            f"empty brain mask: no {patch}^3 cube is at least {min_brain_fraction:.0%} brain "
            f"(largest brain fraction {fraction.max():.2f}, {int(mask.sum())} brain voxels)"
        )
    return fraction, keep


def _checked_normalisations(encoder: SliceEncoder) -> list[str]:
    """The encoder's normalisation per layer, each ``"l2"`` or ``"none"``."""
    normalisations = encoder.layer_normalisation()
    if len(normalisations) != len(encoder.layer_names) or not set(normalisations) <= {"l2", "none"}:
        raise ValueError(f"encoder {encoder.name!r} declares normalisations {normalisations} for layers "
                         f"{encoder.layer_names}; each must be 'l2' or 'none'")
    return list(normalisations)


def _pooled_axis(
    volume: torch.Tensor, keep: np.ndarray, encoder: SliceEncoder, axis: int, grid_size: int, batch_size: int,
) -> list[torch.Tensor]:
    """Per layer, the ``(N, dim)`` slab-pooled (unnormalised) tokens of the kept cubes along one axis.

    Only the slabs that hold a kept cube are encoded; the 2D tokens of each slab's ``p`` slices
    are summed as they come (no full-resolution stack is held) and divided by ``p``.
    """
    p, g, device = encoder.patch_size, grid_size, encoder.device
    other = tuple(a for a in range(3) if a != axis)
    needed_slabs = np.flatnonzero(keep.any(axis=other))
    slice_ids = (needed_slabs[:, None] * p + np.arange(p)[None, :]).reshape(-1)
    # slab index first, then the slice image's (rows, columns)
    stack = volume.movedim(axis, 0)
    sums = [torch.zeros((g, g, g, encoder.dim), dtype=torch.float32, device=device)
            for _ in encoder.layer_names]
    for start in range(0, slice_ids.size, batch_size):
        ids = torch.from_numpy(slice_ids[start:start + batch_size]).to(device)
        encoded = encoder.encode(stack.index_select(0, ids).unsqueeze(1))
        _check_features(encoded, encoder, ids.numel(), g)
        slabs = torch.div(ids, p, rounding_mode="floor")
        for total, layer in zip(sums, encoded):
            total.index_add_(0, slabs, layer.to(torch.float32))
    keep_t = torch.from_numpy(keep).to(device)
    return [(total / p).movedim(0, axis)[keep_t] for total in sums]  # (N, dim) in the C order of coords


def encode_volume(
    image: np.ndarray,
    brain_mask: np.ndarray,
    encoder: SliceEncoder,
    *,
    grid_size: int = 16,
    min_brain_fraction: float = 0.9,
    batch_size: int = 16,
) -> EncodedVolume:
    """Run the encoder on the three axes and keep the pooled, normalised features of kept cubes.

    Steps, per axis (axial, coronal, sagittal) and layer:

    1. encode the slices of the axis in batches of ``batch_size``;
    2. patch-aligned pooling: average the 2D tokens of slices ``b p .. b p + p - 1`` into the
       token of grid slab ``b`` (running sums per slab, so no full-resolution stack is held);
    3. the encoder's normalisation (``"l2"``: unit norm over the feature axis; ``"none"``).

    A cube is kept when its brain fraction is at least ``min_brain_fraction`` (and above 0);
    cubes straddling the brain boundary are dropped because their mixed brain/background content
    dominates every volume's maximum score. Slabs with no kept cube are not encoded at all (their
    tokens would be dropped anyway), which saves the slices above and below the brain.

    Parameters
    ----------
    image : numpy.ndarray
        ``(S, S, S)`` floating point in ``[0, 1]``, indexed ``[z, y, x]``,
        ``S = grid_size * encoder.patch_size``.
    brain_mask : numpy.ndarray
        Boolean (or 0/1 integer) array of the same shape.
    encoder : SliceEncoder
        The frozen slice encoder.
    grid_size : int
        Tokens per side (16 for 224^3 and DINOv2's patch 14).
    min_brain_fraction : float
        In ``(0, 1]``: the fraction of brain voxels a cube needs to be kept.
    batch_size : int
        Slices per encoder call.

    Returns
    -------
    EncodedVolume

    Raises
    ------
    ValueError
        On shapes, dtypes or value ranges that do not fit, and with "empty brain mask ..." when no
        cube is kept.
    """
    image, mask = _check_inputs(image, brain_mask, encoder, grid_size, 1, min_brain_fraction, batch_size)
    g = int(grid_size)
    fraction, keep = _kept_cubes(mask, encoder.patch_size, min_brain_fraction)
    normalisations = _checked_normalisations(encoder)
    coords = np.argwhere(keep).astype(np.int64)
    volume = torch.from_numpy(np.ascontiguousarray(image)).to(encoder.device)
    features = np.empty((len(encoder.layer_names), 3, coords.shape[0], encoder.dim), dtype=np.float32)
    with torch.inference_mode():
        for axis in range(3):
            for index, pooled in enumerate(_pooled_axis(volume, keep, encoder, axis, g, batch_size)):
                features[index, axis] = _normalise(pooled, normalisations[index])
    return EncodedVolume(
        features=features,
        coords=coords,
        grid_shape=(g, g, g),
        layer_names=list(encoder.layer_names),
        brain_fraction=fraction,
    )


def project(
    encoded: EncodedVolume,
    *,
    projection_dim: int = 128,
    projection_seed: int = 0,
    views: str | Sequence[str] = AXES,
    layers: Sequence[str] | None = None,
) -> TokenSet:
    """Project encoded features to tokens: per axis a fixed Gaussian matrix, views concatenated.

    Parameters
    ----------
    encoded : EncodedVolume
        From :func:`encode_volume` or the token cache.
    projection_dim : int
        Projected width per axis ``k``; when the features are not wider than ``k`` they are used
        as they are (a projection would only rotate and rescale them).
    projection_seed : int
        Seed of :func:`projection_matrix`; keep it fixed across every volume that is compared.
    views : str or sequence of str
        The axes whose tokens are concatenated (see :func:`parse_views`); each keeps its own
        matrix, so ``"A+C"`` is the first two thirds of ``"A+C+S"``.
    layers : sequence of str, optional
        Layer names to keep, in the encoder's order; default all.

    Returns
    -------
    TokenSet
        ``D = len(views) * min(k, dim)`` columns per layer.
    """
    if not isinstance(encoded, EncodedVolume):
        raise TypeError(f"encoded must be an EncodedVolume; got {type(encoded).__name__}")
    _check_positive("projection_dim", projection_dim)
    _check_seed(projection_seed)
    axes = [AXES.index(name) for name in parse_views(views)]
    if layers is None:
        layer_ids = list(range(len(encoded.layer_names)))
    else:
        unknown = [name for name in layers if name not in encoded.layer_names]
        if unknown or not layers:
            raise ValueError(
                f"layers {list(layers)} must be a non-empty subset of the encoded layers {encoded.layer_names}"
            )
        layer_ids = [i for i, name in enumerate(encoded.layer_names) if name in set(layers)]
    dim = encoded.dim
    matrices = {
        axis: projection_matrix(dim, int(projection_dim), projection_seed, axis)
        for axis in axes if dim > projection_dim
    }
    tokens = []
    for layer in layer_ids:
        parts = [
            encoded.features[layer, axis] @ matrices[axis] if axis in matrices else encoded.features[layer, axis]
            for axis in axes
        ]
        tokens.append(np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32))
    return TokenSet(
        tokens=tokens,
        coords=encoded.coords.copy(),
        grid_shape=encoded.grid_shape,
        layer_names=[encoded.layer_names[i] for i in layer_ids],
        brain_fraction=encoded.brain_fraction.copy(),
    )


def tokenise(
    image: np.ndarray,
    brain_mask: np.ndarray,
    encoder: SliceEncoder,
    *,
    grid_size: int = 16,
    projection_dim: int = 128,
    projection_seed: int = 0,
    min_brain_fraction: float = 0.9,
    batch_size: int = 16,
) -> TokenSet:
    """Turn a preprocessed volume into per-layer 3D patch tokens: :func:`encode_volume`, then :func:`project`.

    Steps, per axis (axial, coronal, sagittal) and layer:

    1. encode the slices of the axis in batches of ``batch_size``;
    2. patch-aligned pooling: average the 2D tokens of slices ``b p .. b p + p - 1`` into the
       token of grid slab ``b``;
    3. the encoder's normalisation (``"l2"``: unit norm over the feature axis; ``"none"``);
    4. random projection with :func:`projection_matrix` (``seed=projection_seed``, ``axis``),
       skipped when the feature width is at most ``projection_dim``.

    The three axes are concatenated per token. Cubes under ``min_brain_fraction`` brain are
    dropped (see :func:`encode_volume`).

    Parameters
    ----------
    image : numpy.ndarray
        ``(S, S, S)`` floating point in ``[0, 1]``, indexed ``[z, y, x]``,
        ``S = grid_size * encoder.patch_size``.
    brain_mask : numpy.ndarray
        Boolean (or 0/1 integer) array of the same shape.
    encoder : SliceEncoder
        The frozen slice encoder.
    grid_size : int
        Tokens per side (16 for 224^3 and DINOv2's patch 14).
    projection_dim : int
        Projected width per axis ``k``.
    projection_seed : int
        Seed of the projection matrices; keep it fixed across every volume that is compared.
    min_brain_fraction : float
        In ``(0, 1]``: the fraction of brain voxels a cube needs to be kept.
    batch_size : int
        Slices per encoder call.

    Returns
    -------
    TokenSet

    Raises
    ------
    ValueError
        On shapes, dtypes or value ranges that do not fit, and with "empty brain mask ..." when no
        cube is kept.
    """
    # Checked before encoding, which is the expensive part.
    _check_inputs(image, brain_mask, encoder, grid_size, projection_dim, min_brain_fraction, batch_size)
    _check_seed(projection_seed)
    encoded = encode_volume(
        image, brain_mask, encoder,
        grid_size=grid_size, min_brain_fraction=min_brain_fraction, batch_size=batch_size,
    )
    return project(encoded, projection_dim=projection_dim, projection_seed=projection_seed)


def _check_features(features: list[torch.Tensor], encoder: SliceEncoder, n: int, g: int) -> None:
    if len(features) != len(encoder.layer_names):
        raise RuntimeError(
            f"encoder {encoder.name!r} returned {len(features)} layers; it declares {len(encoder.layer_names)}"
        )
    for name, layer in zip(encoder.layer_names, features):
        if tuple(layer.shape) != (n, g, g, encoder.dim):
            raise RuntimeError(
                f"encoder {encoder.name!r} layer {name!r} returned shape {tuple(layer.shape)}; "
                f"expected {(n, g, g, encoder.dim)}"
            )


def _normalise(pooled: torch.Tensor, normalisation: str) -> np.ndarray:
    """Apply the encoder's normalisation over the feature axis; return float32 numpy on the CPU."""
    if normalisation == "l2":
        pooled = pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return pooled.to(torch.float32).cpu().numpy()
