"""Cross attention (Def. 2) and the Cross Transformer block (Eq. 3), windowed in 3D.

Two variants behind `ModelConfig.cross_attention`, both inside aligned (optionally shifted)
windows, where the two token sets have the same size:

- ``"paper"``: literally Def. 2, CrossAttention(F_a, F_b) = Softmax(Q_b K_aᵀ / √d) V_b with
  Q_b = W_Q F_b, K_a = W_K F_a, V_b = W_V F_b. Row i of the result is attached to position i.
- ``"standard"``: queries from the stream being refined, keys and values from the other:
  Softmax(Q_a K_bᵀ / √d) V_b.

The Cross Transformer block refines both streams with separate weights, both directions
computed from the features *before* the update (Eq. 3):

    F̃a = CT(F_a, F_b),  F̃b = CT(F_b, F_a),
    CT(x, y) = x' + MLP(LN(x')),  x' = x + CrossAttention over windows of (LN(x), LN(Deform(x, y)))

where Deform resamples the other stream at offsets predicted from x (Def. 3).
"""

from __future__ import annotations

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
    """CrossAttention(F_a, F_b) on token sets of equal size (one window or a whole map).

    xa, xb: (n, N, C) tokens of the stream being refined (a) and of the other stream (b).
    paper: Softmax(Q_b K_aᵀ/√d) V_b; standard: Softmax(Q_a K_bᵀ/√d) V_b. Returns (n, N, C),
    before the output projection. Exposed as a function so the audit can test it directly.
    """
    if variant not in CROSS_ATTENTION_VARIANTS:
        raise ValueError(f"cross_attention variant must be one of {CROSS_ATTENTION_VARIANTS}, got {variant!r}")
    q_src, k_src = (xb, xa) if variant == "paper" else (xa, xb)
    q, k, v = (rearrange(f(s), "n t (h d) -> n h t d", h=num_heads) for f, s in ((wq, q_src), (wk, k_src), (wv, xb)))
    n_tok = q.shape[2]
    if bias is None:
        bias = torch.zeros(num_heads, n_tok, n_tok, device=q.device, dtype=q.dtype)
    out = window_attention(q, k, v, bias, mask, batch)
    return rearrange(out, "n h t d -> n t (h d)")


class CrossAttention(nn.Module):
    """Multi-head windowed cross attention with 3D relative position bias. (B*nW, N, C) -> same."""

    def __init__(self, dim: int, num_heads: int, window_size: int, variant: str):
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

    def forward(self, xa: torch.Tensor, xb: torch.Tensor, mask: torch.Tensor | None, batch: int) -> torch.Tensor:
        out = cross_attention(xa, xb, self.q, self.k, self.v, self.num_heads, self.variant, self.bias(), mask, batch)
        return self.proj(out)


class CrossTransformer(_Windowed):
    """One direction of Eq. 3: refine stream x with stream y. (B, D, H, W, C) x 2 -> (B, D, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: bool, variant: str,
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

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, size = x.shape[0], tuple(x.shape[1:4])
        if self.deform is not None:
            y = self.deform(x, y)
        shift = self._shift(size)
        padded = tuple(s + (-s) % self.window_size for s in size)
        mask = self._mask(size, padded, shift, x.device)
        w = self.attn(self.to_windows(self.norm_x(x), shift), self.to_windows(self.norm_y(y), shift), mask, b)
        x = x + self.drop_path(self.from_windows(w, shift, (b, *padded), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossTransformerBlock(nn.Module):
    """Bidirectional Cross Transformer block (Eq. 3) with separate weights per direction.

    forward(fa, fb) -> (F̃a, F̃b), each (B, D, H, W, C); both computed from the inputs.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: bool, variant: str = "standard",
                 deformable: bool = True, num_points: int = 4, max_offset: float = 2.0, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0):
        super().__init__()
        kw = dict(dim=dim, num_heads=num_heads, window_size=window_size, shift=shift, variant=variant,
                  deformable=deformable, num_points=num_points, max_offset=max_offset, mlp_ratio=mlp_ratio,
                  drop_path=drop_path)
        self.a_from_b = CrossTransformer(**kw)
        self.b_from_a = CrossTransformer(**kw)

    def forward(self, fa: torch.Tensor, fb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a_from_b(fa, fb), self.b_from_a(fb, fa)
