"""Training / validation / test splits of the paired case ids, drawn by a seed."""

from __future__ import annotations

import numpy as np

from crossmodalnet.errors import CrossModalNetError

__all__ = ["parse_split", "assign_splits"]


def parse_split(text: str) -> tuple[int, int | None, int]:
    """"15/5" -> (15, None, 5): training (validation carved from it) / test; "12/3/5" names all three."""
    parts = str(text).split("/")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3) or any(n < 0 for n in numbers) or sum(numbers) == 0:
        raise CrossModalNetError(f"--split must look like TRAIN/TEST or TRAIN/VAL/TEST (e.g. 15/5), got {text!r}")
    return (numbers[0], None, numbers[1]) if len(numbers) == 2 else (numbers[0], numbers[1], numbers[2])


def assign_splits(labeled: list[str], unlabeled: list[str], split: tuple[int, int | None, int],
                  seed: int) -> dict[str, list[str]]:
    """Split labeled case ids by `seed` in the proportions of `split` (exactly when they add up to
    the number of cases); without a validation count, validation is 20 % of the training part (at
    least one case when there are two or more). Unlabeled ids all go to test."""
    train, val, test = split
    n, total = len(labeled), train + (val or 0) + test
    n_test = round(n * test / total)
    if test > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    rest = n - n_test
    if val is None:
        n_val = max(1, round(0.2 * rest)) if rest >= 2 else 0
    else:
        n_val = min(round(n * val / total), rest)
    order = [sorted(labeled)[i] for i in np.random.default_rng(int(seed)).permutation(n)]
    return {"training": sorted(order[n_test + n_val:]), "validation": sorted(order[n_test:n_test + n_val]),
            "test": sorted(order[:n_test]) + sorted(unlabeled)}
