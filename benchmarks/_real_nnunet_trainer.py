"""nnU-Net v2's trainer stopped by a wall-clock budget, for `benchmarks/real.py` (imports nnunetv2 only).

Copied by real.py into the nnU-Net venv as `nnunetv2/training/nnUNetTrainer/nnUNetTrainer_WallBudget.py`:
nnU-Net finds a trainer (`-tr nnUNetTrainer_WallBudget`) by class name in that package.

What changes against `nnUNetTrainer` (2.8.1), and nothing else:
- short epochs, so that epoch-level bookkeeping (the EMA pseudo-Dice that picks
  `checkpoint_best.pth`, `on_epoch_end`) happens often: the first has `NNUNET_WALL_ITERATIONS`
  training iterations (default 25), each later one as many as take about a minute at the last
  epoch's speed (1 to that number); 5 validation iterations each;
- `run_training` is nnU-Net's loop with a clock: training starts after `on_train_start` (data
  loaders, unpacking) and stops at the first iteration past `NNUNET_WALL_MINUTES`; the epoch then
  ends as usual (its validation iterations, `on_epoch_end`: best checkpoint), then
  `on_train_end` (`checkpoint_final.pth`);
- the poly learning-rate schedule spans the epochs the budget allows: after every epoch the
  number of epochs is re-estimated from the last epoch's seconds per iteration and validation
  (`num_epochs` and the scheduler's `max_steps`), so that the rate decays towards 0 at the budget
  as it does at nnU-Net's 1000th epoch;
- `perform_actual_validation` (nnU-Net's full-volume prediction of the fold after training) is
  skipped: real.py predicts the fold's cases with `nnUNetv2_predict` and `checkpoint_best.pth`;
- `wall_budget.json` in the fold's output folder: iterations, epochs, seconds (`s_per_iteration`:
  training iterations only, waiting for the batch included; `wall_s_per_iteration`: the training
  wall time, validation iterations and epoch bookkeeping included, per iteration), best epoch.
"""

import json
import os
from os.path import join
from time import monotonic

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

_CUDA = torch.device("cuda")  # nnUNetTrainer's default device
EPOCH_S = 60.0  # target seconds of training iterations per epoch, once the speed is known


class nnUNetTrainer_WallBudget(nnUNetTrainer):
    """nnUNetTrainer that trains for `NNUNET_WALL_MINUTES` of wall time (see the module docstring)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = _CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_s = 60.0 * float(os.environ.get("NNUNET_WALL_MINUTES", "20"))
        self.num_iterations_per_epoch = int(os.environ.get("NNUNET_WALL_ITERATIONS", "25"))
        self.max_iterations_per_epoch = self.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = 5
        self.num_epochs = 100_000  # an upper bound; the budget stops training
        self.iterations_done = 0
        self.iteration_s = 0.0  # seconds in training iterations (next batch + train_step), validation excluded
        self.best_epoch = -1

    def _fit_schedule(self, elapsed: float, s_per_iteration: float, validation_s: float) -> None:
        """Epochs of about `EPOCH_S` seconds (at most the initial iterations per epoch) at the last
        epoch's speed, as many as the rest of the budget allows; the poly schedule spans them."""
        done = self.current_epoch  # on_epoch_end has counted the epoch already
        self.num_iterations_per_epoch = max(1, min(self.max_iterations_per_epoch,
                                                   round(EPOCH_S / max(s_per_iteration, 1e-3))))
        epoch_s = self.num_iterations_per_epoch * s_per_iteration + validation_s
        self.num_epochs = done + max(1, int(max(self.budget_s - elapsed, 0.0) / epoch_s))
        self.lr_scheduler.max_steps = self.num_epochs + 1  # poly reaches 0 one epoch after the last

    def on_epoch_end(self):
        best_before = self._best_ema
        super().on_epoch_end()
        if self._best_ema is not None and self._best_ema != best_before:
            self.best_epoch = self.current_epoch - 1  # on_epoch_end has counted the epoch already

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("nnUNetTrainer_WallBudget: full validation skipped (predicted by real.py)")

    def run_training(self):
        self.on_train_start()
        start = monotonic()
        over = False
        for _ in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs, epoch_s = [], 0.0
            for _ in range(self.num_iterations_per_epoch):
                t = monotonic()
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                epoch_s += monotonic() - t
                if monotonic() - start > self.budget_s:
                    over = True
                    break
            self.iterations_done += len(train_outputs)
            self.iteration_s += epoch_s
            self.on_train_epoch_end(train_outputs)
            t = monotonic()
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = []
                for _ in range(self.num_val_iterations_per_epoch):
                    val_outputs.append(self.validation_step(next(self.dataloader_val)))
                self.on_validation_epoch_end(val_outputs)
            validation_s = monotonic() - t
            self.on_epoch_end()
            elapsed = monotonic() - start
            if over or elapsed > self.budget_s:
                break
            self._fit_schedule(elapsed, epoch_s / len(train_outputs), validation_s)
        train_s = monotonic() - start
        self.on_train_end()
        record = {"budget_s": self.budget_s, "train_s": train_s, "iterations": self.iterations_done,
                  "epochs": self.current_epoch, "iterations_per_epoch": self.num_iterations_per_epoch,
                  "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                  "s_per_iteration": self.iteration_s / max(self.iterations_done, 1),
                  "wall_s_per_iteration": train_s / max(self.iterations_done, 1), "best_epoch": self.best_epoch,
                  "best_ema_pseudo_dice": None if self._best_ema is None else float(self._best_ema),
                  "batch_size": self.batch_size, "patch_size": list(self.configuration_manager.patch_size),
                  "spacing": list(self.configuration_manager.spacing), "torch_threads": torch.get_num_threads()}
        with open(join(self.output_folder, "wall_budget.json"), "w") as fh:
            json.dump(record, fh, indent=2)
