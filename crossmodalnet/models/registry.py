"""The model registry: every model by name, built from a `ModelConfig`, called `model(image, present)`.

    model = build_model("crossmodalnet", ModelConfig.from_size("crossmodalnet", "small", modalities=2))
    logits = model(image, present)  # (B, M, D, H, W), (B, M) bool or None -> (B, 8, D, H, W)
    model.load_state_dict(upgrade_state_dict("crossmodalnet", old_state))  # weights of an older layout
    supports_plan("swinunetr", [[2, 2, 1]] * 4, (160, 160, 4))  # None, or why the model cannot run a plan
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from crossmodalnet.config import PLAN_MODELS, ModelConfig
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models.baselines import _MULTIPLE, BASELINE_SIZES, build_baseline, conv_plan
from crossmodalnet.models.crossmodalnet import CrossModalNet, plan_steps
from crossmodalnet.models.folding import fold_flat_axis

__all__ = ["MODEL_NAMES", "InputSizeRule", "build_model", "check_input_size", "count_parameters", "forward_flops",
           "input_size_rule", "min_input_edge", "print_models_table", "supports_plan", "upgrade_state_dict"]

Triple = tuple[int, int, int]

MODEL_NAMES: tuple[str, ...] = ("crossmodalnet", *BASELINE_SIZES)


def build_model(name: str, config: ModelConfig | None = None, size: str = "small", fold: bool = True) -> nn.Module:
    """Build registered model `name`. Without `config`, the named `size` with defaults.

    `fold`: a model flat along one axis (a 2D plan) runs its convolutions as 2D ones
    (`models.folding`; same parameters and function); False keeps them 3D (benchmarks compare the two).
    """
    if name not in MODEL_NAMES:
        raise CrossModalNetError(f"unknown model {name!r}; registered: {', '.join(MODEL_NAMES)}")
    if config is None:
        config = ModelConfig.from_size(name, size)
    elif config.name != name:
        raise CrossModalNetError(f"config is for model {config.name!r}, not {name!r}")
    model = CrossModalNet(config) if name == "crossmodalnet" else build_baseline(config)
    if fold:
        fold_flat_axis(model)
    return model


# Renames from the two-stream CrossModalNet (streams `ct`/`mr`, cross directions `a_from_b`/`b_from_a`)
# to one stream per channel: same modules, same order, so an old run's weights load unchanged.
_LEGACY_KEYS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^ct\."), "streams.0."),
    (re.compile(r"^mr\."), "streams.1."),
    (re.compile(r"^(cross\.\d+)\.a_from_b\."), r"\1.refine.0."),
    (re.compile(r"^(cross\.\d+)\.b_from_a\."), r"\1.refine.1."),
)


def upgrade_state_dict(name: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of model `name` saved by an earlier layout, in today's key names (values untouched).

    CrossModalNet before one stream per channel: `ct.*` -> `streams.0.*`, `mr.*` -> `streams.1.*`,
    `cross.<j>.a_from_b.*` -> `cross.<j>.refine.0.*`, `cross.<j>.b_from_a.*` -> `cross.<j>.refine.1.*`
    (a model of `modalities: 2`). Keys already in today's layout, and every baseline's (nothing of
    theirs moved), pass through, so it is safe to call on any state dict. Key order is kept.
    """
    if name not in MODEL_NAMES:
        raise CrossModalNetError(f"unknown model {name!r}; registered: {', '.join(MODEL_NAMES)}")
    if name != "crossmodalnet":
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for pattern, repl in _LEGACY_KEYS:
            key = pattern.sub(repl, key)
        if key in out:
            raise CrossModalNetError(f"state dict holds {key!r} in both the old and the new layout")
        out[key] = value
    return out


