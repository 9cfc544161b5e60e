"""A plan per dataset: spacing, patch, per-axis strides and windows, batch (nnU-Net's "plans").

    fp = fingerprint(cases, spec)                       # data.fingerprint
    plan = make_plan(fp, config.model, device="cpu")     # every number with the reason for it
    config = apply_plan(config, plan)                   # what the configuration leaves open

The rules, in order (each number of a plan comes with the sentence that says why, `Plan.reasons`):

1. **Target spacing**: the median spacing of the training cases per axis; an axis whose median
   spacing is over 3x the finest (a slice axis) takes the 10th percentile of its spacings
   instead, as nnU-Net does (fewer invented slices for the thick-slice cases).
2. **Field of view on the device**: a patch must see at least half of the median extent of every
   fine axis (`COVERAGE`) and every slice of a slice axis. When that patch is over the device's
   voxel budget (`BUDGETS`), the fine axes' spacing is coarsened until it fits; the slice axis is
   never resampled for this. (On a CPU, MyoPS's 0.73 mm in-plane voxels become about 1.2 mm.)
3. **Patch**: the median shape at the target spacing, shrunk along the axis that is largest
   relative to the median shape until it fits the budget, then rounded to a multiple of each
   axis's total stride.
4. **Strides**: at each downsampling step of the model, an axis is halved only while its current
   spacing is at most twice the finest current spacing (nnU-Net's rule: a 12 mm slice axis is
   not downsampled while the in-plane axes are at 1.2-4.8 mm) and it keeps at least 2 voxels.
   The number of steps is the model's (CrossModalNet: its stem's stride-2 convolutions plus its
   patch mergings).
5. **Windows** (Swin models): the model's window on every axis, except an axis that is never
   downsampled and has fewer than two windows of tokens: one window spans it (4-6 slices are
   one window, not padded to 8). A 2D plan's window keeps the token count of the model's cube in
   plane (4^3 -> 8 x 8 x 1); a per-axis window is taken as given.
6. **Kernels** (conv models): 3 on an axis, 1 where its spacing at that level is over twice the
   finest (nnU-Net).
7. **Batch**: the device's voxels per step divided by the patch's voxels, within [2, 16].

**2D plans.** A dataset with a slice axis (rule 1) gets a 2D plan, as nnU-Net's `2d` configuration
(which nnU-Net picks on MyoPS and which is close to its best on ACDC): its slices are kept as they are
stored (target spacing None on that axis: 12, 14 and 23 mm stacks are not resampled into invented
slices), patches are one slice thick, no stride, window or kernel spans the slice axis, and the batch
is at least `MIN_BATCH_2D` slices, so the patch budget is the step budget over that (docs/design.md
section 8: on MyoPS a 3D plan of 6-slice patches learned less pathology at equal CPU time).

An isotropic dataset (the phantom) gets every stride 2 and the model's cubic window, which is
written as the model's defaults (None, an int): the model built is exactly the unplanned one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crossmodalnet.config import MODEL_SIZES, ModelConfig, TrainConfig, replace
from crossmodalnet.data.fingerprint import Fingerprint
from crossmodalnet.errors import CrossModalNetError

__all__ = ["Budget", "BUDGETS", "CONFIGURATIONS", "COVERAGE", "MIN_BATCH_2D", "Plan", "make_plan", "apply_plan",
           "model_steps", "slice_axes", "DEFAULT_PATCH",
           "DEFAULT_BATCH"]

COVERAGE = 0.5  # share of the median extent of each axis a patch must see
ANISOTROPY = 3.0  # an axis this many times coarser than the finest is a slice axis (rule 1)
CONFIGURATIONS = ("auto", "2d", "3d")
MIN_BATCH_2D = 8  # slices per step of a 2D plan: many patients' slices per step, as nnU-Net's 2d batches
DOWNSAMPLE_RATIO = 2.0  # an axis is halved only while at most this many times the finest (rule 4)
MIN_EDGE = 2  # voxels an axis keeps after a halving
_SHARED_STEPS = 4  # the patch of a model that takes no strides is rounded as CrossModalNet small's
# Without a plan (`plan: false`), the patch and batch of before plans.
DEFAULT_PATCH = (64, 64, 64)
DEFAULT_BATCH = 2


@dataclass(frozen=True)
class Budget:
    """What one training step may hold on a device: voxels of one patch, voxels of a batch."""

    patch_voxels: int
    step_voxels: int
    min_batch: int = 2
    max_batch: int = 16


# CPU: about a 50^3-voxel patch (the phantom's 64^3 median shape gives the 48^3 patch the CPU demo
# was tuned to; a CrossModalNet small step stays around a second on 2 cores); GPU: nnU-Net-sized.
BUDGETS: dict[str, Budget] = {
    "cpu": Budget(patch_voxels=2**17, step_voxels=2**18),
    "cuda": Budget(patch_voxels=2**21, step_voxels=2**22),
}


@dataclass(frozen=True)
class Plan:
    """The numbers a dataset's training runs with, and why each is what it is."""

    device: str
    orientation: str
    target_spacing: tuple[float | None, float | None, float | None]  # None: that axis as stored (2D plans)
    patch_size: tuple[int, int, int]
    batch_size: int
    strides: tuple[tuple[int, int, int], ...] | None
    window_size: int | tuple[int, int, int] | None
    kernels: tuple[tuple[int, int, int], ...] | None
    reasons: tuple[str, ...] = field(default=())
    configuration: str = "3d"  # "2d": one-slice patches, nothing spans the slice axis (module docstring)

    def to_dict(self) -> dict[str, Any]:
        def listed(v: Any) -> Any:
            return [listed(x) for x in v] if isinstance(v, tuple | list) else v

        return {"device": self.device, "configuration": self.configuration, "orientation": self.orientation,
                "target_spacing": [None if s is None else round(s, 4) for s in self.target_spacing],
                "patch_size": list(self.patch_size),
                "batch_size": self.batch_size, "strides": listed(self.strides),
                "window_size": listed(self.window_size), "kernels": listed(self.kernels),
                "reasons": list(self.reasons)}

    def describe(self) -> str:
        """The plan as lines a user reads: every number, then why."""
        lines = [f"configuration  {self.configuration}",
                 f"orientation    {self.orientation}",
                 f"target spacing {' x '.join('stored' if s is None else f'{s:.3g}' for s in self.target_spacing)} mm",
                 f"patch          {' x '.join(map(str, self.patch_size))} voxels, batch {self.batch_size}",
                 f"strides        {_fmt_steps(self.strides)}",
                 f"window         {self.window_size}"]
        if self.kernels is not None:
            lines.append(f"kernels        {_fmt_steps(self.kernels)}")
        return "\n".join(lines + ["why:"] + [f"  - {r}" for r in self.reasons])


