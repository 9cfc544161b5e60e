"""Deformable operator (Def. 3): identity at initialisation, exact shifts, weights normalised."""

import math

import torch

from crossmodalnet.models.deformable import DeformableOp, sample_at_offsets


def test_zero_offsets_are_identity():
    torch.manual_seed(0)
    op = DeformableOp(dim=6, num_points=4, max_offset=2.0)
    q, v = torch.randn(2, 5, 6, 7, 6), torch.randn(2, 5, 6, 7, 6)
    assert torch.allclose(op(q, v), v, atol=1e-6)


def test_constant_offset_equals_shifted_volume_on_interior():
    torch.manual_seed(0)
    op = DeformableOp(dim=4, num_points=2, max_offset=2.0)
    with torch.no_grad():
        # Offsets (D, H, W) = (1, 0, -1) voxels for every point: tanh(b) * 2 = +-1.
        bias = torch.tensor([math.atanh(0.5), 0.0, -math.atanh(0.5)] * 2)
        op.offsets.bias.copy_(bias)
    q, v = torch.randn(1, 8, 8, 8, 4), torch.randn(1, 8, 8, 8, 4)
    out = op(q, v)
    # out[d, h, w] = v[d + 1, h, w - 1] wherever that sample lies inside the volume.
    assert torch.allclose(out[:, :-1, :, 1:], v[:, 1:, :, :-1], atol=1e-5)


def test_half_voxel_offset_is_trilinear_average():
    v = torch.randn(1, 3, 6, 6, 6)
    off = torch.zeros(1, 1, 6, 6, 6, 3)
    off[..., 2] = 0.5
    s = sample_at_offsets(v, off)[:, 0]
    assert torch.allclose(s[..., :-1], 0.5 * (v[..., :-1] + v[..., 1:]), atol=1e-5)


def test_offsets_bounded_and_weights_sum_to_one():
    torch.manual_seed(0)
    op = DeformableOp(dim=4, num_points=3, max_offset=1.5)
    with torch.no_grad():
        op.offsets.weight.normal_(std=10.0)
        op.weights.weight.normal_(std=10.0)
    off, wts = op.predict(torch.randn(2, 4, 4, 4, 4))
    assert off.shape == (2, 3, 4, 4, 4, 3) and wts.shape == (2, 3, 4, 4, 4)
    assert off.abs().max() <= 1.5 + 1e-6
    assert torch.allclose(wts.sum(1), torch.ones(2, 4, 4, 4), atol=1e-6)


def test_gradients_reach_offset_predictor():
    torch.manual_seed(0)
    op = DeformableOp(dim=4, num_points=2)
    q, v = torch.randn(1, 6, 6, 6, 4), torch.randn(1, 6, 6, 6, 4)
    g = torch.randn(1, 6, 6, 6, 4)
    (op(q, v) * g).sum().backward()
    assert op.offsets.weight.grad.abs().sum() > 0
    # At initialisation all K samples coincide, so the mixing weights have exactly zero gradient;
    # as soon as the offsets move apart, they learn too.
    assert op.weights.weight.grad.abs().sum() == 0
    with torch.no_grad():
        op.offsets.bias.normal_(std=0.5)
    op.zero_grad()
    (op(q, v) * g).sum().backward()
    assert op.weights.weight.grad.abs().sum() > 0
    # Parameter count is independent of the map size (Theorem 2.2 predicts 3KHW instead).
    assert op.extra_parameters == 2 * 4 + 4 * 6 + 6 + 4 * 2 + 2
