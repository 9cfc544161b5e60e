"""Training: patches in, a run folder out, on one CPU or many GPUs (DDP through torchrun).

    train("data/phantoms", "runs/cmn", TrainConfig())      # -> Path("runs/cmn")

`SegmentationTask` is what one step computes: a batch of patches (`train.data.PatchSampler`,
(B, C, *patch_size), C the dataset's channels, with which are present) through
`model(image, present)` -> logits (B, K, *patch_size) (or a deep-supervision list), Dice + CE
(optionally balanced by Def. 4); K is the dataset's classes, or its regions when it trains on
regions (sigmoid per region, Dice + BCE on nested masks, as nnU-Net). The `Engine` runs it: every
`val_every` epochs the validation volumes are predicted whole (sliding window, Gaussian blending)
and scored with the Dice `evaluate` reports (per class, and per region: the regions' mean selects
the checkpoint when the dataset has regions); the best weights become `model.safetensors`; every
epoch ends with a complete resume checkpoint `last/`. The dataset's description (channels,
labels, regions) is recorded in the run as `spec.json`.

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
from torch import nn

from crossmodalnet.config import TrainConfig, replace
from crossmodalnet.data.dataset import load_case
from crossmodalnet.data.fingerprint import fingerprint
from crossmodalnet.data.preprocess import PreparedCase, Preprocessor, fit_preprocessor
from crossmodalnet.data.spec import DataSpec
from crossmodalnet.models.inference import keep_largest_foreground, sliding_window_probabilities
from crossmodalnet.models.registry import build_model
from crossmodalnet.runs import RunFolder
from crossmodalnet.train import distributed as ddp
from crossmodalnet.train import preflight
from crossmodalnet.train.data import PatchSampler
from crossmodalnet.train.distributed import gather_lists, split_by_rank
from crossmodalnet.train.engine import LoopSettings, PreparedRun, Task, param_groups
from crossmodalnet.train.losses import AdaptiveLossBalancing, DiceCETerms
from crossmodalnet.train.plan import Plan
from crossmodalnet.train.report import STEP_TERMS, format_summary, metric_columns, plot_curves, score_columns

__all__ = ["SegmentationTask", "prepare_training", "train", "train_from_cli", "validation_dice",
           "choose_postprocessing", "case_dice", "warmup_cosine"]


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
    best_column = "best_val_dice"

    def __init__(self, config: TrainConfig, model: nn.Module, sampler: PatchSampler,
                 val_cases: list[PreparedCase], device: torch.device, spec: DataSpec) -> None:
        self.config, self.model, self.batches, self.val_cases, self.device = config, model, sampler, val_cases, device
        self.spec = spec
        self.metric_columns = metric_columns(spec)
        opt_cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        self.optimizers = [opt_cls(param_groups([model], config.weight_decay), lr=config.lr)]
        self.loss_fn = DiceCETerms(regions=spec.train_regions)
        # Class index -> (R,) membership of each region, for region targets on the device.
        self.region_table = torch.from_numpy(
            spec.region_masks(np.arange(spec.num_classes)).T.astype(np.float32)) if spec.train_regions else None
        self.balancer = AdaptiveLossBalancing(DiceCETerms.names, config.balancing_alpha)

    def lr_factor(self, step: int, total_steps: int) -> float:
        cfg = self.config
        return warmup_cosine(step, total_steps, cfg.warmup_epochs * cfg.iterations_per_epoch, cfg.scheduler)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(batch["image"], batch["present"])
        target = batch["label"]
        if self.region_table is not None:  # (B, 1, *P) indices -> (B, R, *P) region masks
            target = self.region_table.to(target.device)[target[:, 0]].movedim(-1, 1)
        terms = self.loss_fn(out, target)
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
        scores = validation_dice(self.model, self.val_cases, self.config, self.device, self.spec, dist)
        return {**scores, "score": _score(scores, self.spec)}

    def figure(self, history: list[dict[str, Any]], steps: list[dict[str, Any]]) -> Any:
        return plot_curves(history, steps, self.config.loss_balancing, self.spec)

    def summary_line(self, row: dict[str, Any], epochs: int) -> str:
        return format_summary(row, epochs, self.spec)

    def state_dict(self) -> dict[str, Any]:
        return {"balancing": self.balancer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.balancer.load_state_dict(state["balancing"])


def case_dice(indices: np.ndarray, label: np.ndarray, spec: DataSpec) -> np.ndarray:
    """Dice of one case per class, then per region ((K - 1 + R,) float64), by the rule `evaluate`
    reports: a class absent from both prediction and reference is NaN (not scored); absent from
    exactly one, 0.

    indices, label: (D, H, W) class indices (prediction, reference).
    """
    pred, ref = np.asarray(indices), np.asarray(label)
    masks = [(pred == c, ref == c) for c in range(1, spec.num_classes)]
    pr, rr = spec.region_masks(pred), spec.region_masks(ref)
    masks += list(zip(pr, rr, strict=True))
    out = np.empty(len(masks))
    for i, (p, r) in enumerate(masks):
        total = int(p.sum()) + int(r.sum())
        out[i] = math.nan if total == 0 else 2.0 * int(np.logical_and(p, r).sum()) / total
    return out


@torch.no_grad()
def _validation_tables(model: nn.Module, cases: list[PreparedCase], config: TrainConfig, device: torch.device,
                       spec: DataSpec, dist: ddp.DistInfo, largest_component: bool = False,
                       ) -> tuple[list[list[float]], list[list[float]] | None]:
    """`case_dice` rows of every rank's cases (cases, K - 1 + R), and with `largest_component` the same
    rows after `keep_largest_foreground` (else None); one sliding-window pass per case."""
    model.eval()
    raw, kept = [], []
    for case in cases:
        image = torch.from_numpy(case.stacked())[None]
        present = torch.tensor([case.present], dtype=torch.bool)
        probs = sliding_window_probabilities(model, image, present, config.patch_size, config.sw_overlap,
                                             config.sw_batch_size, device, activation=spec.activation)
        indices = spec.decide(probs[0].numpy())
        raw.append(case_dice(indices, case.label, spec).tolist())
        if largest_component:
            kept.append(case_dice(keep_largest_foreground(indices), case.label, spec).tolist())
    model.train()
    return gather_lists(raw, dist), gather_lists(kept, dist) if largest_component else None


def _scores(every: list[list[float]], spec: DataSpec) -> dict[str, float]:
    """Per-class and per-region means over cases of `case_dice` rows, keyed by `report.score_columns`."""
    k = spec.num_classes - 1
    if every:
        # (cases, K - 1 + R) -> (K - 1 + R,), NaN-aware; a column NaN in every case stays NaN.
        table = np.array(every, dtype=np.float64)
        per = np.array([np.nanmean(col) if np.isfinite(col).any() else math.nan for col in table.T])
    else:
        per = np.full(k + len(spec.regions), math.nan)
    names = score_columns(spec)

    def mean(values: np.ndarray) -> float:
        return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan

    out = {"val_dice_mean": mean(per[:k]), **{f"val_dice_{n}": float(v) for n, v in zip(spec.names, per[:k],
                                                                                         strict=True)}}
    if spec.regions:
        out["val_region_mean"] = mean(per[k:])
        out.update({f"val_region_{r.name}": float(v) for r, v in zip(spec.regions, per[k:], strict=True)})
    assert tuple(out) == names
    return out


def _score(scores: dict[str, float], spec: DataSpec) -> float:
    """The number that selects the checkpoint: the regions' mean Dice when the dataset has regions."""
    return scores["val_region_mean"] if spec.regions else scores["val_dice_mean"]


