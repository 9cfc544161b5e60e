"""An empirical audit of the paper's claims on a real model: one row per claim, verdicts from numbers.

    results = run_audit("runs/cmn", "data/phantoms")    # trained run + its preprocessing + its log
    write_audit(results, "runs/cmn/audit")               # audit.md, audit.json

Each row (`ClaimResult`) holds the claim, how it was tested, the measured numbers, the criterion
(thresholds) and the verdict it yields: "holds", "fails", "holds only under a condition" or
"not testable". No verdict is written by hand: every one is computed from the numbers of the
model at hand, so a different model can get a different verdict (`audit_model` is the
model-only part, used by the tests on two different tiny models).

Claims (paper section 2): Theorem 2.1 (asymmetry, scale invariance, permutation equivariance of
Def. 2 with the model's own trained Q/K/V weights on its own features), Theorem 2.2 (parameters
of the deformable operator vs 3KHW), Theorem 2.3 (not testable), Lemma 1 (timing of cross
attention vs tokens N), Theorem 2.4 and its base case, Corollary 1, Theorem 2.5 (loss-balancing
weights), Theorem 2.6 and Corollary 2 (`analysis.lipschitz`), Theorem 2.7 (`analysis.cmif`).

Modules: `claims` (rows, verdicts, thresholds), `attention` (Theorem 2.1), `capacity` (Theorems
2.2, 2.3), `complexity` (Lemma 1), `information` (Theorems 2.4, 2.7, base case, Corollary 1),
`balancing` (Theorem 2.5), `robustness` (Theorem 2.6, Corollary 2), `run` (the whole audit),
`report` (audit.md, audit.json) and `cli` (the `audit` command). See docs/paper-audit.md and
docs/design.md, "Analysis: CMIF and the audit".

Shapes: cases are `cmif.AnalysisCase` ((1, M, D, H, W), every channel present, normalised); cross
attention is tested on windows (n, ws³, C) taken from the features entering each Cross Transformer
block, for every refined stream and every other stream. The claims are about the flow between two
streams: the information checks use one pair of channels (`pair`, default (0, 1)), and a
single-channel model is refused.
"""

from crossmodalnet.analysis.audit.attention import check_cross_attention
from crossmodalnet.analysis.audit.balancing import balancing_experiment, check_balancing_log
from crossmodalnet.analysis.audit.capacity import check_deformable_capacity, theorem_2_3
from crossmodalnet.analysis.audit.claims import (
    BROKEN,
    CONDITIONAL,
    EXACT,
    FAILS,
    HOLDS,
    LINEAR_MAX,
    MI_TOL,
    NOT_TESTABLE,
    QUADRATIC_MIN,
    VERDICTS,
    WEIGHT_TOL,
    ClaimResult,
)
from crossmodalnet.analysis.audit.cli import audit_from_cli
from crossmodalnet.analysis.audit.complexity import check_attention_complexity
from crossmodalnet.analysis.audit.information import check_base_case, check_entropy_bound, check_information_flow
from crossmodalnet.analysis.audit.report import write_audit
from crossmodalnet.analysis.audit.robustness import check_lipschitz
from crossmodalnet.analysis.audit.run import audit_model, run_audit
from crossmodalnet.analysis.cmif import AnalysisCase

__all__ = [
    "HOLDS", "FAILS", "CONDITIONAL", "NOT_TESTABLE", "VERDICTS", "ClaimResult",
    "check_cross_attention", "check_deformable_capacity", "check_attention_complexity", "check_information_flow",
    "check_base_case", "check_entropy_bound", "check_balancing_log", "balancing_experiment", "check_lipschitz",
    "theorem_2_3", "audit_model", "run_audit", "write_audit", "audit_from_cli",
    # Importable from crossmodalnet.analysis.audit before the split too: the thresholds and the case type.
    "EXACT", "BROKEN", "MI_TOL", "QUADRATIC_MIN", "LINEAR_MAX", "WEIGHT_TOL", "AnalysisCase",
]
