"""3D Swin Transformer building blocks (Liu et al. 2021, extended to volumes as in Swin-UNETR).

Tokens are kept channels-last, `(B, D, H, W, C)`, through the encoder. Windows are cubes of
`window_size` tokens; volumes of any size are padded up to a multiple of the window and the
padded tokens are masked out as keys, so padding never changes a real token's output.

Bottom-up: pure helpers (`window_partition`, `window_reverse`, `window_mask`), then
`RelativePositionBias`, `window_attention`, `WindowAttention`, `Mlp`, `SwinBlock`,
`PatchMerging`, `ConvStem`, `UpSample`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.networks.layers import DropPath
from torch import nn

__all__ = [
    "window_partition",
    "window_reverse",
    "window_mask",
    "pad_to_windows",
    "RelativePositionBias",
    "window_attention",
    "WindowAttention",
    "Mlp",
    "SwinBlock",
    "SwinStage",
    "drop_path_schedule",
    "PatchMerging",
    "ConvStem",
    "UpSample",
]

# Additive mask value: exp(-1e4) is exactly 0 in fp32 and fp16 stays finite (no NaN rows).
_MASKED = -1e4


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, D, H, W, C) with D, H, W multiples of ws -> (B * nW, ws**3, C), windows in raster order."""
    return rearrange(x, "b (d p) (h q) (w r) c -> (b d h w) (p q r) c", p=ws, q=ws, r=ws)


def window_reverse(windows: torch.Tensor, ws: int, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nW, ws**3, C) -> (B, D, H, W, C); shape = (B, D, H, W)."""
    b, d, h, w = shape
    return rearrange(
        windows, "(b d h w) (p q r) c -> b (d p) (h q) (w r) c", b=b, d=d // ws, h=h // ws, w=w // ws,
        p=ws, q=ws, r=ws,
    )


def pad_to_windows(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad (B, D, H, W, C) at the far end of each spatial axis to a multiple of ws."""
    d, h, w = x.shape[1:4]
    pads = tuple((-s) % ws for s in (d, h, w))
    if any(pads):
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    return x, pads


def window_mask(
    size: tuple[int, int, int], padded: tuple[int, int, int], ws: int, shift: int, device: torch.device
) -> torch.Tensor | None:
    """Additive attention mask (nW, N, N) for windows of a padded, optionally shifted volume.

    A key is masked when it is a padded token, or (shifted windows) when it comes from a
    different region of the cyclically rolled volume than the query: the Swin mask.
    Returns None when nothing needs masking.
    """
    if shift == 0 and padded == size:
        return None
    dp, hp, wp = padded
    region = torch.zeros((1, dp, hp, wp, 1), device=device)
    if shift > 0:
        cnt = 0
        spans = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
        for sd in spans:
            for sh in spans:
                for sw in spans:
                    region[:, sd, sh, sw, :] = cnt
                    cnt += 1
    is_pad = torch.ones((1, dp, hp, wp, 1), device=device)
    is_pad[:, : size[0], : size[1], : size[2], :] = 0
    if shift > 0:
        is_pad = torch.roll(is_pad, shifts=(-shift,) * 3, dims=(1, 2, 3))
    region_w = window_partition(region, ws).squeeze(-1)  # nW, N
    pad_w = window_partition(is_pad, ws).squeeze(-1)  # nW, N
    mask = (region_w.unsqueeze(1) != region_w.unsqueeze(2)) | (pad_w.unsqueeze(1) > 0)  # nW, N(q), N(k)
    return torch.zeros(mask.shape, device=device).masked_fill(mask, _MASKED)


