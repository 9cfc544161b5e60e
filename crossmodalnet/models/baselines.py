"""The baselines under the common call `model(image, present)`, by early fusion.

From MONAI: Swin-UNETR, MedNeXt, UNETR, UNet, DynUNet (nnU-Net's network). Implemented here from
their papers (no maintained package): nnFormer (`nnformer.py`), VT-UNet (`vtunet.py`), 3D Swin-Unet (`swinunet.py`).

Every model here is called `model(image, present=None)` with `image` (B, M, D, H, W), M =
`config.modalities` channels in the dataset's order, and `present` (B, M) bool or None (all
present); it returns logits `(B, out_channels, D, H, W)` at the input size. The channels enter the
network stacked (early fusion, `in_channels = modalities x in_channels`), the way these networks
are used on multimodal data; a missing channel is zeros. Inputs are padded to the multiple each
network needs and cropped back, so any input size works (SwinUNETR, nnFormer, VT-UNet and
Swin-Unet need multiples of 32, MedNeXt of 16). UNet and DynUNet take a plan's per-axis `strides`
(and `kernels`), and pad each axis to the product of its strides only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet
from torch import nn

from crossmodalnet.config import MODEL_SIZES, ModelConfig
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models.nnformer import NnFormer
from crossmodalnet.models.swinunet import SwinUnet
from crossmodalnet.models.vtunet import VTUNet

__all__ = ["EarlyFusion", "BASELINE_SIZES", "DeepSupervisedDynUNet", "build_baseline", "conv_plan"]

# Sizes of the baselines: their entries of the one table of sizes, `config.MODEL_SIZES`.
BASELINE_SIZES: dict[str, dict[str, dict]] = {k: v for k, v in MODEL_SIZES.items() if k != "crossmodalnet"}

# Input edge multiple each network needs.
_MULTIPLE = {"swinunetr": 32, "mednext": 16, "unetr": 16, "unet": 16, "dynunet": 16, "nnformer": 32, "vtunet": 32,
             "swinunet": 32}
Triple = tuple[int, int, int]


def conv_plan(config: ModelConfig) -> tuple[list[Triple], list[Triple], list[int]]:
    """(steps, kernels, channels) of conv model `config.name` ("unet" or "dynunet"): the plan's
    `strides` and `kernels`, or its size's (stride 2 and kernel 3 on every axis); channels per level,
    those of the size, or, when the plan has another number of levels, nnU-Net's rule: the first
    level's channels doubled per level (DynUNet: capped at its size's last, as nnU-Net caps at 320).
    """
    kw = BASELINE_SIZES[config.name][config.size]
    chans = list(kw["filters"] if config.name == "dynunet" else kw["channels"])
    if config.strides is not None:
        steps = [tuple(s) for s in config.strides]
    elif config.name == "unet":
        steps = [(s, s, s) for s in kw["strides"]]
    else:
        steps = [(2, 2, 2)] * (len(chans) - 1)
    levels = len(steps) + 1
    if len(chans) != levels:
        cap = chans[-1] if config.name == "dynunet" else None
        chans = [chans[0] * 2**i if cap is None else min(chans[0] * 2**i, cap) for i in range(levels)]
    kernels = [tuple(k) for k in config.kernels] if config.kernels is not None else [(3, 3, 3)] * levels
    return steps, kernels, chans  # type: ignore[return-value]


class DeepSupervisedDynUNet(DynUNet):
    """MONAI's DynUNet whose deep supervision returns a list [full-res logits, level-1 logits, level-2
    logits, ...], each at its own resolution (the convention of CrossModalNet and `DiceCETerms`),
    instead of MONAI's tensor of the heads upsampled to full size and stacked (B, 1 + n, C, D, H, W).
    Outside training (or without deep supervision): the full-resolution logits (B, C, D, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.output_block(self.skip_layers(x))
        if self.training and self.deep_supervision:
            return [out, *self.heads]  # heads[i]: the decoder's output i + 1 steps down, through its head
        return out


class EarlyFusion(nn.Module):
    """Wrap a single-input network: the channels stacked (missing ones zeroed), pad, run, crop back."""

    def __init__(self, net: nn.Module, multiple: int | Sequence[int], config: ModelConfig,
                 fixed_size: int | None = None, steps: Sequence[Triple] | None = None):
        super().__init__()
        self.net = net
        # Inputs are padded to a multiple of this per axis (D, H, W); an int: every axis.
        self.multiple = multiple
        self.multiples: Triple = (multiple,) * 3 if isinstance(multiple, int) else tuple(multiple)  # type: ignore[assignment]
        # Deep supervision lists (DynUNet) are kept, each level cropped by the product of its steps.
        self.steps = list(steps) if steps is not None else None
        self.fixed_size = fixed_size  # UNETR: absolute position embedding for one input size
        self.config = config

    def forward(self, image: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """image (B, M * in_channels, D, H, W), present (B, M) bool or None -> logits (B, out_channels, D, H, W)
        (DynUNet in training with deep supervision: a list, full resolution first, then one per step down)."""
        m, c_in = self.config.modalities, self.config.in_channels
        if image.ndim != 5 or image.shape[1] != m * c_in:
            raise ValueError(f"image must be (B, {m * c_in}, D, H, W) ({m} channel(s) of {c_in}), "
                             f"got {tuple(image.shape)}")
        x = image
        if present is not None:
            if tuple(present.shape) != (image.shape[0], m):
                raise ValueError(f"present must be (B, M) = ({image.shape[0]}, {m}), got {tuple(present.shape)}")
            present = present.to(device=image.device, dtype=torch.bool)
            if not present.any(dim=1).all():
                raise ValueError("every sample needs at least one present channel")
            # A missing channel is zeros whatever the caller left there: what the network was trained on.
            x = torch.where(present.repeat_interleave(c_in, dim=1)[..., None, None, None], image, 0.0)
        size = x.shape[2:]
        if self.fixed_size is not None:
            if any(s > self.fixed_size for s in size):
                raise ValueError(f"input {tuple(size)} larger than this model's img_size {self.fixed_size}")
            target = [self.fixed_size] * 3
        else:
            target = [-(-s // m) * m for s, m in zip(size, self.multiples, strict=True)]
        pad = []
        for s, t in zip(reversed(size), reversed(target), strict=True):
            pad += [0, t - s]
        y = self.net(F.pad(x, pad) if any(pad) else x)
        if isinstance(y, list | tuple) and self.steps is not None:  # DynUNet's deep supervision: every level
            out = []
            for level, t in enumerate(y):
                f = [math.prod(step[a] for step in self.steps[:level]) for a in range(3)]
                out.append(t[..., : -(-size[0] // f[0]), : -(-size[1] // f[1]), : -(-size[2] // f[2])])
            return out
        if isinstance(y, list | tuple):  # MedNeXt with deep supervision in training
            y = y[0]
        return y[..., : size[0], : size[1], : size[2]]


def build_baseline(config: ModelConfig) -> nn.Module:
    """Build the baseline `config.name` at `config.size` with `modalities x in_channels` input channels."""
    from monai.networks import nets

    name, size = config.name, config.size
    if name not in BASELINE_SIZES:
        raise CrossModalNetError(f"unknown baseline {name!r}; known: {sorted(BASELINE_SIZES)}")
    if size not in BASELINE_SIZES[name]:
        raise CrossModalNetError(f"unknown size {size!r} for {name}; choose from {sorted(BASELINE_SIZES[name])}")
    kw = dict(BASELINE_SIZES[name][size])
    c_in, c_out = config.modalities * config.in_channels, config.out_channels
    fixed, multiple, steps = None, _MULTIPLE[name], None
    if name == "swinunetr":
        net = nets.SwinUNETR(in_channels=c_in, out_channels=c_out, spatial_dims=3, use_v2=True, **kw)
    elif name == "mednext":
        net = nets.MedNeXt(spatial_dims=3, in_channels=c_in, out_channels=c_out, **kw)
    elif name == "unetr":
        fixed = config.img_size
        net = nets.UNETR(in_channels=c_in, out_channels=c_out, img_size=(fixed,) * 3, spatial_dims=3, **kw)
    elif name == "unet":
        if config.strides is not None or config.kernels is not None:  # a plan: per-axis strides, one kernel
            plan, kernels, chans = conv_plan(config)
            kw.update(channels=tuple(chans), strides=tuple(plan), kernel_size=kernels[0], up_kernel_size=kernels[0])
            multiple = tuple(math.prod(s[a] for s in plan) for a in range(3))
        net = nets.UNet(spatial_dims=3, in_channels=c_in, out_channels=c_out, **kw)
    elif name == "dynunet":
        # nnU-Net's network: the first level at stride 1, then the plan's steps; upsampling mirrors them.
        steps, kernels, chans = conv_plan(config)
        levels = len(steps) + 1
        supervised = config.deep_supervision and levels >= 3  # MONAI needs a head below the top
        net = DeepSupervisedDynUNet(
            spatial_dims=3, in_channels=c_in, out_channels=c_out, kernel_size=kernels, strides=[(1, 1, 1), *steps],
            upsample_kernel_size=steps, filters=chans, deep_supervision=supervised,
            deep_supr_num=min(2, levels - 2) if supervised else 1, res_block=False,
        )
        multiple = tuple(math.prod(s[a] for s in steps) for a in range(3))
    elif name == "nnformer":
        net = NnFormer(in_channels=c_in, out_channels=c_out, **kw)
    elif name == "vtunet":
        net = VTUNet(in_channels=c_in, out_channels=c_out, **kw)
    else:
        net = SwinUnet(in_channels=c_in, out_channels=c_out, **kw)
    return EarlyFusion(net, multiple, config, fixed_size=fixed, steps=steps if name == "dynunet" else None)
