"""One training step of the package's engine timed on a fixed random batch (the step, not the data):
the probe that sizes time-budget schedules (`_train_job.py`, `_real_ours.py`) and the planned-step
benchmarks (`plans.py`, `train_step.py`), with the configuration `train` would plan for a dataset."""

from __future__ import annotations

import time

import torch

from crossmodalnet.config import ModelConfig, TrainConfig, replace
from crossmodalnet.data.dataset import read_spec
from crossmodalnet.data.spec import DataSpec
from crossmodalnet.models.registry import build_model
from crossmodalnet.train.engine import Engine, LoopSettings
from crossmodalnet.train.plan import Plan, apply_plan
from crossmodalnet.train.preflight import plan_dataset
from crossmodalnet.train.trainer import SegmentationTask

__all__ = ["RandomBatches", "engine_step_times", "planned_config"]


def planned_config(data: str, name: str, size: str) -> tuple[TrainConfig, DataSpec, Plan]:
    """The default configuration of model `name` at `size` with the plan `train` makes for dataset
    `data` on the CPU and the model's channels and outputs from the dataset; the spec and the plan."""
    spec = read_spec(data)
    model = ModelConfig.from_size(name, size, modalities=spec.num_channels, out_channels=spec.num_outputs)
    _, plan = plan_dataset(data, model, "cpu")
    config = apply_plan(TrainConfig(model=model), plan)
    config = replace(config, model=replace(config.model.for_data(spec.registered), modalities=spec.num_channels,
                                           out_channels=spec.num_outputs))
    return config, spec, plan


class RandomBatches:
    """The same random batch of the configuration's patch, batch and channels at every step."""

    def __init__(self, config: TrainConfig, classes: int) -> None:
        b, m, p = config.batch_size, config.model.modalities, config.patch_size
        g = torch.Generator().manual_seed(0)
        self.fixed = {"image": torch.randn(b, m, *p, generator=g), "present": torch.ones(b, m, dtype=torch.bool),
                      "label": torch.randint(0, classes, (b, 1, *p), generator=g)}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return self.fixed


def engine_step_times(config: TrainConfig, spec: DataSpec, steps: int = 3,
                      fold: bool = True) -> tuple[list[float], torch.nn.Module]:
    """Seconds of `steps` + 1 engine steps (forward, loss, backward, clipping, AdamW; the first pays for
    allocator and kernel warm-up), and the model built with `config.seed` (`fold`: `build_model`'s)."""
    torch.manual_seed(config.seed)
    model = build_model(config.model.name, config.model, fold=fold)
    task = SegmentationTask(config, model, RandomBatches(config, spec.num_classes), [], torch.device("cpu"), spec)
    engine = Engine(task, LoopSettings(total_steps=steps + 1, iterations_per_epoch=steps + 1,
                                       grad_clip=config.grad_clip, precision=config.precision, desc=""))
    times = []
    for step in range(steps + 1):
        t = time.perf_counter()
        engine.train_step(task.batches.batch(step))
        times.append(time.perf_counter() - t)
    return times, model
