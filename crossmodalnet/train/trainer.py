"""Training: patches in, a run folder out, on one CPU or many GPUs (DDP through torchrun).

    train("data/phantoms", "runs/cmn", TrainConfig())      # -> Path("runs/cmn")

One optimizer step draws a batch of patches (`train.data.PatchSampler`, (B, 1, *patch_size)
per modality), runs `model(ct, mr)` -> logits (B, 8, *patch_size) (or a deep-supervision list),
and minimises Dice + CE (optionally balanced by Def. 4). Every `val_every` epochs rank 0
predicts the validation volumes whole (sliding window, Gaussian blending) and scores mean Dice
over the 7 structures; the best weights become `model.safetensors`. Every epoch ends with a
complete resume checkpoint `last/` (see `train.checkpoint`).

Reproducibility: each step's patches and the model's own randomness are seeded from
(seed, rank, step), and all state (optimizer, scheduler, scaler, loss balancing, RNGs, logs) is
checkpointed, so on the CPU a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from crossmodalnet.config import (
    TrainConfig,
    dump_yaml,
)
from crossmodalnet.data.dataset import load_case
from crossmodalnet.data.labels import NAMES, NUM_CLASSES
from crossmodalnet.data.preprocess import PreparedCase, Preprocessor, fit_preprocessor
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.train import checkpoint as ckpt
from crossmodalnet.train import distributed as ddp
from crossmodalnet.train import preflight
from crossmodalnet.train.data import PatchSampler, step_seed
from crossmodalnet.train.losses import AdaptiveLossBalancing, DiceCETerms
from crossmodalnet.train.report import METRIC_COLUMNS, STEP_COLUMNS, format_summary, plot_curves, write_csv

__all__ = ["Trainer", "train", "train_from_cli", "validation_dice"]


class Trainer:
    """One training run. `Trainer(...).fit()` trains and returns the run folder.

    Construction checks the run folder and the dataset, loads and preprocesses the data, builds
    the model and restores `last/` when resuming; nothing trains before `fit`.
    `dist`: from `distributed.init_distributed` (default: one process on `config.device`).
    """

    def __init__(self, data_dir: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig,
                 resume: bool = False, dist: ddp.DistInfo | None = None) -> None:
        self.dist = dist or ddp.DistInfo(device=ddp.resolve_device(config.device))
        preflight.check_config(config, self.dist.world_size)
        self.config, self.out, self.device = config, Path(out_dir), self.dist.device
        opened = ddp.main_first(lambda: preflight.open_run(self.out, config, resume), self.dist)
        train_cases, val_cases = ddp.main_first(lambda: preflight.dataset_splits(data_dir, config), self.dist)
        loaded = [load_case(c) for c in train_cases]
        stats = opened["preprocess"] or ddp.main_first(
            lambda: fit_preprocessor(loaded, config.target_spacing, config.seed).to_dict(), self.dist)
        self.preprocessor = Preprocessor.from_dict(stats)
        if self.dist.is_main:  # a resumed run keeps its own files (max_minutes etc. may differ)
            self.out.mkdir(parents=True, exist_ok=True)
            if not (self.out / ckpt.CONFIG).is_file():
                dump_yaml(config, self.out / ckpt.CONFIG)
            if not (self.out / ckpt.PREPROCESS).is_file():
                self.preprocessor.save(self.out / ckpt.PREPROCESS)
        prepare = self.preprocessor.prepare
        train_prepared = [prepare(d["ct"], d["mr"], d["geometry"], d["label"], c.id)
                          for c, d in zip(train_cases, loaded, strict=True)]
        self.val_cases: list[PreparedCase] = []
        if self.dist.is_main:  # only rank 0 validates
            for c in val_cases:
                d = load_case(c)
                self.val_cases.append(prepare(d["ct"], d["mr"], d["geometry"], d["label"], c.id))
        self.sampler = PatchSampler(train_prepared, config, rank=self.dist.rank,
                                    batch_size=config.batch_size // self.dist.world_size,
                                    spacing=self.preprocessor.target_spacing)
        self._build(opened["state"])

    # --- set-up ------------------------------------------------------------------------------
    def _build(self, state: dict[str, Any] | None) -> None:
        from crossmodalnet.models.registry import build_model

        cfg = self.config
        torch.manual_seed(cfg.seed)  # same initial weights for a given seed
        self.raw_model = build_model(cfg.model.name, cfg.model)
        if state is not None and self.dist.is_main:  # DDP broadcasts rank 0's weights to the rest
            ckpt.load_weights(self.raw_model, self.out / ckpt.LAST / "model.safetensors")
        self.raw_model.to(self.device)
        self.model: nn.Module = self.raw_model
        if self.dist.distributed:
            # A model whose parameters may sit out a step says so; without the search for unused
            # parameters DDP stops at the second step.
            self.model = DistributedDataParallel(
                self.raw_model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=getattr(self.raw_model, "may_leave_parameters_unused", False))
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        self.optimizer = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.total_steps = cfg.epochs * cfg.iterations_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.loss_fn = DiceCETerms()
        self.balancer = AdaptiveLossBalancing(DiceCETerms.names, cfg.balancing_alpha)
        self.step, self.best, self.elapsed = 0, -math.inf, 0.0
        self.history: list[dict[str, Any]] = []
        self.step_log: list[list[float]] = []
        self.acc = dict.fromkeys(("n", "loss", "loss_dice", "loss_ce", "weight_dice", "weight_ce"), 0.0)
        if state is not None:
            self._restore(state)

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 0 at the last step (or constant)."""
        warm = self.config.warmup_epochs * self.config.iterations_per_epoch
        if step < warm:
            return (step + 1) / warm
        if self.config.scheduler == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, self.total_steps - warm))))

    def _state(self) -> dict[str, Any]:
        return {
            "format": 1, "step": self.step, "epoch": self.step // self.config.iterations_per_epoch,
            "best": self.best, "elapsed_s": self.elapsed, "history": self.history,
            "step_log": torch.tensor(self.step_log, dtype=torch.float64).reshape(-1, len(STEP_COLUMNS)),
            "acc": dict(self.acc), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "balancing": self.balancer.state_dict(),
            "rng": {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()},
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.step, self.best, self.elapsed = int(state["step"]), float(state["best"]), float(state["elapsed_s"])
        self.history = list(state["history"])
        self.step_log = state["step_log"].tolist()
        self.acc = dict(state["acc"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.balancer.load_state_dict(state["balancing"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(_numpy_state(state["rng"]["numpy"]))
        torch.set_rng_state(state["rng"]["torch"])

    # --- training ----------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train until `epochs` (or `max_minutes`), validating and checkpointing; returns the run folder."""
        cfg, main = self.config, self.dist.is_main
        self._session_start = time.monotonic()
        self._session_elapsed0 = self.elapsed
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not main, unit="step", dynamic_ncols=True,
                   desc=f"train {cfg.model.name}/{cfg.model.size}")
        try:
            stop = False
            while self.step < self.total_steps and not stop:
                stop = self._train_step()
                row = self.step_log[-1]
                bar.set_postfix(loss=f"{row[3]:.4f}", lr=f"{row[2]:.2e}", refresh=False)
                bar.update(1)
                at_epoch_end = self.step % cfg.iterations_per_epoch == 0
                if at_epoch_end or stop:
                    self._end_epoch(bar, stop)
        finally:
            bar.close()
        if main:
            status = "stopped at the time budget" if self.step < self.total_steps else "finished"
            print(f"training {status}: step {self.step}/{self.total_steps}, best val Dice "
                  f"{self.best:.4f}; run folder {self.out}")
        ddp.barrier(self.dist)
        return self.out

    def _train_step(self) -> bool:
        """One optimizer step; returns True when the time budget says stop after it."""
        cfg, n = self.config, self.dist.world_size
        batch = self.sampler.batch(self.step)
        torch.manual_seed(step_seed(cfg.seed, self.dist.rank, self.step))
        self.model.train()
        ct, mr, label = (batch[k].to(self.device, non_blocking=True) for k in ("ct", "mr", "label"))
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            out = self.model(ct, mr)
        terms = self.loss_fn(out, label)
        if cfg.loss_balancing:
            total, weights = self.balancer(terms, update=False)
        else:
            total, weights = terms["dice"] + terms["ce"], {"dice": 1.0, "ce": 1.0}
        over = cfg.max_minutes is not None and time.monotonic() - self._session_start > 60 * cfg.max_minutes
        # One small all-reduce gives every process the same losses, NaN verdict and stop flag.
        vec = torch.tensor([float(terms["dice"].detach()), float(terms["ce"].detach()), float(total.detach()),
                            0.0 if torch.isfinite(total) else 1.0, float(over)], dtype=torch.float64)
        vec = ddp.all_reduce_sum(vec, self.dist)
        if vec[3] > 0:
            raise self._fault(f"loss is {float(total.detach())}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
            if not self.amp and not torch.isfinite(norm):  # under AMP the scaler skips such steps
                raise self._fault(f"gradient norm is {float(norm)}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        dice, ce, loss = (float(v) / n for v in vec[:3])
        if cfg.loss_balancing:
            self.balancer.update({"dice": dice, "ce": ce})
        epoch = self.step // cfg.iterations_per_epoch + 1
        self.step_log.append([self.step, epoch, lr, loss, dice, ce, weights["dice"], weights["ce"]])
        for key, value in (("loss", loss), ("loss_dice", dice), ("loss_ce", ce),
                           ("weight_dice", weights["dice"]), ("weight_ce", weights["ce"]), ("n", 1.0)):
            self.acc[key] += value
        self.step += 1
        self.elapsed = self._session_elapsed0 + time.monotonic() - self._session_start
        return bool(vec[4] > 0)

    def _fault(self, what: str) -> CrossModalNetError:
        last = ckpt.find_last(self.out) if self.dist.is_main else None
        if not self.dist.is_main:
            kept = "rank 0 keeps the last good checkpoint"
        elif last is not None and self.history:
            kept = f"the last good checkpoint {last} (epoch {self.history[-1]['epoch']}) is kept"
        else:
            kept = "no checkpoint had been written yet"
        return CrossModalNetError(f"{self.out}: training stopped at step {self.step}: {what}; {kept}. "
                                  "Lower the learning rate or check the data.")

    def _end_epoch(self, bar: tqdm, stop: bool = False) -> None:
        """Log the epoch; on rank 0 validate when due (or stopping), save best and last/, rewrite logs."""
        cfg = self.config
        epoch = math.ceil(self.step / cfg.iterations_per_epoch)
        complete = self.step % cfg.iterations_per_epoch == 0
        if self.dist.is_main:
            count = max(self.acc["n"], 1.0)
            row: dict[str, Any] = {"epoch": epoch, "step": self.step, "lr": self.step_log[-1][2],
                                   **{k: v / count for k, v in self.acc.items() if k != "n"}}
            if epoch % cfg.val_every == 0 or self.step >= self.total_steps or stop:
                scores = self.validate()
                row["val_dice_mean"] = scores["mean"]
                row.update({f"val_dice_{name}": scores[name] for name in NAMES})
                # Without validation cases (or Dice) every validation point counts as the best, so
                # that a run always leaves weights to predict with.
                if not self.val_cases or scores["mean"] > self.best or not (self.out / ckpt.BEST).is_file():
                    self.best = max(self.best, scores["mean"]) if math.isfinite(scores["mean"]) else self.best
                    ckpt.save_weights(self.raw_model, self.out / ckpt.BEST, cfg.model, epoch=epoch,
                                      step=self.step, val_dice=scores["mean"])
            row["best_val_dice"], row["time_s"] = self.best, self.elapsed
            self.history = [r for r in self.history if r["epoch"] != epoch] + [row]
        if complete:
            self.acc = dict.fromkeys(self.acc, 0.0)
        if self.dist.is_main:
            ckpt.save_last(self.out, self.raw_model, self._state(), cfg.model)
            write_csv(self.out / ckpt.METRICS, METRIC_COLUMNS, self.history)
            steps = [dict(zip(STEP_COLUMNS, r, strict=True)) for r in self.step_log]
            write_csv(self.out / ckpt.STEPS, STEP_COLUMNS, steps)
            if "val_dice_mean" in row:  # the plot costs a second on a busy CPU: only with new Dice
                plot_curves(self.out / ckpt.CURVES, self.history, steps, cfg.loss_balancing)
                bar.write(format_summary(row, cfg.epochs))
        ddp.barrier(self.dist)

    def validate(self) -> dict[str, float]:
        """Dice per structure (mean over validation cases) and their mean, on whole volumes."""
        return validation_dice(self.raw_model, self.val_cases, self.config, self.device)


@torch.no_grad()
def validation_dice(model: nn.Module, cases: list[PreparedCase], config: TrainConfig,
                    device: torch.device) -> dict[str, float]:
    """Dice per structure (mean over `cases`, prepared with labels) and their mean, on whole volumes.

    Sliding window with the config's roi, overlap and batch; the model is left in training mode.
    """
    from crossmodalnet.infer import sliding_window_probabilities

    if not cases:
        return {"mean": math.nan, **dict.fromkeys(NAMES, math.nan)}
    # MONAI's functional Dice, not DiceMetric: the cumulative metric all-gathers across DDP
    # processes when it aggregates, and only rank 0 validates (the others would never join).
    scores = []
    model.eval()
    for case in cases:
        ct, mr = (torch.from_numpy(x)[None, None] for x in (case.ct, case.mr))
        probs = sliding_window_probabilities(model, ct, mr, config.patch_size, config.sw_overlap,
                                             config.sw_batch_size, device)
        pred = one_hot(probs.argmax(1, keepdim=True), NUM_CLASSES)
        ref = one_hot(torch.from_numpy(case.label.astype(np.int64))[None, None], NUM_CLASSES)
        scores.append(compute_dice(pred, ref, include_background=False, ignore_empty=True)[0])
    model.train()
    # (cases, 7) with NaN where a structure is absent from the reference; nanmean skips those.
    per = torch.nanmean(torch.stack(scores).float(), dim=0)
    return {"mean": float(torch.nanmean(per)), **{n: float(v) for n, v in zip(NAMES, per, strict=True)}}


def train(data_dir: str | os.PathLike, out_dir: str | os.PathLike, config: TrainConfig,
          resume: bool = False) -> Path:
    """Train `config` on the dataset folder `data_dir` into run folder `out_dir` (DDP under torchrun)."""
    info = ddp.init_distributed(config.device)
    try:
        return Trainer(data_dir, out_dir, config, resume=resume, dist=info).fit()
    finally:
        ddp.cleanup(info)


def train_from_cli(args: argparse.Namespace) -> None:
    """`crossmodalnet train DATA --out RUN [...]`: resolve the configuration, then `train`."""
    train(args.data, args.out, preflight.resolve_config(args), resume=args.resume)


def _numpy_state(saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """numpy's global RNG state as plain values (weights_only-loadable), or back from them."""
    if saved is None:
        state = np.random.get_state(legacy=False)
        return {**state, "state": {"key": torch.from_numpy(state["state"]["key"].astype(np.int64)),
                                   "pos": int(state["state"]["pos"])}}
    return {**saved, "state": {"key": saved["state"]["key"].numpy().astype(np.uint32), "pos": saved["state"]["pos"]}}
