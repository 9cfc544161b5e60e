"""Cross attention (Def. 2) and the Cross Transformer block (Eq. 3), windowed in 3D.

Two variants behind `ModelConfig.cross_attention`, both inside aligned (optionally shifted)
windows (per axis: (wd, wh, ww) tokens, an int being a cube), where the two token sets have the same size:

- ``"paper"``: literally Def. 2, CrossAttention(F_a, F_b) = Softmax(Q_b K_aᵀ / √d) V_b with
  Q_b = W_Q F_b, K_a = W_K F_a, V_b = W_V F_b. Row i of the result is attached to position i.
- ``"standard"``: queries from the stream being refined, keys and values from the other:
  Softmax(Q_a K_bᵀ / √d) V_b.

The Cross Transformer block refines every stream with its own weights, all refinements
computed from the features *before* the update (Eq. 3). With two streams:

    F̃a = CT(F_a, F_b),  F̃b = CT(F_b, F_a),
    CT(x, y) = x' + MLP(LN(x')),  x' = x + CrossAttention over windows of (LN(x), LN(Deform(x, y)))

where Deform resamples the other stream at offsets predicted from x (Def. 3). With n > 2 streams
(one per input channel), stream i is refined by all the others, F̃_i = CT_i(F_i, {F_j, j ≠ i}):
each F_j passes through CT_i's deformable operator against F_i, then

- ``"standard"``: the others' window tokens are concatenated along the token axis, so one softmax
  runs over (n − 1) wd·wh·ww keys per query (each key keeps its relative position bias to the query);
- ``"paper"``: Def. 2 needs square token sets, so it runs once per other stream and the results
  are averaged.

With n = 2 both reduce to the two-stream block above, term for term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from monai.networks.layers import DropPath
from torch import nn

from crossmodalnet.models.deformable import DeformableOp
from crossmodalnet.models.layers import Mlp, RelativePositionBias, _Windowed, window_attention

__all__ = ["CROSS_ATTENTION_VARIANTS", "cross_attention", "CrossAttention", "CrossTransformer",
           "CrossTransformerBlock"]

CROSS_ATTENTION_VARIANTS = ("standard", "paper")


def cross_attention(
    xa: torch.Tensor, xb: torch.Tensor, wq: nn.Linear, wk: nn.Linear, wv: nn.Linear, num_heads: int,
    variant: str = "paper", bias: torch.Tensor | None = None, mask: torch.Tensor | None = None, batch: int = 1,
) -> torch.Tensor:
    """CrossAttention(F_a, F_b) on token sets (one window or a whole map).

    xa: (n, N, C) tokens of the stream being refined (a); xb: (n, Nb, C) of the other stream(s) (b).
    paper: Softmax(Q_b K_aᵀ/√d) V_b, needs Nb = N; standard: Softmax(Q_a K_bᵀ/√d) V_b, any Nb
    (several streams' windows side by side). bias: (heads, Nq, Nk), mask: (nW, Nq, Nk). Returns
    (n, N, C), before the output projection. Exposed as a function so the audit can test it directly.
    """
    if variant not in CROSS_ATTENTION_VARIANTS:
        raise ValueError(f"cross_attention variant must be one of {CROSS_ATTENTION_VARIANTS}, got {variant!r}")
    if variant == "paper" and xa.shape[1] != xb.shape[1]:
        raise ValueError(f"the paper variant needs token sets of one size, got {xa.shape[1]} and {xb.shape[1]}")
    q_src, k_src = (xb, xa) if variant == "paper" else (xa, xb)
    q, k, v = (rearrange(f(s), "n t (h d) -> n h t d", h=num_heads) for f, s in ((wq, q_src), (wk, k_src), (wv, xb)))
    if bias is None:
        bias = torch.zeros(num_heads, q.shape[2], k.shape[2], device=q.device, dtype=q.dtype)
    out = window_attention(q, k, v, bias, mask, batch)
    return rearrange(out, "n h t d -> n t (h d)")


class CrossAttention(nn.Module):
    """Multi-head windowed cross attention with 3D relative position bias.

    forward(xa (B*nW, N, C), [xb_j (B*nW, N, C) for each other stream j]) -> (B*nW, N, C).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int | Sequence[int], variant: str):
        super().__init__()
        if variant not in CROSS_ATTENTION_VARIANTS:
            raise ValueError(f"cross_attention must be one of {CROSS_ATTENTION_VARIANTS}, got {variant!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.variant = variant
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = RelativePositionBias(window_size, num_heads)

    def forward(self, xa: torch.Tensor, xb: torch.Tensor | Sequence[torch.Tensor], mask: torch.Tensor | None,
                batch: int) -> torch.Tensor:
        others = [xb] if isinstance(xb, torch.Tensor) else list(xb)
        bias = self.bias()

        def attend(keys: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            return cross_attention(xa, keys, self.q, self.k, self.v, self.num_heads, self.variant, bias, mask, batch)

        if len(others) == 1:  # two streams: Def. 2 / the standard variant as they are
            out = attend(others[0], bias, mask)
        elif self.variant == "paper":  # square by definition: once per other stream, averaged
            out = torch.stack([attend(y, bias, mask) for y in others]).mean(dim=0)
        else:  # one softmax over every other stream's window: keys side by side, same offsets to the query
            n = len(others)
            out = attend(torch.cat(others, dim=1), bias.repeat(1, 1, n), None if mask is None else mask.repeat(1, 1, n))
        return self.proj(out)


class CrossTransformer(_Windowed):
    """One refinement of Eq. 3: stream x refined by the other stream(s).

    forward(x (B, D, H, W, C), y (B, D, H, W, C) or a list of them) -> (B, D, H, W, C).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int | Sequence[int], shift: bool, variant: str,
                 deformable: bool, num_points: int, max_offset: float, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0):
        super().__init__(window_size, shift)
        self.deform = DeformableOp(dim, num_points, max_offset) if deformable else None
        self.norm_x = nn.LayerNorm(dim)
        self.norm_y = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads, window_size, variant)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        others = [y] if isinstance(y, torch.Tensor) else list(y)
        b, size = x.shape[0], tuple(x.shape[1:4])
        if self.deform is not None:  # each other stream resampled against x, with this refinement's offsets
            others = [self.deform(x, o) for o in others]
        shift = self._shift(size)
        padded = self.padded(size)
        mask = self._mask(size, padded, shift, x.device)
        keys = [self.to_windows(self.norm_y(o), shift) for o in others]
        w = self.attn(self.to_windows(self.norm_x(x), shift), keys, mask, b)
        x = x + self.drop_path(self.from_windows(w, shift, (b, *padded), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossTransformerBlock(nn.Module):
    """Cross Transformer block (Eq. 3) over n >= 2 streams, separate weights per stream.

    `refine[i]` refines stream i with all the others (for two streams `refine[0]` is F̃a = CT(F_a, F_b),
    `refine[1]` is F̃b = CT(F_b, F_a)). forward(F_0, ..., F_{n-1}), each (B, D, H, W, C) -> the n refined
    streams, all computed from the inputs.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int | Sequence[int], shift: bool,
                 variant: str = "standard",
                 deformable: bool = True, num_points: int = 4, max_offset: float = 2.0, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, streams: int = 2):
        super().__init__()
        if streams < 2:
            raise ValueError(f"a Cross Transformer block needs at least 2 streams, got {streams}")
        kw = dict(dim=dim, num_heads=num_heads, window_size=window_size, shift=shift, variant=variant,
                  deformable=deformable, num_points=num_points, max_offset=max_offset, mlp_ratio=mlp_ratio,
                  drop_path=drop_path)
        self.refine = nn.ModuleList(CrossTransformer(**kw) for _ in range(streams))

    def forward(self, *feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(feats) != len(self.refine):
            raise ValueError(f"this block refines {len(self.refine)} streams, got {len(feats)}")
        return tuple(refine(f, [g for j, g in enumerate(feats) if j != i])
                     for i, (refine, f) in enumerate(zip(self.refine, feats, strict=True)))
