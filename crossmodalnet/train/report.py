"""Training logs of a run folder: `metrics.csv` (one row per epoch), `steps.csv` (one row per
optimizer step, with the loss-balancing weights) and `curves.png`.

Each file is rewritten whole and atomically from the history kept in the resume checkpoint, so
a killed and resumed run never holds duplicated or missing rows.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crossmodalnet.data.io import atomic_path
from crossmodalnet.data.labels import NAMES

__all__ = ["METRIC_COLUMNS", "STEP_COLUMNS", "write_csv", "plot_curves", "format_summary"]

METRIC_COLUMNS: tuple[str, ...] = (
    "epoch", "step", "lr", "loss", "loss_dice", "loss_ce", "weight_dice", "weight_ce",
    "val_dice_mean", *(f"val_dice_{n}" for n in NAMES), "best_val_dice", "time_s",
)
STEP_COLUMNS: tuple[str, ...] = ("step", "epoch", "lr", "loss", "loss_dice", "loss_ce", "weight_dice", "weight_ce")


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    """Write `rows` (dicts; missing or NaN values left empty) under `columns`, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return Path(path)


def plot_curves(path: str | os.PathLike, history: Sequence[dict[str, Any]],
                steps: Sequence[dict[str, Any]], balancing: bool = True) -> Path:
    """Three panels: training losses per epoch, validation Dice per structure, balancing weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    epochs = [r["epoch"] for r in history]
    for key, label in (("loss", "total"), ("loss_dice", "Dice term"), ("loss_ce", "CE term")):
        axes[0].plot(epochs, [r.get(key) for r in history], marker=".", label=label)
    axes[0].set(title="training loss", xlabel="epoch")
    axes[0].legend()
    val = [r for r in history if _finite(r.get("val_dice_mean"))]
    for name in NAMES:
        axes[1].plot([r["epoch"] for r in val], [r.get(f"val_dice_{name}") for r in val], lw=0.8, label=name)
    axes[1].plot([r["epoch"] for r in val], [r["val_dice_mean"] for r in val], "k-o", lw=2, label="mean")
    axes[1].set(title="validation Dice (whole volumes)", xlabel="epoch", ylim=(0, 1))
    axes[1].legend(fontsize=7, ncol=2)
    x = [r["step"] for r in steps]
    axes[2].plot(x, [r["weight_dice"] for r in steps], label="w_dice")
    axes[2].plot(x, [r["weight_ce"] for r in steps], label="w_ce")
    axes[2].set(title="loss weights (Def. 4)" if balancing else "loss weights (balancing off)", xlabel="step")
    axes[2].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return Path(path)


def format_summary(row: dict[str, Any], epochs: int) -> str:
    """The one line printed per validation."""
    per = " ".join(f"{n} {row[f'val_dice_{n}']:.3f}" for n in NAMES if _finite(row.get(f"val_dice_{n}")))
    return (f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.4f}  val Dice {row['val_dice_mean']:.4f} "
            f"({per})  best {row['best_val_dice']:.4f}  {row['time_s'] / 60:.1f} min")


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _fmt(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v
