"""VT-UNet: a volumetric transformer U-Net whose decoder fuses self- and cross-attention.

Paper: Peiris et al. 2022, "A Robust Volumetric Transformer for Accurate 3D Tumor Segmentation"
(MICCAI; arXiv 2111.13300). Read against the authors' public code (himashi92/VT-UNet):

    patch partition + linear embedding                (B, C_in, D, H, W) -> (B, D/4, H/4, W/4, C)
    VT-Enc: [W-MSA / SW-MSA blocks -> 3D patch merging] x 3, then the bottleneck stage
    VT-Dec at each level: patch expanding, concat skip + linear, then blocks that run, in parallel,
        self-attention  Z_s = x + SA(LN(x)),             Z_s += MLP(LN(Z_s))
        cross-attention Z_c = x + CA(LN(x) -> LN(skip)), Z_c += MLP(LN(Z_c))     (queries: decoder,
                                                                                 keys/values: encoder skip)
        fusion          Z = (1 - α) Z_s + α Z_c + MLP(LN(FPE))                   α = 0.3
    head: LN, final 4x patch expanding, linear projection -> (B, out_channels, D, H, W)

FPE, the Fourier-feature positional encoding, is the fixed 3D sinusoidal code of Vaswani et al.
per axis: channels split in three, sin/cos of the token's (d, h, w) index at frequencies
10000^(-2k/c). Where it enters: the abstract says the parallel SA/CA decoder blocks "subsume
Fourier position encoding", and the paper's Fig. 2(e) draws a fusion module; the full text was
not available to us, so the details follow the authors' code: the FPE of the token grid goes
through the block's LN + MLP and is *added to the fused tokens*, after both windowed attentions.
It is not added to the queries or keys (inside a window the relative position bias already
encodes position); it gives the decoder the absolute position that windowed attention lacks.
α = 0.3 weights the cross-attention branch, as in that code.

Follows the paper: pure transformer (no convolution), 3D shifted windows in encoder and decoder,
3D patch merging, parallel SA/CA branches with the convex-combination fusion and FPE, Swin-Unet
style patch expanding, VT-UNet-B widths at `base` (C = 72, depths 2-2-2-1, heads 3-6-12-24,
window 7).

Deviates, and why:
- The CA branch has its own query/key/value projections on the skip tokens (the reused
  `cross_attention.CrossAttention`); the authors' code reuses the SA branch's queries and the
  keys/values computed inside the mirrored encoder block. Same information, and it keeps the
  encoder a plain Swin stage and the decoder depth independent of the encoder's.
- Skips are the encoder stages' outputs; the code takes each stage's input. Its patch merging
  and expanding rearrange two of the three axes (code carried over from 2D Swin-Unet); ours
  act on all three.
- Kept from the authors' code: before each decoder stage the skip is also concatenated and
  projected back (Swin-Unet's skip connection), besides feeding the CA branch.
- Window 4 at the CPU sizes (a 96³ crop gives 24³ tokens); any input size by padding to a
  multiple of 32 in `EarlyFusion`, padded window keys masked (`layers.window_mask`).
"""

from __future__ import annotations

import math

import torch
from monai.networks.layers import DropPath
from torch import nn

from crossmodalnet.models.cross_attention import CrossAttention
from crossmodalnet.models.layers import Mlp, PatchMerging, SwinStage, WindowAttention, _Windowed, drop_path_schedule
from crossmodalnet.models.swinunet import FinalPatchExpanding, PatchEmbedding, PatchExpanding

__all__ = ["fourier_position_encoding", "VTDecoderBlock", "VTDecoderStage", "VTUNet"]


