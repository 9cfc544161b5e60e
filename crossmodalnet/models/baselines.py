"""The baselines under the common call `model(image, present)`, by early fusion.

From MONAI: Swin-UNETR, MedNeXt, UNETR, UNet. Implemented here from their papers (no maintained
package): nnFormer (`nnformer.py`), VT-UNet (`vtunet.py`), 3D Swin-Unet (`swinunet.py`).

Every model here is called `model(image, present=None)` with `image` (B, M, D, H, W), M =
`config.modalities` channels in the dataset's order, and `present` (B, M) bool or None (all
present); it returns logits `(B, out_channels, D, H, W)` at the input size. The channels enter the
network stacked (early fusion, `in_channels = modalities x in_channels`), the way these networks
are used on multimodal data; a missing channel is zeros. Inputs are padded to the multiple each
network needs and cropped back, so any input size works (SwinUNETR, nnFormer, VT-UNet and
Swin-Unet need multiples of 32, MedNeXt of 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crossmodalnet.config import MODEL_SIZES, ModelConfig
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models.nnformer import NnFormer
from crossmodalnet.models.swinunet import SwinUnet
from crossmodalnet.models.vtunet import VTUNet

__all__ = ["EarlyFusion", "BASELINE_SIZES", "build_baseline"]

# Sizes of the baselines: their entries of the one table of sizes, `config.MODEL_SIZES`.
BASELINE_SIZES: dict[str, dict[str, dict]] = {k: v for k, v in MODEL_SIZES.items() if k != "crossmodalnet"}

# Input edge multiple each network needs.
_MULTIPLE = {"swinunetr": 32, "mednext": 16, "unetr": 16, "unet": 16, "nnformer": 32, "vtunet": 32, "swinunet": 32}


class EarlyFusion(nn.Module):
    """Wrap a single-input network: the channels stacked (missing ones zeroed), pad, run, crop back."""

    def __init__(self, net: nn.Module, multiple: int, config: ModelConfig, fixed_size: int | None = None):
        super().__init__()
        self.net = net
        self.multiple = multiple
        self.fixed_size = fixed_size  # UNETR: absolute position embedding for one input size
        self.config = config

    def forward(self, image: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """image (B, M * in_channels, D, H, W), present (B, M) bool or None -> logits (B, out_channels, D, H, W)."""
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
            target = [-(-s // self.multiple) * self.multiple for s in size]
        pad = []
        for s, t in zip(reversed(size), reversed(target), strict=True):
            pad += [0, t - s]
        y = self.net(F.pad(x, pad) if any(pad) else x)
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
    fixed = None
    if name == "swinunetr":
        net = nets.SwinUNETR(in_channels=c_in, out_channels=c_out, spatial_dims=3, use_v2=True, **kw)
    elif name == "mednext":
        net = nets.MedNeXt(spatial_dims=3, in_channels=c_in, out_channels=c_out, **kw)
    elif name == "unetr":
        fixed = config.img_size
        net = nets.UNETR(in_channels=c_in, out_channels=c_out, img_size=(fixed,) * 3, spatial_dims=3, **kw)
    elif name == "unet":
        net = nets.UNet(spatial_dims=3, in_channels=c_in, out_channels=c_out, **kw)
    elif name == "nnformer":
        net = NnFormer(in_channels=c_in, out_channels=c_out, **kw)
    elif name == "vtunet":
        net = VTUNet(in_channels=c_in, out_channels=c_out, **kw)
    else:
        net = SwinUnet(in_channels=c_in, out_channels=c_out, **kw)
    return EarlyFusion(net, _MULTIPLE[name], config, fixed_size=fixed)
