"""Many cases: metric rows in memory -> per-class, per-region and overall summary, and its markdown table.

Rows are `metrics.compute_case_metrics` rows with "case" first. Means skip NaN; the summary counts
the NaNs so that none goes unseen; overall means are means of the per-class means (and, for the
regions, of the per-region means).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from crossmodalnet.data.spec import DataSpec
from crossmodalnet.evaluate.metrics import (
    HD95_CONVENTIONS,
    TOPOLOGY_COLUMNS,
    Row,
    Spacing,
    check_convention,
    compute_case_metrics,
)

__all__ = ["summarize", "evaluate_arrays", "format_table"]

_METRICS: tuple[str, ...] = ("dice", "iou", "hd95")


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _nanstd(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.std(finite)) if finite else math.nan


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def _entries(rows: Sequence[Row], kind: str, names: Sequence[str], metrics: Sequence[str]
             ) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:
    """Per-name summary entries of the rows of one kind, and the per-name means of each metric."""
    entries: dict[str, dict[str, Any]] = {}
    means: dict[str, list[float]] = {m: [] for m in metrics}
    for name in names:
        srows = [r for r in rows if r["structure"] == name and r.get("kind", "class") == kind]
        entry: dict[str, Any] = {}
        for m in metrics:
            values = [float(r[m]) for r in srows]
            means[m].append(_nanmean(values))
            entry[m] = _json_number(means[m][-1])
            entry[f"{m}_std"] = _json_number(_nanstd(values))
        entry["nan"] = {m: sum(math.isnan(float(r[m])) for r in srows) for m in _METRICS}
        notes = sorted({r["note"] for r in srows} - {""})
        entry["notes"] = {n: sum(r["note"] == n for r in srows) for n in notes}
        entries[name] = entry
    return entries, means


def summarize(rows: Sequence[Row], spec: DataSpec, hd95: str = "monai") -> dict[str, Any]:
    """Summary of metric rows: per-class and per-region means, overall means, NaN counts (JSON ready).

    Per-class means skip NaN; overall means are means of the per-class means (each class weighs
    the same, as in the paper's tables); the regions' likewise, as `region_mean_*`. NaN means are
    written as null.
    """
    check_convention(hd95)
    topology = bool(rows) and TOPOLOGY_COLUMNS[0] in rows[0]
    metrics = _METRICS + (TOPOLOGY_COLUMNS if topology else ())
    per_structure, means = _entries(rows, "class", spec.names, metrics)
    per_region, region_means = _entries(rows, "region", [r.name for r in spec.regions], metrics)
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
    if spec.regions:
        summary["region_mean_dice"] = _json_number(_nanmean(region_means["dice"]))
        summary["region_mean_hd95"] = _json_number(_nanmean(region_means["hd95"]))
        summary["per_region"] = per_region
        summary["regions"] = {r.name: list(r.values) for r in spec.regions}
    if topology:
        summary["mean_betti_errors"] = {m: _json_number(_nanmean(means[m])) for m in TOPOLOGY_COLUMNS}
    return summary


def evaluate_arrays(
    cases: Mapping[str, tuple[np.ndarray, np.ndarray, Spacing]],
    spec: DataSpec,
    hd95: str = "monai",
    topology: bool = False,
    progress: bool = False,
) -> tuple[list[Row], dict[str, Any]]:
    """Score many cases in memory: {case: (pred (X,Y,Z), ref (X,Y,Z), spacing)} -> (rows, summary).

    Rows are `compute_case_metrics` rows with "case" first; the summary is `summarize(rows)`.
    `cases` may be lazy (values read on access), as `evaluate_paths` passes it.
    """
    check_convention(hd95)
    rows: list[Row] = []
    # disable=None: a bar on a terminal only, not in log files.
    bar = tqdm(list(cases), desc="evaluate", unit="case", disable=None if progress else True, file=sys.stderr)
    for name in bar:
        pred, ref, spacing = cases[name]
        rows.extend({"case": name, **row} for row in compute_case_metrics(pred, ref, spacing, spec, hd95, topology))
    return rows, summarize(rows, spec, hd95)


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table: classes x (Dice, IoU, HD95) as mean ± sd over cases and a mean row, then the
    regions and their mean when the dataset has regions."""

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
    entries = [*summary["per_structure"].items(), ("**mean**", mean)]
    if "per_region" in summary:
        region_mean = {"dice": summary["region_mean_dice"], "hd95": summary["region_mean_hd95"], "iou": None}
        entries += [(f"region {n}", e) for n, e in summary["per_region"].items()]
        entries += [("**region mean**", region_mean)]
    for name, entry in entries:
        cells = [cell(entry, "dice", 3), cell(entry, "iou", 3), cell(entry, "hd95", 2)]
        if topology:
            betti = [entry.get(m) for m in TOPOLOGY_COLUMNS]
            cells.append("n/a" if None in betti else "/".join(f"{b:.2f}" for b in betti))
        lines.append(f"| {name} | {' | '.join(cells)} |")
    nans = summary["nan_counts"]
    if any(nans.values()):
        lines.append("")
        lines.append(f"NaN skipped in means: {nans['dice']} Dice, {nans['iou']} IoU, {nans['hd95']} HD95 "
                     "(empty masks; see the note column of metrics.csv)")
    return "\n".join(lines)
