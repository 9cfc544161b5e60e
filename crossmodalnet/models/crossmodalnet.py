"""CrossModalNet: a dual-stream 3D Swin encoder with Cross Transformer blocks and a U-shaped decoder.

Paper: "CrossModalNet: Multimodal Medical Segmentation with Guaranteed Cross-Modal Flow and
Domain Adaptability" (section 2.1, Eq. 1-3, Def. 1-3), built as docs/design.md section 2 fixes it:

    for each modality m in (CT, MR):  conv stem -> tokens at stride `patch_size`
    for each stage s:   F_m = SwinStage_s^m(F_m)                    (Def. 1, separate weights)
                        F_ct, F_mr = CrossTransformerBlock_s(F_ct, F_mr)   (Eq. 3, Def. 2, Def. 3)
                        skip_s = concat(F_ct, F_mr); F_m = PatchMerging(F_m) unless last
    decoder: from the deepest fused map, upsample (transposed conv) + concat skip + residual conv
             block at every scale down to the input resolution; a 1x1 head gives the logits.

Any input size: the volume is zero-padded to a multiple of the coarsest stride, then cropped
back. A missing modality (`ct=None` or `mr=None`) is replaced by learned placeholder features;
with `modality_dropout > 0`, training drops one modality per sample so that the placeholders
are learned and single-modality inference works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetResBlock
from monai.networks.blocks.convolutions import Convolution
from torch import nn

from crossmodalnet.config import ModelConfig
from crossmodalnet.models.cross_attention import CrossTransformerBlock
from crossmodalnet.models.layers import ConvStem, PatchMerging, SwinStage, UpSample, drop_path_schedule

__all__ = ["CrossModalNet"]

_NORM = ("instance", {"affine": True})
_ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


class _Stream(nn.Module):
    """One modality's encoder: conv stem, then Swin stages with patch merging between them."""

    def __init__(self, cfg: ModelConfig, dims: list[int], drop_path: list[list[float]]):
        super().__init__()
        self.stem = ConvStem(cfg.in_channels, dims[0], cfg.patch_size)
        self.stages = nn.ModuleList(
            SwinStage(dims[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio, drop_path[i])
            for i in range(len(dims))
        )
        self.merges = nn.ModuleList(PatchMerging(dims[i]) for i in range(len(dims) - 1))
        # Learned stand-ins for the stem's outputs when this modality is missing (one vector per level).
        self.placeholders = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in self.stem.channels)


