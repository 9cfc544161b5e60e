"""Training step of CrossModalNet `small` on a dataset's plan with window attention written out (the
package's CPU training path, `models.layers._attention`) against `F.scaled_dot_product_attention` for
every call (SDPA falls back to its math path when the additive mask, the learned position bias, needs
a gradient). Same process, same random batch, the two alternated `--repeats` times; median seconds per
step after one warm-up step each time. Rows print as markdown:

    | dataset | channels | patch | batch | s / step, SDPA | s / step, written out | ratio |

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/attention.py DATA [DATA ...] [--steps 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from _probe import engine_step_times

import crossmodalnet.models.layers as layers
from crossmodalnet.config import ModelConfig, TrainConfig, replace
from crossmodalnet.data.dataset import read_spec
from crossmodalnet.train.plan import apply_plan
from crossmodalnet.train.preflight import plan_dataset


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def measure(data: str, steps: int, repeats: int, size: str = "small") -> dict:
    """The planned CrossModalNet `size` step with both attentions, alternated: median seconds per step
    (`sdpa`, `written`), the data's channels, the patch and the batch."""
    spec = read_spec(data)
    model = ModelConfig.from_size("crossmodalnet", size, modalities=spec.num_channels, out_channels=spec.num_outputs)
    _, plan = plan_dataset(data, model, "cpu")
    config = apply_plan(TrainConfig(model=model), plan)
    config = replace(config, seed=0, model=replace(config.model.for_data(spec.registered),
                                                   modalities=spec.num_channels, out_channels=spec.num_outputs))
    written = layers._attention
    times: dict[str, list[float]] = {"sdpa": [], "written": []}
    try:
        for _ in range(repeats):
            for name, fn in (("sdpa", _sdpa), ("written", written)):
                layers._attention = fn
                times[name] += engine_step_times(config, spec, steps)[0][1:]
    finally:
        layers._attention = written
    return {"data": data, "channels": spec.num_channels, "patch": list(config.patch_size),
            "batch": config.batch_size, "sdpa": statistics.median(times["sdpa"]),
            "written": statistics.median(times["written"])}


def row(r: dict) -> str:
    """A markdown row of `measure`'s result."""
    return (f"| {r['data']} | {r['channels']} | {'x'.join(map(str, r['patch']))} | {r['batch']} | "
            f"{r['sdpa']:.3f} | {r['written']:.3f} | {r['sdpa'] / r['written']:.2f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="+", help="crossmodalnet dataset folders")
    p.add_argument("--steps", type=int, default=3, help="timed steps per turn (after one warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="turns of each attention, alternated")
    a = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| dataset | channels | patch | batch | s / step, SDPA | s / step, written out | ratio |\n"
          "|---|---:|---|---:|---:|---:|---:|")
    for data in a.data:
        print(row(measure(data, a.steps, a.repeats)), flush=True)


if __name__ == "__main__":
    main()
