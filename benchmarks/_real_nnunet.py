"""nnU-Net v2 rows of `benchmarks/real.py`, run through nnU-Net's own command line in its own venv.

Layout under DIR/nnunet (the environment variables nnU-Net reads point there):
`raw/DatasetNNN_<channels>/` (imagesTr/{case}_{XXXX}.nii.gz symlinks to the original images,
labelsTr/{case}.nii.gz index label maps 0..K-1 written here: nnU-Net v2 needs consecutive labels,
dataset.json with the channel names, which also pick nnU-Net's normalisation), `preprocessed/`
(with `splits_final.json` = real.py's folds), `results/`. One nnU-Net dataset per channel subset;
`ids.json` keeps the subset -> dataset id mapping.

Two rows:
- `nnunet-default`: `nnUNetv2_extract_fingerprint`, `nnUNetv2_plan_experiment`, `nnUNetv2_preprocess
  -c CONF` (the three steps of `nnUNetv2_plan_and_preprocess -d ID -c CONF`), plans `nnUNetPlans`;
- `nnunet-cpu`: `nnUNetv2_plan_experiment -overwrite_target_spacing` (in plane: the spacing the
  crossmodalnet plan of DATA uses; slice axis: nnU-Net's own 3d_fullres spacing)
  `-gpu_memory_target G` (default 0.5 GB: on MyoPS a 2d patch of 256x320 at batch 2, about the
  voxels per step of our CPU plan; 2 GB gave 320x320 at batch 6, about 40 s per iteration on one
  loaded core) `-overwrite_plans_name nnUNetPlans_cpu`,
  then `nnUNetv2_preprocess -plans_name nnUNetPlans_cpu -c CONF`.
Both train `nnUNetv2_train ID CONF FOLD -tr nnUNetTrainer_WallBudget -p PLANS -device cpu` (the
trainer module `_real_nnunet_trainer.py`, copied into the venv's nnunetv2 package, stops at the
budget) and predict the fold's cases with `nnUNetv2_predict ... -f FOLD -chk checkpoint_best.pth
-device cpu` (`score`, as our rows: chosen on these cases), then with `checkpoint_final.pth`
(`score_last`), with nnU-Net's default test-time mirroring. Data augmentation runs in
`nnUNet_n_proc_DA` = 1 background process (unless set in the environment): two cores, one of them
for the network. The index predictions are mapped back to the dataset's label values on the
reference label's grid and scored with our evaluator, exactly as our rows.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _files import read_json, write_json
from _real_folds import Subset, subset_spec

from crossmodalnet.data.dataset import Case
from crossmodalnet.data.io import read_geometry, read_label, read_label_values, write_label
from crossmodalnet.data.spec import DataSpec
from crossmodalnet.errors import CrossModalNetError

__all__ = ["NNUNET_ROWS", "TRAINER", "NnunetSetup", "dataset_json", "write_raw", "write_splits", "indices_to_values",
           "cpu_spacing", "run_nnunet_job", "nnunet_score"]

NNUNET_ROWS: dict[str, str] = {"nnunet-default": "nnUNetPlans", "nnunet-cpu": "nnUNetPlans_cpu"}
TRAINER = "nnUNetTrainer_WallBudget"
TRAINER_SOURCE = Path(__file__).with_name("_real_nnunet_trainer.py")
DA_WORKERS = "1"


@dataclass(frozen=True)
class NnunetSetup:
    """Where nnU-Net lives and how it is run."""

    venv: Path
    root: Path  # DIR/nnunet
    configuration: str = "2d"
    gpu_memory_gb: float = 0.5  # -gpu_memory_target of the nnunet-cpu plan
    processes: int = 1  # preprocessing and prediction worker processes

    def env(self) -> dict[str, str]:
        env = {**os.environ, "nnUNet_raw": str(self.root / "raw"),
               "nnUNet_preprocessed": str(self.root / "preprocessed"), "nnUNet_results": str(self.root / "results"),
               "PATH": f"{self.venv / 'bin'}:{os.environ.get('PATH', '')}", "nnUNet_compile": "false"}
        env.setdefault("nnUNet_n_proc_DA", DA_WORKERS)
        return env

    def check(self) -> None:
        if not (self.venv / "bin" / "nnUNetv2_train").is_file():
            raise CrossModalNetError(f"--nnunet-venv {self.venv}: no bin/nnUNetv2_train (an environment with nnunetv2; "
                                     "see docs/benchmarks.md, nnU-Net v2 on this machine)")


def dataset_id(root: Path, subset: Subset) -> int:
    """The nnU-Net dataset id of a channel subset, stable across runs (DIR/nnunet/ids.json)."""
    ids: dict[str, int] = read_json(root / "ids.json") or {}
    if subset.name not in ids:
        ids[subset.name] = max(ids.values(), default=0) + 1
        write_json(root / "ids.json", ids)
    return ids[subset.name]


def dataset_name(number: int, subset: Subset) -> str:
    return f"Dataset{number:03d}_{''.join(ch for ch in subset.name if ch.isalnum()) or 'data'}"


def dataset_json(spec: DataSpec, num_training: int) -> dict[str, Any]:
    """nnU-Net v2's dataset.json: the channel names, the labels as consecutive indices."""
    return {"channel_names": {str(i): c for i, c in enumerate(spec.channels)},
            "labels": {"background": 0, **{name: i + 1 for i, name in enumerate(spec.names)}},
            "numTraining": num_training, "file_ending": ".nii.gz"}


