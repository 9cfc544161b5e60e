"""Files: pairing predicted label maps with references, reading them lazily, writing the report.

`evaluate_paths` writes into OUT: `metrics.csv` (case, kind, structure, dice, iou, hd95, note
[, betti_error_0, betti_error_1, betti_error_2]), `summary.json`, `hd95.png`, `dice.png`.
Label files hold (X, Y, Z) class indices or the dataset's label values (`io.read_label` detects
which per file). The labels and regions are the dataset's: `resolve_spec` finds them.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import math
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crossmodalnet.data.dataset import load_dataset, read_spec
from crossmodalnet.data.io import check_same_grid, read_geometry, read_label
from crossmodalnet.data.spec import DataSpec
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.evaluate.metrics import COLUMNS, TOPOLOGY_COLUMNS, Row, Spacing, check_convention
from crossmodalnet.evaluate.plots import plot_dice, plot_hd95
from crossmodalnet.evaluate.summary import evaluate_arrays, format_table
from crossmodalnet.files import atomic_path, temp_file_beside
from crossmodalnet.runs import RunFolder

__all__ = ["match_cases", "evaluate_paths", "resolve_spec"]

_NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")


def _case_name(path: Path) -> str | None:
    for suffix in _NIFTI_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _kind(path: Path) -> str | None:
    """None for a regular file (symlinks followed), else what the entry is instead."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken symlink" if path.is_symlink() else "unreadable"
    if stat.S_ISREG(mode):
        return None
    return "a folder" if stat.S_ISDIR(mode) else "not a regular file"


def _list_nifti(folder: Path, ignored: list[str]) -> dict[str, Path]:
    """{case: file} of the NIfTI files of `folder`. An entry with a NIfTI name that is not a
    readable file (a broken symlink, a folder) is an error: skipping it would score fewer cases
    than the folder holds. Other entries (not dot files) are appended to `ignored`, to be reported."""
    found: dict[str, Path] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise CrossModalNetError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None
    for path in entries:
        # Dot files are skipped: they are temp files of atomic writes (ours included).
        if path.name.startswith("."):
            continue
        name = _case_name(path)
        if name is None:
            ignored.append(str(path))
            continue
        kind = _kind(path)
        if kind is not None:
            raise CrossModalNetError(f"{path}: {kind}, not a NIfTI file; remove it or replace it with the file")
        if name in found:
            raise CrossModalNetError(
                f"{folder}: case {name!r} is there twice ({found[name].name}, {path.name})"
            )
        found[name] = path
    return found


def match_cases(
    pred: str | os.PathLike, ref: str | os.PathLike, ignored: list[str] | None = None, split: str = "test"
) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """Pair predictions with references: two files, or two folders matched by case name, or a folder
    of predictions and a dataset folder (its `split` cases' labels are the references, by case id).

    The case name is the file name without `.nii.gz`/`.nii`. Returns ({case: (pred, ref)},
    names of predictions with no reference). A reference with no prediction is an error: a score
    over fewer cases than the reference set would look better than it is. A prediction with no
    reference is only reported (a test split may be predicted in full and scored on a subset).
    Entries of either folder that are not NIfTI files by name are appended to `ignored`.
    """
    ignored = [] if ignored is None else ignored
    pred, ref = Path(pred), Path(ref)
    for what, path in (("prediction", pred), ("reference", ref)):
        if not path.exists():
            raise CrossModalNetError(f"{path}: {what} not found")
    for what, path in (("prediction", pred), ("reference", ref)):
        if path.exists() and not (path.is_file() or path.is_dir()):
            raise CrossModalNetError(f"{path}: the {what} is {_kind(path)}; give a NIfTI file or a folder of them")
    if pred.is_file() and ref.is_file():
        return {_case_name(ref) or ref.name: (pred, ref)}, []
    if not (pred.is_dir() and ref.is_dir()):
        raise CrossModalNetError(f"{pred} and {ref}: give two files or two folders, not one of each")
    preds = _list_nifti(pred, ignored)
    if (ref / "dataset.json").is_file():  # a dataset folder: its split's labels
        cases = load_dataset(ref, check_files=False)[split]
        refs = {c.id: c.label for c in cases if c.label is not None}
        if not refs:
            raise CrossModalNetError(f"{ref / 'dataset.json'}: no labelled {split!r} case to evaluate against")
    else:
        refs = _list_nifti(ref, ignored)
    if not refs:
        raise CrossModalNetError(f"{ref}: no .nii.gz or .nii reference files in the folder")
    missing = [name for name in refs if name not in preds]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        listed = ", ".join(refs[n].name for n in missing[:3])
        raise CrossModalNetError(f"{pred}: no prediction for reference {listed}{more} (from {ref})")
    extra = [name for name in preds if name not in refs]
    return {name: (preds[name], refs[name]) for name in refs}, extra


class _FileCases(Mapping):
    """{case: (pred indices, ref indices, ref spacing)}, read on access so one case is in memory."""

    def __init__(self, pairs: dict[str, tuple[Path, Path]], spec: DataSpec) -> None:
        self.pairs = pairs
        self.spec = spec

    def __getitem__(self, name: str) -> tuple[np.ndarray, np.ndarray, Spacing]:
        pred_path, ref_path = self.pairs[name]
        ref, ref_geom, _ = read_label(ref_path, self.spec)
        pred, pred_geom, _ = read_label(pred_path, self.spec)
        check_same_grid({str(ref_path): ref_geom, str(pred_path): pred_geom})
        # Index-space distances scaled per axis are world distances for any rotation in the affine.
        return pred, ref, ref_geom.spacing

    def __iter__(self) -> Iterator[str]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        # 7 significant digits: MONAI's distances are float32, more digits would print its noise.
        return "nan" if math.isnan(value) else format(value, ".7g")
    return str(value)


