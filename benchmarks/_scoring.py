"""Scoring of test predictions for the accuracy benchmark: the evaluator's numbers, per-case values, spreads.

`spread` is the summary every table shows (mean, sd, quartiles over test cases); `score_record` is
what a job stores per scored condition; `score_cases` predicts and scores in memory (for test-time
perturbations that never touch the disk).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crossmodalnet.data.dataset import load_case, load_dataset

__all__ = ["spread", "score_record", "load_test_split", "score_cases"]


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sd (population, as the evaluator), quartiles over cases; NaN values skipped, None if none."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return dict.fromkeys(("mean", "std", "q1", "median", "q3", "n"), None) | {"n": 0}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"mean": float(v.mean()), "std": float(v.std()), "q1": float(q1), "median": float(med),
            "q3": float(q3), "n": int(v.size)}


def _per_case(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{case: mean Dice / IoU / HD95 over its structures}, NaN skipped (the evaluator's empty rules)."""
    out: dict[str, dict[str, float]] = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        out[case] = {}
        for m in ("dice", "iou", "hd95"):
            vals = [float(r[m]) for r in mine if r[m] not in ("", None) and not math.isnan(float(r[m]))]
            out[case][m] = float(np.mean(vals)) if vals else math.nan
    return out


def score_record(summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The evaluator's summary numbers plus the per-case values and their spread."""
    cases = _per_case(rows)
    return {
        "mean_dice": summary["mean_dice"], "miou": summary["miou"], "mean_hd95": summary["mean_hd95"],
        "hd95_convention": summary["hd95_convention"], "nan_counts": summary["nan_counts"],
        "per_structure_dice": {k: v["dice"] for k, v in summary["per_structure"].items()},
        "per_case": {c: {k: (None if math.isnan(v) else v) for k, v in d.items()} for c, d in cases.items()},
        **{f"{m}_spread": spread([d[m] for d in cases.values()]) for m in ("dice", "iou", "hd95")},
    }


def load_test_split(data_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(case id, loaded case) of every case of the test split of `data_dir`."""
    dataset = load_dataset(data_dir)
    return [(c.id, load_case(c, dataset.spec)) for c in dataset["test"]]


def score_cases(run: Any, cases: Sequence[tuple[str, dict[str, Any]]],
                inputs: Callable[[int, dict[str, Any]], list[np.ndarray | None]]) -> dict:
    """Predict every test case with the channels `inputs(index, case)` gives (None where missing)
    and score with the evaluator."""
    from crossmodalnet.evaluate import evaluate_arrays
    from crossmodalnet.infer import predict_case

    cfg = run.config
    scored = {}
    for i, (case_id, d) in enumerate(cases):
        probs = predict_case(run.model, inputs(i, d), run.preprocessor, d["geometry"], cfg.patch_size,
                             cfg.sw_overlap, cfg.sw_batch_size, run.device, activation=run.spec.activation)
        scored[case_id] = (run.spec.decide(probs), d["label"], d["geometry"].spacing)
    rows, summary = evaluate_arrays(scored, run.spec)
    return score_record(summary, rows)
