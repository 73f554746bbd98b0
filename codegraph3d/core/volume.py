"""Volumes with explicit geometry: the data contract shared by every stage.

Conventions (the same as SimpleITK and DICOM):

* arrays are indexed ``[z, y, x]`` (slowest to fastest), as ``SimpleITK.GetArrayFromImage`` returns;
* a continuous index is written ``(x, y, z)`` (column, row, slice);
* physical coordinates are LPS millimetres:
  ``point = origin + direction @ (spacing * index_xyz)``, where the columns of ``direction`` are
  the LPS directions of the x, y and z index axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["LPS_TO_RAS", "Volume", "index_to_physical_matrix"]

#: 4x4 homogeneous map from LPS to RAS millimetres (NIfTI, nibabel): x and y change sign. The same
#: matrix maps RAS back to LPS; its upper 3x3 block flips directions.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS_TO_RAS.setflags(write=False)


def index_to_physical_matrix(
    origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray
) -> np.ndarray:
    """Return the 4x4 homogeneous matrix mapping a continuous ``(x, y, z)`` index to LPS mm.

    Parameters
    ----------
    origin : numpy.ndarray
        LPS position (mm) of the centre of voxel ``(0, 0, 0)``, shape ``(3,)``.
    spacing : numpy.ndarray
        Voxel size (mm) along the x, y and z index axes, shape ``(3,)``.
    direction : numpy.ndarray
        3x3 matrix whose columns are the unit LPS directions of the x, y and z index axes.
    """
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(direction, float) @ np.diag(np.asarray(spacing, float))
    matrix[:3, 3] = np.asarray(origin, float)
    return matrix


@dataclass
class Volume:
    """A 3D scalar image with its geometry and DICOM provenance.

    Parameters
    ----------
    array : numpy.ndarray
        Voxel values, ``float32``, shape ``(z, y, x)``.
    origin : numpy.ndarray
        LPS position (mm) of the centre of voxel ``(0, 0, 0)``.
    spacing : numpy.ndarray
        Voxel size (mm) along x, y, z (column spacing, row spacing, slice spacing).
    direction : numpy.ndarray
        3x3 direction cosines, columns = x, y, z index axes in LPS.
    series_instance_uid, study_instance_uid, patient_id : str
        Provenance of the source series.
    sop_instance_uids : list of str
        SOPInstanceUID of each source slice, in the order of ``array``'s z axis.
    metadata : dict
        Free-form extra information (contrast, series description, ...).
    """

    array: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    patient_id: str = ""
    sop_instance_uids: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array, dtype=np.float32)
        self.origin = np.asarray(self.origin, dtype=float).reshape(3)
        self.spacing = np.asarray(self.spacing, dtype=float).reshape(3)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3-D (z, y, x); got shape {self.array.shape}")
        if np.any(self.spacing <= 0):
            raise ValueError(f"Volume spacing must be positive; got {self.spacing}")
        if abs(abs(np.linalg.det(self.direction)) - 1.0) > 1e-3:
            raise ValueError(f"Volume direction must be orthonormal; got {self.direction.tolist()}")

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        """Size along x, y, z (the reverse of ``array.shape``)."""
        z, y, x = self.array.shape
        return (x, y, z)

    @property
    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix from a continuous ``(x, y, z)`` index to LPS mm."""
        return index_to_physical_matrix(self.origin, self.spacing, self.direction)

    def to_sitk(self):
        """Return a ``SimpleITK.Image`` with the same voxels and geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array)
        image.SetOrigin(tuple(self.origin))
        image.SetSpacing(tuple(self.spacing))
        image.SetDirection(tuple(self.direction.flatten()))
        return image

    @classmethod
    def from_sitk(cls, image, **provenance) -> "Volume":
        """Build a volume from a ``SimpleITK.Image`` (3-D, scalar)."""
        import SimpleITK as sitk

        return cls(
            array=sitk.GetArrayFromImage(image).astype(np.float32),
            origin=np.array(image.GetOrigin()),
            spacing=np.array(image.GetSpacing()),
            direction=np.array(image.GetDirection()).reshape(3, 3),
            **provenance,
        )
