"""Adversarial pieces of JADA: gradient reversal, domain discriminators, the CDAN multilinear map.

DANN (Ganin et al. 2016): a discriminator D learns to tell source from target features while the
encoder, through a gradient reversal layer (identity forward, -lambda * grad backward), learns to
make them indistinguishable. One backward pass trains both:

    logits = discriminator(grad_reverse(features, lam))   # features (B, F) -> logits (B,)
    loss, acc = domain_loss(logits, domain)               # domain (B,) 1 = source, 0 = target

CDAN (Long et al. 2018) conditions the discriminator on the predicted class probabilities g with
the multilinear map f (x) g (the flattened outer product, (B, F * K)), or its randomised version
(R_f f) * (R_g g) / sqrt(d) with fixed Gaussian R_f (F, d), R_g (K, d) when F * K is too large.
Entropy conditioning (CDAN+E) weights each sample by 1 + exp(-H(g)), so that confident
predictions count more.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "grad_reverse", "grl_coefficient", "DomainDiscriminator", "MultilinearMap", "voxel_entropy", "entropy_weights",
    "domain_loss", "random_transfer", "discriminator_inputs", "mean_entropy",
]


class _GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by -coeff on the way back."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Gradient reversal layer: returns x (any shape); backward passes -coeff * grad to x."""
    return _GradientReversal.apply(x, float(coeff))


def grl_coefficient(progress: float, gamma: float = 10.0, scale: float = 1.0) -> float:
    """DANN's ramp of the reversal coefficient: scale * (2 / (1 + exp(-gamma * p)) - 1).

    progress p in [0, 1] (share of the adaptation done): 0 at the start, so that the noisy early
    discriminator does not disturb the pretrained encoder, and ~scale from p ~ 0.5 on.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    return scale * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


class DomainDiscriminator(nn.Module):
    """(Linear - ReLU - Dropout) x 2 - Linear: features (B, in_features) -> domain logits (B,)."""

    def __init__(self, in_features: int, hidden: int = 256, dropout: float = 0.5) -> None:
        super().__init__()
        if in_features < 1 or hidden < 1:
            raise ValueError(f"in_features and hidden must be positive, got {in_features}, {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class MultilinearMap(nn.Module):
    """CDAN conditioning T(f, g): f (B, features), g (B, classes) -> (B, out_features).

    Exact outer product (out_features = features * classes) while that is at most `max_dim`;
    otherwise the randomised map of `random_dim` outputs, whose fixed matrices are drawn from
    `seed` and kept as buffers (so a checkpoint and a resumed run use the same ones).
    """

    def __init__(self, features: int, classes: int, max_dim: int = 4096, random_dim: int = 1024,
                 seed: int = 0) -> None:
        super().__init__()
        if features < 1 or classes < 1:
            raise ValueError(f"features and classes must be positive, got {features}, {classes}")
        self.features, self.classes = features, classes
        self.randomized = features * classes > max_dim
        if self.randomized:
            if random_dim < 1:
                raise ValueError(f"random_dim must be positive, got {random_dim}")
            gen = torch.Generator().manual_seed(seed)
            self.register_buffer("r_f", torch.randn(features, random_dim, generator=gen))
            self.register_buffer("r_g", torch.randn(classes, random_dim, generator=gen))
            self.out_features = random_dim
        else:
            self.out_features = features * classes

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if f.shape[-1] != self.features or g.shape[-1] != self.classes or f.shape[0] != g.shape[0]:
            raise ValueError(f"expected f (B, {self.features}) and g (B, {self.classes}), "
                             f"got {tuple(f.shape)} and {tuple(g.shape)}")
        if self.randomized:
            # E[<T(f,g), T(f',g')>] = <f,f'><g,g'>: the outer product's inner products, in expectation.
            return (f @ self.r_f) * (g @ self.r_g) / math.sqrt(self.out_features)
        return torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).flatten(1)  # B, K * F


def voxel_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of class probabilities (B, K, *spatial) over the class axis: (B, *spatial), in nats."""
    p = probs.clamp_min(1e-8)
    return -(p * p.log()).sum(1)


