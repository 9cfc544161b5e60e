"""Former home of ANTs registration and the fixed-world grid helpers, now in `crossmodalnet.data.mmwhs`.

Kept only so that existing imports (`from crossmodalnet.data.registration import label_dice`)
keep working; new code imports from `crossmodalnet.data.mmwhs.register` and `.grid`.
"""

from crossmodalnet.data.mmwhs.grid import crop_grid, fraction_inside, heart_box, label_dice, resample_classes
from crossmodalnet.data.mmwhs.register import (
    METHODS,
    Registration,
    RegistrationConfig,
    register,
    set_threads,
    to_ants,
    warp,
)

__all__ = [
    "METHODS",
    "RegistrationConfig",
    "Registration",
    "set_threads",
    "to_ants",
    "register",
    "warp",
    "heart_box",
    "crop_grid",
    "fraction_inside",
    "resample_classes",
    "label_dice",
]