def _fmt_steps(steps: Sequence[Sequence[int]] | None) -> str:
    return "model default (2 on every axis)" if steps is None else " ".join("x".join(map(str, s)) for s in steps)


def model_steps(model: ModelConfig) -> int | None:
    """How many downsampling steps the model has (None: a model a plan cannot shape)."""
    if model.name == "crossmodalnet":
        return int(math.log2(model.patch_size)) + len(model.depths) - 1
    if model.name == "dynunet":  # levels = steps + 1, the size's by default
        return len(MODEL_SIZES["dynunet"][model.size]["filters"]) - 1
    if model.name == "unet":
        return len(MODEL_SIZES["unet"][model.size]["strides"])
    return None


def _target_spacing(fp: Fingerprint, reasons: list[str]) -> list[float]:
    median = list(fp.median_spacing)
    target = list(median)
    coarse = int(np.argmax(median))
    finest = min(median)
    if median[coarse] > ANISOTROPY * finest:
        low = fp.spacing_percentile(10)[coarse]
        target[coarse] = low
        reasons.append(f"axis {coarse} is a slice axis (median {median[coarse]:.3g} mm, over {ANISOTROPY:g}x the "
                       f"finest {finest:.3g} mm): its spacing is the 10th percentile {low:.3g} mm, the rest the "
                       "median")
    else:
        reasons.append(f"spacing: the median of the {fp.num_cases} training cases per axis")
    return target


