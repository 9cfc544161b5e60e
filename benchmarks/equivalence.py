"""Same results before and after a change: train a fixed number of steps with two versions of the code
on the same phantom, then compare every weight.

    # with each version (a second worktree at the old commit, its own .venv), the same DATA:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/equivalence.py train DATA RUN --model crossmodalnet
    # then, with the new version:
    .venv/bin/python benchmarks/equivalence.py compare OLD_RUN NEW_RUN

`train` synthesizes DATA when it is missing (8 phantoms of 48^3, seed 0), trains 2 epochs x 10 steps
with validation after each (batch 2, 48^3 patches, one thread: thread counts change float sums) and
prints the step losses. `compare` loads both runs' best weights, old key names upgraded
(`models.registry.upgrade_state_dict`), and prints the largest absolute difference of any weight
and of the logged losses: 0 means the change left training bit for bit as it was. Only the
`train` part must run on the old code, so it uses nothing newer than `train()`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import safetensors.torch
import torch
import yaml


def _train(data: Path, run: Path, model: str) -> None:
    from crossmodalnet.config import ModelConfig, TrainConfig
    from crossmodalnet.data.phantom import synthesize
    from crossmodalnet.train.trainer import train

    torch.set_num_threads(1)
    if not (data / "dataset.json").is_file():
        synthesize(data, cases=8, size=48, seed=0, domain="source", layout="dataset")
    cfg = TrainConfig(model=ModelConfig.from_size(model, "small"), epochs=2, iterations_per_epoch=10, batch_size=2,
                      patch_size=(48, 48, 48), val_every=1, warmup_epochs=1, device="cpu", num_workers=0, seed=0)
    train(data, run, cfg)
    print((run / "steps.csv").read_text())


def _losses(run: Path) -> list[list[float]]:
    with open(run / "steps.csv", newline="") as f:
        return [[float(v) for v in row.values()] for row in csv.DictReader(f)]


def _compare(old: Path, new: Path) -> float:
    from crossmodalnet.models.registry import upgrade_state_dict

    name = yaml.safe_load((new / "config.yaml").read_text())["model"]["name"]
    a = upgrade_state_dict(name, safetensors.torch.load_file(str(old / "model.safetensors")))
    b = safetensors.torch.load_file(str(new / "model.safetensors"))
    if set(a) != set(b):
        raise SystemExit(f"the two runs' weights have different names: {sorted(set(a) ^ set(b))[:5]}")
    weights = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    la, lb = _losses(old), _losses(new)
    losses = max(abs(x - y) for ra, rb in zip(la, lb, strict=True) for x, y in zip(ra, rb, strict=True))
    print(f"{len(a)} weight tensors, largest difference {weights:.3g}; {len(la)} logged steps, largest "
          f"difference of a logged value {losses:.3g}")
    return max(weights, losses)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("data", type=Path)
    t.add_argument("run", type=Path)
    t.add_argument("--model", default="crossmodalnet", choices=["crossmodalnet", "unet"])
    c = sub.add_parser("compare")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    a = p.parse_args(argv)
    if a.what == "train":
        _train(a.data, a.run, a.model)
        return 0
    return 0 if _compare(a.old, a.new) == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
