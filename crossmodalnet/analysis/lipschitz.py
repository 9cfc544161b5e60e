"""Empirical local Lipschitz constants of a segmentation network, and per-layer product bounds.

    emp = local_lipschitz(model, image)         # {"random": ..., "gradient": ..., "output_norm": ...}
    bounds = product_bounds(model)               # {"log10_paths": ..., "log10_paper": ..., ...}

Input space: the image (1, M, D, H, W), every channel present, with the Euclidean norm over all channels;
output space: the logits (1, C, D, H, W), Euclidean norm. All ratios are ‖F(x + δ) − F(x)‖ / ‖δ‖.

- random directions: δ Gaussian, scaled to ‖δ‖ = ε; the largest ratio over the draws.
- gradient direction: power iteration on JᵀJ at x (J the Jacobian of the logits): J v by a
  finite difference of step ε, Jᵀ u exactly by autograd; converges to the top singular vector,
  whose ratio is the local Lipschitz constant (the largest one of any direction, up to ε).

Per-layer bounds from the spectral norms s_ℓ of every Linear and Conv3d weight (a conv's kernel
reshaped to (out, in·k³), times √(⌈k/stride⌉³), since each input voxel enters at most that many
patches): "paths" = Π_ℓ (1 + s_ℓ), the product of per-layer bounds formed so that it covers every
residual, skip and concatenation path of the graph (each path's product of norms is one term of the
expansion; a plain Π s_ℓ would be meaningless here, since layers off the value path, such as the
zero-initialised offset predictors, would multiply it by 0); "paper" = Eq. 30,
(L_S · L_C · L_D)^d with L_S, L_C the largest Swin / Cross Transformer block bound
(1 + s_v s_proj)(1 + s_fc1 s_fc2), L_D = 1 and d the number of stages (encoder only, as the
paper writes it). Both treat LayerNorm, InstanceNorm and the softmax attention weights as
1-Lipschitz, which they are not globally (dot-product attention has no global Lipschitz constant,
Kim et al. 2021; normalisation divides by the input's spread): they are the numbers the paper's
argument produces, not certified bounds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["local_lipschitz", "spectral_norm", "product_bounds"]


def _logits(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    out = model(image)
    return (out[0] if isinstance(out, list | tuple) else out).float()


def local_lipschitz(
    model: nn.Module,
    image: torch.Tensor,
    eps: float = 1e-3,
    random_draws: int = 4,
    power_iterations: int = 6,
    seed: int = 0,
) -> dict[str, float]:
    """Local Lipschitz estimates of `model` at `image` (1, M, D, H, W), D, H, W multiples of the divisor.

    eps: perturbation size relative to ‖x‖. Returns ratios for random and gradient (power
    iteration) directions, plus ‖x‖, ‖F(x)‖ and ε, so that Cor. 2's bound L ε can be compared
    with the output itself.
    """
    model.eval()
    device = next(model.parameters()).device
    x = image.to(device).float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_norm = float(x.norm())
    step = eps * x_norm

    def forward(z: torch.Tensor) -> torch.Tensor:
        return _logits(model, z)

    with torch.no_grad():
        base = forward(x)
        ratios = []
        for _ in range(random_draws):
            d = torch.randn(x.shape, generator=gen).to(device)
            d = d * (step / d.norm())
            ratios.append(float((forward(x + d) - base).norm()) / step)
    v = torch.randn(x.shape, generator=gen).to(device)
    v = v / v.norm()
    trace = []  # ‖J v‖ per iteration: rises to the top singular value as v converges
    # Gradients w.r.t. the input only: freezing the weights halves the cost of each backward pass.
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for _ in range(power_iterations):
            with torch.no_grad():
                ju = (forward(x + step * v) - base) / step  # J v (finite difference)
            trace.append(float(ju.norm()))
            z = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad((forward(z) * ju).sum(), z)  # Jᵀ (J v)
            v = g / g.norm().clamp_min(1e-30)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        trace.append(float((forward(x + step * v) - base).norm()) / step)
    return {"random": max(ratios), "random_median": float(torch.tensor(ratios).median()),
            "gradient": max(trace), "gradient_trace": trace, "input_norm": x_norm, "output_norm": float(base.norm()),
            "eps": step, "random_draws": random_draws, "power_iterations": power_iterations}


def spectral_norm(weight: torch.Tensor, stride: int | tuple[int, ...] = 1) -> float:
    """Operator-norm bound of a Linear (out, in) or Conv3d (out, in, k, k, k) weight.

    Conv: ‖W reshaped (out, in·k³)‖₂ · √(Π_axes ⌈k/stride⌉): each input voxel enters at most that
    many output patches, so ‖conv(x)‖² ≤ Σ_patches ‖W‖² ‖x_patch‖² ≤ ‖W‖² m ‖x‖².
    """
    w = weight.detach().float()
    if w.ndim == 2:
        return float(torch.linalg.matrix_norm(w, ord=2))
    strides = (stride,) * (w.ndim - 2) if isinstance(stride, int) else tuple(stride)
    overlap = math.prod(math.ceil(k / s) for k, s in zip(w.shape[2:], strides, strict=True))
    return float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)) * math.sqrt(overlap)


def _block_bound(v: torch.Tensor, proj: nn.Linear, fc1: nn.Linear, fc2: nn.Linear) -> float:
    """(1 + s_v s_proj)(1 + s_fc1 s_fc2): attention branch along the value path, then the MLP branch."""
    attention = 1 + spectral_norm(v) * spectral_norm(proj.weight)
    return attention * (1 + spectral_norm(fc1.weight) * spectral_norm(fc2.weight))


def product_bounds(model: nn.Module) -> dict[str, float]:
    """log10 of the "paths" and "paper" products (see the module docstring), and the layer count."""
    norms = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            norms.append(spectral_norm(module.weight))
        elif isinstance(module, nn.Conv3d):
            norms.append(spectral_norm(module.weight, module.stride))
    out = {"layers": len(norms), "log10_paths": sum(math.log10(1 + s) for s in norms)}
    streams = getattr(model, "streams", None)
    if streams is not None:  # CrossModalNet: the paper's per-block bounds over every stream
        stages = streams[0].stages
        swin = [b for stream in streams for stage in stream.stages for b in stage]
        l_s = max(_block_bound(b.attn.qkv.weight[2 * b.attn.qkv.out_features // 3:], b.attn.proj, b.mlp.fc1,
                               b.mlp.fc2) for b in swin)
        cross = [] if model.cross is None else [d for blk in model.cross for d in blk.refine]
        l_c = max((_block_bound(d.attn.v.weight, d.attn.proj, d.mlp.fc1, d.mlp.fc2) for d in cross), default=1.0)
        depth = len(stages)
        out.update({"L_S": l_s, "L_C": l_c, "L_D": 1.0, "d": depth,
                    "log10_paper": depth * math.log10(l_s * l_c * 1.0)})
    return out
