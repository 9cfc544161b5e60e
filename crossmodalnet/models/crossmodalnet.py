"""CrossModalNet: a 3D Swin encoder with one stream per input channel, Cross Transformer blocks
between the streams, and a U-shaped decoder.

Paper: "CrossModalNet: Multimodal Medical Segmentation with Guaranteed Cross-Modal Flow and
Domain Adaptability" (section 2.1, Eq. 1-3, Def. 1-3), built as docs/design.md section 2 fixes it,
for M = `config.modalities` input channels (the paper's CT and MR are M = 2):

    for each channel m:  conv stem -> tokens at stride `patch_size`
    for each stage s:   F_m = SwinStage_s^m(F_m)                            (Def. 1, separate weights)
                        F_0..F_{M-1} = CrossTransformerBlock_s(F_0..F_{M-1})  (Eq. 3, Def. 2, Def. 3)
                        skip_s = concat(F_0, ..., F_{M-1}); F_m = PatchMerging(F_m) unless last
    decoder: from the deepest fused map, upsample (transposed conv) + concat skip + residual conv
             block at every scale down to the input resolution; a 1x1 head gives the logits.

With M = 1 it is a single-stream Swin U-Net (no cross blocks). Any input size: the volume is
zero-padded to a multiple of the coarsest stride (per axis), then cropped back.

Per-axis plans (`config.strides`, a per-axis `config.window_size`): the first log2(patch_size)
steps are the stem's convs, the next len(depths) - 1 the patch mergings, each halving only the axes
whose step says 2; the decoder's upsamplings mirror them, windows and shifts are per axis. A conv
is 1 (not 3) along an axis that no step up to its level has downsampled while another axis was
(a thin axis: slices are not mixed before the tokens); with window 1 on it too, the axis is never
mixed at all: the 2D limit of the same code. A missing channel
(`present[b, m]` False) is replaced by that stream's learned placeholder features, per sample;
with `modality_dropout > 0`, training drops one present channel per sample (never the last one)
so that the placeholders are learned and inference with missing channels works.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetResBlock
from monai.networks.blocks.convolutions import Convolution
from torch import nn

from crossmodalnet.config import ModelConfig
from crossmodalnet.models.cross_attention import CrossTransformerBlock
from crossmodalnet.models.layers import ConvStem, PatchMerging, SwinStage, Triple, UpSample, drop_path_schedule

__all__ = ["CrossModalNet", "plan_steps", "plan_kernels"]

_NORM = ("instance", {"affine": True})
_ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def plan_steps(cfg: ModelConfig) -> list[Triple]:
    """The model's downsampling steps, per axis (D, H, W): `cfg.strides`, or 2 on every axis at each of
    the log2(patch_size) stem convs and len(depths) - 1 patch mergings."""
    n = cfg.patch_size.bit_length() - 1 + len(cfg.depths) - 1
    return [tuple(s) for s in cfg.strides] if cfg.strides is not None else [(2, 2, 2)] * n


def plan_kernels(steps: list[Triple]) -> list[Triple]:
    """Conv kernel per axis at each resolution level 0 .. len(steps) (level l: after l steps).

    1 along an axis that none of the steps up to level l + 1 downsampled while some other axis was
    downsampled at step 0 (a thin axis, not yet pooled: nnU-Net's rule of kernel 1 along the coarse
    axis until the others catch up), else 3. Level l's conv is the stem conv that takes step l, or
    the decoder block at level l. Isotropic steps: 3 everywhere.
    """
    thin = [steps[0][a] == 1 and max(steps[0]) == 2 for a in range(3)] if steps else [False] * 3
    out = []
    for level in range(len(steps) + 1):
        upto = steps[: level + 1]
        out.append(tuple(1 if thin[a] and all(s[a] == 1 for s in upto) else 3 for a in range(3)))
    return out


class _Stream(nn.Module):
    """One channel's encoder: conv stem, then Swin stages with patch merging between them."""

    def __init__(self, cfg: ModelConfig, dims: list[int], drop_path: list[list[float]], placeholders: bool = True):
        super().__init__()
        steps, kernels = plan_steps(cfg), plan_kernels(plan_steps(cfg))
        p = cfg.patch_size.bit_length() - 1
        self.stem = ConvStem(cfg.in_channels, dims[0], cfg.patch_size, strides=steps[:p], kernels=kernels[:p])
        self.stages = nn.ModuleList(
            SwinStage(dims[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio, drop_path[i])
            for i in range(len(dims))
        )
        self.merges = nn.ModuleList(PatchMerging(dims[i], steps[p + i]) for i in range(len(dims) - 1))
        # Learned stand-ins for the stem's outputs when this channel is missing (one vector per level);
        # none for a single-channel model, whose one channel is never missing.
        self.placeholders = nn.ParameterList(
            nn.Parameter(torch.zeros(c)) for c in (self.stem.channels if placeholders else ()))


class _UpBlock(nn.Module):
    """Upsample by `factors` (x2 per axis by default; a transposed conv), concat the fused skip, then a
    residual conv block (MONAI) of `kernel`, or one convolution when `light`; `channels_last` runs the
    block in that memory format."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, light: bool = False,
                 channels_last: bool = False, factors: Triple = (2, 2, 2), kernel: Triple = (3, 3, 3)):
        super().__init__()
        self.out_channels = out_channels
        self.channels_last = channels_last
        self.up = UpSample(in_channels, out_channels, factors)
        c = out_channels + skip_channels
        k = 3 if kernel == (3, 3, 3) else kernel  # an int where isotropic: the modules as before
        # At high resolution one conv (not a residual pair) keeps CPU time in check.
        self.block = (
            Convolution(3, c, out_channels, kernel_size=k, norm=_NORM, act=_ACT)
            if light else UnetResBlock(3, c, out_channels, kernel_size=k, stride=1, norm_name=_NORM)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.up(x), skip], dim=1)
        if self.channels_last:
            # Few channels at full resolution: oneDNN runs these convolutions (and the 1x1 head
            # after them) 2-10x faster channels-last than channels-first on the CPU (docs/benchmarks.md).
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.block(x)


class CrossModalNet(nn.Module):
    """forward(image (B, M * in_channels, D, H, W), present (B, M) bool or None) -> logits (B, out_channels, D, H, W).

    M = `config.modalities`, channels in the dataset's order; `present[b, m]` False marks channel m
    of sample b as missing (its values are ignored; learned placeholders stand in). None: all present.
    In training with `deep_supervision`, returns a list [full-res logits, stride-2 logits,
    stride-4 logits] (coarser ones at their own resolution, for MONAI's DeepSupervisionLoss; with a
    plan, after the first one and two steps, per axis).
    """

    # The missing-channel placeholders get no gradient in a step where no channel is missing
    # (every step without modality dropout; the finer ones never under fine_skips "reference"), and
    # dropout leaves a stream's parameters out of some steps: DDP must look for unused parameters.
    may_leave_parameters_unused = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config
        n = len(cfg.depths)
        m = cfg.modalities
        # The configuration was validated by its schema (`crossmodalnet.config.ModelConfig`).
        self.config = cfg
        self.modalities = m
        dims = [cfg.feature_size * 2**i for i in range(n)]
        steps = plan_steps(cfg)  # per axis; the decoder's upsamplings mirror them
        kernels = plan_kernels(steps)  # per level, 0 = full resolution
        self.steps = steps
        drop_path = drop_path_schedule(cfg.depths, cfg.drop_path_rate)
        # Built in channel order: with the same seed, M = 2 draws the same weights as the CT/MR model did.
        self.streams = nn.ModuleList(_Stream(cfg, dims, drop_path, placeholders=m > 1) for _ in range(m))
        # self.cross[j] follows stage cross_first_stage + j (the finest stages are the dearest to cross).
        self.cross = nn.ModuleList(
            CrossTransformerBlock(
                dims[i], cfg.num_heads[i], cfg.window_size, shift=i % 2 == 1, variant=cfg.cross_attention,
                deformable=cfg.uses_deformable, num_points=cfg.deformable_points, max_offset=cfg.max_offset,
                mlp_ratio=cfg.mlp_ratio, streams=m,
            )
            for i in range(cfg.first_cross_stage, n)
        ) if cfg.cross_blocks and m > 1 else None
        # Decoder, coarse to fine. Skips from a Cross Transformer block (and all of them without
        # cross blocks) are all streams' (hence M x); the finer ones, without a cross block behind
        # them, one stream's or all (`fine_skips`).
        stem_ch = self.streams[0].stem.channels[:-1]  # stride 2 .. patch_size/2 maps
        k = 1 if cfg.skip_source == "reference" else m
        self.reference_stages = cfg.first_cross_stage if self.cross is not None and k == 1 else 0
        # The fused map of each encoder stage passes through a named identity, so that a feature tap
        # (JADA's discriminators, `crossmodalnet.train.adapt`) reads it by name: `fused_skips[stage]`.
        self.fused_skips = nn.ModuleList(nn.Identity() for _ in range(n))
        deepest = kernels[-1]
        self.bottleneck = UnetResBlock(3, m * dims[-1], dims[-1], kernel_size=3 if deepest == (3, 3, 3) else deepest,
                                       stride=1, norm_name=_NORM)
        p = len(stem_ch) + 1  # stem convs: the token grid is at level p
        # Up block into level l undoes step l (steps[l]) and convolves at level l.
        ups: list[_UpBlock] = [_UpBlock(dims[i + 1], (1 if i < self.reference_stages else m) * dims[i], dims[i],
                                        factors=steps[p + i], kernel=kernels[p + i])
                               for i in reversed(range(n - 1))]
        chans = [dims[0], *reversed(stem_ch)]
        # The finest `light_decoder_levels` blocks (full resolution first) use one convolution
        # instead of a residual pair: at high resolution the pair costs most of the FLOPs.
        light = [len(stem_ch) - j < cfg.light_decoder_levels for j in range(len(stem_ch))]
        ups += [_UpBlock(chans[j], k * chans[j + 1], chans[j + 1], light=light[j], factors=steps[p - 1 - j],
                         kernel=kernels[p - 1 - j]) for j in range(len(stem_ch))]
        # The full-resolution block counts as the finest light level: light (one conv, half the width of
        # the level above) unless `light_decoder_levels` is 0: a residual pair as wide as the stride-2
        # level, for thin-walled anatomy where a 2D plan can afford it (not better on MyoPS so far: docs/model.md).
        full_light = cfg.light_decoder_levels > 0
        full = max(chans[-1] // 2, 8) if full_light else chans[-1]
        ups.append(_UpBlock(chans[-1], k * cfg.in_channels, full, light=full_light, channels_last=True,
                            factors=steps[0], kernel=kernels[0]))
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
        # Inputs are padded to a multiple of the product of the steps, per axis (D, H, W). `divisor`,
        # the largest, is a multiple of each (powers of two): callers padding every axis to it stay right.
        self.divisors: Triple = tuple(math.prod(s[a] for s in steps) for a in range(3))  # type: ignore[assignment]
        self.divisor = max(self.divisors)

    @property
    def supports_missing_modality(self) -> bool:
        """True when trained with modality dropout, so that the placeholders mean something."""
        return self.config.modality_dropout > 0

    def check_inputs(self, image: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        """Validate (image, present); returns present as a (B, M) bool tensor on the image's device."""
        c = self.modalities * self.config.in_channels
        if image.ndim != 5 or image.shape[1] != c:
            raise ValueError(f"image must be (B, {c}, D, H, W) ({self.modalities} channel(s) of "
                             f"{self.config.in_channels}), got {tuple(image.shape)}")
        b = image.shape[0]
        if present is None:
            return torch.ones(b, self.modalities, dtype=torch.bool, device=image.device)
        if tuple(present.shape) != (b, self.modalities):
            raise ValueError(f"present must be (B, M) = ({b}, {self.modalities}), got {tuple(present.shape)}")
        present = present.to(device=image.device, dtype=torch.bool)
        if not present.any(dim=1).all():
            raise ValueError("every sample needs at least one present channel")
        return present

    def drop_masks(self, present: torch.Tensor) -> torch.Tensor | None:
        """Channels (B, M) bool to drop in training: per sample, with probability p, one channel chosen
        uniformly among the present ones, and only where more than one is present. None when not training.

        One uniform r per sample (`torch.rand(B)`): r < p drops, and the k-th present channel is chosen
        when p k / n <= r < p (k + 1) / n (n present channels); with two channels that is today's
        r < p/2 -> channel 0, p/2 <= r < p -> channel 1.
        """
        p = self.config.modality_dropout
        if not self.training or p <= 0:
            return None
        b = present.shape[0]
        r = torch.rand(b, device=present.device)
        count = present.sum(dim=1)
        choice = torch.zeros(b, dtype=torch.long, device=present.device)
        for n in range(2, self.modalities + 1):
            # Thresholds as Python floats, one comparison each: for n = 2 exactly `r >= p / 2`.
            k = sum((r >= p * j / n).long() for j in range(1, n))
            choice = torch.where(count == n, k, choice)
        rank = present.long().cumsum(dim=1) - 1  # rank of each present channel among the present ones
        hit = present & (rank == choice.unsqueeze(1))
        return hit & ((r < p) & (count > 1)).unsqueeze(1)

    def _stem(self, stream: _Stream, x: torch.Tensor, missing: torch.Tensor) -> list[torch.Tensor]:
        """Stem maps (channels-first) of one channel x (B, in_channels, D, H, W), with the placeholders
        for the samples where `missing` (B,) is True."""
        if bool(missing.all()):  # nothing to compute: every sample takes the placeholders
            b, size = x.shape[0], x.shape[2:]
            shapes, level = [], list(size)
            for step in self.steps[: len(stream.placeholders)]:  # the stem maps' sizes, per axis
                level = [s // f for s, f in zip(level, step, strict=True)]
                shapes.append(tuple(level))
            return [ph.view(1, -1, 1, 1, 1).expand(b, -1, *shape)
                    for ph, shape in zip(stream.placeholders, shapes, strict=True)]
        feats = stream.stem(x)
        if bool(missing.any()):
            m = missing.view(-1, 1, 1, 1, 1)
            feats = [torch.where(m, ph.view(1, -1, 1, 1, 1).to(f.dtype), f)
                     for f, ph in zip(feats, stream.placeholders, strict=True)]
        return feats

    def encode(self, image: torch.Tensor, present: torch.Tensor | None = None, keep_layers: bool = False):
        """Run every stream. `image` (B, M * in_channels, D, H, W) must already be padded to a multiple
        of `self.divisors` on each axis; `present` (B, M) bool or None (all present).

        Returns (stems, skips, inputs, layers) with k = M for `fine_skips` "both" (all channels side
        by side), 1 for "reference" (per sample the first present channel's):
        stems: stem maps (B, k C_s, ...) after stem convs 1 .. log2(patch_size) - 1; skips: per stage (B, M C, d, h, w)
        (all streams; (B, C, ...) the reference's for a stage before the first Cross Transformer
        block when k = 1); inputs: (B, k in_channels, D, H, W), the image with missing channels zeroed;
        layers (if keep_layers): [(name, [tokens (B, d, h, w, C) of each stream]), ...] after every
        stage and cross block, for the information-flow analysis.
        """
        all_given = present is None
        present = self.check_inputs(image, present)
        drop = self.drop_masks(present)
        alive = present if drop is None else present & ~drop  # (B, M): channels the network sees
        # Without missing or dropped channels, no per-sample selection (and no device sync) is needed.
        everything = all_given and drop is None or bool(alive.all())
        m, c_in = self.modalities, self.config.in_channels
        first = alive.long().argmax(dim=1)  # first channel present: the reference of `fine_skips`

        def reference(maps: list[torch.Tensor]) -> torch.Tensor:
            """Per sample the reference channel's map (batch on dim 0)."""
            if everything:
                return maps[0]
            if bool((first == first[0]).all()):
                return maps[int(first[0])]
            out = maps[-1]
            for i in reversed(range(m - 1)):
                out = torch.where((first == i).view(-1, *[1] * (out.dim() - 1)), maps[i], out)
            return out

        xs = list(image.split(c_in, dim=1))
        if not everything:  # missing and dropped channels are zeros, whatever the caller put there
            xs = [torch.where(alive[:, i].view(-1, 1, 1, 1, 1), x, 0.0) for i, x in enumerate(xs)]
        stems = [s.stem(x) if everything else self._stem(s, x, ~alive[:, i])
                 for i, (s, x) in enumerate(zip(self.streams, xs, strict=True))]
        feats = [s[-1].permute(0, 2, 3, 4, 1) for s in stems]  # B, D, H, W, C
        layers, skips = [], []
        for i in range(len(self.streams[0].stages)):
            feats = [s.stages[i](f) for s, f in zip(self.streams, feats, strict=True)]
            if keep_layers:
                layers.append((f"stage{i + 1}", feats))
            if self.cross is not None and i >= self.config.first_cross_stage:
                feats = list(self.cross[i - self.config.first_cross_stage](*feats))
                if keep_layers:
                    layers.append((f"cross{i + 1}", feats))
            if i < self.reference_stages:  # no cross block yet: the other channels would enter unaligned
                skips.append(self.fused_skips[i](reference(feats).permute(0, 4, 1, 2, 3)))
            else:
                skips.append(self.fused_skips[i](torch.cat(feats, dim=-1).permute(0, 4, 1, 2, 3)))
            if i < len(self.streams[0].merges):
                feats = [s.merges[i](f) for s, f in zip(self.streams, feats, strict=True)]
        fine = list(zip(*[s[:-1] for s in stems], strict=True))  # per level, the M streams' maps
        if self.config.skip_source == "reference":
            # Detail finer than the tokens comes from one image on the labels' grid; the other channels
            # reach the decoder through the (deformable) cross-attended token streams, where a few
            # voxels of misregistration are within a window. A sample without channel 0 falls back to
            # its first present channel.
            return [reference(list(level)) for level in fine], skips, reference(xs), layers
        return [torch.cat(level, dim=1) for level in fine], skips, torch.cat(xs, dim=1), layers

    def forward(self, image: torch.Tensor, present: torch.Tensor | None = None):
        self.check_inputs(image, present)  # before padding, so that errors name the caller's shapes
        size = image.shape[2:]
        pad = [(-s) % d for s, d in zip(size, self.divisors, strict=True)]
        if any(pad):
            image = F.pad(image, (0, pad[2], 0, pad[1], 0, pad[0]))
        stems, skips, inputs, _ = self.encode(image, present)
        x = self.bottleneck(skips[-1])
        fine = [*reversed(skips[:-1]), *reversed(stems), inputs]
        outs = []
        for up, skip in zip(self.ups, fine, strict=True):
            x = up(x, skip)
            outs.append(x)
        first, second = self.steps[0], self.steps[1] if len(self.steps) > 1 else (1, 1, 1)
        coarse = self.coarse_head(outs[-2])  # (B, C, D/f, H/f, W/f), f = the first step per axis
        scale = 2 if first == (2, 2, 2) else tuple(float(f) for f in first)
        up = F.interpolate(coarse, scale_factor=scale, mode="trilinear", align_corners=False)
        logits = (self.head(x) + up)[..., : size[0], : size[1], : size[2]]
        if self.ds_heads is not None and self.training:
            # Sizes after the first one and two steps, per axis (strides 2 and 4 without a plan).
            half = [-(-s // f) for s, f in zip(size, first, strict=True)]
            quarter = [-(-s // (f * g)) for s, f, g in zip(size, first, second, strict=True)]
            stride4 = self.ds_heads[0](outs[-3])
            return [logits, coarse[..., : half[0], : half[1], : half[2]],
                    stride4[..., : quarter[0], : quarter[1], : quarter[2]]]
        return logits
