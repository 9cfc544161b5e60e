"""Capacity claims: Theorem 2.2 (parameters of the deformable operator vs 3KHW) and Theorem 2.3
(universal approximation, not testable).

The deformable operators are counted on the model (one per refinement `refine[i]` of each Cross
Transformer block); the feature-map sizes (d, h, w) they see come from one case ((1, M, D, H, W)).
"""

from __future__ import annotations

from torch import nn

from crossmodalnet.analysis.audit.attention import stage_features
from crossmodalnet.analysis.audit.claims import FAILS, HOLDS, NOT_TESTABLE, ClaimResult
from crossmodalnet.analysis.cmif import AnalysisCase

__all__ = ["check_deformable_capacity", "theorem_2_3"]


def check_deformable_capacity(model: nn.Module, case: AnalysisCase) -> ClaimResult:
    """Parameters of every DeformableOp vs the paper's 3KHW (and 3KDHW in 3D) at the map sizes it sees."""
    statement = "the deformable operator adds O(3KHW) parameters per layer (|Θ_D| = 3KHW)"
    blocks = [] if getattr(model, "cross", None) is None else list(model.cross)
    first = model.config.first_cross_stage if blocks else 0
    ops = [(f"cross{first + i + 1}.refine.{r}", refine.deform)
           for i, blk in enumerate(blocks) for r, refine in enumerate(blk.refine)]
    ops = [(n, op) for n, op in ops if op is not None]
    if not ops:
        return ClaimResult("Theorem 2.2", statement, "", {}, "", NOT_TESTABLE,
                           "the model has no deformable operator (deformable=False or no cross blocks)")
    sizes = [tuple(feats[0].shape[1:4]) for feats in stage_features(model, case)]
    per = {}
    for name, op in ops:
        d, h, w = sizes[int(name.split(".")[0].removeprefix("cross")) - 1]
        k = op.num_points
        per[name] = {"K": k, "map_DHW": [d, h, w], "parameters": op.extra_parameters,
                     "paper_3KHW": 3 * k * h * w, "paper_3KDHW": 3 * k * d * h * w}
    total = sum(p["parameters"] for p in per.values())
    mismatch = [n for n, p in per.items() if p["parameters"] not in (p["paper_3KHW"], p["paper_3KDHW"])]
    return ClaimResult(
        "Theorem 2.2", statement,
        "count the parameters of each deformable operator (offset and weight predictors, LayerNorm) and "
        "evaluate 3KHW and 3KDHW at the feature-map size that operator actually sees",
        {"operators": per, "total_parameters": total,
         "total_paper_3KDHW": sum(p["paper_3KDHW"] for p in per.values())},
        "fails if any operator's count differs from both 3KHW and 3KDHW",
        FAILS if mismatch else HOLDS,
        "offsets are predicted from the features by a linear layer (3K·C + 3K weights and biases), so the count "
        "depends on the channels C and not on the map size; 3KHW would be a per-position offset table, which "
        "cannot run on inputs of another size",
    )


def theorem_2_3() -> ClaimResult:
    """Universal approximation: an existence statement about networks of unbounded size."""
    return ClaimResult(
        "Theorem 2.3", "CrossModalNet approximates any continuous f with arbitrary precision, given enough depth "
        "and width", "none possible", {}, "", NOT_TESTABLE,
        "an existence claim about a family of networks as size grows: no finite model or measurement can confirm "
        "or refute it (and the proof composes density statements without the needed continuity arguments)")

