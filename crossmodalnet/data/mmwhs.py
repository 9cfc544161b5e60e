"""`prepare-mmwhs`: the raw MM-WHS release (or any unpaired CT and MR) -> a paired, registered, cropped
dataset folder; and `restore_to_original`, the way from that folder back to the original scans.

RAW (as released): `ct_train/ct_train_1001_image.nii.gz` + `ct_train_1001_label.nii.gz` (MM-WHS codes),
`mr_train/...`, optionally `ct_test/`, `mr_test/` without labels. Case i of one modality is paired
with case i of the other (sorted by number), or as a CSV says (`ct,mr[,id]`, paths relative to RAW).

Per pair: the moving modality is registered onto the fixed one (`registration.register`), the heart
box is taken from the fixed label (plus `margin_mm`), and every volume is resampled, in one
interpolation from its original voxels, onto the *prepared grid*: `size` voxels of `spacing` mm
per axis, axes parallel to the fixed image's, centred on the box. Where the grid is larger than the
box the surrounding anatomy fills it (no artificial edge); only outside the scanned field of view is
padded (with the image's minimum). Cases without a fixed label (raw test folders) centre the grid
on the fixed image's field of view: MM-WHS volumes are acquired roughly centred on the heart.

Back to the original scans (what `predict` does with a prepared case):
    record = load_record(data_dir, case.id)               # None: not a prepare-mmwhs folder
    labels, geometry = restore_to_original(probs, record)  # (C, X, Y, Z) or (X, Y, Z) on the prepared grid
    write_label(path, to_codes(labels), geometry)          # on the original fixed image's grid
`restore_to_moving` does the same onto the other modality's original grid, through the inverse
registration.

OUT:
    dataset.json                 training / validation / test ("test" also lists unlabeled pairs, no label)
    imagesTr/<id>_ct.nii.gz      (X, Y, Z) float32 on the prepared grid, its true affine; <id>_mr likewise
    labelsTr/<id>.nii.gz         (X, Y, Z) class indices 0..7 of the fixed modality's label
    imagesTs/, labelsTs/         the test split
    transforms/<id>_*            ANTs files: 1Warp + 0GenericAffine (fixed -> moving world), 1InverseWarp
    records/<id>.json            per-case record (original fixed geometry, box, grid, transforms, Dice, time);
                                 written last, atomically: it is the case's done marker
    registration_report.csv/json label Dice between the modalities before / after registration, time

Shapes: volumes (X, Y, Z) in their files' axis order; probabilities (C, X, Y, Z).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import multiprocessing
import os
import re
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from crossmodalnet.data.dataset import write_dataset_json
from crossmodalnet.data.io import (
    Geometry,
    atomic_path,
    check_same_grid,
    read_geometry,
    read_image,
    read_label,
    write_image,
    write_label,
)
from crossmodalnet.data.labels import NAMES
from crossmodalnet.data.registration import (
    RegistrationConfig,
    crop_grid,
    fraction_inside,
    heart_box,
    label_dice,
    register,
    resample_classes,
    set_threads,
    warp,
)
from crossmodalnet.errors import CrossModalNetError

__all__ = [
    "Pair",
    "PrepareConfig",
    "find_pairs",
    "read_pairs_csv",
    "parse_split",
    "assign_splits",
    "prepare_case",
    "prepare_mmwhs",
    "load_record",
    "restore_to_original",
    "restore_to_moving",
    "prepare_from_cli",
]

MODALITIES: tuple[str, str] = ("ct", "mr")
RECORD_FORMAT = 1
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


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that decides a prepared case's content (compared on resumption)."""

    fixed: str = "mr"
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size: tuple[int, int, int] = (128, 128, 128)
    margin_mm: float = 10.0

    def __post_init__(self) -> None:
        if self.fixed not in MODALITIES:
            raise CrossModalNetError(f"--fixed must be 'ct' or 'mr', got {self.fixed!r}")
        if len(self.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise CrossModalNetError(f"--spacing must be positive (mm), got {self.spacing}")
        if len(self.size) != 3 or not all(int(s) >= 8 for s in self.size):
            raise CrossModalNetError(f"--size must be at least 8 voxels, got {self.size}")
        if not (math.isfinite(self.margin_mm) and self.margin_mm >= 0):
            raise CrossModalNetError(f"--margin must be >= 0 mm, got {self.margin_mm}")

    @property
    def moving(self) -> str:
        return "ct" if self.fixed == "mr" else "mr"

    def describe(self) -> dict:
        return {"fixed": self.fixed, "moving": self.moving, "registration": self.registration.describe(),
                "spacing": list(map(float, self.spacing)), "size": list(map(int, self.size)),
                "margin_mm": float(self.margin_mm)}


# ---------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------


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
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", case_id):
            raise CrossModalNetError(f"{csv_path} line {line}: id {case_id!r} may hold only letters, digits, _ . -")
        if case_id in seen:
            raise CrossModalNetError(f"{csv_path} line {line}: id {case_id!r} appears twice")
        seen.add(case_id)
        pairs.append(Pair(case_id, paths["ct"], paths["mr"], paths.get("ct_label") or _label_beside(paths["ct"]),
                          paths.get("mr_label") or _label_beside(paths["mr"])))
    if not pairs:
        raise CrossModalNetError(f"{csv_path}: lists no pairs")
    return pairs


def _check_headers(pairs: list[Pair]) -> None:
    """Every file readable as a 3D NIfTI and each label on its image's grid, before any work."""
    for pair in pairs:
        for mod in MODALITIES:
            grids = {str(pair.image(mod)): read_geometry(pair.image(mod))}
            if pair.label(mod) is not None:
                grids[str(pair.label(mod))] = read_geometry(pair.label(mod))
            check_same_grid(grids)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def parse_split(text: str) -> tuple[int, int | None, int]:
    """"15/5" -> (15, None, 5): training (validation carved from it) / test; "12/3/5" names all three."""
    parts = str(text).split("/")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3) or any(n < 0 for n in numbers) or sum(numbers) == 0:
        raise CrossModalNetError(f"--split must look like TRAIN/TEST or TRAIN/VAL/TEST (e.g. 15/5), got {text!r}")
    return (numbers[0], None, numbers[1]) if len(numbers) == 2 else (numbers[0], numbers[1], numbers[2])


