"""The run folder: weights, resume checkpoints and configuration, each written atomically.

    RUN/config.yaml        the resolved TrainConfig
    RUN/preprocess.json    normalisation statistics and target spacing, fitted on training data
    RUN/model.safetensors  best weights by validation mean Dice (metadata: the ModelConfig)
    RUN/last/              resume state: model.safetensors, state.pt, manifest.json
    RUN/metrics.csv, RUN/steps.csv, RUN/curves.png

`last/` is replaced as a unit: a new checkpoint is written into `last.tmp/` (manifest written
last), then `last/` is renamed to `last.old/`, `last.tmp/` to `last/`, and `last.old/` removed.
A SIGKILL at any moment leaves either `last/` or `last.old/` complete; `find_last` recovers
the newest complete one. `state.pt` holds only tensors and plain Python values, so it loads
with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from crossmodalnet.config import ModelConfig, TrainConfig, from_dict, to_dict
from crossmodalnet.data.io import atomic_path
from crossmodalnet.errors import CrossModalNetError

__all__ = [
    "CONFIG", "PREPROCESS", "BEST", "LAST", "METRICS", "STEPS", "CURVES", "RUNTIME_KEYS",
    "save_weights", "load_weights", "read_model_config", "save_last", "find_last", "load_last",
    "config_differences",
]

CONFIG = "config.yaml"
PREPROCESS = "preprocess.json"
BEST = "model.safetensors"
LAST = "last"
METRICS = "metrics.csv"
STEPS = "steps.csv"
CURVES = "curves.png"
_WEIGHTS = "model.safetensors"
_STATE = "state.pt"
_MANIFEST = "manifest.json"

# Settings of how a run is executed, not of what it computes: they may change on resume.
RUNTIME_KEYS: frozenset[str] = frozenset({"max_minutes", "device", "num_workers"})


def save_weights(model: nn.Module, path: str | os.PathLike, model_config: ModelConfig | None = None,
                 **metadata: Any) -> Path:
    """Write the model's state dict as safetensors, atomically; metadata holds the ModelConfig."""
    # clone(): safetensors refuses tensors sharing storage; copies are independent.
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {k: str(v) for k, v in metadata.items()}
    if model_config is not None:
        meta["model_config"] = json.dumps(to_dict(model_config))
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
        _fsync(tmp)
    return Path(path)


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load safetensors weights into `model` (strict). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CrossModalNetError(f"{path}: weights not found")
    try:
        state = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:
        raise CrossModalNetError(f"{path}: cannot read safetensors ({type(exc).__name__}: {exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CrossModalNetError(f"{path}: weights do not fit the configured model ({first})") from None
    return model


def read_model_config(path: str | os.PathLike) -> ModelConfig | None:
    """The ModelConfig stored in a weights file's metadata, if any."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return from_dict(ModelConfig, json.loads(meta["model_config"]), str(path)) if "model_config" in meta else None


def save_last(run_dir: str | os.PathLike, model: nn.Module, state: dict[str, Any],
              model_config: ModelConfig | None = None) -> Path:
    """Replace RUN/last/ with a new complete checkpoint (see the module docstring)."""
    run_dir = Path(run_dir)
    tmp, last, old = run_dir / f"{LAST}.tmp", run_dir / LAST, run_dir / f"{LAST}.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / _WEIGHTS, model_config)
    with atomic_path(tmp / _STATE) as t:
        torch.save(state, t)
        _fsync(t)
    with atomic_path(tmp / _MANIFEST) as t:  # written last: its presence marks the folder complete
        t.write_text(json.dumps({"step": state.get("step"), "epoch": state.get("epoch")}))
        _fsync(t)
    if last.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(last, old)
    os.replace(tmp, last)
    _fsync_dir(run_dir)
    if old.exists():
        shutil.rmtree(old)
    return last


def find_last(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder, repairing an interrupted swap; None if there is none."""
    run_dir = Path(run_dir)
    last, old, tmp = run_dir / LAST, run_dir / f"{LAST}.old", run_dir / f"{LAST}.tmp"
    if not (last / _MANIFEST).is_file() and (old / _MANIFEST).is_file():
        if last.exists():
            shutil.rmtree(last)
        os.replace(old, last)  # killed between the two renames: the old checkpoint is the last complete
    if tmp.exists():
        shutil.rmtree(tmp)  # a half-written (or never swapped) checkpoint
    if old.exists() and (last / _MANIFEST).is_file():
        shutil.rmtree(old)
    return last if (last / _MANIFEST).is_file() else None


def load_last(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, Any]:
    """The training state of checkpoint folder `path`; also loads its weights into `model` if given."""
    path = Path(path)
    if model is not None:
        load_weights(model, path / _WEIGHTS)
    try:
        return torch.load(path / _STATE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CrossModalNetError(f"{path / _STATE}: cannot load the resume state ({type(exc).__name__})") from None


def config_differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """'key: saved -> current' for every setting that differs, ignoring RUNTIME_KEYS."""
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(current))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in RUNTIME_KEYS and a.get(k) != b.get(k)]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
