"""The "train" job of `benchmarks/compare.py` (run by `_harness.py` in its own process) and its measurements.

Train with the project's trainer (equal time budget or equal steps), predict the test split with
`infer.predict`, score it with `evaluate.evaluate_paths`, then count parameters and forward FLOPs
and time whole-volume predictions. For a time budget the schedule is sized from `_probe`, a few
training steps timed through the package's one engine.
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _probe import engine_step_times
from _schedule import budget_schedule, sliding_windows
from _scoring import load_test_split, score_record
from safetensors import safe_open

from crossmodalnet.config import TrainConfig, from_dict
from crossmodalnet.data.dataset import load_dataset, read_spec
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.runs import RunFolder

__all__ = ["train_job"]


def _probe(config: TrainConfig, steps: int = 3) -> tuple[float, float]:
    """Seconds of a training step (the engine's own step: forward, loss, backward, clipping, AdamW) on
    random patches, and of one sliding-window batch of inference (`sw_batch_size` windows, no
    gradient): the fastest of `steps`.

    Used only to size the schedule of a time-budget run; the probe's own time is not in the budget.
    The fastest, not the median: another process on the CPU during the probe would otherwise make
    the schedule too short, and training would end before the budget. Too fast an estimate only
    leaves the cosine unfinished.
    """
    train_times, model = engine_step_times(config, MMWHS, steps)
    infer_times = []
    model.eval()
    x = torch.randn(config.sw_batch_size, config.model.modalities, *config.patch_size)  # every channel present
    with torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            model(x)
            infer_times.append(time.perf_counter() - t)
    return min(train_times[1:]), min(infer_times[1:])


def _training_record(run_dir: Path) -> dict[str, Any]:
    """Steps done, training time and the checkpoint validation chose, from the run folder."""
    run = RunFolder(run_dir)
    with open(run / RunFolder.METRICS, newline="") as fh:
        history = list(csv.DictReader(fh))
    last = history[-1]
    steps, time_s = int(last["step"]), float(last["time_s"])
    with safe_open(str(run.weights_path), "pt") as fh:
        meta = fh.metadata() or {}
    return {"steps_done": steps, "train_time_s": time_s, "s_per_step": time_s / max(steps, 1),
            "validations": sum(1 for r in history if r.get("val_dice_mean") not in ("", None)),
            "best_step": int(meta.get("step", -1)),
            "best_val_dice": float(meta.get("val_score", meta.get("val_dice", "nan")))}  # val_dice: older runs


def _flops(model: torch.nn.Module, edge: int, patch: int) -> tuple[float, int]:
    """Forward GFLOPs at the dataset edge; at the patch edge for fixed-size models (UNETR) that refuse it."""
    from crossmodalnet.models.registry import forward_flops

    try:
        return forward_flops(model, edge) / 1e9, edge
    except ValueError:
        return forward_flops(model, patch) / 1e9, patch


def _latency(run: Any, cases: Sequence[dict[str, Any]], runs: int) -> dict[str, Any]:
    """Seconds per whole-volume prediction (preprocess, sliding window, restore), median of `runs`."""
    from crossmodalnet.infer import predict_case

    cfg = run.config
    times = []
    for i in range(runs + 1):  # the first prediction warms the oneDNN primitive cache up
        d = cases[i % len(cases)]
        t = time.perf_counter()
        predict_case(run.model, d["images"], run.preprocessor, d["geometry"], cfg.patch_size,
                     cfg.sw_overlap, cfg.sw_batch_size, run.device, activation=run.spec.activation)
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times[1:]), "min_s": min(times[1:]), "runs": runs}


def train_job(job: dict[str, Any], work: Path) -> dict[str, Any]:
    """Train, predict and score the test split, measure size and latency; returns the job's result fields."""
    from crossmodalnet.evaluate import evaluate_paths
    from crossmodalnet.infer import load_run, predict
    from crossmodalnet.models.registry import count_parameters
    from crossmodalnet.train.trainer import train

    key, data = job["key"], work / "data"
    run_dir, pred_dir, eval_dir = (work / part / key for part in ("runs", "predictions", "evaluation"))
    config: TrainConfig = from_dict(TrainConfig, job["config"], f"job {key}")
    out: dict[str, Any] = {}
    if job["budget_s"] is not None:
        out["probe_step_s"], forward_s = _probe(config)
        batches = math.ceil(sliding_windows(job["edge"], config.patch_size[0], config.sw_overlap)
                            / config.sw_batch_size)
        out["validation_s_estimate"] = len(load_dataset(data)["validation"]) * batches * forward_s
        config.epochs, config.iterations_per_epoch = budget_schedule(
            out["probe_step_s"], job["budget_s"], job["validations"], out["validation_s_estimate"])
    out["steps_target"] = config.epochs * config.iterations_per_epoch
    t = time.monotonic()
    train(data, run_dir, config)
    out["train_wall_s"] = time.monotonic() - t
    out.update(_training_record(run_dir))
    # Capped equal-steps runs stop early; their rows say so instead of comparing a partial run.
    out["fits"] = out["steps_done"] >= out["steps_target"] or job["budget_s"] is not None
    # A budget run whose schedule ran out first did not use its whole budget: the table says so.
    out["budget_bound"] = job["budget_s"] is not None and out["steps_done"] < out["steps_target"]

    predict(run_dir, pred_dir, data_dir=data, split="test", labels="indices", device="cpu")
    summary = evaluate_paths(pred_dir, work / "references", eval_dir, spec=read_spec(data), progress=False)
    with open(eval_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out["test"] = score_record(summary, rows)

    run = load_run(run_dir, "cpu")
    out["params"] = count_parameters(run.model)
    out["gflops"], out["flops_edge"] = _flops(run.model, job["edge"], config.patch_size[0])
    out["latency"] = _latency(run, [d for _, d in load_test_split(data)], job["latency_runs"])
    return out
