"""`crossmodalnet demo`: synthesize phantoms, train, predict the held-out cases, evaluate, report.

    run_demo("runs/demo")        # -> the evaluation summary (mean Dice, MIoU, HD95 per structure)

Folder layout under `out`:
    data/         the source-domain phantom dataset (dataset.json, NIfTI)
    run/          the training run (config.yaml, model.safetensors, curves.png, metrics.csv, last/)
    predictions/  one label map per test case (MM-WHS codes, the input's geometry)
    references/   copies of the test label maps, named like the predictions
    evaluation/   metrics.csv, summary.json, dice.png, hd95.png

`DEMO` holds every demo default in one place (dataset size, model, schedule, time budget).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from crossmodalnet.config import ModelConfig, TrainConfig
from crossmodalnet.data.dataset import load_dataset, read_spec
from crossmodalnet.data.phantom import synthesize
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.evaluate import evaluate_paths
from crossmodalnet.infer import predict
from crossmodalnet.train.trainer import train

__all__ = ["DemoSettings", "DEMO", "run_demo"]

_MARKER = "demo.json"
_PARTS = ("data", "run", "predictions", "references", "evaluation")


@dataclass(frozen=True)
class DemoSettings:
    """What the demo makes and trains. Defaults: the CPU demo (2 cores, minutes)."""

    cases: int = 20  # phantom pairs, split by the phantom into training / validation / test (14/2/4)
    size: int = 64  # edge of the phantom grid in voxels (2.25 mm voxels over the 144 mm field of view)
    model: str = "crossmodalnet"
    model_size: str = "small"
    epochs: int = 40
    iterations_per_epoch: int = 25  # 1,000 steps: the cosine schedule ends within the budget on 2 cores
    patch_size: tuple[int, int, int] = (48, 48, 48)  # 2.4x cheaper steps than 64^3, more steps per minute
    val_every: int = 4
    minutes: float | None = 11.0  # training budget, so that the whole demo stays within 15 minutes
    device: str = "auto"

    def train_config(self, seed: int) -> TrainConfig:
        """The demo's run: `TrainConfig`'s defaults (optimizer, lr, batch, model settings) but for the
        fields above."""
        return TrainConfig(
            model=ModelConfig.from_size(self.model, self.model_size), seed=seed, epochs=self.epochs,
            iterations_per_epoch=self.iterations_per_epoch, patch_size=tuple(self.patch_size),
            val_every=self.val_every, max_minutes=self.minutes, device=self.device,
            warmup_epochs=min(2, max(0, self.epochs - 1)),
        )


DEMO = DemoSettings()


def run_demo(out: str | os.PathLike = "runs/demo", minutes: float | None = None, seed: int = 0,
             settings: DemoSettings | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the whole demo into `out`; returns the evaluation summary with the timings added.

    minutes: training time budget (default `settings.minutes`). overrides: DemoSettings fields,
    e.g. `run_demo(out, model="unet", model_size="tiny", epochs=2)`.
    """
    settings = replace(settings or DEMO, **overrides)
    if minutes is not None:
        settings = replace(settings, minutes=minutes)
    out = Path(out)
    _prepare_folder(out, settings, seed)
    times: dict[str, float] = {}
    start = time.monotonic()

    t = time.monotonic()
    print(f"[1/4] synthesizing {settings.cases} paired CT/MR phantoms of {settings.size}^3 into {out / 'data'}")
    synthesize(out / "data", cases=settings.cases, size=settings.size, seed=seed, domain="source", layout="dataset")
    times["synthesis_s"] = time.monotonic() - t

    t = time.monotonic()
    budget = f", at most {settings.minutes:g} min" if settings.minutes else ""
    print(f"[2/4] training {settings.model}/{settings.model_size} for {settings.epochs} epochs{budget}")
    run = train(out / "data", out / "run", settings.train_config(seed))
    times["training_s"] = time.monotonic() - t

    t = time.monotonic()
    print("[3/4] predicting the test cases (whole volumes, sliding window)")
    predicted = predict(run, out / "predictions", data_dir=out / "data", split="test")
    times["prediction_s"] = time.monotonic() - t

    t = time.monotonic()
    print("[4/4] evaluating against the reference labels")
    for case in load_dataset(out / "data")["test"]:
        if case.label is None:
            raise CrossModalNetError(f"{out / 'data'}: test case {case.id!r} has no label to evaluate against")
        (out / "references").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(case.label, out / "references" / f"{case.id}.nii.gz")
    summary = evaluate_paths(out / "predictions", out / "references", out / "evaluation", spec=read_spec(out / "data"))
    times["evaluation_s"] = time.monotonic() - t
    times["total_s"] = time.monotonic() - start

    print(f"\ndemo finished in {times['total_s'] / 60:.1f} min (training {times['training_s'] / 60:.1f} min); "
          f"mean Dice {summary['mean_dice']:.3f}, MIoU {summary['miou']:.3f}, "
          f"mean HD95 {summary['mean_hd95']:.2f} mm over {len(predicted)} test cases")
    print(f"  report:      {out / 'evaluation'} (summary.json, metrics.csv per case, dice.png, hd95.png)")
    print(f"  predictions: {out / 'predictions'} (NIfTI label maps, the dataset's values, on the input grids)")
    print(f"  training:    {run / 'curves.png'}, {run / 'metrics.csv'}, weights {run / 'model.safetensors'}")
    return {**summary, "times": times}


def _prepare_folder(out: Path, settings: DemoSettings, seed: int) -> None:
    """Use a new folder, or clear the demo's own parts of a previous demo folder (and nothing else)."""
    if out.exists() and any(out.iterdir()):
        if not (out / _MARKER).is_file():
            raise CrossModalNetError(f"{out}: exists and is not a demo folder; choose another --out")
        for part in _PARTS:
            if (out / part).exists():
                shutil.rmtree(out / part)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text(json.dumps({"seed": seed, **asdict(settings)}, indent=2))