@dataclass(frozen=True)
class InputSizeRule:
    """Which spatial sizes a model accepts, per axis of its (B, C, D, H, W) inputs.

    Every model pads its input up to a multiple of `pad_multiple` (UNETR: up to `max_edge`, its
    fixed img_size) and crops the logits back, so any edge in [min_edge, max_edge] runs.
    `min_edge` > 1 comes from a per-sample normalisation (InstanceNorm, or GroupNorm with one
    channel per group) at stride `norm_stride`: it needs more than one voxel, so the padded input
    must be larger than `norm_stride` on some axis; the rule asks it of every axis, so that one
    number describes it (an input with one axis above it and the others below would still run).

    A model built for a plan (`config.strides`) pads and strides each axis differently: the per-axis
    fields (D, H, W) hold the rule, and the scalar ones their largest value (a bound that every axis
    meeting it satisfies). Without a plan every axis is alike and both agree.
    """

    min_edge: int
    max_edge: int | None  # None: no upper bound
    pad_multiple: int  # inputs are zero-padded up to a multiple of this (the fixed size for UNETR)
    norm_stride: int | None  # stride of the deepest per-sample norm; None when there is none (LayerNorm only)
    min_edges: Triple = (1, 1, 1)  # per axis: one axis reaching its entry is enough
    pad_multiples: Triple = (1, 1, 1)  # per axis
    norm_strides: Triple | None = None  # per axis


# UNETR's ViT cuts the volume into 16^3 patches (fixed in MONAI's UNETR): img_size must be a multiple.
_UNETR_PATCH = 16


def _monai_default(net: str, arg: str):
    """Default of an argument of a MONAI network, so that the sizes follow MONAI, not a copy of it."""
    from monai.networks import nets

    return inspect.signature(getattr(nets, net)).parameters[arg].default


def _product(steps: Sequence[Sequence[int]]) -> Triple:
    """Per axis (D, H, W), the product of the steps' strides."""
    return tuple(math.prod(s[a] for s in steps) for a in range(3))  # type: ignore[return-value]


def _pad_multiples(config: ModelConfig) -> Triple:
    """Per axis, the multiple model `config` pads its inputs to (not UNETR, which pads to its cube)."""
    if config.name == "crossmodalnet":
        return _product(plan_steps(config))
    if config.name == "dynunet" or (config.name == "unet" and config.strides is not None):
        return _product(conv_plan(config)[0])
    return (_MULTIPLE[config.name],) * 3


def _norm_strides(config: ModelConfig) -> Triple | None:
    """Per axis, the stride of the deepest map a model normalises per sample and per channel, or None."""
    if config.name in ("crossmodalnet", "dynunet") or (config.name == "unet" and config.strides is not None):
        # CrossModalNet: the bottleneck's UnetResBlock (InstanceNorm) on the last token stage, at the padding
        # divisor; UNet and DynUNet: InstanceNorm down to the bottom level.
        return _pad_multiples(config)
    stride = _norm_stride(config)
    return None if stride is None else (stride,) * 3


def _norm_stride(config: ModelConfig) -> int | None:
    """Stride of the deepest map a model normalises per sample and per channel, or None if none does
    (the largest over the axes for a model built for a plan)."""
    name = config.name
    if name == "crossmodalnet" or name == "dynunet" or (name == "unet" and config.strides is not None):
        return max(_pad_multiples(config))
    kw = BASELINE_SIZES[name][config.size]
    if name == "swinunetr":
        # Patch embedding, then one patch merging per stage; its encoder10 (InstanceNorm) runs on the last one.
        patch = kw.get("patch_size", _monai_default("SwinUNETR", "patch_size"))
        return patch * 2 ** len(kw.get("depths", _monai_default("SwinUNETR", "depths")))
    if name == "mednext":
        # GroupNorm with one group per channel: normalises each sample's channel over space, like InstanceNorm.
        return 2 ** len(kw.get("blocks_down", _monai_default("MedNeXt", "blocks_down")))
    if name == "unet":
        return math.prod(kw["strides"])  # InstanceNorm (MONAI's default) in every unit, down to the bottom
    # UNETR: normalised maps are upsampled from the ViT's grid first (at least 2 voxels per axis).
    # nnFormer, VT-UNet, Swin-Unet: LayerNorm over channels only, which any number of voxels satisfies.
    return None


