"""CrossModalNet end to end: shapes, gradients, determinism, modality handling, variants."""

import pytest
import torch

from crossmodalnet.config import ModelConfig
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models import build_model


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model("crossmodalnet", ModelConfig.from_size("crossmodalnet", "tiny", **overrides))


def _pair(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, *shape, generator=g), torch.randn(1, 1, *shape, generator=g)


@pytest.mark.parametrize("shape", [(32, 32, 32), (37, 41, 29), (16, 48, 20), (17, 33, 20)])
def test_output_shape_any_size(shape):
    model = _model().eval()
    ct, mr = _pair(shape)
    with torch.no_grad():
        out = model(ct, mr)
    assert out.shape == (1, 8, *shape) and torch.isfinite(out).all()


@pytest.mark.parametrize("fine_skips", ["both", "reference"])
@pytest.mark.parametrize("patch_size", [2, 4])
def test_every_parameter_receives_a_gradient(patch_size, fine_skips):
    model = _model(patch_size=patch_size, modality_dropout=0.5, deep_supervision=True, fine_skips=fine_skips).train()
    # Move the deformable offsets off zero (as after the first step): at exactly zero offsets the
    # K samples coincide and their mixing weights have no gradient (test_deformable shows why).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".deform.offsets." in name:
                p.normal_(std=0.3)
    ct, mr = _pair((24, 24, 24))
    torch.manual_seed(0)
    outs = model(ct.repeat(4, 1, 1, 1, 1), mr.repeat(4, 1, 1, 1, 1))  # dropout hits some samples
    loss = sum(o.square().mean() for o in outs)
    loss = loss + model(ct, None)[0].square().mean() + model(None, mr)[0].square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # Under "reference" the stem maps finer than the tokens are only skips, taken from the modality
    # that is there: the placeholders of those levels are never read (kept for one weight layout).
    finer = range(len(model.ct.placeholders) - 1) if fine_skips == "reference" else []
    assert missing == [f"{s}.placeholders.{i}" for s in ("ct", "mr") for i in finer]


def test_deep_supervision_shapes():
    model = _model(deep_supervision=True).train()
    outs = model(*_pair((32, 30, 28)))
    assert [tuple(o.shape[2:]) for o in outs] == [(32, 30, 28), (16, 15, 14), (8, 8, 7)]
    model.eval()
    assert model(*_pair((32, 30, 28))).shape == (1, 8, 32, 30, 28)


def test_logits_are_upsampled_coarse_logits_plus_a_full_resolution_correction():
    # With the full-resolution head silenced, what is left is the stride-2 head, upsampled trilinearly.
    model = _model().eval()
    torch.nn.init.zeros_(model.head.conv.conv.weight)
    torch.nn.init.zeros_(model.head.conv.conv.bias)
    captured = []
    model.coarse_head.register_forward_hook(lambda _m, _a, out: captured.append(out))
    with torch.no_grad():
        out = model(*_pair((32, 30, 28)))
    expected = torch.nn.functional.interpolate(captured[0], scale_factor=2, mode="trilinear", align_corners=False)
    assert captured[0].shape[2:] == (16, 16, 16)  # padded to the model's divisor, then cropped
    torch.testing.assert_close(out, expected[..., :32, :30, :28])


def test_reference_fine_skips_keep_mr_detail_out_of_the_fine_decoder():
    # fine_skips "reference": below the token grid the decoder sees the CT only, so changing the MR
    # leaves encode's fine skips as they were (the MR reaches the output through the token streams).
    model = _model(fine_skips="reference").eval()
    ct, mr = _pair((32, 32, 32))
    with torch.no_grad():
        stems, _, inputs, _ = model.encode(ct, mr)
        stems2, _, inputs2, _ = model.encode(ct, mr.flip(2))
        mr_only, _, inputs_mr, _ = model.encode(None, mr)
    assert inputs.shape[1] == 1 and torch.equal(inputs, ct) and torch.equal(inputs2, ct)
    assert all(torch.equal(a, b) for a, b in zip(stems, stems2, strict=True))
    assert torch.equal(inputs_mr, mr)  # without a CT the MR is the reference
    assert all(a.shape == b.shape for a, b in zip(stems, mr_only, strict=True))


