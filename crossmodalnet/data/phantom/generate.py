"""One synthetic case in memory: anatomy -> CT on its grid, MR on its own grid through a misalignment.

`generate_case(seed, index, size, domain, layout)` returns a `PhantomCase`: ct, label (X, Y, Z) on a
size^3 grid of `FOV_MM` mm; in the "dataset" layout the MR is resampled onto the CT grid (a small
residual misalignment left), in the "mmwhs" layout it stays on its own grid with its own label.
Images are float32 (HU for CT), labels uint8 class indices. `split_cases` draws the data split.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from crossmodalnet.data.io import Geometry
from crossmodalnet.data.phantom.anatomy import sample_anatomy
from crossmodalnet.data.phantom.raster import rasterize
from crossmodalnet.data.phantom.render import Domain, get_domain, render_from_labels
from crossmodalnet.data.phantom.warp import RigidElastic, make_grid, resample_linear
from crossmodalnet.errors import CrossModalNetError

__all__ = ["FOV_MM", "PhantomCase", "generate_case", "split_cases", "check_args"]

FOV_MM = 144.0  # CT field of view of the dataset layout: a heart (~12 cm) with a rim of surroundings


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


def _domain_key(dom: Domain) -> int:
    # Each domain gets its own patients: a target set never repeats the source anatomy of one seed.
    return zlib.crc32(dom.name.encode())


def generate_case(seed: int, index: int, size: int = 96, domain: str | Domain = "source",
                  layout: str = "dataset") -> PhantomCase:
    """Make case `index` of the set drawn with `seed`: the same arguments give the same arrays."""
    check_args(1, size, seed, layout)
    dom = get_domain(domain)
    ss = np.random.SeedSequence([int(seed), int(index), _domain_key(dom)])
    anat_ss, warp_ss, ct_ss, mr_ss = ss.spawn(4)
    ct_spacing = np.full(3, FOV_MM / size)
    anatomy = sample_anatomy(np.random.default_rng(anat_ss), min_wall_mm=1.8 * float(ct_spacing.max()))
    center = anatomy.fov_center()
    geometry = make_grid(center, (size, size, size), ct_spacing)
    label, tissue = rasterize(anatomy, geometry)
    ct = render_from_labels(label, ct_spacing, "CT", dom, int(ct_ss.generate_state(1)[0]), tissue=tissue)

    rng = np.random.default_rng(warp_ss)
    mr_spacing = ct_spacing * np.asarray(dom.mr_voxel)
    if layout == "dataset":
        # Registered MR: on the CT grid, but acquired coarser and left with a residual error.
        warp = RigidElastic.random(rng, center, rot_deg=1.0, shift_mm=1.0, elastic_mm=1.0, box_mm=FOV_MM + 40)
        mr_shape = tuple(int(np.ceil(FOV_MM / s)) + 1 for s in mr_spacing)
        acq = make_grid(center, mr_shape, mr_spacing)
    else:
        # Raw MM-WHS: another scanner, another field of view and position, not registered.
        warp = RigidElastic.random(rng, center, rot_deg=5.0, shift_mm=6.0, elastic_mm=3.0, box_mm=1.6 * FOV_MM)
        mr_fov = FOV_MM * np.array([1.25, 1.25, 1.15])
        mr_shape = tuple(int(np.ceil(f / s)) for f, s in zip(mr_fov, mr_spacing, strict=True))
        mr_center = center - warp.rotation.T @ warp.translation + rng.normal(0, 4.0, 3)
        acq = make_grid(mr_center, mr_shape, mr_spacing)
    mr_label, mr_tissue = rasterize(anatomy, acq, warp)
    mr = render_from_labels(mr_label, mr_spacing, "MR", dom, int(mr_ss.generate_state(1)[0]), tissue=mr_tissue)
    meta = {"anatomy": anatomy.params, "domain": dom.name}
    if layout == "dataset":
        mr = resample_linear(mr, acq, geometry)
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


def check_args(cases: int, size: int, seed: int, layout: str) -> None:
    """Raise CrossModalNetError with the option's name when an argument of `synthesize` is out of range."""
    if isinstance(cases, bool) or not isinstance(cases, int | np.integer) or cases < 1:
        raise CrossModalNetError(f"--cases must be a whole number >= 1, got {cases!r}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 16 <= size <= 256:
        raise CrossModalNetError(f"--size must be a whole number from 16 to 256 voxels, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise CrossModalNetError(f"--seed must be a whole number >= 0, got {seed!r}")
    if layout not in ("dataset", "mmwhs"):
        raise CrossModalNetError(f"layout must be 'dataset' or 'mmwhs', got {layout!r}")

