"""The dataset format: a folder with `dataset.json` (MSD / nnU-Net spirit) and NIfTI files.

    {"name": ..., "modality": {"0": "CT", "1": "MR"}, "labels": {"0": "background", "1": "MYO", ...},
     "training": [{"id": "case_000", "ct": "imagesTr/case_000_ct.nii.gz", "mr": ..., "label": ...}],
     "validation": [...], "test": [...]}

Paths are relative to the folder and may not leave it. `load_dataset` checks every listed file
exists, and `check_case` that CT, MR and label share one grid, before any work starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossmodalnet.data.io import Geometry, check_same_grid, read_image, read_label
from crossmodalnet.data.labels import NUM_CLASSES, STRUCTURES
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path

__all__ = ["Case", "Dataset", "CHANNELS", "SPLITS", "load_dataset", "write_dataset_json", "check_case", "load_case"]

CHANNELS: dict[str, str] = {"0": "CT", "1": "MR"}
SPLITS: tuple[str, ...] = ("training", "validation", "test")


@dataclass(frozen=True)
class Case:
    """One paired case: absolute paths; `label` may be None (unlabeled, e.g. a target domain)."""

    id: str
    ct: Path | None
    mr: Path | None
    label: Path | None = None


@dataclass(frozen=True)
class Dataset:
    root: Path
    name: str
    splits: dict[str, list[Case]]

    def __getitem__(self, split: str) -> list[Case]:
        return self.splits.get(split, [])


def _resolve(root: Path, rel: str, json_path: Path, must_exist: bool) -> Path:
    if not isinstance(rel, str) or not rel:
        raise CrossModalNetError(f"{json_path}: file entries must be non-empty relative paths, got {rel!r}")
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise CrossModalNetError(f"{json_path}: path {rel!r} leaves the dataset folder")
    if must_exist and not path.is_file():
        raise CrossModalNetError(f"{json_path}: listed file {rel!r} does not exist")
    return path


def load_dataset(root: str | os.PathLike, check_files: bool = True) -> Dataset:
    """Read and validate `root/dataset.json`. Returns a Dataset with absolute paths per split."""
    root = Path(root)
    json_path = root / "dataset.json"
    if not json_path.is_file():
        raise CrossModalNetError(f"{json_path}: not found (is {root} a crossmodalnet dataset folder?)")
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise CrossModalNetError(f"{json_path}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CrossModalNetError(f"{json_path}: expected a JSON object at the top, got {type(meta).__name__}")
    modality = {str(k): str(v).upper() for k, v in meta.get("modality", {}).items()}
    if modality and modality != CHANNELS:
        raise CrossModalNetError(f"{json_path}: modality must be {CHANNELS}, got {meta.get('modality')}")
    labels = meta.get("labels")
    if labels is not None and len(labels) != NUM_CLASSES:
        raise CrossModalNetError(f"{json_path}: expected {NUM_CLASSES} labels (background + 7), got {len(labels)}")
    splits: dict[str, list[Case]] = {}
    for split in SPLITS:
        entries = meta.get(split, [])
        if not isinstance(entries, list):
            raise CrossModalNetError(f"{json_path}: {split!r} must be a list")
        cases = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not ({"ct", "mr"} & set(entry)):
                raise CrossModalNetError(f"{json_path}: {split}[{i}] needs at least one of 'ct' and 'mr'")
            paths = {
                key: _resolve(root, entry[key], json_path, check_files) if entry.get(key) else None
                for key in ("ct", "mr", "label")
            }
            case_id = str(entry.get("id") or Path(entry.get("ct") or entry.get("mr")).name.split(".")[0])
            cases.append(Case(id=case_id, **paths))
        splits[split] = cases
    if not any(splits.values()):
        raise CrossModalNetError(f"{json_path}: lists no cases in {list(SPLITS)}")
    return Dataset(root=root, name=str(meta.get("name", root.name)), splits=splits)


def write_dataset_json(root: str | os.PathLike, splits: dict[str, list[dict]], name: str, **extra) -> Path:
    """Write `dataset.json` (atomically) for `splits` of relative-path entries."""
    root = Path(root)
    meta = {
        "name": name,
        "modality": CHANNELS,
        "labels": {"0": "background", **{str(s.index): s.name for s in STRUCTURES}},
        "label_codes": {str(s.index): s.code for s in STRUCTURES},
        **extra,
        **{split: splits.get(split, []) for split in SPLITS},
    }
    with atomic_path(root / "dataset.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return root / "dataset.json"


def check_case(case: Case) -> Geometry:
    """Header-only check that the case's CT, MR and label share one grid. Returns that grid."""
    import nibabel as nib

    geoms: dict[str, Geometry] = {}
    for path in (case.ct, case.mr, case.label):
        if path is None:
            continue
        try:
            img = nib.load(str(path))
            shape = tuple(int(s) for s in img.shape[:3])
            geoms[str(path)] = Geometry(np.asarray(img.affine, dtype=np.float64), shape)
        except Exception as exc:
            raise CrossModalNetError(f"{path}: cannot read as NIfTI ({type(exc).__name__})") from None
    check_same_grid(geoms)
    return next(iter(geoms.values()))


def load_case(case: Case, with_label: bool = True) -> dict:
    """Read a case fully. Returns {"ct": (X,Y,Z) float32 | None, "mr": ... | None,
    "label": (X,Y,Z) uint8 | None, "geometry": Geometry}; checks the grids agree."""
    out: dict = {"ct": None, "mr": None, "label": None}
    geoms: dict[str, Geometry] = {}
    for key in ("ct", "mr"):
        path = getattr(case, key)
        if path is not None:
            out[key], geoms[str(path)] = read_image(path)
    if with_label and case.label is not None:
        out["label"], geoms[str(case.label)], _ = read_label(case.label)
    check_same_grid(geoms)
    out["geometry"] = next(iter(geoms.values()))
    return out
