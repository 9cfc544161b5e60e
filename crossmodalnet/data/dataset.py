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
import re
from dataclasses import dataclass
from pathlib import Path

from crossmodalnet.data.io import Geometry, check_same_grid, read_geometry, read_image, read_label
from crossmodalnet.data.labels import NUM_CLASSES, STRUCTURES
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path

__all__ = ["Case", "Dataset", "CHANNELS", "SPLITS", "CASE_ID_PATTERN", "check_case_id", "load_dataset",
           "write_dataset_json", "check_case", "load_case"]

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


# A case id becomes file names (predictions, records/<id>.json): one safe path component, no
# separators, not "." or "..", not hidden, short enough for every file system.
CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A dataset.json of 10 000 cases is about 2 MB; a larger file is not a dataset description.
MAX_JSON_BYTES = 64 * 2**20


def check_case_id(case_id: object) -> str | None:
    """None when `case_id` is a safe case id (it becomes a file name), else what is wrong with it."""
    if not isinstance(case_id, str):
        return f"must be a string, got {type(case_id).__name__}"
    if not CASE_ID_PATTERN.fullmatch(case_id):
        return ("must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
                "(it becomes a file name)")
    return None


def _resolve(root: Path, rel: object, json_path: Path, where: str, must_exist: bool) -> Path:
    """`root/rel` made absolute, refused unless `rel` is a relative path whose target (symlinks
    followed) lies inside the dataset folder."""
    if not isinstance(rel, str) or not rel:
        raise CrossModalNetError(f"{json_path}: {where} must be a non-empty relative path, got {rel!r}")
    if "\0" in rel:
        raise CrossModalNetError(f"{json_path}: {where} path {rel!r} holds a NUL character")
    if Path(rel).is_absolute():
        raise CrossModalNetError(f"{json_path}: {where} absolute path {rel!r} leaves the dataset folder "
                                 "(paths are relative to it)")
    try:
        path = (root / rel).resolve()
        inside = root.resolve() in path.parents
        exists = not must_exist or path.is_file()
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
        raise CrossModalNetError(f"{json_path}: {where} {rel!r} cannot be resolved ({exc.strerror or exc})") from None
    if not inside:
        how = "is a symlink to a file outside" if (root / rel).is_symlink() else "leaves"
        raise CrossModalNetError(f"{json_path}: {where} path {rel!r} {how} the dataset folder")
    if not exists:
        raise CrossModalNetError(f"{json_path}: listed file {rel!r} ({where}) does not exist")
    return path


