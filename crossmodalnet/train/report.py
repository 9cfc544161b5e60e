"""What a training run logs: the columns of `metrics.csv` (one row per epoch) and `steps.csv` (one
row per optimizer step, with the loss-balancing weights), the figure saved as `curves.png`, and the
line printed at each validation. The engine writes them through the run folder, rewritten whole
from the history kept in the resume checkpoint, so a killed and resumed run never holds duplicated
or missing rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from crossmodalnet.data.spec import DataSpec

__all__ = ["metric_columns", "score_columns", "STEP_TERMS", "plot_curves", "plot_adaptation", "format_summary"]

STEP_TERMS: tuple[str, ...] = ("loss", "loss_dice", "loss_ce", "weight_dice", "weight_ce")


def score_columns(spec: DataSpec) -> tuple[str, ...]:
    """Validation columns of a dataset: the mean and each class's Dice, then, when the dataset has
    regions, their mean and each region's (`val_region_*`; the score that selects checkpoints)."""
    cols = ("val_dice_mean", *(f"val_dice_{n}" for n in spec.names))
    if spec.regions:
        cols += ("val_region_mean", *(f"val_region_{r.name}" for r in spec.regions))
    return cols


def metric_columns(spec: DataSpec) -> tuple[str, ...]:
    """The columns of `metrics.csv` for a dataset."""
    return ("epoch", "step", "lr", *STEP_TERMS, *score_columns(spec), "best_val_dice", "time_s")


def plot_curves(history: Sequence[dict[str, Any]], steps: Sequence[dict[str, Any]], balancing: bool = True,
                spec: DataSpec | None = None) -> Figure:
    """Three panels: training losses per epoch, validation Dice per structure, balancing weights.

    A bare `Figure` (no pyplot): it renders on its own Agg canvas and leaves the user's backend alone.
    """
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    epochs = [r["epoch"] for r in history]
    for key, label in (("loss", "total"), ("loss_dice", "Dice term"), ("loss_ce", "CE term")):
        axes[0].plot(epochs, [r.get(key) for r in history], marker=".", label=label)
    axes[0].set(title="training loss", xlabel="epoch")
    axes[0].legend()
    val = [r for r in history if _finite(r.get("val_dice_mean"))]
    rows = ([f"val_region_{r.name}" for r in spec.regions] if spec is not None and spec.regions
            else [f"val_dice_{n}" for n in (spec.names if spec is not None else ())])
    for key in rows:
        axes[1].plot([r["epoch"] for r in val], [r.get(key) for r in val], lw=0.8,
                     label=key.removeprefix("val_dice_").removeprefix("val_region_"))
    mean_key = "val_region_mean" if spec is not None and spec.regions else "val_dice_mean"
    axes[1].plot([r["epoch"] for r in val], [r[mean_key] for r in val], "k-o", lw=2, label="mean")
    axes[1].set(title="validation Dice (whole volumes)", xlabel="epoch", ylim=(0, 1))
    axes[1].legend(fontsize=7, ncol=2)
    x = [r["step"] for r in steps]
    axes[2].plot(x, [r["weight_dice"] for r in steps], label="w_dice")
    axes[2].plot(x, [r["weight_ce"] for r in steps], label="w_ce")
    axes[2].set(title="loss weights (Def. 4)" if balancing else "loss weights (balancing off)", xlabel="step")
    axes[2].legend()
    fig.tight_layout()
    return fig


def plot_adaptation(history: Sequence[dict[str, Any]], steps: Sequence[dict[str, Any]],
                    terms: Sequence[str]) -> Figure:
    """Four panels per step/epoch: segmenter losses, discriminators, balancing weights and lambda, source Dice."""
    fig = Figure(figsize=(19, 4))
    axes = fig.subplots(1, 4)
    x = [r["step"] for r in steps]
    for key in ("loss", "loss_dice", "loss_ce", *(["loss_topology"] if "topology" in terms else [])):
        axes[0].plot(x, [r[key] for r in steps], lw=0.8, label=key.removeprefix("loss_"))
    axes[0].set(title="segmenter losses", xlabel="step")
    for term in ("marginal", "conditional"):
        if term in terms:
            axes[1].plot(x, [r[f"loss_{term}"] for r in steps], lw=0.8, label=f"{term} BCE")
            axes[1].plot(x, [r[f"disc_acc_{term}"] for r in steps], lw=0.8, ls="--", label=f"{term} accuracy")
    axes[1].axhline(math.log(2), color="grey", lw=0.5)  # BCE of a discriminator that cannot tell
    axes[1].set(title="domain discriminators", xlabel="step")
    for name in ("dice", "ce", *terms):
        axes[2].plot(x, [r[f"weight_{name}"] for r in steps], lw=0.8, label=f"w_{name}")
    axes[2].plot(x, [r["grl_lambda"] for r in steps], "k--", lw=0.8, label="GRL lambda")
    axes[2].set(title="loss weights (Def. 4) and GRL lambda", xlabel="step")
    val = [r for r in history if isinstance(r.get("source_val_dice"), float)]
    axes[3].plot([r["epoch"] for r in val], [r["source_val_dice"] for r in val], "k-o")
    axes[3].set(title="source validation Dice (diagnostic)", xlabel="epoch", ylim=(0, 1))
    for ax in axes[:3]:
        if ax.get_legend_handles_labels()[0]:  # topology alone leaves the discriminator panel empty
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def format_summary(row: dict[str, Any], epochs: int, spec: DataSpec) -> str:
    """The one line printed per validation (regions when the dataset has them, else classes)."""
    prefix, names = ("val_region_", [r.name for r in spec.regions]) if spec.regions else ("val_dice_", spec.names)
    per = " ".join(f"{n} {row[prefix + n]:.3f}" for n in names if _finite(row.get(prefix + n)))
    return (f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.4f}  val Dice {row[prefix + 'mean']:.4f} "
            f"({per})  best {row['best_val_dice']:.4f}  {row['time_s'] / 60:.1f} min")


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)
