"""The paper baselines implemented here: nnFormer, VT-UNet, 3D Swin-Unet.

For each: any input size, every parameter trained, and the mechanism that defines it is there.
"""

import pytest
import torch
from einops import rearrange
from torch import nn

from crossmodalnet.models import build_model
from crossmodalnet.models.layers import PatchMerging, SwinBlock
from crossmodalnet.models.nnformer import (
    FinalExpanding,
    GlobalAttentionBlock,
    NnFormer,
    SkipAttentionBlock,
)
from crossmodalnet.models.swinunet import FinalPatchExpanding, PatchExpanding, SwinUnet, voxel_shuffle
from crossmodalnet.models.vtunet import VTDecoderBlock, VTUNet, fourier_position_encoding

PAPER_BASELINES = ("nnformer", "vtunet", "swinunet")


def _net(name: str, seed: int = 0) -> nn.Module:
    """The tiny network inside the early-fusion wrapper."""
    torch.manual_seed(seed)
    return build_model(name, size="tiny").net


def _changed(fn, x: torch.Tensor, poke: tuple[int, int, int], where: tuple[int, int, int]) -> bool:
    """Does perturbing token `poke` of x (1, D, H, W, C) change fn(x) at token `where`?"""
    y = x.clone()
    y[(0, *poke)] += 5.0 * torch.randn(x.shape[-1])  # not a constant: LayerNorm would remove it
    with torch.no_grad():
        a, b = fn(x), fn(y)
    return not torch.allclose(a[(0, *where)], b[(0, *where)], atol=1e-6)


# --- all three -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAPER_BASELINES)
def test_any_input_size_and_one_channel_missing(name):
    torch.manual_seed(0)
    model = build_model(name, size="tiny").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, 21, 18, 35))
        only_mr = model(torch.randn(1, 2, 33, 40, 17), torch.tensor([[False, True]]))
    assert out.shape == (2, 8, 21, 18, 35) and torch.isfinite(out).all()
    assert only_mr.shape == (1, 8, 33, 40, 17) and torch.isfinite(only_mr).all()


@pytest.mark.parametrize("name", PAPER_BASELINES)
def test_every_parameter_receives_a_gradient(name):
    torch.manual_seed(0)
    model = build_model(name, size="tiny").train()
    # Pads to 64³: the bottleneck grid is 2³, so even its attention has more than one key.
    out = model(torch.randn(1, 2, 50, 40, 64))
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("cls", [NnFormer, VTUNet, SwinUnet])
def test_bad_arguments_are_refused(cls):
    with pytest.raises(ValueError, match="same length"):
        cls(2, 8, feature_size=12, depths=(1, 1, 1), num_heads=(1, 2))
    net = cls(2, 8, feature_size=12, depths=(1, 1), num_heads=(1, 2), window_size=4)
    assert net.divisor == 8
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.randn(1, 2, 8, 8, 12))


# --- nnFormer --------------------------------------------------------------------------------


def test_nnformer_local_blocks_stay_in_windows_and_the_global_block_does_not():
    """LV-MSA: a token outside a token's 4³ window cannot reach it; GV-MSA (bottleneck): it can."""
    net = _net("nnformer").eval()
    local, glob = net.encoder[0][0], net.bottleneck[0]
    assert isinstance(local, SwinBlock) and not any(local.shift_size) and isinstance(glob, GlobalAttentionBlock)
    torch.manual_seed(1)
    x_local, x_glob = torch.randn(1, 8, 8, 8, 12), torch.randn(1, 8, 8, 8, 96)
    assert not _changed(local, x_local, poke=(5, 5, 5), where=(1, 1, 1))  # other window
    assert _changed(local, x_local, poke=(3, 2, 0), where=(1, 1, 1))  # same window: positive control
    assert _changed(glob, x_glob, poke=(5, 5, 5), where=(1, 1, 1))
    assert _changed(glob, x_glob, poke=(7, 7, 7), where=(0, 0, 0))  # opposite corners


def test_nnformer_interleaves_windowed_and_global_attention():
    net = _net("nnformer")
    encoder = [m for stage in net.encoder for m in stage]
    assert encoder and all(isinstance(m, SwinBlock) for m in encoder)
    assert len(net.bottleneck) > 0 and all(isinstance(m, GlobalAttentionBlock) for m in net.bottleneck)
    assert all(isinstance(stage.skip_attn, SkipAttentionBlock) for stage in net.decoder)
    # Convolutions embed and down-sample; none of them in the transformer blocks.
    assert any(isinstance(m, nn.Conv3d) for m in net.embed.modules())
    assert all(any(isinstance(m, nn.Conv3d) for m in down.modules()) for down in net.downs)


def test_nnformer_skip_attention_reads_keys_from_the_skip_inside_the_window():
    torch.manual_seed(0)
    block = SkipAttentionBlock(dim=8, num_heads=2, window_size=4).eval()
    x_up = torch.randn(1, 8, 8, 8, 8)

    def from_skip(skip):
        return block(x_up, skip)

    skip = torch.randn(1, 8, 8, 8, 8)
    assert _changed(from_skip, skip, poke=(3, 2, 0), where=(1, 1, 1))  # key/value in the query's window
    assert not _changed(from_skip, skip, poke=(5, 5, 5), where=(1, 1, 1))  # other window


