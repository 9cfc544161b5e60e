"""Cross attention (Def. 2): the paper's variant is asymmetric and permutation-equivariant; the block
over n streams refines each with all the others."""

import pytest
import torch
from torch import nn

from crossmodalnet.models.cross_attention import CrossAttention, CrossTransformerBlock, cross_attention


def _weights(dim=8, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)


@pytest.mark.parametrize("variant", ["paper", "standard"])
def test_asymmetric(variant):
    wq, wk, wv = _weights()
    fa, fb = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    ab = cross_attention(fa, fb, wq, wk, wv, num_heads=2, variant=variant)
    ba = cross_attention(fb, fa, wq, wk, wv, num_heads=2, variant=variant)
    assert (ab - ba).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["paper", "standard"])
def test_permutation_equivariant(variant):
    wq, wk, wv = _weights()
    fa, fb = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    out = cross_attention(fa, fb, wq, wk, wv, num_heads=2, variant=variant)
    out_p = cross_attention(fa[:, perm], fb[:, perm], wq, wk, wv, num_heads=2, variant=variant)
    assert torch.allclose(out_p, out[:, perm], atol=1e-5)


def test_paper_variant_is_def2_literally():
    wq, wk, wv = _weights()
    fa, fb = torch.randn(1, 10, 8), torch.randn(1, 10, 8)
    out = cross_attention(fa, fb, wq, wk, wv, num_heads=1, variant="paper")
    expected = torch.softmax(wq(fb) @ wk(fa).mT / 8**0.5, dim=-1) @ wv(fb)
    assert torch.allclose(out[0], expected[0], atol=1e-5)
    std = cross_attention(fa, fb, wq, wk, wv, num_heads=1, variant="standard")
    assert torch.allclose(std[0], (torch.softmax(wq(fa) @ wk(fb).mT / 8**0.5, dim=-1) @ wv(fb))[0], atol=1e-5)


def test_unknown_variant_is_refused():
    wq, wk, wv = _weights()
    with pytest.raises(ValueError, match="variant"):
        cross_attention(torch.randn(1, 4, 8), torch.randn(1, 4, 8), wq, wk, wv, 2, variant="other")


def test_block_uses_inputs_before_update_and_separate_weights():
    torch.manual_seed(0)
    block = CrossTransformerBlock(dim=8, num_heads=2, window_size=4, shift=True, deformable=True).eval()
    fa, fb = torch.randn(1, 6, 5, 7, 8), torch.randn(1, 6, 5, 7, 8)
    out_a, out_b = block(fa, fb)
    assert out_a.shape == fa.shape and out_b.shape == fb.shape
    # Both refinements read the *inputs*: each equals its direction applied to the original pair.
    assert torch.equal(out_a, block.refine[0](fa, fb)) and torch.equal(out_b, block.refine[1](fb, fa))
    # Separate weights: the two directions are different functions.
    assert not torch.allclose(block.refine[0](fa, fb), block.refine[1](fa, fb))


def _offsets_off_zero(block: nn.Module) -> None:
    """Deformable offsets away from zero (as after training), so that resampling is not the identity."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            if ".deform.offsets." in name:
                p.normal_(std=0.3)


@pytest.mark.parametrize("variant", ["paper", "standard"])
def test_three_streams_each_refined_by_all_the_others(variant):
    torch.manual_seed(0)
    block = CrossTransformerBlock(dim=8, num_heads=2, window_size=4, shift=True, variant=variant, streams=3).eval()
    _offsets_off_zero(block)
    feats = [torch.randn(2, 6, 5, 7, 8) for _ in range(3)]
    outs = block(*feats)
    assert len(block.refine) == 3 and [o.shape for o in outs] == [f.shape for f in feats]
    for i, out in enumerate(outs):
        others = [f for j, f in enumerate(feats) if j != i]
        assert torch.equal(out, block.refine[i](feats[i], others))  # from the inputs, before any update
        # Every other stream matters: change one, the refinement of stream i changes.
        for j in (j for j in range(3) if j != i):
            moved = [f if k != j else f.flip(1) for k, f in enumerate(feats)]
            assert not torch.allclose(block(*moved)[i], out)
    with pytest.raises(ValueError, match="refines 3 streams, got 2"):
        block(*feats[:2])


def test_attention_over_several_streams_standard_is_one_softmax_paper_is_a_mean():
    torch.manual_seed(0)
    attn = CrossAttention(dim=8, num_heads=2, window_size=2, variant="standard").eval()
    xa, xb, xc = (torch.randn(3, 8, 8) for _ in range(3))  # 3 windows of 2³ tokens
    bias = attn.bias()
    with torch.no_grad():
        # Standard: keys/values are both streams' windows side by side, each key with its offset's bias.
        expected = cross_attention(xa, torch.cat([xb, xc], 1), attn.q, attn.k, attn.v, 2, "standard",
                                   bias.repeat(1, 1, 2))
        torch.testing.assert_close(attn(xa, [xb, xc], None, 3), attn.proj(expected))
        # With one other stream it is the two-stream attention, exactly.
        assert torch.equal(attn(xa, [xb], None, 3), attn(xa, xb, None, 3))
        attn.variant = "paper"  # Def. 2 is square: once per other stream, then the mean
        per = [cross_attention(xa, y, attn.q, attn.k, attn.v, 2, "paper", bias) for y in (xb, xc)]
        torch.testing.assert_close(attn(xa, [xb, xc], None, 3), attn.proj((per[0] + per[1]) / 2))
    with pytest.raises(ValueError, match="one size"):
        cross_attention(xa, torch.cat([xb, xc], 1), attn.q, attn.k, attn.v, 2, "paper")


def test_standard_keys_from_several_streams_respect_the_window_mask():
    # Shifted windows with padding: a padded or cross-region key of any stream gets no weight, so
    # appending a stream whose tokens equal another's gives the same output (the same keys twice).
    torch.manual_seed(0)
    block = CrossTransformerBlock(dim=8, num_heads=2, window_size=4, shift=True, deformable=False, streams=3).eval()
    fa, fb = torch.randn(1, 6, 5, 7, 8), torch.randn(1, 6, 5, 7, 8)
    with torch.no_grad():
        twice = block.refine[0](fa, [fb, fb])
        once = block.refine[0](fa, [fb])
    torch.testing.assert_close(twice, once)


def test_a_block_needs_two_streams():
    with pytest.raises(ValueError, match="at least 2 streams"):
        CrossTransformerBlock(dim=8, num_heads=2, window_size=4, shift=False, streams=1)
