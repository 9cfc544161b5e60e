"""Time and peak memory of one training step of the planned patch, per dataset (issue 18).

For each dataset folder given, the plan `crossmodalnet train` would make for the model (`train.plan`,
printed), then in a fresh process per row: the model built with the plan, `--steps` training steps
of the engine (forward, Dice + CE, backward, clipping, AdamW) on random patches of the planned
shape and batch, timed (median after one warm-up step), and the process's peak resident memory.
In the same run, a second process times the same step with the convolutions left 3D (`build_model(...,
fold=False)`): what `models.folding` saves where the planned model is flat along an axis (a 2D plan); a
model that is not (an isotropic plan) is the same model in both columns.
Rows print as markdown:

    | dataset | model | channels | target spacing (mm) | patch | batch | strides | s / step
      | s / step, 3D convs | peak RSS (MiB) |

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/plans.py DATA [DATA ...] --model crossmodalnet --size small
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

from _probe import engine_step_times, planned_config

from crossmodalnet.config import replace

HEADER = ("| dataset | model | channels | target spacing (mm) | patch | batch | strides | s / step "
          "| s / step, 3D convs | peak RSS (MiB) |\n|---|---|---:|---|---|---:|---|---:|---:|---:|")


def measure(data: str, model: str, size: str, steps: int, fold: bool = True) -> dict:
    """Plan, build (2D plans' convolutions folded unless `fold` is False), time `steps` engine steps;
    runs in its own process (peak RSS is per process)."""
    config, spec, plan = planned_config(data, model, size)
    times, _ = engine_step_times(replace(config, seed=0), spec, steps, fold=fold)
    return {"dataset": data, "model": f"{model}/{size}", "channels": spec.num_channels,
            "spacing": [None if s is None else round(s, 2) for s in plan.target_spacing],
            "patch": list(config.patch_size),
            "batch": config.batch_size, "strides": plan.strides, "s_per_step": statistics.median(times[1:]),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "plan": plan.describe()}


def _row(r: dict) -> str:
    strides = "2x2x2 (isotropic)" if r["strides"] is None else " ".join("x".join(map(str, s)) for s in r["strides"])
    spacing = " x ".join("stored" if s is None else str(s) for s in r["spacing"])
    return (f"| {r['dataset']} | {r['model']} | {r['channels']} | {spacing} | "
            f"{'x'.join(map(str, r['patch']))} | {r['batch']} | {strides} | {r['s_per_step']:.2f} | "
            f"{r['s_per_step_3d']:.2f} | {r['peak_mib']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="+", help="dataset folders")
    p.add_argument("--model", default="crossmodalnet")
    p.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default 3)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    p.add_argument("--unfolded", action="store_true", help=argparse.SUPPRESS)  # the child, 3D convolutions
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.data[0], a.model, a.size, a.steps, fold=not a.unfolded)))
        return 0
    print(HEADER)
    for data in a.data:
        runs = []
        for extra in ([], ["--unfolded"]):
            out = subprocess.run([sys.executable, __file__, data, "--model", a.model, "--size", a.size, "--steps",
                                  str(a.steps), "--one", *extra], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = {**runs[0], "s_per_step_3d": runs[1]["s_per_step"]}
        print(_row(r), flush=True)
        print(r["plan"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
