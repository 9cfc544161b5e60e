"""Synthetic paired CT/MR whole-heart phantoms: the embedded default data set and the test fixture.

Anatomy is a list of implicit shapes (ellipsoids, tubes along polylines) in a canonical frame
(LPS mm: x to the patient's left, y posterior, z superior; origin at the centre of the LV base),
painted in priority order. Each case draws its own sizes, wall thickness, vessel courses, heart
pose (rotation up to 15 degrees, scale +-10 %) and a smooth B-spline elastic deformation; the body
around the heart (thorax, lungs, spine, liver, fat, unlabelled vessels) is painted too, so that
intensity alone does not give the label. The anatomy is evaluated at any world points, so CT and
MR grids of one case show the same patient: CT on a size^3 grid of 144 mm, MR rasterized on its
own coarser grid, through a rigid + elastic misalignment, then rendered (`render.py`).

Outputs (`synthesize`): layout "dataset" writes imagesTr/, labelsTr/, imagesTs/, labelsTs/
(`case_000_ct.nii.gz`, `case_000_mr.nii.gz`, `case_000.nii.gz`), `dataset.json` and the sidecar
`phantom.json`; layout "mmwhs" writes the raw MM-WHS naming and `mmwhs_truth.json`.

Shapes: label maps (X, Y, Z) uint8 class indices; images (X, Y, Z) float32 in memory, int16 on disk
(HU for CT, as scanners write them); world coordinates are RAS mm.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from crossmodalnet.data.dataset import write_dataset_json
from crossmodalnet.data.io import Geometry, atomic_path, read_image, read_label, write_image, write_label
from crossmodalnet.data.labels import NAMES, STRUCTURES, colormap, to_codes
from crossmodalnet.data.render import BSplineField, Domain, Tissue, get_domain, render_from_labels
from crossmodalnet.errors import CrossModalNetError

__all__ = [
    "FOV_MM",
    "Anatomy",
    "RigidElastic",
    "PhantomCase",
    "sample_anatomy",
    "rasterize",
    "generate_case",
    "split_cases",
    "write_preview",
    "synthesize",
]

FOV_MM = 144.0  # CT field of view of the dataset layout: a heart (~12 cm) with a rim of surroundings
MYO, LA, LV, RA, RV, AO, PA = (s.index for s in STRUCTURES)
_LPS = np.array([-1.0, -1.0, 1.0])  # RAS world <-> LPS anatomical frame (its own inverse)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _rotation(deg: np.ndarray) -> np.ndarray:
    """Rz @ Ry @ Rx for angles (rx, ry, rz) in degrees."""
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# ----------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class _Ellipsoid:
    """Ellipsoid with semi-axes `radii` along the rows of `axes`; optionally only n.q >= clip_offset."""

    center: np.ndarray
    axes: np.ndarray
    radii: np.ndarray
    clip_normal: np.ndarray | None = None
    clip_offset: float = 0.0

    def sdf(self, q: np.ndarray) -> np.ndarray:
        """Approximate signed distance in mm (first order, exact on the surface) for q (3, ...)."""
        d = [q[k] - np.float32(self.center[k]) for k in range(3)]
        k0 = k1 = 0.0
        for row, r in zip(self.axes.astype(np.float32), self.radii.astype(np.float32), strict=True):
            loc = d[0] * row[0] + d[1] * row[1] + d[2] * row[2]
            k0 = k0 + (loc / r) ** 2
            k1 = k1 + (loc / (r * r)) ** 2
        k0, k1 = np.sqrt(k0), np.sqrt(k1)
        out = k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)
        if self.clip_normal is not None:
            n = self.clip_normal.astype(np.float32)
            out = np.maximum(out, np.float32(self.clip_offset) - (q[0] * n[0] + q[1] * n[1] + q[2] * n[2]))
        return out

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.radii[:, None] * self.axes) ** 2).sum(0))
        return self.center - half, self.center + half


@dataclass(frozen=True)
class _Tube:
    """Chain of capsules along `points` (K, 3) with radii (K,); flat ends cut a label like a plane."""

    points: np.ndarray
    radii: np.ndarray
    flat_start: bool = False
    flat_end: bool = False

    def sdf(self, q: np.ndarray) -> np.ndarray:
        out = None
        for i in range(len(self.points) - 1):
            a, b = self.points[i].astype(np.float32), self.points[i + 1].astype(np.float32)
            ab = b - a
            length = float(np.linalg.norm(ab))
            qa = [q[k] - a[k] for k in range(3)]
            t_raw = (qa[0] * ab[0] + qa[1] * ab[1] + qa[2] * ab[2]) / (length * length)
            t = np.clip(t_raw, 0.0, 1.0)
            dist = np.sqrt(sum((qa[k] - t * ab[k]) ** 2 for k in range(3)))
            d = dist - (self.radii[i] + t * (self.radii[i + 1] - self.radii[i]))
            if self.flat_start and i == 0:
                d = np.maximum(d, -t_raw * length)
            if self.flat_end and i == len(self.points) - 2:
                d = np.maximum(d, (t_raw - 1.0) * length)
            out = d if out is None else np.minimum(out, d)
        return out

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        r = float(self.radii.max())
        return self.points.min(0) - r, self.points.max(0) + r


@dataclass(frozen=True)
class _Part:
    """One painted shape: its label (0 = unlabelled), tissue, wall and the frame it lives in."""

    name: str
    shape: _Ellipsoid | _Tube
    label: int
    tissue: Tissue
    frame: str = "heart"  # "heart" moves with the heart's pose, "body" with the thorax
    wall_mm: float = 0.0
    wall_tissue: Tissue = Tissue.MYOCARDIUM
    fat: bool = True  # part of the envelope that epicardial / mediastinal fat surrounds
    into: Tissue | None = None  # paint only over this tissue (lung vessels stay inside the lung)


@dataclass(frozen=True)
class _Body:
    """Thorax around the heart, in the canonical frame (mm)."""

    mid_x: float  # midline
    center_y: float
    semi: tuple[float, float]  # body ellipse semi-axes (left-right, antero-posterior)
    fat_mm: float  # subcutaneous fat
    vert_y: float  # centre of the vertebral body
    diaphragm_z: float  # top of the right hemidiaphragm (liver dome)
    rib_phase: float


@dataclass(frozen=True)
class Anatomy:
    """One patient: parts in painting order (later overwrites earlier) and where they sit in the world.

    Canonical body coords b = LPS(p + u(p) - world_center) + heart_center for a world point p (RAS mm)
    and elastic displacement u; heart coords h = rotation^T (b - heart_center) / scale + heart_center.
    """

    parts: tuple[_Part, ...]
    body: _Body
    heart_center: np.ndarray
    rotation: np.ndarray
    scale: float
    world_center: np.ndarray
    elastic: BSplineField
    fat_waves: np.ndarray  # (4, 5): wave vector (3), phase, amplitude of the epicardial fat thickness
    params: dict = field(default_factory=dict)

    def fov_center(self) -> np.ndarray:
        """World (RAS) centre of the CT field of view: heart centre, a little posterior for the spine."""
        return self.world_center + _LPS * np.asarray(self.params["fov_offset_mm"])


def sample_anatomy(rng: np.random.Generator, min_wall_mm: float = 0.0) -> Anatomy:
    """Draw one patient. min_wall_mm: thinnest myocardium/lid allowed (keeps coarse grids closed)."""
    jit = lambda v, mm: np.asarray(v, float) + rng.normal(0.0, mm, 3)  # noqa: E731
    rel = lambda x, r=0.08: float(x) * rng.uniform(1 - r, 1 + r)  # noqa: E731
    parts: list[_Part] = []

    # LV long axis: base -> apex points anterior, left and inferior (~45 deg off sagittal, ~25 deg down).
    u = _unit(_rotation(rng.normal(0, 4, 3)) @ _unit([0.64, -0.64, -0.42]))
    e1 = _unit(np.array([-0.6, -0.8, 0.0]) - np.dot([-0.6, -0.8, 0.0], u) * u)  # septal: towards the RV
    e2 = np.cross(u, e1)
    frame = np.stack([u, e1, e2])
    k_len, k_wid = rng.uniform(0.92, 1.08), rng.uniform(0.92, 1.08)
    a_lv, c_lv, b1, b2 = 54 * k_len, 29 * k_len, 23 * k_wid, 25 * k_wid
    t_myo = max(rng.uniform(8.5, 11.5), min_wall_mm)  # LV wall 8-12 mm
    t_apex = max(0.75 * t_myo, min_wall_mm)  # thinner at the apex
    lid = max(3.0, 2.0 * min_wall_mm / 1.8)  # fibrous base between the valves, >= 2 voxels thick
    myo_radii = np.array([a_lv + t_apex, b1 + t_myo, b2 + t_myo])

    mitral = -7.0 * e1 + rng.normal(0, 1.0) * e2  # mitral orifice centre in the base plane
    aortic = 12.0 * e1 + 2.0 * e2  # aortic orifice: anterior-septal of the mitral
    la_c = jit(mitral - 26 * u + np.array([8.0, 4.0, 2.0]), 2.0)
    ra_c = jit(la_c + np.array([-34.0, -16.0, -5.0]), 2.5)
    rv_c = 26 * k_len * u + 21 * e1 + 1 * e2
    pv = jit(aortic + np.array([12.0, -15.0, 15.0]), 2.0)  # pulmonary valve: anterior-left-superior
    r_ao, r_pa = rel(13.5), rel(12.5)

    # Unlabelled blood first (lowest priority): great-vessel continuations, veins.
    ao_cut = jit(aortic + np.array([-7.0, 3.0, 48.0]), 2.0)
    arch = [ao_cut, aortic + np.array([-1.0, 14.0, 64.0]), aortic + np.array([10.0, 28.0, 72.0]),
            aortic + np.array([22.0, 42.0, 66.0]), aortic + np.array([27.0, 50.0, 52.0])]
    parts.append(_Part("aortic arch", _Tube(np.array(arch), np.array([r_ao, r_ao, 12.5, 12, 11.5])), 0,
                       Tissue.BLOOD_LEFT, wall_mm=2.0, wall_tissue=Tissue.SOFT))
    pa_cut = jit(pv + np.array([7.0, 16.0, 24.0]), 2.0)
    parts.append(_Part("right pulmonary artery", _Tube(np.array(
        [pa_cut, pv + np.array([-6.0, 30.0, 28.0]), pv + np.array([-40.0, 36.0, 24.0])]), np.array([10.5, 9.5, 8.5])),
        0, Tissue.BLOOD_RIGHT, wall_mm=1.5, wall_tissue=Tissue.SOFT))
    parts.append(_Part("left pulmonary artery", _Tube(np.array(
        [pa_cut, pv + np.array([22.0, 28.0, 30.0]), pv + np.array([42.0, 44.0, 24.0])]), np.array([10.5, 9.5, 8.5])),
        0, Tissue.BLOOD_RIGHT, wall_mm=1.5, wall_tissue=Tissue.SOFT))
    hila = (pv + np.array([-40.0, 36.0, 24.0]), pv + np.array([42.0, 44.0, 24.0]))
    for side, hilum in zip((-1.0, 1.0), hila, strict=True):  # lung vessels fanning out of each hilum
        for _ in range(7):
            way = _unit(np.array([side * rng.uniform(0.3, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(-1.0, 1.0)]))
            bend = _unit(way + rng.normal(0, 0.3, 3))
            length = rng.uniform(50.0, 90.0)
            path = np.array([hilum, hilum + 0.5 * length * way, hilum + 0.5 * length * (way + bend)])
            parts.append(_Part("lung vessel", _Tube(path, np.array([4.5, 3.0, 1.5])), 0, Tissue.BLOOD_RIGHT,
                               fat=False, into=Tissue.LUNG))
    for side in (-1.0, 1.0):  # pulmonary veins into the LA, two each side
        for dz in (9.0, -9.0):
            start = la_c + np.array([14.0 * side, 6.0, dz])
            end = jit(la_c + np.array([46.0 * side, 24.0, 1.6 * dz]), 3.0)
            parts.append(_Part("pulmonary vein", _Tube(np.array([start, end]), np.array([7.0, 6.0])), 0,
                               Tissue.BLOOD_LEFT, wall_mm=1.0, wall_tissue=Tissue.SOFT))
    parts.append(_Part("superior vena cava", _Tube(np.array(
        [ra_c + np.array([-6.0, 6.0, 14.0]), ra_c + np.array([-9.0, 8.0, 95.0])]), np.array([9.5, 9.5])),
        0, Tissue.BLOOD_RIGHT, wall_mm=1.0, wall_tissue=Tissue.SOFT))
    parts.append(_Part("inferior vena cava", _Tube(np.array(
        [ra_c + np.array([0.0, 6.0, -14.0]), ra_c + np.array([2.0, 12.0, -110.0])]), np.array([11.0, 11.0])),
        0, Tissue.BLOOD_RIGHT, wall_mm=1.0, wall_tissue=Tissue.SOFT))

    # Labelled chambers and vessels, in the priority order that makes their junctions right.
    parts.append(_Part("RA", _Ellipsoid(ra_c, _rotation(rng.normal(0, 8, 3)), np.array(
        [rel(23.0), rel(20.0), rel(25.0)])), RA, Tissue.BLOOD_RIGHT, wall_mm=2.5))
    parts.append(_Part("RV", _Ellipsoid(rv_c, frame, np.array([rel(44.0), rel(30.0), rel(32.0)])), RV,
                       Tissue.BLOOD_RIGHT, wall_mm=3.5))
    rvot0 = 8 * u + 30 * e1 - 6 * e2
    parts.append(_Part("RVOT", _Tube(np.array([rvot0, 0.5 * (rvot0 + pv) + np.array([0.0, -4.0, 0.0]), pv]),
                                     np.array([14.0, 13.5, r_pa])), RV, Tissue.BLOOD_RIGHT, wall_mm=3.0))
    parts.append(_Part("PA", _Tube(np.array([pv, pv + np.array([3.0, 5.0, 12.0]), pa_cut]), np.array(
        [r_pa, r_pa, r_pa]), flat_start=True, flat_end=True), PA, Tissue.BLOOD_RIGHT, wall_mm=1.5,
        wall_tissue=Tissue.SOFT))
    # The base: myocardium a little beyond the base plane; LA and AO then open the two valves in it.
    parts.append(_Part("MYO base", _Ellipsoid(c_lv * u, frame, myo_radii, u, -lid), MYO, Tissue.MYOCARDIUM))
    parts.append(_Part("LA", _Ellipsoid(la_c, _rotation(rng.normal(0, 8, 3)), np.array(
        [rel(27.0), rel(18.0), rel(21.0)])), LA, Tissue.BLOOD_LEFT, wall_mm=2.5))
    parts.append(_Part("mitral inflow", _Tube(np.array([la_c, mitral + 2.0 * u]), np.array([12.5, 12.5])), LA,
                       Tissue.BLOOD_LEFT, wall_mm=2.5))
    ao_path = np.array([aortic + 3.0 * u, aortic, aortic + np.array([-5.0, -4.0, 16.0]),
                        aortic + np.array([-9.0, -2.0, 32.0]), ao_cut])
    parts.append(_Part("AO", _Tube(ao_path, np.array([11.0, 11.5, r_ao, r_ao, r_ao]), flat_end=True), AO,
                       Tissue.BLOOD_LEFT, wall_mm=2.0, wall_tissue=Tissue.SOFT))
    parts.append(_Part("MYO", _Ellipsoid(c_lv * u, frame, myo_radii, u, 0.0), MYO, Tissue.MYOCARDIUM))
    parts.append(_Part("LV", _Ellipsoid(c_lv * u, frame, np.array([a_lv, b1, b2]), u, 0.0), LV,
                       Tissue.BLOOD_LEFT))
    for side in (-1.0, 1.0):  # papillary muscles: myocardium inside the LV label, as MM-WHS draws it
        pm = (c_lv + 14) * u - 0.45 * b1 * e1 + side * 0.5 * b2 * e2
        parts.append(_Part("papillary muscle", _Ellipsoid(pm, frame, np.array([rel(13.0), 4.0, 4.5])), LV,
                           Tissue.MYOCARDIUM, fat=False))

    # Heart centre: middle of the labelled structures' extent; the pose rotates about it.
    boxes = np.array([p.shape.bbox() for p in parts if p.label])
    heart_center = 0.5 * (boxes[:, 0].min(0) + boxes[:, 1].max(0))
    body = _Body(mid_x=rng.normal(-12.0, 3.0), center_y=36.0, semi=(rel(155.0), rel(118.0)),
                 fat_mm=rng.uniform(8.0, 20.0), vert_y=rng.normal(82.0, 3.0),
                 diaphragm_z=heart_center[2] + rng.normal(-38.0, 4.0), rib_phase=rng.uniform(0, 1))
    # Descending aorta: beside the spine, so it lives in the body frame.
    desc = np.array([aortic + np.array([27.0, 50.0, 52.0]), [body.mid_x + 27.0, body.vert_y - 26.0, 0.0],
                     [body.mid_x + 25.0, body.vert_y - 24.0, -180.0]])
    desc[1, 2] = desc[0, 2] - 40.0
    parts.insert(0, _Part("descending aorta", _Tube(desc, np.array([11.5, 11.0, 10.5])), 0, Tissue.BLOOD_LEFT,
                          frame="body", wall_mm=2.0, wall_tissue=Tissue.SOFT))

    angles = np.clip(rng.normal(0.0, 7.0, 3), -15.0, 15.0)
    scale = rng.uniform(0.9, 1.1)
    world_center = np.array([-25.0, 15.0, -150.0]) + rng.normal(0, 5.0, 3)  # a plausible scanner position
    # Smooth shape variation: ~4 mm rms displacement, control points 40 mm apart (no folding).
    elastic = BSplineField.random(rng, world_center - 180, world_center + 180, 40.0, 4.0 / np.sqrt(3), channels=3)
    waves = np.concatenate([np.stack([_unit(rng.normal(size=3)) * 2 * np.pi / rng.uniform(35, 90)
                                      for _ in range(4)]), rng.uniform(0, 2 * np.pi, (4, 1)),
                            rng.uniform(1.2, 2.2, (4, 1))], axis=1)
    params = {"scale": round(float(scale), 4), "rotation_deg": np.round(angles, 2).tolist(),
              "myocardium_mm": round(float(t_myo), 2), "lv_length_mm": round(float(2 * a_lv), 1),
              "fov_offset_mm": np.round(np.array([0.0, 6.0, 0.0]) + rng.normal(0, 3.0, 3), 2).tolist()}
    return Anatomy(tuple(parts), body, heart_center, _rotation(angles), float(scale), world_center, elastic,
                   waves.astype(np.float32), params)


# ----------------------------------------------------------------------------- transforms
def _grid_axes(geometry: Geometry) -> list[np.ndarray]:
    """World coordinate of each grid line (an axis-aligned grid: diagonal affine)."""
    a = geometry.affine
    if not np.allclose(a[:3, :3], np.diag(np.diag(a[:3, :3]))):
        raise CrossModalNetError("phantom grids must be axis-aligned (diagonal affine)")
    return [a[k, k] * np.arange(n) + a[k, 3] for k, n in enumerate(geometry.shape)]


def _grid(center: np.ndarray, shape: tuple[int, int, int], spacing: np.ndarray) -> Geometry:
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
        return cls(_rotation(angles), np.asarray(center, float), shift, el, tuple(float(a) for a in angles))

    def on_grid(self, geometry: Geometry) -> np.ndarray:
        """(3, X, Y, Z) world points that the voxels of `geometry` show."""
        axes = _grid_axes(geometry)
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
        u = self.elastic.on_grid(_grid_axes(geometry))
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


# ----------------------------------------------------------------------------- rasterization
def _paint_body(b: np.ndarray, body: _Body) -> np.ndarray:
    """Tissue (X, Y, Z) uint8 of the thorax in body coords b (3, X, Y, Z)."""
    x, y, z = b[0] - body.mid_x, b[1] - body.center_y, b[2]
    tissue = np.full(x.shape, Tissue.AIR, dtype=np.uint8)
    r = np.sqrt((x / body.semi[0]) ** 2 + (y / body.semi[1]) ** 2)
    depth = (1.0 - r) * np.sqrt(x**2 + y**2) / np.maximum(r, 1e-3)  # mm below the skin along the ray
    tissue[depth > 0] = Tissue.FAT
    tissue[depth > body.fat_mm] = Tissue.MUSCLE
    ribs = (depth > body.fat_mm + 10) & (depth <= body.fat_mm + 20)
    # Ribs run obliquely (down towards the front): bands in z + 0.35 y.
    rib_band = np.cos(2 * np.pi * ((z + 0.35 * b[1]) / 26.0 + body.rib_phase)) > 0.35
    tissue[ribs & rib_band] = Tissue.BONE
    tissue[ribs & (np.abs(x) < 16) & (y < 0)] = Tissue.MARROW  # sternum
    tissue[depth > body.fat_mm + 20] = Tissue.LUNG
    # Abdomen under the diaphragm: liver dome on the right, stomach/spleen (soft) on the left.
    liver = ((x + 55) / 110) ** 2 + ((y + 8) / 100) ** 2 + ((z - body.diaphragm_z + 88) / 88) ** 2
    left = ((x - 60) / 95) ** 2 + ((y + 5) / 95) ** 2 + ((z - body.diaphragm_z + 108) / 88) ** 2
    inside = depth > body.fat_mm + 20
    tissue[inside & (np.minimum(liver, left) < 1.1)] = Tissue.MUSCLE  # diaphragm
    tissue[inside & (left < 1.0)] = Tissue.SOFT
    tissue[inside & (liver < 1.0)] = Tissue.LIVER
    # Mediastinum: fat between sternum and spine.
    vy = body.vert_y - body.center_y
    tissue[inside & (np.abs(x - 4) < 16 + 0.1 * (y + 60)) & (z > body.diaphragm_z - 5) & (y < vy)] = Tissue.FAT
    # Spine: paraspinal muscle, vertebral body (marrow, cortex, discs), canal, posterior arch.
    tissue[(depth > 0) & (np.abs(x) < 55) & (y > vy - 5)] = Tissue.MUSCLE
    vb = (x / 21) ** 2 + ((y - vy) / 17) ** 2
    tissue[vb < 1.0] = Tissue.BONE
    disc = np.mod(z / 27.0 + body.rib_phase, 1.0) < 0.2
    tissue[(vb < 0.72) & ~disc] = Tissue.MARROW
    tissue[(vb < 0.9) & disc] = Tissue.SOFT
    canal = np.sqrt(x**2 + (y - vy - 26) ** 2)
    tissue[(canal < 15) & (y > vy + 10)] = Tissue.BONE
    tissue[canal < 9] = Tissue.CSF
    oes = np.sqrt((x - 6) ** 2 + (y - vy + 26) ** 2)  # oesophagus, with a little air in its lumen
    tissue[(oes < 8) & (z > body.diaphragm_z - 10)] = Tissue.SOFT
    tissue[(oes < 2.5) & (z > body.diaphragm_z - 10)] = Tissue.AIR
    return tissue


class _Cells:
    """The grid cut into cubic cells of `step` voxels, to evaluate a shape only near where it is.

    A shape's signed distance at the cell centres bounds it in the whole cell (distances are about
    1-Lipschitz in mm), so only voxels of cells within `band` + a cell's reach are evaluated.
    """

    def __init__(self, shape: tuple[int, int, int], step: int, spacing_mm: float, scale: float):
        self.step = step
        n = [int(np.ceil(s / step)) for s in shape]
        idx = [np.arange(m)[:, None] * step + np.arange(step)[None, :] for m in n]
        self.centers = tuple(np.minimum(np.arange(m) * step + step // 2, s - 1) for m, s in zip(n, shape, strict=True))
        flat = (idx[0][:, None, None, :, None, None] * (shape[1] * shape[2])
                + idx[1][None, :, None, None, :, None] * shape[2] + idx[2][None, None, :, None, None, :])
        outside = ((idx[0] >= shape[0])[:, None, None, :, None, None]
                   | (idx[1] >= shape[1])[None, :, None, None, :, None]
                   | (idx[2] >= shape[2])[None, None, :, None, None, :])
        # Flat voxel indices of each cell; -1 past the grid's edge (cells never overlap: no duplicates).
        self.voxels = np.where(outside, -1, flat).reshape(n[0] * n[1] * n[2], step**3)
        # Half a cell diagonal in the shape's own (heart) frame, with slack for the approximate
        # ellipsoid distance and the elastic stretch.
        self.reach = 2.5 * 0.87 * step * spacing_mm / scale

    def coarse(self, coords: np.ndarray) -> np.ndarray:
        """(3, X, Y, Z) -> (3, nx, ny, nz) at the cell centres."""
        cx, cy, cz = self.centers
        return coords[:, cx][:, :, cy][:, :, :, cz]

    def select(self, coarse_sdf: np.ndarray, band: float) -> np.ndarray:
        """Flat voxel indices of the cells whose centre lies within band + reach."""
        vox = self.voxels[np.flatnonzero(coarse_sdf.ravel() < band + self.reach)].ravel()
        return vox[vox >= 0]


_FAT_MAX_MM = 10.0  # thickest epicardial / mediastinal fat


def rasterize(anatomy: Anatomy, geometry: Geometry, warp: RigidElastic | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Label (class indices) and tissue maps, both (X, Y, Z) uint8, of `anatomy` on `geometry`.

    warp: the grid shows the anatomy at warp(p) instead of p (an MR grid seen through its misalignment).
    """
    axes = _grid_axes(geometry)
    if warp is None:
        pts = np.stack(np.meshgrid(*[a.astype(np.float32) for a in axes], indexing="ij"))
        disp = anatomy.elastic.on_grid(axes)
    else:
        pts = warp.on_grid(geometry)
        disp = anatomy.elastic.at(pts, step_mm=4.0)
    c = lambda v: np.asarray(v, np.float32).reshape(3, 1, 1, 1)  # noqa: E731
    body = c(_LPS) * (pts + disp - c(anatomy.world_center)) + c(anatomy.heart_center)
    del pts, disp
    rt = (anatomy.rotation.T / anatomy.scale).astype(np.float32)
    hc = anatomy.heart_center.astype(np.float32)

    def to_heart(b: np.ndarray) -> np.ndarray:  # body coords (3, ...) -> heart coords (3, ...)
        rel = [b[k] - hc[k] for k in range(3)]
        return np.stack([rt[k, 0] * rel[0] + rt[k, 1] * rel[1] + rt[k, 2] * rel[2] + hc[k] for k in range(3)])

    shape = geometry.shape
    cells = _Cells(shape, 4, float(max(geometry.spacing)), anatomy.scale)
    coarse_body = cells.coarse(body)
    coarse = {"body": coarse_body, "heart": to_heart(coarse_body)}
    flat_body = body.reshape(3, -1)

    tissue = _paint_body(body, anatomy.body).ravel()
    labels = np.zeros(tissue.shape, dtype=np.uint8)
    envelope = np.full(tissue.shape, 1e3, dtype=np.float32)  # distance to the nearest blood pool
    blocks = []
    for part in anatomy.parts:
        band = max(_FAT_MAX_MM, part.wall_mm) if part.fat else part.wall_mm
        vox = cells.select(part.shape.sdf(coarse[part.frame]), band)
        if vox.size == 0:
            continue
        q = flat_body[:, vox]
        d = part.shape.sdf(q if part.frame == "body" else to_heart(q))
        keep = d < band
        vox, d = vox[keep], d[keep]
        blocks.append((part, vox, d))
        if part.fat:
            envelope[vox] = np.minimum(envelope[vox], d)
    # Epicardial and mediastinal fat, of a thickness that varies smoothly over the heart.
    near = np.flatnonzero(envelope < _FAT_MAX_MM)
    h = to_heart(flat_body[:, near])
    w = anatomy.fat_waves
    thick = 3.5 + sum(w[i, 4] * np.sin(w[i, 0] * h[0] + w[i, 1] * h[1] + w[i, 2] * h[2] + w[i, 3]) for i in range(4))
    tissue[near[envelope[near] < np.clip(thick, 1.0, _FAT_MAX_MM)]] = Tissue.FAT
    for part, vox, d in blocks:  # walls (unlabelled) under every blood pool
        if part.wall_mm > 0:
            tissue[vox[d < part.wall_mm]] = part.wall_tissue
    for part, vox, d in blocks:
        inside = vox[d < 0]
        if part.into is not None:
            inside = inside[tissue[inside] == part.into]
        tissue[inside] = part.tissue
        if part.label:
            labels[inside] = part.label
    labels, tissue = labels.reshape(shape), tissue.reshape(shape)
    _make_consistent(labels, tissue)
    return labels, tissue


