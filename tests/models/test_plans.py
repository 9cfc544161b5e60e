"""Per-axis plans (issue 18): `ModelConfig.strides`, per-axis `window_size`, `kernels`.

Without a plan every model is today's, bit for bit; with one, CrossModalNet, UNet and DynUNet stride
and window each axis as the plan says (a 4-slice cardiac MR patch is not padded to 16 or 32 slices),
2D is the limit of the same code, and the models that cannot follow a plan say why in one line.
"""

import pytest
import torch

from crossmodalnet.config import ModelConfig
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models import build_model
from crossmodalnet.models.deformable import DeformableOp, sample_at_offsets
from crossmodalnet.models.layers import RelativePositionBias, SwinBlock, window_mask
from crossmodalnet.models.registry import check_input_size, count_parameters, input_size_rule, supports_plan
from crossmodalnet.train.losses import DiceCETerms

MYOPS = ((2, 2, 1),) * 4  # cardiac MR: 3-6 thick slices on the last axis, never downsampled


def _model(name="crossmodalnet", seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(name, ModelConfig.from_size(name, "tiny", **overrides))


def _image(shape, channels=2, batch=2, seed=1):
    return torch.randn(batch, channels, *shape, generator=torch.Generator().manual_seed(seed))


# --- no plan: today's model -----------------------------------------------------------------------

# Recorded on the code before plans existed (commit 32b85af): CrossModalNet tiny, M = 2, seed 0,
# image _image((20, 24, 16)): parameters, sum of the eval logits, sum of each training output.
BEFORE_PLANS = {"parameters": 483_068, "eval_sum": 21056.062564209104,
                "train_sums": (21056.06298899837, 1026.1618971624412, 194.49338752031326)}


def test_without_a_plan_crossmodalnet_is_the_model_before_plans():
    model = _model().eval()
    assert count_parameters(model) == BEFORE_PLANS["parameters"]
    image = _image((20, 24, 16))
    with torch.no_grad():
        out = model(image)
    # Exact on the machine that recorded it; the tolerance only absorbs other CPUs' summation order.
    assert float(out.double().sum()) == pytest.approx(BEFORE_PLANS["eval_sum"], rel=1e-6)
    torch.manual_seed(0)
    sums = [float(o.detach().double().sum()) for o in model.train()(image)]
    assert sums == pytest.approx(BEFORE_PLANS["train_sums"], rel=1e-5)


def test_an_isotropic_plan_is_bit_identical_to_no_plan():
    plain = _model().train()
    planned = _model(strides=((2, 2, 2),) * 4, window_size=(4, 4, 4)).train()
    assert [(n, p.shape) for n, p in plain.named_parameters()] == [(n, p.shape) for n, p in planned.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), planned.parameters(), strict=True))
    image = _image((20, 24, 16))
    torch.manual_seed(0)
    a = plain(image)
    torch.manual_seed(0)
    b = planned(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- CrossModalNet with a plan --------------------------------------------------------------------

@pytest.mark.parametrize("window", [(4, 4, 1), (4, 4, 2)])
def test_anisotropic_plan_keeps_the_thin_axis_unpadded(window):
    model = _model(strides=MYOPS, window_size=window, modalities=3).train()
    assert model.divisors == (16, 16, 1)  # stem (2, 2, 1) x 2, merges (2, 2, 1) x 2
    image = _image((64, 64, 4), channels=3)
    stems, skips, _, _ = model.encode(image)
    assert [tuple(s.shape[2:]) for s in stems] == [(32, 32, 4)]
    assert [tuple(s.shape[2:]) for s in skips] == [(16, 16, 4), (8, 8, 4), (4, 4, 4)]  # 4 slices, never 16
    block = model.streams[0].stages[0][0]
    assert isinstance(block, SwinBlock) and block.window == window
    # The second Cross Transformer block shifts its windows by half a window per axis, none where the window is 1.
    assert model.cross[1].refine[0].shift_size == tuple(w // 2 for w in window)
    assert model.cross[0].refine[0].window == window
    table = model.streams[0].stages[0][0].attn.bias.table
    assert table.shape[0] == 7 * 7 * (2 * window[2] - 1)
    outs = model(image)
    assert [tuple(o.shape) for o in outs] == [(2, 8, 64, 64, 4), (2, 8, 32, 32, 4), (2, 8, 16, 16, 4)]
    # The thin axis is never downsampled, so the stem and decoder convolve within slices (kernel 1 there).
    assert model.streams[0].stem.stages[0][0].kernel_size == (3, 3, 1)
    sum(o.square().mean() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and "placeholders" not in n]
    assert not missing


def test_two_dimensional_limit_is_the_same_code():
    model = _model(strides=MYOPS, window_size=(4, 4, 1), modalities=1).eval()
    with torch.no_grad():
        out = model(_image((64, 64, 1), channels=1))
    assert out.shape == (2, 8, 64, 64, 1) and torch.isfinite(out).all()
    # Nothing has a kernel, window or merge across the single slice.
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(c.kernel_size[2] == 1 for c in convs)
    assert all(m.factors[2] == 1 for m in model.streams[0].merges)


def test_deep_supervision_shapes_follow_the_first_steps_per_axis():
    model = _model(strides=((2, 2, 1), (2, 1, 2), (2, 2, 2), (1, 2, 2)), window_size=(2, 4, 2)).train()
    assert model.divisors == (8, 8, 8)
    outs = model(_image((30, 22, 9)))
    # After the first step (2, 2, 1) and the first two (4, 2, 2), ceil per axis.
    assert [tuple(o.shape[2:]) for o in outs] == [(30, 22, 9), (15, 11, 9), (8, 11, 5)]


def test_missing_channel_placeholders_take_the_per_axis_stem_sizes():
    model = _model(strides=MYOPS, window_size=(4, 4, 1), fine_skips="both").eval()
    image = _image((32, 32, 3))
    with torch.no_grad():
        mixed = model(image, torch.tensor([[True, False], [True, True]]))
        alone = model(image[:1], torch.tensor([[True, False]]))  # every sample missing it: placeholders only
    assert mixed.shape == (2, 8, 32, 32, 3)
    torch.testing.assert_close(mixed[:1], alone, rtol=1e-4, atol=1e-5)


def test_deformable_op_has_no_offsets_along_an_axis_of_one_token():
    torch.manual_seed(0)
    op = DeformableOp(8, num_points=2, max_offset=2.0)
    torch.nn.init.normal_(op.offsets.weight, std=1.0)
    query, value = torch.randn(1, 5, 6, 1, 8), torch.randn(1, 5, 6, 1, 8)
    off, wts = op.predict(query)
    assert off[..., 2].abs().max() > 0.1  # predicted, then dropped: one slice has nothing to sample between
    off = off * torch.tensor([1.0, 1.0, 0.0])
    expected = (sample_at_offsets(value.permute(0, 4, 1, 2, 3), off) * wts.unsqueeze(2)).sum(1).permute(0, 2, 3, 4, 1)
    torch.testing.assert_close(op(query, value), expected)
    assert not torch.allclose(op(query, value), value)  # in-plane offsets still act


def test_per_axis_window_bias_table_and_mask():
    bias = RelativePositionBias((4, 2, 1), num_heads=2)
    assert bias.table.shape == (7 * 3 * 1, 2) and bias().shape == (2, 8, 8)
    assert int(bias.index.max()) == 7 * 3 - 1
    # Shift (2, 1, 0): regions split along D and H only; a padded W axis is masked, not split.
    mask = window_mask((8, 4, 3), (8, 4, 3), (4, 2, 1), (2, 1, 0), torch.device("cpu"))
    assert mask.shape == (2 * 2 * 3, 8, 8)


# --- baselines ------------------------------------------------------------------------------------

def test_dynunet_with_an_anisotropic_plan_trains_one_step():
    strides = ((2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2))
    kernels = ((3, 3, 1), (3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3))
    model = _model("dynunet", strides=strides, kernels=kernels).train()
    net = model.net
    assert list(net.strides) == [(1, 1, 1), *strides] and list(net.upsample_kernel_size) == list(strides)
    assert list(net.kernel_size) == list(kernels) and model.multiples == (16, 16, 4)
    image, target = _image((30, 32, 7)), torch.randint(0, 8, (2, 1, 30, 32, 7))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    outs = model(image)  # deep supervision: a list, full resolution first, each at its own size
    assert [tuple(o.shape) for o in outs] == [(2, 8, 30, 32, 7), (2, 8, 15, 16, 7), (2, 8, 8, 8, 7)]
    terms = DiceCETerms()(outs, target)
    loss = terms["dice"] + terms["ce"]
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)) > len(before) // 2
    with torch.no_grad():
        assert model.eval()(image).shape == (2, 8, 30, 32, 7)