def entropy_weights(probs: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    """CDAN+E sample weights (B,) from probabilities (B, K, *spatial) or (B, K).

    w = 1 + exp(-H), H the mean entropy per voxel (a segmentation's confidence), normalised to
    sum 1 within each domain so that neither domain dominates; the sum over the batch is 2 (or 1
    with a single domain). Detached: the weights condition the loss, they are not trained.
    """
    h = voxel_entropy(probs.detach().float())
    h = h.flatten(1).mean(1) if h.dim() > 1 else h
    w = 1.0 + torch.exp(-h)
    out = torch.zeros_like(w)
    for d in (0, 1):
        mask = domain == d
        if mask.any():
            out[mask] = w[mask] / w[mask].sum()
    return out


def domain_loss(logits: torch.Tensor, domain: torch.Tensor,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Binary cross-entropy of discriminator logits (B,) against domain (B,) (1 source, 0 target).

    weights (B,): per-sample weights (e.g. `entropy_weights`); the loss is their weighted mean.
    Returns (loss, accuracy of logit > 0 as a float).
    """
    target = domain.to(logits.dtype)
    per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    loss = per.mean() if weights is None else (per * weights).sum() / weights.sum()
    accuracy = float(((logits.detach() > 0).to(target.dtype) == target).float().mean())
    return loss, accuracy


def random_transfer(images: torch.Tensor, prob: float, rng: np.random.Generator, knots: int = 6) -> torch.Tensor:
    """Random intensity transfer functions: images (B, 1, *patch) -> same shape, new tensor.

    Each image is remapped, with probability `prob`, through a random piecewise-linear curve over
    its own intensity range: `knots` evenly spaced inputs mapped to uniform random outputs in that
    range, so the curve is generally not monotone and tissue contrasts are reshuffled (domain
    randomisation, as Bezier-curve remapping or random-convolution augmentation). The result keeps
    the image's mean and standard deviation. Edges and shapes are untouched: a model trained on
    such sources must recognise structures by shape and context more than by their brightness.
    """
    out = images.clone()
    for i in range(images.shape[0]):
        if rng.random() >= prob:
            continue
        x = images[i]
        lo, hi = float(x.min()), float(x.max())
        if hi - lo < 1e-6:
            continue
        xs = torch.linspace(lo, hi, knots, dtype=x.dtype)
        ys = torch.as_tensor(rng.uniform(lo, hi, knots), dtype=x.dtype)
        j = torch.bucketize(x.clamp(lo, hi), xs[1:-1])  # segment index 0 .. knots - 2
        t = (x - xs[j]) / (xs[j + 1] - xs[j])
        y = ys[j] + t * (ys[j + 1] - ys[j])
        out[i] = (y - y.mean()) / y.std().clamp_min(1e-6) * x.std() + x.mean()
    return out


def discriminator_inputs(features: torch.Tensor, probs: torch.Tensor, domain: torch.Tensor,
                          token_level: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the discriminators see: (features (N, 2C), class probabilities (N, K), domain (N,)).

    features (2B, 2C, d, h, w), probs (2B, K, *patch), domain (2B,). Global: N = 2B, the patch
    averages. Token level: N = 2B * d * h * w, every position of the feature map with the
    probabilities averaged over the voxels it covers, so that the discriminator judges local
    appearance (as patch discriminators of segmentation UDA do) and sees 2B * dhw samples a step.
    """
    if not token_level:
        return features.mean(dim=(2, 3, 4)), probs.mean(dim=(2, 3, 4)), domain
    grid = features.shape[2:]
    g = torch.nn.functional.adaptive_avg_pool3d(probs, grid)  # 2B, K, d, h, w
    n = math.prod(grid)
    return (features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1]),
            g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1]), domain.repeat_interleave(n))


def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean voxel entropy of probabilities (B, K, *spatial), divided by log K: in [0, 1]."""
    return voxel_entropy(probs).mean() / math.log(probs.shape[1])
