"""Robustness claims: Theorem 2.6 (F is Lipschitz with L ≤ (L_S L_C L_D)^d) and Corollary 2, measured
locally on one case (a centred crop, (1, M, e, e, e)) against the per-layer product bounds
of `analysis.lipschitz`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from crossmodalnet.analysis.audit.claims import CONDITIONAL, FAILS, HOLDS, ClaimResult
from crossmodalnet.analysis.cmif import AnalysisCase
from crossmodalnet.analysis.lipschitz import local_lipschitz, product_bounds

__all__ = ["check_lipschitz"]


def _crop_to(case: AnalysisCase, edge: int, divisor: int) -> torch.Tensor:
    """(1, M, e, e, e): centred crop to `edge` (rounded down to a multiple of the divisor, at least two
    multiples: the instance norms of the bottleneck need more than one voxel), zero-padded where the
    case is smaller."""
    size = case.image.shape[2:]
    e = [max(2 * divisor, min(edge, s) - min(edge, s) % divisor) for s in size]
    sl = tuple(slice(max(0, (s - q) // 2), max(0, (s - q) // 2) + q) for s, q in zip(size, e, strict=True))
    image = case.image[(..., *sl)]
    pad = [q - c for q, c in zip(e, image.shape[2:], strict=True)]
    return F.pad(image, (0, pad[2], 0, pad[1], 0, pad[0]))


def check_lipschitz(model: nn.Module, case: AnalysisCase, edge: int = 32, eps: float = 1e-3, random_draws: int = 4,
                    power_iterations: int = 5, seed: int = 0) -> list[ClaimResult]:
    """Theorem 2.6 and Corollary 2: measured local constants vs the per-layer product bounds."""
    image = _crop_to(case, edge, model.divisor)
    emp = local_lipschitz(model, image, eps, random_draws, power_iterations, seed)
    bounds = product_bounds(model)
    log_emp = math.log10(max(emp["gradient"], emp["random"]))
    log_paths, log_paper = bounds["log10_paths"], bounds.get("log10_paper", math.nan)
    # Vacuous: a perturbation of 1% of ‖x‖ would be allowed to change the logits by more than their whole norm.
    allowed = log_paths + math.log10(0.01 * emp["input_norm"])
    vacuous = allowed >= math.log10(emp["output_norm"])
    vacuous_paper = log_paper + math.log10(0.01 * emp["input_norm"]) >= math.log10(emp["output_norm"])
    numbers = {"crop": list(image.shape[2:]), "empirical_random": emp["random"], "empirical_random_median":
               emp["random_median"], "empirical_gradient_direction": emp["gradient"],
               "power_iteration_trace": emp["gradient_trace"], "perturbation_norm": emp["eps"],
               "input_norm": emp["input_norm"], "output_norm": emp["output_norm"],
               "log10_bound_paths": log_paths, "log10_bound_paper_eq30": log_paper, "layers": bounds["layers"],
               "L_S": bounds.get("L_S"), "L_C": bounds.get("L_C"), "L_D": bounds.get("L_D"), "d": bounds.get("d"),
               "log10_bound_over_measured": log_paths - log_emp, "vacuous": vacuous, "vacuous_paper": vacuous_paper}
    test = (f"‖F(x+δ) − F(x)‖/‖δ‖ on the logits, x = case {case.id} ({image.shape[1]} channels, "
            f"{list(image.shape[2:])} crop), ‖δ‖ = "
            f"{eps:g}‖x‖: {random_draws} random directions and {power_iterations} power iterations on JᵀJ (gradient "
            "direction); bounds: Π(1 + s_ℓ) over the spectral norms s_ℓ of all Linear/Conv layers ('paths') and "
            "Eq. 30 (L_S L_C L_D)^d ('paper'), see analysis/lipschitz.py")
    within = log_emp <= log_paths
    within_paper = not math.isfinite(log_paper) or log_emp <= log_paper
    return [
        ClaimResult("Theorem 2.6", "F is Lipschitz with L ≤ (L_S · L_C · L_D)^d", test, numbers,
                    "'only under a condition' (locally, on inputs like these) if the measured constant ≤ both bounds; "
                    "fails if it exceeds one of them",
                    CONDITIONAL if within and within_paper else FAILS,
                    "a finite local constant is all a measurement can show; dot-product attention and LayerNorm have "
                    "no global Lipschitz constant, so the global claim needs bounded inputs and weights"),
        ClaimResult("Corollary 2", "‖F(x+δ) − F(x)‖ ≤ L ε for ‖δ‖ ≤ ε", test,
                    {"measured_max_ratio": max(emp["gradient"], emp["random"]), "log10_L_paths": log_paths,
                     "log10_L_paper": log_paper, "vacuous": vacuous, "vacuous_paper": vacuous_paper,
                     "log10_allowed_change_at_1pct": allowed, "log10_output_norm": math.log10(emp["output_norm"])},
                    "holds if the measured changes ≤ L ε with L the 'paths' bound; a bound is reported 'vacuous' when "
                    "it allows a 1% perturbation to change the logits by more than their norm",
                    HOLDS if within else FAILS,
                    "vacuous: the bound allows far more than the output itself" if vacuous else "informative bound"),
    ]

