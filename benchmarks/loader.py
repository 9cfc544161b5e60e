"""Patch pipeline throughput against the model's training step: does the model wait for data?

Side by side in one run, on the demo's data and recipe (phantoms, patch, batch, augmentation):
- patches per second that the sampler delivers through the engine's loader with 0, 1 and 2
  background worker processes (no model: the pipeline alone);
- the model's own training steps per second on a fixed batch (no data: the engine's step alone);
- a short training loop (engine + loader) with 0, 1 and 2 workers: steps per second.

    .venv/bin/python benchmarks/loader.py --work runs/loader --write docs/benchmarks.md

`--write` replaces the `loader` section of the markdown file (between marker comments).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from _dataset import make_dataset
from _files import write_section

from crossmodalnet.config import replace
from crossmodalnet.demo import DEMO
from crossmodalnet.models.registry import build_model
from crossmodalnet.train.distributed import DistInfo
from crossmodalnet.train.engine import Engine, LoopSettings, batch_iterator
from crossmodalnet.train.trainer import prepare_training


def pipeline_rate(source, steps: int, workers: int, batch: int) -> float:
    """Patches per second through the loader (the first batch, which starts the workers, not counted)."""
    it = batch_iterator(source, 0, steps + 1, workers)
    next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - start)


def model_rate(task, steps: int) -> float:
    """Training steps per second of the engine's step on one fixed batch (after one warm-up step)."""
    engine = Engine(task, LoopSettings(total_steps=steps + 1, iterations_per_epoch=steps + 1, desc=""),
                    dist=DistInfo())
    fixed = task.batches.batch(0)
    engine.train_step(fixed)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.train_step(fixed)
        times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times)


def loop_rate(training, steps: int, workers: int) -> float:
    """Steps per second of the engine's loop (loader + step), warm-up step excluded."""
    task = training.task
    engine = Engine(task, LoopSettings(total_steps=steps + 1, iterations_per_epoch=steps + 1, desc=""),
                    dist=DistInfo())
    it = batch_iterator(task.batches, 0, steps + 1, workers)
    engine.train_step(next(it))
    start = time.perf_counter()
    for _ in range(steps):
        engine.train_step(next(it))
    return steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/loader"), help="work folder (dataset, scratch run)")
    p.add_argument("--steps", type=int, default=30, help="batches / steps timed per measurement (default 30)")
    p.add_argument("--write", type=Path, default=None, help="markdown file to update (docs/benchmarks.md)")
    a = p.parse_args()
    data = a.work / "data"
    make_dataset(data, DEMO.cases, DEMO.size, seed=0)
    config = replace(DEMO.train_config(0), device="cpu", num_workers=0)
    scratch = a.work / "run"
    if scratch.exists():
        import shutil

        shutil.rmtree(scratch)
    training = prepare_training(data, scratch, config)
    torch.manual_seed(0)
    training.task.model = build_model(config.model.name, config.model)
    rows = []
    for workers in (0, 1, 2):
        rows.append(("pipeline alone, patches/s", workers, pipeline_rate(training.task.batches, a.steps, workers,
                                                                         config.batch_size)))
    model = model_rate(training.task, a.steps)
    for workers in (0, 1, 2):
        rows.append(("training loop, steps/s", workers, loop_rate(training, a.steps, workers)))
    lines = ["| measurement | workers | rate |", "|---|---:|---:|"]
    lines += [f"| {what} | {w} | {r:.2f} |" for what, w, r in rows]
    lines.append(f"| model step alone (fixed batch), steps/s | - | {model:.2f} |")
    need = model * config.batch_size
    text = (f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads. Data: the demo's {DEMO.cases} phantoms of {DEMO.size}³; recipe: the "
            f"demo's ({config.model.name} {config.model.size}, patch {config.patch_size[0]}³, batch "
            f"{config.batch_size}, augmentation on). {a.steps} batches per measurement. Command: "
            f"`.venv/bin/python benchmarks/loader.py --work {a.work} --steps {a.steps}`.\n\n" + "\n".join(lines)
            + f"\n\nThe model consumes {need:.1f} patches/s; the pipeline alone delivers "
            f"{rows[0][2]:.1f} patches/s in the loop's own thread.")
    print(text)
    if a.write:
        write_section(a.write, "loader", "## Data pipeline: patches/s against the model's steps/s\n\n" + text)


if __name__ == "__main__":
    main()
