"""Theorem 2.1: asymmetry, scale invariance and permutation equivariance of cross attention (Def. 2),
tested with every trained block's own Q/K/V weights on the features entering it.

Cases are `cmif.AnalysisCase` ((1, M, D, H, W), normalised); stage features are (1, d, h, w, C)
per stream; cross attention is tested on token windows (n, ws³, C), for each refinement `refine[i]` of a
block against each other stream j (with two streams: refine.0 = F_a from F_b, refine.1 = F_b from F_a).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossmodalnet.analysis.audit.claims import BROKEN, CONDITIONAL, EXACT, FAILS, HOLDS, NOT_TESTABLE, ClaimResult
from crossmodalnet.analysis.cmif import AnalysisCase
from crossmodalnet.models.cross_attention import cross_attention

__all__ = ["stage_features", "check_cross_attention"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@torch.no_grad()
def stage_features(model: nn.Module, case: AnalysisCase) -> list[list[torch.Tensor]]:
    """Per stage, the streams' tokens entering its Cross Transformer block: [F_0, ..., F_{M-1}], each
    (1, d, h, w, C)."""
    device = next(model.parameters()).device
    pad = [(-s) % d for s, d in zip(case.image.shape[2:], model.divisors, strict=True)]
    _, _, _, layers = model.encode(F.pad(case.image, (0, pad[2], 0, pad[1], 0, pad[0])).to(device), keep_layers=True)
    return [feats for name, feats in layers if name.startswith("stage")]


@torch.no_grad()
def _windows(direction: nn.Module, x: torch.Tensor, y: torch.Tensor, max_windows: int) -> tuple[torch.Tensor, ...]:
    """The token windows (n, ws³, C) that one CrossTransformer direction feeds its cross attention."""
    if direction.deform is not None:
        y = direction.deform(x, y)
    xa = direction.to_windows(direction.norm_x(x), 0)
    xb = direction.to_windows(direction.norm_y(y), 0)
    return xa[:max_windows], xb[:max_windows]


def _without_bias(layer: nn.Linear) -> nn.Linear:
    """The same weights, no bias: Def. 2's Q = W_Q F is linear, the model's projections are affine."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=False).to(layer.weight.device)
    out.weight.data.copy_(layer.weight.data)
    return out


def _attention_probs(xa: torch.Tensor, xb: torch.Tensor, attn: nn.Module, scale: float = 1.0) -> torch.Tensor:
    """Head-0 attention weights Softmax(Q Kᵀ/√d) (n, N, N) of inputs scaled by `scale`, bias-free projections."""
    q_src, k_src = (xb, xa) if attn.variant == "paper" else (xa, xb)
    d = attn.q.out_features // attn.num_heads
    q = F.linear(scale * q_src, attn.q.weight)[..., :d]
    k = F.linear(scale * k_src, attn.k.weight)[..., :d]
    return torch.softmax(q @ k.mT / math.sqrt(d), dim=-1)


