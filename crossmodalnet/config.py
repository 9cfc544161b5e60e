"""Configuration: the one validated schema of the package (pydantic v2), read from and written to YAML.

    config = TrainConfig(model=ModelConfig(name="crossmodalnet", size="tiny"), epochs=3)
    config = load_config_file("configs/paper.yaml")       # hand-written: the model's size fills the rest
    text = to_yaml(config)                                # what a run folder's config.yaml holds

Every key is checked here, once, for type and range: a wrong type or a value out of range is one
`CrossModalNetError` line naming the file and the key (`config.yaml: model.feature_size: Input
should be greater than or equal to 1, got -4`). Unknown keys are refused. `MODEL_SIZES` is the one
table of named sizes of every model family; a `ModelConfig` takes the architecture fields of its
size from it unless it gives them itself. A run folder's `config.yaml` is a full dump of the
resolved `TrainConfig`, so a run can be re-made from it. The paper's recipe is `configs/paper.yaml`.

One idea in one file, though a long one: every setting of the package and its check, so that there
is exactly one place where configuration is validated.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path

__all__ = [
    "MODEL_SIZES",
    "MODEL_NAMES",
    "CROSSMODALNET_FIELDS",
    "PLAN_MODELS",
    "KERNEL_MODELS",
    "RUNTIME_KEYS",
    "ModelConfig",
    "TrainConfig",
    "AdaptConfig",
    "ADAPT_TERMS",
    "to_dict",
    "from_dict",
    "replace",
    "to_yaml",
    "dump_yaml",
    "read_yaml",
    "load_yaml",
    "load_config_file",
    "load_run_config",
    "imply_missing_fields",
    "config_differences",
    "parse_terms",
    "describe_validation_error",
]

# Named sizes of every model family: the one source of truth. `small` is the CPU default.
MODEL_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "crossmodalnet": {
        # Tests: the smallest model that still has every mechanism.
        "tiny": dict(feature_size=12, depths=(1, 1, 1), num_heads=(1, 2, 4), window_size=4, patch_size=4,
                     cross_first_stage=0),
        # CPU default (demo, benchmark): tokens at stride 4, three stages. Cross Transformer blocks from
        # the data (`ModelConfig.for_data`): after every stage where the channels are registered (MyoPS's
        # sequences: the stride-4 block raised the mean Dice, docs/benchmarks.md), else after stages 2
        # and 3 only (the phantom's CT/MR: the stride-4 block cost a seventh of a CPU training step and
        # bought no Dice, docs/benchmarks.md, "Reading the comparison").
        "small": dict(feature_size=32, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=4, patch_size=4,
                      cross_first_stage=None),
        # GPU: tokens at stride 2, four stages, as Swin-UNETR's published configuration; the paper's
        # Cross Transformer block after every stage.
        "base": dict(feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=4, patch_size=2,
                     cross_first_stage=0),
    },
    # Baselines: keyword arguments of their networks. `small` keeps forward GFLOPs comparable with
    # CrossModalNet `small` (see `crossmodalnet models`); `base` is the published size.
    "swinunetr": {
        "tiny": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
        "small": dict(feature_size=12),
        "base": dict(feature_size=48),
    },
    "mednext": {
        "tiny": dict(init_filters=4, blocks_down=(1, 1, 1, 1), blocks_bottleneck=1, blocks_up=(1, 1, 1, 1),
                     kernel_size=3),
        "small": dict(init_filters=8, kernel_size=3),
        "base": dict(init_filters=32, kernel_size=3),  # MedNeXt-S, k=3
    },
    "unetr": {
        "tiny": dict(feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4),
        "small": dict(feature_size=16, hidden_size=384, mlp_dim=1536, num_heads=6),
        "base": dict(feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12),
    },
    "unet": {
        "tiny": dict(channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1),
        "small": dict(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2),
        "base": dict(channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2), num_res_units=2),
    },
    # nnU-Net's own network (MONAI DynUNet): two 3³ conv + instance norm + LeakyReLU per level, strided-conv
    # downsampling, transposed-conv upsampling, deep supervision. `filters` per level (one more than the
    # downsampling steps); `base` is nnU-Net's 32, 64, ..., capped at 320. A plan's `strides`/`kernels`
    # give the steps and kernels; without them five levels, stride 2 on every axis, 3³ kernels. `small`:
    # two full-resolution convs per side make DynUNet dearer than MONAI's UNet (which strides in its first
    # conv) at equal width; 6 channels there: 0.85 s against UNet small's 0.49 s per step (B 2, 48³, one
    # thread), 12 channels took 1.65 s.
    "dynunet": {
        "tiny": dict(filters=(4, 8, 16, 32, 64)),
        "small": dict(filters=(6, 12, 24, 48, 96)),
        "base": dict(filters=(32, 64, 128, 256, 320)),
    },
    # Paper baselines implemented here. `small`: head width 16 as CrossModalNet's; `base`: the published
    # model (nnFormer's volumetric BraTS/ACDC configuration, VT-UNet-B, Swin-Unet/Swin-T), with window 7
    # where the paper uses it.
    "nnformer": {
        "tiny": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4),
        "small": dict(feature_size=64, depths=(2, 2, 2, 2), num_heads=(4, 8, 16, 32), window_size=4),
        "base": dict(feature_size=96, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=4),
    },
    "vtunet": {
        "tiny": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4),
        "small": dict(feature_size=48, depths=(2, 2, 2, 1), num_heads=(3, 6, 12, 24), window_size=4),
        "base": dict(feature_size=72, depths=(2, 2, 2, 1), num_heads=(3, 6, 12, 24), window_size=7),
    },
    "swinunet": {
        "tiny": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4),
        "small": dict(feature_size=64, depths=(2, 2, 2, 2), num_heads=(4, 8, 16, 32), window_size=4),
        "base": dict(feature_size=96, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7),
    },
}
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_SIZES)
# The ModelConfig fields a CrossModalNet size sets (None for the other models, which read their table).
CROSSMODALNET_FIELDS: tuple[str, ...] = tuple(MODEL_SIZES["crossmodalnet"]["small"])
# Settings of how a run is executed, not of what it computes: they may change on resume.
RUNTIME_KEYS: frozenset[str] = frozenset({"max_minutes", "device", "num_workers"})
ADAPT_TERMS: tuple[str, ...] = ("marginal", "conditional", "topology")

PositiveInt = Annotated[int, Field(ge=1)]
Step = tuple[Literal[1, 2], Literal[1, 2], Literal[1, 2]]  # one downsampling step: stride per axis (D, H, W)
Kernel = tuple[Literal[1, 3], Literal[1, 3], Literal[1, 3]]  # one level's conv kernel per axis (D, H, W)
# Models that take a plan's per-axis `strides` (the others downsample every axis alike: registry.supports_plan).
PLAN_MODELS: tuple[str, ...] = ("crossmodalnet", "unet", "dynunet")
KERNEL_MODELS: tuple[str, ...] = ("unet", "dynunet")  # conv models that take per-level `kernels`
NonNegativeInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value.lower()):
        raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N")
    return value.lower()


Device = Annotated[str, AfterValidator(_check_device)]  # "auto" | "cpu" | "cuda" | "cuda:N"


class _Schema(BaseModel):
    """Unknown keys refused, assignments validated, tuples kept as tuples."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True,
                              protected_namespaces=())