class RelativePositionBias(nn.Module):
    """Learned bias per head for each of the (2 ws - 1)^3 relative offsets inside a window.

    forward() -> (heads, N, N) with N = ws**3.
    """

    def __init__(self, window_size: int, num_heads: int):
        super().__init__()
        ws = window_size
        self.table = nn.Parameter(torch.zeros((2 * ws - 1) ** 3, num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        coords = torch.stack(torch.meshgrid(*[torch.arange(ws)] * 3, indexing="ij")).flatten(1)  # 3, N
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # N, N, 3
        index = (rel[..., 0] * (2 * ws - 1) + rel[..., 1]) * (2 * ws - 1) + rel[..., 2]
        self.register_buffer("index", index, persistent=False)

    def forward(self) -> torch.Tensor:
        n = self.index.shape[0]
        return self.table[self.index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None, batch: int
) -> torch.Tensor:
    """Softmax(q kᵀ/√d + bias + mask) v for all windows at once.

    q: (B * nW, heads, N, d), k, v: (B * nW, heads, Nk, d), windows batch-major as `window_partition`
    orders them (Nk = N for self attention; a multiple of N when the keys are several streams'
    windows side by side, `cross_attention`); bias: (heads, N, Nk); mask: (nW, N, Nk) or None.
    Returns (B * nW, heads, N, d).

    The bias + mask, (nW, heads, N, N), is the same for every sample, so it is broadcast over
    the batch rather than repeated B times (timm's Swin adds `mask.unsqueeze(1).unsqueeze(0)` to
    scores viewed as (B, nW, heads, N, N)). Here windows are folded into the heads instead:
    (B, nW * heads, N, d) with a (1, nW * heads, N, N) mask, because scaled_dot_product_attention's
    fused CPU kernel takes 4D inputs only (a 5D call falls back to the unfused path even without
    grad), and its leading 1 broadcasts in both the fused and the unfused path.
    """
    bias = bias.to(q.dtype)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))  # 1, heads, N, N
    n_w, (bn, heads, n, _), n_k = mask.shape[0], q.shape, k.shape[2]
    if bn != batch * n_w:
        raise ValueError(f"q has {bn} windows, expected batch {batch} x {n_w} windows of the mask")
    attn_mask = (bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)).reshape(1, n_w * heads, n, n_k)

    # q, k, v are permuted views of the projections, so this copies them: B·nW·heads·N·d values each,
    # N/d times fewer than the B·nW·heads·N·N of a repeated mask.
    def fold(t: torch.Tensor) -> torch.Tensor:  # (B * nW, heads, N, d) -> (B, nW * heads, N, d)
        return t.reshape(batch, n_w * heads, t.shape[2], t.shape[3])

    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=attn_mask)
    return out.reshape(bn, heads, n, out.shape[-1])


class WindowAttention(nn.Module):
    """Window multi-head self-attention with 3D relative position bias (Swin's W-MSA)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.bias = RelativePositionBias(window_size, num_heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, batch: int) -> torch.Tensor:
        """x: (B * nW, N, C) -> (B * nW, N, C)."""
        qkv = rearrange(self.qkv(x), "n t (three h d) -> three n h t d", three=3, h=self.num_heads)
        out = window_attention(qkv[0], qkv[1], qkv[2], self.bias(), mask, batch)
        return self.proj(rearrange(out, "n h t d -> n t (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Windowed(nn.Module):
    """Shared machinery: pad, roll, partition, (attend), reverse, roll back, crop; mask cache."""

    def __init__(self, window_size: int, shift: bool):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self._mask_cache: dict[tuple, torch.Tensor | None] = {}

    def _shift(self, size: tuple[int, int, int]) -> int:
        # No shift when the whole volume fits in one window (nothing to connect across borders).
        return self.shift_size if max(size) > self.window_size else 0

    def _mask(self, size, padded, shift, device) -> torch.Tensor | None:
        key = (size, padded, shift, str(device))
        if key not in self._mask_cache:
            self._mask_cache[key] = window_mask(size, padded, self.window_size, shift, device)
        return self._mask_cache[key]

    def to_windows(self, x: torch.Tensor, shift: int) -> torch.Tensor:
        """(B, D, H, W, C) -> (B * nW, N, C) after padding and the cyclic shift."""
        x, _ = pad_to_windows(x, self.window_size)
        if shift:
            x = torch.roll(x, shifts=(-shift,) * 3, dims=(1, 2, 3))
        return window_partition(x, self.window_size)

    def from_windows(self, w: torch.Tensor, shift: int, padded_shape, size) -> torch.Tensor:
        x = window_reverse(w, self.window_size, padded_shape)
        if shift:
            x = torch.roll(x, shifts=(shift,) * 3, dims=(1, 2, 3))
        return x[:, : size[0], : size[1], : size[2]]


class SwinBlock(_Windowed):
    """Swin Transformer block, pre-norm as Swin defines it (docs/design.md section 2; not the paper's Eq. 2):

        x = x + MSA(LN(x));  x = x + MLP(LN(x))

    with window (shift=False) or shifted-window (shift=True) attention.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: bool, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0):
        super().__init__(window_size, shift)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D, H, W, C) -> (B, D, H, W, C)."""
        b, size = x.shape[0], tuple(x.shape[1:4])
        shift = self._shift(size)
        padded = tuple(s + (-s) % self.window_size for s in size)
        w = self.to_windows(self.norm1(x), shift)
        w = self.attn(w, self._mask(size, padded, shift, x.device), b)
        x = x + self.drop_path(self.from_windows(w, shift, (b, *padded), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_schedule(depths: tuple[int, ...], rate: float) -> list[list[float]]:
    """Stochastic-depth rates rising linearly from 0 to `rate` over all blocks, split per stage."""
    rates = torch.linspace(0, rate, sum(depths)).tolist()
    return [rates[sum(depths[:i]): sum(depths[: i + 1])] for i in range(len(depths))]


class SwinStage(nn.Sequential):
    """`depth` Swin blocks alternating window and shifted-window attention. (B, D, H, W, C) in and out."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop_path: list[float]):
        super().__init__(*[
            SwinBlock(dim, num_heads, window_size, shift=i % 2 == 1, mlp_ratio=mlp_ratio, drop_path=drop_path[i])
            for i in range(depth)
        ])


