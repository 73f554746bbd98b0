"""From token scores to voxel maps: token grid, trilinear upsampling, background zero.

Token ``(i, j, k)`` covers working voxels ``[p*i, p*(i+1))`` along each axis, so its centre sits at
``p*i + (p-1)/2`` (6.5 for p = 14). Trilinear interpolation with ``align_corners=False`` places the
token values exactly at those centres, which is why it is used here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["token_grid_map", "upsample_token_map"]


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


def upsample_token_map(token_map: np.ndarray, size: int, brain_mask: np.ndarray | None = None) -> np.ndarray:
    """Trilinear upsampling of a token grid to the ``size^3`` working grid, background 0.

    Parameters
    ----------
    token_map : numpy.ndarray
        ``(g, g, g)`` token values.
    size : int
        Working grid edge (a multiple of ``g``).
    brain_mask : numpy.ndarray, optional
        Working-grid brain mask; voxels outside it are set to 0.
    """
    if token_map.ndim != 3:
        raise ValueError(f"token map must be 3-D; got shape {token_map.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(token_map, dtype=np.float32))[None, None]
    upsampled = F.interpolate(tensor, size=(size, size, size), mode="trilinear", align_corners=False)
    result = upsampled[0, 0].numpy()
    if brain_mask is not None:
        if brain_mask.shape != result.shape:
            raise ValueError(f"brain mask shape {brain_mask.shape} does not match {result.shape}")
        result = np.where(brain_mask, result, 0.0).astype(np.float32)
    return result
