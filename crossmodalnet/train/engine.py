"""The one optimisation loop of the package: training, adaptation, the audit's experiment and the
benchmark's probe all run through `Engine`.

    engine = Engine(task, settings, run=RunFolder("runs/cmn"), dist=info)
    engine.fit()          # steps until settings.total_steps (or the time budget), then returns

A `Task` says what one step computes (`loss`: a batch in, the loss and its logged terms out), what
its optimizers are and how validation scores; the engine owns everything else, once: the batches
(drawn in background worker processes by a `DataLoader` over the task's sampler, which is a pure
function of (seed, rank, step)), the seeds of the model's own randomness, DDP, mixed precision,
gradient clipping, the learning-rate schedule, the time budget, the progress bar, validation
(split across DDP ranks), the best weights, the resume checkpoint `last/` and the logs.

Resume is bit-identical on the CPU: the patches of a step and every random draw of the model are
seeded from (seed, rank, step), and all other state (optimizers, schedulers, gradient scaler, the
task's own state, RNGs, logs) is checkpointed at each epoch end.

Why not Lightning Fabric or Accelerate: both would own the process group, the device placement and
the checkpoint format; our checkpoint must load with `torch.load(weights_only=True)` (no pickle)
and stay bit-identical on resume, and the loop is small enough that a dependency would add more
than it removes.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.runs import RunFolder
from crossmodalnet.train import distributed as ddp
from crossmodalnet.train.batches import BatchSource, batch_iterator, resolve_workers, step_seed

__all__ = [
    "BatchSource", "Task", "LoopSettings", "Engine", "PreparedRun", "batch_iterator", "param_groups", "step_seed",
    "training_autocast", "resolve_workers",
]

_FORMAT = 2  # of state.pt
# Parameters of 2+ dimensions that are still offsets, not weights: position biases and embeddings.
_NO_DECAY_NAMES = ("position", "pos_embed", "bias.table", "placeholder", "token")
_PACE_STEPS = 10  # steps of a session before its pace re-fits the schedule to a time budget


def param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: weights with `weight_decay`, and without it norms, biases, position
    biases, learned placeholders and any other 1-D parameter (as nanoGPT and timm do: decaying a
    scale or an offset towards zero only fights the normalisation)."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            exempt = p.ndim <= 1 or any(k in name for k in _NO_DECAY_NAMES)
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def training_autocast(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a gradient scaler is needed) for a training `precision`.

    On CUDA "auto" is bfloat16 where supported (float32's range: no scaler), else float16 with a
    scaler; "bf16", "fp16" force one; "fp32" trains in float32. On the CPU only "bf16" asks for mixed
    precision (bfloat16 autocast: fast where the CPU computes bfloat16 natively, AMX or AVX-512 BF16);
    every other precision trains in float32 there (CPU float16 kernels are slow and need a scaler).
    """
    if device.type == "cpu" and precision == "bf16":
        return torch.bfloat16, False
    if device.type != "cuda" or precision == "fp32":
        return None, False
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "fp16" or (precision == "auto" and not bf16):
        return torch.float16, True
    return torch.bfloat16, False


