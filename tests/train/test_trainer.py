"""The trainer end to end on tiny data: run folder contents, every registered model, loss
balancing in the logs, dataset and config errors before training, NaN stop, CLI errors."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import fast_config, make_dataset, write_case

from crossmodalnet import runs as ckpt
from crossmodalnet.cli import main
from crossmodalnet.config import (
    ModelConfig,
    TrainConfig,
    config_differences,
    dump_yaml,
    load_config_file,
    load_yaml,
    to_dict,
)
from crossmodalnet.data.dataset import write_dataset_json
from crossmodalnet.data.io import Geometry
from crossmodalnet.data.labels import NAMES
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models.registry import MODEL_NAMES, build_model
from crossmodalnet.runs import RunFolder
from crossmodalnet.train.losses import DiceCETerms
from crossmodalnet.train.trainer import train

REPO = Path(__file__).resolve().parents[2]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_run_folder_contents(tiny_dataset, tmp_path):
    cfg = fast_config(val_every=2)
    run = train(tiny_dataset, tmp_path / "run", cfg)  # the shared phantom fixture
    saved = load_yaml(TrainConfig, run / "config.yaml")
    # What the configuration left open, the plan filled (the phantom's own spacing and axis order).
    assert [d.split(":")[0] for d in config_differences(cfg, saved)] == ["orientation", "target_spacing"]
    assert saved.orientation == "canonical" and saved.target_spacing == (4.5, 4.5, 4.5)
    assert (run / "preprocess.json").is_file() and (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    model = ckpt.load_weights(build_model("unet", cfg.model), run / "model.safetensors")
    assert ckpt.read_model_config(run / "model.safetensors") == cfg.model
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = torch.load(run / "last" / "state.pt", weights_only=True)  # no pickled objects
    assert state["step"] == 4 and state["epoch"] == 2
    assert {"optimizers", "schedulers", "scaler", "rng", "task"} <= set(state)
    assert json.loads((run / "last" / "manifest.json").read_text())["step"] == 4
    metrics = _rows(run / "metrics.csv")
    assert [r["epoch"] for r in metrics] == ["1", "2"]
    assert metrics[0]["val_dice_mean"] == ""  # val_every=2: epoch 1 not validated
    assert 0.0 <= float(metrics[1]["val_dice_mean"]) <= 1.0
    assert all(f"val_dice_{n}" in metrics[1] for n in NAMES)
    steps = _rows(run / "steps.csv")
    assert [int(r["step"]) for r in steps] == [0, 1, 2, 3]
    assert float(steps[0]["lr"]) == pytest.approx(cfg.lr / 2)  # warm-up: step 1 of 2
    assert not (run / "last.tmp").exists() and not (run / "last.old").exists()
    # The postprocessing was chosen after training with the best weights on the validation cases.
    record = json.loads((run / "postprocess.json").read_text())
    assert record["cases"] == 1 and record["score"] == pytest.approx(float(metrics[1]["val_dice_mean"]), abs=1e-6)
    assert record["largest_component"] == (record["score_largest_component"] > record["score"])
    assert RunFolder(run).read_postprocess() == record


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registered_model_trains_two_steps(name, train_only_data, tmp_path):
    if name == "crossmodalnet":
        pytest.importorskip("crossmodalnet.models.crossmodalnet")
    # The deepest tiny models downsample by 16 (32 for Swin-UNETR) and instance norm needs > 1
    # voxel at the bottleneck: 32^3 patches; for Swin-UNETR one axis of 64 (the check before training
    # needs one axis at the model's smallest edge).
    patch = (64, 32, 32) if name == "swinunetr" else (32, 32, 32)
    model = ModelConfig.from_size(name, "tiny", img_size=32)
    cfg = fast_config(model, epochs=1, iterations_per_epoch=2, patch_size=patch, batch_size=1, val_fraction=0.0)
    run = train(train_only_data, tmp_path / name, cfg)
    state = RunFolder(run).load_checkpoint()
    assert state["step"] == 2
    first = build_model(name, cfg.model)
    trained = ckpt.load_weights(build_model(name, cfg.model), run / "last" / "model.safetensors")
    changed = [not torch.equal(a, b) for a, b in zip(first.state_dict().values(), trained.state_dict().values(),
                                                     strict=True)]
    assert any(changed)  # the optimizer moved the weights
    assert math.isfinite(float(_rows(run / "metrics.csv")[0]["loss"]))


def test_loss_balancing_weights_are_logged_per_step(ellipsoid_data, tmp_path):
    cfg = fast_config(epochs=1, iterations_per_epoch=3, loss_balancing=True, balancing_alpha=2.0)
    steps = _rows(train(ellipsoid_data, tmp_path / "run", cfg) / "steps.csv")
    assert float(steps[0]["weight_dice"]) == pytest.approx(0.5)
    for prev, row in zip(steps, steps[1:], strict=False):
        e_d, e_c = math.exp(-2.0 * float(prev["loss_dice"])), math.exp(-2.0 * float(prev["loss_ce"]))
        assert float(row["weight_dice"]) == pytest.approx(e_d / (e_d + e_c), rel=1e-4)
        assert float(row["weight_dice"]) + float(row["weight_ce"]) == pytest.approx(1.0, abs=1e-5)


def test_max_minutes_stops_after_one_step_validates_and_saves(ellipsoid_data, tmp_path):
    run = train(ellipsoid_data, tmp_path / "run", fast_config(max_minutes=1e-9))
    assert RunFolder(run).load_checkpoint()["step"] == 1
    assert (run / "model.safetensors").is_file()
    assert _rows(run / "metrics.csv")[0]["val_dice_mean"] != ""


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(ellipsoid_data, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = DiceCETerms.forward

    def poisoned(self, logits, target):
        terms = original(self, logits, target)
        calls["n"] += 1
        if calls["n"] == 3:  # first step of epoch 2
            terms["ce"] = terms["ce"] * float("nan")
        return terms

    monkeypatch.setattr(DiceCETerms, "forward", poisoned)
    with pytest.raises(CrossModalNetError, match=r"step 2: loss is nan.*last good checkpoint") as err:
        train(ellipsoid_data, tmp_path / "run", fast_config(epochs=3))
    assert "\n" not in str(err.value)
    state = RunFolder(tmp_path / "run").load_checkpoint()
    assert state["step"] == 2 and len(state["history"]) == 1
    model = ckpt.load_weights(build_model("unet", fast_config().model), tmp_path / "run" / "last" / "model.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_missing_file_is_named_before_training(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=2, n_val=0, n_test=0)
    (data / "images" / "case_001_mr.nii.gz").unlink()
    with pytest.raises(CrossModalNetError, match=r"dataset.json: listed file 'images/case_001_mr.nii.gz'"):
        train(data, tmp_path / "run", fast_config())
    assert not (tmp_path / "run").exists()  # nothing was written


def test_ct_mr_grid_mismatch_is_named_before_training(tmp_path):
    root = tmp_path / "data"
    good = write_case(root, "good", seed=1)
    bad = write_case(root, "bad", seed=2, mr_geometry=Geometry.from_spacing((20, 20, 20), (1.0, 1.0, 1.5)))
    write_dataset_json(root, {"training": [good, bad]}, name="mismatch", spec=MMWHS)
    with pytest.raises(CrossModalNetError, match=r"bad_mr.nii.gz: affine differs from .*bad_ct.nii.gz"):
        train(root, tmp_path / "run", fast_config())
    assert not (tmp_path / "run").exists()


def test_non_empty_folder_and_changed_config_are_refused(ellipsoid_data, tmp_path):
    cfg = fast_config(epochs=1, iterations_per_epoch=1)
    run = train(ellipsoid_data, tmp_path / "run", cfg)
    with pytest.raises(CrossModalNetError, match="not empty; pass --resume"):
        train(ellipsoid_data, run, cfg)
    other = fast_config(epochs=1, iterations_per_epoch=1, lr=0.5, patch_size=(8, 8, 8))
    with pytest.raises(CrossModalNetError, match=r"--resume refused.*lr: 0.001 -> 0.5; .*patch_size"):
        train(ellipsoid_data, run, other, resume=True)
    with pytest.raises(CrossModalNetError, match="nothing to resume"):
        train(ellipsoid_data, tmp_path / "empty", cfg, resume=True)


def test_cli_errors_exit_2_with_one_line(ellipsoid_data, tmp_path, capsys):
    cfg_file = dump_yaml(fast_config(epochs=1, iterations_per_epoch=1), tmp_path / "cfg.yaml")
    args = ["train", str(ellipsoid_data), "--out", str(tmp_path / "run"), "--config", str(cfg_file)]
    assert main(args) == 0
    capsys.readouterr()
    # Resuming with a flag that changes the run is refused, naming the key.
    assert main([*args, "--resume", "--epochs", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "epochs: 1 -> 3" in err and "\n" not in err
    # Resuming a finished run with its own settings is fine (and does nothing).
    assert main(["train", str(ellipsoid_data), "--out", str(tmp_path / "run"), "--resume"]) == 0
    capsys.readouterr()
    for bad in (["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")],
                ["train", str(ellipsoid_data), "--out", str(tmp_path / "r3"), "--model", "resnet"],
                ["train", str(ellipsoid_data), "--out", str(tmp_path / "r4"), "--config", str(tmp_path / "no.yaml")]):
        assert main(bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_bad_config_values_are_named(tmp_path, capsys):
    # A run's settings are refused by the schema, one line naming the file and the key, before any folder.
    for change, key in (({"batch_size": 0}, "batch_size"), ({"optimizer": "sgd"}, "optimizer"),
                        ({"patch_size": [16, 16]}, "patch_size")):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({**to_dict(fast_config()), **change}))
        assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path}: {key}") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_paper_recipe_loads():
    cfg = load_config_file(REPO / "configs" / "paper.yaml")
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs) == ("adam", 1e-5, 32, 100)
    assert cfg.model == ModelConfig.from_size("crossmodalnet", "base")


def test_resolve_config_keeps_model_settings_when_size_changes(tmp_path):
    from argparse import Namespace

    from crossmodalnet.train.preflight import resolve_config

    base = TrainConfig(model=ModelConfig.from_size("crossmodalnet", "small", modality_dropout=0.3))
    path = dump_yaml(base, tmp_path / "c.yaml")
    args = Namespace(config=path, resume=False, out=tmp_path / "run", model=None, size="tiny", epochs=7,
                     max_minutes=None, seed=None, device=None)
    cfg = resolve_config(args)
    assert cfg.model == ModelConfig.from_size("crossmodalnet", "tiny", modality_dropout=0.3)
    assert cfg.epochs == 7 and cfg.lr == base.lr
    default = resolve_config(Namespace(config=None, resume=False, out=tmp_path, model=None, size=None,
                                       epochs=None, max_minutes=None, seed=None, device=None))
    assert default.model == ModelConfig.from_size("crossmodalnet", "small")
    shutil.rmtree(tmp_path)
