"""Inference of a trained run in fp32, bfloat16 and compiled, side by side: latency and Dice.

    .venv/bin/python benchmarks/precision.py runs/benchmark/runs/budget-crossmodalnet runs/benchmark/data \
        --modes fp32 bf16 compile --write docs/benchmarks.md

For each mode, every case of the split is predicted whole (preprocessing, sliding window with
Gaussian blending, restore to the input grid: what `crossmodalnet predict` does), timed per
volume after one warm-up volume (the first call of a compiled model, compilation included, is
reported on its own), and scored against its label with the project's evaluator. "voxels as fp32"
is the share of voxels whose label equals the fp32 prediction's: how much reduced precision
changes the output itself, not only the score.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _files import write_section
from _machine import machine_info

from crossmodalnet.data.dataset import load_case, load_dataset
from crossmodalnet.evaluate import compute_case_metrics
from crossmodalnet.infer import load_run, predict_case

MODES = ("fp32", "bf16", "compile", "compile-bf16")


def run_mode(run_dir: Path, cases: list, mode: str) -> dict:
    """Predict every case in `mode`; returns latencies, per-case mean Dice and label maps."""
    run = load_run(run_dir, "cpu")
    model = run.model
    if mode.startswith("compile"):
        model = torch.compile(model)  # inductor: C++ kernels for the CPU, built at the first call
    precision = "bf16" if mode.endswith("bf16") else "fp32"
    cfg = run.config
    times, dice, labels = [], {}, {}
    first_s = None

    def timed(data: dict) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        probs = predict_case(model, data["images"], run.preprocessor, data["geometry"], cfg.patch_size,
                             cfg.sw_overlap, cfg.sw_batch_size, run.device, precision, activation=run.spec.activation)
        return probs, time.perf_counter() - t

    for i, case in enumerate(cases):
        data = load_case(case, run.spec)
        probs, took = timed(data)
        if i == 0:
            first_s = took
            _, took = timed(data)  # the same volume again, warm: every case is timed warm
        times.append(took)
        pred = run.spec.decide(probs)
        labels[case.id] = pred
        rows = compute_case_metrics(pred, data["label"], data["geometry"].spacing, run.spec)
        dice[case.id] = float(np.nanmean([r["dice"] for r in rows]))
    return {"mode": mode, "median_s": statistics.median(times), "first_s": first_s, "dice": dice, "labels": labels}


def table(results: list[dict]) -> str:
    base = next(r for r in results if r["mode"] == "fp32")
    lines = ["| mode | median s/volume | speed-up vs fp32 | mean Dice ± sd | ΔDice vs fp32 (mean, worst case) | "
             "voxels as fp32 | first call s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        d = np.array([r["dice"][c] for c in base["dice"]])
        delta = d - np.array(list(base["dice"].values()))
        agree = np.mean([np.mean(r["labels"][c] == base["labels"][c]) for c in base["labels"]])
        lines.append(f"| {r['mode']} | {r['median_s']:.2f} | {base['median_s'] / r['median_s']:.2f}× | "
                     f"{d.mean():.4f} ± {d.std():.4f} | {delta.mean():+.4f}, {delta.min():+.4f} | "
                     f"{100 * agree:.3f} % | {r['first_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", type=Path, help="trained run folder")
    p.add_argument("data", type=Path, help="dataset folder (dataset.json with labels for the split)")
    p.add_argument("--split", default="test", help="split to predict (default test)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["fp32", "bf16"], help="fp32 is always run first")
    p.add_argument("--write", type=Path, help="markdown file whose precision section to replace")
    a = p.parse_args(argv)
    cases = load_dataset(a.data)[a.split]
    modes = ["fp32", *[m for m in a.modes if m != "fp32"]]
    results = []
    for mode in modes:
        print(f"{mode}: predicting {len(cases)} cases", file=sys.stderr, flush=True)
        results.append(run_mode(a.run, cases, mode))
    info = machine_info()
    text = (f"## Inference precision and compilation (CPU)\n\nRun `{a.run}`, {len(cases)} {a.split} cases of "
            f"`{a.data}`. Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
            f"{info['torch_threads']} threads. Command: `.venv/bin/python benchmarks/precision.py "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}`.\n\n{table(results)}\n")
    print(text)
    if a.write:
        write_section(a.write, "precision", text)


if __name__ == "__main__":
    main()
