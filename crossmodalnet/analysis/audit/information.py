"""Information claims: Theorems 2.4 and 2.7 (MI grows with depth, CMIF non-negative and increasing),
their base case (independent inputs) and Corollary 1 (I ≤ min(H_a, H_b)).

Layers are the per-layer summaries of `cmif.summarize_flow`; the base case and Corollary 1 use the
input volumes of two channels, `pair` (default (0, 1)), of `cmif.AnalysisCase` ((1, M, D, H, W)) with
voxels as samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from crossmodalnet.analysis.audit.claims import CONDITIONAL, FAILS, HOLDS, MI_TOL, ClaimResult
from crossmodalnet.analysis.cmif import AnalysisCase
from crossmodalnet.analysis.mi import estimate_mi
from crossmodalnet.errors import CrossModalNetError

__all__ = ["check_information_flow", "check_base_case", "check_entropy_bound"]


def _violations(layers: list[dict[str, Any]], est: str, key: str, previous: bool) -> list[str]:
    """Names of layers whose per-case change is significantly negative: mean + 2 standard errors < −MI_TOL.

    key "mi": the change of MI, i.e. CMIF(l); key "cmif": the change of CMIF, CMIF(l) − CMIF(l−1).
    """
    bad = []
    for i in range(1, len(layers)):
        if previous and i < 2:
            continue
        if key == "mi":
            diff = layers[i]["cmif"][est]
        else:  # CMIF(l) − CMIF(l−1), per case
            diff = [a - b for a, b in zip(layers[i]["cmif"][est], layers[i - 1]["cmif"][est], strict=True)]
        arr = np.asarray(diff, float)
        if not np.isfinite(arr).all():
            continue
        sem = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else 0.0
        if arr.mean() + 2 * sem < -MI_TOL:
            bad.append(f"{layers[i]['name']} ({arr.mean():+.3f} nats)")
    return bad


def _combine(per_estimator: dict[str, list[str]]) -> str:
    failing = [e for e, v in per_estimator.items() if v]
    if not failing:
        return HOLDS
    return FAILS if len(failing) == len(per_estimator) else CONDITIONAL


def check_information_flow(layers: list[dict[str, Any]], estimators: Sequence[str], n_cases: int) -> list[ClaimResult]:
    """Theorems 2.4 and 2.7 and the proof's step "a Cross Transformer block increases MI", from `summarize_flow`."""
    names = [layer["name"] for layer in layers]
    mi = {e: {layer["name"]: layer["mi_mean"][e] for layer in layers} for e in estimators}
    cm = {e: {layer["name"]: layer["cmif_mean"][e] for layer in layers[1:]} for e in estimators}
    noise = (f"a change counts when its mean over the {n_cases} case(s) + 2 standard errors < −{MI_TOL} nats; "
             "per estimator; 'only under a condition' when the estimators disagree")
    test = f"I(F_a^l; F_b^l) at depths {names} (see cmif), PCA-reduced, {n_cases} case(s)"
    dec = {e: _violations(layers, e, "mi", False) for e in estimators}
    not_incr = {e: _violations(layers, e, "cmif", True) for e in estimators}
    cross = [i for i, n in enumerate(names) if n.startswith("cross")]
    cross_gain = {e: {names[i]: layers[i]["cmif_mean"][e] for i in cross} for e in estimators}
    cross_bad = {e: [f"{n} ({v:+.3f} nats)" for n, v in g.items() if v < -MI_TOL] for e, g in cross_gain.items()}
    rows = [
        ClaimResult("Theorem 2.4", "I(F_a^{l+1}; F_b^{l+1}) ≥ I(F_a^l; F_b^l) at every layer", test,
                    {"mi_mean": mi, "decreases": dec}, "holds if no layer decreases the MI; " + noise,
                    _combine(dec), "the proof's data processing step runs the wrong way: DPI bounds the MI of "
                    "processed variables from above, never below"),
        ClaimResult("Theorem 2.7", "0 ≤ CMIF(l1) ≤ CMIF(l2) for l1 < l2 (non-negative and increasing)", test,
                    {"cmif_mean": cm, "negative": dec, "not_increasing": not_incr},
                    "holds if CMIF(l) ≥ 0 and CMIF(l) ≥ CMIF(l−1) everywhere; " + noise,
                    _combine({e: dec[e] + not_incr[e] for e in estimators}),
                    "CMIF non-decreasing would make I grow at least linearly with depth without bound"),
    ]
    if cross:
        rows.append(ClaimResult(
            "Theorem 2.4, proof step", "the Cross Transformer block increases mutual information",
            "CMIF at every Cross Transformer block (its output vs the stage output it refines)",
            {"cmif_at_cross_blocks": cross_gain, "decreases": cross_bad},
            f"holds if no cross block lowers the MI by more than {MI_TOL} nats (mean over cases); per estimator",
            _combine(cross_bad)))
    return rows