class Task:
    """What one optimisation loop computes; `Engine` runs it. Subclasses set the attributes and
    override `loss` (and, where they have them, the hooks)."""

    model: nn.Module  # the network whose weights are the run's weights
    extra: nn.Module | None = None  # other trained modules (discriminators): saved in the resume state
    optimizers: list[torch.optim.Optimizer]
    batches: BatchSource
    columns: tuple[str, ...] = ("loss",)  # logged per step after step, epoch, lr; `loss` first
    metric_columns: tuple[str, ...] | None = None  # metrics.csv columns (None: every key of the epoch rows)
    best_column: str = "best_score"  # name of the best validation score so far in metrics.csv
    select_best: bool = True  # model.safetensors: best validation score (False: the latest weights)

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of every optimizer's learning rate at `step` (LambdaLR)."""
        return 1.0

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of one step and its logged values (keys of `columns`, floats or 0-d tensors)."""
        raise NotImplementedError

    def after_step(self, logs: dict[str, float]) -> None:
        """Called with the step's logged values, averaged over DDP processes (e.g. loss balancing)."""

    def validate(self, dist: ddp.DistInfo) -> dict[str, float] | None:
        """Validation scores with the selection score under "score", or None if there is nothing to
        validate. Every rank calls it (split the cases by rank); every rank must return the same."""
        return None

    def on_validation(self, scores: dict[str, float], run: RunFolder, epoch: int, step: int) -> None:
        """Rank 0, after a validation (e.g. keep a diagnostic checkpoint)."""

    def figure(self, history: list[dict[str, Any]], steps: list[dict[str, Any]]) -> Any | None:
        """A matplotlib Figure of the logs (saved as curves.png), or None."""
        return None

    def summary_line(self, row: dict[str, Any], epochs: int) -> str | None:
        """The line printed after a validation, or None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class LoopSettings:
    """How long and how the loop runs. `val_every` in epochs (0: never; the last epoch always validates
    when it is > 0)."""

    total_steps: int
    iterations_per_epoch: int
    seed: int = 0
    max_minutes: float | None = None
    grad_clip: float = 0.0
    precision: str = "auto"
    num_workers: int | None = 0  # None: `resolve_workers`
    val_every: int = 0
    desc: str = "train"


class Engine:
    """Runs a `Task` (see the module docstring). `run`: where checkpoints and logs go (None: in memory
    only, e.g. an experiment); `resume_state`: a state from `RunFolder.load_checkpoint`."""

    def __init__(self, task: Task, settings: LoopSettings, run: RunFolder | None = None,
                 dist: ddp.DistInfo | None = None, model_config: Any = None,
                 resume_state: dict[str, Any] | None = None) -> None:
        self.task, self.settings, self.run = task, settings, run
        self.dist = dist or ddp.DistInfo(device=next(task.model.parameters()).device)
        self.device = self.dist.device
        self.model_config = model_config
        self.model: nn.Module = task.model
        if self.dist.distributed:
            # A model whose parameters may sit out a step says so; without the search for unused
            # parameters DDP stops at the second step.
            self.model = DistributedDataParallel(
                task.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=getattr(task.model, "may_leave_parameters_unused", False))
        self.autocast_dtype, scaled = training_autocast(settings.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=scaled)
        self.horizon = settings.total_steps  # the schedule's length (a time budget's: `_budget_horizon`)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(
            o, lambda step: task.lr_factor(step, self.horizon)) for o in task.optimizers]
        self.step, self.best, self.elapsed = 0, -math.inf, 0.0
        self.history: list[dict[str, Any]] = []
        self.step_log: list[list[float]] = []
        self.skipped = 0  # fp16 steps the gradient scaler skipped (non-finite gradients)
        self._start, self._elapsed0, self._step0 = time.monotonic(), 0.0, 0
        if resume_state is not None:
            self.load_state_dict(resume_state)

    @property
    def step_columns(self) -> tuple[str, ...]:
        return ("step", "epoch", "lr", *self.task.columns)

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "format": _FORMAT, "step": self.step, "epoch": self.step // s.iterations_per_epoch, "best": self.best,
            "elapsed_s": self.elapsed, "history": self.history, "skipped": self.skipped,
            "step_log": torch.tensor(self.step_log, dtype=torch.float64).reshape(-1, len(self.step_columns)),
            "optimizers": [o.state_dict() for o in self.task.optimizers],
            "schedulers": [x.state_dict() for x in self.schedulers], "scaler": self.scaler.state_dict(),
            "extra": self.task.extra.state_dict() if self.task.extra is not None else {},
            "task": self.task.state_dict(),
            "rng": {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != _FORMAT:
            where = self.run.path if self.run is not None else "the checkpoint"
            raise CrossModalNetError(f"{where}: the resume checkpoint was written by an older version of "
                                     "crossmodalnet and cannot be resumed; train into a new folder")
        self.step, self.best, self.elapsed = int(state["step"]), float(state["best"]), float(state["elapsed_s"])
        self.history, self.skipped = list(state["history"]), int(state["skipped"])
        self.step_log = state["step_log"].tolist()
        for o, saved in zip(self.task.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(saved)
        for x, saved in zip(self.schedulers, state["schedulers"], strict=True):
            x.load_state_dict(saved)
        self.scaler.load_state_dict(state["scaler"])
        if self.task.extra is not None:
            self.task.extra.load_state_dict(state["extra"])
        self.task.load_state_dict(state["task"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(_numpy_state(state["rng"]["numpy"]))
        torch.set_rng_state(state["rng"]["torch"])

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> Engine:
        """Step until `total_steps` or the time budget, validating and checkpointing at epoch ends."""
        s, main = self.settings, self.dist.is_main
        self._start, self._elapsed0, self._step0 = time.monotonic(), self.elapsed, self.step
        bar = tqdm(total=s.total_steps, initial=self.step, disable=not main or s.desc == "", unit="step",
                   dynamic_ncols=True, desc=s.desc)
        batches = batch_iterator(self.task.batches, self.step, s.total_steps,
                                 resolve_workers(s.num_workers, self.device))
        try:
            stop = False
            while self.step < s.total_steps and not stop:
                stop = self.train_step(next(batches))
                bar.set_postfix(loss=f"{self.step_log[-1][3]:.4f}", lr=f"{self.step_log[-1][2]:.2e}", refresh=False)
                bar.update(1)
                if self.step % s.iterations_per_epoch == 0 or stop or self.step >= s.total_steps:
                    self.end_epoch(bar, stop)
        finally:
            del batches  # shuts the loader's workers down
            bar.close()
        ddp.barrier(self.dist)
        return self

    @property
    def finished(self) -> bool:
        return self.step >= self.settings.total_steps

    def train_step(self, batch: dict[str, torch.Tensor]) -> bool:
        """One optimizer step on `batch`; returns True when the time budget says stop after it."""
        s, task = self.settings, self.task
        torch.manual_seed(step_seed(s.seed, self.dist.rank, self.step))
        self.model.train()
        if task.extra is not None:
            task.extra.train()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            total, logs = task.loss(self.model, batch, self.step)
        spent = time.monotonic() - self._start
        over = s.max_minutes is not None and spent > 60 * s.max_minutes
        values = [float(logs[c]) if c in logs else math.nan for c in task.columns]
        # One small all-reduce gives every process the same logs, NaN verdict, time spent and stop flag.
        finite = bool(torch.isfinite(total.detach()))
        vec = ddp.all_reduce_sum(torch.tensor([*values, 0.0 if finite else 1.0, spent, float(over)],
                                              dtype=torch.float64), self.dist)
        nonfinite = bool(vec[-3] > 0)
        if nonfinite and not self.scaler.is_enabled():  # under fp16 the scaler skips such a step instead
            raise self._fault(f"loss is {float(total.detach())}")
        for o in task.optimizers:
            o.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        params = [p for m in (task.model, task.extra) if m is not None for p in m.parameters()]
        if s.grad_clip > 0:
            for o in task.optimizers:
                self.scaler.unscale_(o)
            norm = nn.utils.clip_grad_norm_(params, s.grad_clip)
            if not self.scaler.is_enabled() and not torch.isfinite(norm):
                raise self._fault(f"gradient norm is {float(norm)}")
        lr = task.optimizers[0].param_groups[0]["lr"]
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        for o in task.optimizers:
            self.scaler.step(o)
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale:
            self.skipped += 1
        n = self.dist.world_size
        if s.max_minutes is not None:  # every rank the same horizon: the mean time spent
            self.horizon = self._budget_horizon(float(vec[-2]) / n, 60 * s.max_minutes)
        for x in self.schedulers:
            x.step()
        logged = {c: float(v) / n for c, v in zip(task.columns, vec[: len(task.columns)], strict=True)}
        task.after_step(logged)
        epoch = self.step // s.iterations_per_epoch + 1
        self.step_log.append([self.step, epoch, lr, *logged.values()])
        self.step += 1
        self.elapsed = self._elapsed0 + time.monotonic() - self._start
        return bool(vec[-1] > 0)

    def _budget_horizon(self, spent: float, budget_s: float) -> int:
        """The schedule's length that ends it when `budget_s` seconds of this session stop training (not at
        a step never reached): the steps done plus those the time left allows at this session's pace
        (validations included), at most `total_steps`; kept until `_PACE_STEPS` steps set a pace."""
        done = self.step + 1 - self._step0
        if done < _PACE_STEPS or spent <= 0:
            return self.horizon
        ahead = int(max(budget_s - spent, 0.0) * done / spent)
        return max(self.step + 2, min(self.settings.total_steps, self.step + 1 + ahead))

    def _fault(self, what: str) -> CrossModalNetError:
        where = self.run.path if self.run is not None else self.settings.desc
        last = self.run.find_checkpoint() if self.run is not None and self.dist.is_main else None
        if not self.dist.is_main:
            kept = "rank 0 keeps the last good checkpoint"
        elif last is not None and self.history:
            kept = f"the last good checkpoint {last} (epoch {self.history[-1]['epoch']}) is kept"
        else:
            kept = "no checkpoint had been written yet"
        return CrossModalNetError(f"{where}: stopped at step {self.step}: {what}; {kept}. "
                                  "Lower the learning rate or check the data.")

    def end_epoch(self, bar: tqdm | None = None, stop: bool = False) -> dict[str, Any]:
        """Average the epoch's steps, validate when due, save the weights, `last/` and the logs."""
        s, task, main = self.settings, self.task, self.dist.is_main
        epoch = math.ceil(self.step / s.iterations_per_epoch)
        rows = np.array([r[3:] for r in self.step_log if int(r[1]) == epoch], dtype=np.float64).reshape(
            -1, len(task.columns))
        counts = np.isfinite(rows).sum(0)
        means = np.where(counts > 0, np.nansum(rows, 0) / np.maximum(counts, 1), math.nan)  # NaN: term not in use
        row: dict[str, Any] = {"epoch": epoch, "step": self.step, "lr": self.step_log[-1][2],
                               **{c: float(m) for c, m in zip(task.columns, means, strict=True)}}
        due = s.val_every > 0 and (epoch % s.val_every == 0 or self.step >= s.total_steps or stop)
        scores = task.validate(self.dist) if due else None
        if scores is not None:
            row.update({k: v for k, v in scores.items() if k != "score"})
            score = scores.get("score", math.nan)
            if main and self.run is not None:
                task.on_validation(scores, self.run, epoch, self.step)
            # Without a finite score every validation counts as the best, so that a run always leaves
            # weights to predict with.
            improved = not math.isfinite(score) or score > self.best or math.isinf(self.best)
            if math.isfinite(score):
                self.best = max(self.best, score)
            if main and self.run is not None and task.select_best and (improved or not self.run.has_weights()):
                self.run.save_weights(task.model, self.model_config, epoch=epoch, step=self.step, val_score=score)
        row[task.best_column], row["time_s"] = self.best, self.elapsed
        self.history = [r for r in self.history if r["epoch"] != epoch] + [row]
        if main and self.run is not None:
            if not task.select_best:
                self.run.save_weights(task.model, self.model_config, epoch=epoch, step=self.step,
                                      selection="latest weights")
            self.run.save_checkpoint(task.model, self.state_dict(), self.model_config)
            columns = task.metric_columns or tuple(dict.fromkeys(k for r in self.history for k in r))
            self.run.write_csv(RunFolder.METRICS, columns, self.history)
            steps = self.step_rows()
            self.run.write_csv(RunFolder.STEPS, self.step_columns, steps)
            if scores is not None:  # the plot costs a second on a busy CPU: only with new scores
                figure = task.figure(self.history, steps)
                if figure is not None:
                    self.run.save_figure(RunFolder.CURVES, figure)
                line = task.summary_line(row, math.ceil(s.total_steps / s.iterations_per_epoch))
                if line and bar is not None:
                    bar.write(line)
        ddp.barrier(self.dist)
        return row

    def step_rows(self) -> list[dict[str, Any]]:
        return [dict(zip(self.step_columns, r, strict=True)) for r in self.step_log]


@dataclass
class PreparedRun:
    """A loop ready to start: every input checked and loaded, the run folder created."""

    task: Task
    settings: LoopSettings
    run: RunFolder
    dist: ddp.DistInfo
    state: dict[str, Any] | None  # the resume checkpoint's, or None for a fresh start
    model_config: Any = None  # written into the weights' metadata

    def fit(self) -> Engine:
        """Run the loop; returns the engine at its last step."""
        return Engine(self.task, self.settings, run=self.run, dist=self.dist, model_config=self.model_config,
                      resume_state=self.state).fit()


def _numpy_state(saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """numpy's global RNG state as plain values (weights_only-loadable), or back from them."""
    if saved is None:
        state = np.random.get_state(legacy=False)
        return {**state, "state": {"key": torch.from_numpy(state["state"]["key"].astype(np.int64)),
                                   "pos": int(state["state"]["pos"])}}
    return {**saved, "state": {"key": saved["state"]["key"].numpy().astype(np.uint32), "pos": saved["state"]["pos"]}}
