"""Cross attention (Def. 2): the paper's variant is asymmetric and permutation-equivariant."""

import pytest
import torch
from torch import nn

from crossmodalnet.models.cross_attention import CrossTransformerBlock, cross_attention


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
    # Both directions read the *inputs*: each equals its direction applied to the original pair.
    assert torch.allclose(out_a, block.a_from_b(fa, fb)) and torch.allclose(out_b, block.b_from_a(fb, fa))
    # Separate weights: the two directions are different functions.
    assert not torch.allclose(block.a_from_b(fa, fb), block.b_from_a(fa, fb))
