"""Checks and settings resolved before any training starts.

- `check_config`: refuse settings that cannot run, naming the key;
- `load_config_file` / `resolve_config`: YAML file and CLI flags -> one `TrainConfig`;
- `dataset_splits`: every listed file exists and each case's CT, MR and label share a grid;
- `open_run`: refuse a non-empty run folder without --resume, or a resume with another
  configuration; return the saved state of a resumed run.
Every refusal is one `CrossModalNetError` line naming the file or key.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from crossmodalnet.config import (
    CROSSMODALNET_SIZES,
    ModelConfig,
    TrainConfig,
    from_dict,
    imply_missing_fields,
    load_run_config,
    read_yaml,
    to_dict,
)
from crossmodalnet.data.dataset import Case, check_case, load_dataset
from crossmodalnet.data.preprocess import Preprocessor
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.train import checkpoint as ckpt

__all__ = ["check_config", "load_config_file", "resolve_config", "dataset_splits", "open_run"]


def open_run(out: Path, config: TrainConfig, resume: bool) -> dict[str, Any]:
    """Refuse unsafe run folders; on resume return the saved state and preprocessing (rank 0)."""
    if out.exists() and not out.is_dir():
        raise CrossModalNetError(f"{out}: exists and is not a folder; choose another --out")
    exists = out.exists() and any(out.iterdir())
    if not resume:
        if exists:
            raise CrossModalNetError(f"{out}: run folder is not empty; pass --resume to continue that run "
                                     "or choose another --out")
        return {"state": None, "preprocess": None}
    if not (out / ckpt.CONFIG).is_file():
        raise CrossModalNetError(f"{out}: nothing to resume (no {ckpt.CONFIG}); train without --resume")
    saved = load_run_config(out / ckpt.CONFIG)
    diffs = ckpt.config_differences(saved, config)
    if diffs:
        raise CrossModalNetError(f"{out / ckpt.CONFIG}: --resume refused, this run holds another configuration "
                                 f"({'; '.join(diffs)}); resume with its settings or train into a new folder")
    last = ckpt.find_last(out)
    preprocess = Preprocessor.load(out / ckpt.PREPROCESS).to_dict() if (out / ckpt.PREPROCESS).is_file() else None
    if last is None:
        return {"state": None, "preprocess": preprocess}
    # Weights are loaded into the model once it is built (Trainer._build).
    return {"state": ckpt.load_last(last), "preprocess": preprocess}


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
    return train_cases, val_cases


def check_config(config: TrainConfig, world_size: int = 1) -> None:
    """Refuse settings that cannot run, naming the key."""
    from crossmodalnet.models.registry import MODEL_NAMES

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise CrossModalNetError(f"config: {key} must be {what}, got {getattr(config, key, None)!r}")

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    if config.model.name not in MODEL_NAMES:
        raise CrossModalNetError(f"config: unknown model {config.model.name!r}; registered: {', '.join(MODEL_NAMES)}")
    for key in ("epochs", "iterations_per_epoch", "batch_size", "val_every", "sw_batch_size"):
        need(isinstance(getattr(config, key), int) and getattr(config, key) >= 1, key, "a positive integer")
    need(config.batch_size % world_size == 0, "batch_size", f"a multiple of the {world_size} processes")
    need(len(config.patch_size) == 3 and all(isinstance(p, int) and p > 0 for p in config.patch_size),
         "patch_size", "three positive integers")
    for key in ("lr", "weight_decay", "grad_clip", "balancing_alpha", "foreground_ratio", "sw_overlap"):
        need(number(getattr(config, key)), key, "a number (write 1.0e-5, not 1e-5, in YAML)")
    need(config.lr > 0, "lr", "positive")
    need(0 <= config.foreground_ratio <= 1, "foreground_ratio", "in [0, 1]")
    need(0 <= config.sw_overlap < 1, "sw_overlap", "in [0, 1)")
    need(config.optimizer in ("adam", "adamw"), "optimizer", "'adam' or 'adamw'")
    need(config.scheduler in ("cosine", "constant"), "scheduler", "'cosine' or 'constant'")
    need(all(a in (0, 1, 2) for a in config.flip_axes), "flip_axes", "a list of axes 0, 1, 2")
    need(config.max_minutes is None or (number(config.max_minutes) and config.max_minutes > 0),
         "max_minutes", "a positive number of minutes")


def load_config_file(path: str | os.PathLike, saved: bool = False) -> TrainConfig:
    """A TrainConfig YAML whose `model` may give just `name` and `size`: the named size fills the
    architecture fields, and any field the file does give overrides it. saved: the file is a run's
    config.yaml (a full dump), whose missing fields mean what they meant then (`imply_missing_fields`)."""
    path = Path(path)
    data = imply_missing_fields(read_yaml(path)) if saved else read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("model", {}), dict):
        raise CrossModalNetError(f"{path}: expected a mapping of TrainConfig keys with a 'model' mapping")
    model = dict(data.get("model") or {})
    name, size = model.pop("name", "crossmodalnet"), model.pop("size", "small")
    try:
        resolved = ModelConfig.from_size(name, size, **model)
    except TypeError as exc:
        raise CrossModalNetError(f"{path}: model: {exc}") from None
    except CrossModalNetError as exc:
        raise CrossModalNetError(f"{path}: model: {exc}") from None
    return from_dict(TrainConfig, {**data, "model": to_dict(resolved)}, str(path))


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """CLI flags over the --config file (or, resuming, the run's config.yaml) over the defaults."""
    if args.config is not None:
        config = load_config_file(args.config)
    elif args.resume and (Path(args.out) / ckpt.CONFIG).is_file():
        config = load_config_file(Path(args.out) / ckpt.CONFIG, saved=True)
    else:
        config = TrainConfig()
    if args.model is not None or args.size is not None:
        # A new name/size refills the architecture fields; the other model settings are kept.
        kept = {k: v for k, v in to_dict(config.model).items()
                if k not in {"name", "size", *CROSSMODALNET_SIZES["small"]}}
        config.model = ModelConfig.from_size(args.model or config.model.name, args.size or config.model.size, **kept)
    for key in ("epochs", "max_minutes", "seed", "device"):
        if getattr(args, key, None) is not None:
            setattr(config, key, getattr(args, key))
    return config
