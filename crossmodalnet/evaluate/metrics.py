"""Metrics of one case: Dice, IoU and HD95 (and optionally Betti-number errors) per class and region.

Inputs are label maps (X, Y, Z) of class indices 0..K-1 on one grid. Each class of the dataset
(`spec.DataSpec`), then each of its regions (unions of classes: MyoPS edema+scar, BraTS whole
tumour), is scored one against one with MONAI's metric functions (rows of kind "class" and
"region"); HD95 is in mm from the reference's voxel spacing (array-axis order).

HD95 conventions (they differ a lot on real data; the summary names the one used):
- "monai" (default): the larger of the two directed 95th percentiles of surface distances,
  as `monai.metrics.compute_hausdorff_distance(percentile=95)` computes it;
- "pooled": the 95th percentile of both directions' surface distances together, as medpy's `hd95`.

Empty masks. Per structure, with P the prediction and R the reference:
- both empty: nothing to measure, every metric NaN, note "both empty";
- exactly one empty: Dice = IoU = 0, a true value (the structure is missed, or hallucinated, and
  averaging it as NaN would reward a model for missing it), HD95 NaN because a distance to an empty
  set is undefined; note "empty prediction" or "empty reference".

See docs/design.md, "Evaluation and HD95 conventions".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from crossmodalnet.data.spec import DataSpec
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.evaluate.topology import betti_errors

__all__ = [
    "HD95_CONVENTIONS",
    "COLUMNS",
    "TOPOLOGY_COLUMNS",
    "Spacing",
    "Row",
    "check_convention",
    "compute_case_metrics",
]


HD95_CONVENTIONS: dict[str, str] = {
    "monai": "max of the two directed 95th percentiles of surface distances (MONAI)",
    "pooled": "95th percentile of both directions' surface distances pooled (medpy hd95)",
}
COLUMNS: tuple[str, ...] = ("case", "kind", "structure", "dice", "iou", "hd95", "note")
TOPOLOGY_COLUMNS: tuple[str, ...] = ("betti_error_0", "betti_error_1", "betti_error_2")

Spacing = Sequence[float]
Row = dict[str, Any]


def check_convention(hd95: str) -> None:
    if hd95 not in HD95_CONVENTIONS:
        raise CrossModalNetError(f"unknown HD95 convention {hd95!r}; choose from {sorted(HD95_CONVENTIONS)}")


def _check_labels(name: str, arr: np.ndarray, num_classes: int) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a 3D label map (X, Y, Z), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"{name}: expected integer class indices, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_classes):
        raise ValueError(f"{name}: class indices must lie in 0..{num_classes - 1} (label values: use "
                         "DataSpec.to_indices)")
    return arr


def _union_box(p: np.ndarray, r: np.ndarray) -> tuple[slice, ...]:
    """Box of P ∪ R with a 1-voxel margin, clipped to the array.

    MONAI crops the same way inside `get_mask_edges`; doing it first shrinks the one-hot tensors
    (and the Dice/IoU sums) to the structure, which matters for 512³ CT volumes.
    """
    union = p | r
    box = []
    for axis in range(3):
        # Per-axis projections, not argwhere: no coordinate list of millions of voxels.
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, union.shape[axis])))
    return tuple(box)


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """(X, Y, Z) bool -> (1, 2, X, Y, Z) float64 [background, structure], MONAI's batch layout.

    Two channels with include_background=False, not one, so that MONAI never mistakes a single
    channel for a label map. float64 so that Dice and IoU of exact fractions come out exact.
    """
    m = torch.from_numpy(np.ascontiguousarray(mask))
    return torch.stack([~m, m]).unsqueeze(0).double()


def _hd95(p: np.ndarray, r: np.ndarray, spacing: Spacing, hd95: str) -> float:
    """HD95 in mm of two non-empty masks (X, Y, Z) under the named convention."""
    if hd95 == "monai":
        from monai.metrics import compute_hausdorff_distance  # heavy: MONAI loads only when scoring

        value = compute_hausdorff_distance(
            _one_hot(p), _one_hot(r), include_background=False, percentile=95, spacing=list(spacing)
        )
        return float(value[0, 0])
    # "pooled": MONAI has no option for it, so take both directed surface-distance sets from
    # MONAI's own machinery (same edges, same spacing) and pool them before the percentile.
    from monai.metrics.utils import get_edge_surface_distance  # heavy: MONAI loads only when scoring

    _, distances, _ = get_edge_surface_distance(
        torch.from_numpy(np.ascontiguousarray(p)),
        torch.from_numpy(np.ascontiguousarray(r)),
        spacing=list(spacing),
        symmetric=True,
    )
    pooled = np.concatenate([np.asarray(d, dtype=np.float64).ravel() for d in distances])
    # Linear interpolation, as torch.quantile uses for the "monai" convention.
    return float(np.percentile(pooled, 95))


def _structure_metrics(p: np.ndarray, r: np.ndarray, spacing: Spacing, hd95: str, topology: bool) -> Row:
    """Metrics of one structure: p, r (X, Y, Z) bool masks of prediction and reference."""
    from monai.metrics import compute_dice, compute_iou  # heavy: MONAI loads only when scoring

    has_p, has_r = bool(p.any()), bool(r.any())
    row: Row = {"dice": math.nan, "iou": math.nan, "hd95": math.nan, "note": ""}
    if topology:
        row.update(dict.fromkeys(TOPOLOGY_COLUMNS, math.nan))
    if not has_p and not has_r:
        row["note"] = "both empty"
        return row
    box = _union_box(p, r)
    tp, tr = _one_hot(p[box]), _one_hot(r[box])
    # ignore_empty=False: with exactly one mask empty MONAI then gives the formula's 0, our rule.
    row["dice"] = float(compute_dice(tp, tr, include_background=False, ignore_empty=False)[0, 0])
    row["iou"] = float(compute_iou(tp, tr, include_background=False, ignore_empty=False)[0, 0])
    if has_p and has_r:
        row["hd95"] = _hd95(p[box], r[box], spacing, hd95)
    else:
        row["note"] = "empty prediction" if not has_p else "empty reference"
    if topology:
        for key, err in zip(TOPOLOGY_COLUMNS, betti_errors(p, r), strict=True):
            row[key] = float(err)
    return row


def compute_case_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Spacing, spec: DataSpec, hd95: str = "monai", topology: bool = False
) -> list[Row]:
    """Metrics of one case, one row per class of `spec`, then one per region.

    pred, ref: (X, Y, Z) class indices 0..K-1 on the same grid. spacing: voxel size in mm per array
    axis (the reference's). Returns [{"kind", "structure", "dice", "iou", "hd95", "note"[, betti errors]}].
    """
    check_convention(hd95)
    pred, ref = _check_labels("pred", pred, spec.num_classes), _check_labels("ref", ref, spec.num_classes)
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} differs from ref shape {ref.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing}")
    rows = []
    with warnings.catch_warnings():
        # MONAI warns about empty masks; the note column already says so, per structure.
        warnings.filterwarnings("ignore", message=".*is all 0.*")
        # MONAI's own internal call of a deprecated argument; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        for index, name in enumerate(spec.names, start=1):
            rows.append({"kind": "class", "structure": name,
                         **_structure_metrics(pred == index, ref == index, spacing, hd95, topology)})
        for region in spec.regions:
            members = spec.region_indices(region)
            rows.append({"kind": "region", "structure": region.name,
                         **_structure_metrics(np.isin(pred, members), np.isin(ref, members), spacing, hd95,
                                              topology)})
    return rows
