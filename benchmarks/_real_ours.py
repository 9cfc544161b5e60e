"""One job of `benchmarks/real.py` for a model of this package: train on a fold, predict its cases, score.

    .venv/bin/python benchmarks/_real_ours.py DIR/jobs/<job>/job.json   # -> DIR/jobs/<job>/result.json

Run by real.py in its own process (a crash or its memory is this job's only). The configuration is
the defaults, the model's `small` size, `max_minutes` = the budget, then the job's `--config-set`
overrides; the package plans what is left open (patch, spacing, batch) from the fold's training
cases. The schedule is sized so that the budget, not the epoch count, stops training: a few steps
are timed through the package's own engine at the planned patch (`probe_step_s`), then
`_schedule.budget_schedule` (as compare.py). The trainer keeps the checkpoint of the best
validation Dice on the fold's cases (its `validation` split); these are predicted with it and
scored with the package's evaluator (`score`: optimistic, the checkpoint was chosen on these
cases), and again with the final step's weights (`score_last`: nothing chosen on them). Both follow
the postprocessing training chose on the same cases (`postprocess`: keep the largest foreground
component or not, as nnU-Net); `score_raw` is the best checkpoint without it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from _files import write_json
from _probe import engine_step_times
from _schedule import budget_schedule
from _train_job import _training_record

from crossmodalnet.config import ModelConfig, TrainConfig, from_dict, replace, to_dict
from crossmodalnet.data.dataset import check_case, load_dataset, read_spec
from crossmodalnet.data.spec import DataSpec
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.runs import RunFolder

__all__ = ["apply_overrides", "base_config", "score_fold", "score_checkpoint", "run_ours", "postprocess_finished"]

VALIDATIONS = 10  # whole-volume validations on the fold's cases per run (checkpoint selection)


def apply_overrides(config: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """`{"model.deformable": "false", "lr": "1e-3"}` (values as YAML) set on `config`, validated by
    the schema; one line naming the key for an unknown key or a bad value."""
    data = to_dict(config)
    for key, text in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise CrossModalNetError(f"--config-set {key}: {part!r} is not a section of the training config")
            node = node[part]
        if leaf not in node:
            raise CrossModalNetError(f"--config-set {key}: {leaf!r} is not a key of the training config")
        node[leaf] = yaml.safe_load(text)
    return from_dict(TrainConfig, data, "--config-set")


def base_config(row: str, minutes: float, seed: int, overrides: dict[str, str]) -> TrainConfig:
    """The defaults, `row`'s small size, the budget and seed, then the overrides."""
    config = TrainConfig(model=ModelConfig.from_size(row, "small"), max_minutes=minutes, seed=seed)
    return apply_overrides(config, overrides)


def _probe(config: TrainConfig, spec: DataSpec, steps: int = 3) -> float:
    """Seconds of one training step of the engine at the planned patch and batch, the fastest of
    `steps` after one warm-up (the fastest: another process on the CPU would shorten the schedule)."""
    times, _ = engine_step_times(config, spec, steps)
    return min(times[1:])


def _validation_windows(data_dir: Path, config: TrainConfig) -> int:
    """Sliding windows of one pass over the validation cases at the planned spacing and patch."""
    total = 0
    for case in load_dataset(data_dir)["validation"]:
        geometry = check_case(case)
        count = 1
        for n, s, t, roi in zip(geometry.shape, geometry.spacing, config.target_spacing, config.patch_size,
                                strict=True):
            edge = n if t is None else max(1, round(n * s / t))  # None: slices as stored (2D plans)
            interval = max(int(roi * (1 - config.sw_overlap)), 1)
            count *= 1 if roi >= edge else math.ceil((edge - roi) / interval) + 1
        total += count
    return total


