"""NIfTI I/O: the only code that reads or writes image files.

Contract (as in nnU-Net): an array in the file's own axis order plus a `Geometry` holding the
4x4 voxel-to-world affine (RAS mm, as nibabel gives it) and the spacing in array-axis order.
Writes are atomic (temp file in the same folder + rename), so a killed process never leaves a
half-written file. Every check raises `CrossModalNetError` with one line naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.imageglobals import logger as nibabel_logger

from crossmodalnet.data.spec import DataSpec
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path

__all__ = [
    "Geometry",
    "read_geometry",
    "max_image_bytes",
    "DEFAULT_MAX_IMAGE_BYTES",
    "MAX_IMAGE_BYTES_ENV",
    "read_image",
    "read_label",
    "read_label_values",
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


# The memory budget of one volume read from disk. A NIfTI header states the array's size and
# nibabel allocates it before reading a byte of the body, so a 360-byte file claiming 1200^3
# voxels would cost gigabytes: every header is checked against this budget first. 4 GiB holds
# the largest clinical CT (512 x 512 x 2000 slices, 0.5 G voxels, 2 GiB as float32) with room;
# a machine with less memory (or a server reading files from strangers) sets it lower.
DEFAULT_MAX_IMAGE_BYTES = 4 * 2**30
MAX_IMAGE_BYTES_ENV = "CROSSMODALNET_MAX_IMAGE_BYTES"
# Deflate cannot compress more than 1032:1 (zlib's documented limit), so a .nii.gz file of n bytes
# holds at most about 1032 n bytes: a header claiming more is a lie or the body is missing.
_MAX_GZIP_RATIO = 1032


def max_image_bytes() -> int:
    """The budget in bytes for one volume: $CROSSMODALNET_MAX_IMAGE_BYTES, else 4 GiB.

    Read on every call, so that a server (or a test) can lower it without re-importing.
    """
    text = os.environ.get(MAX_IMAGE_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_BYTES
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value <= 0:
        raise CrossModalNetError(f"${MAX_IMAGE_BYTES_ENV}: expected a positive number of bytes, got {text!r}")
    return value


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Silence the header repairs nibabel logs (problems it raises for are kept): with no handler
    set, Python's last-resort handler would print them to stderr beside our one-line error."""
    level = nibabel_logger.level
    nibabel_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        nibabel_logger.setLevel(level)


def _one_line(exc: BaseException) -> str:
    # Some nibabel and zlib messages span lines; the error must stay one line.
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _voxel_to_world(img: nib.Nifti1Image) -> np.ndarray:
    """The image's affine, as ITK (and so SimpleITK, nnU-Net, 3D Slicer) reads it: the sform, unless
    its voxel sizes disagree with the header's pixdim while the qform agrees; then the qform.
    Some public conversions (an ACDC copy on GitHub) carry an sform of unit scales beside correct
    pixdim and qform; nibabel's `img.affine` would make their 10 mm slices 1 mm."""
    affine = np.asarray(img.affine, dtype=np.float64)
    header = img.header
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    scales = np.linalg.norm(affine[:3, :3], axis=0)
    # A singular sform stays (and is refused below): it is damaged, not mis-scaled.
    invertible = np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 1e-12
    if int(header["sform_code"]) > 0 and invertible and not np.allclose(scales, zooms, rtol=1e-3, atol=1e-5):
        qform = np.asarray(header.get_qform(), dtype=np.float64)
        if np.allclose(np.linalg.norm(qform[:3, :3], axis=0), zooms, rtol=1e-3, atol=1e-5):
            return qform
    return affine