def _make_consistent(labels: np.ndarray, tissue: np.ndarray) -> None:
    """Fix what a coarse grid breaks, in place: the LV touches only MYO and its two valves (LA, AO),
    and each structure is one 6-connected component (stray fragments take the nearest other label)."""
    six = ndimage.generate_binary_structure(3, 1)
    for _ in range(4):
        changed = False
        boxes = ndimage.find_objects(labels, max_label=len(STRUCTURES))
        if boxes[LV - 1] is not None:
            sl = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in boxes[LV - 1])
            sub = labels[sl]
            lv = sub == LV
            shell = ndimage.binary_dilation(lv, six) & ~lv & ~np.isin(sub, (MYO, LA, AO))
            if shell.any():
                sub[shell], tissue[sl][shell], changed = MYO, Tissue.MYOCARDIUM, True
        for idx, box in enumerate(boxes, start=1):
            if box is None:
                continue
            sl = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)
            sub = labels[sl]
            comp, n = ndimage.label(sub == idx, six)
            if n <= 1:
                continue
            main = 1 + int(np.argmax(np.bincount(comp.ravel())[1:]))
            for j, fbox in enumerate(ndimage.find_objects(comp), start=1):
                if j == main:
                    continue
                # In a box one voxel wider, the nearest voxel of another structure relabels the fragment.
                fsl = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in fbox)
                fsub, frag = sub[fsl], comp[fsl] == j
                _, near = ndimage.distance_transform_edt(fsub == idx, return_indices=True)
                fsub[frag] = fsub[tuple(i[frag] for i in near)]
            changed = True
        if not changed:
            return


