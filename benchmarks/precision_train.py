"""Training step on a dataset's plan in float32 and in bfloat16 autocast on the CPU (`precision: bf16`,
`train.engine.training_autocast`), per model: same process, same random batch, the two alternated
`--repeats` times; median seconds per step after one warm-up step each time. Rows print as markdown:

    | model | channels | patch | batch | s / step, fp32 | s / step, bf16 | ratio |

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/precision_train.py DATA [--models crossmodalnet,unet]

bfloat16 pays where the CPU computes it natively (AMX or AVX-512 BF16: `grep -o 'amx_bf16\\|avx512_bf16'
/proc/cpuinfo`); elsewhere it is emulated and slower. Whether it trains as well is a question for
`benchmarks/real.py --config-set precision=bf16`, not for this script.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _probe import engine_step_times

from crossmodalnet.config import ModelConfig, TrainConfig, replace
from crossmodalnet.data.dataset import read_spec
from crossmodalnet.train.plan import apply_plan
from crossmodalnet.train.preflight import plan_dataset


def measure(data: str, name: str, steps: int, repeats: int, size: str = "small") -> dict:
    """Model `name`'s planned step in both precisions, alternated: median seconds per step (`fp32`,
    `bf16`), the data's channels, the patch and the batch."""
    spec = read_spec(data)
    model = ModelConfig.from_size(name, size, modalities=spec.num_channels, out_channels=spec.num_outputs)
    _, plan = plan_dataset(data, model, "cpu")
    config = apply_plan(TrainConfig(model=model), plan)
    config = replace(config, seed=0, model=replace(config.model.for_data(spec.registered),
                                                   modalities=spec.num_channels, out_channels=spec.num_outputs))
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(repeats):
        for precision in times:
            times[precision] += engine_step_times(replace(config, precision=precision), spec, steps)[0][1:]
    return {"model": name, "channels": spec.num_channels, "patch": list(config.patch_size),
            "batch": config.batch_size, "fp32": statistics.median(times["fp32"]),
            "bf16": statistics.median(times["bf16"])}


def row(r: dict) -> str:
    """A markdown row of `measure`'s result."""
    return (f"| {r['model']} | {r['channels']} | {'x'.join(map(str, r['patch']))} | {r['batch']} | "
            f"{r['fp32']:.3f} | {r['bf16']:.3f} | {r['fp32'] / r['bf16']:.2f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="crossmodalnet dataset folder")
    p.add_argument("--models", default="crossmodalnet,unet", help="comma-separated (default crossmodalnet,unet)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per turn (after one warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="turns of each precision, alternated")
    a = p.parse_args(argv)
    print(f"{a.data}: torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | channels | patch | batch | s / step, fp32 | s / step, bf16 | ratio |\n"
          "|---|---:|---|---:|---:|---:|---:|")
    for name in a.models.split(","):
        print(row(measure(a.data, name, a.steps, a.repeats)), flush=True)


if __name__ == "__main__":
    main()