def fourier_position_encoding(size: tuple[int, int, int], dim: int, device: torch.device,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed 3D sinusoidal position code (1, D, H, W, dim).

    Each axis gets c = 2 ceil(dim / 6) channels, [sin(i ω_k), cos(i ω_k)] with ω_k = 10000^(-2k/c),
    k < c/2; the three axes are concatenated and cut to `dim` channels.
    """
    c = 2 * math.ceil(dim / 6)
    freq = 1.0 / 10000 ** (torch.arange(0, c, 2, device=device, dtype=torch.float32) / c)  # c/2
    axes = []
    for i, n in enumerate(size):
        ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * freq  # n, c/2
        emb = torch.cat([ang.sin(), ang.cos()], dim=-1)  # n, c
        shape = [1, 1, 1, c]
        shape[i] = n
        axes.append(emb.view(shape).expand(*size, c))
    return torch.cat(axes, dim=-1)[..., :dim].unsqueeze(0).to(dtype)


class VTDecoderBlock(_Windowed):
    """VT-Dec block: parallel windowed self-attention and cross-attention to the skip, fused.

    forward(x, skip, pe): decoder tokens x and encoder skip tokens, both (B, D, H, W, C), and the
    position code pe (1, D, H, W, C) -> (B, D, H, W, C). Both branches use the same (optionally
    shifted) windows, so a decoder token attends to the skip tokens of its own window.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: bool, mlp_ratio: float = 4.0,
                 alpha: float = 0.3, drop_path: float = 0.0):
        super().__init__(window_size, shift)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha weights a convex combination and must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.norm1 = nn.LayerNorm(dim)
        self.norm_skip = nn.LayerNorm(dim)
        self.self_attn = WindowAttention(dim, num_heads, window_size)
        self.cross_attn = CrossAttention(dim, num_heads, window_size, variant="standard")
        # One MLP and norm for both branches and the position term, as in the authors' block.
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        b, size = x.shape[0], tuple(x.shape[1:4])
        shift = self._shift(size)
        padded = self.padded(size)
        mask = self._mask(size, padded, shift, x.device)
        q = self.to_windows(self.norm1(x), shift)  # B*nW, N, C
        kv = self.to_windows(self.norm_skip(skip), shift)
        sa = self.from_windows(self.self_attn(q, mask, b), shift, (b, *padded), size)
        ca = self.from_windows(self.cross_attn(q, kv, mask, b), shift, (b, *padded), size)
        z_s = x + self.drop_path(sa)
        z_s = z_s + self.drop_path(self.mlp(self.norm2(z_s)))
        z_c = x + self.drop_path(ca)
        z_c = z_c + self.drop_path(self.mlp(self.norm2(z_c)))
        return (1 - self.alpha) * z_s + self.alpha * z_c + self.mlp(self.norm2(pe))


class VTDecoderStage(nn.Module):
    """`depth` VT-Dec blocks alternating window and shifted-window attention, all against one skip.

    forward(x, skip): (B, D, H, W, C) x 2 -> (B, D, H, W, C).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, alpha: float,
                 drop_path: list[float]):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList(
            VTDecoderBlock(dim, num_heads, window_size, shift=i % 2 == 1, mlp_ratio=mlp_ratio, alpha=alpha,
                           drop_path=drop_path[i])
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        pe = fourier_position_encoding(tuple(x.shape[1:4]), self.dim, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, skip, pe)
        return x


class VTUNet(nn.Module):
    """VT-UNet. forward: (B, in_channels, D, H, W) -> logits (B, out_channels, D, H, W).

    D, H, W must be multiples of `divisor` = patch_size * 2^(len(depths) - 1). The last entry of
    `depths` / `num_heads` is the bottleneck; decoder stage i mirrors encoder stage i.
    """

    def __init__(self, in_channels: int, out_channels: int, feature_size: int = 72,
                 depths: tuple[int, ...] = (2, 2, 2, 1), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                 window_size: int = 7, patch_size: int = 4, mlp_ratio: float = 4.0, alpha: float = 0.3,
                 drop_path_rate: float = 0.0):
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
        levels = list(reversed(range(n - 1)))
        self.expands = nn.ModuleList(PatchExpanding(dims[i + 1]) for i in levels)
        self.concat_back = nn.ModuleList(nn.Linear(2 * dims[i], dims[i], bias=False) for i in levels)
        self.decoder = nn.ModuleList(
            VTDecoderStage(dims[i], depths[i], num_heads[i], window_size, mlp_ratio, alpha, drop_path[i])
            for i in levels
        )
        self.norm_up = nn.LayerNorm(feature_size)
        self.final = FinalPatchExpanding(feature_size, patch_size)
        self.head = nn.Linear(feature_size, out_channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(f"VTUNet needs sizes that are multiples of {self.divisor}, got {tuple(x.shape[2:])}")
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
            x = stage(x, skip)
        x = self.final(self.norm_up(x))  # B, D, H, W, C
        return self.head(x).permute(0, 4, 1, 2, 3)
