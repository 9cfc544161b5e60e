"""NIfTI I/O: the only code that reads or writes image files.

Contract (as in nnU-Net): an array in the file's own axis order plus a `Geometry` holding the
4x4 voxel-to-world affine (RAS mm, as nibabel gives it) and the spacing in array-axis order.
Writes are atomic (temp file in the same folder + rename), so a killed process never leaves a
half-written file. Every check raises `CrossModalNetError` with one line naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from crossmodalnet.data.labels import detect_encoding, to_indices
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path

__all__ = [
    "Geometry",
    "read_geometry",
    "read_image",
    "read_label",
    "write_image",
    "write_label",
    "write_probabilities",
    "check_same_grid",
]

# Two grids agree when affines differ by at most this many mm (header float32 round-off).
GRID_ATOL_MM = 1e-3


@dataclass(frozen=True)
class Geometry:
    """Where an array sits in the world.

    affine: (4, 4) voxel index -> world mm (RAS). shape: the 3D array shape.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (norm of the affine's columns)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @classmethod
    def from_spacing(
        cls, shape: tuple[int, ...], spacing: tuple[float, ...], origin: tuple[float, ...] = (0.0, 0.0, 0.0)
    ) -> Geometry:
        """An axis-aligned grid with the given spacing and world origin of voxel (0, 0, 0)."""
        affine = np.diag([*map(float, spacing), 1.0])
        affine[:3, 3] = origin
        return cls(affine=affine, shape=tuple(int(s) for s in shape))

    def same_grid(self, other: Geometry, atol: float = GRID_ATOL_MM) -> bool:
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))




def _load(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    path = Path(path)
    if not path.is_file():
        raise CrossModalNetError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for corrupt files
        # Some nibabel messages span lines; the error must stay one line.
        detail = " ".join(str(exc).split())
        raise CrossModalNetError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {detail})") from None
    # Accept a trailing singleton 4th axis, as some converters write.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CrossModalNetError(f"{path}: expected a 3D volume, got shape {tuple(data.shape)}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CrossModalNetError(f"{path}: the header's affine is not a valid voxel-to-world transform")
    return data, Geometry(affine=affine, shape=tuple(int(s) for s in data.shape))


def read_geometry(path: str | os.PathLike) -> Geometry:
    """Read only the header of a volume: its Geometry. Same checks and errors as `read_image`,
    without decompressing the voxels (to check many files before any work starts)."""
    path = Path(path)
    if not path.is_file():
        raise CrossModalNetError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for corrupt files
        detail = " ".join(str(exc).split())
        raise CrossModalNetError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {detail})") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise CrossModalNetError(f"{path}: expected a 3D volume, got shape {shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CrossModalNetError(f"{path}: the header's affine is not a valid voxel-to-world transform")
    return Geometry(affine=affine, shape=shape)


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read an intensity volume. Returns `(array float32 (X, Y, Z), geometry)`.

    Raises CrossModalNetError for a missing/corrupt file, a non-3D volume or NaN/Inf voxels.
    """
    data, geom = _load(path)
    data = data.astype(np.float32, copy=False)
    if not np.all(np.isfinite(data)):
        n = int((~np.isfinite(data)).sum())
        raise CrossModalNetError(f"{path}: {n} voxels are NaN or Inf")
    return data, geom


def read_label(path: str | os.PathLike) -> tuple[np.ndarray, Geometry, str]:
    """Read a label map. Returns `(class indices uint8 (X, Y, Z), geometry, encoding)`.

    `encoding` is "indices" (0..7) or "codes" (MM-WHS 205..850), detected per file.
    """
    data, geom = _load(path)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise CrossModalNetError(f"{path}: label map holds NaN or Inf voxels")
        if not np.array_equal(data, np.rint(data)):
            raise CrossModalNetError(f"{path}: label map holds non-integer values")
        data = np.rint(data).astype(np.int64)
    try:
        encoding = detect_encoding(data)
        indices = to_indices(data)
    except ValueError as exc:
        raise CrossModalNetError(f"{path}: {exc}") from None
    return indices, geom, encoding


def _save(path: str | os.PathLike, data: np.ndarray, geometry: Geometry) -> Path:
    """Save `data` (3D or 4D) with `geometry` as NIfTI through a temp file + rename."""
    img = nib.Nifti1Image(data, geometry.affine)
    # Both qform and sform carry the affine so that Slicer and ITK-SNAP agree with nibabel.
    img.set_qform(geometry.affine, code=1)
    img.set_sform(geometry.affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def write_image(path: str | os.PathLike, array: np.ndarray, geometry: Geometry, dtype=np.float32) -> Path:
    """Write `array` (X, Y, Z) with `geometry` atomically. Returns the path."""
    array = np.asarray(array)
    if tuple(array.shape) != tuple(geometry.shape):
        raise CrossModalNetError(f"{path}: array shape {array.shape} does not match geometry {geometry.shape}")
    return _save(path, array.astype(dtype, copy=False), geometry)


def write_label(path: str | os.PathLike, labels: np.ndarray, geometry: Geometry) -> Path:
    """Write an integer label map (indices or codes) atomically as int16."""
    return write_image(path, np.asarray(labels), geometry, dtype=np.int16)


def write_probabilities(path: str | os.PathLike, probabilities: np.ndarray, geometry: Geometry) -> Path:
    """Write per-class values (C, X, Y, Z) as a 4D float32 NIfTI (X, Y, Z, C), atomically.

    The class axis is the NIfTI 4th dimension, which viewers show as volumes/frames.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 4 or tuple(probabilities.shape[1:]) != tuple(geometry.shape):
        raise CrossModalNetError(
            f"{path}: expected (C, *{geometry.shape}) probabilities, got shape {probabilities.shape}"
        )
    return _save(path, np.moveaxis(probabilities.astype(np.float32, copy=False), 0, -1), geometry)


def check_same_grid(items: Mapping[str, Geometry], atol: float = GRID_ATOL_MM) -> None:
    """Raise unless every geometry has the same shape and affine (within `atol` mm).

    items: {path or name: geometry}; the message names both files and what differs.
    """
    names = list(items)
    ref_name, ref = names[0], items[names[0]]
    for name in names[1:]:
        geom = items[name]
        if geom.shape != ref.shape:
            raise CrossModalNetError(f"{name}: shape {geom.shape} differs from {ref_name} {ref.shape}")
        if not np.allclose(geom.affine, ref.affine, atol=atol):
            diff = float(np.abs(geom.affine - ref.affine).max())
            raise CrossModalNetError(
                f"{name}: affine differs from {ref_name} by up to {diff:.4g} mm (tolerance {atol:g})"
            )
