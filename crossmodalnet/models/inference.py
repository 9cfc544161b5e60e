"""A model applied to a whole volume: MONAI's sliding window with Gaussian blending, in a chosen precision,
and the one postprocessing of its label map.

    probs = sliding_window_probabilities(model, image, present, roi_size=(64, 64, 64))   # (B, C, D, H, W)
    indices = keep_largest_foreground(spec.decide(probs[0].numpy()))                      # (D, H, W)

Here, below both training (validation) and prediction, so that both import it without a cycle.
Shapes: image (B, M, D, H, W) (M channels in the dataset's order, zeros where missing), present
(B, M) bool or None (all present); probabilities (B, C, D, H, W) float32 on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage
from torch import nn

from crossmodalnet.errors import CrossModalNetError

__all__ = ["PRECISIONS", "autocast_dtype", "keep_largest_foreground", "sliding_window_probabilities"]

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
    image: torch.Tensor,
    present: torch.Tensor | None,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    device: torch.device | None = None,
    precision: str = "auto",
    activation: str = "softmax",
) -> torch.Tensor:
    """Probabilities (B, C, D, H, W) on the CPU of a whole volume, by sliding window: softmax over
    the classes, or with `activation="sigmoid"` one per region (a model trained on regions).

    image: (B, M, D, H, W); present: (B, M) bool or None (all present), passed to the model with
    every window (`model(window, present)`). Windows of `roi_size` are blended with Gaussian weights
    (centre of a window counts more than its border). The model's mode is left as is; call
    `model.eval()` first. precision: see `autocast_dtype`; blending and the activation stay fp32.
    """
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    if image.ndim != 5:
        raise ValueError(f"image must be (B, M, D, H, W), got {tuple(image.shape)}")
    if present is not None:
        if present.ndim != 2 or present.shape[0] != image.shape[0]:
            raise ValueError(f"present must be (B, M) with B = {image.shape[0]}, got {tuple(present.shape)}")
        if not present.bool().any(dim=1).all():
            raise ValueError("every sample needs at least one present channel")
    if device is None:  # where the model's weights are (CPU for a parameter-free model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = autocast_dtype(precision, device)
    roi = tuple(int(r) for r in roi_size)

    def run(volume: torch.Tensor, row: torch.Tensor | None) -> torch.Tensor:
        """Logits of volume (b, M, D, H, W) whose samples share one presence row (1, M) (or None)."""
        def predictor(x: torch.Tensor) -> torch.Tensor:
            out = model(x, None if row is None else row.expand(x.shape[0], -1))
            return (out[0] if isinstance(out, list | tuple) else out).float()

        return sliding_window_inference(volume.to(device), roi, sw_batch_size, predictor, overlap=overlap,
                                        mode="gaussian")

    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        if present is None:
            logits = run(image, None)
        else:
            rows = present.bool().to(device)
            if bool((rows == rows[:1]).all()):  # one presence pattern: the windows of all samples batch together
                logits = run(image, rows[:1])
            else:  # MONAI mixes samples' windows in one batch: one call per sample keeps each with its row
                logits = torch.cat([run(image[i: i + 1], rows[i: i + 1]) for i in range(image.shape[0])])
    if activation == "sigmoid":
        return torch.sigmoid(logits.float()).cpu()
    return torch.softmax(logits.float(), dim=1).cpu()


def keep_largest_foreground(indices: np.ndarray) -> np.ndarray:
    """Class indices (D, H, W) with every foreground voxel outside the largest foreground component set
    to background (0): nnU-Net's "remove all but the largest foreground component", for false
    positives far from the organ. Components are 26-connected, all foreground classes together (a
    structure touching another stays). Returns a new array of the same dtype; all background is
    returned unchanged.
    """
    # MONAI's KeepLargestConnectedComponent does the same but needs scikit-image (or cuCIM) at run time;
    # scipy's labelling is already a dependency.
    foreground = np.asarray(indices) != 0
    components, n = ndimage.label(foreground, structure=np.ones((3,) * foreground.ndim, dtype=bool))
    out = np.array(indices, copy=True)
    if n > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0  # background
        out[(components != 0) & (components != int(np.argmax(sizes)))] = 0
    return out