# ----------------------------------------------------------------------------- cases
@dataclass
class PhantomCase:
    """One synthetic patient. ct, label: (X, Y, Z) on `geometry`; mr on `mr_geometry` (the CT grid in
    the dataset layout); mr_label only in the mmwhs layout; meta: JSON-ready parameters."""

    ct: np.ndarray
    mr: np.ndarray
    label: np.ndarray
    geometry: Geometry
    mr_geometry: Geometry
    mr_label: np.ndarray | None
    tissue: np.ndarray
    meta: dict


def _resample_linear(arr: np.ndarray, src: Geometry, dst: Geometry) -> np.ndarray:
    """Trilinear resampling between axis-aligned grids (separable: three small matrix products)."""
    mats = []
    for s_ax, d_ax in zip(_grid_axes(src), _grid_axes(dst), strict=True):
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


def _domain_key(dom: Domain) -> int:
    # Each domain gets its own patients: a target set never repeats the source anatomy of one seed.
    return zlib.crc32(dom.name.encode())


def generate_case(seed: int, index: int, size: int = 96, domain: str | Domain = "source",
                  layout: str = "dataset") -> PhantomCase:
    """Make case `index` of the set drawn with `seed`: the same arguments give the same arrays."""
    _check_args(1, size, seed, layout)
    dom = get_domain(domain)
    ss = np.random.SeedSequence([int(seed), int(index), _domain_key(dom)])
    anat_ss, warp_ss, ct_ss, mr_ss = ss.spawn(4)
    ct_spacing = np.full(3, FOV_MM / size)
    anatomy = sample_anatomy(np.random.default_rng(anat_ss), min_wall_mm=1.8 * float(ct_spacing.max()))
    center = anatomy.fov_center()
    geometry = _grid(center, (size, size, size), ct_spacing)
    label, tissue = rasterize(anatomy, geometry)
    ct = render_from_labels(label, ct_spacing, "CT", dom, int(ct_ss.generate_state(1)[0]), tissue=tissue)

    rng = np.random.default_rng(warp_ss)
    mr_spacing = ct_spacing * np.asarray(dom.mr_voxel)
    if layout == "dataset":
        # Registered MR: on the CT grid, but acquired coarser and left with a residual error.
        warp = RigidElastic.random(rng, center, rot_deg=1.0, shift_mm=1.0, elastic_mm=1.0, box_mm=FOV_MM + 40)
        mr_shape = tuple(int(np.ceil(FOV_MM / s)) + 1 for s in mr_spacing)
        acq = _grid(center, mr_shape, mr_spacing)
    else:
        # Raw MM-WHS: another scanner, another field of view and position, not registered.
        warp = RigidElastic.random(rng, center, rot_deg=5.0, shift_mm=6.0, elastic_mm=3.0, box_mm=1.6 * FOV_MM)
        mr_fov = FOV_MM * np.array([1.25, 1.25, 1.15])
        mr_shape = tuple(int(np.ceil(f / s)) for f, s in zip(mr_fov, mr_spacing, strict=True))
        mr_center = center - warp.rotation.T @ warp.translation + rng.normal(0, 4.0, 3)
        acq = _grid(mr_center, mr_shape, mr_spacing)
    mr_label, mr_tissue = rasterize(anatomy, acq, warp)
    mr = render_from_labels(mr_label, mr_spacing, "MR", dom, int(mr_ss.generate_state(1)[0]), tissue=mr_tissue)
    meta = {"anatomy": anatomy.params, "domain": dom.name}
    if layout == "dataset":
        mr = _resample_linear(mr, acq, geometry)
        meta["mr_acquisition_spacing_mm"] = np.round(mr_spacing, 4).tolist()
        meta["mr_residual"] = warp.describe(geometry)
        return PhantomCase(ct, mr, label, geometry, geometry, None, tissue, meta)
    meta["mr_to_ct"] = warp.describe(acq)
    return PhantomCase(ct, mr, label, geometry, acq, mr_label, tissue, meta)


