"""MM-WHS preparation: the raw release (or any unpaired CT and MR) -> a paired, registered, cropped
dataset folder (`prepare_mmwhs`, the `prepare-mmwhs` command), and `restore_to_original`, the way
from that folder back to the original scans.

Modules, in pipeline order: `pairing` (which CT goes with which MR), `splits`, `register` (ANTs
registration and warping), `grid` (heart box, prepared grid, resampling by world coordinates),
`prepare` (one case), `pipeline` (the whole folder and its report) and `records` (per-case
records and the way back). Shapes: volumes (X, Y, Z) in their files' axis order; probabilities
(C, X, Y, Z).
"""

from crossmodalnet.data.mmwhs.pairing import Pair, find_pairs, read_pairs_csv
from crossmodalnet.data.mmwhs.pipeline import prepare_from_cli, prepare_mmwhs
from crossmodalnet.data.mmwhs.prepare import PrepareConfig, prepare_case
from crossmodalnet.data.mmwhs.records import load_record, restore_to_moving, restore_to_original
from crossmodalnet.data.mmwhs.splits import assign_splits, parse_split

__all__ = [
    "Pair",
    "PrepareConfig",
    "find_pairs",
    "read_pairs_csv",
    "parse_split",
    "assign_splits",
    "prepare_case",
    "prepare_mmwhs",
    "load_record",
    "restore_to_original",
    "restore_to_moving",
    "prepare_from_cli",
]
