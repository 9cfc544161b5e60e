"""DistributedDataParallel on the CPU: two gloo processes under torchrun keep identical weights,
draw different patches, and only rank 0 writes the run folder."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crossmodalnet.config import ModelConfig
from crossmodalnet.models.registry import build_model
from crossmodalnet.runs import RunFolder

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


# CrossModalNet too: its missing-modality placeholders get no gradient in a step without a missing
# modality, which stops DDP at the second step unless it looks for unused parameters.
@pytest.mark.parametrize("name", ["unet", "crossmodalnet"])
def test_two_cpu_processes_keep_identical_weights(ellipsoid_data, tmp_path, name):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_worker.py"), str(ellipsoid_data), str(tmp_path), name]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "world0.txt").read_text() == (tmp_path / "world1.txt").read_text() == "2 gloo"
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    for key in w0:
        assert torch.equal(w0[key], w1[key]), f"{key} differs between ranks"
    initial = build_model(name, ModelConfig.from_size(name, "tiny")).state_dict()
    assert any(not torch.equal(initial[k], w0[k]) for k in w0)  # the steps did train
    saved = load_file(tmp_path / "run" / "last" / "model.safetensors")
    assert all(torch.equal(saved[k], w0[k]) for k in w0)
    # Per-rank seeding: the two processes trained on different patches.
    assert not torch.equal(torch.load(tmp_path / "batch0.pt"), torch.load(tmp_path / "batch1.pt"))
    state = RunFolder(tmp_path / "run").load_checkpoint()
    assert state["step"] == 3 and len(state["history"]) == 1
    assert (tmp_path / "run" / "model.safetensors").is_file()  # rank 0 validated and saved the best
    # The postprocessing: each rank scored its share of the one validation case (rank 1 none) with rank 0's
    # best weights, and both got the same gathered record, whose score is the validation's.
    record = RunFolder(tmp_path / "run").read_postprocess()
    with open(tmp_path / "run" / "metrics.csv") as f:
        validated = float(next(csv.DictReader(f))["val_dice_mean"])
    assert record["cases"] == 1 and record["score"] == pytest.approx(validated, abs=1e-6)
    said = [line for line in result.stdout.splitlines() if "(validation " in line]
    assert len(said) == 2 and said[0] == said[1]
