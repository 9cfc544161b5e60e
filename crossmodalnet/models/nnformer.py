"""nnFormer: convolutions and volume-based self-attention interleaved in a U-shape.

Paper: Zhou et al. 2021, "nnFormer: Interleaved Transformer for Volumetric Segmentation"
(arXiv 2109.03201). Read against the authors' public code (282857341/nnFormer):

    convolutional embedding: [conv3 s2, GELU, LN, conv3 s1 (, GELU, LN)] x 2, LN   -> (B, D/4, H/4, W/4, C)
    encoder:    [LV-MSA blocks -> LN (skip) -> conv down-sampling (GELU, LN, conv3 s2, C -> 2C)] x (n-1)
    bottleneck: GV-MSA blocks (self-attention over all tokens of the volume) at 2^(n-1) C, LN
    decoder:    [transposed-conv up-sampling (LN, 2C -> C) -> skip attention -> LV-MSA blocks] x (n-1)
    final:      transposed conv, kernel = stride = 4, to the classes -> (B, out_channels, D, H, W)

LV-MSA is local volume-based self-attention: in cubic windows, alternately shifted (the 3D
Swin block, reused from `layers`). GV-MSA attends over the whole bottleneck volume. Skip
attention replaces U-Net's concatenation: in the first block of each decoder stage the
up-sampled decoder tokens are the queries and the encoder's skip tokens give keys and values,
with the residual taken from their sum.

Follows the paper: the convolutional embedding and down-sampling interleaved with transformer
blocks, LV-MSA in encoder and decoder, GV-MSA at the bottleneck, skip attention, transposed
convolutions to expand, and at `base` the published volumetric (BraTS) configuration: C = 96,
depths 2-2-2-2, heads 3-6-12-24, 4³ patches, no deep supervision.

Deviates, and why:
- GV-MSA has no position bias. The authors get "global" by giving the last stage a window as
  large as its (fixed-size) grid, with a relative position bias table of that size; we accept
  any input size, so the bottleneck grid varies and attention runs over all of its tokens.
  Position still reaches it through the zero-padded convolutions and the earlier window biases.
- Decoder heads equal the encoder's at the same width (the public code doubles them there).
- Transposed convolutions are written as a pointwise linear map + voxel shuffle (`layers.UpSample`
  and `FinalExpanding`): the same function as kernel = stride ConvTranspose3d, faster on CPU.
- Window 4 in every LV-MSA stage. The published windows are 4-4-8-4 for 128³ crops, where the
  8 covers the whole third-stage grid; with any input size we keep windows local and make only
  the bottleneck global. Any input size by padding to a multiple of 32 in `EarlyFusion`, padded
  window keys masked (`layers.window_mask`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.networks.layers import DropPath
from torch import nn

from crossmodalnet.models.layers import (
    Mlp,
    RelativePositionBias,
    SwinBlock,
    SwinStage,
    UpSample,
    _Windowed,
    drop_path_schedule,
    window_attention,
)

__all__ = [
    "ConvEmbedding",
    "ConvDownsampling",
    "GlobalAttention",
    "GlobalAttentionBlock",
    "SkipAttentionBlock",
    "DecoderStage",
    "FinalExpanding",
    "NnFormer",
]


def _channel_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of a channels-first map (B, C, D, H, W)."""
    return norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class ConvEmbedding(nn.Module):
    """The embedding layer: four 3³ convolutions, strides 2, 1, 2, 1, GELU + LN between them, LN after.

    (B, C_in, D, H, W) -> tokens (B, D/4, H/4, W/4, C). Small kernels in the stem give the tokens
    local detail that a strided patch projection does not (the paper's motivation).
    """

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        half = dim // 2
        self.convs = nn.ModuleList([
            nn.Conv3d(in_channels, half, 3, stride=2, padding=1),
            nn.Conv3d(half, half, 3, stride=1, padding=1),
            nn.Conv3d(half, dim, 3, stride=2, padding=1),
            nn.Conv3d(dim, dim, 3, stride=1, padding=1),
        ])
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in (half, half, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs[:-1], self.norms, strict=True):
            x = _channel_norm(norm, F.gelu(conv(x)))
        return self.norm(self.convs[-1](x).permute(0, 2, 3, 4, 1))


class ConvDownsampling(nn.Module):
    """Down-sampling by a strided convolution: GELU, LN, Conv3d(C -> 2C, 3³, stride 2).

    (B, D, H, W, C) -> (B, ceil(D/2), ceil(H/2), ceil(W/2), 2C). The paper found a strided
    convolution better than Swin's neighbourhood concatenation here.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduction = nn.Conv3d(dim, 2 * dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(x)).permute(0, 4, 1, 2, 3)
        return self.reduction(x).permute(0, 2, 3, 4, 1)


class GlobalAttention(nn.Module):
    """Multi-head self-attention over all tokens of each volume (GV-MSA). (B, L, C) -> (B, L, C)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))