def input_size_rule(config: ModelConfig) -> InputSizeRule:
    """Input sizes model `config.name` at `config.size` accepts, derived from its architecture.

    Raises CrossModalNetError for an unknown model, or (UNETR) an img_size that is not a multiple of 16.
    """
    name = config.name
    if name not in MODEL_NAMES:
        raise CrossModalNetError(f"unknown model {name!r}; registered: {', '.join(MODEL_NAMES)}")
    if name == "unetr":
        if config.img_size < _UNETR_PATCH or config.img_size % _UNETR_PATCH:
            raise CrossModalNetError(f"model unetr ({config.size}) needs img_size a multiple of {_UNETR_PATCH}, "
                                     f"got {config.img_size}")
        cube = config.img_size
        return InputSizeRule(min_edge=1, max_edge=cube, pad_multiple=cube, norm_stride=None, pad_multiples=(cube,) * 3)
    if name != "crossmodalnet" and config.size not in BASELINE_SIZES[name]:
        raise CrossModalNetError(f"unknown size {config.size!r} for {name}; choose from {sorted(BASELINE_SIZES[name])}")
    multiples = _pad_multiples(config)
    strides = _norm_strides(config)
    # Padded edge P = ceil(s / multiple) * multiple must exceed the norm's stride (more than one voxel
    # there); the smallest such s is one more than the largest multiple of `multiple` not above the stride.
    min_edges: Triple = (1, 1, 1) if strides is None else tuple(  # type: ignore[assignment]
        (st // m) * m + 1 for st, m in zip(strides, multiples, strict=True))
    return InputSizeRule(min_edge=max(min_edges), max_edge=None, pad_multiple=max(multiples),
                         norm_stride=None if strides is None else max(strides), min_edges=min_edges,
                         pad_multiples=multiples, norm_strides=strides)


def min_input_edge(config: ModelConfig) -> int:
    """Smallest edge (voxels, per axis) an input of model `config.name` at `config.size` may have."""
    return input_size_rule(config).min_edge


def check_input_size(config: ModelConfig, shape: Sequence[int]) -> None:
    """Refuse a spatial shape (D, H, W) that model `config.name` cannot run, with a one-line message.

    Raises CrossModalNetError naming the model and the smallest (UNETR: largest) edge it accepts.
    The deepest per-sample norm needs more than one voxel in all, so one axis of at least
    `min_edges` on it is enough: a thin slab of a few slices runs if its other axes are large.
    """
    if len(shape) != 3:
        raise ValueError(f"expected a spatial shape (D, H, W), got {tuple(shape)}")
    rule = input_size_rule(config)
    if all(s < m for s, m in zip(shape, rule.min_edges, strict=True)):
        if len(set(rule.min_edges)) == 1:
            raise CrossModalNetError(f"model {config.name} ({config.size}) needs inputs of at least {rule.min_edge} "
                                     f"voxels on one axis, got {list(shape)}")
        raise CrossModalNetError(f"model {config.name} ({config.size}) needs one axis of at least its minimum "
                                 f"(D, H, W) = {rule.min_edges} voxels, got {list(shape)}")
    for axis, s in enumerate(shape):
        if s < 1:
            raise CrossModalNetError(f"model {config.name} ({config.size}) needs at least 1 voxel per axis, "
                                     f"got {s} on axis {axis}")
        if rule.max_edge is not None and s > rule.max_edge:
            raise CrossModalNetError(f"model {config.name} ({config.size}) needs inputs of at most {rule.max_edge} "
                                     f"voxels per axis (its img_size), got {s} on axis {axis}")


def supports_plan(name: str, strides: Sequence[Sequence[int]] | None, patch: Sequence[int],
                  size: str = "small") -> str | None:
    """Whether model `name` at `size` can run a dataset plan: per-axis downsampling `strides` (None: the
    model's own) on patches of `patch` (D, H, W) voxels. None when it can, else the one-line reason.

    CrossModalNet, UNet and DynUNet take the plan's strides (CrossModalNet needs log2(patch_size) +
    len(depths) - 1 of them); the reason is then what their config or input-size check refuses. The
    others downsample every axis alike by a fixed factor (UNETR embeds a fixed cube): they cannot follow
    per-axis strides, and a patch that is not a multiple of their factor on every axis would be padded.
    """
    if name not in MODEL_NAMES:
        raise CrossModalNetError(f"unknown model {name!r}; registered: {', '.join(MODEL_NAMES)}")
    patch = [int(p) for p in patch]
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch must be three positive sizes (D, H, W), got {patch}")
    if name in PLAN_MODELS:
        try:
            plan = {} if strides is None else {"strides": tuple(tuple(s) for s in strides)}
            check_input_size(ModelConfig.from_size(name, size, **plan), patch)
        except CrossModalNetError as exc:
            return str(exc).removeprefix("config: ")
        return None
    anisotropic = strides is not None and any(len(set(s)) > 1 for s in strides)
    if name == "unetr":
        cube = max(_UNETR_PATCH, -(-max(patch) // _UNETR_PATCH) * _UNETR_PATCH)
        if anisotropic or len(set(patch)) > 1 or cube != patch[0]:
            return (f"unetr embeds a fixed cube (img_size, a multiple of {_UNETR_PATCH}) with absolute position "
                    f"embeddings; a {'x'.join(map(str, patch))} patch would be padded to {cube}³")
        return None
    factor = _MULTIPLE[name]
    padded = [-(-p // factor) * factor for p in patch]
    axis = max(range(3), key=lambda a: padded[a] / patch[a])
    if padded[axis] != patch[axis]:
        return (f"{name} downsamples every axis by {factor}; a {patch[axis]}-slice patch would be padded to "
                f"{padded[axis]} slices (axis {axis} of {'x'.join(map(str, patch))})")
    if anisotropic:
        return f"{name} downsamples every axis alike (by {factor}) and cannot follow per-axis strides"
    return None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the fused CPU attention kernel, which FlopCounterMode does not count (torch 2.13).

    Without it every attention model's GFLOPs would leave out q·kᵀ and attn·v. Same formula as
    PyTorch's for the CUDA flash kernel: 2·B·H·L·S·(E + Ev).
    """
    b, h, q_len, e = query_shape
    return 2 * b * h * q_len * key_shape[-2] * (e + value_shape[-1])


def _input_channels(model: nn.Module) -> int:
    """Channels of a model's image: config.modalities x config.in_channels, 1 for a model without a config."""
    cfg = getattr(model, "config", None)
    return cfg.modalities * cfg.in_channels if isinstance(cfg, ModelConfig) else 1


def forward_flops(model: nn.Module, edge: int, batch: int = 1, channels: int | None = None) -> int:
    """FLOPs of one forward pass on a (batch, channels, edge, edge, edge) image, all channels present
    (FlopCounterMode). channels: None takes the model's (`config.modalities x config.in_channels`)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, channels or _input_channels(model), edge, edge, edge)
    model.eval()
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(x)
    return int(counter.get_total_flops())


def print_models_table(model_size: str = "small", edge: int = 96, modalities: int = 2) -> list[dict]:
    """Print (markdown) every registered model at `model_size` for `modalities` input channels:
    parameters (M) and GFLOPs at edge³.

    A model that cannot run at edge³ (`check_input_size`) keeps its row, with the size it needs in
    place of the GFLOPs (`gflops` None, `note` the reason). UNETR is built for the smallest img_size
    (a multiple of 16) that holds edge³, since it pads its input up to img_size.
    """
    rows = []
    for name in MODEL_NAMES:
        img_size = max(_UNETR_PATCH, -(-edge // _UNETR_PATCH) * _UNETR_PATCH)
        cfg = ModelConfig.from_size(name, model_size, img_size=img_size, modalities=modalities)
        model = build_model(name, cfg)
        row = {"model": name, "size": model_size, "params_m": count_parameters(model) / 1e6, "gflops": None,
               "note": None}
        try:
            check_input_size(cfg, (edge,) * 3)
        except CrossModalNetError:
            row["note"] = f"needs >= {min_input_edge(cfg)} voxels per axis"
        else:
            row["gflops"] = forward_flops(model, edge) / 1e9
            if name == "unetr" and img_size != edge:
                row["note"] = f"padded to its img_size {img_size}³"
        rows.append(row)
    print(f"| model | size | parameters (M) | forward GFLOPs at {edge}³ ({modalities} channels, batch 1) |")
    print("|---|---|---:|---:|")
    for r in rows:
        cell = r["note"] if r["gflops"] is None else f"{r['gflops']:.1f}" + (f" ({r['note']})" if r["note"] else "")
        print(f"| {r['model']} | {r['size']} | {r['params_m']:.2f} | {cell} |")
    return rows
