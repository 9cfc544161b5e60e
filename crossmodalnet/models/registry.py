"""The model registry: every model by name, built from a `ModelConfig`, called `model(ct, mr)`.

    model = build_model("crossmodalnet", ModelConfig.from_size("crossmodalnet", "small"))
    logits = model(ct, mr)  # (B, 1, D, H, W) each -> (B, 8, D, H, W)
"""

from __future__ import annotations

from torch import nn

from crossmodalnet.config import ModelConfig
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models.baselines import BASELINE_SIZES, build_baseline

__all__ = ["MODEL_NAMES", "build_model", "count_parameters"]

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
