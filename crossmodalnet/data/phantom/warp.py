"""Grids and misalignments of the phantom: axis-aligned voxel grids, the rigid + elastic warp of an
MR acquisition, and trilinear resampling between grids.

Grids are `io.Geometry` with a diagonal affine (LPS-ordered voxel axes, RAS world mm). World points
come as (3, X, Y, Z) arrays; volumes as (X, Y, Z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crossmodalnet.data.io import Geometry
from crossmodalnet.data.phantom.anatomy import rotation_matrix
from crossmodalnet.data.phantom.render import BSplineField
from crossmodalnet.errors import CrossModalNetError

__all__ = ["grid_axes", "make_grid", "RigidElastic", "resample_linear"]


def grid_axes(geometry: Geometry) -> list[np.ndarray]:
    """World coordinate of each grid line (an axis-aligned grid: diagonal affine)."""
    a = geometry.affine
    if not np.allclose(a[:3, :3], np.diag(np.diag(a[:3, :3]))):
        raise CrossModalNetError("phantom grids must be axis-aligned (diagonal affine)")
    return [a[k, k] * np.arange(n) + a[k, 3] for k, n in enumerate(geometry.shape)]


def make_grid(center: np.ndarray, shape: tuple[int, int, int], spacing: np.ndarray) -> Geometry:
    """LPS-ordered voxel axes (the DICOM habit, RAS diagonal -s, -s, +s) centred on `center`."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = np.asarray(center) - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return Geometry(affine=affine, shape=tuple(int(n) for n in shape))


@dataclass(frozen=True)
class RigidElastic:
    """p -> rotation (p - center) + center + translation + u(p): a world point (RAS mm) of the moving
    image -> the world point of the CT that shows the same anatomy. u is a B-spline displacement."""

    rotation: np.ndarray
    center: np.ndarray
    translation: np.ndarray
    elastic: BSplineField
    rotation_deg: tuple[float, float, float]

    @classmethod
    def random(cls, rng: np.random.Generator, center: np.ndarray, rot_deg: float, shift_mm: float,
               elastic_mm: float, box_mm: float) -> RigidElastic:
        angles = np.clip(rng.normal(0, rot_deg, 3), -2 * rot_deg, 2 * rot_deg)
        shift = np.clip(rng.normal(0, shift_mm, 3), -2 * shift_mm, 2 * shift_mm)
        # elastic_mm: rms length of the displacement (each of the 3 components gets 1/sqrt(3) of it).
        el = BSplineField.random(rng, center - box_mm / 2, center + box_mm / 2, 50.0, elastic_mm / np.sqrt(3), 3)
        return cls(rotation_matrix(angles), np.asarray(center, float), shift, el, tuple(float(a) for a in angles))

    def on_grid(self, geometry: Geometry) -> np.ndarray:
        """(3, X, Y, Z) world points that the voxels of `geometry` show."""
        axes = grid_axes(geometry)
        rel = [ax - c for ax, c in zip(axes, self.center, strict=True)]
        out = self.elastic.on_grid(axes)
        for k in range(3):
            out[k] += (self.rotation[k, 0] * rel[0][:, None, None] + self.rotation[k, 1] * rel[1][None, :, None]
                       + self.rotation[k, 2] * rel[2][None, None, :] + self.center[k] + self.translation[k])
        return out

    def matrix(self) -> np.ndarray:
        """4x4 of the rigid part (without u)."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.center + self.translation - self.rotation @ self.center
        return m

    def describe(self, geometry: Geometry, full: bool = True) -> dict:
        """JSON-ready parameters; `full` adds the B-spline coefficients (exact reconstruction)."""
        u = self.elastic.on_grid(grid_axes(geometry))
        mag = np.sqrt((u**2).sum(0))
        out = {"convention": "p_ct = M[:3,:3] @ p + M[:3,3] + u(p), p and p_ct world RAS mm; "
                             "u(p)_c = sum_j coefficients[c,j] B3((p - origin)/spacing - j), B3 the cubic B-spline",
               "matrix": np.round(self.matrix(), 6).tolist(), "rotation_deg": np.round(self.rotation_deg, 3).tolist(),
               "rotation_center_mm": np.round(self.center, 3).tolist(),
               "translation_mm": np.round(self.translation, 3).tolist(),
               "elastic_rms_mm": round(float(np.sqrt((mag**2).mean())), 3),
               "elastic_max_mm": round(float(mag.max()), 3)}
        if full:
            out["elastic"] = {"origin_mm": self.elastic.origin.tolist(), "spacing_mm": self.elastic.spacing.tolist(),
                              "coefficients_mm": np.round(self.elastic.coefficients.astype(float), 4).tolist()}
        return out



def resample_linear(arr: np.ndarray, src: Geometry, dst: Geometry) -> np.ndarray:
    """Trilinear resampling between axis-aligned grids (separable: three small matrix products)."""
    mats = []
    for s_ax, d_ax in zip(grid_axes(src), grid_axes(dst), strict=True):
        t = np.clip((d_ax - s_ax[0]) / (s_ax[1] - s_ax[0]), 0, len(s_ax) - 1)
        i0 = np.minimum(np.floor(t).astype(int), len(s_ax) - 2)
        f = t - i0
        m = np.zeros((len(d_ax), len(s_ax)), dtype=np.float32)
        m[np.arange(len(d_ax)), i0] = 1 - f
        m[np.arange(len(d_ax)), i0 + 1] += f
        mats.append(m)
    out = np.tensordot(arr, mats[0], axes=(0, 1))  # Y, Z, X'
    out = np.tensordot(out, mats[1], axes=(0, 1))  # Z, X', Y'
    out = np.tensordot(out, mats[2], axes=(0, 1))  # X', Y', Z'
    return np.ascontiguousarray(out, dtype=np.float32)
