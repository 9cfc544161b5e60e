"""The run folder: the one owner of its layout. Every reader and writer of a run goes through `RunFolder`.

    run = RunFolder("runs/cmn")
    run.open_new()                          # refuses a non-empty folder (before anything is written)
    run.write_config(config); run.write_preprocess(preprocessor)
    run.save_weights(model, config.model, epoch=3)         # RUN/model.safetensors, atomically
    model = run.load_model(device)                          # rebuilt from config.yaml + weights

Layout (a trained run; an adapted run adds the `adapt*` files):

    RUN/config.yaml                      the resolved TrainConfig
    RUN/preprocess.json                  normalisation statistics and target spacing (training data)
    RUN/spec.json                        the dataset's channels, labels and regions (runs before it: MM-WHS)
    RUN/plans.json                       the plan the run took its open settings from, with the reasons
    RUN/model.safetensors                weights to predict with (best by validation Dice, or the
                                         adaptation's final ones); metadata: the ModelConfig
    RUN/postprocess.json                 the postprocessing chosen on the validation cases after training
                                         (keep the largest foreground component, or nothing); predict follows it
    RUN/last/                            resume checkpoint: model.safetensors, state.pt, manifest.json
    RUN/metrics.csv, steps.csv, curves.png   logs, rewritten whole at every epoch end
    RUN/adapt.yaml, adapt.json           adaptation settings and inputs; its end-of-run summary
    RUN/model_best_source.safetensors    adaptation: best source-validation weights (a diagnostic)

`last/` is replaced as a unit: a new checkpoint is written into `last.tmp/` (manifest written
last), then `last/` is renamed to `last.old/`, `last.tmp/` to `last/`, and `last.old/` removed.
A SIGKILL at any moment leaves either `last/` or `last.old/` complete; `find_last` recovers the
newest complete one. `state.pt` holds only tensors and plain Python values, so it loads with
`torch.load(..., weights_only=True)`; no pickle is ever executed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import safetensors
import safetensors.torch
import torch
import yaml
from torch import nn

from crossmodalnet.config import (
    AdaptConfig,
    ModelConfig,
    TrainConfig,
    config_differences,
    from_dict,
    load_run_config,
    read_yaml,
    to_dict,
    to_yaml,
)
from crossmodalnet.data.preprocess import Preprocessor
from crossmodalnet.data.spec import MMWHS, DataSpec
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path, check_output_folder, write_csv
from crossmodalnet.models.crossmodalnet import CrossModalNet
from crossmodalnet.models.registry import build_model, upgrade_state_dict

__all__ = ["RunFolder", "MIN_FREE_BYTES", "save_weights", "load_weights", "read_model_config"]

_WEIGHTS = "model.safetensors"
_STATE = "state.pt"
_MANIFEST = "manifest.json"
# Refused below this much free space: a run's config, weights, checkpoint and logs would not fit.
# A floor, not an estimate: a disk that fills later still stops the run (one line, resumable).
MIN_FREE_BYTES = 16 << 20


class RunFolder:
    """A run folder at `path` (see the module docstring). Nothing is read or written on construction."""

    CONFIG = "config.yaml"
    PREPROCESS = "preprocess.json"
    SPEC = "spec.json"
    PLAN = "plans.json"
    WEIGHTS = _WEIGHTS
    LAST = "last"
    METRICS = "metrics.csv"
    STEPS = "steps.csv"
    CURVES = "curves.png"
    ADAPT_CONFIG = "adapt.yaml"
    ADAPT_SUMMARY = "adapt.json"
    BEST_SOURCE = "model_best_source.safetensors"
    POSTPROCESS = "postprocess.json"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # --- opening -------------------------------------------------------------------------------
    def check_writable_target(self) -> None:
        """Refuse a path that exists and is not a folder, lies below a file, or on a file system that
        is read-only or (nearly) full: checked before the folder is created, so a refusal leaves
        nothing behind. (A disk that fills later leaves the last complete checkpoint to resume.)"""
        check_output_folder(self.path, "--out")
        for parent in (self.path, *self.path.parents):
            if parent.exists():  # a folder: check_output_folder refused a file
                fs = os.statvfs(parent)
                if fs.f_flag & os.ST_RDONLY:
                    raise CrossModalNetError(f"{self.path}: {parent} is on a read-only file system; "
                                             "choose another --out")
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise CrossModalNetError(f"{self.path}: cannot write in {parent} (permission denied)")
                if fs.f_bavail * fs.f_frsize < MIN_FREE_BYTES:
                    raise CrossModalNetError(f"{self.path}: only {fs.f_bavail * fs.f_frsize // 1024} KiB free on the "
                                             f"disk of {parent}, a run needs at least {MIN_FREE_BYTES >> 20} MiB; "
                                             "free some space or choose another --out")
                break

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(self.path.iterdir())

    def open_new(self, what: str = "run") -> None:
        """Refuse a non-empty folder (a new run must not mix with an old one). Writes nothing."""
        self.check_writable_target()
        if not self.is_empty():
            raise CrossModalNetError(f"{self.path}: {what} folder is not empty; pass --resume to continue that "
                                     f"{what} or choose another --out")

    def create(self) -> None:
        """Make the folder (after every check has passed)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CrossModalNetError(f"{self.path}: cannot create the folder ({exc.strerror})") from None

    def check_resumable(self, config: TrainConfig) -> None:
        """Refuse a resume of a folder without a run, or with another configuration."""
        self.check_writable_target()
        if not self.config_path.is_file():
            raise CrossModalNetError(f"{self.path}: nothing to resume (no {self.CONFIG}); train without --resume")
        diffs = config_differences(self.read_config(), config)
        if diffs:
            raise CrossModalNetError(f"{self.config_path}: --resume refused, this run holds another configuration "
                                     f"({'; '.join(diffs)}); resume with its settings or train into a new folder")

    # --- configuration and preprocessing ---------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> TrainConfig:
        """The TrainConfig the run was trained with (fields added later read as they were meant then)."""
        if not self.config_path.is_file():
            raise CrossModalNetError(f"{self.path}: not a run folder (no {self.CONFIG}); train one with "
                                     "`crossmodalnet train`")
        return load_run_config(self.config_path)

    def write_config(self, config: TrainConfig) -> Path:
        return self._write_text(self.CONFIG, to_yaml(config))

    def read_preprocess(self) -> Preprocessor:
        return Preprocessor.load(self.path / self.PREPROCESS)

    def has_preprocess(self) -> bool:
        return (self.path / self.PREPROCESS).is_file()

    def write_preprocess(self, preprocessor: Preprocessor) -> Path:
        return preprocessor.save(self.path / self.PREPROCESS)

    @property
    def spec_path(self) -> Path:
        return self.path / self.SPEC

    def has_spec(self) -> bool:
        return self.spec_path.is_file()

    def read_spec(self) -> DataSpec:
        """The dataset description the run was trained on; a run from before `spec.json` was trained
        on the MM-WHS preset (CT + MR, seven structures)."""
        if not self.has_spec():
            return MMWHS
        try:
            text = self.spec_path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CrossModalNetError(f"{self.spec_path}: not a UTF-8 text file") from None
        return DataSpec.from_json(text, str(self.spec_path))

    def write_spec(self, spec: DataSpec) -> Path:
        return self._write_text(self.SPEC, spec.to_json())

    def has_plan(self) -> bool:
        return (self.path / self.PLAN).is_file()

    def write_plan(self, plan: dict[str, Any]) -> Path:
        return self._write_text(self.PLAN, json.dumps(plan, indent=2))

    def write_postprocess(self, record: dict[str, Any]) -> Path:
        """The postprocessing choice (`train.trainer.choose_postprocessing`'s record)."""
        return self._write_text(self.POSTPROCESS, json.dumps(record, indent=2))

    def clear_postprocess(self) -> None:
        """Forget the postprocessing choice (a resumed run makes it again with its own best weights)."""
        (self.path / self.POSTPROCESS).unlink(missing_ok=True)

    def read_postprocess(self) -> dict[str, Any]:
        """The postprocessing choice; a run without one (trained before it existed, or adapted) has none:
        {"largest_component": False}."""
        path = self.path / self.POSTPROCESS
        if not path.is_file():
            return {"largest_component": False}
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CrossModalNetError(f"{path}: not a JSON file ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("largest_component"), bool):
            raise CrossModalNetError(f"{path}: expected an object with a true/false \"largest_component\"")
        return record

    def copy_definition_from(self, source: RunFolder) -> None:
        """Copy what `predict` needs besides weights (config, preprocessing, dataset description)."""
        for name in (self.CONFIG, self.PREPROCESS, self.SPEC):
            if (source.path / name).is_file() and not (self.path / name).is_file():
                with atomic_path(self.path / name) as tmp:
                    shutil.copyfile(source.path / name, tmp)

    # --- adaptation ------------------------------------------------------------------------------
    def read_adapt(self) -> tuple[dict[str, str], AdaptConfig]:
        """The inputs (source run and data folders) and AdaptConfig of an adapted run."""
        path = self.path / self.ADAPT_CONFIG
        if not path.is_file():
            raise CrossModalNetError(f"{self.path}: nothing to resume (no {self.ADAPT_CONFIG}); adapt without --resume")
        saved = read_yaml(path)
        if not isinstance(saved, dict):
            raise CrossModalNetError(f"{path}: expected a mapping")
        inputs = {k: v for k, v in saved.items() if k != "adapt"}
        return inputs, from_dict(AdaptConfig, saved.get("adapt", {}), str(path))

    def write_adapt(self, inputs: dict[str, str], config: AdaptConfig) -> Path:
        return self._write_text(self.ADAPT_CONFIG,
                                yaml.safe_dump({**inputs, "adapt": to_dict(config)}, sort_keys=False))

    def write_summary(self, name: str, summary: dict[str, Any]) -> Path:
        return self._write_text(name, json.dumps(summary, indent=2))

    # --- weights ---------------------------------------------------------------------------------
    @property
    def weights_path(self) -> Path:
        return self.path / self.WEIGHTS

    def has_weights(self) -> bool:
        return self.weights_path.is_file()

    def save_weights(self, model: nn.Module, model_config: ModelConfig | None = None, name: str = WEIGHTS,
                     **metadata: Any) -> Path:
        """RUN/name (default model.safetensors) from `model`'s state dict, atomically."""
        return save_weights(model, self.path / name, model_config, **metadata)

    def load_model(self, device: torch.device | str = "cpu",
                   checkpoint: Literal["best", "last"] = "best") -> tuple[nn.Module, TrainConfig]:
        """The trained model (eval mode, on `device`) and the config it was trained with.

        checkpoint: "best" (model.safetensors, the best validation Dice) or "last" (the weights of the
        newest resume checkpoint, RUN/last/: at the end of a finished run, the final step's)."""
        config = self.read_config()
        if checkpoint == "last":
            # Read-only (predict writes nothing into the run): `find_checkpoint`'s choice without its repairs.
            found = next((d for d in (self.path / self.LAST, self.path / f"{self.LAST}.old")
                          if (d / _MANIFEST).is_file()), None)
            if found is None:
                raise CrossModalNetError(f"{self.path / self.LAST}: no complete checkpoint (training has not "
                                         "finished an epoch)")
            path = found / _WEIGHTS
        elif checkpoint == "best":
            path = self.weights_path
            if not self.has_weights():
                raise CrossModalNetError(f"{path}: no trained weights yet (training has not validated once)")
        else:
            raise CrossModalNetError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
        model = load_weights(build_model(config.model.name, config.model), path)
        return model.to(device).eval(), config

    # --- resume checkpoint -----------------------------------------------------------------------
    def save_checkpoint(self, model: nn.Module, state: dict[str, Any], model_config: ModelConfig | None = None) -> Path:
        """Replace RUN/last/ with a new complete checkpoint (see the module docstring)."""
        tmp, last, old = self.path / f"{self.LAST}.tmp", self.path / self.LAST, self.path / f"{self.LAST}.old"
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
        _fsync_dir(self.path)
        if old.exists():
            shutil.rmtree(old)
        return last

    def find_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder, repairing an interrupted swap; None if there is none."""
        last, old, tmp = self.path / self.LAST, self.path / f"{self.LAST}.old", self.path / f"{self.LAST}.tmp"
        if not (last / _MANIFEST).is_file() and (old / _MANIFEST).is_file():
            if last.exists():
                shutil.rmtree(last)
            os.replace(old, last)  # killed between the two renames: the old checkpoint is the last complete
        if tmp.exists():
            shutil.rmtree(tmp)  # a half-written (or never swapped) checkpoint
        if old.exists() and (last / _MANIFEST).is_file():
            shutil.rmtree(old)
        return last if (last / _MANIFEST).is_file() else None

    def checkpoint_step(self) -> int | None:
        """The step of the newest complete checkpoint (from its manifest), or None."""
        path = self.find_checkpoint()
        return None if path is None else int(json.loads((path / _MANIFEST).read_text())["step"])

    def read_summary(self, name: str) -> dict[str, Any]:
        """A JSON summary written by `write_summary` (e.g. ADAPT_SUMMARY)."""
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def load_checkpoint(self, model: nn.Module | None = None) -> dict[str, Any] | None:
        """The training state of the newest complete checkpoint (None if there is none); loads its
        weights into `model` if given."""
        path = self.find_checkpoint()
        if path is None:
            return None
        if model is not None:
            load_weights(model, path / _WEIGHTS)
        try:
            return torch.load(path / _STATE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CrossModalNetError(f"{path / _STATE}: cannot load the resume state ({type(exc).__name__})") from None

    # --- logs ------------------------------------------------------------------------------------
    def write_csv(self, name: str, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
        return write_csv(self.path / name, columns, rows)

    def save_figure(self, name: str, figure: Any, dpi: int = 80) -> Path:
        """Save a matplotlib Figure as RUN/name (PNG), atomically."""
        with atomic_path(self.path / name) as tmp:
            figure.savefig(tmp, dpi=dpi, format="png")
        return self.path / name

    def _write_text(self, name: str, text: str) -> Path:
        with atomic_path(self.path / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return self.path / name


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
    if isinstance(model, CrossModalNet):  # weights saved before one stream per channel load too
        state = upgrade_state_dict("crossmodalnet", state)
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


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
