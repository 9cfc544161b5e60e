"""Faults: a run killed with SIGKILL (or stopped mid-epoch) and resumed ends with the same weights
as an uninterrupted run; the `last/` swap leaves a complete checkpoint whatever moment it dies."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fast_config
from safetensors.torch import load_file
from torch import nn

from crossmodalnet import runs as ckpt
from crossmodalnet.config import dump_yaml
from crossmodalnet.runs import RunFolder
from crossmodalnet.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
CONFIG = fast_config(epochs=3, iterations_per_epoch=2, val_every=3)


@pytest.fixture(scope="module")
def straight(ellipsoid_data, tmp_path_factory):
    """The uninterrupted run everything is compared with."""
    return train(ellipsoid_data, tmp_path_factory.mktemp("straight") / "run", CONFIG)


def _assert_same_run(a: Path, b: Path, same_validations: bool = True) -> None:
    """Same final weights and per-step log; with the same validations also same best and history."""
    for name in ("last/model.safetensors", "model.safetensors") if same_validations else ("last/model.safetensors",):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}: {key} differs"
    sa, sb = RunFolder(a).load_checkpoint(), RunFolder(b).load_checkpoint()
    assert sa["step"] == sb["step"] == CONFIG.epochs * CONFIG.iterations_per_epoch
    assert torch.equal(sa["step_log"], sb["step_log"])  # same losses, lr, weights at every step
    skip = {"time_s"} if same_validations else {"time_s", "best_val_dice"}
    strip = [{k: v for k, v in r.items() if k not in skip} for r in sa["history"]]
    assert strip == [{k: v for k, v in r.items() if k not in skip} for r in sb["history"]]
    assert len((b / "metrics.csv").read_text().splitlines()) == CONFIG.epochs + 1  # no duplicated rows


def test_sigkill_then_resume_gives_the_same_weights(ellipsoid_data, straight, tmp_path):
    run = tmp_path / "run"
    cfg_file = dump_yaml(CONFIG, tmp_path / "cfg.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossmodalnet", "train", str(ellipsoid_data), "--out", str(run), "--config",
         str(cfg_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not (run / "last" / "manifest.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # right after the first checkpoint, mid-way through the run
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = RunFolder(run).load_checkpoint()["step"]
    assert 0 < killed_at < CONFIG.epochs * CONFIG.iterations_per_epoch
    train(ellipsoid_data, run, CONFIG, resume=True)
    _assert_same_run(straight, run)


def test_stop_mid_epoch_then_resume_gives_the_same_weights(ellipsoid_data, straight, tmp_path):
    run = tmp_path / "run"
    # A time budget that is over after the first step: stops at step 1 of 2 in epoch 1.
    train(ellipsoid_data, run, fast_config(epochs=3, iterations_per_epoch=2, val_every=3, max_minutes=1e-9))
    assert RunFolder(run).load_checkpoint()["step"] == 1
    stopped = RunFolder(run).read_postprocess()  # chosen for the weights of the stop
    assert stopped["cases"] >= 1
    seen = {}
    original = RunFolder.write_postprocess

    def spy(self, record):
        seen["at_write"] = self.read_postprocess()  # what a resumed run had until its own choice
        return original(self, record)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RunFolder, "write_postprocess", spy)
        train(ellipsoid_data, run, CONFIG, resume=True)  # max_minutes may differ on resume
    # The resume forgot the stop's choice (its best weights may change) and chose again at its end.
    assert seen["at_write"] == {"largest_component": False}
    assert RunFolder(run).read_postprocess()["cases"] == stopped["cases"]
    # The stop validated once more (mid-epoch 1), which may pick another best: weights and logs agree.
    _assert_same_run(straight, run, same_validations=False)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", range(6))
def test_checkpoint_swap_leaves_a_complete_checkpoint(tmp_path, monkeypatch, crash_at):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    RunFolder(tmp_path).save_checkpoint(model, {"step": 1, "epoch": 1})
    old_weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    calls = {"n": 0}
    real_replace, real_rmtree = os.replace, ckpt.shutil.rmtree

    def dying(fn):
        def wrapped(*args, **kwargs):
            # Operations of the save: 3 atomic file writes, 2 folder renames, 1 removal.
            if calls["n"] == crash_at:
                raise _Crash
            calls["n"] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(os, "replace", dying(real_replace))
    monkeypatch.setattr(ckpt.shutil, "rmtree", dying(real_rmtree))
    with pytest.raises(_Crash):
        RunFolder(tmp_path).save_checkpoint(model, {"step": 2, "epoch": 2})
    monkeypatch.undo()
    last = RunFolder(tmp_path).find_checkpoint()
    assert last == tmp_path / "last"
    state = RunFolder(tmp_path).load_checkpoint(restored := nn.Linear(3, 2))
    expected = old_weights if state["step"] == 1 else model.state_dict()
    assert state["step"] in (1, 2)
    for key, value in restored.state_dict().items():
        assert torch.equal(value, expected[key])
    assert not (tmp_path / "last.tmp").exists() and not (tmp_path / "last.old").exists()
