"""Audit rows and verdicts: `ClaimResult` and the thresholds that turn measured numbers into verdicts.

A row holds the claim, how it was tested, the measured numbers, the criterion (thresholds) and
the verdict: "holds", "fails", "holds only under a condition" or "not testable".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "HOLDS", "FAILS", "CONDITIONAL", "NOT_TESTABLE", "VERDICTS", "EXACT", "BROKEN", "MI_TOL", "QUADRATIC_MIN",
    "LINEAR_MAX", "WEIGHT_TOL", "ClaimResult",
]

HOLDS, FAILS, CONDITIONAL, NOT_TESTABLE = "holds", "fails", "holds only under a condition", "not testable"
VERDICTS: tuple[str, ...] = (HOLDS, FAILS, CONDITIONAL, NOT_TESTABLE)

# Thresholds, in one place: a property "holds" numerically when its relative error is below
# EXACT (float32 round-off of a few hundred operations is ~1e-6), and is broken when above BROKEN.
EXACT = 1e-4
BROKEN = 1e-3
# MI changes smaller than this (nats) are within estimator noise even with many positions.
MI_TOL = 0.02
# Lemma 1: fitted log-log exponents that count as quadratic / linear.
QUADRATIC_MIN, LINEAR_MAX = 1.6, 1.3
# Theorem 2.5: a weight whose range over the last quarter of steps is below this has settled.
WEIGHT_TOL = 0.02


@dataclass
class ClaimResult:
    """One row of the audit."""

    claim: str  # e.g. "Theorem 2.1 (scale invariance)"
    statement: str  # what the paper says, in short
    test: str  # how it was tested here
    numbers: dict[str, Any]
    criterion: str  # the thresholds that turn the numbers into the verdict
    verdict: str
    note: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

