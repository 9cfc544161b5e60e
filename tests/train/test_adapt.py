"""`crossmodalnet adapt` (JADA): end to end on tiny phantoms, without target labels, resume, errors.

A tiny CrossModalNet is trained for two steps on the 32^3 source phantoms of `tiny_dataset`; the
target domain is 4 phantoms of the `target` rendering whose label files are deleted before
adapting (and whose label paths nibabel and the label readers refuse to open).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from pydantic import ValidationError

import crossmodalnet.data.dataset as dataset_module
import crossmodalnet.data.io as io_module
from crossmodalnet.cli import main
from crossmodalnet.config import AdaptConfig, ModelConfig, TrainConfig, dump_yaml, parse_terms, replace, to_dict
from crossmodalnet.data.dataset import load_dataset, write_dataset_json
from crossmodalnet.data.phantom import synthesize
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.infer import predict
from crossmodalnet.models.registry import build_model
from crossmodalnet.runs import RunFolder
from crossmodalnet.train import adapt as adapt_module
from crossmodalnet.train.adapt import COLUMNS, adapt, forward_with_features, prepare_adaptation
from crossmodalnet.train.domain import random_transfer
from crossmodalnet.train.trainer import train

ADAPT_CONFIG, BEST_SOURCE, SUMMARY = RunFolder.ADAPT_CONFIG, RunFolder.BEST_SOURCE, RunFolder.ADAPT_SUMMARY
STEP_COLUMNS = ("step", "epoch", "lr", *COLUMNS)


def _fast(**overrides) -> AdaptConfig:
    base = dict(epochs=2, iterations_per_epoch=2, batch_size=1, val_every=1, device="cpu", hidden=16, num_workers=0)
    base.update(overrides)
    return AdaptConfig(**base)


@pytest.fixture(scope="module")
def source_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = ModelConfig.from_size("crossmodalnet", "tiny", deep_supervision=True)
    config = TrainConfig(model=model, epochs=1, iterations_per_epoch=2, batch_size=1, patch_size=(32, 32, 32),
                         val_every=1, warmup_epochs=0, device="cpu", sw_batch_size=1)
    return train(tiny_dataset, tmp_path_factory.mktemp("source_run") / "run", config)


@pytest.fixture(scope="module")
def target_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 target-domain phantoms (2 training, 1 validation, 1 test) with every label file deleted."""
    root = synthesize(tmp_path_factory.mktemp("target"), cases=4, size=32, seed=1, domain="target", workers=1)
    for case in [c for split in ("training", "validation", "test") for c in load_dataset(root)[split]]:
        case.label.unlink()
    return root


