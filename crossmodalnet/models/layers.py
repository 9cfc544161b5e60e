"""3D Swin Transformer building blocks (Liu et al. 2021, extended to volumes as in Swin-UNETR).

Tokens are kept channels-last, `(B, D, H, W, C)`, through the encoder. Windows are boxes of (wd, wh, ww) tokens (an int
`window_size` is a cube); volumes of any size are padded up to a multiple of the window and the
padded tokens are masked out as keys, so padding never changes a real token's output. Per-axis
windows, shifts, patch merging and upsampling factors carry anisotropic plans (an axis with window 1
and factor 1 everywhere is the 2D limit: nothing crosses it).

Bottom-up: pure helpers (`window_partition`, `window_reverse`, `window_mask`), then
`RelativePositionBias`, `window_attention`, `WindowAttention`, `Mlp`, `SwinBlock`,
`PatchMerging`, `ConvStem`, `UpSample`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.networks.layers import DropPath
from torch import nn

__all__ = [
    "Triple",
    "triple",
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


Triple = tuple[int, int, int]


def triple(value: int | Sequence[int]) -> Triple:
    """An int or a (D, H, W) sequence -> a (D, H, W) tuple of ints (an int applies to every axis)."""
    if isinstance(value, int):
        return (value,) * 3
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"expected an int or three values (D, H, W), got {value!r}")
    return out  # type: ignore[return-value]


def window_partition(x: torch.Tensor, ws: int | Sequence[int]) -> torch.Tensor:
    """(B, D, H, W, C) with D, H, W multiples of ws = (wd, wh, ww) -> (B * nW, wd*wh*ww, C), windows in raster order."""
    p, q, r = triple(ws)
    return rearrange(x, "b (d p) (h q) (w r) c -> (b d h w) (p q r) c", p=p, q=q, r=r)


def window_reverse(windows: torch.Tensor, ws: int | Sequence[int], shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nW, wd*wh*ww, C) -> (B, D, H, W, C); shape = (B, D, H, W)."""
    b, d, h, w = shape
    p, q, r = triple(ws)
    return rearrange(
        windows, "(b d h w) (p q r) c -> b (d p) (h q) (w r) c", b=b, d=d // p, h=h // q, w=w // r,
        p=p, q=q, r=r,
    )


