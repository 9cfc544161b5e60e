"""The deformable operator (Def. 3 of the paper), for 3D feature maps.

    DeformableOp(F, Δp)(p) = Σ_k w_k(p) · F(p + Δp_k(p)),   k = 1..K

For every position p of a *query* map, K offsets Δp_k ∈ ℝ³ (in voxels of the map's grid,
bounded by `max_offset · tanh`) and K weights w_k (softmax over k) are predicted from the query
features; the *value* map (the other modality) is sampled trilinearly at p + Δp_k. Offsets
start at zero and weights at 1/K, so the operator starts as the identity on the value map and
learns to absorb residual CT/MR misregistration.

Along an axis of one token (a thin axis of an anisotropic plan, the 2D limit) there is nothing to
sample between: the offsets along it are zeroed, so every point samples its own slice.

Note on Theorem 2.2: offsets here are *predicted* by a linear layer (3K·C + 3K parameters),
not stored per position (the paper's 3KHW); see `extra_parameters`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DeformableOp", "sample_at_offsets"]


def sample_at_offsets(value: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of `value` at every position plus K offsets.

    value: (B, C, D, H, W); offsets: (B, K, D, H, W, 3) in voxels, axis order (D, H, W).
    Returns (B, K, C, D, H, W). Outside the volume, samples take the nearest border value.
    """
    b, c, d, h, w = value.shape
    k = offsets.shape[1]
    base = torch.stack(
        torch.meshgrid(*[torch.arange(n, device=value.device, dtype=value.dtype) for n in (d, h, w)], indexing="ij"),
        dim=-1,
    )  # D, H, W, 3
    pos = base + offsets  # B, K, D, H, W, 3 (voxels)
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in (d, h, w)], device=value.device, dtype=value.dtype)
    grid = (pos * scale - 1.0).flip(-1)  # grid_sample wants (x, y, z) = (W, H, D) order, in [-1, 1]
    grid = grid.reshape(b, k * d, h, w, 3)  # K stacked along depth: one grid_sample call
    out = F.grid_sample(value, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(b, c, k, d, h, w).transpose(1, 2)


class DeformableOp(nn.Module):
    """Sample a value map at K learned offsets per query position (Def. 3).

    forward(query (B, D, H, W, C), value (B, D, H, W, C)) -> (B, D, H, W, C), channels-last
    like the Swin tokens.
    """

    def __init__(self, dim: int, num_points: int = 4, max_offset: float = 2.0):
        super().__init__()
        self.num_points = num_points
        self.max_offset = max_offset
        self.norm = nn.LayerNorm(dim)
        self.offsets = nn.Linear(dim, 3 * num_points)
        self.weights = nn.Linear(dim, num_points)
        # Identity at initialisation: zero offsets, uniform weights.
        for layer in (self.offsets, self.weights):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def predict(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, D, H, W, C) -> offsets (B, K, D, H, W, 3) in voxels, weights (B, K, D, H, W)."""
        q = self.norm(query)
        off = self.max_offset * torch.tanh(self.offsets(q))
        off = off.unflatten(-1, (self.num_points, 3)).permute(0, 4, 1, 2, 3, 5)
        wts = torch.softmax(self.weights(q), dim=-1).permute(0, 4, 1, 2, 3)
        return off, wts

    def forward(self, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        off, wts = self.predict(query)
        flat = [n == 1 for n in query.shape[1:4]]
        if any(flat):  # no offsets along an axis of one token (grid_sample would clamp them to it anyway)
            off = off * torch.tensor([0.0 if f else 1.0 for f in flat], device=off.device, dtype=off.dtype)
        samples = sample_at_offsets(value.permute(0, 4, 1, 2, 3), off)  # B, K, C, D, H, W
        out = (samples * wts.unsqueeze(2)).sum(dim=1)  # B, C, D, H, W
        return out.permute(0, 2, 3, 4, 1)

    @property
    def extra_parameters(self) -> int:
        """Parameters this operator adds (independent of the map size, unlike the paper's 3KHW)."""
        return sum(p.numel() for p in self.parameters())