def _null_mi(fa: torch.Tensor, fb: torch.Tensor, est: str, shuffles: int, seed: int) -> list[float]:
    """MI after shuffling the positions of one stream: what the estimator reports for independent pairs."""
    gen = torch.Generator().manual_seed(seed)
    return [estimate_mi(fa, fb[torch.randperm(fb.shape[0], generator=gen)], est, pca_dim=1, seed=seed + s)
            for s in range(shuffles)]


def _pair_voxels(case: AnalysisCase, pair: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxels (N, 1) of the two channels of `pair`."""
    if case.channels < 2:
        raise CrossModalNetError(f"case {case.id}: the claims about two input modalities need two channels, "
                                 f"got {case.channels}")
    a, b = pair
    return case.channel(a).reshape(-1, 1), case.channel(b).reshape(-1, 1)


def check_base_case(cases: Sequence[AnalysisCase], estimators: Sequence[str], shuffles: int = 3,
                    seed: int = 0, pair: Sequence[int] = (0, 1)) -> ClaimResult:
    """I(F_a^0; F_b^0) = I(x_a; x_b) of channels `pair` of the registered input volumes vs the shuffled
    (independent) null."""
    per: dict[str, Any] = {}
    for est in estimators:
        vals, nulls = [], []
        for case in cases:
            fa, fb = (v.float() for v in _pair_voxels(case, pair))
            vals.append(estimate_mi(fa, fb, est, pca_dim=1, seed=seed))
            nulls += _null_mi(fa, fb, est, shuffles, seed)
        per[est] = {"mi_per_case": vals, "null_mean": float(np.mean(nulls)), "null_std": float(np.std(nulls))}
    above = {e: min(p["mi_per_case"]) > p["null_mean"] + 3 * p["null_std"] + MI_TOL for e, p in per.items()}
    return ClaimResult(
        "Theorems 2.4/2.7, base case", "I(F_a^0; F_b^0) = 0: the two input modalities are independent",
        f"MI of the normalised intensities of channels {list(pair)}, voxels as samples, {len(cases)} case(s); "
        f"null: the same after shuffling the second channel's voxels ({shuffles} shuffles per case)",
        per, f"fails if every case's MI > null mean + 3 null std + {MI_TOL} nats, for every estimator",
        FAILS if all(above.values()) else (HOLDS if not any(above.values()) else CONDITIONAL),
        "registered images of the same anatomy share their structure; independence would make fusion pointless",
    )


def check_entropy_bound(cases: Sequence[AnalysisCase], scale: float = 1e-3,
                        pair: Sequence[int] = (0, 1)) -> ClaimResult:
    """Corollary 1 for continuous features: I ≤ min(H_a, H_b) with differential entropies.

    MI does not change under F_a → c·F_a, the differential entropy drops by log c per dimension;
    H_gauss (the Gaussian entropy of the same variance) is an upper bound on the true H.
    """
    case = cases[0]
    fa, fb = (v.double() for v in _pair_voxels(case, pair))
    mi = estimate_mi(fa, fb, "gaussian", pca_dim=1)

    def h_gauss(x: torch.Tensor) -> float:
        return 0.5 * math.log(2 * math.pi * math.e * float(x.var()))

    h_a, h_b, h_scaled = h_gauss(fa), h_gauss(fb), h_gauss(scale * fa)
    native, rescaled = mi <= min(h_a, h_b), mi <= min(h_scaled, h_b)
    return ClaimResult(
        "Corollary 1", "I(F_a; F_b) ≤ min(H(F_a), H(F_b))",
        f"input layer of case {case.id}: Gaussian MI; Gaussian differential entropies (an upper bound on H) of the "
        f"features as they are and after rescaling F_a by c = {scale:g}, which leaves I unchanged",
        {"mi": mi, "H_a": h_a, "H_b": h_b, "c": scale, "H_a_rescaled_upper_bound": h_scaled,
         "bound_at_native_scale": native, "bound_after_rescaling": rescaled},
        "'only under a condition' if the bound holds at native scale but not after the rescaling; fails if not even "
        "at native scale",
        (CONDITIONAL if not rescaled else HOLDS) if native else FAILS,
        "trivially true for discrete variables (Shannon entropy); for continuous features the differential "
        "entropy depends on the units and can be negative, so the bound is not informative",
    )

