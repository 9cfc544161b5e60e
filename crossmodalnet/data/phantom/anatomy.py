"""The phantom's anatomy: a heart and its thorax as implicit shapes, drawn at random per patient.

Anatomy is a list of implicit shapes (ellipsoids, tubes along polylines) in a canonical frame
(LPS mm: x to the patient's left, y posterior, z superior; origin at the centre of the LV base),
painted in priority order. Each case draws its own sizes, wall thickness, vessel courses, heart
pose (rotation up to 15 degrees, scale +-10 %) and a smooth B-spline elastic deformation; the body
around the heart (thorax, lungs, spine, liver, fat, unlabelled vessels) is described too, so that
intensity alone does not give the label. Shapes are evaluated at points q of shape (3, ...) in mm
and return signed distances of shape (...); `raster.rasterize` turns an `Anatomy` into voxels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from crossmodalnet.data.labels import STRUCTURES
from crossmodalnet.data.phantom.render import BSplineField, Tissue

__all__ = [
    "MYO", "LA", "LV", "RA", "RV", "AO", "PA", "LPS", "rotation_matrix", "Part", "Body", "Anatomy",
    "sample_anatomy",
]

MYO, LA, LV, RA, RV, AO, PA = (s.index for s in STRUCTURES)
LPS = np.array([-1.0, -1.0, 1.0])  # RAS world <-> LPS anatomical frame (its own inverse)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def rotation_matrix(deg: np.ndarray) -> np.ndarray:
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
class Part:
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
class Body:
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

    parts: tuple[Part, ...]
    body: Body
    heart_center: np.ndarray
    rotation: np.ndarray
    scale: float
    world_center: np.ndarray
    elastic: BSplineField
    fat_waves: np.ndarray  # (4, 5): wave vector (3), phase, amplitude of the epicardial fat thickness
    params: dict = field(default_factory=dict)

    def fov_center(self) -> np.ndarray:
        """World (RAS) centre of the CT field of view: heart centre, a little posterior for the spine."""
        return self.world_center + LPS * np.asarray(self.params["fov_offset_mm"])


def sample_anatomy(rng: np.random.Generator, min_wall_mm: float = 0.0) -> Anatomy:
    """Draw one patient. min_wall_mm: thinnest myocardium/lid allowed (keeps coarse grids closed)."""
    jit = lambda v, mm: np.asarray(v, float) + rng.normal(0.0, mm, 3)  # noqa: E731
    rel = lambda x, r=0.08: float(x) * rng.uniform(1 - r, 1 + r)  # noqa: E731
    parts: list[Part] = []

    # LV long axis: base -> apex points anterior, left and inferior (~45 deg off sagittal, ~25 deg down).
    u = _unit(rotation_matrix(rng.normal(0, 4, 3)) @ _unit([0.64, -0.64, -0.42]))
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
    parts.append(Part("aortic arch", _Tube(np.array(arch), np.array([r_ao, r_ao, 12.5, 12, 11.5])), 0,
                       Tissue.BLOOD_LEFT, wall_mm=2.0, wall_tissue=Tissue.SOFT))
    pa_cut = jit(pv + np.array([7.0, 16.0, 24.0]), 2.0)
    parts.append(Part("right pulmonary artery", _Tube(np.array(
        [pa_cut, pv + np.array([-6.0, 30.0, 28.0]), pv + np.array([-40.0, 36.0, 24.0])]), np.array([10.5, 9.5, 8.5])),
        0, Tissue.BLOOD_RIGHT, wall_mm=1.5, wall_tissue=Tissue.SOFT))
    parts.append(Part("left pulmonary artery", _Tube(np.array(
        [pa_cut, pv + np.array([22.0, 28.0, 30.0]), pv + np.array([42.0, 44.0, 24.0])]), np.array([10.5, 9.5, 8.5])),
        0, Tissue.BLOOD_RIGHT, wall_mm=1.5, wall_tissue=Tissue.SOFT))
    hila = (pv + np.array([-40.0, 36.0, 24.0]), pv + np.array([42.0, 44.0, 24.0]))
    for side, hilum in zip((-1.0, 1.0), hila, strict=True):  # lung vessels fanning out of each hilum
        for _ in range(7):
            way = _unit(np.array([side * rng.uniform(0.3, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(-1.0, 1.0)]))
            bend = _unit(way + rng.normal(0, 0.3, 3))
            length = rng.uniform(50.0, 90.0)
            path = np.array([hilum, hilum + 0.5 * length * way, hilum + 0.5 * length * (way + bend)])
            parts.append(Part("lung vessel", _Tube(path, np.array([4.5, 3.0, 1.5])), 0, Tissue.BLOOD_RIGHT,
                               fat=False, into=Tissue.LUNG))
    for side in (-1.0, 1.0):  # pulmonary veins into the LA, two each side
        for dz in (9.0, -9.0):
            start = la_c + np.array([14.0 * side, 6.0, dz])
            end = jit(la_c + np.array([46.0 * side, 24.0, 1.6 * dz]), 3.0)
            parts.append(Part("pulmonary vein", _Tube(np.array([start, end]), np.array([7.0, 6.0])), 0,
                               Tissue.BLOOD_LEFT, wall_mm=1.0, wall_tissue=Tissue.SOFT))
    parts.append(Part("superior vena cava", _Tube(np.array(
        [ra_c + np.array([-6.0, 6.0, 14.0]), ra_c + np.array([-9.0, 8.0, 95.0])]), np.array([9.5, 9.5])),
        0, Tissue.BLOOD_RIGHT, wall_mm=1.0, wall_tissue=Tissue.SOFT))
    parts.append(Part("inferior vena cava", _Tube(np.array(
        [ra_c + np.array([0.0, 6.0, -14.0]), ra_c + np.array([2.0, 12.0, -110.0])]), np.array([11.0, 11.0])),
        0, Tissue.BLOOD_RIGHT, wall_mm=1.0, wall_tissue=Tissue.SOFT))

    # Labelled chambers and vessels, in the priority order that makes their junctions right.
    parts.append(Part("RA", _Ellipsoid(ra_c, rotation_matrix(rng.normal(0, 8, 3)), np.array(
        [rel(23.0), rel(20.0), rel(25.0)])), RA, Tissue.BLOOD_RIGHT, wall_mm=2.5))
    parts.append(Part("RV", _Ellipsoid(rv_c, frame, np.array([rel(44.0), rel(30.0), rel(32.0)])), RV,
                       Tissue.BLOOD_RIGHT, wall_mm=3.5))
    rvot0 = 8 * u + 30 * e1 - 6 * e2
    parts.append(Part("RVOT", _Tube(np.array([rvot0, 0.5 * (rvot0 + pv) + np.array([0.0, -4.0, 0.0]), pv]),
                                     np.array([14.0, 13.5, r_pa])), RV, Tissue.BLOOD_RIGHT, wall_mm=3.0))
    parts.append(Part("PA", _Tube(np.array([pv, pv + np.array([3.0, 5.0, 12.0]), pa_cut]), np.array(
        [r_pa, r_pa, r_pa]), flat_start=True, flat_end=True), PA, Tissue.BLOOD_RIGHT, wall_mm=1.5,
        wall_tissue=Tissue.SOFT))
    # The base: myocardium a little beyond the base plane; LA and AO then open the two valves in it.
    parts.append(Part("MYO base", _Ellipsoid(c_lv * u, frame, myo_radii, u, -lid), MYO, Tissue.MYOCARDIUM))
    parts.append(Part("LA", _Ellipsoid(la_c, rotation_matrix(rng.normal(0, 8, 3)), np.array(
        [rel(27.0), rel(18.0), rel(21.0)])), LA, Tissue.BLOOD_LEFT, wall_mm=2.5))
    parts.append(Part("mitral inflow", _Tube(np.array([la_c, mitral + 2.0 * u]), np.array([12.5, 12.5])), LA,
                       Tissue.BLOOD_LEFT, wall_mm=2.5))
    ao_path = np.array([aortic + 3.0 * u, aortic, aortic + np.array([-5.0, -4.0, 16.0]),
                        aortic + np.array([-9.0, -2.0, 32.0]), ao_cut])
    parts.append(Part("AO", _Tube(ao_path, np.array([11.0, 11.5, r_ao, r_ao, r_ao]), flat_end=True), AO,
                       Tissue.BLOOD_LEFT, wall_mm=2.0, wall_tissue=Tissue.SOFT))
    parts.append(Part("MYO", _Ellipsoid(c_lv * u, frame, myo_radii, u, 0.0), MYO, Tissue.MYOCARDIUM))
    parts.append(Part("LV", _Ellipsoid(c_lv * u, frame, np.array([a_lv, b1, b2]), u, 0.0), LV,
                       Tissue.BLOOD_LEFT))
    for side in (-1.0, 1.0):  # papillary muscles: myocardium inside the LV label, as MM-WHS draws it
        pm = (c_lv + 14) * u - 0.45 * b1 * e1 + side * 0.5 * b2 * e2
        parts.append(Part("papillary muscle", _Ellipsoid(pm, frame, np.array([rel(13.0), 4.0, 4.5])), LV,
                           Tissue.MYOCARDIUM, fat=False))

    # Heart centre: middle of the labelled structures' extent; the pose rotates about it.
    boxes = np.array([p.shape.bbox() for p in parts if p.label])
    heart_center = 0.5 * (boxes[:, 0].min(0) + boxes[:, 1].max(0))
    body = Body(mid_x=rng.normal(-12.0, 3.0), center_y=36.0, semi=(rel(155.0), rel(118.0)),
                 fat_mm=rng.uniform(8.0, 20.0), vert_y=rng.normal(82.0, 3.0),
                 diaphragm_z=heart_center[2] + rng.normal(-38.0, 4.0), rib_phase=rng.uniform(0, 1))
    # Descending aorta: beside the spine, so it lives in the body frame.
    desc = np.array([aortic + np.array([27.0, 50.0, 52.0]), [body.mid_x + 27.0, body.vert_y - 26.0, 0.0],
                     [body.mid_x + 25.0, body.vert_y - 24.0, -180.0]])
    desc[1, 2] = desc[0, 2] - 40.0
    parts.insert(0, Part("descending aorta", _Tube(desc, np.array([11.5, 11.0, 10.5])), 0, Tissue.BLOOD_LEFT,
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
    return Anatomy(tuple(parts), body, heart_center, rotation_matrix(angles), float(scale), world_center, elastic,
                   waves.astype(np.float32), params)

