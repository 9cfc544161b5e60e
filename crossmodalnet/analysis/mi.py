"""Mutual information between two feature maps, with spatial positions as the samples.

    i = estimate_mi(fa, fb, estimator="gaussian", pca_dim=8)   # fa (..., Ca), fb (..., Cb) -> nats

Every position (voxel or token) is one joint sample (F_a(p), F_b(p)); the leading axes of the
two maps must match and are flattened to N samples. Each stream's features are reduced to at
most `pca_dim` principal components (fitted per stream, on all positions) and whitened, so that
layers of very different widths are measured in comparable, low dimensions.

Two estimators, both in nats:

- `gaussian_mi(x, y)`: MI of Gaussians with the sample covariances,
  0.5 log(det Σx det Σy / det Σxy), with a small ridge and (by default) the exact Wishart bias
  correction of each log-determinant, so that it stays unbiased for Gaussian data even when N is
  not much larger than the dimension (the deepest stage of a 64³ volume has 64 tokens). For
  non-Gaussian data it is the information carried by the *linear* (second-order) dependence: a
  lower bound on the true MI only for jointly Gaussian marginals, in general neither bound.
- `ksg_mi(x, y)`: Kraskov-Stögbauer-Grassberger estimator 1 (Phys. Rev. E 69, 066138, 2004):
  k-th neighbour distance ε_i in the joint space (max-norm), n_x(i), n_y(i) the numbers of
  points strictly closer than ε_i in each marginal,
  I = ψ(k) + ψ(N) − ⟨ψ(n_x + 1) + ψ(n_y + 1)⟩.
  Nonparametric; positions are subsampled to `max_samples` for speed, and tiny noise breaks ties
  (clipped CT intensities and padded tokens repeat exactly).

Shapes: x (N, dx), y (N, dy) arrays or tensors; features for `estimate_mi` (..., C).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.special import digamma

__all__ = ["MI_ESTIMATORS", "pca_reduce", "gaussian_mi", "ksg_mi", "estimate_mi"]

MI_ESTIMATORS: tuple[str, ...] = ("gaussian", "ksg")


def _as_samples(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """(N, d) or (N,) -> float64 array (N, d); refuses fewer than 2 samples or non-finite values."""
    arr = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"{name}: expected samples of shape (N >= 2, d >= 1), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def pca_reduce(x: np.ndarray | torch.Tensor, dim: int, whiten: bool = True) -> np.ndarray:
    """Project samples (N, C) on their first min(dim, C) principal components -> (N, k) float64.

    With `whiten`, each component is scaled to unit variance (components of zero variance, e.g. a
    constant channel, are dropped: they carry no information). Centred on the sample mean.
    """
    if dim < 1:
        raise ValueError(f"pca dimension must be >= 1, got {dim}")
    arr = _as_samples(x, "pca input")
    arr = arr - arr.mean(axis=0)
    # Rotate onto the principal axes even when C <= dim: whitening per *original* column would
    # leave correlated columns, an elongated cloud on which max-norm neighbours (KSG) are biased.
    _, _, vt = np.linalg.svd(arr, full_matrices=False)
    arr = arr @ vt[:dim].T
    if whiten:
        std = arr.std(axis=0)
        keep = std > 1e-12 * max(float(std.max()), 1e-300)
        if not keep.any():
            raise ValueError("pca input: every feature is constant; mutual information is undefined")
        arr = arr[:, keep] / std[keep]
    return arr


def _wishart_logdet_bias(d: int, n: int) -> float:
    """E[log det S] − log det Σ for the unbiased sample covariance S of n Gaussian samples in d dims.

    (n − 1) S ~ Wishart(Σ, n − 1), so E[log det S] = log det Σ + d log(2/(n−1)) + Σ_{i=1..d} ψ((n−i)/2).
    """
    return d * math.log(2.0 / (n - 1)) + float(sum(digamma((n - i) / 2.0) for i in range(1, d + 1)))


def gaussian_mi(
    x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, ridge: float = 1e-6, bias_correction: bool = True
) -> float:
    """Gaussian MI 0.5 (log det Σx + log det Σy − log det Σxy) in nats. x (N, dx), y (N, dy).

    ridge: added to the diagonal as a fraction of the mean variance, so that (near-)duplicate
    features do not make a determinant vanish. bias_correction: subtract the Wishart bias of each
    log-determinant (needs N > dx + dy + 1).
    """
    xa, ya = _as_samples(x, "x"), _as_samples(y, "y")
    if xa.shape[0] != ya.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {xa.shape[0]} and {ya.shape[0]}")
    n, dx, dy = xa.shape[0], xa.shape[1], ya.shape[1]
    if bias_correction and n <= dx + dy + 1:
        raise ValueError(f"bias-corrected Gaussian MI needs more samples ({n}) than dx + dy + 1 = {dx + dy + 1}")
    joint = np.concatenate([xa, ya], axis=1)
    cov = np.atleast_2d(np.cov(joint, rowvar=False))
    cov = cov + ridge * float(np.trace(cov)) / cov.shape[0] * np.eye(cov.shape[0])

    def logdet(m: np.ndarray) -> float:
        sign, value = np.linalg.slogdet(m)
        if sign <= 0:
            raise ValueError("covariance is singular even with the ridge; increase `ridge`")
        return float(value)

    lx, ly, lxy = logdet(cov[:dx, :dx]), logdet(cov[dx:, dx:]), logdet(cov)
    if bias_correction:
        lx -= _wishart_logdet_bias(dx, n)
        ly -= _wishart_logdet_bias(dy, n)
        lxy -= _wishart_logdet_bias(dx + dy, n)
    return 0.5 * (lx + ly - lxy)


def ksg_mi(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    k: int = 4,
    max_samples: int | None = 4096,
    noise: float = 1e-10,
    seed: int = 0,
) -> float:
    """KSG estimator 1 of I(x; y) in nats. x (N, dx), y (N, dy).

    k: neighbours (3-5 is the usual bias/variance trade-off). max_samples: random subsample of
    positions (None: all); the cost grows about as N log N per query, worse in high dimension.
    noise: standard deviation of the tie-breaking noise, relative to each column's std.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    xa, ya = _as_samples(x, "x"), _as_samples(y, "y")
    if xa.shape[0] != ya.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {xa.shape[0]} and {ya.shape[0]}")
    rng = np.random.default_rng(seed)
    n = xa.shape[0]
    if max_samples is not None and n > max_samples:
        idx = rng.choice(n, max_samples, replace=False)
        xa, ya, n = xa[idx], ya[idx], max_samples
    if n <= k:
        raise ValueError(f"KSG needs more samples ({n}) than neighbours k = {k}")
    # Noise relative to each column's spread: breaks exact ties without moving any real distance.
    xa = xa + noise * (xa.std(axis=0) + 1e-300) * rng.standard_normal(xa.shape)
    ya = ya + noise * (ya.std(axis=0) + 1e-300) * rng.standard_normal(ya.shape)
    joint = np.concatenate([xa, ya], axis=1)
    # k + 1 neighbours: the first is the point itself (distance 0).
    eps = cKDTree(joint).query(joint, k=k + 1, p=np.inf)[0][:, k]
    # "Strictly closer than eps": shrink the radius to the next float below.
    radius = np.nextafter(eps, 0)
    nx = cKDTree(xa).query_ball_point(xa, radius, p=np.inf, return_length=True) - 1
    ny = cKDTree(ya).query_ball_point(ya, radius, p=np.inf, return_length=True) - 1
    return float(digamma(k) + digamma(n) - np.mean(digamma(nx + 1) + digamma(ny + 1)))


