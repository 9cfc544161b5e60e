"""Grids of the fixed world: the heart box, the prepared (cropped, resampled) grid, and the way back.

Arrays are (X, Y, Z) on an `io.Geometry` (RAS voxel-to-world affine); class scores are
(C, X, Y, Z). Everything here works by world coordinates, without registration transforms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from crossmodalnet.data.io import Geometry
from crossmodalnet.data.labels import STRUCTURES

__all__ = ["heart_box", "crop_grid", "fraction_inside", "resample_classes", "label_dice"]


def heart_box(labels: np.ndarray, geometry: Geometry, margin_mm: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Voxel box [lo, hi) of the labelled structures of `labels` (X, Y, Z), grown by `margin_mm`
    on every side and clipped to the array. None when the map holds no structure."""
    hit = [np.flatnonzero(labels.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(h.size == 0 for h in hit):
        return None
    margin = np.ceil(float(margin_mm) / np.asarray(geometry.spacing)).astype(int)
    lo = np.maximum(np.array([h[0] for h in hit]) - margin, 0)
    hi = np.minimum(np.array([h[-1] + 1 for h in hit]) + margin, np.asarray(geometry.shape))
    return lo, hi


def crop_grid(geometry: Geometry, centre_voxel: Sequence[float], spacing: Sequence[float],
              size: Sequence[int]) -> Geometry:
    """A grid of `size` voxels of `spacing` mm, axes parallel to `geometry`'s, centred on the
    (fractional) voxel `centre_voxel` of `geometry`. Its affine is the true one of the crop."""
    spacing = np.asarray(spacing, dtype=np.float64)
    size = np.asarray(size, dtype=int)
    direction = geometry.affine[:3, :3] / np.asarray(geometry.spacing)
    centre_world = geometry.affine[:3, :3] @ np.asarray(centre_voxel, dtype=np.float64) + geometry.affine[:3, 3]
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = centre_world - affine[:3, :3] @ ((size - 1) / 2.0)
    return Geometry(affine=affine, shape=tuple(int(s) for s in size))


def fraction_inside(labels: np.ndarray, geometry: Geometry, grid: Geometry) -> float:
    """Share of the labelled voxels of `labels` (X, Y, Z) on `geometry` whose centres lie inside
    `grid`: below 1 when the prepared grid cuts off part of the heart. NaN for an empty map."""
    m = np.linalg.inv(grid.affine) @ geometry.affine
    inside = total = 0
    for x in range(labels.shape[0]):  # slice by slice: a 512^2 x 300 CT holds millions of labelled voxels
        j, k = np.nonzero(labels[x])
        if j.size == 0:
            continue
        points = np.stack([np.full(j.shape, x), j, k]).astype(np.float64)
        q = m[:3, :3] @ points + m[:3, 3:4]
        inside += int(np.all((q > -0.5) & (q < np.asarray(grid.shape)[:, None] - 0.5), axis=0).sum())
        total += j.size
    return inside / total if total else math.nan


def resample_classes(values: np.ndarray, source: Geometry, target: Geometry) -> np.ndarray:
    """Class indices (X, Y, Z) on `target` from labels (X', Y', Z') or per-class scores (C, X', Y', Z')
    on `source`, by world coordinates (no transform): each class is interpolated linearly, the
    largest wins; outside `source` is background. Only the part of `target` that `source` covers
    is computed, so a 128^3 crop goes back onto a 512^2 x 300 CT in seconds."""
    values = np.asarray(values)
    if values.ndim == 3:
        classes = [int(c) for c in np.unique(values)]
        channel = lambda c: (values == c).astype(np.float32)  # noqa: E731 - one-hot on demand, one class in memory
        shape = values.shape
    elif values.ndim == 4:
        classes = list(range(values.shape[0]))
        channel = lambda c: values[c].astype(np.float32)  # noqa: E731
        shape = values.shape[1:]
    else:
        raise ValueError(f"expected labels (X, Y, Z) or scores (C, X, Y, Z), got shape {values.shape}")
    if tuple(shape) != tuple(source.shape):
        raise ValueError(f"array of shape {tuple(shape)} does not match its grid {source.shape}")
    # target voxel -> source voxel
    m = np.linalg.inv(source.affine) @ target.affine
    corners = np.array([[i, j, k] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                        for k in (-0.5, shape[2] - 0.5)], dtype=np.float64)
    to_target = np.linalg.inv(m)
    inside = corners @ to_target[:3, :3].T + to_target[:3, 3]
    lo = np.clip(np.floor(inside.min(0)).astype(int), 0, target.shape)
    hi = np.clip(np.ceil(inside.max(0)).astype(int) + 1, 0, target.shape)
    out = np.zeros(target.shape, dtype=np.uint8)
    if np.any(hi <= lo):
        return out
    box_shape = tuple(int(h - l) for l, h in zip(lo, hi, strict=True))
    offset = m[:3, :3] @ lo + m[:3, 3]
    best = np.full(box_shape, -np.inf, dtype=np.float32)
    winner = np.zeros(box_shape, dtype=np.uint8)
    for c in classes:
        # Outside the source grid the background wins: its channel reads 1 there, the others 0.
        interp = ndimage.affine_transform(channel(c), m[:3, :3], offset=offset, output_shape=box_shape, order=1,
                                          mode="constant", cval=1.0 if c == 0 else 0.0)
        better = interp > best
        best[better] = interp[better]
        winner[better] = c
    out[tuple(slice(int(l), int(h)) for l, h in zip(lo, hi, strict=True))] = winner
    return out


def label_dice(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Dice per structure of two label maps (X, Y, Z) of class indices on one grid.

    NaN where the structure is in neither map (nothing to compare), 0 where it is in one only.
    """
    out = {}
    for s in STRUCTURES:
        pa, pb = a == s.index, b == s.index
        total = int(pa.sum()) + int(pb.sum())
        out[s.name] = float("nan") if total == 0 else 2.0 * int((pa & pb).sum()) / total
    return out
