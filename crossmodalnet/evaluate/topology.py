"""Betti numbers of 3D binary masks, for topology errors of segmentations.

A mask (X, Y, Z) is read as the union of its voxels taken as closed unit cubes (a cubical
complex). Then two voxels that share a vertex touch, so the foreground is 26-connected and its
complement 6-connected, the digital-topology pair that keeps Jordan's theorem true:

- b0, connected components: `scipy.ndimage.label` with 26-connectivity;
- b2, enclosed cavities: components of the complement (6-connectivity), after padding so that the
  outside is one component, minus that outside component;
- b1, tunnels (handles): from the Euler characteristic χ = b0 − b1 + b2, with χ = V − E + F − C
  counted on the complex (distinct vertices, edges, faces and cubes of the voxels).

`betti_numbers(mask) -> (b0, b1, b2)`; `betti_errors(pred, ref) -> (|Δb0|, |Δb1|, |Δb2|)`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["betti_numbers", "betti_errors", "euler_characteristic"]

_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
_FACE = ndimage.generate_binary_structure(3, 1)  # 6-connectivity


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _crop_pad(mask: np.ndarray) -> np.ndarray:
    """Crop to the foreground box and pad one background voxel on every side.

    Betti numbers do not depend on position; the padding makes the outside one component and puts
    every vertex of a foreground voxel inside the array.
    """
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return np.pad(mask[tuple(box)], 1)


def euler_characteristic(mask: np.ndarray) -> int:
    """χ = V − E + F − C of the union of closed voxel cubes of a 3D mask (X, Y, Z)."""
    m = _as_mask(mask)
    if not m.any():
        return 0
    p = _crop_pad(m)
    # A lattice vertex between voxels i, i+1 (per axis) belongs to the complex when any of the 8
    # voxels around it does; an edge along an axis when any of its 4 voxels does; a face when either
    # of its 2 voxels does. OR over shifted slices counts each element once.
    a, b = p[:-1], p[1:]
    face_x = a | b  # faces normal to x: (X+1, Y+2, Z+2)
    face_y = p[:, :-1] | p[:, 1:]
    face_z = p[:, :, :-1] | p[:, :, 1:]
    edge_x = face_y[:, :, :-1] | face_y[:, :, 1:]  # edges along x: OR over the 2x2 voxels in (y, z)
    edge_y = face_x[:, :, :-1] | face_x[:, :, 1:]
    edge_z = face_x[:, :-1] | face_x[:, 1:]
    vertex = edge_z[:, :, :-1] | edge_z[:, :, 1:]
    v = int(vertex.sum())
    e = int(edge_x.sum() + edge_y.sum() + edge_z.sum())
    f = int(face_x.sum() + face_y.sum() + face_z.sum())
    c = int(p.sum())
    return v - e + f - c


def betti_numbers(mask: np.ndarray) -> tuple[int, int, int]:
    """(b0, b1, b2) of a 3D binary mask (X, Y, Z): components, tunnels, cavities.

    An empty mask gives (0, 0, 0).
    """
    m = _as_mask(mask)
    if not m.any():
        return 0, 0, 0
    p = _crop_pad(m)
    _, b0 = ndimage.label(p, structure=_FULL)
    _, n_background = ndimage.label(~p, structure=_FACE)
    b2 = n_background - 1  # all but the outside component, which the padding made one piece
    b1 = b0 + b2 - euler_characteristic(p)
    return int(b0), int(b1), int(b2)


def betti_errors(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    """(|b0_pred − b0_ref|, |b1_pred − b1_ref|, |b2_pred − b2_ref|) of two 3D masks."""
    bp, br = betti_numbers(pred), betti_numbers(ref)
    return tuple(abs(x - y) for x, y in zip(bp, br, strict=True))  # type: ignore[return-value]
