"""The MM-WHS preset seen as a table: what the phantom and `prepare-mmwhs` write, and nothing else.

Every other part of the package takes its labels from the dataset (`spec.DataSpec`); this module
only gives the anatomy code of the phantom and the MM-WHS preparation handy names for the preset
`spec.MMWHS` (the one source of its classes, values and colours). MM-WHS codes map to class
indices in ascending code order, as the public MM-WHS code does; 0 is background. Label maps on
disk may hold either codes or indices; `to_indices` detects which.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crossmodalnet.data.spec import MMWHS

__all__ = ["Structure", "STRUCTURES", "NUM_CLASSES", "CODES", "NAMES", "to_indices", "to_codes", "detect_encoding",
           "colormap"]


@dataclass(frozen=True)
class Structure:
    index: int  # class index used by the models (1..7)
    code: int  # MM-WHS label code in the released files
    name: str  # short name used in tables
    description: str
    color: tuple[int, int, int]  # RGB 0-255, for overlays and plots
    # Indices of the structures this one wraps (the topology prior; see `spec.LabelClass.encloses`).
    encloses: tuple[int, ...] = ()


STRUCTURES: tuple[Structure, ...] = tuple(
    Structure(i + 1, c.value, c.name, c.description, c.color, tuple(MMWHS.index(n) for n in c.encloses))
    for i, c in enumerate(MMWHS.classes)
)
NUM_CLASSES: int = MMWHS.num_classes  # with background
CODES: tuple[int, ...] = MMWHS.values
NAMES: tuple[str, ...] = MMWHS.names


def detect_encoding(values: np.ndarray) -> str:
    """"indices" or "codes" for the values present in a label map (ValueError naming bad values)."""
    present = {int(v) for v in np.unique(values)}
    MMWHS.encoding(present)  # raises on values of neither kind, or a mix
    # Only background (in both sets) reads as indices, as before the preset.
    return "indices" if present <= set(range(NUM_CLASSES)) else "codes"


def to_indices(labels: np.ndarray) -> np.ndarray:
    """Label map with indices or codes -> uint8 class indices 0..7 (same shape)."""
    return MMWHS.to_indices(labels)


def to_codes(indices: np.ndarray) -> np.ndarray:
    """Class indices 0..7 -> MM-WHS codes (int16, same shape)."""
    return MMWHS.to_values(indices).astype(np.int16)


def colormap() -> np.ndarray:
    """(NUM_CLASSES, 4) RGBA floats in [0, 1]; background transparent. For matplotlib overlays."""
    return MMWHS.colormap()