def test_dynunet_without_a_plan_has_five_isotropic_levels():
    net = _model("dynunet").net
    assert list(net.strides) == [(1, 1, 1)] + [(2, 2, 2)] * 4 and list(net.filters) == [4, 8, 16, 32, 64]


def test_unet_takes_per_axis_strides():
    model = _model("unet", strides=((2, 2, 1),) * 3).eval()
    seen = []
    model.net.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        out = model(_image((32, 32, 3)))
    assert out.shape == (2, 8, 32, 32, 3) and seen == [(2, 2, 32, 32, 3)]  # 3 slices, not padded to 16
    assert model.net.model[0].conv.unit0.conv.stride == (2, 2, 1)


# --- what a plan asks of each model ---------------------------------------------------------------

def test_supports_plan():
    assert supports_plan("crossmodalnet", MYOPS, (160, 160, 4)) is None
    assert supports_plan("dynunet", MYOPS, (160, 160, 4)) is None
    assert supports_plan("swinunetr", MYOPS, (160, 160, 4)) == (
        "swinunetr downsamples every axis by 32; a 4-slice patch would be padded to 32 slices (axis 2 of 160x160x4)")
    assert supports_plan("swinunetr", None, (64, 64, 64)) is None
    assert "cannot follow per-axis strides" in supports_plan("nnformer", MYOPS, (64, 64, 64))
    assert supports_plan("unetr", MYOPS, (160, 160, 4)).startswith("unetr embeds a fixed cube")
    reason = supports_plan("crossmodalnet", MYOPS[:3], (160, 160, 4))
    assert reason.startswith("strides needs log2(patch_size 4) + len(depths 3) - 1 = 4 steps") and "\n" not in reason


