"""Checks and settings resolved before any training starts (nothing here writes).

- `resolve_config`: the --config file (or a resumed run's config.yaml) and CLI flags -> one `TrainConfig`;
- `check_runnable`: what the schema cannot know (the number of processes);
- `dataset_splits`: every listed file exists and each case's CT, MR and label share a grid; under
  DDP also every validation case's voxels (see there).
Every refusal is one `CrossModalNetError` line naming the file or key.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch.distributed

from crossmodalnet.config import CROSSMODALNET_FIELDS, ModelConfig, TrainConfig, load_config_file, replace, to_dict
from crossmodalnet.data.dataset import Case, check_case, load_case, load_dataset
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models.registry import check_input_size
from crossmodalnet.runs import RunFolder

__all__ = ["check_runnable", "resolve_config", "dataset_splits"]


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
        for key in ("ct", "mr", "label"):
            if getattr(case, key) is None:
                raise CrossModalNetError(f"{json_path}: case {case.id!r} has no {key!r}; training needs "
                                         "paired CT and MR with a label")
        check_case(case)
    if not val_cases and config.val_fraction > 0 and len(train_cases) >= 2:
        k = min(len(train_cases) - 1, max(1, round(config.val_fraction * len(train_cases))))
        train_cases, val_cases = train_cases[:-k], train_cases[-k:]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Each process loads only its share of the validation cases, after the main process has
        # created the run folder: a NaN in another's share must stop the run here, before that.
        for case in val_cases:
            load_case(case)
    return train_cases, val_cases


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
