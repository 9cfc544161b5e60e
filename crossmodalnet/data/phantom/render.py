"""Intensity rendering: CT-like and MR-like images from label (and tissue) maps, and imaging domains.

A *tissue map* says what each voxel is made of (`Tissue`: lung, fat, myocardium, blood, bone, ...);
a label map says which structure a clinician would outline. They differ on purpose: the RV free
wall is myocardium but background, the descending aorta is blood but background. Images are
rendered from tissue, so intensity alone cannot give the label.

A `Domain` is a named set of rendering parameters (per-tissue contrast, noise, blur, MR bias
field and MR acquisition voxel): `SOURCE` (arterial-phase CTA, 1.5 T bSSFP) and `TARGET` (later
contrast timing, noisier soft-kernel CT, 3 T fat-suppressed sequence with a stronger bias field and
thicker MR slices).

Shapes: label and tissue maps are (X, Y, Z) integer arrays; `spacing` is (3,) mm in array-axis
order; rendered images are (X, Y, Z) float32 (CT in HU, MR in arbitrary units, blood ~ 1000).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from scipy import ndimage

from crossmodalnet.data.labels import NUM_CLASSES, to_indices
from crossmodalnet.errors import CrossModalNetError

__all__ = [
    "Tissue",
    "LABEL_TISSUE",
    "Domain",
    "SOURCE",
    "TARGET",
    "DOMAINS",
    "get_domain",
    "BSplineField",
    "tissue_from_labels",
    "render_from_labels",
]


class Tissue(IntEnum):
    """What a voxel is made of; the renderers map each tissue to an intensity."""

    AIR = 0
    LUNG = 1
    FAT = 2
    MUSCLE = 3
    SOFT = 4  # mediastinal soft tissue, vessel walls, oesophagus, intervertebral discs
    MYOCARDIUM = 5  # LV wall (label MYO), RV and atrial walls (background), papillary muscles (LV)
    BLOOD_LEFT = 6  # oxygenated blood: LV, LA, aorta, pulmonary veins (first pass of contrast)
    BLOOD_RIGHT = 7  # venous blood: RA, RV, pulmonary arteries, venae cavae (mixed contrast)
    LIVER = 8
    BONE = 9  # cortical bone
    MARROW = 10  # cancellous bone with marrow
    CSF = 11


# Tissue of each class index (0 = background, which tissue_from_labels fills in).
LABEL_TISSUE = np.array(
    [Tissue.LUNG, Tissue.MYOCARDIUM, Tissue.BLOOD_LEFT, Tissue.BLOOD_LEFT, Tissue.BLOOD_RIGHT,
     Tissue.BLOOD_RIGHT, Tissue.BLOOD_LEFT, Tissue.BLOOD_RIGHT],
    dtype=np.uint8,
)
assert len(LABEL_TISSUE) == NUM_CLASSES

# Within-tissue heterogeneity, scaled by Domain.ct_texture / mr_texture. CT in HU (std); the
# right-heart value is large because unopacified caval inflow swirls with contrast in the RA/RV.
_CT_TEXTURE_HU = {"air": 0, "lung": 70, "fat": 12, "muscle": 8, "soft": 10, "myocardium": 10,
                  "blood_left": 18, "blood_right": 45, "liver": 8, "bone": 120, "marrow": 60, "csf": 5}
# MR: relative std of the signal (flow-related blood heterogeneity, lung parenchyma, ...).
_MR_TEXTURE = {"air": 0.0, "lung": 0.5, "fat": 0.05, "muscle": 0.06, "soft": 0.08, "myocardium": 0.08,
               "blood_left": 0.08, "blood_right": 0.10, "liver": 0.05, "bone": 0.3, "marrow": 0.12,
               "csf": 0.05}


@dataclass(frozen=True)
class Domain:
    """A scanner/protocol: how each tissue looks and how the images are degraded.

    ct_hu / mr_signal: tissue name (lower case `Tissue` names) -> mean intensity (the contrast
    curve). *_psf_mm: Gaussian point-spread sigma per axis in mm. mr_noise: std of each quadrature
    channel (the magnitude is Rician). mr_bias: std of the log of the smooth multiplicative bias.
    mr_voxel: MR acquisition voxel in units of the CT voxel (the MR is acquired coarser).
    """

    name: str
    description: str
    ct_hu: dict[str, float]
    ct_noise_hu: float
    ct_psf_mm: tuple[float, float, float]
    ct_texture: float
    mr_signal: dict[str, float]
    mr_noise: float
    mr_bias: float
    mr_psf_mm: tuple[float, float, float]
    mr_texture: float
    mr_voxel: tuple[float, float, float]

    def __post_init__(self) -> None:
        names = {t.name.lower() for t in Tissue}
        for what, table in (("ct_hu", self.ct_hu), ("mr_signal", self.mr_signal)):
            if set(table) != names:
                raise CrossModalNetError(f"domain {self.name!r}: {what} must give every tissue {sorted(names)}")

    def lut(self, modality: str) -> np.ndarray:
        """(len(Tissue),) float32 mean intensity per tissue for "CT" or "MR"."""
        table = self.ct_hu if modality == "CT" else self.mr_signal
        return np.array([table[t.name.lower()] for t in Tissue], dtype=np.float32)


SOURCE = Domain(
    name="source",
    # Saline chaser: the right heart is washed out (~250 HU) while the left is at peak (~380 HU).
    description="arterial-phase cardiac CTA (120 kVp, standard kernel) + 1.5 T 3D bSSFP",
    ct_hu={"air": -1000, "lung": -830, "fat": -95, "muscle": 50, "soft": 40, "myocardium": 110,
           "blood_left": 380, "blood_right": 250, "liver": 75, "bone": 900, "marrow": 280, "csf": 15},
    ct_noise_hu=15.0,
    ct_psf_mm=(0.6, 0.6, 0.8),
    ct_texture=1.0,
    # bSSFP: signal ~ sqrt(T2/T1): blood and fat bright, myocardium, muscle and liver dark.
    mr_signal={"air": 0, "lung": 40, "fat": 800, "muscle": 210, "soft": 330, "myocardium": 240,
               "blood_left": 1000, "blood_right": 960, "liver": 300, "bone": 15, "marrow": 620, "csf": 900},
    mr_noise=30.0,
    mr_bias=0.2,
    mr_psf_mm=(0.6, 0.6, 0.8),
    mr_texture=1.0,
    mr_voxel=(1.25, 1.25, 2.0),
)

TARGET = Domain(
    name="target",
    description="late-timed low-dose CT (140 kVp, soft kernel, thick slices) + 3 T fat-suppressed sequence",
    # Late timing: the bolus has passed the left heart, so left and right blood are close and dim;
    # higher kVp lowers bone and iodine HU.
    ct_hu={"air": -1000, "lung": -860, "fat": -110, "muscle": 55, "soft": 45, "myocardium": 100,
           "blood_left": 215, "blood_right": 240, "liver": 105, "bone": 700, "marrow": 220, "csf": 15},
    ct_noise_hu=30.0,
    ct_psf_mm=(1.0, 1.0, 1.8),
    ct_texture=1.4,
    # Fat suppression darkens fat and marrow; at 3 T myocardium/blood contrast is lower.
    mr_signal={"air": 0, "lung": 60, "fat": 140, "muscle": 300, "soft": 380, "myocardium": 360,
               "blood_left": 820, "blood_right": 870, "liver": 420, "bone": 15, "marrow": 170, "csf": 700},
    mr_noise=45.0,
    mr_bias=0.45,
    mr_psf_mm=(0.8, 0.8, 1.4),
    mr_texture=1.4,
    mr_voxel=(1.5, 1.5, 2.6),
)

DOMAINS: dict[str, Domain] = {d.name: d for d in (SOURCE, TARGET)}


def get_domain(domain: str | Domain) -> Domain:
    """A preset by name, or the Domain itself. Raises CrossModalNetError for an unknown name."""
    if isinstance(domain, Domain):
        return domain
    if domain not in DOMAINS:
        raise CrossModalNetError(f"unknown domain {domain!r}; choose one of {sorted(DOMAINS)}")
    return DOMAINS[domain]


def _bspline3(t: np.ndarray) -> np.ndarray:
    """The cubic B-spline kernel (support [-2, 2])."""
    a = np.abs(t)
    return np.where(a < 1, (4 - 6 * a**2 + 3 * a**3) / 6, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


@dataclass(frozen=True)
class BSplineField:
    """A smooth field on an axis-aligned lattice: f_c(p) = sum_j coefficients[c, j] B3((p - origin)/spacing - j).

    The cubic B-spline free-form deformation of registration (Rueckert 1999; elastix "BSpline").
    coefficients: (C, nx, ny, nz); origin: world mm of control point (0, 0, 0); spacing: (3,) mm.
    The same formula is evaluated on grids (separable, fast) and at scattered points.
    """

    coefficients: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, lo: Sequence[float], hi: Sequence[float], spacing: float,
               std: float, channels: int = 1) -> BSplineField:
        """Random coefficients over the box [lo, hi] (mm), whose field has about `std` per channel."""
        lo, hi = np.minimum(lo, hi).astype(float), np.maximum(lo, hi).astype(float)
        sp = np.full(3, float(spacing))
        # Two extra control points each side: the B3 support, so the box sees no lattice edge.
        n = np.ceil((hi - lo) / sp).astype(int) + 5
        # sum_j B3(t - j)^2 is about 0.48 per axis, so iid coefficients give a field std of ~0.33 std_c.
        coef = rng.standard_normal((channels, *n)) * (std / 0.33)
        return cls(coefficients=coef.astype(np.float32), origin=lo - 2 * sp, spacing=sp)

    def _weights(self, axis: int, coords: np.ndarray) -> np.ndarray:
        t = (np.asarray(coords, float) - self.origin[axis]) / self.spacing[axis]
        j = np.arange(self.coefficients.shape[1 + axis])
        return _bspline3(t[:, None] - j[None, :]).astype(np.float32)  # (len(coords), n_axis)

    def on_grid(self, axes: Sequence[np.ndarray]) -> np.ndarray:
        """Field on the grid axes[0] x axes[1] x axes[2] (world mm per axis). Returns (C, X, Y, Z)."""
        wx, wy, wz = (self._weights(a, ax) for a, ax in enumerate(axes))
        c, nx = self.coefficients.shape[:2]
        f = self.coefficients @ wz.T  # C, nx, ny, Z
        f = wy @ f  # C, nx, Y, Z
        f = wx @ f.reshape(c, nx, -1)  # C, X, Y*Z: one GEMM writes the big array in order
        return f.reshape(c, len(wx), len(wy), len(wz))

    def at(self, points: np.ndarray, step_mm: float | None = None) -> np.ndarray:
        """Field at scattered world points (3, ...). Returns (C, ...).

        step_mm: evaluate on a lattice of this step over the points' box and interpolate linearly
        (error ~ step^2/8 times the field's curvature: ~0.05 mm for a 4 mm step, 40 mm control
        spacing); None evaluates the spline exactly (64 taps a point, a few times slower).
        """
        pts = np.asarray(points, dtype=np.float32).reshape(3, -1)
        if step_mm is None:
            idx = (pts - self.origin[:, None]) / self.spacing[:, None]
            # With prefilter=False, map_coordinates evaluates exactly sum_j c_j B3(t - j).
            out = [ndimage.map_coordinates(c, idx, order=3, prefilter=False, mode="nearest")
                   for c in self.coefficients]
        else:
            lo = pts.min(1) - step_mm
            axes = [lo[k] + step_mm * np.arange(int((pts[k].max() - lo[k]) / step_mm) + 3) for k in range(3)]
            lattice = self.on_grid(axes)
            idx = (pts - lo[:, None]) / step_mm
            out = [ndimage.map_coordinates(f, idx, order=1, mode="nearest") for f in lattice]
        return np.stack(out).reshape(len(out), *np.shape(points)[1:]).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray, corr_mm: float) -> np.ndarray:
    """A unit-std smooth random field (X, Y, Z) float32 with correlation length ~corr_mm."""
    axes = [np.arange(n) * s for n, s in zip(shape, spacing, strict=True)]
    hi = [a[-1] for a in axes]
    f = BSplineField.random(rng, (0, 0, 0), hi, corr_mm, 1.0).on_grid(axes)[0]
    return (f - f.mean()) / max(float(f.std()), 1e-6)


def _texture(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray) -> np.ndarray:
    """Within-tissue heterogeneity: fine (~5 mm) plus coarse (~20 mm) smooth fields, unit std."""
    fine_mm = max(5.0, 2.0 * float(spacing.max()))  # below two voxels a "smooth" field is just noise
    return 0.6 * _smooth_noise(rng, shape, spacing, fine_mm) + 0.8 * _smooth_noise(rng, shape, spacing, 20.0)


def _check_spacing(spacing: Sequence[float]) -> np.ndarray:
    sp = np.asarray(spacing, dtype=float).reshape(-1)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise CrossModalNetError(f"spacing must be three positive numbers in mm, got {spacing!r}")
    return sp


def tissue_from_labels(labels: np.ndarray, spacing: Sequence[float], seed: int = 0) -> np.ndarray:
    """Plausible tissue map (X, Y, Z) uint8 for a label map that has only heart labels.

    Blood pools other than the LV get a 2.5 mm wall (myocardium for chambers, soft tissue for the
    great vessels), then epicardial fat of smoothly varying thickness (3-8 mm), then lung.
    """
    labels = np.asarray(labels)
    sp = _check_spacing(spacing)
    tissue = LABEL_TISSUE[labels]
    heart = labels > 0
    if not heart.any():
        return np.full(labels.shape, Tissue.SOFT, dtype=np.uint8)
    dist, idx = ndimage.distance_transform_edt(~heart, sampling=sp, return_indices=True)
    nearest = labels[tuple(idx)]
    rng = np.random.default_rng([seed, 7])
    fat_mm = 5.5 + 2.5 * np.clip(_smooth_noise(rng, labels.shape, sp, 30.0), -1, 1)
    bg = ~heart
    wall = bg & (dist <= 2.5)
    tissue[bg] = Tissue.LUNG
    tissue[bg & (dist <= 2.5 + fat_mm)] = Tissue.FAT
    tissue[wall & np.isin(nearest, (2, 4, 5))] = Tissue.MYOCARDIUM  # LA, RA, RV walls
    tissue[wall & np.isin(nearest, (6, 7))] = Tissue.SOFT  # aortic / pulmonary wall
    return tissue


def _render_ct(tissue: np.ndarray, sp: np.ndarray, dom: Domain, rng: np.random.Generator) -> np.ndarray:
    img = dom.lut("CT")[tissue]
    tex_amp = np.array([_CT_TEXTURE_HU[t.name.lower()] for t in Tissue], np.float32) * dom.ct_texture
    img += tex_amp[tissue] * _texture(rng, tissue.shape, sp)
    # The PSF mixes neighbouring tissues: partial volume at every boundary.
    psf = np.asarray(dom.ct_psf_mm) / sp
    img = ndimage.gaussian_filter(img, psf, mode="nearest")
    # Reconstruction-kernel noise is correlated over about the PSF; rescale to the nominal std.
    noise = ndimage.gaussian_filter(rng.standard_normal(tissue.shape, dtype=np.float32), psf, mode="wrap")
    img += noise * (dom.ct_noise_hu / max(float(noise.std()), 1e-6))
    return np.maximum(img, -1024.0).astype(np.float32)


def _render_mr(tissue: np.ndarray, sp: np.ndarray, dom: Domain, rng: np.random.Generator) -> np.ndarray:
    tex_amp = np.array([_MR_TEXTURE[t.name.lower()] for t in Tissue], np.float32) * dom.mr_texture
    sig = dom.lut("MR")[tissue] * (1.0 + tex_amp[tissue] * _texture(rng, tissue.shape, sp))
    sig = ndimage.gaussian_filter(np.maximum(sig, 0.0), np.asarray(dom.mr_psf_mm) / sp, mode="nearest")
    # Receive-coil sensitivity: a smooth multiplicative bias over ~10 cm.
    sig *= np.exp(dom.mr_bias * _smooth_noise(rng, tissue.shape, sp, 90.0))
    # Magnitude of a complex signal with Gaussian noise in both channels: Rician, biased in the dark.
    real = sig + rng.standard_normal(tissue.shape, dtype=np.float32) * dom.mr_noise
    imag = rng.standard_normal(tissue.shape, dtype=np.float32) * dom.mr_noise
    return np.sqrt(real * real + imag * imag).astype(np.float32)


def render_from_labels(
    labels: np.ndarray,
    spacing: Sequence[float],
    modality: str,
    domain: str | Domain = "source",
    seed: int = 0,
    tissue: np.ndarray | None = None,
) -> np.ndarray:
    """Render a CT-like or MR-like image (X, Y, Z) float32 from a label map on the same grid.

    labels: (X, Y, Z) class indices 0-7 or MM-WHS codes. spacing: (3,) mm. modality: "CT" or "MR".
    tissue: optional (X, Y, Z) `Tissue` map of the whole scene; without it the surroundings are made
    up by `tissue_from_labels`. Same inputs and seed give the same image.
    """
    mod = str(modality).upper()
    if mod not in ("CT", "MR"):
        raise CrossModalNetError(f"modality must be 'CT' or 'MR', got {modality!r}")
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise CrossModalNetError(f"label map must be 3D, got shape {arr.shape}")
    try:
        idx = to_indices(arr)
    except ValueError as exc:
        raise CrossModalNetError(f"label map: {exc}") from None
    sp = _check_spacing(spacing)
    dom = get_domain(domain)
    if tissue is None:
        tissue = tissue_from_labels(idx, sp, seed)
    else:
        tissue = np.asarray(tissue)
        if tissue.shape != idx.shape:
            raise CrossModalNetError(f"tissue map shape {tissue.shape} differs from label map {idx.shape}")
        if tissue.size and (tissue.min() < 0 or tissue.max() >= len(Tissue)):
            raise CrossModalNetError(f"tissue map values must lie in 0..{len(Tissue) - 1}")
        tissue = tissue.astype(np.uint8, copy=False)
    # CT and MR of one seed draw independent noise.
    rng = np.random.default_rng([int(seed), 0 if mod == "CT" else 1])
    render = _render_ct if mod == "CT" else _render_mr
    return render(tissue, sp, dom, rng)
