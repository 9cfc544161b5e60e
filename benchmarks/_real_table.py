"""The table of `benchmarks/real.py`: per row and channel subset, mean ± sd over the finished folds.

Each fold's number is the evaluator's mean over the fold's cases; the table gives, per structure,
the mean and sd (population) of those fold means, the mean over structures, HD95 per structure,
and each fold's mean Dice; all with the best checkpoint (chosen on the fold's cases), and the mean
over structures again with the last checkpoint (nothing chosen on the scored cases) and, for this
package's rows, without the postprocessing training chose (the network's output).
Markdown, with a header naming data, folds, budget, seed, machine and command.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["group_results", "fold_stats", "render_table"]


def group_results(results: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Finished results grouped by (row label, channel subset), in first-seen order, folds sorted."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["label"], r["channels"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["fold"]) for k, v in groups.items()}


def fold_stats(values: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, sd, n) over the folds' values, None and NaN skipped; NaN mean when there is none."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std()), int(v.size)


def _pm(values: Sequence[float | None], digits: int = 3) -> str:
    mean, sd, n = fold_stats(values)
    if n == 0:
        return "–"
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def render_table(results: Sequence[dict[str, Any]], header: dict[str, Any]) -> str:
    """The markdown of finished results (`result.json` contents) under a header of the run's settings."""
    lines = [f"## Real-data cross-validation: {header['data']}", "",
             f"- data: `{header['data']}` ({header['cases']} labelled cases), {header['num_folds']} folds by case "
             f"(seed {header['seed']}), folds run: {header['folds']}",
             f"- budget: {header['minutes']:g} min of training per job (one process, jobs one after another); "
             "the fold's cases predicted and scored with crossmodalnet's evaluator, with the checkpoint of the best "
             "validation Dice (chosen on those cases: optimistic, every row alike) and with the last (the final "
             "step's weights, nothing chosen on them: the \"last\" column)",
             f"- machine: {header['machine']['cpu']}, {header['machine']['cores']} cores, torch "
             f"{header['machine']['torch']}",
             f"- command: `{header['command']}`", ""]
    groups = group_results(results)
    if not groups:
        return "\n".join([*lines, "(no finished job yet)", ""])
    structures = list(dict.fromkeys(s for r in results for s in r["score"]["structures"]))
    kind = results[0]["score"]["kind"]
    lines += [f"Mean ± sd over folds of the per-fold mean over cases ({'regions' if kind == 'region' else 'classes'}"
              "); HD95 in mm.", ""]
    head = ["row", "channels", "folds", *[f"Dice {s}" for s in structures], "mean Dice", "mean Dice, last",
            "mean Dice, no postprocessing",
            *[f"HD95 {s}" for s in structures], "per-fold mean Dice", "steps (s/step)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for (label, channels), rs in groups.items():
        dice = [_pm([r["score"]["dice"].get(s) for r in rs]) for s in structures]
        hd95 = [_pm([r["score"]["hd95"].get(s) for r in rs], 1) for s in structures]
        per_fold = ", ".join(f"{r['fold']}: {r['score']['mean_dice']:.3f}" if r["score"]["mean_dice"] is not None
                             else f"{r['fold']}: –" for r in rs)
        steps = [r.get("steps_done") for r in rs]
        step_s = [r.get("s_per_step") for r in rs]
        speed = (f"{np.mean(steps):.0f} ({np.mean(step_s):.2f})"
                 if all(v is not None for v in steps + step_s) else "–")
        # Over the folds that have it (jobs finished before it existed lack it until --score-last).
        last = [r["score_last"]["mean_dice"] for r in rs if "score_last" in r]
        last_text = _pm(last) + ("" if len(last) in (0, len(rs)) else f" ({len(last)} folds)")
        # Our rows since the postprocessing choice; nnU-Net's predictions are its network's output.
        raw = [r["score_raw"]["mean_dice"] for r in rs if "score_raw" in r]
        raw_text = _pm(raw) + ("" if len(raw) in (0, len(rs)) else f" ({len(raw)} folds)")
        lines.append("| " + " | ".join([label, channels, str(len(rs)), *dice,
                                         f"**{_pm([r['score']['mean_dice'] for r in rs])}**", last_text, raw_text,
                                         *hd95,
                                         per_fold, speed]) + " |")
    notes = [f"- {label} [{channels}]: {r['note']}" for (label, channels), rs in groups.items() for r in rs[:1]
             if r.get("note")]
    return "\n".join([*lines, "", *notes, ""]) if notes else "\n".join([*lines, ""])
