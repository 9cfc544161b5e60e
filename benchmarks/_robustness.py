"""The robustness jobs of `benchmarks/compare.py` (run by `_harness.py`): a finished run scored under changed inputs.

- "misregistration": the test split with the MR shifted (or smoothly warped) against the CT at
  test time by each magnitude in voxels (`_perturb`);
- "missing": the test split with both modalities, CT only, MR only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from _perturb import shift_direction, shift_volume, smooth_field, warp_volume
from _scoring import load_test_split, score_cases

__all__ = ["misregistration_job", "missing_job"]


def misregistration_job(job: dict[str, Any], work: Path) -> dict[str, Any]:
    """Mean Dice etc. of the source run with no perturbation and each shift / warp magnitude."""
    from crossmodalnet.infer import load_run

    run = load_run(work / "runs" / job["source"], "cpu")
    cases, seed = load_test_split(work / "data"), job["seed"]
    fields = {i: smooth_field(d["images"][1].shape, seed, i) for i, (_, d) in enumerate(cases)}
    conditions: dict[str, Any] = {}
    for mode in ("shift", "warp"):
        for m in sorted({0, *job["magnitudes"]}):  # 0 first: the unperturbed reference of every loss
            name = "none" if m == 0 else f"{mode}_{m:g}"
            if name in conditions:
                continue

            def inputs(i: int, d: dict[str, Any], mode: str = mode, m: float = m) -> list[np.ndarray]:
                ct, mr = d["images"]  # the MR is displaced against the CT and the label
                if mode == "shift":
                    return [ct, shift_volume(mr, m * shift_direction(seed, i))]
                return [ct, warp_volume(mr, m * fields[i])]

            conditions[name] = score_cases(run, cases, inputs)
            print(f"{job['key']}: {name}: mean Dice {conditions[name]['mean_dice']}", flush=True)
    return {"conditions": conditions}


def missing_job(job: dict[str, Any], work: Path) -> dict[str, Any]:
    """Scores of the source run with both modalities, CT only and MR only."""
    from crossmodalnet.infer import load_run

    run = load_run(work / "runs" / job["source"], "cpu")
    cases = load_test_split(work / "data")
    pick = {"both": lambda i, d: d["images"], "ct_only": lambda i, d: [d["images"][0], None],
            "mr_only": lambda i, d: [None, d["images"][1]]}
    conditions = {name: score_cases(run, cases, fn) for name, fn in pick.items()}
    return {"conditions": conditions, "modality_dropout": run.config.model.modality_dropout,
            "supports_missing_modality": run.supports_missing_modality}
