"""Lemma 1: wall time of cross attention against the number of tokens N, global and windowed.

Random features (n_windows, n_tokens, C) with the first Cross Transformer block's weights; the
fitted log-log exponent tells quadratic from linear.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from crossmodalnet.analysis.audit.claims import (
    CONDITIONAL,
    FAILS,
    HOLDS,
    LINEAR_MAX,
    NOT_TESTABLE,
    QUADRATIC_MIN,
    ClaimResult,
)
from crossmodalnet.models.cross_attention import cross_attention
from crossmodalnet.models.layers import triple

__all__ = ["check_attention_complexity"]


def _fit_exponent(tokens: Sequence[int], seconds: Sequence[float], last: int = 3) -> float:
    """Slope of log t against log N over the `last` largest sizes (small sizes are dominated by overhead)."""
    n, t = np.log(np.asarray(tokens[-last:], float)), np.log(np.asarray(seconds[-last:], float))
    return float(np.polyfit(n, t, 1)[0])


@torch.no_grad()
def check_attention_complexity(
    model: nn.Module, global_tokens: Sequence[int] = (512, 1024, 2048, 4096),
    windowed_tokens: Sequence[int] = (8192, 16384, 32768, 65536, 131072), repeats: int = 5,
) -> ClaimResult:
    """Lemma 1: time of `cross_attention` with the first block's weights against N, global and windowed.

    Global: one set of N tokens attends to N tokens. Windowed: N tokens in windows of ws³, as the
    model runs it. Best of `repeats`, one thread (timing on shared cores is otherwise dominated by
    scheduling waits), random features (the cost does not depend on the values).
    """
    statement = "the time complexity of cross attention is O(N²d)"
    if getattr(model, "cross", None) is None:
        return ClaimResult("Lemma 1", statement, "", {}, "", NOT_TESTABLE,
                           "not testable on this model: it has no cross attention (cross_blocks=False)")
    attn = model.cross[0].refine[0].attn
    device = attn.q.weight.device
    dim, ws = attn.q.in_features, math.prod(triple(model.config.window_size))  # tokens per window
    gen = torch.Generator().manual_seed(0)

    def timed(n_windows: int, n_tokens: int) -> float:
        xa = torch.randn(n_windows, n_tokens, dim, generator=gen).to(device)
        xb = torch.randn(n_windows, n_tokens, dim, generator=gen).to(device)
        cross_attention(xa, xb, attn.q, attn.k, attn.v, attn.num_heads, attn.variant)  # warm-up
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            cross_attention(xa, xb, attn.q, attn.k, attn.v, attn.num_heads, attn.variant)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        return best

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_global = [timed(1, n) for n in global_tokens]
        t_window = [timed(n // ws, ws) for n in windowed_tokens]
    finally:
        torch.set_num_threads(threads)
    g, w = _fit_exponent(global_tokens, t_global), _fit_exponent(windowed_tokens, t_window)
    if g < QUADRATIC_MIN:
        verdict = FAILS
    else:
        verdict = CONDITIONAL if w <= LINEAR_MAX else HOLDS
    return ClaimResult(
        "Lemma 1", statement,
        f"best-of-{repeats} wall time of cross_attention (first block's trained weights, d = {dim}, "
        f"{attn.num_heads} heads) against the number of tokens N, one thread; exponent = slope of log t vs log N "
        "over the three largest N",
        {"global": {"tokens": list(global_tokens), "seconds": t_global, "exponent": g},
         "windowed": {"tokens": list(windowed_tokens), "window_tokens": ws, "seconds": t_window, "exponent": w}},
        f"global exponent ≥ {QUADRATIC_MIN} confirms N²; 'only under a condition' when the windowed exponent "
        f"≤ {LINEAR_MAX} (linear): the bound is tight only for global attention",
        verdict,
        "CrossModalNet attends inside windows of ws³ tokens: O(N·ws³·d), linear in N. O(N²d) is a valid upper "
        "bound for both, tight only for global attention",
    )

