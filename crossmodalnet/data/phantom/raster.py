"""Rasterising an `Anatomy`: label and tissue maps (X, Y, Z) uint8 on any grid, through an optional warp.

The thorax is painted analytically, then each part of the anatomy in priority order, only in the
cells of the grid near its surface; epicardial fat and vessel walls follow, and a last pass makes
the labels what a coarse grid can break (one component per structure, the LV enclosed).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from crossmodalnet.data.io import Geometry
from crossmodalnet.data.labels import STRUCTURES
from crossmodalnet.data.phantom.anatomy import AO, LA, LPS, LV, MYO, Anatomy, Body
from crossmodalnet.data.phantom.render import Tissue
from crossmodalnet.data.phantom.warp import RigidElastic, grid_axes

__all__ = ["rasterize"]


def _paint_body(b: np.ndarray, body: Body) -> np.ndarray:
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
    axes = grid_axes(geometry)
    if warp is None:
        pts = np.stack(np.meshgrid(*[a.astype(np.float32) for a in axes], indexing="ij"))
        disp = anatomy.elastic.on_grid(axes)
    else:
        pts = warp.on_grid(geometry)
        disp = anatomy.elastic.at(pts, step_mm=4.0)
    c = lambda v: np.asarray(v, np.float32).reshape(3, 1, 1, 1)  # noqa: E731
    body = c(LPS) * (pts + disp - c(anatomy.world_center)) + c(anatomy.heart_center)
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

