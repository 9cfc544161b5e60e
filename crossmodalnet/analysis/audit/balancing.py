"""Theorem 2.5 (adaptive loss balancing, Def. 4): do the balancing weights settle?

From a run's own per-step log (`check_balancing_log`) or, when it has none, from a short side
experiment (`balancing_experiment`: a few Adam steps of a tiny CrossModalNet with the cases' channels,
run by the package's one training engine, on random crops of labelled `cmif.AnalysisCase`s,
(1, M, D, H, W) images, (D, H, W) labels).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crossmodalnet.analysis.audit.claims import FAILS, HOLDS, NOT_TESTABLE, WEIGHT_TOL, ClaimResult
from crossmodalnet.analysis.cmif import AnalysisCase, untrained_model
from crossmodalnet.config import ModelConfig
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.runs import RunFolder
from crossmodalnet.train.distributed import DistInfo
from crossmodalnet.train.engine import Engine, LoopSettings, Task
from crossmodalnet.train.losses import AdaptiveLossBalancing, DiceCETerms

__all__ = ["balancing_rows", "check_balancing_log", "balancing_experiment"]


def _weights_summary(weights: Sequence[float]) -> dict[str, float]:
    """Range in the last quarter and mean |Δw| per step in the first and last quarter of a weight sequence."""
    w = np.asarray(weights, float)
    q = max(2, len(w) // 4)
    steps = np.abs(np.diff(w))
    return {"steps": int(len(w)), "first": float(w[0]), "last": float(w[-1]),
            "range_last_quarter": float(np.ptp(w[-q:])), "mean_abs_change_first_quarter": float(steps[: q - 1].mean()),
            "mean_abs_change_last_quarter": float(steps[-(q - 1):].mean())}


def balancing_rows(summary: dict[str, Any], source: str, alpha: float) -> list[ClaimResult]:
    settled = summary["range_last_quarter"] < WEIGHT_TOL
    return [
        ClaimResult("Theorem 2.5 (weights converge)", "the sequence of balancing weights w^(t) converges (step 1)",
                    f"w_dice^(t) of Def. 4 (alpha = {alpha:g}) from {source}",
                    summary, f"holds if the weight's range over the last quarter of steps < {WEIGHT_TOL}",
                    HOLDS if settled else FAILS,
                    "with per-step losses of random patches the weights fluctuate with the losses; Def. 4 with "
                    "alpha > 0 favours the smaller loss, the opposite of the paper's prose"),
        ClaimResult("Theorem 2.5 (Pareto optimal limit)", "training converges to a Pareto optimal θ", "none possible",
                    {}, "", NOT_TESTABLE,
                    "Pareto optimality of a non-convex network's parameters cannot be certified by any measurement; "
                    "the proof also assumes that θ^(t) converges, which it does not show"),
    ]


def check_balancing_log(run_dir: str | os.PathLike, alpha: float) -> list[ClaimResult] | None:
    """Theorem 2.5 from the run's own per-step log (steps.csv, else metrics.csv); None if it has none."""
    for name in (RunFolder.STEPS, RunFolder.METRICS):
        path = Path(run_dir) / name
        if path.is_file():
            with path.open() as f:
                weights = [float(r["weight_dice"]) for r in csv.DictReader(f) if r.get("weight_dice")]
            if len(weights) >= 8:
                return balancing_rows(_weights_summary(weights), f"the run's log {path.name}", alpha)
    return None


class _RandomCrops:
    """Random crops of labelled analysis cases, a pure function of (seed, step)."""

    def __init__(self, cases: Sequence[AnalysisCase], patch: int, seed: int) -> None:
        self.cases, self.patch, self.seed = cases, patch, seed

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, step]))
        case = self.cases[int(rng.integers(len(self.cases)))]
        size = case.image.shape[2:]
        p = [min(self.patch, s) for s in size]  # the model pads to its divisor itself
        o = [int(rng.integers(0, s - q + 1)) for s, q in zip(size, p, strict=True)]
        sl = tuple(slice(a, a + q) for a, q in zip(o, p, strict=True))
        return {"image": case.image[(..., *sl)],
                "label": torch.from_numpy(case.label[sl].astype(np.int64))[None, None]}


class _BalancingTask(Task):
    """Dice + CE weighted by Def. 4 on a tiny CrossModalNet; logs the weights of every step."""

    columns = ("loss", "loss_dice", "loss_ce", "weight_dice")

    def __init__(self, model: nn.Module, batches: _RandomCrops, alpha: float) -> None:
        self.model, self.batches = model, batches
        self.optimizers = [torch.optim.Adam(model.parameters(), lr=2e-3)]
        self.loss_fn, self.balancer = DiceCETerms(), AdaptiveLossBalancing(DiceCETerms.names, alpha)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        terms = self.loss_fn(model(batch["image"]), batch["label"])
        total, w = self.balancer(terms, update=False)
        return total, {"loss": total.detach(), "loss_dice": terms["dice"].detach(), "loss_ce": terms["ce"].detach(),
                       "weight_dice": w["dice"]}

    def after_step(self, logs: dict[str, float]) -> None:
        self.balancer.update({"dice": logs["loss_dice"], "ce": logs["loss_ce"]})


def balancing_experiment(cases: Sequence[AnalysisCase], alpha: float = 1.0, steps: int = 40, patch: int = 32,
                         seed: int = 0) -> dict[str, Any]:
    """A short run of Def. 4 on a tiny CrossModalNet: `steps` Adam steps (the package's engine, in
    memory) on random crops of `cases` (labelled).

    Returns the weight sequence summary (see `_weights_summary`) and the Dice/CE values.
    """
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        raise CrossModalNetError("the balancing experiment needs labelled cases")
    cfg = ModelConfig.from_size("crossmodalnet", "tiny", modalities=labelled[0].channels)
    model = untrained_model(cfg, seed).train()
    patch = max(patch, 2 * model.divisor)  # the bottleneck's instance norms need more than one voxel
    task = _BalancingTask(model, _RandomCrops(labelled, patch, seed), alpha)
    device = next(model.parameters()).device
    engine = Engine(task, LoopSettings(total_steps=steps, iterations_per_epoch=steps, seed=seed, desc=""),
                    dist=DistInfo(device=device)).fit()
    rows = engine.step_rows()
    weights = [r["weight_dice"] for r in rows]
    losses = [[r["loss_dice"], r["loss_ce"]] for r in rows]
    return {"summary": _weights_summary(weights), "losses_first": losses[0], "losses_last": losses[-1],
            "steps": steps, "patch": patch, "alpha": alpha}