@pytest.fixture
def no_target_labels(target_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a target label file fails loudly (beyond the files being gone)."""
    labels = [str(target_data / d) for d in ("labelsTr", "labelsTs")]

    def forbidden(path) -> bool:
        return any(str(Path(path).resolve()).startswith(str(Path(d).resolve())) for d in labels)

    real_nib_load, real_read_label = nib.load, io_module.read_label

    def nib_load(path, *a, **k):
        assert not forbidden(path), f"opened target label {path}"
        return real_nib_load(path, *a, **k)

    def read_label(path, *a, **k):
        assert not forbidden(path), f"read target label {path}"
        return real_read_label(path, *a, **k)

    monkeypatch.setattr(nib, "load", nib_load)
    monkeypatch.setattr(io_module, "read_label", read_label)
    monkeypatch.setattr(dataset_module, "read_label", read_label)


def test_adapt_end_to_end_all_terms_without_target_labels(source_run, tiny_dataset, target_data, no_target_labels,
                                                          tmp_path):
    # Threshold 0: every structure enters the topology penalty, even from a barely trained model.
    out = adapt(source_run, tiny_dataset, target_data, tmp_path / "jada", _fast(topology_threshold=0.0))
    for name in ("config.yaml", "preprocess.json", "model.safetensors", BEST_SOURCE, ADAPT_CONFIG, SUMMARY,
                 "steps.csv", "metrics.csv", "curves.png", "last/manifest.json"):
        assert (out / name).is_file(), name
    assert (out / "config.yaml").read_text() == (source_run / "config.yaml").read_text()
    rows = list(csv.DictReader((out / "steps.csv").open()))
    assert len(rows) == 4 and tuple(rows[0]) == STEP_COLUMNS
    for row in rows:
        for key in ("loss_dice", "loss_ce", "loss_marginal", "loss_conditional", "loss_topology",
                    "disc_acc_marginal", "disc_acc_conditional"):
            assert math.isfinite(float(row[key])), key
        weights = [float(row[f"weight_{n}"]) for n in ("dice", "ce", "marginal", "conditional", "topology")]
        assert sum(weights) == pytest.approx(1.0, abs=1e-4)
    assert max(float(r["loss_topology"]) for r in rows) > 0
    lambdas = [float(r["grl_lambda"]) for r in rows]
    assert lambdas[0] == 0.0 and lambdas == sorted(lambdas) and lambdas[-1] > 0.9
    assert yaml.safe_load((out / "adapt.yaml").read_text())["adapt"]["terms"] == ["marginal", "conditional",
                                                                                   "topology"]
    # The adapted weights differ from the source weights, and predict loads the folder unchanged.
    src = safetensors.torch.load_file(str(source_run / "model.safetensors"))
    new = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(src[k], new[k]) for k in src)
    test_case = load_dataset(target_data, check_files=False)["test"][0]
    ct, mr = (ref.path for ref in test_case.images)
    written = predict(out, tmp_path / "pred.nii.gz", images={"CT": ct, "MR": mr}, device="cpu")
    assert nib.load(str(written[0])).shape == nib.load(str(ct)).shape


@pytest.mark.parametrize("terms", ["marginal", "topology", "none"])
def test_single_terms_run(source_run, tiny_dataset, target_data, no_target_labels, tmp_path, terms):
    out = adapt(source_run, tiny_dataset, target_data, tmp_path / terms,
                _fast(terms=parse_terms(terms), epochs=1, val_every=0))
    row = next(csv.DictReader((out / "steps.csv").open()))
    others = {"marginal", "conditional", "topology"} - {terms}
    assert all(row[f"loss_{o}"] == "" for o in others)
    if terms == "none":  # the ablation: source fine-tuning with the adaptation's recipe, nothing else
        assert parse_terms("none") == parse_terms([]) == ()
        assert float(row["weight_dice"]) + float(row["weight_ce"]) == pytest.approx(1.0, abs=1e-4)
    else:
        assert row[f"loss_{terms}"] != ""


def test_resume_equals_uninterrupted(source_run, tiny_dataset, target_data, tmp_path):
    whole = adapt(source_run, tiny_dataset, target_data, tmp_path / "whole", _fast(val_every=0))
    # max_minutes is a runtime setting: a tiny budget stops after the first step (mid-epoch), then resume.
    part = adapt(source_run, tiny_dataset, target_data, tmp_path / "part", _fast(val_every=0, max_minutes=1e-6))
    assert len(list(csv.DictReader((part / "steps.csv").open()))) == 1
    assert yaml.safe_load((part / SUMMARY).read_text())["status"] == "stopped"
    adapt(source_run, tiny_dataset, target_data, part, _fast(val_every=0), resume=True)
    a = safetensors.torch.load_file(str(whole / "model.safetensors"))
    b = safetensors.torch.load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    da = torch.load(whole / "last/state.pt", weights_only=True)["extra"]
    db = torch.load(part / "last/state.pt", weights_only=True)["extra"]
    assert all(torch.equal(da[k], db[k]) for k in da)
    assert (whole / "steps.csv").read_text() == (part / "steps.csv").read_text()


def test_sigkill_then_resume_gives_the_same_weights(source_run, tiny_dataset, target_data, tmp_path):
    """As for `train`: a process killed with SIGKILL right after its first checkpoint resumes to the
    same weights, discriminators and per-step log as an uninterrupted run (the killed one drew its
    patches in a background worker, the others in the loop: the batches are the same)."""
    config = _fast(epochs=3, val_every=0)
    whole = adapt(source_run, tiny_dataset, target_data, tmp_path / "whole", config)
    out = tmp_path / "killed"
    cfg_file = dump_yaml(replace(config, num_workers=1), tmp_path / "adapt.yaml")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossmodalnet", "adapt", str(source_run), "--source", str(tiny_dataset), "--target",
         str(target_data), "--out", str(out), "--config", str(cfg_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 180
    while not (out / "last" / "manifest.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the adaptation finished before it could be killed"
    killed_at = RunFolder(out).load_checkpoint()["step"]
    assert 0 < killed_at < 6
    assert not (out / SUMMARY).exists()
    adapt(source_run, tiny_dataset, target_data, out, config, resume=True)  # num_workers is a runtime setting
    a = safetensors.torch.load_file(str(whole / "model.safetensors"))
    b = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = RunFolder(whole).load_checkpoint(), RunFolder(out).load_checkpoint()
    assert all(torch.equal(sa["extra"][k], sb["extra"][k]) for k in sa["extra"])
    torch.testing.assert_close(sa["step_log"], sb["step_log"], rtol=0, atol=0, equal_nan=True)  # NaN: unused terms
    assert (whole / "steps.csv").read_text() == (out / "steps.csv").read_text()


def test_resume_after_a_kill_mid_epoch(source_run, tiny_dataset, target_data, tmp_path, monkeypatch):
    """A process that dies mid-epoch (no clean-up, nothing saved) resumes from the last epoch's checkpoint."""
    whole = adapt(source_run, tiny_dataset, target_data, tmp_path / "whole", _fast(val_every=0))
    real_loss = adapt_module.AdaptationTask.loss

    def dying(self, model, batch, step):
        if step == 3:  # second step of the second epoch: killed before it is done
            raise KeyboardInterrupt
        return real_loss(self, model, batch, step)

    monkeypatch.setattr(adapt_module.AdaptationTask, "loss", dying)
    with pytest.raises(KeyboardInterrupt):
        adapt(source_run, tiny_dataset, target_data, tmp_path / "killed", _fast(val_every=0))
    monkeypatch.undo()
    assert len(list(csv.DictReader((tmp_path / "killed" / "steps.csv").open()))) == 2  # epoch 1 only
    assert not (tmp_path / "killed" / SUMMARY).exists()
    adapt(source_run, tiny_dataset, target_data, tmp_path / "killed", _fast(val_every=0), resume=True)
    a = safetensors.torch.load_file(str(whole / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "steps.csv").read_text() == (tmp_path / "killed" / "steps.csv").read_text()


def test_forward_with_features_is_the_models_own_pass():
    model = build_model("crossmodalnet", ModelConfig.from_size("crossmodalnet", "tiny")).eval()
    image = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        logits, features = forward_with_features(model, image)
        assert torch.equal(logits, model(image))
        assert torch.equal(features, model.encode(image)[1][-1])
    cfg = model.config
    assert features.shape == (2, 2 * cfg.feature_size * 2 ** (len(cfg.depths) - 1), 2, 2, 2)
    with torch.no_grad():
        for stage in (-2, -3):  # the finer skips, where the decoder takes them in
            logits, features = forward_with_features(model, image, None, stage)
            assert torch.equal(logits, model(image))
            assert torch.equal(features, model.encode(image)[1][stage])
    with pytest.raises(CrossModalNetError, match="feature_stage"):
        forward_with_features(model, image, None, -4)


def test_random_transfer_reshuffles_contrast_and_keeps_mean_and_std():
    x = torch.linspace(-2, 2, 4096).reshape(1, 1, 16, 16, 16).repeat(8, 1, 1, 1, 1)
    rng = np.random.default_rng(0)
    y = random_transfer(x, 1.0, rng)
    assert y.shape == x.shape and not torch.equal(y, x)
    assert torch.allclose(y.mean(dim=(1, 2, 3, 4)), x.mean(dim=(1, 2, 3, 4)), atol=1e-4)
    assert torch.allclose(y.std(dim=(1, 2, 3, 4)), x.std(dim=(1, 2, 3, 4)), atol=1e-4)
    assert any(bool((y[i].flatten().diff() < 0).any()) for i in range(8))  # some curve is not monotone
    assert torch.equal(random_transfer(x, 0.0, rng), x)
    # A function of the value: equal inputs stay equal (shapes and edges are kept).
    a = random_transfer(torch.tensor([0.0, 1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 5, 1, 1), 1.0, np.random.default_rng(3))
    assert a[0, 0, 0] == a[0, 0, 2] and a[0, 0, 1] == a[0, 0, 3]


def test_token_level_alignment_on_a_finer_stage_with_entropy(source_run, tiny_dataset, target_data,
                                                             no_target_labels, tmp_path):
    out = adapt(source_run, tiny_dataset, target_data, tmp_path / "tokens",
                _fast(epochs=1, val_every=0, feature_stage=-2, token_level=True, entropy_weight=0.5,
                      source_remap=0.5))
    rows = list(csv.DictReader((out / "steps.csv").open()))
    assert len(rows) == 2
    for row in rows:
        assert 0.0 < float(row["loss_entropy"]) <= 1.0 and float(row["weight_entropy"]) == 0.5
        for term in ("marginal", "conditional"):
            # Per-position decisions on 2 x (32/8)^3 tokens: accuracy is a share of 128 samples.
            assert math.isfinite(float(row[f"loss_{term}"]))
            correct = float(row[f"disc_acc_{term}"]) * 128
            assert correct == pytest.approx(round(correct), abs=1e-3)
    state = torch.load(out / "last/state.pt", weights_only=True)["extra"]
    # Stage -2 of the tiny model: both streams' 24 channels; the exact CDAN map 48 x 8.
    assert state["marginal.net.0.weight"].shape[1] == 48 and state["conditional.net.0.weight"].shape[1] == 48 * 8


def test_cli_adapt_then_predict(source_run, tiny_dataset, target_data, tmp_path, capsys):
    out = tmp_path / "cli"
    config = tmp_path / "adapt.yaml"
    dump_yaml(_fast(epochs=1, val_every=0), config)
    assert main(["adapt", str(source_run), "--source", str(tiny_dataset), "--target", str(target_data), "--out",
                 str(out), "--config", str(config), "--terms", "conditional", "--lr", "1.0e-4"]) == 0
    saved = yaml.safe_load((out / ADAPT_CONFIG).read_text())["adapt"]
    assert saved["terms"] == ["conditional"] and saved["lr"] == 1e-4 and saved["epochs"] == 1
    case = load_dataset(target_data, check_files=False)["test"][0]
    assert main(["predict", str(out), "--ct", str(case.images[0].path), "--image", f"MR={case.images[1].path}", "--out",
                 str(tmp_path / "p.nii.gz")]) == 0


# --- errors ------------------------------------------------------------------------------------
def _unet_run(root: Path, source_run: Path) -> Path:
    root.mkdir()
    dump_yaml(TrainConfig(model=ModelConfig.from_size("unet", "tiny")), root / "config.yaml")
    (root / "model.safetensors").write_bytes(b"")
    shutil.copyfile(source_run / "preprocess.json", root / "preprocess.json")
    return root


def _imageless_target(root: Path) -> Path:
    root.mkdir()
    write_dataset_json(root, {"test": [{"id": "x", "ct": "imagesTs/x_ct.nii.gz", "mr": "imagesTs/x_mr.nii.gz"}]},
                       name="t", spec=MMWHS)
    return root


def test_errors_name_the_problem(source_run, tiny_dataset, target_data, tmp_path):
    def fails(match: str, run=source_run, target=target_data, out=None, resume=False, **cfg) -> None:
        with pytest.raises(CrossModalNetError, match=match):
            adapt(run, tiny_dataset, target, out or tmp_path / "new", _fast(**cfg), resume=resume)

    fails("source run folder not found", run=tmp_path / "missing")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(source_run, unfinished)
    (unfinished / "model.safetensors").unlink()
    fails("has not finished", run=unfinished)
    fails("supports crossmodalnet only", run=_unet_run(tmp_path / "unet", source_run))
    fails("lists no training or validation images", target=_imageless_target(tmp_path / "imageless"))
    fails("dataset.json: not found", target=tmp_path)
    fails("not the source run", out=source_run)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    fails("not empty; pass --resume", out=tmp_path / "busy")
    fails("nothing to resume", out=tmp_path / "empty", resume=True)
    other = tmp_path / "other"
    other.mkdir()
    inputs = {k: str(Path(v).resolve()) for k, v in
              (("source_run", source_run), ("source_data", tiny_dataset), ("target_data", target_data))}
    (other / ADAPT_CONFIG).write_text(yaml.safe_dump({**inputs, "adapt": to_dict(_fast(lr=0.5))}))
    fails(r"--resume refused, other settings \(lr: 0.5 -> 0.0005\)", out=other, resume=True)
    fails(r"feature_stage must be in \[-3, -1\]", feature_stage=-4)
    # The schema refuses bad settings before any adaptation starts.
    for bad in (dict(epochs=0), dict(entropy_weight=-1.0), dict(source_remap=1.5), dict(topology_bars="some"),
                dict(terms=("marginal", "bogus"))):
        with pytest.raises(ValidationError):
            _fast(**bad)
    assert not (tmp_path / "new").exists()  # every refusal before anything was written


def test_cli_error_is_one_line(source_run, tiny_dataset, target_data, tmp_path, capsys):
    code = main(["adapt", str(source_run), "--source", str(tiny_dataset), "--target", str(target_data), "--out",
                 str(tmp_path / "x"), "--terms", "marginal,bogus"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("error: --terms: unknown term 'bogus'")


def test_target_patches_come_from_images_only(source_run, tiny_dataset, target_data, no_target_labels, tmp_path):
    batches = prepare_adaptation(source_run, tiny_dataset, target_data, tmp_path / "a", _fast()).task.batches
    batch = batches.target.batch(0)
    assert batch["image"].shape == (1, 2, 32, 32, 32) and bool(batch["present"].all())
    assert int(batch["label"].abs().sum()) == 0  # the dummy label, never a target label
    assert len(batches.target.cases) == 3  # training + validation; the test case is not used
    assert not np.array_equal(batches.source.batch(0)["image"].numpy(), batch["image"].numpy())
