"""The figures of `benchmarks/compare.py`: per-case test Dice per model, and Dice against MR misregistration.

PNG through matplotlib's Agg canvas (no display needed), written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from _plan import Settings
from _report import ok_result

from crossmodalnet.files import atomic_path

__all__ = ["plot_dice", "plot_misregistration"]


def plot_dice(jobs: list[dict[str, Any]], results: dict[str, dict[str, Any]], groups: list[tuple[str, str]],
              path: Path) -> Path | None:
    """Per-case test Dice (points) and the mean (bar) per model, one panel per table; PNG via Agg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(title, [(j["label"], results[j["key"]]) for j in jobs
                       if j.get("group") == g and ok_result(results, j["key"])])
              for g, title in groups]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig = Figure(figsize=(max(6.0, 1.1 * max(len(p[1]) for p in panels) + 2), 3.6 * len(panels)))
    FigureCanvasAgg(fig)
    rng = np.random.default_rng(0)  # fixed jitter: same results, same picture
    for ax, (title, rows) in zip(np.atleast_1d(fig.subplots(len(panels), 1)), panels, strict=True):
        for x, (_, r) in enumerate(rows):
            dice = [v["dice"] for v in r["test"]["per_case"].values() if v["dice"] is not None]
            ax.scatter(x + rng.uniform(-0.12, 0.12, len(dice)), dice, s=14, color="tab:blue", zorder=3)
            ax.hlines(r["test"]["mean_dice"] or 0.0, x - 0.3, x + 0.3, color="black", linewidth=2)
        ax.set_xticks(range(len(rows)), [label for label, _ in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("test Dice")
        ax.set_title(f"{title} — dots: test cases; bar: mean Dice", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path


def plot_misregistration(s: Settings, results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Mean test Dice against the MR perturbation magnitude: solid shift, dashed warp."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [(n, ok_result(results, f"misregistration-{n}")) for n in s.models]
    runs = [(n, r) for n, r in runs if r]
    if not runs:
        return None
    fig = Figure(figsize=(6.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (name, r) in enumerate(runs):
        for mode, style in (("shift", "-"), ("warp", "--")):
            c = r["conditions"]
            ys = [c["none"]["mean_dice"] if m == 0 else c[f"{mode}_{m:g}"]["mean_dice"] for m in s.magnitudes]
            ax.plot(s.magnitudes, ys, style, marker="o", color=f"C{i}", label=f"{name} ({mode})")
    ax.set_xlabel("MR misregistration (voxels)")
    ax.set_ylabel("mean test Dice")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path


