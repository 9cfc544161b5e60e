"""Training schedules of the accuracy benchmark: epochs and iterations for a time budget or an exact step count."""

from __future__ import annotations

import math

__all__ = ["budget_schedule", "sliding_windows", "split_steps"]


def budget_schedule(step_s: float, budget_s: float, validations: int, validation_s: float = 0.0,
                    margin: float = 1.25, validation_share: float = 0.1) -> tuple[int, int]:
    """(epochs, iterations_per_epoch) for a time budget, from measured seconds per step and per validation.

    Validation runs inside the budget (the trainer's clock), and a whole-volume validation costs a
    slow model as much as many of its steps: measured, SwinUNETR spent 100 of 150 s validating 5
    times while UNet spent 1 %. So at most `validations`, and no more than fit in
    `validation_share` of the budget (at least one; the trainer also validates when it stops).
    The horizon is `margin` times the steps the rest of the budget allows, so that the budget (not
    the epoch count) stops training while the cosine schedule still comes close to its end.
    """
    if validation_s > 0:
        validations = max(1, min(validations, math.floor(validation_share * budget_s / validation_s)))
    train_s = max(budget_s - validations * validation_s, 0.5 * budget_s)
    horizon = max(validations, math.ceil(margin * train_s / max(step_s, 1e-6)))
    ipe = max(1, math.ceil(horizon / validations))
    return math.ceil(horizon / ipe), ipe


def sliding_windows(edge: int, roi: int, overlap: float) -> int:
    """Windows MONAI's sliding window takes over an edge³ volume with roi³ windows (interval roi·(1-overlap))."""
    if roi >= edge:
        return 1
    interval = max(int(roi * (1 - overlap)), 1)
    return (math.ceil((edge - roi) / interval) + 1) ** 3


def split_steps(steps: int, validations: int) -> tuple[int, int]:
    """(epochs, iterations_per_epoch) whose product is exactly `steps`, epochs closest to `validations`."""
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    epochs = min(divisors, key=lambda d: (abs(d - validations), -d))
    return epochs, steps // epochs
