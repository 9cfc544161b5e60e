"""Test-time misregistration of the MR against the CT: rigid shifts and smooth warps of a raw (X, Y, Z) volume.

They act on the MR volume on the CT grid, before a run's own preprocessing, as a misregistered
input would arrive; each case's perturbation depends only on (seed, case index), so every model
sees the same misregistration of the same case.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["shift_direction", "shift_volume", "smooth_field", "warp_volume"]


def shift_direction(seed: int, index: int) -> np.ndarray:
    """Unit vector (3,) of case `index`: every model sees the same misregistration of the same case."""
    v = np.random.default_rng([seed, index, 5]).normal(size=3)
    return v / np.linalg.norm(v)


def shift_volume(volume: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Translate (X, Y, Z) `volume` by `offset` voxels (trilinear; edge values extend, no wrap-around)."""
    if not np.any(offset):
        return volume
    return ndimage.shift(volume, offset, order=1, mode="nearest").astype(volume.dtype)


def smooth_field(shape: Sequence[int], seed: int, index: int, grid: int = 4) -> np.ndarray:
    """Smooth displacement field (3, X, Y, Z) of mean magnitude 1 voxel, scaled by the caller.

    Random vectors on a `grid`³ lattice, cubic-interpolated to the volume: a deformation that varies
    over a quarter of the field of view, like a residual elastic registration error.
    """
    coarse = np.random.default_rng([seed, index, 9]).normal(size=(3, grid, grid, grid))
    zoom = [s / grid for s in shape]
    field = np.stack([ndimage.zoom(c, zoom, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]
                      for c in coarse])
    return field / np.linalg.norm(field, axis=0).mean()


def warp_volume(volume: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Resample (X, Y, Z) `volume` at x + field(x) (trilinear, edges extended)."""
    if not np.any(field):
        return volume
    coords = np.indices(volume.shape, dtype=np.float64) + field
    return ndimage.map_coordinates(volume, coords, order=1, mode="nearest").astype(volume.dtype)