def validation_dice(model: nn.Module, cases: list[PreparedCase], config: TrainConfig, device: torch.device,
                    spec: DataSpec, dist: ddp.DistInfo | None = None) -> dict[str, float]:
    """Dice per class and per region (mean over `cases`, prepared with labels) and their means, on
    whole volumes, keyed by `report.score_columns`.

    Sliding window with the config's roi, overlap and batch; the model is left in training mode.
    Under DDP each process passes (and scores) its own share of the cases, and all get every score.
    """
    raw, _ = _validation_tables(model, cases, config, device, spec, dist or ddp.DistInfo(device=device))
    return _scores(raw, spec)


def choose_postprocessing(model: nn.Module, cases: list[PreparedCase], config: TrainConfig, device: torch.device,
                          spec: DataSpec, dist: ddp.DistInfo | None = None) -> dict[str, Any]:
    """nnU-Net's postprocessing choice, made on the validation `cases`: keep only the largest foreground
    component (`keep_largest_foreground`) if that raises the validation score (the regions' mean
    Dice when the dataset has regions, else the classes'), else nothing. The record `predict` follows:

        {"largest_component": bool, "cases": n, "score": raw, "score_largest_component": kept}

    Without validation cases nothing is chosen (`largest_component` False, scores None). Under DDP
    every rank passes its share and gets the same record.
    """
    raw, kept = _validation_tables(model, cases, config, device, spec, dist or ddp.DistInfo(device=device),
                                   largest_component=True)
    if not raw:
        return {"largest_component": False, "cases": 0, "score": None, "score_largest_component": None}
    before, after = _score(_scores(raw, spec), spec), _score(_scores(kept, spec), spec)
    better = math.isfinite(after) and (not math.isfinite(before) or after > before)
    return {"largest_component": bool(better), "cases": len(raw), "score": before, "score_largest_component": after}