def test_input_size_rule_is_per_axis():
    cfg = ModelConfig.from_size("crossmodalnet", "small", strides=MYOPS)
    rule = input_size_rule(cfg)
    assert rule.pad_multiples == (16, 16, 1) and rule.min_edges == (17, 17, 2)
    check_input_size(cfg, (8, 8, 2))  # two slices: the bottleneck's norm sees two voxels
    with pytest.raises(CrossModalNetError, match=r"^model crossmodalnet \(small\) needs one axis of at least its "
                                                 r"minimum \(D, H, W\) = \(17, 17, 2\) voxels, got \[8, 8, 1\]$"):
        check_input_size(cfg, (8, 8, 1))


@pytest.mark.parametrize("overrides, message", [
    (dict(strides=MYOPS[:3]), r"^config: strides needs log2\(patch_size 4\) \+ len\(depths 3\) - 1 = 4 steps"),
    (dict(strides=((2, 2, 1),) * 3 + ((2, 3, 1),)), r"^config: strides\.3\.1: Input should be 1 or 2, got 3$"),
    (dict(window_size=(4, 4, 0)), r"^config: window_size: Input should be greater than or equal to 1"),
    (dict(window_size=0), r"^config: window_size: Input should be greater than or equal to 1, got 0$"),
    (dict(kernels=((3, 3, 1),) * 5), r"^config: kernels: only the conv models \(unet, dynunet\)"),
    (dict(name="swinunetr", strides=MYOPS), r"^config: strides: swinunetr downsamples every axis alike"),
    (dict(name="dynunet", kernels=((3, 3, 3),) * 4), r"^config: kernels needs one kernel per level, 5"),
    (dict(name="dynunet", strides=MYOPS, kernels=((3, 3, 1),) * 4 + ((1, 3, 3),)),
     r"^config: kernels: level 4 has kernel 1 on an axis its step strides by 2"),
    (dict(name="unet", strides=MYOPS[:3], kernels=((3, 3, 1),) * 3 + ((3, 3, 3),)),
     r"^config: kernels: unet takes one kernel for every level"),
])
def test_bad_plans_are_refused_in_one_line_naming_the_field(overrides, message):
    name = overrides.pop("name", "crossmodalnet")
    with pytest.raises(CrossModalNetError, match=message) as err:
        ModelConfig.from_size(name, "tiny", **overrides)
    assert "\n" not in str(err.value)


def test_a_plan_survives_the_run_folders_yaml():
    import yaml

    from crossmodalnet.config import TrainConfig, from_dict, to_yaml

    model = ModelConfig.from_size("crossmodalnet", "tiny", strides=MYOPS, window_size=(4, 4, 1))
    back = from_dict(TrainConfig, yaml.safe_load(to_yaml(TrainConfig(model=model, patch_size=(64, 64, 4)))))
    assert back.model.strides == MYOPS and back.model.window_size == (4, 4, 1) and back.model.kernels is None
    assert ModelConfig.from_size("crossmodalnet", "tiny").strides is None  # old configs: no plan
