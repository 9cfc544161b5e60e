"""The demo end to end on a very small setting (tiny U-Net, 6 phantoms of 32³, 2 steps):
synthesis -> training -> prediction on the input grids -> evaluation report."""

import json

import nibabel as nib
import numpy as np
import pytest

from crossmodalnet.data.dataset import load_dataset
from crossmodalnet.demo import DEMO, _prepare_folder, run_demo
from crossmodalnet.errors import CrossModalNetError


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = run_demo(out, seed=0, model="unet", model_size="tiny", cases=6, size=32, epochs=1,
                       iterations_per_epoch=2, patch_size=(32, 32, 32), val_every=1)
    printed = capsys.readouterr().out
    assert 0.0 <= summary["mean_dice"] <= 1.0 and summary["times"]["total_s"] > 0
    assert "demo finished" in printed and str(out / "evaluation") in printed and "| **mean** |" in printed
    assert json.loads((out / "evaluation" / "summary.json").read_text())["mean_dice"] == summary["mean_dice"]
    assert (out / "run" / "model.safetensors").is_file() and (out / "run" / "curves.png").is_file()
    for case in load_dataset(out / "data")["test"]:
        pred, image = nib.load(out / "predictions" / f"{case.id}.nii.gz"), nib.load(case.images[0].path)
        assert pred.shape == image.shape and np.allclose(pred.affine, image.affine, atol=1e-5)
    # A second demo into the same folder starts clean; its parts are removed first.
    _prepare_folder(out, DEMO, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ["demo.json"]


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(CrossModalNetError, match="not a demo folder"):
        run_demo(tmp_path, model="unet", model_size="tiny")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_demo_defaults_are_the_cpu_default_model():
    assert (DEMO.model, DEMO.model_size) == ("crossmodalnet", "small")
    cfg = DEMO.train_config(seed=3)
    assert cfg.seed == 3 and cfg.max_minutes == DEMO.minutes and cfg.patch_size == DEMO.patch_size
