"""Peak CPU memory of one training step (forward + backward) of a registered model.

Builds the model and a CT + MR pair of (batch, 1, S, S, S) voxels, then runs one forward pass and
the backward pass of a DiceCE loss (against random labels) on the full-resolution logits. Peak
memory is the process's peak resident set size (`ru_maxrss`), so run it in a fresh process per
measurement (one invocation = one measurement); printed as one markdown row:

    | model | size | edge | batch | RSS after build (MiB) | peak RSS (MiB) | step peak - build (MiB) |

    .venv/bin/python benchmarks/memory.py --model crossmodalnet --size base --edge 128 --batch 2
    .venv/bin/python benchmarks/memory.py --header ...   # with the table's header rows first

No timing: this measures memory only.
"""

from __future__ import annotations

import argparse
import resource
import sys

import torch
from monai.losses import DiceCELoss

from crossmodalnet.config import ModelConfig
from crossmodalnet.models.registry import MODEL_NAMES, build_model

HEADER = ("| model | size | edge | batch | RSS after build (MiB) | peak RSS (MiB) | step peak - build (MiB) |\n"
          "|---|---|---:|---:|---:|---:|---:|")


def _max_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model_name: str, size: str, edge: int, batch: int, seed: int = 0) -> dict[str, float]:
    """One forward + backward of `model_name` at `size` on a (batch, 2, edge, edge, edge) CT + MR input.

    Returns the peak RSS after building the model and inputs (`build_mib`), the peak after the
    step (`peak_mib`) and their difference (`step_mib`), all in MiB.
    """
    torch.manual_seed(seed)
    cfg = ModelConfig.from_size(model_name, size, img_size=edge)
    model = build_model(model_name, cfg).train()
    image = torch.randn(batch, cfg.modalities, edge, edge, edge)
    target = torch.randint(0, cfg.out_channels, (batch, 1, edge, edge, edge))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    build = _max_rss_mib()
    out = model(image)
    # Deep supervision returns [full-resolution logits, coarser ...]; the full-resolution ones suffice here.
    logits = out[0] if isinstance(out, list | tuple) else out
    loss = loss_fn(logits, target)
    loss.backward()
    peak = _max_rss_mib()
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    return {"build_mib": build, "peak_mib": peak, "step_mib": peak - build}


def row(model_name: str, size: str, edge: int, batch: int, r: dict[str, float]) -> str:
    return (f"| {model_name} | {size} | {edge} | {batch} | {r['build_mib']:.0f} | {r['peak_mib']:.0f} | "
            f"{r['step_mib']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="crossmodalnet", choices=MODEL_NAMES)
    p.add_argument("--size", default="base", choices=["tiny", "small", "base"], help="named model size")
    p.add_argument("--edge", type=int, default=128, help="input edge S in voxels (default 128)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--header", action="store_true", help="print the markdown header rows too")
    a = p.parse_args(argv)
    if a.header:
        print(HEADER)
    r = measure(a.model, a.size, a.edge, a.batch, a.seed)
    print(row(a.model, a.size, a.edge, a.batch, r))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
