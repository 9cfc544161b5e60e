"""Pairing the raw data: which CT goes with which MR (by MM-WHS number, or as a CSV says).

RAW (as released): `ct_train/ct_train_1001_image.nii.gz` + `ct_train_1001_label.nii.gz` (MM-WHS codes),
`mr_train/...`, optionally `ct_test/`, `mr_test/` without labels. Case i of one modality is paired
with case i of the other (sorted by number), or as a CSV says (`ct,mr[,id]`, paths relative to RAW).
Inputs are checked here before any case starts: headers (`check_headers`), then voxels and label
values (`prepare.read_pair`, for every pair still to do, before the output folder is made); the
volumes are (X, Y, Z) NIfTI files.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from crossmodalnet.data.dataset import check_case_id
from crossmodalnet.data.io import check_same_grid, read_geometry
from crossmodalnet.errors import CrossModalNetError

__all__ = ["MODALITIES", "Pair", "find_pairs", "read_pairs_csv", "check_headers"]

MODALITIES: tuple[str, str] = ("ct", "mr")
_NAME = re.compile(r"^(ct|mr)_(train|test)_(\d+)_(image|label)\.nii(\.gz)?$")


@dataclass(frozen=True)
class Pair:
    """One CT/MR pair of the raw data: absolute paths; labels None where the release has none."""

    id: str
    ct: Path
    mr: Path
    ct_label: Path | None = None
    mr_label: Path | None = None

    def image(self, modality: str) -> Path:
        return self.ct if modality == "ct" else self.mr

    def label(self, modality: str) -> Path | None:
        return self.ct_label if modality == "ct" else self.mr_label


def _scan(folder: Path, modality: str, split: str) -> dict[int, dict[str, Path]]:
    """{number: {"image": path, "label": path}} of one raw folder; names that do not fit are ignored."""
    found: dict[int, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        m = _NAME.match(path.name)
        if m and m.group(1) == modality and m.group(2) == split:
            found.setdefault(int(m.group(3)), {})[m.group(4)] = path
    for number, files in found.items():
        if "image" not in files:
            raise CrossModalNetError(f"{files['label']}: label without its image "
                                     f"{modality}_{split}_{number}_image.nii.gz")
        if split == "train" and "label" not in files:
            raise CrossModalNetError(f"{files['image']}: training image without its label "
                                     f"{modality}_{split}_{number}_label.nii.gz")
    return found


def find_pairs(raw: str | os.PathLike) -> list[Pair]:
    """Pair the raw layout by number: the i-th CT (sorted) with the i-th MR, per train/test folder.

    Raises CrossModalNetError naming the missing folder or file when the two sides do not match.
    """
    raw = Path(raw)
    if not raw.is_dir():
        raise CrossModalNetError(f"{raw}: raw MM-WHS folder not found")
    pairs: list[Pair] = []
    for split in ("train", "test"):
        ct_dir, mr_dir = raw / f"ct_{split}", raw / f"mr_{split}"
        if not ct_dir.is_dir() and not mr_dir.is_dir():
            continue
        for have, need in ((ct_dir, mr_dir), (mr_dir, ct_dir)):
            if not need.is_dir():
                raise CrossModalNetError(f"{need}: folder not found, so the images of {have} have no partner")
        ct, mr = _scan(ct_dir, "ct", split), _scan(mr_dir, "mr", split)
        if len(ct) != len(mr):
            more, fewer, more_mod, fewer_mod = (ct, mr, "ct", "mr") if len(ct) > len(mr) else (mr, ct, "mr", "ct")
            lonely = [n for n in sorted(more) if n not in fewer] or sorted(more)[len(fewer):]
            expected = raw / f"{fewer_mod}_{split}" / f"{fewer_mod}_{split}_{lonely[0]}_image.nii.gz"
            raise CrossModalNetError(
                f"{more[lonely[0]]['image']}: no {fewer_mod.upper()} partner ({expected} not found; "
                f"{len(more)} {more_mod.upper()} vs {len(fewer)} {fewer_mod.upper()} images in {split}); "
                "add it, remove the extra file, or pair explicitly with --pairs CSV")
        for c, m in zip(sorted(ct), sorted(mr), strict=True):
            case_id = f"{split}_{c}" if c == m else f"{split}_ct{c}_mr{m}"
            pairs.append(Pair(case_id, ct[c]["image"], mr[m]["image"], ct[c].get("label"), mr[m].get("label")))
    if not pairs:
        raise CrossModalNetError(f"{raw}: no ct_train/mr_train (or ct_test/mr_test) folders with MM-WHS images")
    return pairs


def _label_beside(image: Path) -> Path | None:
    candidate = image.with_name(image.name.replace("_image.nii", "_label.nii"))
    return candidate if candidate != image and candidate.is_file() else None


def read_pairs_csv(csv_path: str | os.PathLike, raw: str | os.PathLike) -> list[Pair]:
    """Pairs from a CSV with columns `ct`, `mr` (image paths, relative to RAW or absolute) and
    optionally `id`, `ct_label`, `mr_label`; labels default to the `_label` file beside the image."""
    csv_path, raw = Path(csv_path), Path(raw)
    if not csv_path.is_file():
        raise CrossModalNetError(f"{csv_path}: pairing CSV not found")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"ct", "mr"} <= {c.strip() for c in reader.fieldnames}:
            raise CrossModalNetError(f"{csv_path}: needs a header with columns 'ct' and 'mr', got {reader.fieldnames}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    pairs, seen = [], set()
    for line, row in enumerate(rows, start=2):
        paths = {}
        for key in ("ct", "mr", "ct_label", "mr_label"):
            if row.get(key):
                path = Path(row[key]) if Path(row[key]).is_absolute() else raw / row[key]
                if not path.is_file():
                    raise CrossModalNetError(f"{csv_path} line {line}: {path} not found")
                paths[key] = path
        if "ct" not in paths or "mr" not in paths:
            raise CrossModalNetError(f"{csv_path} line {line}: both 'ct' and 'mr' are needed")
        stems = [re.sub(r"(_image)?\.nii(\.gz)?$", "", paths[k].name) for k in ("ct", "mr")]
        case_id = row.get("id") or f"{stems[0]}_{stems[1]}"
        # The id names the prepared files and dataset.json lists it: the dataset's own rule.
        problem = check_case_id(case_id)
        if problem:
            raise CrossModalNetError(f"{csv_path} line {line}: id {case_id!r:.80} {problem}")
        if case_id.casefold() in seen:
            raise CrossModalNetError(f"{csv_path} line {line}: id {case_id!r} appears twice (letter case ignored)")
        seen.add(case_id.casefold())
        pairs.append(Pair(case_id, paths["ct"], paths["mr"], paths.get("ct_label") or _label_beside(paths["ct"]),
                          paths.get("mr_label") or _label_beside(paths["mr"])))
    if not pairs:
        raise CrossModalNetError(f"{csv_path}: lists no pairs")
    return pairs


def check_headers(pairs: list[Pair]) -> None:
    """Every file readable as a 3D NIfTI and each label on its image's grid, before any work."""
    for pair in pairs:
        for mod in MODALITIES:
            grids = {str(pair.image(mod)): read_geometry(pair.image(mod))}
            if pair.label(mod) is not None:
                grids[str(pair.label(mod))] = read_geometry(pair.label(mod))
            check_same_grid(grids)
