"""4x4 homogeneous matrices (LPS mm) to and from SimpleITK transforms, written once.

Registration returns SimpleITK transforms; the product records and composes plain 4x4 matrices
(``grid_to_source`` and its inverse), and resamples with SimpleITK again. A matrix-offset
transform maps ``p`` to ``A (p - c) + c + t``; its matrix is ``[A | c + t - A c]``.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

__all__ = ["affine_transform", "transform_matrix"]


def affine_transform(matrix: np.ndarray) -> sitk.AffineTransform:
    """The SimpleITK affine transform of a 4x4 homogeneous matrix (centre at the origin)."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in np.asarray(matrix)[:3, :3].flatten()))
    transform.SetTranslation(tuple(float(v) for v in np.asarray(matrix)[:3, 3]))
    return transform


def transform_matrix(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 homogeneous matrix of a SimpleITK matrix-offset transform (Euler, versor, affine)."""
    linear = np.array(transform.GetMatrix()).reshape(3, 3)
    centre = np.array(transform.GetCenter())
    translation = np.array(transform.GetTranslation())
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre + translation - linear @ centre
    return matrix