class _UpBlock(nn.Module):
    """Upsample x2 (transposed conv), concat the fused skip, then a residual conv block (MONAI), or
    one convolution when `light`; `channels_last` runs the block in that memory format."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, light: bool = False,
                 channels_last: bool = False):
        super().__init__()
        self.out_channels = out_channels
        self.channels_last = channels_last
        self.up = UpSample(in_channels, out_channels)
        c = out_channels + skip_channels
        # At high resolution one conv (not a residual pair) keeps CPU time in check.
        self.block = (
            Convolution(3, c, out_channels, kernel_size=3, norm=_NORM, act=_ACT)
            if light else UnetResBlock(3, c, out_channels, kernel_size=3, stride=1, norm_name=_NORM)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.up(x), skip], dim=1)
        if self.channels_last:
            # Few channels at full resolution: oneDNN runs these convolutions (and the 1x1 head
            # after them) 2-10x faster channels-last than channels-first on the CPU (docs/benchmarks.md).
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.block(x)


class CrossModalNet(nn.Module):
    """forward(ct, mr): (B, in_channels, D, H, W) each (either may be None) -> logits (B, out_channels, D, H, W).

    In training with `deep_supervision`, returns a list [full-res logits, stride-2 logits,
    stride-4 logits] (coarser ones at their own resolution, for MONAI's DeepSupervisionLoss).
    """

    # The missing-modality placeholders get no gradient in a step where no modality is missing
    # (every step without modality dropout; the finer ones never under fine_skips "reference"), and
    # dropout leaves a stream's parameters out of some steps: DDP must look for unused parameters.
    may_leave_parameters_unused = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config
        n = len(cfg.depths)
        # The configuration was validated by its schema (`crossmodalnet.config.ModelConfig`).
        self.config = cfg
        dims = [cfg.feature_size * 2**i for i in range(n)]
        drop_path = drop_path_schedule(cfg.depths, cfg.drop_path_rate)
        self.ct = _Stream(cfg, dims, drop_path)
        self.mr = _Stream(cfg, dims, drop_path)
        # self.cross[j] follows stage cross_first_stage + j (the finest stages are the dearest to cross).
        self.cross = nn.ModuleList(
            CrossTransformerBlock(
                dims[i], cfg.num_heads[i], cfg.window_size, shift=i % 2 == 1, variant=cfg.cross_attention,
                deformable=cfg.deformable, num_points=cfg.deformable_points, max_offset=cfg.max_offset,
                mlp_ratio=cfg.mlp_ratio,
            )
            for i in range(cfg.cross_first_stage, n)
        ) if cfg.cross_blocks else None
        # Decoder, coarse to fine. Skips from a Cross Transformer block (and all of them without
        # cross blocks) are both streams' (hence 2x); the finer ones, without a cross block behind
        # them, one stream's or both (`fine_skips`).
        stem_ch = self.ct.stem.channels[:-1]  # stride 2 .. patch_size/2 maps
        k = 1 if cfg.fine_skips == "reference" else 2
        self.reference_stages = cfg.cross_first_stage if cfg.cross_blocks and k == 1 else 0
        # The fused map of each encoder stage passes through a named identity, so that a feature tap
        # (JADA's discriminators, `crossmodalnet.train.adapt`) reads it by name: `fused_skips[stage]`.
        self.fused_skips = nn.ModuleList(nn.Identity() for _ in range(n))
        self.bottleneck = UnetResBlock(3, 2 * dims[-1], dims[-1], kernel_size=3, stride=1, norm_name=_NORM)
        ups: list[_UpBlock] = [_UpBlock(dims[i + 1], (1 if i < self.reference_stages else 2) * dims[i], dims[i])
                               for i in reversed(range(n - 1))]
        chans = [dims[0], *reversed(stem_ch)]
        # The finest `light_decoder_levels` blocks (full resolution first) use one convolution
        # instead of a residual pair: at high resolution the pair costs most of the FLOPs.
        light = [len(stem_ch) - j < cfg.light_decoder_levels for j in range(len(stem_ch))]
        ups += [_UpBlock(chans[j], k * chans[j + 1], chans[j + 1], light=light[j]) for j in range(len(stem_ch))]
        full = max(chans[-1] // 2, 8)
        ups.append(_UpBlock(chans[-1], k * cfg.in_channels, full, light=True, channels_last=True))
        self.ups = nn.ModuleList(ups)
        # The logits are coarse + fine: a head on the stride-2 decoder map, upsampled, plus a
        # full-resolution correction. Why: the full-resolution map is narrow (`full` channels, to
        # keep CPU time down) and alone it dropped whole classes: measured, after 600 steps the
        # stride-2 head found 80 % of the pulmonary artery while the full-resolution head
        # predicted none of it (docs/model.md).
        self.coarse_head = UnetOutBlock(3, self.ups[-2].out_channels, cfg.out_channels)
        self.head = UnetOutBlock(3, full, cfg.out_channels)
        # Deep supervision: the stride-2 logits above and a head on the stride-4 decoder map.
        self.ds_heads = nn.ModuleList(
            [UnetOutBlock(3, self.ups[-3].out_channels, cfg.out_channels)]
        ) if cfg.deep_supervision else None
        self.divisor = cfg.patch_size * 2 ** (n - 1)

    @property
    def supports_missing_modality(self) -> bool:
        """True when trained with modality dropout, so that the placeholders mean something."""
        return self.config.modality_dropout > 0

    def _drop_masks(self, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-sample booleans (B,) for dropping CT / MR in training; never both."""
        p = self.config.modality_dropout
        if not self.training or p <= 0:
            return None
        r = torch.rand(b, device=device)
        return r < p / 2, (r >= p / 2) & (r < p)

    def _stem(self, stream: _Stream, x: torch.Tensor | None, drop: torch.Tensor | None, like: torch.Tensor):
        """Stem maps (channels-first) of one modality, with placeholders where it is missing/dropped."""
        if x is None:
            b, _, d, h, w = like.shape
            return [
                ph.view(1, -1, 1, 1, 1).expand(b, -1, d // 2 ** (i + 1), h // 2 ** (i + 1), w // 2 ** (i + 1))
                for i, ph in enumerate(stream.placeholders)
            ]
        feats = stream.stem(x)
        if drop is not None:
            m = drop.view(-1, 1, 1, 1, 1)
            feats = [torch.where(m, ph.view(1, -1, 1, 1, 1).to(f.dtype), f) for f, ph in zip(feats, stream.placeholders,
                                                                                               strict=True)]
        return feats

    def encode(self, ct: torch.Tensor | None, mr: torch.Tensor | None, keep_layers: bool = False):
        """Run both streams. Inputs must already be padded to a multiple of `self.divisor`.

        Returns (fine skips: stem maps (B, k C_s, ...) at strides 2 .. patch_size / 2, skips per
        stage (B, 2C, d, h, w) (CT ‖ MR; (B, C, ...) the reference's for a stage before the first Cross
        Transformer block when k = 1), inputs skip (B, k C_in, D, H, W), layers), k = 2 for `fine_skips`
        "both" (CT ‖ MR), 1 for "reference" (CT's, the MR's for a sample whose CT is missing), where
        `layers` (if keep_layers) lists (name, F_ct, F_mr) tokens after every stage and cross block,
        for the information-flow analysis.
        """
        ref = ct if ct is not None else mr
        masks = self._drop_masks(ref.shape[0], ref.device)
        drop_ct, drop_mr = masks if masks is not None else (None, None)

        def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            """The CT's map `a`, or the MR's `b` where the CT is missing or dropped (batch on dim 0)."""
            if ct is None:
                return b
            if drop_ct is None:
                return a
            shape = [1] * a.dim()
            shape[0] = -1
            return torch.where(drop_ct.view(shape), b, a)

        zeros = torch.zeros_like(ref)
        x_ct = zeros if ct is None else (ct if drop_ct is None else ct * (~drop_ct).view(-1, 1, 1, 1, 1))
        x_mr = zeros if mr is None else (mr if drop_mr is None else mr * (~drop_mr).view(-1, 1, 1, 1, 1))
        s_ct = self._stem(self.ct, ct, drop_ct, ref)
        s_mr = self._stem(self.mr, mr, drop_mr, ref)
        fa, fb = s_ct[-1].permute(0, 2, 3, 4, 1), s_mr[-1].permute(0, 2, 3, 4, 1)  # B, D, H, W, C
        layers, skips = [], []
        for i in range(len(self.ct.stages)):
            fa, fb = self.ct.stages[i](fa), self.mr.stages[i](fb)
            if keep_layers:
                layers.append((f"stage{i + 1}", fa, fb))
            if self.cross is not None and i >= self.config.cross_first_stage:
                fa, fb = self.cross[i - self.config.cross_first_stage](fa, fb)
                if keep_layers:
                    layers.append((f"cross{i + 1}", fa, fb))
            if i < self.reference_stages:  # no cross block yet: the MR would enter unaligned
                skips.append(self.fused_skips[i](reference(fa, fb).permute(0, 4, 1, 2, 3)))
            else:
                skips.append(self.fused_skips[i](torch.cat([fa, fb], dim=-1).permute(0, 4, 1, 2, 3)))
            if i < len(self.ct.merges):
                fa, fb = self.ct.merges[i](fa), self.mr.merges[i](fb)
        if self.config.fine_skips == "reference":
            # Detail finer than the tokens comes from the image on the labels' grid; the other modality
            # reaches the decoder through the (deformable) cross-attended token streams, where a few
            # voxels of misregistration are within a window. A sample without CT falls back to the MR.
            stems = [reference(a, b) for a, b in zip(s_ct[:-1], s_mr[:-1], strict=True)]
            return stems, skips, reference(x_ct, x_mr), layers
        stems = [torch.cat([a, b], dim=1) for a, b in zip(s_ct[:-1], s_mr[:-1], strict=True)]
        return stems, skips, torch.cat([x_ct, x_mr], dim=1), layers

    def forward(self, ct: torch.Tensor | None, mr: torch.Tensor | None):
        if ct is None and mr is None:
            raise ValueError("CrossModalNet needs at least one of ct and mr")
        if ct is not None and mr is not None and ct.shape != mr.shape:
            raise ValueError(f"ct {tuple(ct.shape)} and mr {tuple(mr.shape)} must have the same shape")
        size = (ct if ct is not None else mr).shape[2:]
        pad = [(-s) % self.divisor for s in size]
        if any(pad):
            spec = (0, pad[2], 0, pad[1], 0, pad[0])
            ct = F.pad(ct, spec) if ct is not None else None
            mr = F.pad(mr, spec) if mr is not None else None
        stems, skips, inputs, _ = self.encode(ct, mr)
        x = self.bottleneck(skips[-1])
        fine = [*reversed(skips[:-1]), *reversed(stems), inputs]
        outs = []
        for up, skip in zip(self.ups, fine, strict=True):
            x = up(x, skip)
            outs.append(x)
        coarse = self.coarse_head(outs[-2])  # (B, C, D/2, H/2, W/2)
        up = F.interpolate(coarse, scale_factor=2, mode="trilinear", align_corners=False)
        logits = (self.head(x) + up)[..., : size[0], : size[1], : size[2]]
        if self.ds_heads is not None and self.training:
            half, quarter = ([-(-s // f) for s in size] for f in (2, 4))
            stride4 = self.ds_heads[0](outs[-3])
            return [logits, coarse[..., : half[0], : half[1], : half[2]],
                    stride4[..., : quarter[0], : quarter[1], : quarter[2]]]
        return logits