def _csv_text(rows: Sequence[Row], columns: Sequence[str]) -> str:
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row[c]) for c in columns])
    return buf.getvalue()


def _check_headers(pairs: dict[str, tuple[Path, Path]]) -> None:
    """Every header readable and within the memory budget, each prediction on its reference's grid:
    checked for all cases before the first is scored, so that a bad last file stops the run at once."""
    for pred_path, ref_path in pairs.values():
        check_same_grid({str(ref_path): read_geometry(ref_path), str(pred_path): read_geometry(pred_path)})


def _write_outputs(out: Path, outputs: dict[str, bytes]) -> None:
    """Write every output so that a failure part-way (a full disk) leaves `out` as it was.

    A new `out` is filled as a hidden staging folder beside it and renamed into place; an existing
    one gets each file under a hidden temp name first, renamed over the old files only once all of
    them are written. On failure the temp files (and any folders made here) are removed.
    """
    created = [p for p in (out, *out.parents) if not p.exists()]
    staging: Path | None = None
    temps: dict[str, Path] = {}
    try:
        if created:
            out.parent.mkdir(parents=True, exist_ok=True)
            # os.mkdir, not mkdtemp: the kernel applies the umask, as for any folder the user makes.
            staging = out.parent / f".{out.name}.{secrets.token_hex(4)}.staging"
            staging.mkdir()
            for name, data in outputs.items():
                with atomic_path(staging / name) as tmp:
                    tmp.write_bytes(data)
            os.replace(staging, out)
            staging = None
            return
        for name, data in outputs.items():
            temps[name] = temp_file_beside(out / name)
            temps[name].write_bytes(data)
        for name, tmp in temps.items():
            os.replace(tmp, out / name)
        temps = {}
    except OSError as exc:
        raise CrossModalNetError(f"{out}: cannot write the report ({exc.strerror or exc}); "
                                 "the folder is left as it was") from None
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in created[1:]:  # parents made for a new `out`, innermost first
            if folder.is_dir() and not out.exists():
                try:
                    folder.rmdir()
                except OSError:
                    break


def resolve_spec(ref: str | os.PathLike, dataset: str | os.PathLike | None = None,
                 run: str | os.PathLike | None = None) -> DataSpec:
    """The labels and regions to score with: the dataset's (`dataset`, a folder with dataset.json), the
    run's (`run`), or those of the dataset the references belong to (a dataset.json in `ref`'s folder
    or the one above it, as `labelsTs/` sits in its dataset)."""
    if dataset is not None and run is not None:
        raise CrossModalNetError("give --dataset or --run, not both")
    if dataset is not None:
        return read_spec(dataset)
    if run is not None:
        return RunFolder(run).read_spec()
    folder = Path(ref) if Path(ref).is_dir() else Path(ref).parent
    for candidate in (folder, folder.parent):
        if (candidate / "dataset.json").is_file():
            return read_spec(candidate)
    raise CrossModalNetError(f"{ref}: no dataset.json beside or above the references to name the labels; "
                             "give --dataset DATA or --run RUN")


def evaluate_paths(
    pred: str | os.PathLike,
    ref: str | os.PathLike,
    out: str | os.PathLike,
    spec: DataSpec | None = None,
    hd95: str = "monai",
    split: str = "test",
    topology: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score predicted label maps against references and write the report into `out`.

    pred, ref: two NIfTI files or two folders of them (matched by case name). Every header is
    checked first (readable, 3D, within the memory budget, same grid as its reference), then every
    case is read and scored (voxels, label values) and every output is made in memory before the
    first file is written, so an error leaves `out` untouched; the files are then written all or
    none (`_write_outputs`). Entries of the folders that are not NIfTI files are named on stderr
    and in summary.json ("ignored_entries"). Prints the markdown table; returns the summary.
    """
    check_convention(hd95)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CrossModalNetError(f"{out}: exists and is not a folder")
    spec = spec if spec is not None else resolve_spec(ref)
    ignored: list[str] = []
    pairs, extra = match_cases(pred, ref, ignored, split)
    _check_headers(pairs)
    if ignored:
        more = f" and {len(ignored) - 3} more" if len(ignored) > 3 else ""
        print(f"note: {len(ignored)} entr{'y' if len(ignored) == 1 else 'ies'} without a .nii/.nii.gz name "
              f"ignored: {', '.join(ignored[:3])}{more}", file=sys.stderr)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        print(f"warning: {len(extra)} prediction(s) in {pred} have no reference and are ignored: "
              f"{', '.join(extra[:3])}{more}", file=sys.stderr)
    rows, summary = evaluate_arrays(_FileCases(pairs, spec), spec, hd95=hd95, topology=topology, progress=progress)
    summary["unmatched_predictions"] = extra
    summary["ignored_entries"] = ignored
    columns = COLUMNS + (TOPOLOGY_COLUMNS if topology else ())
    outputs = {
        "metrics.csv": _csv_text(rows, columns).encode(),
        "summary.json": (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode(),
        "hd95.png": plot_hd95(rows, summary, spec),
        "dice.png": plot_dice(rows, summary, spec),
    }
    _write_outputs(out, outputs)
    print(format_table(summary))
    print(f"wrote {', '.join(outputs)} to {out}")
    return summary
