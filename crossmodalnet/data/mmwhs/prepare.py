"""One pair -> one prepared case: register, take the heart box, resample onto the prepared grid.

Per pair: the moving modality is registered onto the fixed one (`register.register`), the heart
box is taken from the fixed label (plus `margin_mm`), and every volume is resampled, in one
interpolation from its original voxels, onto the *prepared grid*: `size` voxels of `spacing` mm
per axis, axes parallel to the fixed image's, centred on the box. Where the grid is larger than the
box the surrounding anatomy fills it (no artificial edge); only outside the scanned field of view is
padded (with the image's minimum). Cases without a fixed label (raw test folders) centre the grid
on the fixed image's field of view: MM-WHS volumes are acquired roughly centred on the heart.

Writes images{Tr,Ts}/<id>_ct|mr.nii.gz ((X, Y, Z) float32 on the prepared grid), labels{Tr,Ts}/<id>.nii.gz
(class indices), transforms/<id>_* and, last, records/<id>.json, the case's done marker.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crossmodalnet.data.io import (
    MAX_IMAGE_BYTES_ENV,
    check_same_grid,
    max_image_bytes,
    read_image,
    read_label,
    write_image,
    write_label,
)
from crossmodalnet.data.mmwhs.grid import crop_grid, fraction_inside, heart_box, label_dice
from crossmodalnet.data.mmwhs.pairing import MODALITIES, Pair
from crossmodalnet.data.mmwhs.records import RECORD_FORMAT, geometry_to_json
from crossmodalnet.data.mmwhs.register import RegistrationConfig, register, warp
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path

__all__ = ["PrepareConfig", "read_pair", "prepare_case", "done_record", "nanmean"]

# The transform files `register` keeps per case, after the `<id>_` prefix (ANTs' own names).
_TRANSFORM_FILES: tuple[str, ...] = ("1Warp.nii.gz", "0GenericAffine.mat", "1InverseWarp.nii.gz")


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
        # The prepared grid is allocated several times per case (image, warped image, label) as
        # float32: refuse a grid over the per-volume memory budget before any case starts.
        voxels = math.prod(int(s) for s in self.size)
        if voxels * 4 > max_image_bytes():
            raise CrossModalNetError(
                f"--size {'x'.join(map(str, self.size))}: the prepared grid holds {voxels:.3g} voxels "
                f"({voxels * 4 / 2**30:.3g} GiB as float32), over the memory budget of "
                f"{max_image_bytes() / 2**30:.3g} GiB per volume (${MAX_IMAGE_BYTES_ENV} raises it)")
        if not (math.isfinite(self.margin_mm) and self.margin_mm >= 0):
            raise CrossModalNetError(f"--margin must be >= 0 mm, got {self.margin_mm}")

    @property
    def moving(self) -> str:
        return "ct" if self.fixed == "mr" else "mr"

    def describe(self) -> dict:
        return {"fixed": self.fixed, "moving": self.moving, "registration": self.registration.describe(),
                "spacing": list(map(float, self.spacing)), "size": list(map(int, self.size)),
                "margin_mm": float(self.margin_mm)}


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


def nanmean(values) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def read_pair(pair: Pair) -> tuple[dict, dict, dict]:
    """Read and check a pair's images and labels: readable voxels, finite values, label codes in the
    table, each label on its image's grid. Returns ({mod: image}, {mod: Geometry}, {mod: label | None})."""
    images, grids, labels = {}, {}, {}
    for mod in MODALITIES:
        images[mod], grids[mod] = read_image(pair.image(mod))
        labels[mod] = None
        if pair.label(mod) is not None:
            labels[mod], label_grid, _ = read_label(pair.label(mod), MMWHS)
            check_same_grid({str(pair.image(mod)): grids[mod], str(pair.label(mod)): label_grid})
    return images, grids, labels


def prepare_case(pair: Pair, out: str | os.PathLike, folder: str, config: PrepareConfig) -> dict:
    """Prepare one pair into `out` (images/labels{folder}, transforms/, records/); returns its record.

    The old record goes first and the new one is written last, so that a run killed in between
    leaves a case without a record, which the next run redoes. A failure (a full disk, ANTs) removes
    the case's files before it is raised: no half-written case stays behind.
    """
    out = Path(out)
    (out / "records" / f"{pair.id}.json").unlink(missing_ok=True)
    try:
        return _prepare_case(pair, out, folder, config)
    except BaseException:
        for rel in _files(pair.id, folder, True).values():
            (out / rel).unlink(missing_ok=True)
        for name in _TRANSFORM_FILES:
            (out / "transforms" / f"{pair.id}_{name}").unlink(missing_ok=True)
        raise


def _prepare_case(pair: Pair, out: Path, folder: str, config: PrepareConfig) -> dict:
    record_path = out / "records" / f"{pair.id}.json"
    wall, cpu = time.perf_counter(), time.process_time()
    fixed, moving = config.fixed, config.moving
    images, grids, labels = read_pair(pair)
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
        registration.update(dice_before=before, dice_after=after, mean_dice_before=nanmean(before.values()),
                            mean_dice_after=nanmean(after.values()))
    root = out.resolve()
    record = {
        "format": RECORD_FORMAT, "id": pair.id, "folder": folder, "settings": config.describe(),
        "source": _source(pair), "fixed": fixed, "moving": moving, "files": files,
        "original": geometry_to_json(grids[fixed]), "moving_original": geometry_to_json(grids[moving]),
        "box": {"source": box_source, "margin_mm": config.margin_mm,
                "lo": None if box is None else box[0].tolist(), "hi": None if box is None else box[1].tolist()},
        "prepared": geometry_to_json(grid),
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


def done_record(pair: Pair, out: Path, folder: str, config: PrepareConfig, move: bool = True) -> dict | None:
    """The record of a finished case (same settings and raw files, all outputs present), moved to
    `folder` when the split changed since (unless `move` is False: only asking); None when the case
    must be (re)done."""
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
    if record["folder"] != folder and move:
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