def assign_splits(labeled: list[str], unlabeled: list[str], split: tuple[int, int | None, int],
                  seed: int) -> dict[str, list[str]]:
    """Split labeled case ids by `seed` in the proportions of `split` (exactly when they add up to
    the number of cases); without a validation count, validation is 20 % of the training part (at
    least one case when there are two or more). Unlabeled ids all go to test."""
    train, val, test = split
    n, total = len(labeled), train + (val or 0) + test
    n_test = round(n * test / total)
    if test > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    rest = n - n_test
    if val is None:
        n_val = max(1, round(0.2 * rest)) if rest >= 2 else 0
    else:
        n_val = min(round(n * val / total), rest)
    order = [sorted(labeled)[i] for i in np.random.default_rng(int(seed)).permutation(n)]
    return {"training": sorted(order[n_test + n_val:]), "validation": sorted(order[n_test:n_test + n_val]),
            "test": sorted(order[:n_test]) + sorted(unlabeled)}


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------


def _files(case_id: str, folder: str, has_label: bool) -> dict[str, str]:
    files = {m: f"images{folder}/{case_id}_{m}.nii.gz" for m in MODALITIES}
    if has_label:
        files["label"] = f"labels{folder}/{case_id}.nii.gz"
    return files


def _source(pair: Pair) -> dict:
    """The raw files with size and modification time: a changed file makes a done case stale."""
    out = {}
    for key in ("ct", "mr", "ct_label", "mr_label"):
        path = getattr(pair, key)
        if path is not None:
            st = path.stat()
            out[key] = {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def _geometry_json(geometry: Geometry) -> dict:
    return {"affine": np.asarray(geometry.affine).tolist(), "shape": list(geometry.shape),
            "spacing": list(geometry.spacing)}


def _geometry(d: dict) -> Geometry:
    return Geometry(affine=np.asarray(d["affine"], dtype=np.float64), shape=tuple(int(s) for s in d["shape"]))


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def prepare_case(pair: Pair, out: str | os.PathLike, folder: str, config: PrepareConfig) -> dict:
    """Prepare one pair into `out` (images/labels{folder}, transforms/, records/); returns its record.

    The old record goes first and the new one is written last, so that a run killed in between
    leaves a case without a record, which the next run redoes.
    """
    out = Path(out)
    record_path = out / "records" / f"{pair.id}.json"
    record_path.unlink(missing_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    fixed, moving = config.fixed, config.moving
    images, grids, labels = {}, {}, {}
    for mod in MODALITIES:
        images[mod], grids[mod] = read_image(pair.image(mod))
        labels[mod] = None
        if pair.label(mod) is not None:
            labels[mod], label_grid, _ = read_label(pair.label(mod))
            check_same_grid({str(pair.image(mod)): grids[mod], str(pair.label(mod)): label_grid})
    reg_config = config.registration
    if reg_config.method == "label" and (labels[fixed] is None or labels[moving] is None):
        # Label-driven registration is for training pairs; the others are registered by image.
        reg_config = dataclasses.replace(reg_config, method="image")
    try:
        reg = register(images[fixed], grids[fixed], images[moving], grids[moving], reg_config, out / "transforms",
                       f"{pair.id}_", labels[fixed], labels[moving])
    except RuntimeError as exc:  # ANTs reports its failures as RuntimeError
        raise CrossModalNetError(f"{pair.image(moving)}: registration onto {pair.image(fixed)} failed "
                                 f"({' '.join(str(exc).split())})") from None

    # The prepared grid: centred on the fixed heart box, else on the fixed field of view.
    box = heart_box(labels[fixed], grids[fixed], config.margin_mm) if labels[fixed] is not None else None
    if box is not None:
        centre, box_source = (box[0] + box[1] - 1) / 2.0, "label"
    else:
        centre, box_source = (np.asarray(grids[fixed].shape) - 1) / 2.0, "field_of_view_centre"
    grid = crop_grid(grids[fixed], centre, config.spacing, config.size)
    transforms = {fixed: ([], []), moving: (reg.forward, reg.forward_invert)}
    prepared = {mod: warp(images[mod], grids[mod], transforms[mod][0], grid, "linear", transforms[mod][1],
                          fill=float(images[mod].min())) for mod in MODALITIES}
    label_on_grid = {mod: None if labels[mod] is None else
                     warp(labels[mod], grids[mod], transforms[mod][0], grid, "label", transforms[mod][1])
                     for mod in MODALITIES}

    files = _files(pair.id, folder, labels[fixed] is not None)
    for mod in MODALITIES:
        write_image(out / files[mod], prepared[mod], grid)
    registration = {"method": reg_config.method, "seconds": round(reg.seconds, 3)}
    if labels[fixed] is not None:
        write_label(out / files["label"], label_on_grid[fixed], grid)
        # Below 1 when --size x --spacing is smaller than the heart (with its margin).
        registration["label_inside_grid"] = round(fraction_inside(labels[fixed], grids[fixed], grid), 5)
    if labels[fixed] is not None and labels[moving] is not None:
        # Before: the moving label through world coordinates only; after: through the transforms.
        before = label_dice(warp(labels[moving], grids[moving], [], grid, "label"), label_on_grid[fixed])
        after = label_dice(label_on_grid[moving], label_on_grid[fixed])
        registration.update(dice_before=before, dice_after=after, mean_dice_before=_nanmean(before.values()),
                            mean_dice_after=_nanmean(after.values()))
    root = out.resolve()
    record = {
        "format": RECORD_FORMAT, "id": pair.id, "folder": folder, "settings": config.describe(),
        "source": _source(pair), "fixed": fixed, "moving": moving, "files": files,
        "original": _geometry_json(grids[fixed]), "moving_original": _geometry_json(grids[moving]),
        "box": {"source": box_source, "margin_mm": config.margin_mm,
                "lo": None if box is None else box[0].tolist(), "hi": None if box is None else box[1].tolist()},
        "prepared": _geometry_json(grid),
        "resampling": {"image": "linear (ANTs), one interpolation from the original voxels",
                       "label": "genericLabel (ANTs)", "outside_field_of_view": "image minimum; label 0",
                       "inverse": "restore_to_original: per-class linear by world coordinates, argmax"},
        "transforms": {"moving_to_fixed": [str(Path(t).resolve().relative_to(root)) for t in reg.forward],
                       "moving_to_fixed_invert": reg.forward_invert,
                       "fixed_to_moving": [str(Path(t).resolve().relative_to(root)) for t in reg.inverse],
                       "fixed_to_moving_invert": reg.inverse_invert,
                       "convention": "ANTs antsApplyTransforms lists: moving_to_fixed resamples a moving "
                                     "image onto a fixed-world grid (points map fixed -> moving world)"},
        "registration": registration,
        "seconds": round(time.perf_counter() - wall, 3), "cpu_seconds": round(time.process_time() - cpu, 3),
    }
    with atomic_path(record_path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return record


def _done(pair: Pair, out: Path, folder: str, config: PrepareConfig) -> dict | None:
    """The record of a finished case (same settings and raw files, all outputs present), moved to
    `folder` when the split changed since; None when the case must be (re)done."""
    path = out / "records" / f"{pair.id}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (record.get("format") != RECORD_FORMAT or record.get("settings") != config.describe()
            or record.get("source") != _source(pair)):
        return None
    try:
        listed = [*record["files"].values(), *record["transforms"]["moving_to_fixed"],
                  *record["transforms"]["fixed_to_moving"]]
    except (KeyError, TypeError, AttributeError):  # a record edited by hand: redo the case
        return None
    if not all((out / f).is_file() for f in listed):
        return None
    if record["folder"] != folder:
        # A new split or seed: move the files rather than register again. The record is rewritten
        # after the moves; a crash in between leaves it pointing at missing files -> redone.
        files = _files(pair.id, folder, "label" in record["files"])
        for key, rel in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(out / record["files"][key], out / rel)
        record.update(folder=folder, files=files)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
    return record


# ---------------------------------------------------------------------------------------------
# The whole data set
# ---------------------------------------------------------------------------------------------


def _worker(args: tuple) -> dict:
    return prepare_case(*args)


def _run(jobs: list[tuple], workers: int, bar: tqdm) -> list[dict]:
    """prepare_case over `jobs` in `workers` processes; the first error stops the rest (finished cases stay done)."""
    if workers <= 1 or len(jobs) <= 1:
        records = []
        for job in jobs:
            records.append(prepare_case(*job))
            bar.update()
        return records
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn: ITK's thread pool and torch's OpenMP state do not survive a fork safely.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=set_threads, initargs=(threads,)) as pool:
        pending = {pool.submit(_worker, job) for job in jobs}
        records = []
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                records.append(future.result())
                bar.update()
    return records


def _write_report(out: Path, records: list[dict], splits: dict[str, list[str]]) -> None:
    """registration_report.csv (one row per case) and .json (the same plus means)."""
    split_of = {cid: s for s, ids in splits.items() for cid in ids}
    rows = []
    for r in sorted(records, key=lambda r: r["id"]):
        reg = r["registration"]
        row = {"id": r["id"], "split": split_of.get(r["id"], ""), "fixed": r["fixed"], "moving": r["moving"],
               "method": reg["method"], "mean_dice_before": reg.get("mean_dice_before", math.nan),
               "mean_dice_after": reg.get("mean_dice_after", math.nan),
               **{f"before_{n}": reg.get("dice_before", {}).get(n, math.nan) for n in NAMES},
               **{f"after_{n}": reg.get("dice_after", {}).get(n, math.nan) for n in NAMES},
               "label_inside_grid": reg.get("label_inside_grid", math.nan), "register_s": reg["seconds"],
               "case_s": r["seconds"], "cpu_s": r["cpu_seconds"]}
        rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(out / "registration_report.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {key: _nanmean([float(r[key]) for r in rows]) for key in
               ("mean_dice_before", "mean_dice_after", "register_s", "case_s", "cpu_s")}
    summary["note"] = ("Dice per structure between the fixed label and the moving label on the prepared grid, "
                       "before (world coordinates only) and after registration; means skip NaN (structure in "
                       "neither map; null where a case has no labels); times: seconds per case of this run's "
                       "workers (case_s: wall, cpu_s: CPU).")

    def strict(v):  # JSON has no NaN: null, as the note says
        return None if isinstance(v, float) and math.isnan(v) else v

    report = {"summary": {k: strict(v) for k, v in summary.items()},
              "cases": [{k: strict(v) for k, v in row.items()} for row in rows]}
    with atomic_path(out / "registration_report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, allow_nan=False))


def prepare_mmwhs(raw: str | os.PathLike, out: str | os.PathLike, config: PrepareConfig | None = None,
                  split: str = "15/5", seed: int = 0, workers: int = 2, pairs: str | os.PathLike | None = None,
                  progress: bool = True) -> Path:
    """Pair, register, crop and resample RAW into the dataset folder `out`. Returns dataset.json's path.

    Every input is checked (pairing, headers) before any case starts; finished cases (record
    present, same settings and raw files) are skipped; a case without its record is redone.
    """
    config = config or PrepareConfig()
    split_counts = parse_split(split)
    if workers < 1:
        raise CrossModalNetError(f"--workers must be >= 1, got {workers}")
    if pairs is None:
        found = find_pairs(raw)
    else:
        if not Path(raw).is_dir():
            raise CrossModalNetError(f"{raw}: raw folder not found")
        found = read_pairs_csv(pairs, raw)
    _check_headers(found)
    out = Path(out)
    fixed_label = {p.id: p.label(config.fixed) is not None for p in found}
    splits = assign_splits([p.id for p in found if fixed_label[p.id]], [p.id for p in found if not fixed_label[p.id]],
                           split_counts, seed)
    test = set(splits["test"])
    folder = {p.id: "Ts" if p.id in test else "Tr" for p in found}
    if config.registration.method == "label":
        unlabeled = [p.id for p in found if p.label("ct") is None or p.label("mr") is None]
        if unlabeled:
            tqdm.write(f"note: {len(unlabeled)} pair(s) without both labels (first {unlabeled[0]}) are registered "
                       "by image: --register label needs the labels of both modalities")
    records: dict[str, dict] = {}
    jobs = []
    for p in found:
        record = _done(p, out, folder[p.id], config)
        if record is not None:
            records[p.id] = record
        else:
            jobs.append((p, out, folder[p.id], config))
    with tqdm(total=len(found), initial=len(records), desc="prepare-mmwhs", unit="case",
              disable=None if progress else True) as bar:  # None: on a terminal only
        for record in _run(jobs, workers, bar):
            records[record["id"]] = record

    def entry(cid: str) -> dict:
        files = records[cid]["files"]
        return {"id": cid, **{k: files[k] for k in ("ct", "mr", "label") if k in files},
                "record": f"records/{cid}.json"}

    _write_report(out, list(records.values()), splits)
    cut = sorted((r["registration"]["label_inside_grid"], r["id"]) for r in records.values()
                 if r["registration"].get("label_inside_grid", 1.0) < 0.995)
    if cut:
        grid = "x".join(map(str, config.size))
        tqdm.write(f"note: the {grid} grid of {config.spacing[0]:g} mm voxels cuts off part of the fixed label in "
                   f"{len(cut)} case(s) (worst {cut[0][1]}: {cut[0][0]:.1%} inside); use a larger --size or --spacing")
    return write_dataset_json(
        out, {s: [entry(cid) for cid in ids] for s, ids in splits.items()}, name="mmwhs-prepared",
        mmwhs={**config.describe(), "split": split, "seed": int(seed), "report": "registration_report.csv",
               "validation": "given" if split_counts[1] is not None else "20% of the training part"},
    )


# ---------------------------------------------------------------------------------------------
# Back to the original scans
# ---------------------------------------------------------------------------------------------


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
    prepared, original = _geometry(record["prepared"]), _geometry(record["original"])
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
    prepared, moving = _geometry(record["prepared"]), _geometry(record["moving_original"])
    labels = np.asarray(labels)
    if labels.shape != tuple(prepared.shape):
        raise CrossModalNetError(f"case {record.get('id')}: label map of shape {labels.shape} is not on the "
                                 f"prepared grid {prepared.shape}")
    transforms = record["transforms"]
    # fixed_to_moving maps moving-world points to fixed-world points: what resampling a fixed-world
    # image onto a moving-world grid needs (antsApplyTransforms' "inverse" list).
    paths = [str(Path(root) / t) for t in transforms["fixed_to_moving"]]
    return warp(labels, prepared, paths, moving, "label", transforms["fixed_to_moving_invert"]), moving


def prepare_from_cli(args) -> None:
    """`crossmodalnet prepare-mmwhs RAW OUT [...]` (argparse namespace from cli.py)."""
    try:
        iterations = tuple(int(i) for i in str(args.syn_iterations).split("x"))
    except ValueError:
        raise CrossModalNetError(f"--syn-iterations must look like 60x40x20, got {args.syn_iterations!r}") from None
    config = PrepareConfig(
        fixed=args.fixed,
        # The registration keeps its own fixed seed: --seed only draws the split, so that a new
        # split reuses the registered cases.
        registration=RegistrationConfig(method=args.register, spacing_mm=args.reg_spacing, syn_iterations=iterations),
        spacing=(args.spacing,) * 3, size=(args.size,) * 3, margin_mm=args.margin,
    )
    path = prepare_mmwhs(args.raw, args.out, config, split=args.split, seed=args.seed, workers=args.workers,
                         pairs=args.pairs)
    summary = json.loads((path.parent / "registration_report.json").read_text())["summary"]
    dice = ("" if summary["mean_dice_before"] is None else
            f"mean label Dice between the modalities {summary['mean_dice_before']:.3f} -> "
            f"{summary['mean_dice_after']:.3f}; ")
    print(f"wrote {path} ({args.register} registration): {dice}{summary['case_s']:.1f} s per case "
          f"(see {path.parent / 'registration_report.csv'})")