def _open_header(path: Path, volume: int | None = None) -> tuple[nib.Nifti1Image, tuple[int, int, int], np.ndarray]:
    """Load a NIfTI header (no voxels) and check it can be read safely. Returns (image, 3D shape, affine).

    Checked before any body is read: NIfTI-1/2, a real numeric data type, a 3D shape (trailing
    singleton axes dropped) of positive sizes, or with `volume` a 4D shape (X, Y, Z, C) holding
    that volume (MSD's multi-channel images), the array within `max_image_bytes()`, a file large
    enough for the body it claims, finite positive voxel sizes, an invertible affine.
    """
    if not path.is_file():
        raise CrossModalNetError(f"{path}: file not found")
    try:
        # nibabel reports the header fields it repairs through its logger and warnings: they
        # would print lines around our one-line error, and the checks below decide instead.
        with warnings.catch_warnings(), _quiet_nibabel():
            warnings.simplefilter("ignore")
            img = nib.load(str(path))
            if not isinstance(img, nib.Nifti1Image):  # NIfTI-2 images are Nifti1Image subclasses
                raise CrossModalNetError(f"{path}: not a NIfTI file (nibabel reads it as {type(img).__name__})")
            header = img.header
            dims = tuple(int(d) for d in header.get_data_shape())
            dtype = np.dtype(header.get_data_dtype())
            zooms = tuple(float(z) for z in header.get_zooms())
            offset = int(img.dataobj.offset)  # the header object forgets vox_offset once loaded
            slope, inter = (math.nan if v is None else float(v) for v in header.get_slope_inter())
            affine = _voxel_to_world(img)
    except CrossModalNetError:
        raise
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise CrossModalNetError(f"{path}: cannot read as NIfTI ({_one_line(exc)})") from None
    if any(d <= 0 for d in dims):
        raise CrossModalNetError(f"{path}: the header gives array shape {dims}; every size must be positive")
    shape = dims
    # Accept trailing singleton axes, as some converters write (X, Y, Z, 1).
    if volume is not None:
        if len(shape) != 4:
            raise CrossModalNetError(f"{path}: expected a 4D image (X, Y, Z, channels) to take channel {volume} "
                                     f"from, got shape {dims}")
        if not 0 <= volume < shape[3]:
            raise CrossModalNetError(f"{path}: has {shape[3]} channels along its 4th axis, no channel {volume}")
        shape = shape[:3]
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise CrossModalNetError(f"{path}: expected a 3D volume, got shape {dims}")
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise CrossModalNetError(f"{path}: voxel type {dtype} is not a real number type")
    voxels = math.prod(dims)
    # As held in memory: the file's type, or the float32 it becomes, whichever is larger; nibabel
    # may scale (scl_slope, scl_inter) into float64.
    scaled = not (math.isnan(slope) or slope == 1.0) or not (math.isnan(inter) or inter == 0.0)
    needed = voxels * max(dtype.itemsize, 8 if scaled else 4)
    budget = max_image_bytes()
    if needed > budget:
        raise CrossModalNetError(
            f"{path}: the header claims {'x'.join(map(str, dims))} voxels of {dtype} ({_gib(needed)} in memory), "
            f"over the budget of {_gib(budget)} per volume (${MAX_IMAGE_BYTES_ENV} raises it)"
        )
    body = voxels * dtype.itemsize
    size = path.stat().st_size
    compressed = path.name.endswith(".gz")
    # Exact for a plain .nii, deflate's bound for .gz; other compressions nibabel reads (.bz2,
    # .zst) have no useful bound and are held to the budget only.
    capacity = size * _MAX_GZIP_RATIO if compressed else size if path.name.endswith(".nii") else math.inf
    if offset < 0 or capacity < offset + body:
        raise CrossModalNetError(
            f"{path}: file of {size} bytes is too small for the {'x'.join(map(str, dims))} voxels of {dtype} its "
            f"header claims ({offset + body} bytes{' uncompressed' if compressed else ''}): truncated or a bad header"
        )
    if not all(math.isfinite(z) and z > 0 for z in zooms[:3]):
        raise CrossModalNetError(f"{path}: voxel sizes {zooms[:3]} in the header are not finite positive numbers")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CrossModalNetError(f"{path}: the header's affine is not a valid voxel-to-world transform")
    return img, shape, affine


