"""The evaluator's two plots, as PNG bytes: HD95 bars per structure and case, Dice box plots.

Each plot is drawn on its own `matplotlib.figure.Figure` (no pyplot): the caller's backend and
open figures are left alone, and `savefig` renders with the Agg canvas. Input: the metric rows
and the summary of `summary.summarize`.
"""

from __future__ import annotations

import io as _stdio
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from crossmodalnet.data.spec import DataSpec
from crossmodalnet.evaluate.metrics import Row

__all__ = ["plot_hd95", "plot_dice"]


def _groups(summary: dict[str, Any], spec: DataSpec) -> list[tuple[str, str, np.ndarray, dict[str, Any]]]:
    """(kind, name, RGB 0-1, summary entry) of every class, then every region (grey shades)."""
    out = [("class", n, np.array(c) / 255.0, summary["per_structure"][n])
           for n, c in zip(spec.names, spec.colors(), strict=True)]
    for i, r in enumerate(spec.regions):
        out.append(("region", r.name, np.full(3, 0.35 + 0.5 * i / max(len(spec.regions), 1)),
                    summary["per_region"][r.name]))
    return out


def _label(kind: str, name: str) -> str:
    return name if kind == "class" else f"[{name}]"


def _png_bytes(fig: Any) -> bytes:
    buf = _stdio.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def plot_hd95(rows: Sequence[Row], summary: dict[str, Any], spec: DataSpec) -> bytes:
    """Grouped bars (as the paper's Figure 2): one group per class (then region, in brackets), one
    bar per case."""
    from matplotlib.figure import Figure  # heavy: matplotlib loads only when a plot is drawn

    cases = summary["cases"]
    n = len(cases)
    width = 0.8 / n
    groups = _groups(summary, spec)
    fig = Figure(figsize=(min(16.0, max(7.0, 1.0 + 0.12 * n * len(groups))), 4.0))
    ax = fig.subplots()
    top = max([r["hd95"] for r in rows if not math.isnan(r["hd95"])], default=1.0)
    for gi, (kind, name, color, entry) in enumerate(groups):
        values = {r["case"]: r["hd95"] for r in rows if r["structure"] == name and r.get("kind", "class") == kind}
        xs = gi - 0.4 + width * (np.arange(n) + 0.5)
        heights = [values[c] for c in cases]
        ax.bar(xs, [0.0 if math.isnan(h) else h for h in heights], width=width * 0.9, color=color,
               edgecolor="black", linewidth=0.3)
        for x, h in zip(xs, heights, strict=True):
            if math.isnan(h):  # a missing value must not read as a perfect 0 mm
                ax.text(x, 0.01 * top, "×", ha="center", va="bottom", color="dimgray", fontsize=8)
        mean = entry["hd95"]
        if mean is not None:
            ax.hlines(mean, gi - 0.42, gi + 0.42, colors="black", linewidth=1.2)
    ax.set_xticks(range(len(groups)), [_label(k, nm) for k, nm, _, _ in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel("HD95 (mm)")
    ax.set_title(f"HD95 per structure ({summary['hd95_convention']} convention), {n} case(s)\n"
                 "bars: cases in metrics.csv order; line: mean; ×: undefined (empty mask)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _png_bytes(fig)


def plot_dice(rows: Sequence[Row], summary: dict[str, Any], spec: DataSpec) -> bytes:
    """Box plot of Dice over cases per class (then region, in brackets), cases as dots."""
    from matplotlib.figure import Figure  # heavy: matplotlib loads only when a plot is drawn

    groups = _groups(summary, spec)
    fig = Figure(figsize=(max(7.0, 0.8 * len(groups)), 4.0))
    ax = fig.subplots()
    rng = np.random.default_rng(0)  # fixed jitter: the same inputs give the same picture
    for gi, (kind, name, color, _) in enumerate(groups):
        values = np.array([r["dice"] for r in rows if r["structure"] == name and r.get("kind", "class") == kind],
                          dtype=float)
        values = values[~np.isnan(values)]
        if values.size == 0:
            ax.text(gi, 0.5, "n/a", ha="center", color="dimgray")
            continue
        box = ax.boxplot(values, positions=[gi], widths=0.6, patch_artist=True, showfliers=False)
        box["boxes"][0].set(facecolor=(*color, 0.5), edgecolor="black")
        box["medians"][0].set(color="black")
        ax.scatter(gi + rng.uniform(-0.15, 0.15, values.size), values, s=10, color=color,
                   edgecolor="black", linewidth=0.3, zorder=3)
    ax.set_xticks(range(len(groups)), [_label(k, nm) for k, nm, _, _ in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    mean = summary["mean_dice"]
    ax.set_title(f"Dice per structure over {summary['num_cases']} case(s); mean Dice "
                 f"{'n/a' if mean is None else f'{mean:.3f}'}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _png_bytes(fig)