def sized_config(data_dir: Path, config: TrainConfig, budget_s: float) -> tuple[TrainConfig, dict[str, Any]]:
    """`config` with epochs and iterations per epoch sized to the budget from a timed probe at the
    plan the trainer will make; and what was measured. The plan itself is left to the trainer."""
    from crossmodalnet.train import preflight

    spec = read_spec(data_dir)
    # As the trainer: the model's data-decided fields from the dataset (registered channels).
    config = replace(config, model=replace(config.model.for_data(spec.registered), modalities=spec.num_channels,
                                           out_channels=spec.num_outputs))
    fp, _ = preflight.plan_dataset(data_dir, config.model, "cpu", config)
    planned, _ = preflight.planned(config, fp, "cpu")
    step_s = _probe(planned, spec)
    # A window's forward pass costs about a third of a training step per sample (no backward).
    validation_s = _validation_windows(data_dir, planned) * step_s / (3 * planned.batch_size)
    epochs, ipe = budget_schedule(step_s, budget_s, VALIDATIONS, validation_s)
    measured = {"probe_step_s": step_s, "validation_s_estimate": validation_s,
                "plan": {"patch_size": list(planned.patch_size), "batch_size": planned.batch_size,
                         "target_spacing": list(planned.target_spacing or ())}}
    # One epoch of warm-up, none when the budget allows so few validations that it would be most of the run.
    return replace(config, epochs=epochs, iterations_per_epoch=ipe, val_every=1,
                   warmup_epochs=1 if epochs >= 4 else 0), measured


def score_fold(pred_dir: Path, data_dir: Path, eval_dir: Path) -> dict[str, Any]:
    """Score predictions of the fold's cases (its `validation` split) with the package's evaluator:
    per structure (the dataset's regions when it declares them, else its foreground classes) the
    mean Dice and HD95 over the fold's cases, their mean, and every case's values."""
    from crossmodalnet.evaluate import evaluate_paths

    spec = read_spec(data_dir)
    with open(eval_dir.with_name(f"{eval_dir.name}.log"), "w") as log, contextlib.redirect_stdout(log):  # its table
        summary = evaluate_paths(pred_dir, data_dir, eval_dir, spec=spec, split="validation", progress=False)
    kind = "region" if spec.regions else "class"
    entries = summary["per_region"] if spec.regions else summary["per_structure"]
    with open(eval_dir / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == kind]

    def number(text: str) -> float | None:
        return None if text in ("", None) or math.isnan(float(text)) else float(text)

    per_case: dict[str, dict[str, dict[str, float | None]]] = {}
    for r in rows:
        per_case.setdefault(r["case"], {})[r["structure"]] = {"dice": number(r["dice"]), "hd95": number(r["hd95"])}
    return {"kind": kind, "structures": list(entries),
            "dice": {k: v["dice"] for k, v in entries.items()}, "hd95": {k: v["hd95"] for k, v in entries.items()},
            "mean_dice": summary["region_mean_dice"] if spec.regions else summary["mean_dice"],
            "mean_hd95": summary["region_mean_hd95"] if spec.regions else summary["mean_hd95"],
            "num_cases": summary["num_cases"], "hd95_convention": summary["hd95_convention"],
            "per_case": per_case}


# Per (checkpoint, postprocessing): the predictions and evaluation folders under the job folder.
_OUTPUTS = {("best", "auto"): ("predictions", "evaluation"), ("last", "auto"): ("predictions_last", "evaluation_last"),
            ("best", "none"): ("predictions_raw", "evaluation_raw")}


def score_checkpoint(job: dict[str, Any], checkpoint: str, postprocess: str = "auto") -> tuple[dict[str, Any], float]:
    """Predict the fold's cases with the job's run at `checkpoint` ("best" or "last") and `postprocess`
    ("auto": what training chose on the validation cases; "none") and score them; the score and the
    seconds of prediction."""
    from crossmodalnet.infer import predict

    data_dir, job_dir = Path(job["data_dir"]), Path(job["job_dir"])
    pred_dir, eval_dir = (job_dir / name for name in _OUTPUTS[checkpoint, postprocess])
    t = time.monotonic()
    predict(job_dir / "run", pred_dir, data_dir=data_dir, split="validation", labels="values", device="cpu",
            checkpoint=checkpoint, postprocess=postprocess)
    seconds = time.monotonic() - t
    return score_fold(pred_dir, data_dir, eval_dir), seconds