def test_nnformer_final_expanding_equals_transposed_convolution():
    torch.manual_seed(0)
    fe = FinalExpanding(dim=5, out_channels=3, scale=4)
    tconv = nn.ConvTranspose3d(5, 3, 4, stride=4)
    with torch.no_grad():
        # Linear weight (3*64, 5), feature index c*64 + p*16 + q*4 + r; tconv weight (5, 3, 4, 4, 4).
        tconv.weight.copy_(fe.proj.weight.view(3, 4, 4, 4, 5).permute(4, 0, 1, 2, 3))
        fe.proj.bias.copy_(tconv.bias.repeat_interleave(64))
    x = torch.randn(2, 3, 2, 4, 5)  # B, D, H, W, C
    assert torch.allclose(fe(x), tconv(x.permute(0, 4, 1, 2, 3)), atol=1e-5)


# --- VT-UNet ---------------------------------------------------------------------------------


def test_vtunet_decoder_output_changes_with_the_skip_through_cross_attention():
    """The finest decoder stage of the model: the skip reaches its output, and only through CA."""
    net = _net("vtunet").eval()
    stage = net.decoder[-1]
    assert all(isinstance(b, VTDecoderBlock) and b.alpha > 0 for b in stage.blocks)
    torch.manual_seed(1)
    x, skip = torch.randn(1, 8, 8, 8, 12), torch.randn(1, 8, 8, 8, 12)
    other = skip + torch.randn_like(skip)
    with torch.no_grad():
        fused, fused_other = stage(x, skip), stage(x, other)
        for b in stage.blocks:
            b.alpha = 0.0  # self-attention branch only
        sa_only, sa_only_other = stage(x, skip), stage(x, other)
    assert (fused - fused_other).abs().max() > 1e-3  # new skip tokens, new decoder output
    assert torch.equal(sa_only, sa_only_other)  # the CA branch is the skip's only way in ...
    assert (fused - sa_only).abs().max() > 1e-3  # ... and it is active in the fusion


def test_vtunet_cross_attention_is_windowed():
    torch.manual_seed(0)
    block = VTDecoderBlock(dim=8, num_heads=2, window_size=4, shift=False).eval()
    x = torch.randn(1, 8, 8, 8, 8)
    pe = fourier_position_encoding((8, 8, 8), 8, x.device)

    def from_skip(skip):
        return block(x, skip, pe)

    skip = torch.randn(1, 8, 8, 8, 8)
    assert _changed(from_skip, skip, poke=(3, 2, 0), where=(1, 1, 1))
    assert not _changed(from_skip, skip, poke=(5, 5, 5), where=(1, 1, 1))


def test_fourier_position_encoding():
    pe = fourier_position_encoding((3, 4, 5), 12, torch.device("cpu"))
    assert pe.shape == (1, 3, 4, 5, 12) and pe.abs().max() <= 1.0
    # 12 channels: 4 per axis, [sin, sin, cos, cos] of the index at frequencies 1 and 1/100.
    assert torch.allclose(pe[0, :, 0, 0, 0], torch.sin(torch.arange(3.0)))
    assert torch.equal(pe[0, 1, :, :, :4], pe[0, 1, :1, :1, :4].expand(4, 5, 4))  # the D part varies with d only
    assert torch.allclose(pe[0, 0, 0, :, 10], torch.cos(torch.arange(5.0)))
    codes = pe.reshape(-1, 12)
    assert torch.cdist(codes, codes).add(torch.eye(60)).min() > 1e-3  # every position has its own code


def test_vtunet_alpha_must_be_a_convex_weight():
    with pytest.raises(ValueError, match="convex"):
        VTDecoderBlock(dim=8, num_heads=2, window_size=4, shift=False, alpha=1.5)


# --- Swin-Unet -------------------------------------------------------------------------------


def test_swinunet_decoder_has_no_convolution():
    net = _net("swinunet")
    decoder = [net.expands, net.concat_back, net.decoder, net.norm_up, net.final, net.head]
    modules = [m for part in decoder for m in part.modules()]
    assert not any(isinstance(m, nn.modules.conv._ConvNd) for m in modules)
    assert sum(isinstance(m, PatchExpanding) for m in modules) == len(net.decoder)
    assert isinstance(net.final, FinalPatchExpanding)
    assert not any(isinstance(m, nn.modules.conv._ConvNd) for m in net.modules())  # the encoder neither


@pytest.mark.parametrize("grid", [(2, 3, 4), (1, 1, 1), (5, 2, 7)])
def test_swinunet_patch_expanding_is_the_inverse_of_merging_in_shape(grid):
    x = torch.randn(2, *grid, 16)
    up = PatchExpanding(16)(x)
    assert up.shape == (2, *(2 * s for s in grid), 8)
    assert PatchMerging(8)(up).shape == x.shape
    # The rearrangement itself is a bijection: merging's neighbourhood concatenation undoes it exactly.
    y = torch.randn(2, *grid, 8 * 3)
    back = rearrange(voxel_shuffle(y, 2), "b (d p) (h q) (w r) c -> b d h w (p q r c)", p=2, q=2, r=2)
    assert torch.equal(back, y)
    assert FinalPatchExpanding(8, 4)(x[..., :8]).shape == (2, *(4 * s for s in grid), 8)