class PatchMerging(nn.Module):
    """Halve the grid, double the channels: concat each 2x2x2 neighbourhood (8C), LN, Linear(8C -> 2C).

    (B, D, H, W, C) -> (B, ceil(D/2), ceil(H/2), ceil(W/2), 2C); odd sizes are zero-padded.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = pad_to_windows(x, 2)
        x = rearrange(x, "b (d p) (h q) (w r) c -> b d h w (p q r c)", p=2, q=2, r=2)
        return self.reduction(self.norm(x))


class ConvStem(nn.Module):
    """Patch embedding as a small conv stem: log2(patch_size) stride-2 convs (3³ kernels).

    (B, C_in, D, H, W) -> list of feature maps at strides 2, 4, ..., patch_size, channels-first;
    the last one is the token grid. A conv stem (as in nnFormer) instead of one strided
    projection keeps the intermediate maps, which the decoder uses as high-resolution skips.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        n = int(patch_size).bit_length() - 1
        if patch_size < 2 or 2**n != patch_size:
            raise ValueError(f"patch_size must be a power of two >= 2, got {patch_size}")
        chans = [in_channels] + [max(dim // 2 ** (n - 1 - i), 8) for i in range(n)]
        chans[-1] = dim
        self.stages = nn.ModuleList()
        for i in range(n):
            layers: list[nn.Module] = [nn.Conv3d(chans[i], chans[i + 1], 3, stride=2, padding=1)]
            if i < n - 1:
                layers += [nn.InstanceNorm3d(chans[i + 1], affine=True), nn.GELU()]
            self.stages.append(nn.Sequential(*layers))
        self.channels = chans[1:]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class UpSample(nn.Module):
    """Transposed convolution with kernel = stride = 2: (B, C_in, D, H, W) -> (B, C_out, 2D, 2H, 2W).

    Written as a pointwise linear map to 8 C_out values per voxel followed by a voxel shuffle.
    Since a stride-2 kernel-2 transposed convolution's kernels do not overlap, this is the same
    function as ConvTranspose3d(C_in, C_out, 2, stride=2) (plus a bias per sub-voxel position),
    and PyTorch's CPU ConvTranspose3d is several times slower on these shapes.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.proj = nn.Conv3d(in_channels, out_channels * 8, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return rearrange(y, "b (c p q r) d h w -> b c (d p) (h q) (w r)", p=2, q=2, r=2, c=self.out_channels)
