"""A scanned volume with its geometry, read and written through SimpleITK.

Arrays are KJI-ordered (slice, row, column), as in SimpleITK and Slicer. Geometry follows ITK: ``spacing`` and
``origin`` in IJK / LPS order, ``direction`` a 3x3 matrix whose columns are the I, J, K axes in LPS.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from FMSegCore.errors import InputError

PathLike = Union[str, Path]

#: File endings SimpleITK reads as one volume.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

if TYPE_CHECKING:
    import SimpleITK as sitk


@dataclass
class Volume:
    """Voxel array (KJI order) with spacing, origin and direction (ITK/LPS conventions)."""

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    path: Optional[str] = None

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Size along I, J, K (the reverse of ``array.shape``)."""
        k, j, i = self.array.shape
        return (i, j, k)

    def ijk_to_lps_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping (i, j, k) voxel indices to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction, dtype=float) @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping (i, j, k) voxel indices to RAS millimetres (Slicer's world)."""
        flip = np.eye(4)
        flip[:3, :3] = LPS_TO_RAS
        return flip @ self.ijk_to_lps_matrix()

    def lps_to_ijk(self, points: np.ndarray) -> np.ndarray:
        """Continuous voxel indices (N, 3) of LPS points (N, 3)."""
        pts = np.atleast_2d(np.asarray(points, dtype=float))
        inverse = np.linalg.inv(self.ijk_to_lps_matrix())
        return pts @ inverse[:3, :3].T + inverse[:3, 3]

    def ijk_to_lps(self, indices: np.ndarray) -> np.ndarray:
        """LPS points (N, 3) of continuous voxel indices (N, 3)."""
        idx = np.atleast_2d(np.asarray(indices, dtype=float))
        matrix = self.ijk_to_lps_matrix()
        return idx @ matrix[:3, :3].T + matrix[:3, 3]

    def with_array(self, array: np.ndarray, path: Optional[str] = None) -> Volume:
        """A volume on the same grid holding another array (same KJI shape)."""
        if tuple(array.shape) != tuple(self.array.shape):
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.spacing, self.origin, np.array(self.direction, dtype=float), path)

    def same_grid(self, other: Volume, tolerance: float = 1e-4) -> bool:
        """Whether ``other`` lies on exactly this grid (shape, spacing, origin, direction)."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=tolerance)
            and np.allclose(self.origin, other.origin, atol=tolerance * 10)
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )

    def to_sitk(self) -> sitk.Image:
        """SimpleITK image with this array and geometry."""
        import SimpleITK as sitk  # imported when used: the rest works without it
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetOrigin([float(o) for o in self.origin])
        image.SetDirection([float(d) for d in np.asarray(self.direction, dtype=float).ravel()])
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, path: Optional[str] = None) -> Volume:
        """Volume from a 3D SimpleITK image."""
        import SimpleITK as sitk  # imported when used: the rest works without it
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=np.array(image.GetDirection(), dtype=float).reshape(3, 3),
            path=path,
        )


def _is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(suffix) for suffix in VOLUME_SUFFIXES)


def _read_dicom_series(folder: Path) -> sitk.Image:
    import SimpleITK as sitk  # imported when used: the rest works without it
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(folder, "folder holds no DICOM series")
    if len(series) > 1:
        sizes = {sid: len(reader.GetGDCMSeriesFileNames(str(folder), sid)) for sid in series}
        chosen = max(sizes, key=sizes.get)
    else:
        chosen = series[0]
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), chosen))
    return reader.Execute()


def read_volume(path: PathLike, require_3d: bool = True, allow_empty: bool = False) -> Volume:
    """Read a NIfTI, NRRD or MetaImage file, or a DICOM series folder, as a float or integer volume.

    Raises :class:`InputError` (naming the file) when the file is missing, unreadable, not 3D, empty or NaN.
    """
    import SimpleITK as sitk  # imported when used: the rest works without it
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        if path.is_dir():
            image = _read_dicom_series(path)
        else:
            if not _is_volume_file(path) and not path.name.lower().endswith(".dcm"):
                raise InputError(path, f"unsupported volume format (use one of {', '.join(VOLUME_SUFFIXES)} or a DICOM folder)")
            image = sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise InputError(path, f"cannot read volume ({first_line.strip()})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"expected a scalar volume, found {image.GetNumberOfComponentsPerPixel()} components per voxel")
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dimension = 3
    if dimension == 2:
        if require_3d:
            raise InputError(path, f"is a 2D image {tuple(image.GetSize())}, a 3D volume is needed")
        image = sitk.JoinSeries(image)
    elif dimension != 3:
        raise InputError(path, f"is a {dimension}D image, a 3D volume is needed")
    volume = Volume.from_sitk(image, path=str(path))
    check_volume_values(volume, path, allow_empty=allow_empty)
    return volume


def check_volume_values(volume: Volume, path: Optional[PathLike] = None, allow_empty: bool = False) -> None:
    """Reject volumes with no voxels, NaN/infinite values, or (unless allowed) a single constant value."""
    array = volume.array
    if array.size == 0:
        raise InputError(path, "volume has no voxels")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(path, "volume contains NaN or infinite values")
    if not allow_empty and float(array.max()) == float(array.min()):
        raise InputError(path, f"volume is empty (every voxel is {float(array.min()):g})")


def write_volume(volume: Volume, path: PathLike, compress: bool = True) -> Path:
    """Write a volume atomically (temporary file then rename) as NIfTI, NRRD or MetaImage."""
    import SimpleITK as sitk  # imported when used: the rest works without it

    from FMSegCore.io.atomic import atomic_output

    path = Path(path)
    if not _is_volume_file(path):
        raise InputError(path, f"unsupported output format (use one of {', '.join(VOLUME_SUFFIXES)})")
    if path.name.lower().endswith(".mhd"):
        return _write_metaimage_pair(volume, path, compress)
    with atomic_output(path) as temporary:
        sitk.WriteImage(volume.to_sitk(), str(temporary), compress)
    return path


def _write_metaimage_pair(volume: Volume, path: Path, compress: bool) -> Path:
    """A header (.mhd) and its data file, written under their final names in a temporary folder, then moved."""
    import SimpleITK as sitk  # imported when used: the rest works without it
    if not path.parent.exists():
        raise InputError(path, f"output folder {path.parent} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        sitk.WriteImage(volume.to_sitk(), str(staging / path.name), compress)
        data_files = [f for f in staging.iterdir() if f.name != path.name]
        for data_file in data_files:
            os.replace(data_file, path.parent / data_file.name)
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def stack_slices(slices: Sequence[np.ndarray]) -> np.ndarray:
    """Stack 2D arrays into a KJI volume array."""
    return np.stack([np.asarray(s) for s in slices], axis=0)
