"""The whole audit: every model-dependent check on a model (`audit_model`), and the audit of a trained
run with its data and log (`run_audit`). Claims come back in the paper's order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from crossmodalnet.analysis.audit.attention import check_cross_attention
from crossmodalnet.analysis.audit.balancing import balancing_experiment, balancing_rows, check_balancing_log
from crossmodalnet.analysis.audit.capacity import check_deformable_capacity, theorem_2_3
from crossmodalnet.analysis.audit.claims import NOT_TESTABLE, ClaimResult
from crossmodalnet.analysis.audit.complexity import check_attention_complexity
from crossmodalnet.analysis.audit.information import check_base_case, check_entropy_bound, check_information_flow
from crossmodalnet.analysis.audit.robustness import check_lipschitz
from crossmodalnet.analysis.cmif import (
    AnalysisCase,
    check_pair,
    check_settings,
    information_flow,
    load_analysis_cases,
    summarize_flow,
)
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.infer import load_run

__all__ = ["audit_model", "run_audit"]


def audit_model(
    model: nn.Module, cases: Sequence[AnalysisCase], estimators: Sequence[str] = ("gaussian",), pca_dim: int = 4,
    max_samples: int = 4096, lipschitz_edge: int = 32, timing: dict[str, Any] | None = None,
    lipschitz: dict[str, Any] | None = None, seed: int = 0, pair: Sequence[int] = (0, 1),
) -> dict[str, Any]:
    """Every model-dependent check on `model` (eval mode) and `cases`. Returns {"claims": [...], "cmif": layers}.

    pair: the two channels whose information flow is audited (Theorems 2.4, 2.7, base case,
    Corollary 1); the attention and capacity claims cover every stream. timing, lipschitz: keyword
    arguments for `check_attention_complexity` and `check_lipschitz` (e.g. smaller sizes and fewer
    iterations in tests). CrossModalNetError for a single-channel model: the claims are about two streams.
    """
    pair = check_pair(model, pair)
    model.eval()
    flow = summarize_flow(information_flow(model, cases, estimators, pca_dim, max_samples, seed, pair))
    th24, th27, *step = check_information_flow(flow, estimators, len(cases))
    # In the paper's order (Theorem 2.5 goes before 2.6 when `run_audit` adds it).
    claims = [*check_cross_attention(model, cases, seed=seed), check_deformable_capacity(model, cases[0]),
              theorem_2_3(), check_attention_complexity(model, **(timing or {})),
              check_base_case(cases, estimators, seed=seed, pair=pair), th24, *step,
              check_entropy_bound(cases, pair=pair),
              *check_lipschitz(model, cases[0], lipschitz_edge, seed=seed, **(lipschitz or {})), th27]
    return {"claims": claims, "cmif": flow}


def run_audit(
    run_dir: str | os.PathLike, data_dir: str | os.PathLike, cases: int = 2, estimators: Sequence[str] = ("gaussian",),
    pca_dim: int = 4, split: str | None = None, device: str | torch.device | None = "cpu",
    balancing_steps: int = 40, lipschitz_edge: int = 32, power_iterations: int = 5, seed: int = 0,
    pair: Sequence[int] = (0, 1),
) -> dict[str, Any]:
    """The audit of a trained run: `audit_model` on its model and data (channels `pair` for the
    information claims), plus Theorem 2.5 from its log (or, when the run did not balance its losses,
    from a short experiment on a tiny model)."""
    check_settings(pca_dim, 4096)
    start = time.monotonic()
    run = load_run(run_dir, device)
    if run.config.model.name != "crossmodalnet":
        raise CrossModalNetError(f"{run_dir}: the audit needs a crossmodalnet run, not {run.config.model.name!r}")
    try:
        pair = check_pair(run.model, pair)
    except CrossModalNetError as exc:
        raise CrossModalNetError(f"{run_dir}: {exc}") from None
    loaded = load_analysis_cases(data_dir, run.preprocessor, cases, split, run.config.patch_size)
    result = audit_model(run.model, loaded, estimators, pca_dim, lipschitz_edge=lipschitz_edge,
                         lipschitz={"power_iterations": power_iterations}, seed=seed, pair=pair)
    alpha = run.config.balancing_alpha
    rows = check_balancing_log(run_dir, alpha) if run.config.loss_balancing else None
    if rows is None:
        why = ("the run did not use loss balancing (loss_balancing: false)" if not run.config.loss_balancing
               else "the run's log has fewer than 8 logged weights")
        if balancing_steps > 0 and any(c.label is not None for c in loaded):
            exp = balancing_experiment(loaded, alpha, balancing_steps, seed=seed)
            rows = balancing_rows(exp["summary"], f"a side experiment ({why}): tiny CrossModalNet, "
                                   f"{balancing_steps} Adam steps on {exp['patch']}³ crops of the audit cases", alpha)
            rows[0].numbers.update({k: v for k, v in exp.items() if k != "summary"})
        else:
            rows = [ClaimResult("Theorem 2.5", "the adaptive loss balancing converges to a Pareto optimal solution",
                                "none", {}, "", NOT_TESTABLE, f"not testable on this run: {why}")]
    claims = result["claims"]
    at = next(i for i, c in enumerate(claims) if c.claim == "Theorem 2.6")
    claims[at:at] = rows  # Def. 4 / Theorem 2.5 come before section 2.5 (robustness) in the paper
    return {"run": str(run_dir), "data": str(data_dir), "cases": [c.id for c in loaded],
            "pair": list(pair), "case_shape": list(loaded[0].image.shape[2:]),
            "model": {"size": run.config.model.size, "modalities": run.config.model.modalities,
            "cross_attention": run.config.model.cross_attention, "parameters": sum(p.numel() for p in
                                                                              run.model.parameters())},
            "estimators": list(estimators), "pca_dim": pca_dim, "claims": claims, "cmif": result["cmif"],
            "seconds": time.monotonic() - start}

