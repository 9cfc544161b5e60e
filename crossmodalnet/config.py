"""Configuration: dataclasses serialised to YAML, with unknown keys refused.

`ModelConfig` describes any registered model (CrossModalNet fields are ignored by baselines,
which take their sizes from `models.registry`). `TrainConfig` is everything a run needs; a
run folder's `config.yaml` is `TrainConfig` dumped after resolution, so a run can be re-made
from it. The paper's recipe is `configs/paper.yaml`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crossmodalnet.errors import CrossModalNetError

__all__ = [
    "ModelConfig",
    "TrainConfig",
    "CROSSMODALNET_SIZES",
    "to_dict",
    "from_dict",
    "load_yaml",
    "read_yaml",
    "dump_yaml",
    "imply_missing_fields",
    "load_run_config",
]

# Named sizes of CrossModalNet: the one source of truth. `small` is the CPU default.
CROSSMODALNET_SIZES: dict[str, dict[str, Any]] = {
    # Tests: the smallest model that still has every mechanism.
    "tiny": dict(feature_size=12, depths=(1, 1, 1), num_heads=(1, 2, 4), window_size=4, patch_size=4,
                 cross_first_stage=0),
    # CPU default (demo, benchmark): tokens at stride 4, three stages; ~0.3 s per 96^3 pair on 2 cores.
    # Cross Transformer blocks after stages 2 and 3 only (strides 8, 16): the one at stride 4 cost a
    # seventh of a CPU training step and bought no Dice (docs/benchmarks.md, "Reading the comparison").
    "small": dict(feature_size=32, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=4, patch_size=4,
                  cross_first_stage=1),
    # GPU: tokens at stride 2, four stages, as Swin-UNETR's published configuration; the paper's
    # Cross Transformer block after every stage (not measured against cross_first_stage > 0 yet).
    "base": dict(feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=4, patch_size=2,
                 cross_first_stage=0),
}


@dataclass
class ModelConfig:
    """Which model and how big. Shapes: inputs (B, in_channels, D, H, W) per modality."""

    name: str = "crossmodalnet"
    size: str = "small"
    in_channels: int = 1  # per modality stream
    out_channels: int = 8  # background + 7 structures
    feature_size: int = 32  # channels of the token grid; doubles at each stage
    depths: tuple[int, ...] = (2, 2, 2)  # Swin blocks per encoder stage
    num_heads: tuple[int, ...] = (2, 4, 8)
    window_size: int = 4  # tokens per window edge
    patch_size: int = 4  # stride of the token grid (conv stem of log2(patch_size) stride-2 convs)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    cross_attention: str = "standard"  # "standard" | "paper" (Def. 2 literally)
    cross_blocks: bool = True  # Cross Transformer block after each stage (off: decoder-only fusion)
    cross_first_stage: int = 1  # first encoder stage (0-based) with a Cross Transformer block; finer ones go without
    deformable: bool = True  # resample the other stream with the deformable operator first
    deformable_points: int = 4  # K in Def. 3
    max_offset: float = 2.0  # bound on offsets, in voxels of the stage's grid
    deep_supervision: bool = True  # heads at strides 2 and 4 in training; measured: small structures learned sooner
    modality_dropout: float = 0.0  # probability, per sample in training, of dropping one modality
    light_decoder_levels: int = 2  # CrossModalNet: finest decoder blocks with one conv, not a residual pair (>= 1)
    # CrossModalNet: what feeds the decoder's skips that no Cross Transformer block has aligned (stem
    # maps, the input, token stages before `cross_first_stage`): "reference" the CT's (the MR's where
    # the CT is missing), "both" CT ‖ MR. "reference" because unaligned MR detail there is what a
    # misregistered MR corrupts: at the 8-min CPU budget (small size) it cut the Dice lost to a 4-voxel
    # MR shift from 0.008 to 0.002 at equal validation Dice over four draws (docs/benchmarks.md).
    fine_skips: str = "reference"
    img_size: int = 64  # fixed input edge for models with absolute position embeddings (UNETR)

    @classmethod
    def from_size(cls, name: str = "crossmodalnet", size: str = "small", **overrides: Any) -> ModelConfig:
        """Config of a named size; for CrossModalNet the size fills the architecture fields."""
        base: dict[str, Any] = {"name": name, "size": size}
        if name == "crossmodalnet":
            if size not in CROSSMODALNET_SIZES:
                raise CrossModalNetError(f"unknown size {size!r}; choose from {sorted(CROSSMODALNET_SIZES)}")
            base.update(CROSSMODALNET_SIZES[size])
        base.update(overrides)
        return from_dict(cls, base)


@dataclass
class TrainConfig:
    """Everything a training run needs. CPU defaults; the paper's recipe is configs/paper.yaml.

    `batch_size` is the global batch: under DDP each of N processes takes batch_size / N, so a
    recipe means the same thing on any number of GPUs. An epoch is `iterations_per_epoch`
    optimizer steps on random patches (patch-based training has no natural epoch).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0
    epochs: int = 50
    iterations_per_epoch: int = 20  # optimizer steps per epoch (patch-based, so epochs are nominal)
    max_minutes: float | None = None  # stop (and save) after this wall time
    batch_size: int = 2  # global; divided between DDP processes
    patch_size: tuple[int, int, int] = (64, 64, 64)  # also the sliding-window roi at validation/prediction
    foreground_ratio: float = 0.67  # share of patches centred on a structure voxel
    optimizer: str = "adamw"  # "adam" | "adamw"
    lr: float = 3e-3  # Adam(W), batch 2; on the phantom 3e-3 trained CrossModalNet faster than 2e-3 (demo runs)
    weight_decay: float = 1e-5
    warmup_epochs: int = 2  # linear warm-up from lr / warmup_steps to lr
    scheduler: str = "cosine"  # "cosine" (to 0 at the last step) | "constant"
    grad_clip: float = 1.0  # max global gradient norm; <= 0 disables clipping
    amp: bool = True  # mixed precision, CUDA only
    loss_balancing: bool = False  # Def. 4 over the Dice and CE terms
    balancing_alpha: float = 1.0  # may be negative (favours the larger loss)
    val_every: int = 5  # epochs between whole-volume validations (the last epoch always validates)
    val_fraction: float = 0.2  # share of training cases held out when dataset.json has no validation split
    sw_batch_size: int = 2
    sw_overlap: float = 0.25
    num_workers: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    augment: bool = True
    # Augmentation (when `augment`). No mirroring by default: a mirrored heart is situs inversus,
    # which the anatomy of MM-WHS never shows, and left/right structures (LA/RA, LV/RV) would swap
    # sides. Axes (0, 1, 2) of the canonical (RAS) array may be listed to flip anyway.
    flip_axes: tuple[int, ...] = ()
    spatial_prob: float = 0.3  # per patch: rotation + isotropic scaling, resampled
    rotation_degrees: float = 15.0  # uniform in +-this, about each axis
    scale_range: float = 0.1  # zoom uniform in 1 +- this
    intensity_prob: float = 0.5  # per patch and channel: x * U(1 +- scale) + U(+-shift)
    intensity_shift: float = 0.1  # in units of the normalised intensity (about one std)
    intensity_scale: float = 0.1
    # Misregistration: paired CT and MR are never perfectly registered (breathing, cardiac phase,
    # a rigid registration of a non-rigid organ: errors of 5-10 mm are common). Per patch with this
    # probability, the MR is cut around a centre displaced by up to `misalign_voxels` (uniform
    # length, random direction) against the CT and the label, which stay put; 0 turns it off.
    misalign_prob: float = 0.0
    misalign_voxels: float = 4.0
    target_spacing: tuple[float, float, float] | None = None  # mm; None: median of the training cases


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain dict with tuples turned into lists (YAML friendly)."""

    def convert(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(dataclasses.asdict(obj))


def from_dict(cls: type, data: dict[str, Any], source: str = "config") -> Any:
    """Build dataclass `cls` from a dict, refusing unknown keys and converting lists to tuples."""
    if not isinstance(data, dict):
        raise CrossModalNetError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CrossModalNetError(f"{source}: unknown {cls.__name__} key(s) {unknown}; known: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value or {}, source)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def dump_yaml(obj: Any, path: str | os.PathLike) -> Path:
    """Write a dataclass as YAML, atomically."""
    from crossmodalnet.data.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
    return Path(path)


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file (empty file -> {}), with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CrossModalNetError(f"{path}: config file not found")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CrossModalNetError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None


def load_yaml(cls: type, path: str | os.PathLike) -> Any:
    """Read a YAML file into dataclass `cls`, with one-line errors naming the file."""
    return from_dict(cls, read_yaml(path), str(path))


# CrossModalNet fields whose default changed after run configs without them were written, with the
# value those configs meant. A run's config.yaml is a full dump, so a field absent there predates
# it: `cross_first_stage` came with 0 (a block after every stage), and `small` moved to 1 later;
# `fine_skips` (since `990c6a2`) came with "both" and moved to "reference" later.
IMPLIED_BEFORE_FIELD: dict[str, Any] = {"cross_first_stage": 0, "fine_skips": "both"}


def imply_missing_fields(data: Any) -> Any:
    """Fill IMPLIED_BEFORE_FIELD into the CrossModalNet `model` mapping of a saved run config (in place)."""
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and model.get("name", "crossmodalnet") == "crossmodalnet":
        for key, value in IMPLIED_BEFORE_FIELD.items():
            model.setdefault(key, value)
    return data


def load_run_config(path: str | os.PathLike) -> TrainConfig:
    """TrainConfig of a run folder's config.yaml, read as the run was trained (`IMPLIED_BEFORE_FIELD`)."""
    return from_dict(TrainConfig, imply_missing_fields(read_yaml(path)), str(path))
