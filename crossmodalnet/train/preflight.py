"""Checks and settings resolved before any training starts (nothing here writes, but the `plan`
command's own output file).

- `resolve_config`: the --config file (or a resumed run's config.yaml) and CLI flags -> one `TrainConfig`;
- `check_runnable`: what the schema cannot know (the number of processes);
- `dataset_spec`: the dataset's channels, labels and regions (and, resuming, that they are the run's);
- `dataset_splits`: every listed file exists and each case's channels and label share a grid; under
  DDP also every validation case's voxels (see there);
- `check_label_values`: every declared label occurs in the training labels;
- `planned`, `plan_dataset`: the dataset's plan (`train.plan`) for what the configuration leaves open,
  from the very cases `train` trains on.
Every refusal is one `CrossModalNetError` line naming the file or key.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch.distributed

from crossmodalnet.config import CROSSMODALNET_FIELDS, ModelConfig, TrainConfig, load_config_file, replace, to_dict
from crossmodalnet.data.dataset import Case, check_case, load_case, load_dataset, read_spec
from crossmodalnet.data.fingerprint import Fingerprint, fingerprint
from crossmodalnet.data.spec import DataSpec
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path
from crossmodalnet.models.registry import check_input_size, supports_plan
from crossmodalnet.runs import RunFolder
from crossmodalnet.train.plan import DEFAULT_BATCH, DEFAULT_PATCH, Plan, apply_plan, make_plan, model_steps

__all__ = ["check_runnable", "resolve_config", "dataset_spec", "dataset_splits", "check_label_values", "planned",
           "plan_dataset", "plan_from_cli"]


def check_runnable(config: TrainConfig, world_size: int = 1) -> None:
    """Refuse a valid configuration this launch or this model cannot run, naming the key."""
    try:
        check_input_size(config.model, config.patch_size)
    except CrossModalNetError as exc:
        raise CrossModalNetError(f"config: patch_size {list(config.patch_size)}: {exc}") from None
    if config.batch_size % world_size:
        raise CrossModalNetError(f"config: batch_size must be a multiple of the {world_size} processes, "
                                 f"got {config.batch_size}")


def dataset_splits(data_dir: str | os.PathLike, config: TrainConfig) -> tuple[list[Case], list[Case]]:
    """Training and validation cases, every file and grid checked (errors name the file).

    Without a validation split, the last `val_fraction` of the training cases validates.
    """
    dataset = load_dataset(data_dir)
    train_cases, val_cases = list(dataset["training"]), list(dataset["validation"])
    json_path = Path(data_dir) / "dataset.json"
    if not train_cases:
        raise CrossModalNetError(f"{json_path}: lists no training cases")
    for case in train_cases + val_cases:
        if case.label is None:
            raise CrossModalNetError(f"{json_path}: case {case.id!r} has no label; training and validation "
                                     "cases need one")
        check_case(case)
    if not val_cases and config.val_fraction > 0 and len(train_cases) >= 2:
        k = min(len(train_cases) - 1, max(1, round(config.val_fraction * len(train_cases))))
        train_cases, val_cases = train_cases[:-k], train_cases[-k:]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Each process loads only its share of the validation cases, after the main process has
        # created the run folder: a NaN in another's share must stop the run here, before that.
        for case in val_cases:
            load_case(case, dataset.spec)
    return train_cases, val_cases


def dataset_spec(data_dir: str | os.PathLike, run: RunFolder | None = None) -> DataSpec:
    """The dataset's channels, labels and regions; resuming (`run` given), they must be the run's."""
    spec = read_spec(data_dir)
    if run is not None and run.has_spec() and run.read_spec() != spec:
        raise CrossModalNetError(f"{Path(data_dir) / 'dataset.json'}: its channels, labels or regions differ from "
                                 f"those of the run being resumed ({run.spec_path})")
    return spec


def check_label_values(data_dir: str | os.PathLike, spec: DataSpec, labels: list[np.ndarray]) -> None:
    """Refuse a dataset description that declares a label no training label map holds (a table
    typed for other files: MM-WHS codes for files of indices, say)."""
    seen = np.zeros(spec.num_classes, dtype=bool)
    for label in labels:
        seen[np.unique(label)] = True
    absent = [c for i, c in enumerate(spec.classes) if not seen[i + 1]]
    if absent:
        names = ", ".join(f"{c.name} = {c.value}" for c in absent)
        raise CrossModalNetError(f"{Path(data_dir) / 'dataset.json'}: label(s) {names} occur in none of the "
                                 f"{len(labels)} training label maps; remove them or check the label files")


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """CLI flags over the --config file (or, resuming, the run's config.yaml) over the defaults."""
    run = RunFolder(args.out)
    if args.config is not None:
        config = load_config_file(args.config)
    elif args.resume and run.has_config():
        config = run.read_config()
    else:
        config = TrainConfig()
    if args.model is not None or args.size is not None:
        # A new name/size refills the architecture fields; the other model settings are kept.
        kept = {k: v for k, v in to_dict(config.model).items() if k not in {"name", "size", *CROSSMODALNET_FIELDS}}
        config = replace(config, model=ModelConfig.from_size(args.model or config.model.name,
                                                             args.size or config.model.size, **kept))
    flags = {key: getattr(args, key) for key in ("epochs", "max_minutes", "seed", "device")
             if getattr(args, key, None) is not None}
    return replace(config, **flags) if flags else config


def planned(config: TrainConfig, fp: Fingerprint, device: str) -> tuple[TrainConfig, Plan | None]:
    """The configuration with what it leaves open from the plan of the data (`config.plan`), or from
    the defaults of before plans (`plan: false`), and the plan (None without one)."""
    if not config.plan:
        return replace(config, patch_size=config.patch_size or DEFAULT_PATCH,
                       batch_size=config.batch_size or DEFAULT_BATCH), None
    plan = make_plan(fp, config.model, "cuda" if device == "cuda" else "cpu", target_spacing=config.target_spacing,
                     patch_size=config.patch_size, configuration=config.configuration)
    planned_config = apply_plan(config, plan)
    if model_steps(config.model) is None:
        # On anisotropic data (a plan with per-axis strides), a model that cannot take them is not
        # applicable where it would have to pad the patch (4 slices to 32); isotropic data run as before.
        anisotropic = make_plan(fp, ModelConfig.from_size("crossmodalnet", "small"), plan.device,
                                target_spacing=planned_config.target_spacing,
                                patch_size=planned_config.patch_size, configuration=plan.configuration).strides
        reason = None if anisotropic is None else supports_plan(config.model.name, anisotropic,
                                                                 planned_config.patch_size, config.model.size)
        if reason is not None:
            raise CrossModalNetError(f"{config.model.name} is not applicable to this dataset's plan: {reason}; "
                                     "give it a patch_size and target_spacing in its config, or plan: false")
    return planned_config, plan


def plan_dataset(data_dir: str | os.PathLike, model: ModelConfig, device: str = "cpu",
                 config: TrainConfig | None = None) -> tuple[Fingerprint, Plan]:
    """The fingerprint of the cases `train` would train on (the training split less the validation
    share `config` takes, `dataset_splits`) and the plan of `model` on it, as `train` makes it."""
    config = config or TrainConfig(model=model)
    spec = dataset_spec(data_dir)
    train_cases, _ = dataset_splits(data_dir, config)
    loaded = [load_case(c, spec) for c in train_cases]
    fp = fingerprint(loaded, spec, config.orientation, config.seed)
    return fp, make_plan(fp, model, device, target_spacing=config.target_spacing, patch_size=config.patch_size,
                         configuration=config.configuration)


def plan_from_cli(args: argparse.Namespace) -> Path:
    """`crossmodalnet plan DATA [--model M] [--size S] [--device cpu|cuda] [--configuration C] [--out FILE]`: the plan
    and why, write it with the fingerprint to FILE (default DATA/plans.json)."""
    model = ModelConfig.from_size(args.model, args.size)
    out = Path(args.out) if args.out is not None else Path(args.data) / "plans.json"
    if out.is_dir():
        raise CrossModalNetError(f"{out}: is a folder; give a file name for the plan")
    fp, plan = plan_dataset(args.data, model, args.device,
                            TrainConfig(model=model, configuration=getattr(args, "configuration", "auto")))
    print(f"plan of {args.data} ({fp.num_cases} training cases) for {model.name}/{model.size} on the {plan.device}:")
    print(plan.describe())
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps({"model": {"name": model.name, "size": model.size}, "plan": plan.to_dict(),
                                   "fingerprint": fp.to_dict()}, indent=2))
    print(f"wrote {out}")
    return out

