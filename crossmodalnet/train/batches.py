"""The batches of the training loop: a step's batch is a pure function of the step, drawn in this
thread or by background worker processes (`Engine` consumes them; see `crossmodalnet.train.engine`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["BatchSource", "step_seed", "resolve_workers", "batch_iterator"]


class BatchSource(Protocol):
    """Anything whose batch of a step is a pure function of the step (and its own seed and rank)."""

    def batch(self, step: int) -> dict[str, torch.Tensor]: ...


def step_seed(seed: int, rank: int, step: int) -> int:
    """A torch seed for the model's own randomness in one step (dropout, drop-path, modality dropout)."""
    return int(np.random.SeedSequence([seed, rank, step, 2**31]).generate_state(1)[0])


def resolve_workers(num_workers: int | None, device: torch.device) -> int:
    """The number of patch-sampling processes: as configured, or (None) 0 on a CPU and 2 on a GPU."""
    if num_workers is not None:
        return num_workers
    return 2 if device.type == "cuda" else 0


class _Steps(Dataset):
    """Step i of the loop -> the batch of step `start + i` (for a DataLoader with batch_size=None)."""

    def __init__(self, source: BatchSource, start: int, stop: int) -> None:
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.source.batch(self.start + i)


def batch_iterator(source: BatchSource, start: int, stop: int, num_workers: int) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of steps start..stop-1 in order, drawn by `num_workers` background processes
    (0: in this thread). Order and content do not depend on the number of workers."""
    loader = DataLoader(_Steps(source, start, stop), batch_size=None, shuffle=False, num_workers=num_workers,
                        prefetch_factor=2 if num_workers else None, persistent_workers=False)
    return iter(loader)