def write_raw(raw: Path, pool: Sequence[Case], spec: DataSpec, subset: Subset) -> Path:
    """nnU-Net's raw folder for the subset: image symlinks, index label maps, dataset.json."""
    sub = subset_spec(spec, subset)
    for case in pool:
        for k, i in enumerate(subset.indices):
            ref = case.images[i]
            if ref is None or ref.volume is not None:
                raise CrossModalNetError(f"case {case.id}: nnU-Net rows need every channel as a 3D file")
            link = raw / "imagesTr" / f"{case.id}_{k:04d}.nii.gz"
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            os.symlink(ref.path.resolve(), link)
        label = raw / "labelsTr" / f"{case.id}.nii.gz"
        if not label.is_file():
            assert case.label is not None
            indices, geometry, _ = read_label(case.label, spec)
            label.parent.mkdir(parents=True, exist_ok=True)
            write_label(label, indices, geometry)
    write_json(raw / "dataset.json", dataset_json(sub, len(pool)))
    return raw


def write_splits(preprocessed: Path, all_folds: Sequence[Sequence[str]]) -> Path:
    """`splits_final.json`: nnU-Net's fold k trains on the other folds and validates on fold k."""
    splits = [{"train": sorted(c for j, f in enumerate(all_folds) if j != k for c in f), "val": sorted(fold)}
              for k, fold in enumerate(all_folds)]
    return write_json(preprocessed / "splits_final.json", splits)