def test_reference_skips_take_the_stages_before_the_first_cross_block():
    # With cross_first_stage 1, the stage-1 tokens have met no Cross Transformer block: under
    # "reference" their skip is the CT's alone (C channels), unchanged by the MR; the later ones stay CT ‖ MR.
    ref = _model(fine_skips="reference", cross_first_stage=1).eval()
    both = _model(fine_skips="both", cross_first_stage=1).eval()
    ct, mr = _pair((32, 32, 32))
    with torch.no_grad():
        _, skips, _, _ = ref.encode(ct, mr)
        _, skips2, _, _ = ref.encode(ct, mr.flip(2))
        _, skips_both, _, _ = both.encode(ct, mr)
        _, skips_mr, _, _ = ref.encode(None, mr)
        out = ref(ct, mr)
    c = ref.config.feature_size
    assert [t.shape[1] for t in skips] == [c, 4 * c, 8 * c]
    assert [t.shape[1] for t in skips_both] == [2 * c, 4 * c, 8 * c]
    assert torch.equal(skips[0], skips2[0]) and not torch.allclose(skips[1], skips2[1])
    assert skips_mr[0].shape == skips[0].shape
    assert out.shape == (1, ref.config.out_channels, 32, 32, 32)
    # Without cross blocks every skip stays CT ‖ MR: the decoder is where the streams meet.
    _, skips_nc, _, _ = _model(fine_skips="reference", cross_first_stage=1, cross_blocks=False).eval().encode(ct, mr)
    assert [t.shape[1] for t in skips_nc] == [2 * c, 4 * c, 8 * c]


def test_swapping_ct_and_mr_changes_the_output():
    model = _model().eval()
    ct, mr = _pair((32, 32, 32))
    with torch.no_grad():
        assert (model(ct, mr) - model(mr, ct)).abs().max() > 1e-3


def test_single_modality_forward():
    model = _model(modality_dropout=0.3).eval()
    ct, mr = _pair((32, 28, 24))
    with torch.no_grad():
        both, only_ct, only_mr = model(ct, mr), model(ct, None), model(None, mr)
    assert only_ct.shape == only_mr.shape == both.shape
    assert (only_ct - both).abs().max() > 1e-4 and (only_mr - both).abs().max() > 1e-4
    assert model.supports_missing_modality and not _model().supports_missing_modality
    with pytest.raises(ValueError, match="at least one"):
        model(None, None)


def test_same_seed_same_output_and_different_seed_differs():
    ct, mr = _pair((32, 32, 32))
    with torch.no_grad():
        a, b, c = _model(0).eval()(ct, mr), _model(0).eval()(ct, mr), _model(1).eval()(ct, mr)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize(
    "overrides",
    [dict(cross_attention="paper"), dict(deformable=False), dict(cross_blocks=False), dict(patch_size=2),
     dict(light_decoder_levels=1), dict(light_decoder_levels=3), dict(fine_skips="both"),
     dict(cross_first_stage=1)],
)
def test_variants_run(overrides):
    model = _model(**overrides).eval()
    with torch.no_grad():
        out = model(*_pair((20, 24, 28)))
    assert out.shape == (1, 8, 20, 24, 28) and torch.isfinite(out).all()


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
        assert block.a_from_b.attn.q.in_features == full.cross[j + 1].a_from_b.attn.q.in_features
    with torch.no_grad():
        *_, layers = later.eval().encode(*_pair((32, 32, 32)), keep_layers=True)
    assert [n for n, _, _ in layers] == ["stage1", "stage2", "cross2", "stage3", "cross3"]
    with pytest.raises(CrossModalNetError, match="cross_first_stage must be below the 3 stages"):
        _model(cross_first_stage=3)


def test_encode_exposes_every_layer_for_analysis():
    model = _model().eval()
    with torch.no_grad():
        *_, layers = model.encode(*_pair((32, 32, 32)), keep_layers=True)
    assert [n for n, _, _ in layers] == ["stage1", "cross1", "stage2", "cross2", "stage3", "cross3"]
    assert layers[0][1].shape == (1, 8, 8, 8, 12)


def test_bad_config_is_refused():
    # The schema refuses them before a model is built (crossmodalnet.config).
    with pytest.raises(CrossModalNetError, match="need one entry per stage"):
        _model(num_heads=(1, 2))
    with pytest.raises(CrossModalNetError, match="cross_attention"):
        _model(cross_attention="sideways")
    with pytest.raises(CrossModalNetError, match="light_decoder_levels"):
        _model(light_decoder_levels=0)
    with pytest.raises(CrossModalNetError, match="fine_skips"):
        _model(fine_skips="mr")
    ct, _ = _pair((16, 16, 16))
    with pytest.raises(ValueError, match="same shape"):
        _model()(ct, torch.randn(1, 1, 16, 16, 8))
