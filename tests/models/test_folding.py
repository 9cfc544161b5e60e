"""2D plans run their convolutions as 2D ones (`crossmodalnet.models.folding`): same parameters, same
function, and isotropic models untouched."""

import pytest
import torch
from torch import nn

from crossmodalnet.config import ModelConfig
from crossmodalnet.models import build_model
from crossmodalnet.models.baselines import build_baseline
from crossmodalnet.models.crossmodalnet import CrossModalNet
from crossmodalnet.models.folding import FoldedConv3d, FoldedConvTranspose3d, flat_axis, fold_flat_axis

PLAN_2D = {  # a 2D plan with the slice axis last (MyoPS): nothing strides, convolves or attends across it
    "crossmodalnet": dict(strides=((2, 2, 1),) * 4, window_size=(4, 4, 1)),
    "unet": dict(strides=((2, 2, 1),) * 3, kernels=((3, 3, 1),) * 4),
    "dynunet": dict(strides=((2, 2, 1),) * 4, kernels=((3, 3, 1),) * 5),
}


def _folded(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (FoldedConv3d, FoldedConvTranspose3d))]


@pytest.mark.parametrize("name", sorted(PLAN_2D))
def test_a_2d_plan_model_is_folded_and_computes_the_same(name):
    config = ModelConfig.from_size(name, "tiny", modalities=2, **PLAN_2D[name])
    torch.manual_seed(0)
    folded = build_model(name, config)
    plain = CrossModalNet(config) if name == "crossmodalnet" else build_baseline(config)
    assert flat_axis(plain) == 2
    # Every convolution folded, none left 3D; the state dict is the unfolded model's, key for key.
    assert _folded(folded) and not [m for m in folded.modules() if type(m) in (nn.Conv3d, nn.ConvTranspose3d)]
    assert list(folded.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(folded.state_dict())
    for shape in [(32, 32, 1), (32, 32, 3)]:  # a 2D plan's patch, and a stack of slices (each on its own)
        image = torch.randn(2, 2, *shape, generator=torch.Generator().manual_seed(1))
        for model in (folded, plain):
            model.train()
            model.zero_grad()
        torch.manual_seed(2)
        out_f = folded(image)
        torch.manual_seed(2)
        out_p = plain(image)
        out_f = out_f[0] if isinstance(out_f, list) else out_f
        out_p = out_p[0] if isinstance(out_p, list) else out_p
        assert out_f.shape == (2, 8, *shape)
        torch.testing.assert_close(out_f, out_p, rtol=1e-4, atol=1e-5)
        out_f.square().mean().backward()
        out_p.square().mean().backward()
        for (key, a), b in zip(folded.named_parameters(), plain.parameters(), strict=True):
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-6, msg=key)


def test_isotropic_models_are_not_folded_nor_when_asked_not_to():
    for name in PLAN_2D:
        assert not _folded(build_model(name, ModelConfig.from_size(name, "tiny")))
        plan_2d = ModelConfig.from_size(name, "tiny", **PLAN_2D[name])
        assert _folded(build_model(name, plan_2d)) and not _folded(build_model(name, plan_2d, fold=False))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_folded_convolutions_along_each_axis(axis):
    kernel, stride = [3, 3, 3], [2, 2, 2]
    kernel[axis], stride[axis] = 1, 1
    padding = tuple(0 if a == axis else 1 for a in range(3))
    out_pad = tuple(0 if a == axis else 1 for a in range(3))
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 6, kernel, stride=stride, padding=padding)
    up = nn.ConvTranspose3d(6, 4, kernel, stride=stride, padding=padding, output_padding=out_pad)
    ref_conv, ref_up = nn.Conv3d(4, 6, kernel, stride=stride, padding=padding), nn.ConvTranspose3d(
        6, 4, kernel, stride=stride, padding=padding, output_padding=out_pad)
    ref_conv.load_state_dict(conv.state_dict())
    ref_up.load_state_dict(up.state_dict())
    model = nn.Sequential(conv, up)
    assert fold_flat_axis(model) == axis
    assert isinstance(model[0], FoldedConv3d) and isinstance(model[1], FoldedConvTranspose3d)
    for shape in ((2, 4, 6, 8, 10), tuple(1 if d == 2 + axis else n for d, n in enumerate((2, 4, 6, 8, 10)))):
        x = torch.randn(*shape)  # several slices along the folded axis, and one (the view path)
        torch.testing.assert_close(model(x), ref_up(ref_conv(x)), rtol=1e-4, atol=1e-5)
        assert model(x).shape == x.shape
    x = torch.randn(4, 6, 8, 10)  # unbatched input: nn.Conv3d's own path
    torch.testing.assert_close(model[0](x), ref_conv(x))
    assert fold_flat_axis(model) == axis and isinstance(model[0], FoldedConv3d)  # folding again: no change
    assert f"folded_axis={axis}" in repr(model[0])


def test_a_convolution_that_mixes_an_axis_keeps_the_model_3d():
    model = nn.Sequential(nn.Conv3d(1, 2, (3, 3, 1), padding=(1, 1, 0)), nn.Conv3d(2, 2, (1, 3, 3), padding=(0, 1, 1)))
    assert flat_axis(model) is None and fold_flat_axis(model) is None
    assert not _folded(model)