def _load(path: str | os.PathLike, volume: int | None = None) -> tuple[np.ndarray, Geometry]:
    """Header checks, then the voxels: (array (X, Y, Z) in the file's type, geometry); `volume`
    takes one 3D volume of a 4D file."""
    path = Path(path)
    img, shape, affine = _open_header(path, volume)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = np.asanyarray(img.dataobj if volume is None else img.dataobj[..., volume])
    except MemoryError:
        raise CrossModalNetError(f"{path}: not enough memory for its {'x'.join(map(str, shape))} voxels") from None
    except Exception as exc:  # zlib.error, EOFError, OSError, ValueError for a truncated or corrupt body
        raise CrossModalNetError(f"{path}: cannot read as NIfTI: the voxel data are truncated or corrupt "
                                 f"({_one_line(exc)})") from None
    return data.reshape(shape), Geometry(affine=affine, shape=shape)


def read_geometry(path: str | os.PathLike, volume: int | None = None) -> Geometry:
    """Read only the header of a volume: its Geometry. Same header checks and errors as `read_image`
    (shape, type, memory budget, file size, voxel sizes, affine), without reading the voxels (to
    check many files before any work starts)."""
    path = Path(path)
    _, shape, affine = _open_header(path, volume)
    return Geometry(affine=affine, shape=shape)


def _check_finite(path: Path, data: np.ndarray, what: str) -> None:
    """Refuse NaN or Inf voxels. min and max propagate both without allocating a mask of the volume."""
    if data.dtype.kind != "f" or not data.size:
        return
    if math.isfinite(float(data.min())) and math.isfinite(float(data.max())):
        return
    n = int(data.size - np.count_nonzero(np.isfinite(data)))
    raise CrossModalNetError(f"{path}: {what}{n} voxels are NaN or Inf")


def read_image(path: str | os.PathLike, volume: int | None = None) -> tuple[np.ndarray, Geometry]:
    """Read an intensity volume (or volume `volume` of a 4D file). Returns `(array float32 (X, Y, Z), geometry)`.

    Raises CrossModalNetError for a missing/corrupt file, a bad header (see `read_geometry`), a
    non-3D volume or NaN/Inf voxels (values beyond float32 become Inf and are refused too).
    """
    path = Path(path)
    data, geom = _load(path, volume)
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 becomes Inf, refused just below
        data = np.asarray(data).astype(np.float32, copy=False)
    _check_finite(path, data, "")
    return data, geom


def read_label_values(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read a label map as it is on disk: `(integer values (X, Y, Z), geometry)`, with no dataset to
    interpret them (to list the values a dataset's files hold). Float files must hold whole numbers."""
    path = Path(path)
    data, geom = _load(path)
    data = np.asarray(data)
    if np.issubdtype(data.dtype, np.floating):
        _check_finite(path, data, "label map: ")
        if not np.array_equal(data, np.rint(data)):
            raise CrossModalNetError(f"{path}: label map holds non-integer values")
        if data.size and max(abs(float(data.min())), abs(float(data.max()))) > 2**31:  # no int64 cast of 1e30
            raise CrossModalNetError(f"{path}: label values up to {max(abs(data.min()), abs(data.max())):g} are "
                                     "not labels of the dataset")
        data = np.rint(data).astype(np.int64)
    return data, geom


def read_label(path: str | os.PathLike, spec: DataSpec) -> tuple[np.ndarray, Geometry, str]:
    """Read a label map of the dataset `spec`. Returns `(class indices uint8 (X, Y, Z), geometry, encoding)`.

    `encoding` is "values" (the dataset's label values) or "indices" (0..K-1), detected per file.
    """
    path = Path(path)
    data, geom = read_label_values(path)
    try:
        encoding = spec.encoding({int(v) for v in np.unique(data)})
        indices = spec.to_indices(data)
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
    """Write an integer label map (indices or values) atomically, as uint8 when the values fit, else
    int16 or int32."""
    labels = np.asarray(labels)
    top = int(labels.max()) if labels.size else 0
    low = int(labels.min()) if labels.size else 0
    dtype = np.uint8 if 0 <= low and top < 256 else np.int16 if -2**15 <= low and top < 2**15 else np.int32
    return write_image(path, labels, geometry, dtype=dtype)


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
