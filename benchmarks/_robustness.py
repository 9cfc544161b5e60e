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
    fields = {i: smooth_field(d["mr"].shape, seed, i) for i, (_, d) in enumerate(cases)}
    conditions: dict[str, Any] = {}
    for mode in ("shift", "warp"):
        for m in sorted({0, *job["magnitudes"]}):  # 0 first: the unperturbed reference of every loss
            name = "none" if m == 0 else f"{mode}_{m:g}"
            if name in conditions:
                continue

            def inputs(i: int, d: dict[str, Any], mode: str = mode, m: float = m) -> tuple[np.ndarray, np.ndarray]:
                if mode == "shift":
                    return d["ct"], shift_volume(d["mr"], m * shift_direction(seed, i))
                return d["ct"], warp_volume(d["mr"], m * fields[i])

            conditions[name] = score_cases(run, cases, inputs)
            print(f"{job['key']}: {name}: mean Dice {conditions[name]['mean_dice']}", flush=True)
    return {"conditions": conditions}


def missing_job(job: dict[str, Any], work: Path) -> dict[str, Any]:
    """Scores of the source run with both modalities, CT only and MR only."""
    from crossmodalnet.infer import load_run

    run = load_run(work / "runs" / job["source"], "cpu")
    cases = load_test_split(work / "data")
    pick = {"both": lambda i, d: (d["ct"], d["mr"]), "ct_only": lambda i, d: (d["ct"], None),
            "mr_only": lambda i, d: (None, d["mr"])}
    conditions = {name: score_cases(run, cases, fn) for name, fn in pick.items()}
    return {"conditions": conditions, "modality_dropout": run.config.model.modality_dropout,
            "supports_missing_modality": run.supports_missing_modality}