def slice_axes(target: Sequence[float | None]) -> set[int]:
    """Axes over ANISOTROPY x the finest spacing, and axes kept as stored (None)."""
    finest = min(t for t in target if t is not None)
    return {a for a, s in enumerate(target) if s is None or s > ANISOTROPY * finest}


def make_plan(fp: Fingerprint, model: ModelConfig, device: str = "cpu", budget: Budget | None = None,
              target_spacing: Sequence[float | None] | None = None, patch_size: Sequence[int] | None = None,
              configuration: str = "auto") -> Plan:
    """The plan of `model` on a dataset with fingerprint `fp` for `device` ("cpu" or "cuda").

    target_spacing, patch_size: what a configuration fixes; the rest is planned around them (the
    strides of a given patch, the batch that fills the budget with it). configuration: "2d", "3d", or
    "auto" (2d where the data have a slice axis, else 3d)."""
    if configuration not in CONFIGURATIONS:
        raise CrossModalNetError(f"plan: configuration must be one of {', '.join(CONFIGURATIONS)}, "
                                 f"got {configuration!r}")
    if device not in BUDGETS and budget is None:
        raise CrossModalNetError(f"plan: device must be one of {sorted(BUDGETS)}, got {device!r}")
    budget = budget or BUDGETS[device]
    reasons: list[str] = []
    if target_spacing is not None:
        target = [None if s is None else float(s) for s in target_spacing]
        reasons.append("target spacing: the configuration's")
    else:
        target = _target_spacing(fp, reasons)
    thin = slice_axes(target)
    flat: set[int] = set()
    if configuration == "2d" or (configuration == "auto" and thin):
        # A 2D plan (module docstring): slices as stored, one-slice patches, a batch of many slices.
        # Without a slice axis, the coarsest axis (the first of equals) is the one sliced along.
        flat = thin or {int(np.argmax(_mm(target)))}
        thin = flat
        if target_spacing is None:
            reasons.pop()  # the slice axis's spacing: not resampled at all
            reasons.append("spacing: the median of the training cases per axis, slices as stored")
            for a in flat:
                target[a] = None
        budget = Budget(patch_voxels=budget.step_voxels // MIN_BATCH_2D, step_voxels=budget.step_voxels,
                        min_batch=MIN_BATCH_2D, max_batch=4 * budget.max_batch)
        reasons.append(f"2D plan: axis {'/'.join(map(str, sorted(flat)))} is the slice axis; slices are kept as "
                       "stored, patches are one slice thick and nothing spans that axis (nnU-Net's 2d); "
                       f"at least {MIN_BATCH_2D} slices per step, so {budget.patch_voxels} voxels per patch")
    # Rule 2: the field of view a patch must see, on the device's budget.
    shape = np.array(fp.median_shape_at(target))
    # Every slice of a slice axis stays in a 3D patch, a 2D patch is one slice; the fine axes need
    # COVERAGE of their extent.
    need = np.array([1 if a in flat else shape[a] if a in thin else COVERAGE * shape[a] for a in range(3)])
    need = np.maximum(1, np.ceil(need))
    if np.prod(need) > budget.patch_voxels and target_spacing is None:
        fine = [a for a in range(3) if a not in thin]
        factor = (np.prod(need) / budget.patch_voxels) ** (1.0 / len(fine))
        before = [target[a] for a in fine]
        for a in fine:
            target[a] *= factor
        reasons.append(f"in-plane spacing {'/'.join(f'{s:.3g}' for s in before)} -> "
                       f"{'/'.join(f'{target[a]:.3g}' for a in fine)} mm: at the finer spacing half of the median "
                       f"field of view needs {int(np.prod(need))} voxels, over the {device} budget of "
                       f"{budget.patch_voxels} per patch")
        shape = np.array(fp.median_shape_at(target))
    shape = np.array([1.0 if a in flat else shape[a] for a in range(3)])
    # Rule 3: the patch, from the median shape down to the budget, a multiple of the total strides.
    # A model that takes no strides gets the patch CrossModalNet small would (4 steps): one patch for
    # every model of a comparison.
    steps = model_steps(model)
    if patch_size is not None:
        given = np.array(patch_size, dtype=int)
        strides = _strides(target, given, steps or _SHARED_STEPS)
        return _finish(model, steps, strides, given, target, flat, fp, device, budget,
                       [*reasons, f"patch {' x '.join(map(str, given))}: the configuration's"])
    patch = np.maximum(1, np.round(shape)).astype(int)
    strides = _strides(target, patch, steps or _SHARED_STEPS)
    divisor = _divisor(strides)
    patch = np.maximum(divisor, np.round(patch / divisor).astype(int) * divisor)
    shrunk = False
    while np.prod(patch) > budget.patch_voxels and (patch > divisor).any():
        # The axis with the widest field of view gives up voxels first: on thick-slice data the
        # in-plane axes shrink and every slice stays in the patch.
        extent = np.where(patch > divisor, patch * np.array(_mm(target)), -1.0)
        axis = int(np.argmax(extent))
        patch[axis] -= divisor[axis]
        shrunk = True
    strides = _strides(target, patch, steps or _SHARED_STEPS)  # a smaller patch may allow fewer halvings
    divisor = _divisor(strides)
    patch = np.maximum(divisor, (patch // divisor) * divisor)
    rounded = patch
    reasons.append(f"patch {' x '.join(map(str, rounded))}: the median shape at the target spacing "
                   f"({' x '.join(f'{s:.0f}' for s in shape)})" + (", shrunk along the axis with the widest field "
                   f"of view to the {device} budget of {budget.patch_voxels} voxels" if shrunk else "")
                   + f", a multiple of the total stride {' x '.join(map(str, divisor))}")
    return _finish(model, steps, strides, rounded, target, flat, fp, device, budget, reasons)


def _mm(target: Sequence[float | None]) -> list[float]:
    """Spacing per axis with an axis kept as stored (None) as infinitely coarse: never halved, never
    spanned by a kernel, first to give up voxels."""
    return [math.inf if t is None else t for t in target]


def _finish(model: ModelConfig, steps: int | None, strides, patch: np.ndarray, target: list[float | None],
            flat: set[int], fp: Fingerprint,
            device: str, budget: Budget, reasons: list[str]) -> Plan:
    """Rules 4-7 for a patch: strides (None for a model that takes none), window, kernels, batch."""
    rounded = patch
    if steps is None:
        strides = None
        reasons.append(f"strides: {model.name} takes none from a plan (its own downsampling)")
    else:
        reasons.append("strides: an axis is halved only while its spacing is at most twice the finest "
                       f"and it keeps {MIN_EDGE}+ voxels ({steps} steps for {model.name})")
    window = _window(model, strides, rounded, flat, reasons)
    # MONAI's UNet has one kernel for all levels: only DynUNet takes nnU-Net's per-level kernels; in a
    # 2D plan both take kernel 1 along the slice axis at every level (a 3 there would convolve padding).
    kernels = None
    if model.name == "dynunet" and strides is not None:
        kernels = _kernels(target, strides, flat)
    elif model.name == "unet" and strides is not None and flat:
        kernels = (tuple(1 if a in flat else 3 for a in range(3)),) * (len(strides) + 1)
    batch = int(np.clip(budget.step_voxels // int(np.prod(rounded)), budget.min_batch, budget.max_batch))
    reasons.append(f"batch {batch}: {budget.step_voxels} voxels per step on the {device} / "
                   f"{int(np.prod(rounded))} per patch, within [{budget.min_batch}, {budget.max_batch}]")
    if strides is not None and all(s == (2, 2, 2) for s in strides):
        strides = None  # isotropic: the model's own default, the same model as without a plan
    if kernels is not None and all(k == (3, 3, 3) for k in kernels):
        kernels = None
    spacing = tuple(None if t is None else float(t) for t in target)
    return Plan(device, fp.orientation, spacing, tuple(int(p) for p in rounded), batch,  # type: ignore[arg-type]
                strides, window, kernels, tuple(reasons), "2d" if flat else "3d")


def _divisor(strides) -> np.ndarray:
    """Total stride per axis (product of the steps); ones without strides."""
    return np.prod(np.array(strides), axis=0).astype(int) if strides else np.ones(3, dtype=int)


def _strides(target: Sequence[float], patch: np.ndarray, steps: int) -> tuple[tuple[int, int, int], ...]:
    spacing, size, out = np.array(_mm(target), dtype=float), patch.astype(float).copy(), []
    for _ in range(steps):
        finest = spacing.min()
        step = tuple(int(2 if spacing[a] <= DOWNSAMPLE_RATIO * finest and size[a] / 2 >= MIN_EDGE else 1)
                     for a in range(3))
        out.append(step)
        spacing, size = spacing * step, size / step
    return tuple(out)


def _window(model: ModelConfig, strides, patch: np.ndarray, flat: set[int],
            reasons: list[str]) -> int | tuple[int, int, int] | None:
    ws = model.window_size
    if ws is None or strides is None:
        return ws
    base = ws if isinstance(ws, int) else max(ws)
    stem = int(math.log2(model.patch_size))  # the conv stem's steps come first
    tokens = patch // np.prod(np.array(strides[:stem]), axis=0) if stem else patch
    never = [a for a in range(3) if all(s[a] == 1 for s in strides)]
    window = [base] * 3
    if flat and isinstance(ws, int):
        # A 2D plan's window holds as many tokens as the model's cube, base^3 over the in-plane axes
        # (4^3 -> 8x8x1): a 4x4 window sees a quarter of the context the model was designed with
        # (docs/benchmarks.md, MyoPS). A per-axis window is taken as given.
        plane = [a for a in range(3) if a not in flat]
        edge = round(base ** (3 / len(plane)))
        for a in plane:
            window[a] = edge
        reasons.append(f"window {edge} in plane: a 2D plan's window holds the {base ** 3} tokens of the model's "
                       f"{base}^3 window")
    for a in never:
        if a in flat and tokens[a] > 1:  # a 2D plan given a thicker patch: still no attention across slices
            window[a] = 1
            reasons.append(f"window 1 on axis {a}: the slice axis of a 2D plan")
        elif tokens[a] < 2 * base:
            window[a] = int(tokens[a])
            reasons.append(f"window {window[a]} on axis {a}: never downsampled and {tokens[a]} tokens long, so one "
                           "window spans it")
    return base if window == [base] * 3 else tuple(window)


def _kernels(target: Sequence[float | None], strides, flat: set[int]) -> tuple[tuple[int, int, int], ...]:
    spacing, out = np.array(_mm(target), dtype=float), []
    for step in [(1, 1, 1), *strides]:
        spacing = spacing * step
        finest = spacing.min()
        out.append(tuple(int(3 if a not in flat and spacing[a] <= DOWNSAMPLE_RATIO * finest else 1)
                         for a in range(3)))
    return tuple(out)


def apply_plan(config: TrainConfig, plan: Plan) -> TrainConfig:
    """The configuration with what it leaves open taken from the plan: patch and batch when None,
    target spacing when None, orientation when "auto", the model's strides and kernels when None,
    its window when a plan gives one per axis."""
    model = config.model
    model_updates: dict[str, Any] = {}
    if model.strides is None and plan.strides is not None:
        model_updates["strides"] = plan.strides
        if plan.window_size is not None:
            model_updates["window_size"] = plan.window_size
    if model.kernels is None and plan.kernels is not None:
        model_updates["kernels"] = plan.kernels
    updates: dict[str, Any] = {}
    if model_updates:
        updates["model"] = replace(model, **model_updates)
    if config.patch_size is None:
        updates["patch_size"] = plan.patch_size
    if config.batch_size is None:
        updates["batch_size"] = plan.batch_size
    if config.target_spacing is None:
        updates["target_spacing"] = plan.target_spacing
    if config.orientation == "auto":
        updates["orientation"] = plan.orientation
    return replace(config, **updates) if updates else config