def _prepare(data_dir: str | os.PathLike, run: RunFolder, config: TrainConfig, resume: bool,
             dist: ddp.DistInfo) -> tuple[TrainConfig, DataSpec, Plan | None, Preprocessor, list[PreparedCase],
                                          list[PreparedCase]]:
    """Check every input, then load and prepare every case; nothing is written here.

    Returns the configuration with the model's inputs and outputs set from the dataset and what it
    leaves open from the dataset's plan (`train.plan`), and the plan."""
    spec = ddp.main_first(lambda: preflight.dataset_spec(data_dir, run if resume else None), dist)
    config = replace(config, model=replace(config.model.for_data(spec.registered), modalities=spec.num_channels,
                                           out_channels=spec.num_outputs))
    if not resume:
        ddp.main_first(run.open_new, dist)
    train_cases, val_cases = ddp.main_first(lambda: preflight.dataset_splits(data_dir, config), dist)
    loaded = [load_case(c, spec) for c in train_cases]
    preflight.check_label_values(data_dir, spec, [d["label"] for d in loaded])
    fp = fingerprint(loaded, spec, config.orientation, config.seed)
    config, plan = preflight.planned(config, fp, dist.device.type)
    if resume:
        ddp.main_first(lambda: run.check_resumable(config), dist)
    preflight.check_runnable(config, dist.world_size)
    if plan is not None and dist.is_main and not resume:
        print(f"plan of {data_dir} for {config.model.name}/{config.model.size} on the {plan.device}:\n"
              f"{plan.describe()}")
    if resume and run.has_preprocess():
        preprocessor = run.read_preprocess()
    else:
        preprocessor = Preprocessor.from_dict(ddp.main_first(
            lambda: fit_preprocessor(loaded, spec.channels, config.target_spacing, config.seed,
                                     config.orientation).to_dict(), dist))
    train_prepared = [preprocessor.prepare(d["images"], d["geometry"], d["label"], c.id)
                      for c, d in zip(train_cases, loaded, strict=True)]
    val_prepared = []
    for c in split_by_rank(val_cases, dist) if dist.distributed else val_cases:
        d = load_case(c, spec)
        val_prepared.append(preprocessor.prepare(d["images"], d["geometry"], d["label"], c.id))
    return config, spec, plan, preprocessor, train_prepared, val_prepared


def prepare_training(data_dir: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig,
                     resume: bool = False, dist: ddp.DistInfo | None = None) -> PreparedRun:
    """Check every input and load every case, then create the run folder (nothing is written before)."""
    dist = dist or ddp.DistInfo(device=ddp.resolve_device(config.device))
    run = RunFolder(out_dir)
    config, spec, plan, preprocessor, train_cases, val_cases = _prepare(data_dir, run, config, resume, dist)
    if dist.is_main:  # every check passed: now the folder may be written (a resume keeps its files)
        run.create()
        run.clear_postprocess()  # a resumed run may save better weights: its choice is made again at the end
        if not run.has_config():
            run.write_config(config)
        if not run.has_preprocess():
            run.write_preprocess(preprocessor)
        if not run.has_spec():
            run.write_spec(spec)
        if plan is not None and not run.has_plan():
            run.write_plan(plan.to_dict())
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
    task = SegmentationTask(config, model, sampler, val_cases, dist.device, spec)
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
        choice = _postprocess(prepared)
        if dist.is_main:
            status = "finished" if engine.finished else "stopped at the time budget"
            print(f"training {status}: step {engine.step}/{prepared.settings.total_steps}, best val Dice "
                  f"{engine.best:.4f}; {choice}; run folder {prepared.run.path}")
        return prepared.run.path
    finally:
        ddp.cleanup(dist)


def _postprocess(prepared: PreparedRun) -> str:
    """Choose the postprocessing with the best weights on the validation cases, record it in the run
    (`RunFolder.write_postprocess`) and say what was chosen."""
    task, run, dist = prepared.task, prepared.run, prepared.dist
    # Rank 0 reads the best weights (the run folder need only be on its machine) and hands them to every
    # rank, which scores its share of the validation cases.
    state = ddp.main_first(lambda: run.load_model("cpu")[0].state_dict() if run.has_weights() else None, dist)
    if state is None:
        return "no postprocessing (no validation)"
    model = build_model(task.config.model.name, task.config.model)
    model.load_state_dict(state)
    model.to(dist.device)
    record = choose_postprocessing(model, task.val_cases, task.config, dist.device, task.spec, dist)
    if dist.is_main:
        run.write_postprocess(record)
    if record["score"] is None:
        return "no postprocessing (no validation cases)"
    what = "keeps the largest foreground component" if record["largest_component"] else "no postprocessing"
    return (f"{what} (validation {record['score']:.4f}, with the largest component only "
            f"{record['score_largest_component']:.4f})")


def train_from_cli(args: argparse.Namespace) -> None:
    """`crossmodalnet train DATA --out RUN [...]`: resolve the configuration, then `train`."""
    train(args.data, args.out, preflight.resolve_config(args), resume=args.resume)
