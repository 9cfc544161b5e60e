"""Swin-Unet in 3D: a U-Net made only of transformer blocks and linear layers.

Paper: Cao et al. 2021, "Swin-Unet: Unet-like Pure Transformer for Medical Image Segmentation"
(2D), extended to volumes the way public MM-WHS comparisons run it:

    patch partition (p³ voxels) + linear embedding     (B, C_in, D, H, W) -> (B, D/p, H/p, W/p, C)
    encoder:    [Swin blocks -> patch merging] x (n-1)  C, 2C, 4C at strides p, 2p, 4p (the skips)
    bottleneck: Swin blocks                             2^(n-1) C at stride 2^(n-1) p
    decoder:    [patch expanding -> concat skip -> linear 2C_i -> C_i -> Swin blocks] x (n-1)
    head:       LN, final p x patch expanding, linear projection -> (B, out_channels, D, H, W)

Follows the paper: shifted-window Swin blocks (W-MSA / SW-MSA pairs) with relative position
bias, patch merging, *patch expanding* (a linear layer and a rearrangement of channels into
sub-voxels, no convolution and no interpolation anywhere in the decoder), skips fused by
concatenation and a linear layer, a final 4x patch expanding then a linear projection to the
classes; widths, depths and heads of the published model at `base` (C = 96, depths 2-2-2-2,
heads 3-6-12-24, window 7).

Deviates, and why:
- 3D throughout (this is the point of the extension): cubic windows with a 3D relative position
  bias, merging of 2x2x2 neighbourhoods (8C -> 2C), patch expanding Linear(C -> 4C) into 8
  sub-voxels of C/2 (2D: C -> 2C into 4 sub-pixels), final Linear(C -> p³C) into p³ sub-voxels of C.
- Skips are the encoder stages' outputs (after their Swin blocks), as the paper's Fig. 1 draws
  them; the public 2D code takes each stage's input instead (for the finest level, the bare
  patch embedding).
- Window 4 at the CPU sizes: a 96³ crop gives a 24³ token grid, which 4 divides and 7 does not.
- Any input size: `EarlyFusion` pads to a multiple of p 2^(n-1); windows overhanging a grid are
  padded and their padded keys masked (`layers.window_mask`).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from crossmodalnet.models.layers import PatchMerging, SwinStage, drop_path_schedule

__all__ = [
    "voxel_shuffle",
    "PatchEmbedding",
    "PatchExpanding",
    "FinalPatchExpanding",
    "SwinUnet",
]


def voxel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, D, H, W, r³ C) -> (B, rD, rH, rW, C): channel groups become the r x r x r sub-voxels.

    The exact inverse of the neighbourhood concatenation in `layers.PatchMerging`
    ("b (d p) (h q) (w r) c -> b d h w (p q r c)").
    """
    return rearrange(x, "b d h w (p q r c) -> b (d p) (h q) (w r) c", p=r, q=r, r=r)


class PatchEmbedding(nn.Module):
    """Patch partition + linear embedding: (B, C_in, D, H, W) -> (B, D/p, H/p, W/p, C), then LN.

    Each non-overlapping p³ patch is flattened (p³ C_in values) and mapped by one linear layer;
    D, H, W must be multiples of p (`EarlyFusion` pads).
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size**3, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if any(s % p for s in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} is not a multiple of the patch size {p}")
        x = rearrange(x, "b c (d p) (h q) (w r) -> b d h w (p q r c)", p=p, q=p, r=p)
        return self.norm(self.proj(x))


class PatchExpanding(nn.Module):
    """Double the grid, halve the channels: Linear(C -> 4C), voxel shuffle into 8 sub-voxels of C/2, LN.

    (B, D, H, W, C) -> (B, 2D, 2H, 2W, C/2). Inverse in shape of `layers.PatchMerging(C/2)`.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"patch expanding needs an even number of channels, got {dim}")
        self.expand = nn.Linear(dim, 4 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(voxel_shuffle(self.expand(x), 2))


class FinalPatchExpanding(nn.Module):
    """Back to voxels: Linear(C -> s³ C), voxel shuffle into s³ sub-voxels of C, LN.

    (B, D, H, W, C) -> (B, sD, sH, sW, C), s = the patch size.
    """

    def __init__(self, dim: int, scale: int):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale**3 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(voxel_shuffle(self.expand(x), self.scale))


class SwinUnet(nn.Module):
    """3D Swin-Unet. forward: (B, in_channels, D, H, W) -> logits (B, out_channels, D, H, W).

    D, H, W must be multiples of `divisor` = patch_size * 2^(len(depths) - 1). The last entry of
    `depths` / `num_heads` is the bottleneck; each decoder stage mirrors its encoder stage.
    """

    def __init__(self, in_channels: int, out_channels: int, feature_size: int = 96,
                 depths: tuple[int, ...] = (2, 2, 2, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                 window_size: int = 7, patch_size: int = 4, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0):
        super().__init__()
        n = len(depths)
        if len(num_heads) != n or n < 2:
            raise ValueError(f"depths {depths} and num_heads {num_heads} need the same length, at least 2")
        dims = [feature_size * 2**i for i in range(n)]
        drop_path = drop_path_schedule(depths, drop_path_rate)
        self.divisor = patch_size * 2 ** (n - 1)

        self.embed = PatchEmbedding(in_channels, feature_size, patch_size)
        self.encoder = nn.ModuleList(
            SwinStage(dims[i], depths[i], num_heads[i], window_size, mlp_ratio, drop_path[i]) for i in range(n - 1)
        )
        self.merges = nn.ModuleList(PatchMerging(dims[i]) for i in range(n - 1))
        self.bottleneck = SwinStage(dims[-1], depths[-1], num_heads[-1], window_size, mlp_ratio, drop_path[-1])
        self.norm = nn.LayerNorm(dims[-1])
        # Decoder, coarse to fine: stage i gets 2C_i from expanding (C_i) + skip (C_i), linear back to C_i.
        levels = list(reversed(range(n - 1)))
        self.expands = nn.ModuleList(PatchExpanding(dims[i + 1]) for i in levels)
        self.concat_back = nn.ModuleList(nn.Linear(2 * dims[i], dims[i], bias=False) for i in levels)
        self.decoder = nn.ModuleList(
            SwinStage(dims[i], depths[i], num_heads[i], window_size, mlp_ratio, drop_path[i]) for i in levels
        )
        self.norm_up = nn.LayerNorm(feature_size)
        self.final = FinalPatchExpanding(feature_size, patch_size)
        self.head = nn.Linear(feature_size, out_channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(f"SwinUnet needs sizes that are multiples of {self.divisor}, got {tuple(x.shape[2:])}")
        x = self.embed(x)  # B, D/p, H/p, W/p, C
        skips = []
        for stage, merge in zip(self.encoder, self.merges, strict=True):
            x = stage(x)
            skips.append(x)
            x = merge(x)
        x = self.norm(self.bottleneck(x))
        for expand, concat_back, stage, skip in zip(self.expands, self.concat_back, self.decoder, reversed(skips),
                                                    strict=True):
            x = concat_back(torch.cat([expand(x), skip], dim=-1))
            x = stage(x)
        x = self.final(self.norm_up(x))  # B, D, H, W, C
        return self.head(x).permute(0, 4, 1, 2, 3)
