"""A model applied to a whole volume: MONAI's sliding window with Gaussian blending, in a chosen precision.

    probs = sliding_window_probabilities(model, ct, mr, roi_size=(64, 64, 64))   # (B, C, D, H, W)

Here, below both training (validation) and prediction, so that both import it without a cycle.
Shapes: ct, mr (B, 1, D, H, W) or None (not both); probabilities (B, C, D, H, W) float32 on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from crossmodalnet.errors import CrossModalNetError

__all__ = ["PRECISIONS", "autocast_dtype", "sliding_window_probabilities"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an inference `precision` on `device`; None means plain float32.

    "auto": bfloat16 on a CUDA device that supports it (same range as float32: no overflow), else
    float16 on CUDA; float32 on the CPU.
    """
    if precision not in PRECISIONS:
        raise CrossModalNetError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise CrossModalNetError("precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def sliding_window_probabilities(
    model: nn.Module,
    ct: torch.Tensor | None,
    mr: torch.Tensor | None,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    device: torch.device | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """Softmax probabilities (B, C, D, H, W) on the CPU of a whole volume, by sliding window.

    ct, mr: (B, 1, D, H, W) or None (not both). Windows of `roi_size` are blended with Gaussian
    weights (centre of a window counts more than its border). The model's mode is left as is;
    call `model.eval()` first. precision: see `autocast_dtype`; blending and softmax stay fp32.
    """
    if ct is None and mr is None:
        raise ValueError("at least one of ct and mr is needed")
    if device is None:  # where the model's weights are (CPU for a parameter-free model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    image = torch.cat([x for x in (ct, mr) if x is not None], dim=1).to(device)
    has_ct, has_mr = ct is not None, mr is not None

    def predictor(x: torch.Tensor) -> torch.Tensor:
        out = model(x[:, :1] if has_ct else None, x[:, -1:] if has_mr else None)
        return (out[0] if isinstance(out, list | tuple) else out).float()

    dtype = autocast_dtype(precision, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = sliding_window_inference(
            image, tuple(int(r) for r in roi_size), sw_batch_size, predictor, overlap=overlap, mode="gaussian"
        )
    return torch.softmax(logits.float(), dim=1).cpu()
