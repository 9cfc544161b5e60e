"""CrossModalNet end to end: shapes, gradients, determinism, channel handling (1-4 channels, missing
ones, modality dropout), variants."""

import pytest
import torch

from crossmodalnet.config import ModelConfig
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models import build_model
from crossmodalnet.models.registry import count_parameters

# Parameters of the two-stream (CT/MR) model before one stream per channel, recorded at commit
# 306de3d: with two channels the model must be that model, module for module.
TWO_STREAM_PARAMETERS = {("tiny", "reference"): 483_068, ("tiny", "both"): 485_012,
                         ("small", "reference"): 3_776_392, ("small", "both"): 3_812_192}


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model("crossmodalnet", ModelConfig.from_size("crossmodalnet", "tiny", **overrides))


def _image(shape, channels=2, batch=1, seed=1):
    return torch.randn(batch, channels, *shape, generator=torch.Generator().manual_seed(seed))


def _present(rows):
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize("shape", [(32, 32, 32), (37, 41, 29), (16, 48, 20), (17, 33, 20)])
def test_output_shape_any_size(shape):
    model = _model().eval()
    with torch.no_grad():
        out = model(_image(shape))
    assert out.shape == (1, 8, *shape) and torch.isfinite(out).all()


@pytest.mark.parametrize("modalities", [1, 2, 3, 4])
def test_output_shapes_for_one_to_four_channels(modalities):
    model = _model(modalities=modalities).train()
    assert len(model.streams) == modalities
    assert (model.cross is None) == (modalities == 1)  # one channel: a single-stream Swin U-Net
    assert all(len(block.refine) == modalities for block in model.cross or [])
    outs = model(_image((20, 24, 16), modalities, batch=2))
    assert [tuple(o.shape) for o in outs] == [(2, 8, 20, 24, 16), (2, 8, 10, 12, 8), (2, 8, 5, 6, 4)]
    with torch.no_grad():
        out = model.eval()(_image((20, 24, 16), modalities))
    assert out.shape == (1, 8, 20, 24, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("fine_skips", ["reference", "both"])
def test_two_channels_have_the_two_stream_models_parameters(size, fine_skips):
    model = build_model("crossmodalnet", ModelConfig.from_size("crossmodalnet", size, fine_skips=fine_skips))
    assert count_parameters(model) == TWO_STREAM_PARAMETERS[size, fine_skips]


def test_parameters_grow_with_the_channels():
    counts = [count_parameters(_model(modalities=m)) for m in (1, 2, 3, 4)]
    assert counts == sorted(counts) and len(set(counts)) == 4
    # One channel: no placeholders (its only channel is never missing), no cross blocks.
    assert not any("placeholders" in n or n.startswith("cross.") for n, _ in _model(modalities=1).named_parameters())


@pytest.mark.parametrize("modalities, fine_skips, patch_size", [
    (2, "both", 2), (2, "reference", 2), (2, "both", 4), (2, "reference", 4), (3, "reference", 4), (1, "both", 4)])
def test_every_parameter_receives_a_gradient(modalities, fine_skips, patch_size):
    model = _model(patch_size=patch_size, modality_dropout=0.5, deep_supervision=True, fine_skips=fine_skips,
                   modalities=modalities).train()
    # Move the deformable offsets off zero (as after the first step): at exactly zero offsets the
    # K samples coincide and their mixing weights have no gradient (test_deformable shows why).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".deform.offsets." in name:
                p.normal_(std=0.3)
    image = _image((24, 24, 24), modalities)
    torch.manual_seed(0)
    outs = model(image.repeat(4, 1, 1, 1, 1))  # dropout hits some samples
    loss = sum(o.square().mean() for o in outs)
    for m in range(modalities if modalities > 1 else 0):  # each channel missing once
        present = torch.ones(1, modalities, dtype=torch.bool)
        present[0, m] = False
        loss = loss + model(image, present)[0].square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # Under "reference" the stem maps finer than the tokens are only skips, taken from a channel
    # that is there: the placeholders of those levels are never read (kept for one weight layout).
    finer = range(len(model.streams[0].placeholders) - 1) if fine_skips == "reference" else []
    assert missing == [f"streams.{s}.placeholders.{i}" for s in range(modalities) for i in finer]


def test_deep_supervision_shapes():
    model = _model(deep_supervision=True).train()
    outs = model(_image((32, 30, 28)))
    assert [tuple(o.shape[2:]) for o in outs] == [(32, 30, 28), (16, 15, 14), (8, 8, 7)]
    model.eval()
    assert model(_image((32, 30, 28))).shape == (1, 8, 32, 30, 28)


def test_logits_are_upsampled_coarse_logits_plus_a_full_resolution_correction():
    # With the full-resolution head silenced, what is left is the stride-2 head, upsampled trilinearly.
    model = _model().eval()
    torch.nn.init.zeros_(model.head.conv.conv.weight)
    torch.nn.init.zeros_(model.head.conv.conv.bias)
    captured = []
    model.coarse_head.register_forward_hook(lambda _m, _a, out: captured.append(out))
    with torch.no_grad():
        out = model(_image((32, 30, 28)))
    expected = torch.nn.functional.interpolate(captured[0], scale_factor=2, mode="trilinear", align_corners=False)
    assert captured[0].shape[2:] == (16, 16, 16)  # padded to the model's divisor, then cropped
    torch.testing.assert_close(out, expected[..., :32, :30, :28])


def test_reference_fine_skips_keep_the_other_channels_out_of_the_fine_decoder():
    # fine_skips "reference": below the token grid the decoder sees channel 0 only, so changing the
    # others leaves encode's fine skips as they were (they reach the output through the token streams).
    model = _model(fine_skips="reference", modalities=3).eval()
    image = _image((32, 32, 32), 3)
    moved = torch.cat([image[:, :1], image[:, 1:].flip(2)], dim=1)
    with torch.no_grad():
        stems, _, inputs, _ = model.encode(image)
        stems2, _, inputs2, _ = model.encode(moved)
        no_first, _, inputs_1, _ = model.encode(image, _present([[False, True, True]]))
    assert inputs.shape[1] == 1 and torch.equal(inputs, image[:, :1]) and torch.equal(inputs2, image[:, :1])
    assert all(torch.equal(a, b) for a, b in zip(stems, stems2, strict=True))
    assert torch.equal(inputs_1, image[:, 1:2])  # without channel 0 the first present one is the reference
    assert all(a.shape == b.shape for a, b in zip(stems, no_first, strict=True))


def test_reference_is_chosen_per_sample():
    model = _model(fine_skips="reference", modalities=3).eval()
    image = _image((32, 32, 32), 3, batch=3)
    present = _present([[True, True, True], [False, True, True], [False, False, True]])
    with torch.no_grad():
        _, _, inputs, _ = model.encode(image, present)
    assert torch.equal(inputs[:, 0], torch.stack([image[0, 0], image[1, 1], image[2, 2]]))


def test_reference_skips_take_the_stages_before_the_first_cross_block():
    # With cross_first_stage 1, the stage-1 tokens have met no Cross Transformer block: under
    # "reference" their skip is channel 0's alone (C channels), unchanged by channel 1; the later ones
    # are all channels'.
    ref = _model(fine_skips="reference", cross_first_stage=1).eval()
    both = _model(fine_skips="both", cross_first_stage=1).eval()
    image = _image((32, 32, 32))
    moved = torch.cat([image[:, :1], image[:, 1:].flip(2)], dim=1)
    with torch.no_grad():
        _, skips, _, _ = ref.encode(image)
        _, skips2, _, _ = ref.encode(moved)
        _, skips_both, _, _ = both.encode(image)
        _, skips_1, _, _ = ref.encode(image, _present([[False, True]]))
        out = ref(image)
    c = ref.config.feature_size
    assert [t.shape[1] for t in skips] == [c, 4 * c, 8 * c]
    assert [t.shape[1] for t in skips_both] == [2 * c, 4 * c, 8 * c]
    assert torch.equal(skips[0], skips2[0]) and not torch.allclose(skips[1], skips2[1])
    assert skips_1[0].shape == skips[0].shape
    assert out.shape == (1, ref.config.out_channels, 32, 32, 32)
    # Without cross blocks every skip stays all channels': the decoder is where the streams meet.
    _, skips_nc, _, _ = _model(fine_skips="reference", cross_first_stage=1, cross_blocks=False).eval().encode(image)
    assert [t.shape[1] for t in skips_nc] == [2 * c, 4 * c, 8 * c]
    # Three channels: 3C per fused skip and at the bottleneck.
    three = _model(fine_skips="both", modalities=3).eval()
    with torch.no_grad():
        _, skips3, inputs3, _ = three.encode(_image((32, 32, 32), 3))
    assert [t.shape[1] for t in skips3] == [3 * c, 6 * c, 12 * c] and inputs3.shape[1] == 3
    assert three.bottleneck.conv1.conv.in_channels == 12 * c


def test_swapping_channels_changes_the_output():
    model = _model().eval()
    image = _image((32, 32, 32))
    with torch.no_grad():
        assert (model(image) - model(image.flip(1))).abs().max() > 1e-3


def test_missing_channel_forward():
    model = _model(modality_dropout=0.3).eval()
    image = _image((32, 28, 24))
    with torch.no_grad():
        both = model(image)
        only_0 = model(image, _present([[True, False]]))
        only_1 = model(image, _present([[False, True]]))
        # A missing channel's values are ignored: zeros or anything else, the same output.
        assert torch.equal(only_0, model(torch.cat([image[:, :1], torch.zeros_like(image[:, 1:])], 1),
                                         _present([[True, False]])))
    assert only_0.shape == only_1.shape == both.shape
    assert (only_0 - both).abs().max() > 1e-4 and (only_1 - both).abs().max() > 1e-4
    assert model.supports_missing_modality and not _model().supports_missing_modality
    with pytest.raises(ValueError, match="at least one present channel"):
        model(image, _present([[False, False]]))


@pytest.mark.parametrize("modalities", [2, 3])
def test_a_missing_channel_in_one_sample_only_affects_that_sample(modalities):
    model = _model(modalities=modalities).eval()
    image = _image((24, 24, 24), modalities, batch=2)
    present = torch.ones(2, modalities, dtype=torch.bool)
    present[1, -1] = False
    with torch.no_grad():
        out = model(image, present)
        alone = [model(image[i: i + 1], present[i: i + 1]) for i in range(2)]
        torch.testing.assert_close(out, torch.cat(alone))
        # The last stream's placeholders enter sample 1 only.
        for ph in model.streams[-1].placeholders:
            ph.add_(torch.randn(ph.shape))
        moved = model(image, present)
    assert torch.equal(moved[0], out[0]) and (moved[1] - out[1]).abs().max() > 1e-4


@pytest.mark.parametrize("modalities", [2, 3, 4])
def test_modality_dropout_drops_one_present_channel_never_all(modalities):
    model = _model(modalities=modalities, modality_dropout=1.0).train()
    gen = torch.Generator().manual_seed(0)
    present = torch.rand(4000, modalities, generator=gen) < 0.7
    present[~present.any(dim=1), 0] = True
    torch.manual_seed(0)
    drop = model.drop_masks(present)
    count = present.sum(dim=1)
    assert not (drop & ~present).any()  # only present channels are dropped
    assert torch.equal(drop.sum(dim=1), (count > 1).long())  # exactly one where there is a choice, else none
    assert (present & ~drop).any(dim=1).all()  # never all channels
    # Uniform among the present ones: with all present, each channel about 1/M of the drops.
    full = drop[count == modalities]
    share = full.float().mean(dim=0)
    assert torch.allclose(share, torch.full((modalities,), 1 / modalities), atol=0.06)
    assert model.eval().drop_masks(present) is None  # never at inference


def test_modality_dropout_with_two_channels_draws_as_the_two_stream_model():
    # r = torch.rand(B): r < p/2 drops channel 0, p/2 <= r < p drops channel 1 (the CT/MR model's rule).
    p = 0.4
    model = _model(modality_dropout=p).train()
    torch.manual_seed(3)
    drop = model.drop_masks(torch.ones(1000, 2, dtype=torch.bool))
    torch.manual_seed(3)
    r = torch.rand(1000)
    assert torch.equal(drop[:, 0], r < p / 2) and torch.equal(drop[:, 1], (r >= p / 2) & (r < p))


def test_same_seed_same_output_and_different_seed_differs():
    image = _image((32, 32, 32))
    with torch.no_grad():
        a, b, c = _model(0).eval()(image), _model(0).eval()(image), _model(1).eval()(image)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize(
    "overrides",
    [dict(cross_attention="paper"), dict(deformable=False), dict(cross_blocks=False), dict(patch_size=2),
     dict(light_decoder_levels=0), dict(light_decoder_levels=1), dict(light_decoder_levels=3), dict(fine_skips="both"),
     dict(cross_first_stage=1), dict(modalities=3, cross_attention="paper"), dict(modalities=4, deformable=False)],
)
def test_variants_run(overrides):
    model = _model(**overrides).eval()
    with torch.no_grad():
        out = model(_image((20, 24, 28), model.modalities))
    assert out.shape == (1, 8, 20, 24, 28) and torch.isfinite(out).all()


def test_light_decoder_levels_count_from_the_full_resolution_block():
    from monai.networks.blocks import UnetResBlock
    from monai.networks.blocks.convolutions import Convolution

    kinds = {}
    for levels in (0, 1, 2):
        ups = _model(light_decoder_levels=levels).ups
        kinds[levels] = [(type(u.block), u.out_channels) for u in ups[-2:]]  # stride 2, full resolution
    stride2 = _model().ups[-2].out_channels
    assert kinds[2] == [(Convolution, stride2), (Convolution, max(stride2 // 2, 8))]
    assert kinds[1] == [(UnetResBlock, stride2), (Convolution, max(stride2 // 2, 8))]
    # 0: no light block, and the full-resolution one as wide as the stride-2 one.
    assert kinds[0] == [(UnetResBlock, stride2), (UnetResBlock, stride2)]
    assert _model(light_decoder_levels=0).head.conv.conv.in_channels == stride2


def test_ablation_without_cross_blocks_has_no_cross_parameters():
    full = sum(p.numel() for p in _model().parameters())
    without = sum(p.numel() for p in _model(cross_blocks=False).parameters())
    no_deform = sum(p.numel() for p in _model(deformable=False).parameters())
    assert without < no_deform < full


def test_cross_blocks_can_start_at_a_coarser_stage():
    full, later = _model(), _model(cross_first_stage=1)
    assert len(later.cross) == len(full.cross) - 1
    # The blocks kept are those of the coarser stages, with their widths.
    for j, block in enumerate(later.cross):
        assert block.refine[0].attn.q.in_features == full.cross[j + 1].refine[0].attn.q.in_features
    with torch.no_grad():
        *_, layers = later.eval().encode(_image((32, 32, 32)), keep_layers=True)
    assert [n for n, _ in layers] == ["stage1", "stage2", "cross2", "stage3", "cross3"]
    with pytest.raises(CrossModalNetError, match="cross_first_stage must be below the 3 stages"):
        _model(cross_first_stage=3)


@pytest.mark.parametrize("modalities", [1, 3])
def test_encode_exposes_every_layer_for_analysis(modalities):
    model = _model(modalities=modalities).eval()
    with torch.no_grad():
        *_, layers = model.encode(_image((32, 32, 32), modalities), keep_layers=True)
    expected = ["stage1", "cross1", "stage2", "cross2", "stage3", "cross3"]
    assert [n for n, _ in layers] == (expected[::2] if modalities == 1 else expected)
    assert all(len(feats) == modalities for _, feats in layers)
    assert layers[0][1][0].shape == (1, 8, 8, 8, 12)


def test_bad_config_and_inputs_are_refused():
    # The schema refuses them before a model is built (crossmodalnet.config).
    with pytest.raises(CrossModalNetError, match="need one entry per stage"):
        _model(num_heads=(1, 2))
    with pytest.raises(CrossModalNetError, match="cross_attention"):
        _model(cross_attention="sideways")
    with pytest.raises(CrossModalNetError, match="light_decoder_levels"):
        _model(light_decoder_levels=-1)
    with pytest.raises(CrossModalNetError, match="fine_skips"):
        _model(fine_skips="mr")
    with pytest.raises(CrossModalNetError, match="modalities"):
        _model(modalities=5)
    model = _model()
    with pytest.raises(ValueError, match=r"image must be \(B, 2, D, H, W\)"):
        model(_image((16, 16, 16), 3))
    with pytest.raises(ValueError, match=r"present must be \(B, M\) = \(1, 2\)"):
        model(_image((16, 16, 16)), _present([[True, True, True]]))