def indices_to_values(pred: Path, reference: Path, spec: DataSpec, out: Path) -> Path:
    """nnU-Net's index prediction -> the dataset's label values, written on the reference's grid."""
    indices, _ = read_label_values(pred)
    geometry = read_geometry(reference)
    if tuple(indices.shape) != tuple(geometry.shape):
        raise CrossModalNetError(f"{pred}: shape {indices.shape} is not the reference's {geometry.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= spec.num_classes):
        raise CrossModalNetError(f"{pred}: values outside the class indices 0-{spec.num_classes - 1}")
    return write_label(out, spec.to_values(indices.astype(np.uint8)), geometry)


def cpu_spacing(nnunet_fullres: Sequence[float], ours: Sequence[float | None]) -> list[float]:
    """nnU-Net's 3d_fullres target spacing (its axis order) with every axis but its coarsest (the
    slice axis) set to the in-plane spacing of our plan (its two finest axes; a 2D plan's slice axis,
    None, is not one of them)."""
    slice_axis = int(np.argmax(nnunet_fullres))
    in_plane = iter(sorted(s for s in ours if s is not None)[:2])
    return [float(s) if i == slice_axis else round(float(next(in_plane)), 4) for i, s in enumerate(nnunet_fullres)]


def _run(cmd: list[str], env: dict[str, str], log: Path, timeout: float | None = None) -> float:
    """Run an nnU-Net command, its output appended to `log`; seconds; one line on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            code = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                                  check=False).returncode
        except subprocess.TimeoutExpired:
            code = -1
    if code != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        raise CrossModalNetError(f"{cmd[0]} failed ({code}): {tail[0][:200] if tail else ''} (log {log})")
    return time.monotonic() - start


class NnunetDataset:
    """One nnU-Net dataset (a channel subset): conversion, plans, preprocessing, each done once."""

    def __init__(self, setup: NnunetSetup, subset: Subset) -> None:
        self.setup, self.subset = setup, subset
        self.id = dataset_id(setup.root, subset)
        self.name = dataset_name(self.id, subset)
        self.raw = setup.root / "raw" / self.name
        self.preprocessed = setup.root / "preprocessed" / self.name
        self.log = setup.root / "logs" / f"{self.name}.log"

    def prepare(self, pool: Sequence[Case], spec: DataSpec, all_folds: Sequence[Sequence[str]], plans: str,
                our_spacing: Sequence[float]) -> dict[str, Any]:
        """Raw folder, fingerprint, default plans, and `plans` made and preprocessed (each once);
        splits_final.json written; returns seconds of the steps run now."""
        env, s, took = self.setup.env(), self.setup, {}
        if not (self.raw / "dataset.json").is_file():
            t = time.monotonic()
            write_raw(self.raw, pool, spec, self.subset)
            took["convert_s"] = time.monotonic() - t
        if not (self.preprocessed / "dataset_fingerprint.json").is_file():
            took["fingerprint_s"] = _run(["nnUNetv2_extract_fingerprint", "-d", str(self.id), "-np", str(s.processes)],
                                         env, self.log)
        if not (self.preprocessed / "nnUNetPlans.json").is_file():
            took["plan_s"] = _run(["nnUNetv2_plan_experiment", "-d", str(self.id)], env, self.log)
        marker = self.preprocessed / f".{plans}_{s.configuration}.done"
        if plans != "nnUNetPlans":
            default = json.loads((self.preprocessed / "nnUNetPlans.json").read_text())
            fullres = default["configurations"]["3d_fullres"]["spacing"]  # transposed axis order
            backward = default["transpose_backward"]
            spacing = cpu_spacing([fullres[i] for i in backward], our_spacing)
            cmd = ["nnUNetv2_plan_experiment", "-d", str(self.id), "-overwrite_target_spacing", *map(str, spacing),
                   "-gpu_memory_target", str(s.gpu_memory_gb), "-overwrite_plans_name", plans]
            made_by = self.preprocessed / f".{plans}.command.json"
            # Plans made by another command (another --nnunet-gpu-memory) are made again, and preprocessed again.
            if not (self.preprocessed / f"{plans}.json").is_file() or read_json(made_by) != cmd:
                marker.unlink(missing_ok=True)
                took["plan_cpu_s"] = _run(cmd, env, self.log)
                write_json(made_by, cmd)
        if not marker.is_file():
            took["preprocess_s"] = _run(["nnUNetv2_preprocess", "-d", str(self.id), "-plans_name", plans,
                                         "-c", s.configuration, "-np", str(s.processes)], env, self.log)
            marker.write_text("done\n")
        write_splits(self.preprocessed, all_folds)
        return took

    def plan(self, plans: str) -> dict[str, Any]:
        """What nnU-Net planned for the configuration: patch, batch, spacing, network depth."""
        meta = json.loads((self.preprocessed / f"{plans}.json").read_text())
        conf = meta["configurations"][self.setup.configuration]
        stages = conf.get("architecture", {}).get("arch_kwargs", {}).get("n_stages")
        return {"plans": plans, "configuration": self.setup.configuration, "patch_size": conf["patch_size"],
                "batch_size": conf["batch_size"], "spacing": conf["spacing"], "n_stages": stages,
                "normalization": conf.get("normalization_schemes"), "configurations": sorted(meta["configurations"])}


def install_trainer(venv: Path) -> Path:
    """Copy the trainer module into the venv's nnunetv2 package (where `-tr` finds it by class name)."""
    found = sorted(venv.glob("lib/python3*/site-packages/nnunetv2/training/nnUNetTrainer"))
    if not found:
        raise CrossModalNetError(f"--nnunet-venv {venv}: no nnunetv2 package under lib/python3*/site-packages")
    target = found[0] / f"{TRAINER}.py"
    if not target.is_file() or not filecmp.cmp(TRAINER_SOURCE, target, shallow=False):
        shutil.copyfile(TRAINER_SOURCE, target)
    return target


def run_nnunet_job(job: dict[str, Any], setup: NnunetSetup, dataset: NnunetDataset, pool: Sequence[Case],
                   spec: DataSpec) -> dict[str, Any]:
    """Train one fold with the wall budget, predict the fold's cases with the best and the final
    checkpoint, map the predictions to the dataset's values, score them with our evaluator."""
    plans, fold, conf = NNUNET_ROWS[job["row"]], job["fold"], setup.configuration
    job_dir = Path(job["job_dir"])
    env = {**setup.env(), "NNUNET_WALL_MINUTES": str(job["minutes"])}
    log = job_dir / "nnunet.log"
    install_trainer(setup.venv)
    out: dict[str, Any] = {"prepare_s": dataset.prepare(pool, spec, job["all_folds"], plans, job["our_spacing"]),
                           "nnunet_plan": dataset.plan(plans), "nnunet_dataset": dataset.name,
                           "nnUNet_n_proc_DA": env["nnUNet_n_proc_DA"], "test_time_mirroring": True}
    fold_dir = setup.root / "results" / dataset.name / f"{TRAINER}__{plans}__{conf}" / f"fold_{fold}"
    if fold_dir.exists():  # an unfinished run restarts whole: equal budget
        shutil.rmtree(fold_dir)
    out["train_wall_s"] = _run(["nnUNetv2_train", str(dataset.id), conf, str(fold), "-tr", TRAINER, "-p", plans,
                                "-device", "cpu"], env, log, timeout=60 * job["minutes"] + 1800)
    out["training"] = json.loads((fold_dir / "wall_budget.json").read_text())
    inputs = job_dir / "inputs"
    for case_id in job["all_folds"][fold]:
        for k in range(len(dataset.subset.indices)):
            name = f"{case_id}_{k:04d}.nii.gz"
            inputs.mkdir(parents=True, exist_ok=True)
            os.symlink((dataset.raw / "imagesTr" / name).resolve(), inputs / name)
    out["score"], out["predict_wall_s"] = nnunet_score(job, setup, dataset, pool, spec, "best")
    out["score_last"], _ = nnunet_score(job, setup, dataset, pool, spec, "last")
    return out


# Per checkpoint: nnU-Net's file, and the raw predictions, label maps and evaluation folders of the job.
_CHECKPOINTS = {"best": ("checkpoint_best.pth", "nnunet_predictions", "predictions", "evaluation"),
                "last": ("checkpoint_final.pth", "nnunet_predictions_last", "predictions_last", "evaluation_last")}


def nnunet_score(job: dict[str, Any], setup: NnunetSetup, dataset: NnunetDataset, pool: Sequence[Case],
                 spec: DataSpec, checkpoint: str) -> tuple[dict[str, Any], float]:
    """Predict the fold's cases (`job_dir/inputs`, written by the job) with nnU-Net's `checkpoint`
    ("best": checkpoint_best.pth, chosen on these cases; "last": checkpoint_final.pth), map them to
    the dataset's values and score them with our evaluator; the score and the seconds of prediction."""
    from _real_ours import score_fold

    chk, raw_name, pred_name, eval_name = _CHECKPOINTS[checkpoint]
    plans, fold, conf = NNUNET_ROWS[job["row"]], job["fold"], setup.configuration
    job_dir, data_dir = Path(job["job_dir"]), Path(job["data_dir"])
    raw_pred, pred = job_dir / raw_name, job_dir / pred_name
    seconds = _run(["nnUNetv2_predict", "-i", str(job_dir / "inputs"), "-o", str(raw_pred), "-d", str(dataset.id),
                    "-c", conf, "-tr", TRAINER, "-p", plans, "-f", str(fold), "-chk", chk, "-device", "cpu",
                    "-npp", str(setup.processes), "-nps", str(setup.processes), "--disable_progress_bar"],
                   setup.env(), job_dir / "nnunet.log")
    by_id = {c.id: c for c in pool}
    for case_id in job["all_folds"][fold]:
        label = by_id[case_id].label
        assert label is not None
        indices_to_values(raw_pred / f"{case_id}.nii.gz", label, spec, pred / f"{case_id}.nii.gz")
    return score_fold(pred, data_dir, job_dir / eval_name), seconds