class ModelConfig(_Schema):
    """Which model and how big. Inputs (B, in_channels, D, H, W) per modality stream.

    The CrossModalNet fields (`CROSSMODALNET_FIELDS`) come from `MODEL_SIZES["crossmodalnet"][size]`
    when not given; other models read their own table entry at build time and leave them None.
    """

    name: str = "crossmodalnet"
    size: str = "small"
    in_channels: PositiveInt = 1  # per modality stream
    # Input channels of the dataset (modalities/sequences): CrossModalNet has one stream each, the
    # baselines see them stacked. Set from the dataset by `train`.
    modalities: Annotated[int, Field(ge=1, le=4)] = 2
    out_channels: Annotated[int, Field(ge=1)] = 8  # classes with background (softmax) or regions (sigmoid)
    feature_size: PositiveInt | None = None  # channels of the token grid; doubles at each stage
    depths: tuple[PositiveInt, ...] | None = None  # Swin blocks per encoder stage
    num_heads: tuple[PositiveInt, ...] | None = None
    # Tokens per window edge: an int (a cube) or per axis (D, H, W); 1 on an axis: no attention across it.
    window_size: PositiveInt | tuple[PositiveInt, PositiveInt, PositiveInt] | None = None
    patch_size: PositiveInt | None = None  # stride of the token grid (log2(patch_size) strided convs)
    # A plan's downsampling steps, in order, each a stride per axis (D, H, W) of 1 or 2 (nnU-Net's
    # pool_op_kernel_sizes without its leading 1, 1, 1). None: 2 on every axis at every step.
    # CrossModalNet: log2(patch_size) stem convs, then len(depths) - 1 patch mergings; the decoder
    # mirrors them. UNet, DynUNet: one step per level below the first (their sizes' channels follow).
    strides: tuple[Step, ...] | None = None
    # Conv kernel per level (len(strides) + 1 levels, the full resolution first), 3 or 1 per axis, for
    # the conv models (unet: one kernel for all levels; dynunet: per level). None: 3 everywhere.
    kernels: tuple[Kernel, ...] | None = None
    # First encoder stage (0-based) with a Cross Transformer block. None: from the data (`for_data`).
    cross_first_stage: NonNegativeInt | None = None
    mlp_ratio: PositiveFloat = 4.0
    drop_path_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    cross_attention: Literal["standard", "paper"] = "standard"  # "paper": Def. 2 literally
    cross_blocks: bool = True  # Cross Transformer blocks (off: decoder-only fusion)
    # Resample the other stream with the deformable operator first. None: from the data (off where the
    # dataset says its channels are registered, else on: `for_data`).
    deformable: bool | None = None
    deformable_points: PositiveInt = 4  # K in Def. 3
    max_offset: NonNegativeFloat = 2.0  # bound on offsets, in voxels of the stage's grid
    deep_supervision: bool = True  # heads at strides 2 and 4 in training; small structures learned sooner
    modality_dropout: Probability = 0.0  # probability, per sample in training, of dropping one modality
    # Finest decoder blocks (the full-resolution one first) with one conv, not a residual pair; 0: none,
    # and the full-resolution block as wide as the stride-2 one instead of half.
    light_decoder_levels: NonNegativeInt = 2
    # What feeds the decoder's skips that no Cross Transformer block has aligned (stem maps, the input,
    # token stages before `cross_first_stage`): "reference" the CT's (the MR's where the CT is missing),
    # "both" CT ‖ MR. "reference" because unaligned MR detail there is what a misregistered MR corrupts
    # (docs/benchmarks.md, misregistration). None: from the data ("both" where the dataset says its
    # channels are registered: scar shows on LGE, edema on T2, not on the reference; else "reference").
    fine_skips: Literal["reference", "both"] | None = None
    img_size: Annotated[int, Field(ge=16)] = 64  # fixed input edge for models with absolute position embeddings

    @property
    def uses_deformable(self) -> bool:
        """`deformable`, None read as on (a model built without data, as before this field could be None)."""
        return True if self.deformable is None else self.deformable

    @property
    def skip_source(self) -> str:
        """`fine_skips`, None read as "reference"."""
        return self.fine_skips or "reference"

    @property
    def first_cross_stage(self) -> int:
        """`cross_first_stage`, None read as 1 (the choice for channels not known to be registered)."""
        return 1 if self.cross_first_stage is None else self.cross_first_stage

    def for_data(self, registered: bool | None) -> ModelConfig:
        """The fields left None decided by the data: channels registered voxel to voxel (MyoPS's
        sequences) take every channel's fine detail, no deformable offsets and a Cross Transformer
        block after every stage (scar shows on LGE, edema on T2, each a few tokens wide); otherwise
        (CT and MR of separate scans, or not said) the reference channel's detail, deformable offsets
        and blocks from stage 1 on. Only CrossModalNet has these fields' meaning; other models are
        returned as they are."""
        if self.name != "crossmodalnet":
            return self
        fields = {"deformable": not registered, "fine_skips": "both" if registered else "reference",
                  "cross_first_stage": 0 if registered else 1}
        updates = {k: v for k, v in fields.items() if getattr(self, k) is None}
        return replace(self, **updates) if updates else self

    @model_validator(mode="before")
    @classmethod
    def _fill_from_size(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name, size = data.get("name", "crossmodalnet"), data.get("size", "small")
        if name not in MODEL_SIZES:
            raise ValueError(f"unknown model {name!r}; registered: {', '.join(MODEL_NAMES)}")
        if size not in MODEL_SIZES[name]:
            raise ValueError(f"unknown size {size!r} for {name}; choose from {', '.join(MODEL_SIZES[name])}")
        if name == "crossmodalnet":
            return {**MODEL_SIZES[name][size], **data}
        return data

    @field_validator("window_size", mode="wrap")
    @classmethod
    def _window_error(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # An int or three ints: report the error of the form given, not both members of the union.
        try:
            return handler(value)
        except ValidationError as exc:
            sequence = isinstance(value, list | tuple)
            errors = [e for e in exc.errors() if str(e["loc"][0]).startswith("tuple") == sequence]
            first = (errors or exc.errors())[0]
            raise PydanticCustomError(first["type"], first["msg"]) from None

    @model_validator(mode="after")
    def _check_architecture(self) -> ModelConfig:
        if self.strides is not None and self.name not in PLAN_MODELS:
            raise ValueError(f"strides: {self.name} downsamples every axis alike and cannot take per-axis strides "
                             f"(models that can: {', '.join(PLAN_MODELS)})")
        if self.kernels is not None:
            if self.name not in KERNEL_MODELS:
                raise ValueError(f"kernels: only the conv models ({', '.join(KERNEL_MODELS)}) take per-level kernels; "
                                 f"{self.name} chooses its own")
            levels = len(self.strides) + 1 if self.strides is not None else _levels(self.name, self.size)
            if len(self.kernels) != levels:
                raise ValueError(f"kernels needs one kernel per level, {levels} (len(strides) + 1), "
                                 f"got {len(self.kernels)}")
            if self.name == "unet" and len(set(self.kernels)) > 1:
                raise ValueError("kernels: unet takes one kernel for every level (MONAI UNet's kernel_size); "
                                 "dynunet takes one per level")
            steps = self.strides if self.strides is not None else ((2, 2, 2),) * (levels - 1)
            for level, (kernel, step) in enumerate(zip(self.kernels[1:], steps, strict=True)):
                if any(k == 1 and s == 2 for k, s in zip(kernel, step, strict=True)):
                    raise ValueError(f"kernels: level {level + 1} has kernel 1 on an axis its step strides by 2 "
                                     "(the strided conv would skip voxels)")
        if self.name != "crossmodalnet":
            return self
        stages = len(self.depths)
        if len(self.num_heads) != stages:
            raise ValueError(f"depths {list(self.depths)} and num_heads {list(self.num_heads)} need one entry "
                             "per stage each")
        for i, heads in enumerate(self.num_heads):
            if (self.feature_size * 2**i) % heads:
                raise ValueError(f"stage {i} has {self.feature_size * 2**i} channels, not divisible by its "
                                 f"{heads} heads (feature_size {self.feature_size})")
        if self.patch_size & (self.patch_size - 1):
            raise ValueError(f"patch_size must be a power of two (a stem of stride-2 convs), got {self.patch_size}")
        if self.cross_first_stage is not None and self.cross_first_stage >= stages:
            raise ValueError(f"cross_first_stage must be below the {stages} stages, got {self.cross_first_stage}")
        if self.strides is not None:
            stem = self.patch_size.bit_length() - 1
            if len(self.strides) != stem + stages - 1:
                raise ValueError(f"strides needs log2(patch_size {self.patch_size}) + len(depths {stages}) - 1 = "
                                 f"{stem + stages - 1} steps ({stem} stem convs, then {stages - 1} patch mergings), "
                                 f"got {len(self.strides)}")
        return self

    @classmethod
    def from_size(cls, name: str = "crossmodalnet", size: str = "small", **overrides: Any) -> ModelConfig:
        """Config of a named size; for CrossModalNet the size fills the architecture fields."""
        return from_dict(cls, {"name": name, "size": size, **overrides})


def _levels(name: str, size: str) -> int:
    """Levels (downsampling steps + 1) of conv model `name` at `size` without a plan."""
    kw = MODEL_SIZES[name][size]
    return len(kw["filters"]) if name == "dynunet" else len(kw["channels"])


class TrainConfig(_Schema):
    """Everything a training run needs. CPU defaults; the paper's recipe is configs/paper.yaml.

    `batch_size` is the global batch: under DDP each of N processes takes batch_size / N, so a
    recipe means the same thing on any number of GPUs. An epoch is `iterations_per_epoch`
    optimizer steps on random patches (patch-based training has no natural epoch).
    """

    model: ModelConfig = Field(default_factory=ModelConfig)
    seed: NonNegativeInt = 0
    epochs: PositiveInt = 50
    iterations_per_epoch: PositiveInt = 20  # optimizer steps per epoch (patch-based, so epochs are nominal)
    max_minutes: PositiveFloat | None = None  # stop (and save) after this wall time
    # None: the dataset's plan decides (`train.plan`; without a plan 2 and 64^3).
    batch_size: PositiveInt | None = None  # global; divided between DDP processes
    patch_size: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None  # also the sliding-window roi
    # Take what this configuration leaves open (None above, target_spacing, orientation "auto", the
    # model's strides and windows) from a plan of the training data (`crossmodalnet plan`).
    plan: bool = True
    # The plan's configuration: "2d" (one-slice patches, as nnU-Net's 2d), "3d", or "auto": 2d where the
    # data have a slice axis over 3x the finest spacing (MyoPS, ACDC), else 3d (train.plan).
    configuration: Literal["auto", "2d", "3d"] = "auto"
    foreground_ratio: Probability = 0.67  # share of patches centred on a structure voxel
    optimizer: Literal["adam", "adamw"] = "adamw"
    lr: PositiveFloat = 3e-3  # Adam(W), batch 2; on the phantom 3e-3 trained CrossModalNet faster than 2e-3
    weight_decay: NonNegativeFloat = 1e-5  # not applied to norms, biases, position biases, placeholders
    warmup_epochs: NonNegativeInt = 2  # linear warm-up from lr / warmup_steps to lr
    scheduler: Literal["cosine", "constant"] = "cosine"  # cosine: to 0 at the last step
    grad_clip: Finite = 1.0  # max global gradient norm; <= 0 disables clipping
    # Mixed precision on CUDA: "auto" is bfloat16 where the GPU supports it, else float16 with a
    # gradient scaler; "fp16" forces the latter, "fp32" turns it off. On the CPU "bf16" is bfloat16
    # autocast and everything else fp32 (`train.engine.training_autocast`).
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    loss_balancing: bool = False  # Def. 4 over the Dice and CE terms
    balancing_alpha: Finite = 1.0  # may be negative (favours the larger loss)
    val_every: PositiveInt = 5  # epochs between whole-volume validations (the last epoch always validates)
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2  # held out when dataset.json has no validation
    sw_batch_size: PositiveInt = 2
    sw_overlap: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25
    # Background processes that sample and augment patches; 0: in the training loop; None: 0 on a CPU
    # (workers would take cores from the model, and the pipeline costs a few % of a step: docs/benchmarks.md,
    # "Data pipeline"), 2 on a GPU (the model must never wait for data).
    num_workers: NonNegativeInt | None = None
    device: Device = "auto"
    augment: bool = True
    # Augmentation (when `augment`). No mirroring by default: a mirrored heart is situs inversus,
    # which the anatomy of MM-WHS never shows, and left/right structures (LA/RA, LV/RV) would swap
    # sides. Axes (0, 1, 2) of the canonical (RAS) array may be listed to flip anyway.
    flip_axes: tuple[Literal[0, 1, 2], ...] = ()
    spatial_prob: Probability = 0.3  # per patch: rotation + isotropic scaling, resampled
    rotation_degrees: Annotated[float, Field(ge=0.0, le=180.0)] = 15.0  # uniform in +-this, about each axis
    scale_range: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1  # zoom uniform in 1 +- this
    intensity_prob: Probability = 0.5  # per patch and channel: x * U(1 +- scale) + U(+-shift)
    intensity_shift: NonNegativeFloat = 0.1  # in units of the normalised intensity (about one std)
    intensity_scale: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    # Misregistration: paired CT and MR are never perfectly registered (breathing, cardiac phase,
    # a rigid registration of a non-rigid organ). Per patch with this probability, the MR is cut
    # around a centre displaced by up to `misalign_voxels` (uniform length, random direction)
    # against the CT and the label, which stay put; 0 turns it off.
    misalign_prob: Probability = 0.0
    misalign_voxels: NonNegativeFloat = 4.0
    # mm per network axis; None: the median (or the plan's); an axis None: kept as stored (2D plans' slices)
    target_spacing: tuple[PositiveFloat | None, PositiveFloat | None, PositiveFloat | None] | None = None
    # Axis order of the network: "canonical" (closest RAS), "stored" (the voxel axes as they are), or
    # "auto": canonical unless the cases' slice axes land on different canonical axes (oblique
    # short-axis MR), see `data.preprocess.choose_orientation`.
    orientation: Literal["auto", "canonical", "stored"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        # Run configs written before `precision` hold `amp: bool`: float16 autocast on CUDA when true.
        if isinstance(data, dict) and "amp" in data and "precision" not in data:
            amp = data["amp"]
            data = {k: v for k, v in data.items() if k != "amp"}
            data["precision"] = "fp16" if amp else "fp32"
        return data


class AdaptConfig(_Schema):
    """Settings of one JADA adaptation run (saved in the adapted run folder). Data and model come
    from the source run."""

    terms: tuple[Literal["marginal", "conditional", "topology"], ...] = ADAPT_TERMS
    epochs: PositiveInt = 10
    iterations_per_epoch: PositiveInt = 20
    max_minutes: PositiveFloat | None = None  # stop (and save) after this wall time
    batch_size: PositiveInt | None = None  # patches per domain and step; None: the source run's batch size
    lr: PositiveFloat = 5e-4  # segmenter, annealed; lower than training: the source model is a good start
    discriminator_lr: PositiveFloat = 1e-3
    grl_gamma: PositiveFloat = 10.0  # steepness of the lambda ramp
    grl_scale: NonNegativeFloat = 1.0  # lambda's final value
    hidden: PositiveInt = 256  # discriminator width
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    max_outer: PositiveInt = 4096  # largest exact CDAN outer product; beyond it the randomised map
    random_dim: PositiveInt = 1024
    entropy_conditioning: bool = True
    topology_size: Annotated[int, Field(ge=2)] = 24  # probabilities pooled to at most this many voxels per axis
    topology_threshold: Probability = 0.5  # a structure enters the penalty when its pooled max reaches this
    topology_pool: Literal["split", "avg", "max"] = "split"  # how the probabilities are pooled (topoloss)
    topology_bars: Literal["decision", "all"] = "decision"  # which persistence bars, which end moves (topoloss)
    balancing_alpha: Finite = 1.0  # Def. 4 temperature over all terms
    feature_stage: Annotated[int, Field(le=-1)] = -2  # encoder stage aligned: -1 the bottleneck's input, -2 finer
    token_level: bool = True  # discriminators judge every position of that map, not its global average
    entropy_weight: NonNegativeFloat = 0.0  # fixed weight of the mean target prediction entropy (ADVENT)
    source_remap: Probability = 0.5  # per source patch and channel: probability of a random intensity transfer
    val_every: NonNegativeInt = 5  # epochs between source-validation Dice (diagnostic); 0: never
    seed: NonNegativeInt = 0
    device: Device = "auto"
    num_workers: NonNegativeInt | None = None  # patch-sampling processes; None: 0 on a CPU, 2 on a GPU

    @field_validator("terms", mode="before")
    @classmethod
    def _terms(cls, value: Any) -> Any:
        return parse_terms(value)


def parse_terms(text: str | Any) -> tuple[str, ...]:
    """'marginal,conditional' (or a sequence) -> ('marginal', 'conditional'), in canonical order.

    'none' (or an empty sequence) -> (): no adaptation term, the ablation that fine-tunes on the
    source alone with the adaptation's recipe (schedule, source intensity remapping).
    """
    if isinstance(text, str):
        if text.strip() == "none":
            return ()
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise ValueError(f"give at least one of {', '.join(ADAPT_TERMS)}, or none")
    elif isinstance(text, list | tuple):
        items = list(text)
    else:
        raise ValueError(f"terms must be a list or a comma-separated string, got {type(text).__name__}")
    unknown = [t for t in items if t not in ADAPT_TERMS]
    if unknown:
        raise ValueError(f"unknown term {unknown[0]!r}; choose from {', '.join(ADAPT_TERMS)} or none")
    return tuple(t for t in ADAPT_TERMS if t in items)  # canonical order: logs and checkpoints line up


# --- conversion ---------------------------------------------------------------------------------
def to_dict(obj: BaseModel) -> dict[str, Any]:
    """Config -> plain dict with tuples turned into lists (YAML and JSON friendly)."""

    def convert(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(obj.model_dump())


def from_dict(cls: type[BaseModel], data: Any, source: str = "config") -> Any:
    """Build config class `cls` from a mapping; every problem is one line naming `source` and the key."""
    if not isinstance(data, dict):
        raise CrossModalNetError(f"{source}: expected a mapping of {cls.__name__} keys, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise CrossModalNetError(f"{source}: {describe_validation_error(exc)}") from None
    except RecursionError:
        raise CrossModalNetError(f"{source}: nested too deeply to be a {cls.__name__}") from None


def replace(obj: BaseModel, **changes: Any) -> Any:
    """A validated copy of config `obj` with `changes` (dataclasses.replace for configs)."""
    return from_dict(type(obj), {**obj.model_dump(), **changes}, f"{type(obj).__name__} change")


def describe_validation_error(exc: ValidationError) -> str:
    """'model.feature_size: <message>, got -4' for the first error, and how many more there are."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
        parent = ".".join(str(p) for p in first["loc"][:-1])
        known = _known_keys(exc.title, parent)
        if known:
            message += f"; known: {', '.join(known)}"
    text = f"{loc}: {message}" if loc else message
    if "input" in first and first["type"] not in ("extra_forbidden", "missing", "value_error"):
        text += f", got {_short(first['input'])}"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text


def _known_keys(title: str, parent: str) -> list[str]:
    cls = {"TrainConfig": TrainConfig, "ModelConfig": ModelConfig, "AdaptConfig": AdaptConfig}.get(title)
    if cls is None:
        return []
    if parent == "model" and cls is TrainConfig:
        cls = ModelConfig
    return sorted(cls.model_fields)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- YAML ---------------------------------------------------------------------------------------
def to_yaml(obj: BaseModel) -> str:
    """The YAML text of a config (plain lists, no Python tags)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def dump_yaml(obj: BaseModel, path: str | os.PathLike) -> Path:
    """Write a config as YAML, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(to_yaml(obj), encoding="utf-8")
    return Path(path)


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file (empty file -> {}), with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CrossModalNetError(f"{path}: config file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise CrossModalNetError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as exc:
        raise CrossModalNetError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise CrossModalNetError(f"{path}: YAML nested too deeply") from None


def load_yaml(cls: type[BaseModel], path: str | os.PathLike) -> Any:
    """Read a YAML file into config class `cls`, with one-line errors naming the file."""
    return from_dict(cls, read_yaml(path), str(path))


# CrossModalNet fields whose default changed after run configs without them were written, with the
# value those configs meant. A run's config.yaml is a full dump, so a field absent there predates
# it: `cross_first_stage` came with 0 (a block after every stage), and `small` moved to 1 later;
# `fine_skips` came with "both" and moved to "reference" later.
IMPLIED_BEFORE_FIELD: dict[str, Any] = {"cross_first_stage": 0, "fine_skips": "both"}


def imply_missing_fields(data: Any) -> Any:
    """Fill IMPLIED_BEFORE_FIELD into the CrossModalNet `model` mapping of a saved run config (in place);
    a run from before plans ran without one."""
    if isinstance(data, dict):
        data.setdefault("plan", False)
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and model.get("name", "crossmodalnet") == "crossmodalnet":
        for key, value in IMPLIED_BEFORE_FIELD.items():
            model.setdefault(key, value)
    return data


def load_run_config(path: str | os.PathLike) -> TrainConfig:
    """TrainConfig of a run folder's config.yaml, read as the run was trained (`IMPLIED_BEFORE_FIELD`)."""
    data = read_yaml(path)
    if data == {}:
        raise CrossModalNetError(f"{path}: empty run config; the run folder is damaged, train it again")
    return from_dict(TrainConfig, imply_missing_fields(data), str(path))


def load_config_file(path: str | os.PathLike, saved: bool = False) -> TrainConfig:
    """A TrainConfig YAML whose `model` may give just `name` and `size`: the named size fills the
    architecture fields, and any field the file gives overrides it. saved: the file is a run's
    config.yaml (a full dump), whose missing fields mean what they meant then (`imply_missing_fields`)."""
    return load_run_config(path) if saved else load_yaml(TrainConfig, path)


def config_differences(saved: BaseModel, current: BaseModel) -> list[str]:
    """'key: saved -> current' for every setting that differs, ignoring RUNTIME_KEYS."""
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(current))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k.split(".")[-1] not in RUNTIME_KEYS and a.get(k) != b.get(k)]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

