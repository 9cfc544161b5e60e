"""Run a 2D plan's convolutions as 2D convolutions.

A 2D plan (`crossmodalnet.train.plan`, slices as stored) builds every network with kernel 1, stride 1
and no padding along the slice axis, so no convolution mixes slices: each is a 2D convolution applied
slice by slice. PyTorch's CPU backend (oneDNN) runs the 3D form several times slower than the same
work as a 2D convolution (docs/benchmarks.md, "2D plans run 2D convolutions"), and neither MONAI nor
PyTorch folds a flat axis by itself, hence this module. `fold_flat_axis(model)` finds an axis along
which every convolution of the model is flat and makes each one a `FoldedConv3d` /
`FoldedConvTranspose3d`: the same parameters (5-D, so state dicts and safetensors files are
unchanged), the same function, computed as a 2D convolution with that axis folded into the batch.
Models with any convolution that mixes along every axis (isotropic 3D plans) are left untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FoldedConv3d", "FoldedConvTranspose3d", "flat_axis", "fold_flat_axis"]


def _drop(values: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return tuple(v for i, v in enumerate(values) if i != axis)


def _folded(x: torch.Tensor, axis: int, conv2d) -> torch.Tensor:
    """conv2d applied to every slice of x (B, C, D, H, W) along spatial `axis` (0 = D): (B, C', ...)."""
    dim = 2 + axis
    if x.shape[dim] == 1:  # one slice (a 2D plan's patches): views, no copy
        return conv2d(x.squeeze(dim)).unsqueeze(dim)
    b, s = x.shape[0], x.shape[dim]
    y = conv2d(x.movedim(dim, 1).reshape(b * s, *x.shape[1:dim], *x.shape[dim + 1:]))
    return y.reshape(b, s, *y.shape[1:]).movedim(1, dim)


class FoldedConv3d(nn.Conv3d):
    """A Conv3d flat along spatial `axis` (kernel 1, stride 1, padding 0, dilation 1 there), computed
    as a 2D convolution over the other two axes: (B, C_in, D, H, W) -> (B, C_out, D', H', W')."""

    axis: int

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, folded_axis={self.axis}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:  # unbatched (C, D, H, W): nn.Conv3d's own path
            return super().forward(x)
        a = self.axis
        weight = self.weight.squeeze(2 + a)
        return _folded(x, a, lambda y: F.conv2d(y, weight, self.bias, _drop(self.stride, a), _drop(self.padding, a),
                                                _drop(self.dilation, a), self.groups))


class FoldedConvTranspose3d(nn.ConvTranspose3d):
    """A ConvTranspose3d flat along spatial `axis` (kernel 1, stride 1, padding and output padding 0,
    dilation 1 there), computed as a 2D transposed convolution over the other two axes."""

    axis: int

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, folded_axis={self.axis}"

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if x.dim() != 5 or output_size is not None:  # unbatched, or an explicit size: the 3D path
            return super().forward(x, output_size)
        a = self.axis
        weight = self.weight.squeeze(2 + a)
        return _folded(x, a, lambda y: F.conv_transpose2d(
            y, weight, self.bias, _drop(self.stride, a), _drop(self.padding, a), _drop(self.output_padding, a),
            self.groups, _drop(self.dilation, a)))


def _flat(conv: nn.Module, axis: int) -> bool:
    flat = (conv.kernel_size[axis] == 1 and conv.stride[axis] == 1 and conv.dilation[axis] == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and conv.padding[axis] == 0)
    if isinstance(conv, nn.ConvTranspose3d):
        flat = flat and conv.output_padding[axis] == 0
    return flat


def _convs(model: nn.Module) -> list[nn.Module]:
    """The 3D (transposed) convolutions, folded or not; subclasses such as parametrized ones are left alone."""
    kinds = (nn.Conv3d, nn.ConvTranspose3d, FoldedConv3d, FoldedConvTranspose3d)
    return [m for m in model.modules() if type(m) in kinds]


def flat_axis(model: nn.Module) -> int | None:
    """The spatial axis (0 = D, 1 = H, 2 = W) along which every 3D (transposed) convolution of `model`
    is flat (the last one if several), or None."""
    convs = _convs(model)
    axes = [a for a in range(3) if convs and all(_flat(c, a) for c in convs)]
    return axes[-1] if axes else None


def fold_flat_axis(model: nn.Module) -> int | None:
    """Make every convolution of `model` flat along `flat_axis(model)` a folded one, in place; returns
    the axis, or None (the model untouched). Parameters, buffers and state-dict keys do not change;
    folding a folded model again changes nothing and returns its axis."""
    axis = flat_axis(model)
    if axis is None:
        return None
    for conv in _convs(model):
        # Same object, narrower class: parameters, hooks and the parent's reference stay as they are
        # (a wrapper module would rename the state-dict keys).
        conv.__class__ = FoldedConv3d if isinstance(conv, nn.Conv3d) else FoldedConvTranspose3d
        conv.axis = axis
    return axis
