"""From token scores to voxel maps: token grid, upsampling over kept tokens, background zero.

Token ``(i, j, k)`` covers working voxels ``[p*i, p*(i+1))`` along each axis, so its centre sits at
``p*i + (p-1)/2`` (6.5 for p = 14). Trilinear interpolation with ``align_corners=False`` places the
token values exactly at those centres, which is why it is used here.

Why masked interpolation (``interpolation="masked"``, the default)
-----------------------------------------------------------------
Tokens under ``tokens.min_brain_fraction`` of brain are dropped before scoring. Filling them with 0
and interpolating (``"zero"``, the first version's rule) pulls every brain voxel near the brain's
surface towards 0: on an ellipsoid phantom 16-21 % of the brain voxels got less than half of a kept
token's weight, so cortical and juxtacortical lesions lost score there. Masked (normalised)
interpolation makes each voxel the weighted mean of the *kept* tokens around it,
``sum(w_t v_t) / sum(w_t)`` over kept tokens ``t`` with trilinear weights ``w_t``; a voxel that has
no kept token within reach (about 1 % of brain voxels, at the very edge) takes the value of the
nearest kept token. Every brain voxel's value then comes from real tokens only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["INTERPOLATIONS", "kept_token_grid", "token_grid_map", "upsample_token_map", "token_voxel_map"]

INTERPOLATIONS = ("masked", "zero")


def token_grid_map(values: np.ndarray, coords: np.ndarray, grid_shape: tuple[int, int, int]) -> np.ndarray:
    """Scatter per-token values onto the token grid; tokens not given (background) are 0.

    Parameters
    ----------
    values : numpy.ndarray
        ``(N,)`` token values.
    coords : numpy.ndarray
        ``(N, 3)`` integer grid indices ``(z, y, x)``.
    grid_shape : tuple of int
        Shape of the token grid.
    """
    values = np.asarray(values, dtype=np.float32)
    coords = np.asarray(coords)
    if values.ndim != 1 or coords.shape != (values.shape[0], 3):
        raise ValueError(f"values (N,) and coords (N, 3) disagree: {values.shape} vs {coords.shape}")
    grid = np.zeros(grid_shape, dtype=np.float32)
    grid[coords[:, 0], coords[:, 1], coords[:, 2]] = values
    return grid


def kept_token_grid(coords: np.ndarray, grid_shape: tuple[int, int, int]) -> np.ndarray:
    """Boolean token grid, True where a token was kept (scored)."""
    kept = np.zeros(grid_shape, dtype=bool)
    coords = np.asarray(coords)
    kept[coords[:, 0], coords[:, 1], coords[:, 2]] = True
    return kept


def _trilinear(grid: np.ndarray, size: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=(size, size, size), mode="trilinear", align_corners=False)[0, 0].numpy()


def _masked_trilinear(token_map: np.ndarray, kept: np.ndarray, size: int) -> np.ndarray:
    """Weighted mean of the kept tokens around each voxel; the nearest kept token out of reach."""
    if kept.shape != token_map.shape:
        raise ValueError(f"kept-token grid {kept.shape} does not match the token map {token_map.shape}")
    if not kept.any():
        return np.zeros((size,) * 3, dtype=np.float32)
    weight = _trilinear(kept.astype(np.float32), size)
    total = _trilinear(np.where(kept, token_map, 0.0), size)
    # Nearest kept token for every grid position, repeated over its cube: the fallback where no
    # kept token carries trilinear weight.
    _, nearest = ndimage.distance_transform_edt(~kept, return_indices=True)
    filled = token_map[tuple(nearest)]
    factor = size // token_map.shape[0]
    fallback = np.repeat(np.repeat(np.repeat(filled, factor, 0), factor, 1), factor, 2)
    # Weights below 1e-6 are rounding of an all-dropped neighbourhood, not a kept token's share.
    reached = weight > 1e-6
    out = np.where(reached, total / np.where(reached, weight, 1.0), fallback)
    return out.astype(np.float32)


def upsample_token_map(
    token_map: np.ndarray,
    size: int,
    brain_mask: np.ndarray | None = None,
    kept: np.ndarray | None = None,
) -> np.ndarray:
    """Upsample a token grid to the ``size^3`` working grid, background 0.

    Parameters
    ----------
    token_map : numpy.ndarray
        ``(g, g, g)`` token values.
    size : int
        Working grid edge (a multiple of ``g``).
    brain_mask : numpy.ndarray, optional
        Working-grid brain mask; voxels outside it are set to 0.
    kept : numpy.ndarray, optional
        ``(g, g, g)`` bool, the kept tokens (:func:`kept_token_grid`). Given: masked interpolation
        over the kept tokens only (module docstring). ``None``: plain trilinear interpolation of
        ``token_map`` as it is (dropped tokens count as 0).
    """
    if token_map.ndim != 3:
        raise ValueError(f"token map must be 3-D; got shape {token_map.shape}")
    if size % token_map.shape[0]:
        raise ValueError(f"working grid {size} is not a multiple of the token grid {token_map.shape[0]}")
    result = _trilinear(token_map, size) if kept is None else _masked_trilinear(token_map, kept, size)
    if brain_mask is not None:
        if brain_mask.shape != result.shape:
            raise ValueError(f"brain mask shape {brain_mask.shape} does not match {result.shape}")
        result = np.where(brain_mask, result, 0.0).astype(np.float32)
    return result


def token_voxel_map(
    values: np.ndarray,
    coords: np.ndarray,
    grid_shape: tuple[int, int, int],
    size: int,
    brain_mask: np.ndarray | None = None,
    interpolation: str = "masked",
) -> np.ndarray:
    """Per-token values -> working-grid voxel map, by the configured interpolation.

    Parameters
    ----------
    values, coords, grid_shape
        As in :func:`token_grid_map`.
    size, brain_mask
        As in :func:`upsample_token_map`.
    interpolation : {"masked", "zero"}
        ``masked``: over kept tokens only; ``zero``: dropped tokens count as 0 (module docstring).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}; got {interpolation!r}")
    grid = token_grid_map(values, coords, grid_shape)
    kept = kept_token_grid(coords, grid_shape) if interpolation == "masked" else None
    return upsample_token_map(grid, size, brain_mask, kept)
