"""The model registry: every model by name, built from a `ModelConfig`, called `model(ct, mr)`.

    model = build_model("crossmodalnet", ModelConfig.from_size("crossmodalnet", "small"))
    logits = model(ct, mr)  # (B, 1, D, H, W) each -> (B, 8, D, H, W)
"""

from __future__ import annotations

import torch
from torch import nn

from crossmodalnet.config import ModelConfig
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models.baselines import BASELINE_SIZES, build_baseline

__all__ = ["MODEL_NAMES", "build_model", "count_parameters", "forward_flops", "print_models_table"]

MODEL_NAMES: tuple[str, ...] = ("crossmodalnet", *BASELINE_SIZES)


def build_model(name: str, config: ModelConfig | None = None, size: str = "small") -> nn.Module:
    """Build registered model `name`. Without `config`, the named `size` with defaults."""
    if name not in MODEL_NAMES:
        raise CrossModalNetError(f"unknown model {name!r}; registered: {', '.join(MODEL_NAMES)}")
    if config is None:
        config = ModelConfig.from_size(name, size)
    elif config.name != name:
        raise CrossModalNetError(f"config is for model {config.name!r}, not {name!r}")
    if name == "crossmodalnet":
        from crossmodalnet.models.crossmodalnet import CrossModalNet

        return CrossModalNet(config)
    return build_baseline(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the fused CPU attention kernel, which FlopCounterMode does not count (torch 2.13).

    Without it every attention model's GFLOPs would leave out q·kᵀ and attn·v. Same formula as
    PyTorch's for the CUDA flash kernel: 2·B·H·L·S·(E + Ev).
    """
    b, h, q_len, e = query_shape
    return 2 * b * h * q_len * key_shape[-2] * (e + value_shape[-1])


def forward_flops(model: nn.Module, edge: int, batch: int = 1) -> int:
    """FLOPs of one forward pass on a (batch, 1, edge, edge, edge) CT + MR pair (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, 1, edge, edge, edge)
    model.eval()
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(x, x)
    return int(counter.get_total_flops())


def print_models_table(model_size: str = "small", edge: int = 96) -> list[dict]:
    """Print (markdown) every registered model at `model_size`: parameters (M) and GFLOPs at edge³."""
    rows = []
    for name in MODEL_NAMES:
        cfg = ModelConfig.from_size(name, model_size, img_size=edge)
        model = build_model(name, cfg)
        rows.append({"model": name, "size": model_size, "params_m": count_parameters(model) / 1e6,
                     "gflops": forward_flops(model, edge) / 1e9})
    print(f"| model | size | parameters (M) | forward GFLOPs at {edge}³ (CT+MR, batch 1) |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['size']} | {r['params_m']:.2f} | {r['gflops']:.1f} |")
    return rows
