"""Training: patches in, a run folder out, on one CPU or many GPUs (DDP through torchrun).

    train("data/phantoms", "runs/cmn", TrainConfig())      # -> Path("runs/cmn")

`SegmentationTask` is what one step computes: a batch of patches (`train.data.PatchSampler`,
(B, 1, *patch_size) per modality) through `model(ct, mr)` -> logits (B, 8, *patch_size) (or a
deep-supervision list), Dice + CE (optionally balanced by Def. 4). The `Engine` runs it: every
`val_every` epochs the validation volumes are predicted whole (sliding window, Gaussian blending)
and scored with the Dice `evaluate` reports; the best weights become `model.safetensors`; every
epoch ends with a complete resume checkpoint `last/`.

Every input (configuration, run folder, dataset, every case's images and labels) is checked and
loaded before the run folder is created or written: a refusal leaves nothing behind.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from torch import nn

from crossmodalnet.config import TrainConfig
from crossmodalnet.data.dataset import load_case
from crossmodalnet.data.labels import NAMES, NUM_CLASSES
from crossmodalnet.data.preprocess import PreparedCase, Preprocessor, fit_preprocessor
from crossmodalnet.models.inference import sliding_window_probabilities
from crossmodalnet.models.registry import build_model
from crossmodalnet.runs import RunFolder
from crossmodalnet.train import distributed as ddp
from crossmodalnet.train import preflight
from crossmodalnet.train.data import PatchSampler
from crossmodalnet.train.distributed import gather_lists, split_by_rank
from crossmodalnet.train.engine import LoopSettings, PreparedRun, Task, param_groups
from crossmodalnet.train.losses import AdaptiveLossBalancing, DiceCETerms
from crossmodalnet.train.report import METRIC_COLUMNS, STEP_TERMS, format_summary, plot_curves

__all__ = ["SegmentationTask", "prepare_training", "train", "train_from_cli", "validation_dice",
           "case_dice", "warmup_cosine"]


def warmup_cosine(step: int, total: int, warmup: int, scheduler: str = "cosine") -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at step `total` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if scheduler == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class SegmentationTask(Task):
    """Supervised segmentation: Dice + CE on patches, validation Dice on whole volumes."""

    columns = STEP_TERMS
    metric_columns = METRIC_COLUMNS
    best_column = "best_val_dice"

    def __init__(self, config: TrainConfig, model: nn.Module, sampler: PatchSampler,
                 val_cases: list[PreparedCase], device: torch.device) -> None:
        self.config, self.model, self.batches, self.val_cases, self.device = config, model, sampler, val_cases, device
        opt_cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        self.optimizers = [opt_cls(param_groups([model], config.weight_decay), lr=config.lr)]
        self.loss_fn = DiceCETerms()
        self.balancer = AdaptiveLossBalancing(DiceCETerms.names, config.balancing_alpha)

    def lr_factor(self, step: int, total_steps: int) -> float:
        cfg = self.config
        return warmup_cosine(step, total_steps, cfg.warmup_epochs * cfg.iterations_per_epoch, cfg.scheduler)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(batch["ct"], batch["mr"])
        terms = self.loss_fn(out, batch["label"])
        if self.config.loss_balancing:
            total, weights = self.balancer(terms, update=False)
        else:
            total, weights = terms["dice"] + terms["ce"], {"dice": 1.0, "ce": 1.0}
        return total, {"loss": total.detach(), "loss_dice": terms["dice"].detach(), "loss_ce": terms["ce"].detach(),
                       "weight_dice": weights["dice"], "weight_ce": weights["ce"]}

    def after_step(self, logs: dict[str, float]) -> None:
        if self.config.loss_balancing:
            self.balancer.update({"dice": logs["loss_dice"], "ce": logs["loss_ce"]})

    def validate(self, dist: ddp.DistInfo) -> dict[str, float] | None:
        scores = validation_dice(self.model, self.val_cases, self.config, self.device, dist)
        return {"val_dice_mean": scores["mean"], **{f"val_dice_{n}": scores[n] for n in NAMES},
                "score": scores["mean"]}

    def figure(self, history: list[dict[str, Any]], steps: list[dict[str, Any]]) -> Any:
        return plot_curves(history, steps, self.config.loss_balancing)

    def summary_line(self, row: dict[str, Any], epochs: int) -> str:
        return format_summary(row, epochs)

    def state_dict(self) -> dict[str, Any]:
        return {"balancing": self.balancer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.balancer.load_state_dict(state["balancing"])


def case_dice(probs: torch.Tensor, label: np.ndarray) -> torch.Tensor:
    """Dice per structure (7,) of one case, by the rule `evaluate` reports: a structure absent from
    both prediction and reference is NaN (not scored); absent from exactly one, 0.

    probs: (1, C, D, H, W); label: (D, H, W) class indices.
    """
    pred = one_hot(probs.argmax(1, keepdim=True), NUM_CLASSES)
    ref = one_hot(torch.from_numpy(label.astype(np.int64))[None, None], NUM_CLASSES)
    dice = compute_dice(pred, ref, include_background=False, ignore_empty=False)[0].float()
    both_empty = (pred[0, 1:].flatten(1).sum(1) == 0) & (ref[0, 1:].flatten(1).sum(1) == 0)
    return torch.where(both_empty, torch.full_like(dice, math.nan), dice)


@torch.no_grad()
def validation_dice(model: nn.Module, cases: list[PreparedCase], config: TrainConfig, device: torch.device,
                    dist: ddp.DistInfo | None = None) -> dict[str, float]:
    """Dice per structure (mean over `cases`, prepared with labels) and their mean, on whole volumes.

    Sliding window with the config's roi, overlap and batch; the model is left in training mode.
    Under DDP each process passes (and scores) its own share of the cases, and all get every score.
    """
    dist = dist or ddp.DistInfo(device=device)
    model.eval()
    mine = []
    for case in cases:
        ct, mr = (torch.from_numpy(x)[None, None] for x in (case.ct, case.mr))
        probs = sliding_window_probabilities(model, ct, mr, config.patch_size, config.sw_overlap,
                                             config.sw_batch_size, device)
        mine.append(case_dice(probs, case.label).tolist())
    model.train()
    every = gather_lists(mine, dist)
    if not every:
        return {"mean": math.nan, **dict.fromkeys(NAMES, math.nan)}
    per = torch.nanmean(torch.tensor(every, dtype=torch.float64), dim=0)  # (cases, 7) -> (7,), NaN-aware
    return {"mean": float(torch.nanmean(per)), **{n: float(v) for n, v in zip(NAMES, per, strict=True)}}


def _prepare(data_dir: str | os.PathLike, run: RunFolder, config: TrainConfig, resume: bool,
             dist: ddp.DistInfo) -> tuple[Preprocessor, list[PreparedCase], list[PreparedCase]]:
    """Check every input, then load and prepare every case; nothing is written here."""
    ddp.main_first(lambda: run.check_resumable(config) if resume else run.open_new(), dist)
    preflight.check_runnable(config, dist.world_size)
    train_cases, val_cases = ddp.main_first(lambda: preflight.dataset_splits(data_dir, config), dist)
    loaded = [load_case(c) for c in train_cases]
    if resume and run.has_preprocess():
        preprocessor = run.read_preprocess()
    else:
        preprocessor = Preprocessor.from_dict(ddp.main_first(
            lambda: fit_preprocessor(loaded, config.target_spacing, config.seed).to_dict(), dist))
    train_prepared = [preprocessor.prepare(d["ct"], d["mr"], d["geometry"], d["label"], c.id)
                      for c, d in zip(train_cases, loaded, strict=True)]
    val_prepared = []
    for c in split_by_rank(val_cases, dist) if dist.distributed else val_cases:
        d = load_case(c)
        val_prepared.append(preprocessor.prepare(d["ct"], d["mr"], d["geometry"], d["label"], c.id))
    return preprocessor, train_prepared, val_prepared


def prepare_training(data_dir: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig,
                     resume: bool = False, dist: ddp.DistInfo | None = None) -> PreparedRun:
    """Check every input and load every case, then create the run folder (nothing is written before)."""
    dist = dist or ddp.DistInfo(device=ddp.resolve_device(config.device))
    run = RunFolder(out_dir)
    preprocessor, train_cases, val_cases = _prepare(data_dir, run, config, resume, dist)
    if dist.is_main:  # every check passed: now the folder may be written (a resume keeps its files)
        run.create()
        if not run.has_config():
            run.write_config(config)
        if not run.has_preprocess():
            run.write_preprocess(preprocessor)
    ddp.barrier(dist)
    torch.manual_seed(config.seed)  # same initial weights for a given seed
    model = build_model(config.model.name, config.model)
    state = run.load_checkpoint(model if dist.is_main else None) if resume else None
    if dist.distributed:  # every rank needs the step count; DDP broadcasts rank 0's weights
        state = ddp.main_first(lambda: state, dist)
    model.to(dist.device)
    sampler = PatchSampler(train_cases, config, rank=dist.rank, batch_size=config.batch_size // dist.world_size,
                           spacing=preprocessor.target_spacing)
    # Under DDP each process holds (and scores) its own share of the validation cases.
    task = SegmentationTask(config, model, sampler, val_cases, dist.device)
    settings = LoopSettings(
        total_steps=config.epochs * config.iterations_per_epoch, iterations_per_epoch=config.iterations_per_epoch,
        seed=config.seed, max_minutes=config.max_minutes, grad_clip=config.grad_clip, precision=config.precision,
        num_workers=config.num_workers, val_every=config.val_every,
        desc=f"train {config.model.name}/{config.model.size}")
    return PreparedRun(task, settings, run, dist, state, config.model)


def train(data_dir: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig,
          resume: bool = False) -> Path:
    """Train `config` on the dataset folder `data_dir` into run folder `out_dir` (DDP under torchrun)."""
    dist = ddp.init_distributed(config.device)
    try:
        prepared = prepare_training(data_dir, out_dir, config, resume, dist)
        engine = prepared.fit()
        if dist.is_main:
            status = "finished" if engine.finished else "stopped at the time budget"
            print(f"training {status}: step {engine.step}/{prepared.settings.total_steps}, best val Dice "
                  f"{engine.best:.4f}; run folder {prepared.run.path}")
        return prepared.run.path
    finally:
        ddp.cleanup(dist)


def train_from_cli(args: argparse.Namespace) -> None:
    """`crossmodalnet train DATA --out RUN [...]`: resolve the configuration, then `train`."""
    train(args.data, args.out, preflight.resolve_config(args), resume=args.resume)
