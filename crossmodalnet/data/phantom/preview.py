"""A PNG montage of one case: CT, MR and CT with the label overlay, through the heart in three planes.

Takes ct, label (X, Y, Z) on `geometry` and mr (X', Y', Z') on `mr_geometry` (the CT grid by default).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from crossmodalnet.data.io import Geometry
from crossmodalnet.data.labels import NAMES, STRUCTURES, colormap
from crossmodalnet.files import atomic_path

__all__ = ["write_preview"]


def _mid_slices(vol: np.ndarray, center: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices as displayed: anterior / superior up, patient right on the left."""
    i, j, k = center
    return [vol[:, :, k].T, vol[:, j, :].T[::-1], vol[i, :, :].T[::-1]]


def write_preview(path: str | os.PathLike, ct: np.ndarray, mr: np.ndarray, label: np.ndarray,
                  geometry: Geometry, mr_geometry: Geometry | None = None, title: str = "") -> Path:
    """PNG montage: rows CT, MR, CT + label overlay; columns axial, coronal, sagittal through the heart."""
    # The Agg canvas on a bare Figure: no pyplot, so the caller's backend and figures are untouched.
    # Heavy: matplotlib loads only when a preview is drawn.
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
