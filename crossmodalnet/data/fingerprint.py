"""A dataset's fingerprint: what a plan is derived from (nnU-Net's "dataset fingerprint").

    fp = fingerprint(loaded_cases, spec)           # cases from `dataset.load_case`, labelled
    fp.median_spacing, fp.median_shape_at(spacing)

Spacings and shapes are per network axis (after the orientation `preprocess.choose_orientation`
picks, so that a slice axis is the same axis in every case), intensity statistics per channel over
the foreground (label > 0) voxels, sampled (as nnU-Net, 10 000 per case), and each class's mean
volume in mm^3. Everything is JSON-ready (`to_dict`), so that `plans.json` shows what the plan
was made from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crossmodalnet.data.preprocess import choose_orientation, network_grid_shape, network_spacing
from crossmodalnet.data.spec import DataSpec

__all__ = ["Fingerprint", "fingerprint"]

_SAMPLES_PER_CASE = 10_000


@dataclass(frozen=True)
class Fingerprint:
    """Per-case spacings and shapes (network axes), per-channel foreground intensity statistics,
    mean class volumes, the orientation they are expressed in."""

    orientation: str
    spacings: tuple[tuple[float, float, float], ...]
    shapes: tuple[tuple[int, int, int], ...]
    intensities: dict[str, dict[str, float]] = field(default_factory=dict)
    class_volumes_mm3: dict[str, float] = field(default_factory=dict)

    @property
    def num_cases(self) -> int:
        return len(self.spacings)

    @property
    def median_spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.median(np.array(self.spacings), axis=0))

    def spacing_percentile(self, q: float) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.percentile(np.array(self.spacings), q, axis=0))

    def median_shape_at(self, spacing: Sequence[float | None]) -> tuple[float, float, float]:
        """Median extent of the cases in voxels of `spacing` (mm per axis; None: as stored), per axis."""
        shapes = np.array(self.shapes, dtype=np.float64)
        extents = shapes * np.array(self.spacings)
        out = [np.median(shapes[:, a]) if s is None else np.median(extents[:, a] / float(s))
               for a, s in enumerate(spacing)]
        return tuple(float(v) for v in out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "orientation": self.orientation, "num_cases": self.num_cases,
            "median_spacing": list(self.median_spacing),
            "spacing_min": list(np.min(self.spacings, axis=0).tolist()),
            "spacing_max": list(np.max(self.spacings, axis=0).tolist()),
            "median_shape": list(np.median(np.array(self.shapes), axis=0).tolist()),
            "spacings": [list(s) for s in self.spacings], "shapes": [list(s) for s in self.shapes],
            "intensities": self.intensities, "class_volumes_mm3": self.class_volumes_mm3,
        }


def fingerprint(cases: Sequence[dict], spec: DataSpec, orientation: str = "auto", seed: int = 0) -> Fingerprint:
    """The fingerprint of labelled cases (dicts of `dataset.load_case`: images, label, geometry)."""
    geometries = [c["geometry"] for c in cases]
    if orientation == "auto":
        orientation = choose_orientation(geometries)
    rng = np.random.default_rng(seed)
    spacings, shapes = [], []
    samples: list[list[np.ndarray]] = [[] for _ in spec.channels]
    volumes = np.zeros(spec.num_classes)
    for case in cases:
        geometry, label = case["geometry"], case["label"]
        spacings.append(network_spacing(geometry, orientation))
        shapes.append(network_grid_shape(geometry, orientation))
        voxel_mm3 = float(np.prod(geometry.spacing))
        counts = np.bincount(label.ravel(), minlength=spec.num_classes)[: spec.num_classes]
        volumes += counts * voxel_mm3
        foreground = label > 0
        for i, image in enumerate(case["images"]):
            if image is None or not foreground.any():
                continue
            values = image[foreground]
            if values.size > _SAMPLES_PER_CASE:
                values = rng.choice(values, _SAMPLES_PER_CASE, replace=False)
            samples[i].append(values.astype(np.float64))
    intensities = {}
    for name, chunks in zip(spec.channels, samples, strict=True):
        if chunks:
            v = np.concatenate(chunks)
            intensities[name] = {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)),
                                 "p00_5": float(np.percentile(v, 0.5)), "p99_5": float(np.percentile(v, 99.5))}
    n = max(len(cases), 1)
    class_volumes = {name: float(volumes[i + 1] / n) for i, name in enumerate(spec.names)}
    return Fingerprint(orientation, tuple(spacings), tuple(shapes), intensities, class_volumes)

