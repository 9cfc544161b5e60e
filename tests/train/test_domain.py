"""Gradient reversal, the DANN ramp, domain discriminators, the CDAN map and entropy weights."""

from __future__ import annotations

import math

import pytest
import torch

from crossmodalnet.train.domain import (
    DomainDiscriminator,
    MultilinearMap,
    domain_loss,
    entropy_weights,
    grad_reverse,
    grl_coefficient,
)


@pytest.mark.parametrize("coeff", [0.0, 0.3, 1.0, 2.5])
def test_gradient_reversal_is_identity_forward_and_negated_scaled_backward(coeff):
    x = torch.randn(3, 5, requires_grad=True)
    y = grad_reverse(x, coeff)
    assert torch.equal(y, x)
    upstream = torch.randn(3, 5)
    y.backward(upstream)
    assert torch.allclose(x.grad, -coeff * upstream)


def test_gradient_reversal_trains_the_discriminator_normally_and_the_encoder_against_it():
    torch.manual_seed(0)
    encoder, disc = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    x = torch.randn(8, 4)
    domain = torch.tensor([1.0] * 4 + [0.0] * 4)

    def grads(reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        encoder.zero_grad()
        disc.zero_grad()
        f = encoder(x)
        logits = disc(grad_reverse(f, 1.0) if reverse else f).squeeze(-1)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, domain).backward()
        return encoder.weight.grad.clone(), disc.weight.grad.clone()

    (enc_plain, disc_plain), (enc_rev, disc_rev) = grads(False), grads(True)
    assert torch.allclose(disc_rev, disc_plain)
    assert torch.allclose(enc_rev, -enc_plain)


def test_grl_ramp_values():
    assert grl_coefficient(0.0) == 0.0
    assert grl_coefficient(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert grl_coefficient(1.0) == pytest.approx(0.999909, abs=1e-6)
    assert grl_coefficient(1.0, scale=0.1) == pytest.approx(0.0999909, abs=1e-7)
    values = [grl_coefficient(p / 10) for p in range(11)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="progress"):
            grl_coefficient(bad)


def test_discriminator_shapes_and_bad_arguments():
    d = DomainDiscriminator(12, hidden=8, dropout=0.5)
    assert d(torch.randn(5, 12)).shape == (5,)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in d.modules())
    n_dropout = sum(isinstance(m, torch.nn.Dropout) for m in d.modules())
    assert (n_linear, n_dropout) == (3, 2)
    with pytest.raises(ValueError, match="dropout"):
        DomainDiscriminator(12, dropout=1.0)
    with pytest.raises(ValueError, match="positive"):
        DomainDiscriminator(0)


def test_multilinear_map_is_the_outer_product_when_small():
    f, g = torch.randn(3, 6), torch.softmax(torch.randn(3, 4), 1)
    m = MultilinearMap(6, 4, max_dim=4096)
    assert not m.randomized and m.out_features == 24
    out = m(f, g)
    assert out.shape == (3, 24)
    assert torch.allclose(out.view(3, 4, 6), g[:, :, None] * f[:, None, :])
    assert len(m.state_dict()) == 0


def test_randomized_map_beyond_max_dim_is_fixed_by_seed_and_preserves_inner_products():
    torch.manual_seed(1)
    f, g = torch.randn(4, 64), torch.softmax(torch.randn(4, 8), 1)
    m = MultilinearMap(64, 8, max_dim=256, random_dim=20_000, seed=3)
    assert m.randomized and m.out_features == 20_000
    assert set(m.state_dict()) == {"r_f", "r_g"}  # buffers: a checkpoint carries them
    out = m(f, g)
    assert out.shape == (4, 20_000)
    assert torch.equal(out, MultilinearMap(64, 8, max_dim=256, random_dim=20_000, seed=3)(f, g))
    assert not torch.equal(out, MultilinearMap(64, 8, max_dim=256, random_dim=20_000, seed=4)(f, g))
    # E <T(f,g), T(f',g')> = <f,f'> <g,g'>: the Gram matrices agree up to the sampling error.
    exact = (f @ f.T) * (g @ g.T)
    approx = out @ out.T
    assert torch.allclose(approx, exact, atol=0.15 * float(exact.diagonal().max()))


def test_multilinear_map_bad_arguments():
    m = MultilinearMap(6, 4)
    with pytest.raises(ValueError, match="expected f"):
        m(torch.randn(3, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="positive"):
        MultilinearMap(0, 4)


def test_entropy_weights_favour_confident_samples_and_normalise_per_domain():
    confident = torch.zeros(1, 8, 2, 2, 2)
    confident[:, 3] = 1.0
    uncertain = torch.full((1, 8, 2, 2, 2), 1 / 8)
    probs = torch.cat([confident, uncertain, confident, uncertain])
    domain = torch.tensor([1, 1, 0, 0])
    w = entropy_weights(probs, domain)
    assert w.shape == (4,)
    assert float(w[domain == 1].sum()) == pytest.approx(1.0)
    assert float(w[domain == 0].sum()) == pytest.approx(1.0)
    assert w[0] > w[1] and w[2] > w[3]
    assert not w.requires_grad


def test_domain_loss_accuracy_and_weights():
    domain = torch.tensor([1.0, 1.0, 0.0, 0.0])
    perfect = torch.tensor([9.0, 9.0, -9.0, -9.0])
    loss, acc = domain_loss(perfect, domain)
    assert acc == 1.0 and float(loss) < 1e-3
    chance_loss, chance_acc = domain_loss(torch.zeros(4), domain)
    assert float(chance_loss) == pytest.approx(math.log(2))
    assert chance_acc == 0.5  # logit 0 says "target" for everyone
    wrong_first = torch.tensor([-9.0, 9.0, -9.0, -9.0])
    w = torch.tensor([0.0, 1.0, 1.0, 1.0])  # a weight of 0 removes the wrong sample
    assert float(domain_loss(wrong_first, domain, w)[0]) < 1e-3
