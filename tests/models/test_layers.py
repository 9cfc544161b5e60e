"""Swin building blocks: window partition, shifted-window masks, padding, patch merging, upsampling."""

import pytest
import torch

from crossmodalnet.models.layers import (
    PatchMerging,
    RelativePositionBias,
    SwinBlock,
    UpSample,
    window_mask,
    window_partition,
    window_reverse,
)


def test_window_partition_round_trip():
    x = torch.randn(2, 8, 12, 4, 5)
    w = window_partition(x, 4)
    assert w.shape == (2 * 2 * 3 * 1, 64, 5)
    assert torch.equal(window_reverse(w, 4, (2, 8, 12, 4)), x)
    # The first window holds exactly the first 4x4x4 corner, in raster order.
    assert torch.equal(w[0], x[0, :4, :4, :4].reshape(64, 5))


def _block(shift: bool) -> SwinBlock:
    torch.manual_seed(0)
    return SwinBlock(dim=8, num_heads=2, window_size=4, shift=shift).eval()


def _changed(block, size, poke, where) -> bool:
    """Does perturbing token `poke` change the block's output at token `where`?"""
    torch.manual_seed(1)
    x = torch.randn(1, *size, 8)
    y = x.clone()
    y[(0, *poke)] += 5.0 * torch.randn(8)  # not a constant: LayerNorm would remove it
    with torch.no_grad():
        a, b = block(x), block(y)
    return not torch.allclose(a[(0, *where)], b[(0, *where)], atol=1e-6)


def test_window_attention_stays_inside_windows():
    block = _block(shift=False)
    assert not _changed(block, (8, 8, 8), poke=(5, 5, 5), where=(1, 1, 1))  # other window
    assert _changed(block, (8, 8, 8), poke=(3, 2, 0), where=(1, 1, 1))  # same window: positive control


def test_shifted_window_mask_stops_attention_across_borders():
    block = _block(shift=True)  # shift 2: windows cover [2, 6) in each axis, and the wrapped corners
    assert _changed(block, (8, 8, 8), poke=(5, 5, 5), where=(2, 2, 2))  # inside one shifted window
    assert not _changed(block, (8, 8, 8), poke=(1, 1, 1), where=(2, 2, 2))  # neighbouring shifted window
    # 7 and 0 share a rolled window but are far apart in the volume: the mask must separate them.
    assert not _changed(block, (8, 8, 8), poke=(0, 0, 0), where=(7, 7, 7))
    assert _changed(block, (8, 8, 8), poke=(6, 6, 6), where=(7, 7, 7))


def test_padding_tokens_are_masked_as_keys():
    # 6^3 is padded to 8^3; the mask covers padded keys so real outputs do not see the zeros.
    mask = window_mask((6, 6, 6), (8, 8, 8), ws=4, shift=0, device=torch.device("cpu"))
    assert mask.shape == (8, 64, 64)
    # In the first window (all real tokens) nothing is masked; the last window keys at index >= 2 are pads.
    assert mask[0].max() == 0
    assert (mask[-1][:, 0] == 0).all() and (mask[-1][:, -1] < -1e3).all()
    assert window_mask((8, 8, 8), (8, 8, 8), ws=4, shift=0, device=torch.device("cpu")) is None


@pytest.mark.parametrize("size", [(5, 7, 9), (4, 4, 4), (3, 11, 6)])
def test_swin_block_any_size(size):
    block = _block(shift=True)
    x = torch.randn(2, *size, 8)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_relative_position_bias_shape_and_symmetry_of_index():
    rpb = RelativePositionBias(window_size=3, num_heads=2)
    bias = rpb()
    assert bias.shape == (2, 27, 27)
    # Same relative offset -> same table entry: (0 -> 1) along the last axis equals (1 -> 2).
    assert rpb.index[0, 1] == rpb.index[1, 2] and rpb.index[0, 1] != rpb.index[1, 0]


def test_patch_merging_halves_grid_and_doubles_channels():
    pm = PatchMerging(6)
    assert pm(torch.randn(2, 5, 8, 3, 6)).shape == (2, 3, 4, 2, 12)