def pad_to_windows(x: torch.Tensor, ws: int | Sequence[int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad (B, D, H, W, C) at the far end of each spatial axis to a multiple of ws (int or per axis)."""
    d, h, w = x.shape[1:4]
    pads = tuple((-s) % k for s, k in zip((d, h, w), triple(ws), strict=True))
    if any(pads):
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    return x, pads


def window_mask(
    size: tuple[int, int, int], padded: tuple[int, int, int], ws: int | Sequence[int], shift: int | Sequence[int],
    device: torch.device,
) -> torch.Tensor | None:
    """Additive attention mask (nW, N, N) for windows of a padded, optionally shifted volume.

    A key is masked when it is a padded token, or (shifted windows) when it comes from a
    different region of the cyclically rolled volume than the query: the Swin mask. ws and shift
    are ints (every axis) or per axis (D, H, W); an axis with shift 0 has one region.
    Returns None when nothing needs masking.
    """
    ws, shift = triple(ws), triple(shift)
    if not any(shift) and padded == size:
        return None
    dp, hp, wp = padded
    region = torch.zeros((1, dp, hp, wp, 1), device=device)
    if any(shift):
        cnt = 0
        spans = [(slice(0, -w), slice(-w, -s), slice(-s, None)) if s > 0 else (slice(None),)
                 for w, s in zip(ws, shift, strict=True)]
        for sd in spans[0]:
            for sh in spans[1]:
                for sw in spans[2]:
                    region[:, sd, sh, sw, :] = cnt
                    cnt += 1
    is_pad = torch.ones((1, dp, hp, wp, 1), device=device)
    is_pad[:, : size[0], : size[1], : size[2], :] = 0
    if any(shift):
        is_pad = torch.roll(is_pad, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    region_w = window_partition(region, ws).squeeze(-1)  # nW, N
    pad_w = window_partition(is_pad, ws).squeeze(-1)  # nW, N
    mask = (region_w.unsqueeze(1) != region_w.unsqueeze(2)) | (pad_w.unsqueeze(1) > 0)  # nW, N(q), N(k)
    return torch.zeros(mask.shape, device=device).masked_fill(mask, _MASKED)


class RelativePositionBias(nn.Module):
    """Learned bias per head for each of the (2 wd - 1)(2 wh - 1)(2 ww - 1) relative offsets inside a
    window of (wd, wh, ww) tokens (an int window_size: a cube).

    forward() -> (heads, N, N) with N = wd * wh * ww.
    """

    def __init__(self, window_size: int | Sequence[int], num_heads: int):
        super().__init__()
        ws = triple(window_size)
        self.table = nn.Parameter(torch.zeros(math.prod(2 * w - 1 for w in ws), num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in ws], indexing="ij")).flatten(1)  # 3, N
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + torch.tensor(ws).sub(1)  # N, N, 3
        index = (rel[..., 0] * (2 * ws[1] - 1) + rel[..., 1]) * (2 * ws[2] - 1) + rel[..., 2]
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
        return _attention(q, k, v, bias.unsqueeze(0))  # 1, heads, N, N
    n_w, (bn, heads, n, _), n_k = mask.shape[0], q.shape, k.shape[2]
    if bn != batch * n_w:
        raise ValueError(f"q has {bn} windows, expected batch {batch} x {n_w} windows of the mask")
    attn_mask = (bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)).reshape(1, n_w * heads, n, n_k)

    # q, k, v are permuted views of the projections, so this copies them: B·nW·heads·N·d values each,
    # N/d times fewer than the B·nW·heads·N·N of a repeated mask.
    def fold(t: torch.Tensor) -> torch.Tensor:  # (B * nW, heads, N, d) -> (B, nW * heads, N, d)
        return t.reshape(batch, n_w * heads, t.shape[2], t.shape[3])

    out = _attention(fold(q), fold(k), fold(v), attn_mask)
    return out.reshape(bn, heads, n, out.shape[-1])


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax(q kᵀ/√d + mask) v: `F.scaled_dot_product_attention`, written out where that is slower.

    Training on the CPU: the fused CPU kernel computes no gradient for an additive mask (here the
    learned relative position bias), so SDPA falls back to its math path, which adds a NaN-safe
    softmax (an `all`, an `isneginf` and a `where` per call); the same product written out is
    faster forward and backward (docs/benchmarks.md, "Performance work"). Its masks are finite
    (`_MASKED`), so no row is all -inf.
    """
    if q.device.type == "cpu" and torch.is_grad_enabled() and (mask.requires_grad or q.requires_grad):
        scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1)) + mask
        return torch.matmul(scores.softmax(dim=-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with 3D relative position bias (Swin's W-MSA)."""

    def __init__(self, dim: int, num_heads: int, window_size: int | Sequence[int], qkv_bias: bool = True):
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
    """Shared machinery: pad, roll, partition, (attend), reverse, roll back, crop; mask cache.

    `window` is the per-axis window (wd, wh, ww); `shift_size` the per-axis shift of shifted
    windows, window // 2 on each axis (0 where the window is 1: nothing to shift).
    """

    def __init__(self, window_size: int | Sequence[int], shift: bool):
        super().__init__()
        self.window_size = window_size  # as given (an int for the cube of the original blocks)
        self.window = triple(window_size)
        self.shift_size: Triple = tuple(w // 2 if shift else 0 for w in self.window)  # type: ignore[assignment]
        self._mask_cache: dict[tuple, torch.Tensor | None] = {}

    def _shift(self, size: tuple[int, int, int]) -> Triple:
        # No shift when the whole volume fits in one window (nothing to connect across borders).
        fits = all(s <= w for s, w in zip(size, self.window, strict=True))
        return (0, 0, 0) if fits else self.shift_size

    def padded(self, size: tuple[int, int, int]) -> Triple:
        """Spatial size (D, H, W) rounded up to a multiple of the window on each axis."""
        return tuple(s + (-s) % w for s, w in zip(size, self.window, strict=True))  # type: ignore[return-value]

    def _mask(self, size, padded, shift, device) -> torch.Tensor | None:
        key = (size, padded, triple(shift), str(device))
        if key not in self._mask_cache:
            self._mask_cache[key] = window_mask(size, padded, self.window, shift, device)
        return self._mask_cache[key]

    def to_windows(self, x: torch.Tensor, shift: int | Triple) -> torch.Tensor:
        """(B, D, H, W, C) -> (B * nW, N, C) after padding and the cyclic shift (per axis)."""
        x, _ = pad_to_windows(x, self.window)
        shift = triple(shift)
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        return window_partition(x, self.window)

    def from_windows(self, w: torch.Tensor, shift: int | Triple, padded_shape, size) -> torch.Tensor:
        x = window_reverse(w, self.window, padded_shape)
        shift = triple(shift)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        return x[:, : size[0], : size[1], : size[2]]


class SwinBlock(_Windowed):
    """Swin Transformer block, pre-norm as Swin defines it (docs/design.md section 2; not the paper's Eq. 2):

        x = x + MSA(LN(x));  x = x + MLP(LN(x))

    with window (shift=False) or shifted-window (shift=True) attention.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int | Sequence[int], shift: bool,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0):
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
        padded = self.padded(size)
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

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int | Sequence[int], mlp_ratio: float,
                 drop_path: list[float]):
        super().__init__(*[
            SwinBlock(dim, num_heads, window_size, shift=i % 2 == 1, mlp_ratio=mlp_ratio, drop_path=drop_path[i])
            for i in range(depth)
        ])


class PatchMerging(nn.Module):
    """Halve the grid along the axes of `factors` (2 merges two tokens there, 1 keeps the axis), double
    the channels: concat each f_d x f_h x f_w neighbourhood (n C), LN, Linear(n C -> 2C).

    (B, D, H, W, C) -> (B, ceil(D/f_d), ceil(H/f_h), ceil(W/f_w), 2C); odd sizes are zero-padded.
    The default (2, 2, 2) is Swin's 2x2x2 merge.
    """

    def __init__(self, dim: int, factors: int | Sequence[int] = 2):
        super().__init__()
        self.factors = triple(factors)
        n = math.prod(self.factors)
        self.norm = nn.LayerNorm(n * dim)
        self.reduction = nn.Linear(n * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q, r = self.factors
        x, _ = pad_to_windows(x, self.factors)
        x = rearrange(x, "b (d p) (h q) (w r) c -> b d h w (p q r c)", p=p, q=q, r=r)
        return self.reduction(self.norm(x))


class ConvStem(nn.Module):
    """Patch embedding as a small conv stem: log2(patch_size) strided convs (3³ kernels by default).

    (B, C_in, D, H, W) -> list of feature maps after each conv (strides 2, 4, ..., patch_size on
    every axis by default), channels-first; the last one is the token grid. A conv stem (as in
    nnFormer) instead of one strided projection keeps the intermediate maps, which the decoder uses
    as high-resolution skips. strides: per conv, the stride per axis (1 or 2); kernels: per conv,
    the kernel per axis (3 or 1; padding keeps the size, so a 1-voxel axis works with either).
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int,
                 strides: Sequence[Sequence[int]] | None = None, kernels: Sequence[Sequence[int]] | None = None):
        super().__init__()
        n = int(patch_size).bit_length() - 1
        if patch_size < 2 or 2**n != patch_size:
            raise ValueError(f"patch_size must be a power of two >= 2, got {patch_size}")
        strides = [triple(s) for s in strides] if strides is not None else [(2, 2, 2)] * n
        kernels = [triple(k) for k in kernels] if kernels is not None else [(3, 3, 3)] * n
        if len(strides) != n or len(kernels) != n:
            raise ValueError(f"a stem of patch_size {patch_size} has {n} convs: give {n} strides and kernels, "
                             f"got {len(strides)} and {len(kernels)}")
        chans = [in_channels] + [max(dim // 2 ** (n - 1 - i), 8) for i in range(n)]
        chans[-1] = dim
        self.strides = strides
        self.stages = nn.ModuleList()
        for i in range(n):
            # An int kernel/stride/padding where the conv is isotropic: the module (and its repr) as before.
            k, st = kernels[i], strides[i]
            conv = (nn.Conv3d(chans[i], chans[i + 1], 3, stride=2, padding=1) if (k, st) == ((3, 3, 3), (2, 2, 2))
                    else nn.Conv3d(chans[i], chans[i + 1], k, stride=st, padding=tuple(x // 2 for x in k)))
            layers: list[nn.Module] = [conv]
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
    """Transposed convolution with kernel = stride = factors (2 or 1 per axis):
    (B, C_in, D, H, W) -> (B, C_out, f_d D, f_h H, f_w W); the default (2, 2, 2) doubles every axis.

    Written as a pointwise linear map to f_d f_h f_w C_out values per voxel followed by a voxel
    shuffle. Since a kernel = stride transposed convolution's kernels do not overlap, this is the same
    function as ConvTranspose3d(C_in, C_out, factors, stride=factors) (plus a bias per sub-voxel
    position), and PyTorch's CPU ConvTranspose3d is several times slower on these shapes.
    """

    def __init__(self, in_channels: int, out_channels: int, factors: int | Sequence[int] = 2):
        super().__init__()
        self.out_channels = out_channels
        self.factors = triple(factors)
        self.proj = nn.Conv3d(in_channels, out_channels * math.prod(self.factors), kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        p, q, r = self.factors
        return rearrange(y, "b (c p q r) d h w -> b c (d p) (h q) (w r)", p=p, q=q, r=r, c=self.out_channels)
