"""The cases an analysis runs on: a dataset's cases with every channel, in the network's space.

    cases = load_analysis_cases("data/phantoms", preprocessor, cases=3, roi_size=(64, 64, 64))
    a, b = check_pair(model, (0, 1))       # the two channels a CMIF measurement is between

Each `AnalysisCase` holds the image (1, M, D, H, W) as the model sees it: the run's preprocessing
(`data.preprocess.Preprocessor`), then a centred crop of at most `roi_size`. Used by `cmif` and
the audit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crossmodalnet.data.dataset import SPLITS, load_case, load_dataset
from crossmodalnet.errors import CrossModalNetError

__all__ = ["AnalysisCase", "load_analysis_cases", "check_pair"]


@dataclass
class AnalysisCase:
    """One case in network space, every channel present. image: (1, M, D, H, W) float32, channels in
    the dataset's order; label: (D, H, W) uint8 class indices or None."""

    id: str
    image: torch.Tensor
    label: np.ndarray | None

    @property
    def channels(self) -> int:
        return int(self.image.shape[1])

    def channel(self, index: int) -> torch.Tensor:
        """Channel `index` as (1, 1, D, H, W)."""
        return self.image[:, index: index + 1]


def _centre_crop(array: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """(..., D, H, W) -> at most roi per spatial axis, centred."""
    slices = []
    for n, r in zip(array.shape[-3:], roi, strict=True):
        start = max(0, (n - int(r)) // 2)
        slices.append(slice(start, start + min(n, int(r))))
    return array[(..., *slices)]


def load_analysis_cases(
    data_dir: str | os.PathLike,
    preprocessor: Any,
    cases: int = 3,
    split: str | None = None,
    roi_size: Sequence[int] | None = None,
) -> list[AnalysisCase]:
    """The first `cases` cases with every channel of `split` (default: held-out cases first, i.e.
    test, then validation, then training), preprocessed by `preprocessor` (a
    `data.preprocess.Preprocessor`) and centre-cropped to `roi_size`."""
    if cases < 1:
        raise CrossModalNetError(f"--cases must be >= 1, got {cases}")
    dataset = load_dataset(data_dir)
    order = [split] if split is not None else ["test", "validation", "training"]
    complete = []
    for name in order:
        if name not in SPLITS:
            raise CrossModalNetError(f"unknown split {name!r}; choose from {list(SPLITS)}")
        complete += [c for c in dataset[name] if all(c.present)]
    if not complete:
        raise CrossModalNetError(f"{Path(data_dir) / 'dataset.json'}: no case with every channel "
                                 f"({', '.join(dataset.spec.channels)}) in {order}")
    out = []
    for case in complete[:cases]:
        data = load_case(case, dataset.spec, with_label=case.label is not None)
        prep = preprocessor.prepare(data["images"], data["geometry"], data["label"], case.id)
        roi = roi_size or prep.shape
        image = _centre_crop(prep.stacked(), roi)
        label = None if prep.label is None else _centre_crop(prep.label, roi)
        out.append(AnalysisCase(case.id, torch.from_numpy(np.ascontiguousarray(image))[None], label))
    return out


def check_pair(model: nn.Module, pair: Sequence[int]) -> tuple[int, int]:
    """The channel pair (a, b) of a CMIF measurement on `model`, checked; CrossModalNetError when the model
    has a single channel (CMIF is defined between two streams) or the pair is not two of its channels."""
    m = getattr(model, "modalities", None)
    if m is None:
        raise CrossModalNetError("CMIF needs a CrossModalNet (one stream per channel)")
    if m < 2:
        raise CrossModalNetError("CMIF is defined between two streams; this model has a single channel, so it does "
                                 "not apply")
    a, b = (int(i) for i in pair)
    if len(pair) != 2 or a == b or not (0 <= a < m and 0 <= b < m):
        raise CrossModalNetError(f"the CMIF pair must be two different channels of 0..{m - 1}, got {list(pair)}")
    return a, b
