"""The label table: the one place that knows the MM-WHS structures.

MM-WHS codes map to class indices in ascending code order, as the public MM-WHS code does;
0 is background. Label maps on disk may hold either codes or indices; `to_indices` detects which.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Structure",
    "STRUCTURES",
    "NUM_CLASSES",
    "CODES",
    "NAMES",
    "to_indices",
    "to_codes",
    "detect_encoding",
    "colormap",
]


@dataclass(frozen=True)
class Structure:
    index: int  # class index used by the models (1..7)
    code: int  # MM-WHS label code in the released files
    name: str  # short name used in tables
    description: str
    color: tuple[int, int, int]  # RGB 0-255, for overlays and plots
    # Indices of the structures this one wraps: its tunnels and cavities are theirs, and it is
    # solid only together with them (the topology prior of JADA, `train.topoloss`). The LV
    # myocardium is a cup around the LV blood pool: cut by a patch it is a ring.
    encloses: tuple[int, ...] = ()


STRUCTURES: tuple[Structure, ...] = (
    Structure(1, 205, "MYO", "myocardium of the left ventricle", (230, 159, 0), encloses=(3,)),
    Structure(2, 420, "LA", "left atrium blood cavity", (86, 180, 233)),
    Structure(3, 500, "LV", "left ventricle blood cavity", (213, 94, 0)),
    Structure(4, 550, "RA", "right atrium blood cavity", (0, 158, 115)),
    Structure(5, 600, "RV", "right ventricle blood cavity", (0, 114, 178)),
    Structure(6, 820, "AO", "ascending aorta", (204, 121, 167)),
    Structure(7, 850, "PA", "pulmonary artery", (240, 228, 66)),
)

NUM_CLASSES: int = len(STRUCTURES) + 1  # with background
CODES: tuple[int, ...] = tuple(s.code for s in STRUCTURES)
NAMES: tuple[str, ...] = tuple(s.name for s in STRUCTURES)

# Lookup from code to index; codes are < 1024.
_CODE_TO_INDEX = np.full(1024, -1, dtype=np.int64)
_CODE_TO_INDEX[0] = 0
for _s in STRUCTURES:
    _CODE_TO_INDEX[_s.code] = _s.index
_INDEX_TO_CODE = np.array([0, *CODES], dtype=np.int64)


def detect_encoding(values: np.ndarray) -> str:
    """Return "indices" or "codes" for the set of values present in a label map.

    Raises ValueError naming the offending values when they fit neither encoding.
    """
    present = {int(v) for v in np.unique(values)}
    if present <= set(range(NUM_CLASSES)):
        return "indices"
    if present <= {0, *CODES}:
        return "codes"
    indices, codes = set(range(NUM_CLASSES)), {0, *CODES}
    invalid = sorted(present - indices - codes)
    if invalid:
        more = f" and {len(invalid) - 8} more" if len(invalid) > 8 else ""
        raise ValueError(f"label values {invalid[:8]}{more} are neither class indices 0-{NUM_CLASSES - 1} "
                         f"nor MM-WHS codes {list(CODES)}")
    # Every value is valid in one encoding, but not all in the same one: name both sides.
    only_indices, only_codes = sorted(present - codes), sorted(present - indices)
    raise ValueError(f"label map mixes class indices {only_indices} with MM-WHS codes {only_codes}; "
                     "a file must hold one encoding only")


def to_indices(labels: np.ndarray) -> np.ndarray:
    """Label map with indices or codes -> uint8 class indices 0..7 (same shape)."""
    arr = np.asarray(labels)
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if not np.allclose(arr, rounded):
            raise ValueError("label map holds non-integer values")
        arr = rounded.astype(np.int64)
    if detect_encoding(arr) == "indices":
        return arr.astype(np.uint8)
    return _CODE_TO_INDEX[arr.astype(np.int64)].astype(np.uint8)


def to_codes(indices: np.ndarray) -> np.ndarray:
    """Class indices 0..7 -> MM-WHS codes (int16, same shape)."""
    arr = np.asarray(indices).astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= NUM_CLASSES):
        raise ValueError(f"class indices must lie in 0..{NUM_CLASSES - 1}")
    return _INDEX_TO_CODE[arr].astype(np.int16)


def colormap() -> np.ndarray:
    """(NUM_CLASSES, 4) RGBA floats in [0, 1]; background transparent. For matplotlib overlays."""
    cmap = np.zeros((NUM_CLASSES, 4))
    for s in STRUCTURES:
        cmap[s.index, :3] = np.array(s.color) / 255.0
        cmap[s.index, 3] = 1.0
    return cmap