def test_upsample_equals_transposed_convolution():
    """UpSample is ConvTranspose3d(k=2, s=2) written as 1x1 conv + voxel shuffle: same function."""
    torch.manual_seed(0)
    up = UpSample(5, 3)
    tconv = torch.nn.ConvTranspose3d(5, 3, 2, stride=2, bias=False)
    with torch.no_grad():
        # proj weight (3*8, 5, 1, 1, 1) with channel index c*8 + p*4 + q*2 + r; tconv weight (5, 3, 2, 2, 2).
        tconv.weight.copy_(up.proj.weight.view(3, 2, 2, 2, 5).permute(4, 0, 1, 2, 3))
        up.proj.bias.zero_()
    x = torch.randn(2, 5, 3, 4, 2)
    assert torch.allclose(up(x), tconv(x), atol=1e-5)


def test_drop_path_schedule_rises_linearly_over_all_blocks():
    from crossmodalnet.models.layers import drop_path_schedule

    sched = drop_path_schedule((2, 1, 3), 0.5)
    assert [len(s) for s in sched] == [2, 1, 3]
    flat = [r for s in sched for r in s]
    assert flat[0] == 0.0 and abs(flat[-1] - 0.5) < 1e-7
    assert all(abs((b - a) - 0.1) < 1e-6 for a, b in zip(flat, flat[1:], strict=False))


def _window_attention_repeated(q, k, v, bias, mask, batch):
    """The formula before the mask was broadcast: bias + mask repeated over the batch (the reference)."""
    bias = bias.to(q.dtype)
    if mask is None:
        attn_mask = bias.unsqueeze(0)
    else:
        attn_mask = (bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)).repeat(batch, 1, 1, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


@pytest.mark.parametrize("shift", [None, False, True], ids=["no_mask", "padding", "shifted"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_window_attention_broadcast_mask_equals_repeated_mask(shift, grad):
    # 6 x 7 x 9 pads to 8 x 8 x 12 with window 4: a padding mask when unshifted, padding + Swin regions when
    # shifted; 8 x 8 x 12 unshifted needs none. With grad (training on the CPU) the product is written out
    # (`layers._attention`), and must equal SDPA's, gradients included.
    from crossmodalnet.models.layers import window_attention

    torch.manual_seed(0)
    batch, heads, ws, d = 3, 2, 4, 5
    size = (8, 8, 12) if shift is None else (6, 7, 9)
    mask = window_mask(size, (8, 8, 12), ws, ws // 2 if shift else 0, torch.device("cpu"))
    n_w, n = 2 * 2 * 3, ws**3
    assert (mask is None) == (shift is None)
    assert mask is None or (mask.shape == (n_w, n, n) and (mask != 0).any())
    # float64: a query row whose keys are all masked (a padding token, cropped later) sums -1e4 and the
    # bias, which float32 rounds differently in the two formulas.
    q, k, v = (torch.randn(batch * n_w, heads, n, d, dtype=torch.float64, requires_grad=grad) for _ in range(3))
    bias = torch.randn(heads, n, n, dtype=torch.float64, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        new = window_attention(q, k, v, bias, mask, batch)
        old = _window_attention_repeated(q, k, v, bias, mask, batch)
    assert new.shape == old.shape == (batch * n_w, heads, n, d)
    torch.testing.assert_close(new, old, atol=1e-6, rtol=0)
    if grad:  # the bias is learned: its gradient (summed over the batch) must match too
        g_new = torch.autograd.grad(new.square().sum(), (q, bias))
        g_old = torch.autograd.grad(old.square().sum(), (q, bias))
        for a, b in zip(g_new, g_old, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("module", ["layers", "cross_attention"])
def test_blocks_with_broadcast_mask_match_repeated_mask(shift, module, monkeypatch):
    """A Swin block and a Cross Transformer, batch 2, against the same block on the repeat-based formula."""
    import importlib

    from crossmodalnet.models.cross_attention import CrossTransformer

    torch.manual_seed(0)
    if module == "layers":
        block = SwinBlock(dim=12, num_heads=3, window_size=4, shift=shift)

        def run():
            return block(x)
    else:
        block = CrossTransformer(12, 3, 4, shift=shift, variant="standard", deformable=False, num_points=4,
                                 max_offset=2.0)

        def run():
            return block(x, y)
    x, y = torch.randn(2, 6, 7, 9, 12), torch.randn(2, 6, 7, 9, 12)
    new = run()
    monkeypatch.setattr(importlib.import_module(f"crossmodalnet.models.{module}"), "window_attention",
                        _window_attention_repeated)
    old = run()
    torch.testing.assert_close(new, old, atol=1e-6, rtol=0)