def run_ours(job: dict[str, Any]) -> dict[str, Any]:
    """Train (time budget), predict the fold's cases with the best and the last checkpoint, score them."""
    from crossmodalnet.train.trainer import train

    data_dir, job_dir = Path(job["data_dir"]), Path(job["job_dir"])
    run_dir = job_dir / "run"
    config = base_config(job["row"], job["minutes"], job["seed"], job["config_set"])
    out: dict[str, Any] = {}
    if not {"epochs", "iterations_per_epoch"} & set(job["config_set"]):
        config, out["sizing"] = sized_config(data_dir, config, 60 * job["minutes"])
    out["steps_target"] = config.epochs * config.iterations_per_epoch
    t = time.monotonic()
    train(data_dir, run_dir, config)
    out["train_wall_s"] = time.monotonic() - t
    out.update(_training_record(run_dir))
    plan_path = RunFolder(run_dir).path / RunFolder.PLAN
    out["plan"] = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    out["score"], out["predict_wall_s"] = score_checkpoint(job, "best")
    out["score_last"], _ = score_checkpoint(job, "last")
    # The postprocessing training chose on the fold's cases (optimistic as the checkpoint), and the
    # score without it: what the choice bought.
    out["postprocess"] = RunFolder(run_dir).read_postprocess()
    out["score_raw"] = score_checkpoint(job, "best", "none")[0] if out["postprocess"]["largest_component"] \
        else out["score"]
    if out["plan"]:
        p = out["plan"]
        out["note"] = (f"plan: patch {'x'.join(map(str, p['patch_size']))}, batch {p['batch_size']}, spacing "
                       f"{'x'.join('stored' if s is None else f'{s:.3g}' for s in p['target_spacing'])} mm")
    return out


def postprocess_finished(result: dict[str, Any]) -> dict[str, Any]:
    """A job finished before training chose the postprocessing: choose it now as training would (the
    best weights on the fold's validation cases, `choose_postprocessing`), record it in the run, and
    score the fold again with it (best and last checkpoints); the old `score` becomes `score_raw`."""
    import torch

    from crossmodalnet.data.dataset import load_case
    from crossmodalnet.train.trainer import choose_postprocessing

    data_dir, run = Path(result["data_dir"]), RunFolder(Path(result["job_dir"]) / "run")
    model, config = run.load_model("cpu")
    spec, preprocessor = run.read_spec(), run.read_preprocess()
    cases = []
    for case in load_dataset(data_dir)["validation"]:
        loaded = load_case(case, spec)
        cases.append(preprocessor.prepare(loaded["images"], loaded["geometry"], loaded["label"], case.id))
    record = choose_postprocessing(model, cases, config, torch.device("cpu"), spec)
    run.write_postprocess(record)
    out = {**result, "postprocess": record, "score_raw": result["score"]}
    if record["largest_component"]:
        # The network's output and its scores stay, where new jobs keep them.
        job_dir = Path(result["job_dir"])
        for old, new in zip(_OUTPUTS["best", "auto"], _OUTPUTS["best", "none"], strict=True):
            if (job_dir / old).is_dir() and not (job_dir / new).exists():
                (job_dir / old).rename(job_dir / new)
        out["score"], _ = score_checkpoint(result, "best")
        if "score_last" in result:
            out["score_last"], _ = score_checkpoint(result, "last")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: _real_ours.py DIR/jobs/<job>/job.json (written by benchmarks/real.py)")
    spec_path = Path(sys.argv[1])
    job_spec = json.loads(spec_path.read_text())
    start = time.monotonic()
    result = {**job_spec, **run_ours(job_spec), "status": "ok"}
    result["job_wall_s"] = time.monotonic() - start
    write_json(spec_path.with_name("result.json"), result)