@torch.no_grad()
def check_cross_attention(
    model: nn.Module, cases: Sequence[AnalysisCase], scales: Sequence[float] = (0.5, 2.0, 4.0), max_windows: int = 8,
    seed: int = 0,
) -> list[ClaimResult]:
    """Theorem 2.1's three properties of `cross_attention` with every trained block's own Q/K/V weights.

    Inputs: the normalised windows of the first case's features entering each block, both
    directions. Def. 2 is tested as written (no position bias); scale invariance also with the
    projections' biases removed (Def. 2 has none), which leaves Softmax(c² x) ≠ Softmax(x) as the
    only reason it can fail; permutation equivariance also with the model's relative position bias.
    """
    if getattr(model, "cross", None) is None:
        reason = "not testable on this model: it has no Cross Transformer blocks (cross_blocks=False)"
        return [ClaimResult(f"Theorem 2.1 ({p})", s, "none", {}, "", NOT_TESTABLE, reason) for p, s in (
            ("asymmetry", "CrossAttention(F_a, F_b) ≠ CrossAttention(F_b, F_a)"),
            ("scale invariance", "CA(cF_a, cF_b) = c·CA(F_a, F_b) for every c > 0"),
            ("permutation equivariance", "CA(PF_a, PF_b) = P·CA(F_a, F_b)"))]
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    example: dict[str, Any] = {}
    example_scale = next((c for c in scales if c > 1), next(c for c in scales if c != 1))
    first = model.config.first_cross_stage
    for i, feats in enumerate(stage_features(model, cases[0])):
        if i < first:  # no Cross Transformer block after this stage
            continue
        block = model.cross[i - first]
        m = len(feats)
        # Def. 2 is between two token sets: each refinement against each other stream on its own.
        pairs = [(f"refine.{r}" + (f".from{j}" if m > 2 else ""), block.refine[r], feats[r], feats[j])
                 for r in range(m) for j in range(m) if j != r]
        for dname, direction, x, y in pairs:
            attn = direction.attn
            xa, xb = _windows(direction, x, y, max_windows)
            h, variant = attn.num_heads, attn.variant

            def ca(u, v, q=attn.q, k=attn.k, bias=None, h=h, variant=variant, vv=attn.v):
                return cross_attention(u, v, q, k, vv, h, variant, bias=bias)

            out = ca(xa, xb)
            row: dict[str, Any] = {"block": f"cross{i + 1}.{dname}", "windows": int(xa.shape[0]),
                                   "tokens": int(xa.shape[1]), "channels": int(xa.shape[2]), "variant": variant,
                                   "asymmetry": _rel(ca(xb, xa), out)}
            q0, k0, v0 = _without_bias(attn.q), _without_bias(attn.k), _without_bias(attn.v)
            out0 = cross_attention(xa, xb, q0, k0, v0, h, variant)
            for c in scales:
                row[f"scale_err_c{c:g}"] = _rel(ca(c * xa, c * xb), c * out)
                scaled0 = cross_attention(c * xa, c * xb, q0, k0, v0, h, variant)
                row[f"scale_err_nobias_c{c:g}"] = _rel(scaled0, c * out0)
                if not example and c == example_scale:
                    # The element of largest disagreement: one concrete number pair refutes the identity.
                    flat = int((scaled0 - c * out0).abs().argmax())
                    idx = tuple(int(i) for i in np.unravel_index(flat, tuple(scaled0.shape)))
                    p1, pc = _attention_probs(xa, xb, attn), _attention_probs(xa, xb, attn, c)
                    example = {"block": row["block"], "c": c,
                               "element": f"output[window {idx[0]}, token {idx[1]}, channel {idx[2]}]",
                               "CA(cFa, cFb)": float(scaled0[idx]), "c*CA(Fa, Fb)": float(c * out0[idx]),
                               "mean max attention weight at c=1": float(p1.max(-1).values.mean()),
                               f"mean max attention weight at c={c:g}": float(pc.max(-1).values.mean())}
            perm = torch.randperm(xa.shape[1], generator=gen).to(xa.device)
            row["perm_err_def2"] = _rel(ca(xa[:, perm], xb[:, perm]), out[:, perm])
            bias = attn.bias()
            with_bias = ca(xa, xb, bias=bias)
            row["perm_err_with_position_bias"] = _rel(ca(xa[:, perm], xb[:, perm], bias=bias), with_bias[:, perm])
            rows.append(row)
    scale_keys = [k for k in rows[0] if k.startswith("scale_err_nobias")]
    asym = min(r["asymmetry"] for r in rows)
    worst_scale = max(r[k] for r in rows for k in scale_keys)
    worst_scale_affine = max(r[k] for r in rows for k in rows[0] if k.startswith("scale_err_c"))
    perm_plain = max(r["perm_err_def2"] for r in rows)
    perm_bias = max(r["perm_err_with_position_bias"] for r in rows)
    where = f"{len(rows)} block directions, first case's features, up to {max_windows} windows each"
    results = [
        ClaimResult(
            "Theorem 2.1 (asymmetry)", "CrossAttention(F_a, F_b) ≠ CrossAttention(F_b, F_a)",
            f"relative difference ‖CA(F_a,F_b) − CA(F_b,F_a)‖/‖CA(F_a,F_b)‖ with trained Q/K/V, {where}",
            {"min_relative_difference": asym, "per_block": {r["block"]: r["asymmetry"] for r in rows}},
            f"holds if the smallest relative difference > {BROKEN:g}",
            HOLDS if asym > BROKEN else FAILS,
            "true but vacuous as a 'property': any function whose arguments play different roles is asymmetric",
        ),
        ClaimResult(
            "Theorem 2.1 (scale invariance)", "CA(cF_a, cF_b) = c·CA(F_a, F_b) for every c > 0",
            f"relative error ‖CA(cF_a,cF_b) − c·CA(F_a,F_b)‖/‖c·CA‖ for c in {list(scales)}, bias-free trained "
            f"projections (Def. 2), {where}; counterexample from one window",
            {"max_relative_error_def2": worst_scale, "max_relative_error_with_projection_bias": worst_scale_affine,
             "counterexample": example,
             "per_block": {r["block"]: {k: r[k] for k in scale_keys} for r in rows}},
            f"fails if the relative error for some c ≠ 1 > {BROKEN:g}; holds if < {EXACT:g} for all c",
            FAILS if worst_scale > BROKEN else (HOLDS if worst_scale < EXACT else CONDITIONAL),
            "the proof's step Softmax(c²x) = Softmax(x) is false: scaling the logits by c² sharpens (c > 1) or "
            "flattens (c < 1) the attention; it holds only for c = 1 or constant logit rows",
        ),
        ClaimResult(
            "Theorem 2.1 (permutation equivariance)", "CA(PF_a, PF_b) = P·CA(F_a, F_b)",
            f"same random permutation of the tokens of both streams, {where}; Def. 2 as written and with the "
            "model's learned relative position bias added to the logits",
            {"max_relative_error_def2": perm_plain, "max_relative_error_with_position_bias": perm_bias},
            f"holds if both errors < {EXACT:g} (round-off); 'only under a condition' if the Def. 2 error is but the "
            f"error with the position bias is not; fails if the Def. 2 error ≥ {EXACT:g}",
            FAILS if perm_plain >= EXACT else (CONDITIONAL if perm_bias >= EXACT else HOLDS),
            "the model's windowed attention adds a relative position bias, which ties outputs to positions",
        ),
    ]
    return results

