"""Models: CrossModalNet and the baselines, all called `model(ct, mr)`; see `registry`."""

from crossmodalnet.models.registry import MODEL_NAMES, build_model, check_input_size, min_input_edge

__all__ = ["MODEL_NAMES", "build_model", "check_input_size", "min_input_edge"]