def _read_json(json_path: Path) -> dict:
    """dataset.json's top-level object, with a one-line error for every way it can be unreadable."""
    root = json_path.parent
    if not json_path.is_file():
        raise CrossModalNetError(f"{json_path}: not found (is {root} a crossmodalnet dataset folder?)")
    try:
        if json_path.stat().st_size > MAX_JSON_BYTES:
            raise CrossModalNetError(f"{json_path}: larger than {MAX_JSON_BYTES // 2**20} MiB; "
                                     "not a dataset description")
        raw = json_path.read_bytes()
    except OSError as exc:
        raise CrossModalNetError(f"{json_path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CrossModalNetError(f"{json_path}: not UTF-8 text (byte {exc.start})") from None
    try:
        meta = json.loads(text)
    except RecursionError:
        raise CrossModalNetError(f"{json_path}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        raise CrossModalNetError(f"{json_path}: invalid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(meta, dict):
        raise CrossModalNetError(f"{json_path}: expected a JSON object at the top, got {type(meta).__name__}")
    return meta


def _check_header(meta: dict, json_path: Path) -> None:
    """The fields beside the splits: name, modality, labels."""
    name = meta.get("name")
    if name is not None and not isinstance(name, str):
        raise CrossModalNetError(f"{json_path}: 'name' must be a string, got {type(name).__name__}")
    modality = meta.get("modality", {})
    if not isinstance(modality, dict) or not all(isinstance(v, str) for v in modality.values()):
        raise CrossModalNetError(f"{json_path}: 'modality' must be a mapping like {CHANNELS}, got {modality!r:.80}")
    if modality and {str(k): v.upper() for k, v in modality.items()} != CHANNELS:
        raise CrossModalNetError(f"{json_path}: modality must be {CHANNELS}, got {modality!r:.80}")
    labels = meta.get("labels")
    if labels is not None and not isinstance(labels, dict):
        raise CrossModalNetError(
            f"{json_path}: 'labels' must be a mapping of {NUM_CLASSES} entries (background + 7), "
            f"got {type(labels).__name__}")
    if labels is not None and len(labels) != NUM_CLASSES:
        raise CrossModalNetError(f"{json_path}: expected {NUM_CLASSES} labels (background + 7), got {len(labels)}")


def load_dataset(root: str | os.PathLike, check_files: bool = True) -> Dataset:
    """Read and validate `root/dataset.json`. Returns a Dataset with absolute paths per split.

    Every case id (given, or the CT/MR file name without suffixes) must be a safe file name and
    unique across all splits (ignoring letter case), since outputs are named by it; only the same
    case (same files) may appear under one id in two splits; every path
    must be relative and stay inside the folder, symlinks followed.
    """
    root = Path(root)
    json_path = root / "dataset.json"
    meta = _read_json(json_path)
    _check_header(meta, json_path)
    splits: dict[str, list[Case]] = {}
    seen: dict[str, tuple[str, Case]] = {}  # casefolded id -> where it was first listed, and the case
    for split in SPLITS:
        entries = meta.get(split, [])
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise CrossModalNetError(f"{json_path}: {split!r} must be a list, got {type(entries).__name__}")
        cases = []
        in_split: dict[str, str] = {}  # casefolded id -> where in this split
        for i, entry in enumerate(entries):
            where = f"{split}[{i}]"
            if not isinstance(entry, dict):
                raise CrossModalNetError(f"{json_path}: {where} must be a mapping with 'ct'/'mr', got "
                                         f"{type(entry).__name__}")
            if not (entry.get("ct") or entry.get("mr")):
                raise CrossModalNetError(f"{json_path}: {where} needs at least one of 'ct' and 'mr'")
            paths = {
                key: _resolve(root, entry[key], json_path, f"{where}.{key}", check_files)
                if entry.get(key) is not None and entry.get(key) != "" else None
                for key in ("ct", "mr", "label")
            }
            given = entry.get("id")
            case_id = given if given is not None else Path(str(entry.get("ct") or entry.get("mr"))).name.split(".")[0]
            problem = check_case_id(case_id)
            if problem:
                source = "id" if given is not None else "id (taken from the file name)"
                raise CrossModalNetError(f"{json_path}: {where} {source} {case_id!r:.80} {problem}")
            case = Case(id=case_id, **paths)
            key = case_id.casefold()
            # One case may be listed in two splits (same id, same files: its outputs are the same
            # files); any other repeat would let one case's outputs overwrite another's.
            clash = in_split.get(key) or (seen[key][0] if key in seen and seen[key][1] != case else None)
            if clash:
                raise CrossModalNetError(
                    f"{json_path}: {where} id {case_id!r} is also the id of {clash} "
                    "(ids name output files, so they must differ, beyond letter case too)")
            in_split[key] = where
            seen.setdefault(key, (where, case))
            cases.append(case)
        splits[split] = cases
    if not any(splits.values()):
        raise CrossModalNetError(f"{json_path}: lists no cases in {list(SPLITS)}")
    return Dataset(root=root, name=str(meta.get("name") or root.name), splits=splits)


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
    """Header-only check that the case's CT, MR and label share one grid. Returns that grid.

    Each header passes `io.read_geometry`'s checks (3D, memory budget, file size, affine)."""
    geoms: dict[str, Geometry] = {
        str(path): read_geometry(path) for path in (case.ct, case.mr, case.label) if path is not None
    }
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
