"""Models: CrossModalNet and the baselines, all called `model(image, present)`; see `registry`."""

from crossmodalnet.models.registry import (
    MODEL_NAMES,
    build_model,
    check_input_size,
    min_input_edge,
    supports_plan,
    upgrade_state_dict,
)

__all__ = ["MODEL_NAMES", "build_model", "check_input_size", "min_input_edge", "supports_plan", "upgrade_state_dict"]