def estimate_mi(
    fa: np.ndarray | torch.Tensor,
    fb: np.ndarray | torch.Tensor,
    estimator: str = "gaussian",
    pca_dim: int = 8,
    max_samples: int | None = 4096,
    k: int = 4,
    seed: int = 0,
) -> float:
    """I(F_a; F_b) in nats with positions as samples. fa (..., Ca), fb (..., Cb), same leading shape.

    Each stream is reduced to `pca_dim` whitened principal components first (`pca_reduce`).
    estimator: "gaussian" (all positions) or "ksg" (k neighbours, at most `max_samples` positions).
    """
    if estimator not in MI_ESTIMATORS:
        raise ValueError(f"estimator must be one of {MI_ESTIMATORS}, got {estimator!r}")
    if tuple(fa.shape[:-1]) != tuple(fb.shape[:-1]):
        raise ValueError(f"feature maps must share their positions, got {tuple(fa.shape)} and {tuple(fb.shape)}")
    xa = pca_reduce(fa.reshape(-1, fa.shape[-1]), pca_dim)
    xb = pca_reduce(fb.reshape(-1, fb.shape[-1]), pca_dim)
    if estimator == "gaussian":
        return gaussian_mi(xa, xb)
    return ksg_mi(xa, xb, k=k, max_samples=max_samples, seed=seed)
