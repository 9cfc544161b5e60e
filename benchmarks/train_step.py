"""The planned training step of a model on a dataset, two ways, alternated in one process: same random
batch, `--repeats` turns of each, median seconds per step after one warm-up step each turn.

    --compare attention   CrossModalNet's window attention through `F.scaled_dot_product_attention`
                          against the package's CPU training path, written out (`models.layers._attention`:
                          SDPA falls back to its math path when the additive mask, the learned position
                          bias, needs a gradient)
    --compare precision   float32 against bfloat16 autocast on the CPU (`precision: bf16`,
                          `train.engine.training_autocast`); it pays where the CPU computes bfloat16
                          natively (AMX or AVX-512 BF16: `grep -o 'amx_bf16\\|avx512_bf16' /proc/cpuinfo`).
                          Whether it trains as well is for `benchmarks/real.py --config-set precision=bf16`.

Rows print as markdown:

    | dataset | model | channels | patch | batch | s / step, A | s / step, B | ratio A / B |

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_step.py DATA [DATA ...] --compare precision \\
        [--models crossmodalnet,unet] [--steps 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _probe import engine_step_times, planned_config

import crossmodalnet.models.layers as layers
from crossmodalnet.config import TrainConfig, replace


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _variants(compare: str) -> dict[str, Callable[[TrainConfig], TrainConfig]]:
    """Label -> a function that sets the variant up and returns the configuration to time."""
    if compare == "precision":
        return {"fp32": lambda c: replace(c, precision="fp32"), "bf16": lambda c: replace(c, precision="bf16")}
    written = layers._attention

    def use(fn: Callable) -> Callable[[TrainConfig], TrainConfig]:
        def setup(c: TrainConfig) -> TrainConfig:
            layers._attention = fn
            return c
        return setup
    return {"SDPA": use(_sdpa), "written out": use(written)}


def measure(data: str, name: str, compare: str, steps: int, repeats: int, size: str = "small") -> dict:
    """Model `name`'s planned step both ways of `compare`, alternated: median seconds per step by label
    (`times`), the data's channels, the patch and the batch. The package is left as it was."""
    config, spec, _ = planned_config(data, name, size)
    config = replace(config, seed=0)
    variants, attention = _variants(compare), layers._attention
    times: dict[str, list[float]] = {label: [] for label in variants}
    try:
        for _ in range(repeats):
            for label, setup in variants.items():
                times[label] += engine_step_times(setup(config), spec, steps)[0][1:]
    finally:
        layers._attention = attention
    return {"data": data, "model": name, "channels": spec.num_channels, "patch": list(config.patch_size),
            "batch": config.batch_size, "times": {k: statistics.median(v) for k, v in times.items()}}


def row(r: dict) -> str:
    """A markdown row of `measure`'s result."""
    a, b = r["times"].values()
    return (f"| {r['data']} | {r['model']} | {r['channels']} | {'x'.join(map(str, r['patch']))} | {r['batch']} | "
            f"{a:.3f} | {b:.3f} | {a / b:.2f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="+", help="crossmodalnet dataset folders")
    p.add_argument("--compare", choices=["attention", "precision"], required=True, help="what to compare")
    p.add_argument("--models", default=None,
                   help="comma-separated (default: crossmodalnet for attention, crossmodalnet,unet for precision)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per turn (after one warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="turns of each variant, alternated")
    a = p.parse_args(argv)
    models = (a.models or ("crossmodalnet" if a.compare == "attention" else "crossmodalnet,unet")).split(",")
    first, second = _variants(a.compare)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"| dataset | model | channels | patch | batch | s / step, {first} | s / step, {second} | ratio |\n"
          "|---|---|---:|---|---:|---:|---:|---:|")
    for data in a.data:
        for name in models:
            print(row(measure(data, name, a.compare, a.steps, a.repeats)), flush=True)


if __name__ == "__main__":
    main()