class GlobalAttentionBlock(nn.Module):
    """Transformer block with GV-MSA: x = x + GV-MSA(LN(x)); x = x + MLP(LN(x)). (B, D, H, W, C) in and out."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GlobalAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        y = self.attn(self.norm1(x).reshape(b, d * h * w, c)).reshape(b, d, h, w, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SkipAttentionBlock(_Windowed):
    """Skip attention: windowed attention with queries from the decoder and keys/values from the skip.

    forward(x_up, skip): up-sampled decoder tokens and encoder skip tokens, (B, D, H, W, C) each
    -> (B, D, H, W, C). As in the authors' block: one LN for both inputs, the normalised decoder
    tokens are the queries as they are (no query projection), keys and values are a linear map
    of the skip, and the residual is x_up + skip (the concatenation this block replaces).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__(window_size, shift=False)
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = RelativePositionBias(window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x_up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        b, size = x_up.shape[0], tuple(x_up.shape[1:4])
        padded = self.padded(size)
        mask = self._mask(size, padded, 0, x_up.device)
        q = rearrange(self.to_windows(self.norm1(x_up), 0), "n t (h d) -> n h t d", h=self.num_heads)
        kv = rearrange(self.kv(self.to_windows(self.norm1(skip), 0)), "n t (two h d) -> two n h t d", two=2,
                       h=self.num_heads)
        out = window_attention(q, kv[0], kv[1], self.bias(), mask, b)  # B*nW, heads, N, d
        out = self.proj(rearrange(out, "n h t d -> n t (h d)"))
        x = x_up + skip + self.drop_path(self.from_windows(out, 0, (b, *padded), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DecoderStage(nn.Module):
    """One decoder level: a skip-attention block, then depth - 1 LV-MSA blocks (shifted, then alternating).

    forward(x_up, skip): (B, D, H, W, C) x 2 -> (B, D, H, W, C).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop_path: list[float]):
        super().__init__()
        self.skip_attn = SkipAttentionBlock(dim, num_heads, window_size, mlp_ratio, drop_path[0])
        self.blocks = nn.Sequential(*[
            SwinBlock(dim, num_heads, window_size, shift=i % 2 == 1, mlp_ratio=mlp_ratio, drop_path=drop_path[i])
            for i in range(1, depth)
        ])

    def forward(self, x_up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.skip_attn(x_up, skip))


class FinalExpanding(nn.Module):
    """Final expanding: ConvTranspose3d(C, out, kernel=s, stride=s), as a linear map to s³ out + voxel shuffle.

    (B, D, H, W, C) -> (B, out_channels, sD, sH, sW). Kernel = stride, so the kernels never
    overlap and this is the same function (with a bias per sub-voxel position).
    """

    def __init__(self, dim: int, out_channels: int, scale: int):
        super().__init__()
        self.scale = scale
        self.proj = nn.Linear(dim, out_channels * scale**3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale
        return rearrange(self.proj(x), "b d h w (c p q r) -> b c (d p) (h q) (w r)", p=s, q=s, r=s)


class NnFormer(nn.Module):
    """nnFormer. forward: (B, in_channels, D, H, W) -> logits (B, out_channels, D, H, W).

    D, H, W must be multiples of `divisor` = 4 * 2^(len(depths) - 1). The last entry of `depths` /
    `num_heads` is the GV-MSA bottleneck; decoder level i mirrors encoder stage i.
    """

    patch_size = 4  # two stride-2 convolutions in the embedding

    def __init__(self, in_channels: int, out_channels: int, feature_size: int = 96,
                 depths: tuple[int, ...] = (2, 2, 2, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                 window_size: int = 4, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0):
        super().__init__()
        n = len(depths)
        if len(num_heads) != n or n < 2:
            raise ValueError(f"depths {depths} and num_heads {num_heads} need the same length, at least 2")
        dims = [feature_size * 2**i for i in range(n)]
        drop_path = drop_path_schedule(depths, drop_path_rate)
        self.divisor = self.patch_size * 2 ** (n - 1)

        self.embed = ConvEmbedding(in_channels, feature_size)
        self.encoder = nn.ModuleList(
            SwinStage(dims[i], depths[i], num_heads[i], window_size, mlp_ratio, drop_path[i]) for i in range(n - 1)
        )
        self.skip_norms = nn.ModuleList(nn.LayerNorm(dims[i]) for i in range(n - 1))
        self.downs = nn.ModuleList(ConvDownsampling(dims[i]) for i in range(n - 1))
        self.bottleneck = nn.Sequential(*[
            GlobalAttentionBlock(dims[-1], num_heads[-1], mlp_ratio, drop_path[-1][j]) for j in range(depths[-1])
        ])
        self.bottleneck_norm = nn.LayerNorm(dims[-1])
        levels = list(reversed(range(n - 1)))
        self.up_norms = nn.ModuleList(nn.LayerNorm(dims[i + 1]) for i in levels)
        self.ups = nn.ModuleList(UpSample(dims[i + 1], dims[i]) for i in levels)
        self.decoder = nn.ModuleList(
            DecoderStage(dims[i], depths[i], num_heads[i], window_size, mlp_ratio, drop_path[i]) for i in levels
        )
        self.final = FinalExpanding(feature_size, out_channels, self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(f"NnFormer needs sizes that are multiples of {self.divisor}, got {tuple(x.shape[2:])}")
        x = self.embed(x)  # B, D/4, H/4, W/4, C
        skips = []
        for stage, norm, down in zip(self.encoder, self.skip_norms, self.downs, strict=True):
            x = stage(x)
            skips.append(norm(x))
            x = down(x)
        x = self.bottleneck_norm(self.bottleneck(x))
        for up_norm, up, stage, skip in zip(self.up_norms, self.ups, self.decoder, reversed(skips), strict=True):
            x_up = up(up_norm(x).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # transposed conv, channels-first
            x = stage(x_up, skip)
        return self.final(x)
