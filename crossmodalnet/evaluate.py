"""The evaluator: Dice, IoU and HD95 per structure and case, as a CSV, a JSON summary and plots.

Inputs are label maps (X, Y, Z) of class indices 0..7 (files may hold MM-WHS codes; `io.read_label`
detects which per file). Each of the seven structures of `labels.STRUCTURES` is scored one
against one with MONAI's metric functions; HD95 is in mm from the reference's voxel spacing
(array-axis order).

HD95 conventions (they differ a lot on real data; the summary names the one used):
- "monai" (default): the larger of the two directed 95th percentiles of surface distances,
  as `monai.metrics.compute_hausdorff_distance(percentile=95)` computes it;
- "pooled": the 95th percentile of both directions' surface distances together, as medpy's `hd95`.

Empty masks. Per structure, with P the prediction and R the reference:
- both empty: nothing to measure, every metric NaN, note "both empty";
- exactly one empty: Dice = IoU = 0, a true value (the structure is missed, or hallucinated, and
  averaging it as NaN would reward a model for missing it), HD95 NaN because a distance to an empty
  set is undefined; note "empty prediction" or "empty reference".
Means skip NaN; `summary.json` counts the NaNs so that none goes unseen.

Outputs of `evaluate_paths` in OUT: `metrics.csv` (case, structure, dice, iou, hd95, note
[, betti_error_0, betti_error_1, betti_error_2]), `summary.json`, `hd95.png`, `dice.png`.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from crossmodalnet.data.io import atomic_path, check_same_grid, read_label
from crossmodalnet.data.labels import NUM_CLASSES, STRUCTURES
from crossmodalnet.errors import CrossModalNetError

__all__ = [
    "HD95_CONVENTIONS",
    "COLUMNS",
    "TOPOLOGY_COLUMNS",
    "compute_case_metrics",
    "evaluate_arrays",
    "evaluate_paths",
    "match_cases",
    "summarize",
    "format_table",
]

HD95_CONVENTIONS: dict[str, str] = {
    "monai": "max of the two directed 95th percentiles of surface distances (MONAI)",
    "pooled": "95th percentile of both directions' surface distances pooled (medpy hd95)",
}
COLUMNS: tuple[str, ...] = ("case", "structure", "dice", "iou", "hd95", "note")
TOPOLOGY_COLUMNS: tuple[str, ...] = ("betti_error_0", "betti_error_1", "betti_error_2")
_METRICS: tuple[str, ...] = ("dice", "iou", "hd95")
_NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")

Spacing = Sequence[float]
Row = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Metrics of one case
# ---------------------------------------------------------------------------------------------


def _check_convention(hd95: str) -> None:
    if hd95 not in HD95_CONVENTIONS:
        raise CrossModalNetError(f"unknown HD95 convention {hd95!r}; choose from {sorted(HD95_CONVENTIONS)}")


def _check_labels(name: str, arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a 3D label map (X, Y, Z), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"{name}: expected integer class indices, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= NUM_CLASSES):
        raise ValueError(f"{name}: class indices must lie in 0..{NUM_CLASSES - 1} (codes: use to_indices)")
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
        from monai.metrics import compute_hausdorff_distance

        value = compute_hausdorff_distance(
            _one_hot(p), _one_hot(r), include_background=False, percentile=95, spacing=list(spacing)
        )
        return float(value[0, 0])
    # "pooled": MONAI has no option for it, so take both directed surface-distance sets from
    # MONAI's own machinery (same edges, same spacing) and pool them before the percentile.
    from monai.metrics.utils import get_edge_surface_distance

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
    from monai.metrics import compute_dice, compute_iou

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
        from crossmodalnet.analysis.topology import betti_errors

        for key, err in zip(TOPOLOGY_COLUMNS, betti_errors(p, r), strict=True):
            row[key] = float(err)
    return row


def compute_case_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Spacing, hd95: str = "monai", topology: bool = False
) -> list[Row]:
    """Metrics of one case, one row per structure of `labels.STRUCTURES`.

    pred, ref: (X, Y, Z) class indices 0..7 on the same grid. spacing: voxel size in mm per array
    axis (the reference's). Returns [{"structure", "dice", "iou", "hd95", "note"[, betti errors]}].
    """
    _check_convention(hd95)
    pred, ref = _check_labels("pred", pred), _check_labels("ref", ref)
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
        for s in STRUCTURES:
            rows.append({"structure": s.name, **_structure_metrics(pred == s.index, ref == s.index,
                                                                    spacing, hd95, topology)})
    return rows


# ---------------------------------------------------------------------------------------------
# Many cases: rows and summary
# ---------------------------------------------------------------------------------------------


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _nanstd(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.std(finite)) if finite else math.nan


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def summarize(rows: Sequence[Row], hd95: str = "monai") -> dict[str, Any]:
    """Summary of metric rows: per-structure means, overall means, NaN counts (JSON ready).

    Per-structure means skip NaN; overall means are means of the per-structure means (each structure
    weighs the same, as in the paper's tables). NaN means are written as null.
    """
    _check_convention(hd95)
    topology = bool(rows) and TOPOLOGY_COLUMNS[0] in rows[0]
    metrics = _METRICS + (TOPOLOGY_COLUMNS if topology else ())
    per_structure: dict[str, dict[str, Any]] = {}
    means: dict[str, list[float]] = {m: [] for m in metrics}
    for s in STRUCTURES:
        srows = [r for r in rows if r["structure"] == s.name]
        entry: dict[str, Any] = {}
        for m in metrics:
            values = [float(r[m]) for r in srows]
            means[m].append(_nanmean(values))
            entry[m] = _json_number(means[m][-1])
            entry[f"{m}_std"] = _json_number(_nanstd(values))
        entry["nan"] = {m: sum(math.isnan(float(r[m])) for r in srows) for m in _METRICS}
        notes = sorted({r["note"] for r in srows} - {""})
        entry["notes"] = {n: sum(r["note"] == n for r in srows) for n in notes}
        per_structure[s.name] = entry
    cases = list(dict.fromkeys(r["case"] for r in rows))
    summary: dict[str, Any] = {
        "hd95_convention": hd95,
        "hd95_definition": HD95_CONVENTIONS[hd95],
        "hd95_unit": "mm",
        "num_cases": len(cases),
        "cases": cases,
        "mean_dice": _json_number(_nanmean(means["dice"])),
        "miou": _json_number(_nanmean(means["iou"])),
        "mean_hd95": _json_number(_nanmean(means["hd95"])),
        "nan_counts": {m: sum(e["nan"][m] for e in per_structure.values()) for m in _METRICS},
        "averaging": "per structure over cases skipping NaN, then the mean over structures",
        "empty_rule": "both empty: all NaN; one empty: Dice = IoU = 0, HD95 NaN; see the note column",
        "per_structure": per_structure,
    }
    if topology:
        summary["mean_betti_errors"] = {m: _json_number(_nanmean(means[m])) for m in TOPOLOGY_COLUMNS}
    return summary


def evaluate_arrays(
    cases: Mapping[str, tuple[np.ndarray, np.ndarray, Spacing]],
    hd95: str = "monai",
    topology: bool = False,
    progress: bool = False,
) -> tuple[list[Row], dict[str, Any]]:
    """Score many cases in memory: {case: (pred (X,Y,Z), ref (X,Y,Z), spacing)} -> (rows, summary).

    Rows are `compute_case_metrics` rows with "case" first; the summary is `summarize(rows)`.
    `cases` may be lazy (values read on access), as `evaluate_paths` passes it.
    """
    _check_convention(hd95)
    rows: list[Row] = []
    # disable=None: a bar on a terminal only, not in log files.
    bar = tqdm(list(cases), desc="evaluate", unit="case", disable=None if progress else True, file=sys.stderr)
    for name in bar:
        pred, ref, spacing = cases[name]
        rows.extend({"case": name, **row} for row in compute_case_metrics(pred, ref, spacing, hd95, topology))
    return rows, summarize(rows, hd95)


# ---------------------------------------------------------------------------------------------
# Files: matching, reading, writing
# ---------------------------------------------------------------------------------------------


def _case_name(path: Path) -> str | None:
    for suffix in _NIFTI_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _list_nifti(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = _case_name(path)
        # Dot files are skipped: they are temp files of atomic writes (ours included).
        if name is None or path.name.startswith(".") or not path.is_file():
            continue
        if name in found:
            raise CrossModalNetError(
                f"{folder}: case {name!r} is there twice ({found[name].name}, {path.name})"
            )
        found[name] = path
    return found


def match_cases(
    pred: str | os.PathLike, ref: str | os.PathLike
) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """Pair predictions with references: two files, or two folders matched by case name.

    The case name is the file name without `.nii.gz`/`.nii`. Returns ({case: (pred, ref)},
    names of predictions with no reference). A reference with no prediction is an error: a score
    over fewer cases than the reference set would look better than it is. A prediction with no
    reference is only reported (a test split may be predicted in full and scored on a subset).
    """
    pred, ref = Path(pred), Path(ref)
    for what, path in (("prediction", pred), ("reference", ref)):
        if not path.exists():
            raise CrossModalNetError(f"{path}: {what} not found")
    if pred.is_file() and ref.is_file():
        return {_case_name(ref) or ref.name: (pred, ref)}, []
    if not (pred.is_dir() and ref.is_dir()):
        raise CrossModalNetError(f"{pred} and {ref}: give two files or two folders, not one of each")
    preds, refs = _list_nifti(pred), _list_nifti(ref)
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

    def __init__(self, pairs: dict[str, tuple[Path, Path]]) -> None:
        self.pairs = pairs

    def __getitem__(self, name: str) -> tuple[np.ndarray, np.ndarray, Spacing]:
        pred_path, ref_path = self.pairs[name]
        ref, ref_geom, _ = read_label(ref_path)
        pred, pred_geom, _ = read_label(pred_path)
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


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table: structures x (Dice, IoU, HD95) as mean ± sd over cases, and a mean row."""

    def cell(entry: dict[str, Any], metric: str, digits: int) -> str:
        mean, std = entry.get(metric), entry.get(f"{metric}_std")
        if mean is None:
            return "n/a"
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"

    topology = "mean_betti_errors" in summary
    header = ["structure", "Dice", "IoU", f"HD95 (mm, {summary['hd95_convention']})"]
    header += ["Betti errors b0/b1/b2"] if topology else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    mean = {"dice": summary["mean_dice"], "iou": summary["miou"], "hd95": summary["mean_hd95"],
            **summary.get("mean_betti_errors", {})}
    for name, entry in [*summary["per_structure"].items(), ("**mean**", mean)]:
        cells = [cell(entry, "dice", 3), cell(entry, "iou", 3), cell(entry, "hd95", 2)]
        if topology:
            betti = [entry[m] for m in TOPOLOGY_COLUMNS]
            cells.append("n/a" if None in betti else "/".join(f"{b:.2f}" for b in betti))
        lines.append(f"| {name} | {' | '.join(cells)} |")
    nans = summary["nan_counts"]
    if any(nans.values()):
        lines.append("")
        lines.append(f"NaN skipped in means: {nans['dice']} Dice, {nans['iou']} IoU, {nans['hd95']} HD95 "
                     "(empty masks; see the note column of metrics.csv)")
    return "\n".join(lines)


def _png_bytes(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = _stdio.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plot_hd95(rows: Sequence[Row], summary: dict[str, Any]) -> bytes:
    """Grouped bars (as the paper's Figure 2): one group per structure, one bar per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = summary["cases"]
    n = len(cases)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(min(16.0, max(7.0, 1.0 + 0.12 * n * len(STRUCTURES))), 4.0))
    top = max([r["hd95"] for r in rows if not math.isnan(r["hd95"])], default=1.0)
    for gi, s in enumerate(STRUCTURES):
        values = {r["case"]: r["hd95"] for r in rows if r["structure"] == s.name}
        xs = gi - 0.4 + width * (np.arange(n) + 0.5)
        heights = [values[c] for c in cases]
        color = np.array(s.color) / 255.0
        ax.bar(xs, [0.0 if math.isnan(h) else h for h in heights], width=width * 0.9, color=color,
               edgecolor="black", linewidth=0.3)
        for x, h in zip(xs, heights, strict=True):
            if math.isnan(h):  # a missing value must not read as a perfect 0 mm
                ax.text(x, 0.01 * top, "×", ha="center", va="bottom", color="dimgray", fontsize=8)
        mean = summary["per_structure"][s.name]["hd95"]
        if mean is not None:
            ax.hlines(mean, gi - 0.42, gi + 0.42, colors="black", linewidth=1.2)
    ax.set_xticks(range(len(STRUCTURES)), [s.name for s in STRUCTURES])
    ax.set_xlim(-0.6, len(STRUCTURES) - 0.4)
    ax.set_ylabel("HD95 (mm)")
    ax.set_title(f"HD95 per structure ({summary['hd95_convention']} convention), {n} case(s)\n"
                 "bars: cases in metrics.csv order; line: mean; ×: undefined (empty mask)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _png_bytes(fig)


def _plot_dice(rows: Sequence[Row], summary: dict[str, Any]) -> bytes:
    """Box plot of Dice over cases per structure, cases as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    rng = np.random.default_rng(0)  # fixed jitter: the same inputs give the same picture
    for gi, s in enumerate(STRUCTURES):
        values = np.array([r["dice"] for r in rows if r["structure"] == s.name], dtype=float)
        values = values[~np.isnan(values)]
        color = np.array(s.color) / 255.0
        if values.size == 0:
            ax.text(gi, 0.5, "n/a", ha="center", color="dimgray")
            continue
        box = ax.boxplot(values, positions=[gi], widths=0.6, patch_artist=True, showfliers=False)
        box["boxes"][0].set(facecolor=(*color, 0.5), edgecolor="black")
        box["medians"][0].set(color="black")
        ax.scatter(gi + rng.uniform(-0.15, 0.15, values.size), values, s=10, color=color,
                   edgecolor="black", linewidth=0.3, zorder=3)
    ax.set_xticks(range(len(STRUCTURES)), [s.name for s in STRUCTURES])
    ax.set_xlim(-0.6, len(STRUCTURES) - 0.4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    mean = summary["mean_dice"]
    ax.set_title(f"Dice per structure over {summary['num_cases']} case(s); mean Dice "
                 f"{'n/a' if mean is None else f'{mean:.3f}'}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _png_bytes(fig)


def evaluate_paths(
    pred: str | os.PathLike,
    ref: str | os.PathLike,
    out: str | os.PathLike,
    hd95: str = "monai",
    topology: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score predicted label maps against references and write the report into `out`.

    pred, ref: two NIfTI files or two folders of them (matched by case name). Every input is read
    and checked (readable, 3D, label values, same grid as its reference) and every output is made
    in memory before the first file is written, so an error leaves `out` untouched. Each file is
    then written atomically. Prints the markdown table; returns the summary.
    """
    _check_convention(hd95)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CrossModalNetError(f"{out}: exists and is not a folder")
    pairs, extra = match_cases(pred, ref)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        print(f"warning: {len(extra)} prediction(s) in {pred} have no reference and are ignored: "
              f"{', '.join(extra[:3])}{more}", file=sys.stderr)
    rows, summary = evaluate_arrays(_FileCases(pairs), hd95=hd95, topology=topology, progress=progress)
    summary["unmatched_predictions"] = extra
    columns = COLUMNS + (TOPOLOGY_COLUMNS if topology else ())
    outputs = {
        "metrics.csv": _csv_text(rows, columns).encode(),
        "summary.json": (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode(),
        "hd95.png": _plot_hd95(rows, summary),
        "dice.png": _plot_dice(rows, summary),
    }
    for name, data in outputs.items():
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
    print(format_table(summary))
    print(f"wrote {', '.join(outputs)} to {out}")
    return summary
