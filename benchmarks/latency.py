"""CPU forward latency of every registered model, side by side in one run.

For each model: parameters, forward GFLOPs (FlopCounterMode), median forward latency on one
CT + MR pair of S³ voxels (after warm-up), peak memory of the forward pass, achieved GFLOP/s,
and, measured in the same run, this machine's fp32 matrix-multiply rate. Each model runs in its
own subprocess so that peak memory (ru_maxrss) is its own.

    .venv/bin/python benchmarks/latency.py --edge 96 --runs 5 --write docs/benchmarks.md

`--write` replaces the latency section of the markdown file (between marker comments).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _files import write_section

from crossmodalnet.config import ModelConfig
from crossmodalnet.models.registry import MODEL_NAMES, build_model, count_parameters, forward_flops


def matmul_rate(n: int = 2048, runs: int = 10) -> float:
    """Median fp32 GFLOP/s of an n x n matrix multiply with the current torch threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def measure_one(name: str, size: str, edge: int, runs: int) -> dict:
    """Runs inside the subprocess: build, count, time, and read the peak RSS."""
    torch.manual_seed(0)
    model = build_model(name, ModelConfig.from_size(name, size, img_size=edge)).eval()
    flops = forward_flops(model, edge)
    x = torch.randn(1, 2, edge, edge, edge)  # a CT + MR pair
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        model(x)  # warm-up (allocator, oneDNN primitive cache)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    med = statistics.median(times)
    return {"model": name, "size": size, "params_m": count_parameters(model) / 1e6, "gflops": flops / 1e9,
            "latency_s": med, "latency_min_s": min(times), "peak_mib": peak / 1024,
            "forward_mib": max(peak - rss_before, 0) / 1024, "gflop_per_s": flops / 1e9 / med}


def run_all(entries: list[tuple[str, str]], edge: int, runs: int) -> list[dict]:
    rows = []
    for name, size in entries:
        cmd = [sys.executable, __file__, "--one", name, "--model-size", size, "--edge", str(edge),
               "--runs", str(runs)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"  {name:14s} {size:6s} {row['latency_s']:.2f} s", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict], rate: float, edge: int) -> str:
    lines = [
        "| model | size | params (M) | GFLOPs | median latency (s) | peak memory (MiB) | GFLOP/s | % of matmul |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['size']} | {r['params_m']:.2f} | {r['gflops']:.1f} | {r['latency_s']:.2f} | "
            f"{r['peak_mib']:.0f} | {r['gflop_per_s']:.1f} | {100 * r['gflop_per_s'] / rate:.0f}% |"
        )
    note = f"fp32 matrix multiply (2048², same run): {rate:.1f} GFLOP/s. Input: one CT + MR pair of {edge}³."
    return "\n".join(lines) + "\n\n" + note


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edge", type=int, default=96, help="input edge length (default 96)")
    p.add_argument("--runs", type=int, default=5, help="timed forward passes per model (default 5)")
    p.add_argument("--model-size", default="small", help="named size for every model (default small)")
    p.add_argument("--models", nargs="*", default=None, help="subset of models (default: all registered)")
    p.add_argument("--write", type=Path, default=None, help="markdown file to update (docs/benchmarks.md)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure_one(a.one, a.model_size, a.edge, a.runs)))
        return
    entries = [(m, a.model_size) for m in (a.models or MODEL_NAMES)]
    # The reference point of the model issue: MONAI SwinUNETR at its published size (feature_size=48).
    # (Its bottleneck is 1/32 of the input; instance norm needs more than one voxel there.)
    if ("swinunetr", "base") not in entries and a.edge >= 64:
        entries.append(("swinunetr", "base"))
    rate = matmul_rate()
    rows = run_all(entries, a.edge, a.runs)
    rate = statistics.median([rate, matmul_rate()])  # before and after: the machine is noisy
    text = table(rows, rate, a.edge)
    cmn = next((r for r in rows if r["model"] == "crossmodalnet"), None)
    ref = next((r for r in rows if r["model"] == "swinunetr" and r["size"] == "base"), None)
    if cmn and ref:
        text += (f"\n\nCrossModalNet `{cmn['size']}` takes {cmn['latency_s'] / ref['latency_s']:.3f}× the time of "
                 f"SwinUNETR `feature_size=48` ({ref['latency_s'] / cmn['latency_s']:.1f}× faster) and runs at "
                 f"{100 * cmn['gflop_per_s'] / rate:.0f}% of the matrix-multiply rate.")
    header = (f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads. Command: `.venv/bin/python benchmarks/latency.py "
              f"--edge {a.edge} --runs {a.runs} --model-size {a.model_size}`.\n\n")
    print(header + text)
    if a.write:
        write_section(a.write, "latency", "## Forward latency (CPU)\n\n" + header + text)


if __name__ == "__main__":
    main()