def split_cases(ids: list[str], seed: int) -> dict[str, list[str]]:
    """Deterministic training / validation / test split (70/10/20 %, each split non-empty from 3 cases)."""
    order = [ids[i] for i in np.random.default_rng([int(seed), 1]).permutation(len(ids))]
    n = len(ids)
    n_test = max(1, round(0.2 * n)) if n >= 2 else 0
    n_val = max(1, round(0.1 * n)) if n >= 3 else 0
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return {"training": sorted(train), "validation": sorted(val), "test": sorted(test)}


# ----------------------------------------------------------------------------- writing
def _write_dataset_case(out: Path, case_id: str, test: bool, case: PhantomCase) -> dict:
    img, lab = ("imagesTs", "labelsTs") if test else ("imagesTr", "labelsTr")
    entry = {"id": case_id, "ct": f"{img}/{case_id}_ct.nii.gz", "mr": f"{img}/{case_id}_mr.nii.gz",
             "label": f"{lab}/{case_id}.nii.gz"}
    # Integers on disk, as scanners write them (HU for CT); half the bytes to compress.
    write_image(out / entry["ct"], np.rint(case.ct), case.geometry, dtype=np.int16)
    write_image(out / entry["mr"], np.rint(case.mr), case.geometry, dtype=np.int16)
    write_label(out / entry["label"], case.label, case.geometry)
    return entry


