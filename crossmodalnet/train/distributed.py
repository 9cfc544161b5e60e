"""DistributedDataParallel plumbing: process group set-up from torchrun's environment, rank helpers.

`torchrun --nproc_per_node=N -m crossmodalnet train ...` sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; `init_distributed` reads them and joins the group (NCCL on CUDA,
gloo on CPU). Without them (WORLD_SIZE unset or 1) everything here is a no-op and the trainer
runs as a single process. Rank 0 ("main") validates, logs and writes the run folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from crossmodalnet.errors import CrossModalNetError

__all__ = [
    "DistInfo",
    "resolve_device",
    "init_distributed",
    "cleanup",
    "barrier",
    "all_reduce_sum",
    "main_first",
    "all_gather_objects",
    "split_by_rank",
    "gather_lists",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank in [0, world_size), local_rank on its node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:LOCAL_RANK if CUDA is available, else cpu; "cuda" -> cuda:LOCAL_RANK."""
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CrossModalNetError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)
    if name != "cpu":
        raise CrossModalNetError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def init_distributed(device: str | None = "auto") -> DistInfo:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1; else single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup(info: DistInfo) -> None:
    """Leave the process group (safe to call when none was joined)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a small tensor over processes (in place on a copy); identity for one process."""
    if not info.distributed:
        return values
    # NCCL reduces on the GPU only; gloo on the CPU.
    reduced = values.to(info.device) if info.device.type == "cuda" else values.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def main_first(fn: Callable[[], T], info: DistInfo) -> T:
    """Run `fn` on rank 0 only and hand its result (or its CrossModalNetError) to every rank.

    Checks of the run folder and checkpoint loading happen once, and a refusal on rank 0 stops
    every process with the same message instead of leaving the others waiting at a collective.
    """
    if not info.distributed:
        return fn()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if info.is_main:
        try:
            payload[0] = ("ok", fn())
        except CrossModalNetError as exc:
            payload[0] = ("error", str(exc))
        except Exception as exc:  # any other failure must still release the waiting ranks
            payload[0], error = ("crash", f"rank 0 failed: {type(exc).__name__}: {exc}"), exc
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if error is not None:
        raise error
    if status == "error":
        raise CrossModalNetError(value)
    if status == "crash":
        raise RuntimeError(value)
    return value


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's `obj` (picklable, small: e.g. per-case scores), in rank order; [obj] for one process."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def split_by_rank(items: Sequence[Any], dist: DistInfo) -> list[Any]:
    """This rank's share of `items` (every world_size-th, from its rank)."""
    return list(items[dist.rank::dist.world_size])


def gather_lists(mine: list[Any], dist: DistInfo) -> list[Any]:
    """The concatenation of every process's list (rank order); `mine` for one process."""
    if not dist.distributed:
        return mine
    return [item for part in all_gather_objects(mine, dist) for item in part]
