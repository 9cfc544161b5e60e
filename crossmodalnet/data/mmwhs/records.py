"""Per-case records of a prepared folder, and the way from the prepared grid back to the original scans.

    record = load_record(data_dir, case.id)               # None: not a prepare-mmwhs folder
    labels, geometry = restore_to_original(probs, record)  # (C, X, Y, Z) or (X, Y, Z) on the prepared grid
    write_label(path, to_codes(labels), geometry)          # on the original fixed image's grid

`restore_to_moving` does the same onto the other modality's original grid, through the inverse
registration. Returned label maps are (X', Y', Z') uint8 class indices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from crossmodalnet.data.io import Geometry
from crossmodalnet.data.mmwhs.grid import resample_classes
from crossmodalnet.data.mmwhs.register import warp
from crossmodalnet.errors import CrossModalNetError

__all__ = [
    "RECORD_FORMAT",
    "geometry_to_json",
    "geometry_from_json",
    "load_record",
    "restore_to_original",
    "restore_to_moving",
]

RECORD_FORMAT = 1


def geometry_to_json(geometry: Geometry) -> dict:
    """JSON-ready affine, shape and spacing of a grid (as records store it)."""
    return {"affine": np.asarray(geometry.affine).tolist(), "shape": list(geometry.shape),
            "spacing": list(geometry.spacing)}


def geometry_from_json(d: dict) -> Geometry:
    """The grid of a record entry written by `geometry_to_json`."""
    return Geometry(affine=np.asarray(d["affine"], dtype=np.float64), shape=tuple(int(s) for s in d["shape"]))



def load_record(root: str | os.PathLike, case_id: str) -> dict | None:
    """The per-case record of a prepared dataset folder, or None when `root` was not made by prepare-mmwhs."""
    path = Path(root) / "records" / f"{case_id}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CrossModalNetError(f"{path}: invalid JSON ({exc})") from None


def restore_to_original(
    values: np.ndarray, record: dict, geometry: Geometry | None = None
) -> tuple[np.ndarray, Geometry]:
    """A label map (X, Y, Z) or class scores (C, X, Y, Z) on the prepared grid -> class indices
    (X', Y', Z') uint8 on the original fixed image's grid, and that grid (write it with io.write_label).

    The prepared grid lies in the fixed image's world, so going back is a resampling by world
    coordinates (per-class linear, argmax); outside the crop is background. geometry: the grid
    `values` sit on (the prepared file's), checked against the record when given.
    """
    prepared, original = geometry_from_json(record["prepared"]), geometry_from_json(record["original"])
    if geometry is not None and not geometry.same_grid(prepared):
        raise CrossModalNetError(f"case {record.get('id')}: the values are not on the prepared grid of its record")
    shape = np.shape(values)[-3:]
    if tuple(shape) != tuple(prepared.shape):
        raise CrossModalNetError(f"case {record.get('id')}: array of shape {tuple(np.shape(values))} is not on "
                                 f"the prepared grid {prepared.shape}")
    return resample_classes(values, prepared, original), original


def restore_to_moving(labels: np.ndarray, record: dict, root: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """A label map (X, Y, Z) on the prepared grid -> class indices uint8 on the original *moving*
    image's grid (e.g. the CT when MR was fixed), through the inverse of the registration, and that grid.

    root: the prepared dataset folder (the record's transform paths are relative to it).
    """
    prepared, moving = geometry_from_json(record["prepared"]), geometry_from_json(record["moving_original"])
    labels = np.asarray(labels)
    if labels.shape != tuple(prepared.shape):
        raise CrossModalNetError(f"case {record.get('id')}: label map of shape {labels.shape} is not on the "
                                 f"prepared grid {prepared.shape}")
    transforms = record["transforms"]
    # fixed_to_moving maps moving-world points to fixed-world points: what resampling a fixed-world
    # image onto a moving-world grid needs (antsApplyTransforms' "inverse" list).
    paths = [str(Path(root) / t) for t in transforms["fixed_to_moving"]]
    return warp(labels, prepared, paths, moving, "label", transforms["fixed_to_moving_invert"]), moving