def _write_mmwhs_case(out: Path, number: int, case: PhantomCase) -> None:
    for mod, img, lab, geom in (("ct", case.ct, case.label, case.geometry),
                                ("mr", case.mr, case.mr_label, case.mr_geometry)):
        stem = out / f"{mod}_train" / f"{mod}_train_{number}"
        # The released MM-WHS volumes are integers (HU for CT) with MM-WHS codes in the labels.
        write_image(f"{stem}_image.nii.gz", np.rint(img), geom, dtype=np.int16)
        write_label(f"{stem}_label.nii.gz", to_codes(lab), geom)


def _make_and_write(job: tuple) -> tuple[str, dict]:
    out, i, case_id, test, size, seed, dom, layout = job
    case = generate_case(seed, i, size, dom, layout)
    if layout == "dataset":
        return case_id, {"entry": _write_dataset_case(out, case_id, test, case), **case.meta}
    _write_mmwhs_case(out, 1001 + i, case)
    meta = {**case.meta, "ct": {"shape": list(case.geometry.shape), "spacing_mm": list(case.geometry.spacing)},
            "mr": {"shape": list(case.mr_geometry.shape), "spacing_mm": list(case.mr_geometry.spacing)}}
    return case_id, meta


def _mid_slices(vol: np.ndarray, center: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices as displayed: anterior / superior up, patient right on the left."""
    i, j, k = center
    return [vol[:, :, k].T, vol[:, j, :].T[::-1], vol[i, :, :].T[::-1]]


def write_preview(path: str | os.PathLike, ct: np.ndarray, mr: np.ndarray, label: np.ndarray,
                  geometry: Geometry, mr_geometry: Geometry | None = None, title: str = "") -> Path:
    """PNG montage: rows CT, MR, CT + label overlay; columns axial, coronal, sagittal through the heart."""
    # The Agg canvas on a bare Figure: no pyplot, so the caller's backend and figures are untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    mr_geometry = mr_geometry or geometry
    com = ndimage.center_of_mass(label > 0)
    center = tuple(int(round(c)) for c in com)
    # The same world point on the MR grid (its own voxel axes when the grids differ).
    world = geometry.affine @ np.array([*center, 1.0])
    mr_center = np.linalg.solve(mr_geometry.affine, world)[:3]
    mr_center = tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(mr_center, mr_geometry.shape, strict=True))
    sp, mr_sp = geometry.spacing, mr_geometry.spacing
    # Pixel height / width of the axial, coronal and sagittal slices.
    aspects = [sp[1] / sp[0], sp[2] / sp[0], sp[2] / sp[1]]
    mr_aspects = [mr_sp[1] / mr_sp[0], mr_sp[2] / mr_sp[0], mr_sp[2] / mr_sp[1]]
    lo, hi = np.percentile(mr, [1, 99.5])
    fig = Figure(figsize=(11, 11))
    FigureCanvasAgg(fig)
    axs = fig.subplots(3, 3)
    rows = [("CT (W 700 / L 150)", _mid_slices(ct, center), dict(cmap="gray", vmin=-200, vmax=500), aspects),
            ("MR", _mid_slices(mr, mr_center), dict(cmap="gray", vmin=lo, vmax=hi), mr_aspects)]
    for r, (name, slices, kw, asp) in enumerate(rows):
        for c, (sl, a) in enumerate(zip(slices, asp, strict=True)):
            axs[r, c].imshow(sl, aspect=a, interpolation="nearest", **kw)
            axs[r, c].set_title(f"{name}, {['axial', 'coronal', 'sagittal'][c]}", fontsize=9)
    cmap = ListedColormap(colormap())
    for c, (sl, lab, a) in enumerate(zip(_mid_slices(ct, center), _mid_slices(label, center), aspects, strict=True)):
        axs[2, c].imshow(sl, cmap="gray", vmin=-200, vmax=500, aspect=a, interpolation="nearest")
        axs[2, c].imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0, vmax=len(NAMES), alpha=0.45,
                         aspect=a, interpolation="nearest")
        axs[2, c].set_title(f"labels, {['axial', 'coronal', 'sagittal'][c]}", fontsize=9)
    for ax in axs.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=colormap()[s.index][:3]) for s in STRUCTURES]
    fig.legend(handles, NAMES, loc="lower center", ncol=len(NAMES), fontsize=9)
    fig.suptitle(title or "synthetic paired CT/MR heart phantom", fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    return Path(path)


def _json_text(meta: dict) -> str:
    """Indented settings, then one line per case (B-spline coefficients make a case long)."""
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items() if k != "cases")
    cases = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in meta["cases"].items())
    return "{\n" + head + ',\n "cases": {\n' + cases + "\n }\n}\n"


def _check_args(cases: int, size: int, seed: int, layout: str) -> None:
    if isinstance(cases, bool) or not isinstance(cases, int | np.integer) or cases < 1:
        raise CrossModalNetError(f"--cases must be a whole number >= 1, got {cases!r}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 16 <= size <= 256:
        raise CrossModalNetError(f"--size must be a whole number from 16 to 256 voxels, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise CrossModalNetError(f"--seed must be a whole number >= 0, got {seed!r}")
    if layout not in ("dataset", "mmwhs"):
        raise CrossModalNetError(f"layout must be 'dataset' or 'mmwhs', got {layout!r}")


def synthesize(out: str | os.PathLike, cases: int = 20, size: int = 96, seed: int = 0,
               domain: str | Domain = "source", layout: str = "dataset", preview: bool = False,
               workers: int | None = None) -> Path:
    """Write `cases` synthetic CT/MR pairs into `out` and return `out`.

    layout "dataset": NIfTI on one grid + dataset.json (split by `seed`) + phantom.json (per-case
    anatomy and residual MR misalignment). layout "mmwhs": raw MM-WHS names and codes, CT and MR on
    different grids, misaligned; mmwhs_truth.json holds each case's MR -> CT transform.
    workers: processes (default: up to 2 for big jobs). Same arguments give byte-identical files.
    """
    _check_args(cases, size, seed, layout)
    dom = get_domain(domain)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CrossModalNetError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    width = max(3, len(str(cases - 1)))
    if layout == "dataset":
        ids = [f"case_{i:0{width}d}" for i in range(cases)]
    else:
        ids = [str(1001 + i) for i in range(cases)]  # MM-WHS numbering
    split = split_cases(ids, seed) if layout == "dataset" else {"training": ids}
    test = set(split.get("test", []))
    jobs = [(out, i, cid, cid in test, int(size), int(seed), dom, layout) for i, cid in enumerate(ids)]
    if workers is None:
        workers = min(2, os.cpu_count() or 1, cases) if cases * size**3 >= 4 * 64**3 else 1
    results: dict[str, dict] = {}
    with tqdm(total=cases, desc=f"synth {layout} ({dom.name})", unit="case", disable=None) as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for cid, meta in pool.map(_make_and_write, jobs):
                    results[cid] = meta
                    bar.update()
        else:
            for job in jobs:
                cid, meta = _make_and_write(job)
                results[cid] = meta
                bar.update()

    settings = {"generator": "crossmodalnet.data.phantom", "seed": int(seed), "size": int(size), "layout": layout,
                "domain": asdict(dom)}
    if layout == "dataset":
        entries = {cid: results[cid].pop("entry") for cid in ids}
        sidecar = {**settings, "ct_spacing_mm": FOV_MM / size, "cases": results}
        with atomic_path(out / "phantom.json") as tmp:
            tmp.write_text(_json_text(sidecar))
        keys = ("rotation_deg", "translation_mm", "elastic_rms_mm")
        summary = {cid: {k: results[cid]["mr_residual"][k] for k in keys} for cid in ids}
        write_dataset_json(out, {k: [entries[c] for c in v] for k, v in split.items()},
                           name=f"crossmodalnet-phantom-{dom.name}", description=dom.description,
                           phantom={"sidecar": "phantom.json", "seed": int(seed), "domain": dom.name,
                                    "mr_residual": summary})
        first = ids[0]
        if preview:
            ct, geom = read_image(out / entries[first]["ct"])
            mr, _ = read_image(out / entries[first]["mr"])
            lab, _, _ = read_label(out / entries[first]["label"])
            write_preview(out / "preview.png", ct, mr, lab, geom, title=f"{first} ({dom.name} domain)")
        return out
    with atomic_path(out / "mmwhs_truth.json") as tmp:
        tmp.write_text(_json_text({**settings, "cases": results}))
    if preview:
        stem = out / "ct_train" / "ct_train_1001"
        ct, geom = read_image(f"{stem}_image.nii.gz")
        lab, _, _ = read_label(f"{stem}_label.nii.gz")
        mr, mr_geom = read_image(out / "mr_train" / "mr_train_1001_image.nii.gz")
        write_preview(out / "preview.png", ct, mr, lab, geom, mr_geom, title=f"MM-WHS layout, case 1001 ({dom.name})")
    return out
