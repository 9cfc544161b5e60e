"""Run by `torchrun --nproc_per_node=2` from test_ddp.py (not a test itself).

Trains a tiny model with DDP through the same `prepare_training` that `crossmodalnet train` uses, then
chooses the postprocessing as `train` does, and saves each rank's final weights and its first batch, so
the test can compare the processes.
Usage: ddp_worker.py DATA OUT [MODEL]
"""

import sys
from pathlib import Path

import torch

from crossmodalnet.config import ModelConfig, TrainConfig
from crossmodalnet.runs import save_weights
from crossmodalnet.train import distributed as ddp
from crossmodalnet.train.trainer import _postprocess, prepare_training


def main() -> None:
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    name = sys.argv[3] if len(sys.argv) > 3 else "unet"
    config = TrainConfig(model=ModelConfig.from_size(name, "tiny"), epochs=1, iterations_per_epoch=3,
                         # CrossModalNet's tiny size needs 32³ (its coarsest grid is 1/16 of the patch)
                         batch_size=2, patch_size=(32, 32, 32) if name == "crossmodalnet" else (16, 16, 16),
                         lr=1e-2, warmup_epochs=0, val_every=1,
                         sw_batch_size=1, device="cpu")
    info = ddp.init_distributed("cpu")
    try:
        training = prepare_training(data, out / "run", config, dist=info)
        torch.save(training.task.batches.batch(0)["image"], out / f"batch{info.rank}.pt")
        training.fit()
        print(_postprocess(training), flush=True)  # every rank scores its share; rank 0 writes the choice
        save_weights(training.task.model, out / f"rank{info.rank}.safetensors")
        (out / f"world{info.rank}.txt").write_text(f"{info.world_size} {torch.distributed.get_backend()}")
    finally:
        ddp.cleanup(info)


if __name__ == "__main__":
    main()
