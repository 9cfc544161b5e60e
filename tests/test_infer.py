"""Whole-volume prediction: the input's geometry is kept (oblique affine, anisotropic spacing,
resampling undone), label encodings, 4D probabilities, single-modality rules, clear errors; for a
prepare-mmwhs folder, the label maps also land on the original fixed scans."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import crossmodalnet.infer as infer
from crossmodalnet.cli import main
from crossmodalnet.config import ModelConfig, TrainConfig, dump_yaml
from crossmodalnet.data.dataset import load_case, load_dataset, write_dataset_json
from crossmodalnet.data.io import Geometry, read_geometry, read_label, write_image, write_label
from crossmodalnet.data.labels import CODES
from crossmodalnet.data.preprocess import ChannelNorm, Preprocessor
from crossmodalnet.data.registration import label_dice
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.infer import load_run, predict, predict_case
from crossmodalnet.models.registry import build_model
from crossmodalnet.runs import RunFolder, save_weights

SHAPE = (18, 14, 10)
# CT clipped to +-1000 HU, mean 0, std 100; MR z-scored per image.
_NORMS = (ChannelNorm("CT", "ct", (-1000.0, 1000.0), 0.0, 100.0), ChannelNorm("MR", "zscore"))
SPACING = (0.8, 1.3, 2.5)


def _oblique(shape=SHAPE, spacing=SPACING) -> Geometry:
    """Rotated by 25 and 10 degrees about two axes, with a flip: no axis is aligned with the world."""
    a, b = np.deg2rad(25), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([-1, 1, 1]) @ np.diag(spacing)
    affine[:3, 3] = (31.5, -12.25, 80.0)
    return Geometry(affine, shape)


def _blobs(shape=SHAPE) -> np.ndarray:
    """Two off-centre boxes (LV = 3, RV = 5): any wrong flip or axis swap would move them."""
    label = np.zeros(shape, dtype=np.uint8)
    label[2:9, 3:11, 1:6] = 3
    label[10:16, 2:7, 4:9] = 5
    return label


class _Oracle(nn.Module):
    """Class 3 (LV) where the normalised CT exceeds 0.5, else background: a perfect segmenter."""

    def forward(self, image, present=None):
        ct = image[:, :1]
        logits = torch.full((ct.shape[0], 8, *ct.shape[2:]), -10.0)
        logits[:, 3:4] = 10 * (ct - 0.5)
        logits[:, 0:1] = -10 * (ct - 0.5)
        return logits


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_predict_case_returns_to_an_oblique_anisotropic_grid():
    geom = _oblique()
    truth = _blobs() > 0  # an L-shaped, off-centre object
    # CT = 100 inside: with mean 0, std 100 the normalised CT is 1 inside, 0 outside.
    pre = Preprocessor(_NORMS, (1.0, 1.0, 1.0))
    assert pre.network_shape(geom)[0] != SHAPE  # the network runs on another, resampled grid
    probs = predict_case(_Oracle(), [100.0 * truth, None], pre, geom, roi_size=(8, 8, 8))
    assert probs.shape == (8, *SHAPE) and np.allclose(probs.sum(0), 1, atol=1e-4)
    pred = probs.argmax(0) == 3
    assert _dice(pred, truth) > 0.9, _dice(pred, truth)
    for axis in range(3):  # the test would see a flip: the object is not symmetric
        assert _dice(np.flip(pred, axis), truth) < 0.8


def _run(root, model=None, target_spacing=(1.0, 1.0, 1.0), patch=(16, 16, 16)):
    """A run folder as training leaves it (untrained tiny weights)."""
    cfg = TrainConfig(model=model or ModelConfig.from_size("unet", "tiny"), patch_size=patch,
                      sw_batch_size=1, device="cpu")
    root.mkdir(parents=True)
    dump_yaml(cfg, root / "config.yaml")
    torch.manual_seed(0)
    save_weights(build_model(cfg.model.name, cfg.model), root / "model.safetensors", cfg.model)
    Preprocessor(_NORMS, target_spacing).save(root / "preprocess.json")
    return root


def _inputs(root, geom=None, mr_geom=None):
    geom = geom or _oblique()
    label = _blobs(geom.shape)
    rng = np.random.default_rng(0)
    ct = write_image(root / "ct.nii.gz", 100.0 * label + rng.normal(0, 5, geom.shape), geom)
    mr = write_image(root / "mr.nii.gz", 50.0 * label + rng.normal(0, 5, geom.shape), mr_geom or geom)
    return ct, mr


def test_predicted_files_keep_the_input_geometry(tmp_path):
    run = _run(tmp_path / "run")
    ct, mr = _inputs(tmp_path)
    [out] = predict(run, tmp_path / "pred.nii.gz", images={"CT": ct, "MR": mr}, probabilities=True)
    image, written = nib.load(ct), nib.load(out)
    assert written.shape == image.shape == SHAPE
    assert np.allclose(written.affine, image.affine, atol=1e-5)
    assert np.allclose(written.header.get_sform(), image.affine, atol=1e-5)
    codes, _, encoding = read_label(out, MMWHS)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, *CODES}
    probs = nib.load(tmp_path / "pred_probabilities.nii.gz")
    assert probs.shape == (*SHAPE, 8) and np.allclose(probs.affine, image.affine, atol=1e-5)
    p = np.asarray(probs.dataobj)
    assert np.allclose(p.sum(-1), 1, atol=1e-4) and np.array_equal(p.argmax(-1), codes)


def test_dataset_split_with_index_labels(tmp_path):
    data = tmp_path / "data"
    entries = []
    for i in range(2):
        ct, mr = _inputs(data / f"c{i}", Geometry.from_spacing((12, 10, 9), (1.0, 1.0, 2.0)))
        write_label(data / f"c{i}" / "label.nii.gz", _blobs((12, 10, 9)), Geometry.from_spacing((12, 10, 9),
                                                                                                (1.0, 1.0, 2.0)))
        entries.append({"id": f"case{i}", "ct": f"c{i}/ct.nii.gz", "mr": f"c{i}/mr.nii.gz",
                        "label": f"c{i}/label.nii.gz"})
    write_dataset_json(data, {"training": entries[:1], "test": entries}, name="t", spec=MMWHS)
    written = predict(_run(tmp_path / "run"), tmp_path / "pred", data_dir=data, labels="indices")
    assert [p.name for p in written] == ["case0.nii.gz", "case1.nii.gz"]
    assert not (tmp_path / "pred" / "original").exists()  # not a prepare-mmwhs folder: no records/
    values = np.asarray(nib.load(written[0]).dataobj)
    assert values.shape == (12, 10, 9) and values.max() <= 7
    with pytest.raises(CrossModalNetError, match="lists no 'validation' cases"):
        predict(tmp_path / "run", tmp_path / "p2", data_dir=data, split="validation")


def _files(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_checkpoint_last_predicts_with_the_final_weights_and_writes_nothing_into_the_run(tmp_path, capsys):
    run = _run(tmp_path / "run")  # model.safetensors: seed 0 ("best")
    cfg = TrainConfig(model=ModelConfig.from_size("unet", "tiny"))
    torch.manual_seed(1)
    final = build_model(cfg.model.name, cfg.model)
    with pytest.raises(CrossModalNetError, match="no complete checkpoint"):
        load_run(run, "cpu", checkpoint="last")
    RunFolder(run).save_checkpoint(final, {"step": 7, "epoch": 1}, cfg.model)
    (run / "last").rename(run / "last.old")  # as a run killed between the two renames leaves it
    before = _files(run)
    best, last = load_run(run, "cpu").model.state_dict(), load_run(run, "cpu", checkpoint="last").model.state_dict()
    for key, value in final.state_dict().items():
        assert torch.equal(last[key], value)
    assert any(not torch.equal(best[k], last[k]) for k in best)
    ct, mr = _inputs(tmp_path)
    main(["predict", str(run), "--image", f"CT={ct}", "--image", f"MR={mr}", "--out", str(tmp_path / "last.nii.gz"),
          "--checkpoint", "last", "--probabilities"])
    predict(run, tmp_path / "best.nii.gz", images={"CT": ct, "MR": mr}, probabilities=True)
    p_last = np.asarray(nib.load(tmp_path / "last_probabilities.nii.gz").dataobj)
    p_best = np.asarray(nib.load(tmp_path / "best_probabilities.nii.gz").dataobj)
    assert p_last.shape == p_best.shape == (*SHAPE, 8) and np.abs(p_last - p_best).max() > 1e-3
    assert _files(run) == before  # the read-only lookup: last.old/ is used, not repaired
    with pytest.raises(CrossModalNetError, match="checkpoint must be 'best' or 'last'"):
        predict(run, tmp_path / "x.nii.gz", images={"CT": ct, "MR": mr}, checkpoint="final")
    assert not (tmp_path / "x.nii.gz").exists()


def test_single_modality_needs_a_model_trained_for_it(tmp_path):
    ct, _ = _inputs(tmp_path)
    with pytest.raises(CrossModalNetError, match=r"has no MR, but run .* was not trained for a missing channel"):
        predict(_run(tmp_path / "unet"), tmp_path / "out", images={"CT": ct})
    pytest.importorskip("crossmodalnet.models.crossmodalnet")
    model = ModelConfig.from_size("crossmodalnet", "tiny", modality_dropout=0.5)
    # CrossModalNet tiny downsamples by 16: a 32^3 window keeps 2^3 voxels at its bottleneck.
    run = _run(tmp_path / "cmn", model, target_spacing=(2.0, 2.0, 2.0), patch=(32, 32, 32))
    assert load_run(run, "cpu").supports_missing_modality
    [out] = predict(run, tmp_path / "out", images={"CT": ct})
    assert nib.load(out).shape == SHAPE and np.allclose(nib.load(out).affine, nib.load(ct).affine, atol=1e-5)
    with pytest.raises(CrossModalNetError, match="not trained for a missing channel"):
        # Same window as above (a 16^3 patch is refused earlier, as too small for the model).
        predict(_run(tmp_path / "cmn0", ModelConfig.from_size("crossmodalnet", "tiny"), target_spacing=(2.0, 2.0, 2.0),
                     patch=(32, 32, 32)), tmp_path / "o", images={"CT": ct})


def test_ct_mr_grid_mismatch_is_named(tmp_path):
    shifted = _oblique().affine.copy()
    shifted[0, 3] += 2.0  # MR 2 mm off the CT grid
    ct, mr = _inputs(tmp_path, mr_geom=Geometry(shifted, SHAPE))
    with pytest.raises(CrossModalNetError, match=r"mr.nii.gz: affine differs from .*ct.nii.gz"):
        predict(_run(tmp_path / "run"), tmp_path / "out", images={"CT": ct, "MR": mr})


def test_cli(tmp_path, capsys):
    run = _run(tmp_path / "run")
    ct, mr = _inputs(tmp_path)
    assert main(["predict", str(run), "--ct", str(ct), "--mr", str(mr), "--out", str(tmp_path / "o")]) == 0
    assert "wrote 1 label map(s) (values)" in capsys.readouterr().out
    assert (tmp_path / "o" / "ct.nii.gz").is_file()
    for args in (["predict", str(run), "--out", str(tmp_path / "x")],  # no input at all
                 ["predict", str(tmp_path), "--ct", str(ct), "--out", str(tmp_path / "x")],  # not a run
                 ["predict", str(run), "--ct", str(tmp_path / "missing.nii.gz"), "--mr", str(mr), "--out", "x"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err


def test_bad_arguments(tmp_path):
    run = _run(tmp_path / "run")
    ct, mr = _inputs(tmp_path)
    with pytest.raises(CrossModalNetError, match="labels must be 'values' or 'indices'"):
        predict(run, tmp_path / "o", images={"CT": ct, "MR": mr}, labels="names")
    with pytest.raises(CrossModalNetError, match="not both or neither"):
        predict(run, tmp_path / "o", data_dir=tmp_path, images={"CT": ct})
    with pytest.raises(CrossModalNetError, match=r"model.safetensors: no trained weights"):
        (run / "model.safetensors").unlink()
        load_run(run)
    with pytest.raises(CrossModalNetError, match=r"expected \(C, \*\(18, 14, 10\)\) probabilities"):
        from crossmodalnet.data.io import write_probabilities

        write_probabilities(tmp_path / "p.nii.gz", np.zeros((8, 3, 3, 3)), _oblique())


# ---------------------------------------------------------------------------------------------- prepare-mmwhs


@pytest.fixture(scope="module")
def mmwhs(tmp_path_factory):
    """Raw MM-WHS-style phantoms (2 pairs, CT 32^3 at 4.5 mm, MR 32x32x19 at 5.6x5.6x9 mm, misaligned)
    and their prepare-mmwhs folder (MR fixed, no registration, 48^3 of 3 mm): 1 training, 1 test case.
    Read-only: a test that modifies it copies it first."""
    root = tmp_path_factory.mktemp("mmwhs")
    assert main(["synth", str(root / "raw"), "--layout", "mmwhs", "--cases", "2", "--size", "32"]) == 0
    assert main(["prepare-mmwhs", str(root / "raw"), str(root / "prep"), "--register", "none", "--size", "48",
                 "--spacing", "3", "--split", "1/1", "--workers", "1"]) == 0
    return root


def _original_mr(raw, case_id: str):
    """The raw fixed (MR) label of a case as class indices, and the raw MR image's grid."""
    stem = raw / "mr_train" / f"mr_{case_id}"  # case "train_1001" -> mr_train/mr_train_1001_*
    return read_label(f"{stem}_label.nii.gz", MMWHS)[0], read_geometry(f"{stem}_image.nii.gz")


def test_prepared_labels_go_back_to_the_original_scans(mmwhs, tmp_path, monkeypatch):
    """An oracle whose "prediction" is the prepared reference label: predict writes it unchanged on the
    prepared grid and, through restore_to_original, onto the raw MR's grid, matching the raw label."""
    prep = mmwhs / "prep"
    truth = [(data["images"][0], data["label"]) for split in ("training", "test")
             for data in (load_case(c, MMWHS) for c in load_dataset(prep)[split])]

    def oracle(model, images, preprocess, geometry, *args, **kwargs):
        [label] = [lab for ref, lab in truth if np.array_equal(ref, images[0])]
        return np.eye(8, dtype=np.float32)[label].transpose(3, 0, 1, 2)  # (8, X, Y, Z) one-hot

    monkeypatch.setattr(infer, "predict_case", oracle)
    run = _run(tmp_path / "run")
    for split in ("training", "test"):
        [case] = load_dataset(prep)[split]
        [written] = predict(run, tmp_path / "pred", data_dir=prep, split=split, labels="indices")
        assert np.array_equal(read_label(written, MMWHS)[0], read_label(case.label, MMWHS)[0])
        original, original_grid = _original_mr(mmwhs / "raw", case.id)
        back = nib.load(tmp_path / "pred" / "original" / f"{case.id}.nii.gz")
        assert back.shape == original_grid.shape != read_geometry(written).shape
        assert np.allclose(back.affine, original_grid.affine, atol=1e-5)
        assert np.allclose(back.header.get_sform(), original_grid.affine, atol=1e-5)
        dice = label_dice(np.asarray(back.dataobj), original)
        assert np.nanmean(list(dice.values())) >= 0.98 and np.nanmin(list(dice.values())) >= 0.95, dice


def test_predict_cli_on_a_prepared_folder(mmwhs, tmp_path, capsys):
    """A real (untrained) run through the CLI: both label maps, each with its own grid, MM-WHS codes."""
    run = _run(tmp_path / "run", target_spacing=(3.0, 3.0, 3.0), patch=(32, 32, 32))
    assert main(["predict", str(run), str(mmwhs / "prep"), "--out", str(tmp_path / "pred")]) == 0
    assert f"wrote 1 on the original fixed-image grid(s) to {tmp_path / 'pred' / 'original'}" in capsys.readouterr().out
    [case] = load_dataset(mmwhs / "prep")["test"]
    prepared = nib.load(tmp_path / "pred" / f"{case.id}.nii.gz")
    assert prepared.shape == (48, 48, 48)
    assert np.allclose(prepared.affine, nib.load(case.images[1].path).affine, atol=1e-5)
    _, original_grid = _original_mr(mmwhs / "raw", case.id)
    back = nib.load(tmp_path / "pred" / "original" / f"{case.id}.nii.gz")
    assert back.shape == original_grid.shape and np.allclose(back.affine, original_grid.affine, atol=1e-5)
    assert set(np.unique(np.asarray(back.dataobj))) <= {0, *CODES}


def test_a_record_that_does_not_fit_stops_before_any_prediction(mmwhs, tmp_path):
    prep = tmp_path / "prep"
    shutil.copytree(mmwhs / "prep", prep)
    [case] = load_dataset(prep)["test"]
    path = prep / "records" / f"{case.id}.json"
    record = json.loads(path.read_text())
    record["prepared"]["shape"] = [40, 48, 48]
    path.write_text(json.dumps(record))
    run = _run(tmp_path / "run")
    with pytest.raises(CrossModalNetError, match=rf"records/{case.id}.json: the case's images are not on the rec"):
        predict(run, tmp_path / "pred", data_dir=prep)
    del record["original"]
    path.write_text(json.dumps(record))
    with pytest.raises(CrossModalNetError, match="has no prepared/original grid; run prepare-mmwhs again"):
        predict(run, tmp_path / "pred", data_dir=prep)
    assert not (tmp_path / "pred").exists()


def test_bfloat16_inference_agrees_with_float32_and_bad_precisions_are_named(tmp_path):
    run = _run(tmp_path / "run", model=ModelConfig.from_size("crossmodalnet", "tiny"), patch=(32, 32, 32))
    ct, mr = _inputs(tmp_path)
    [a] = predict(run, tmp_path / "fp32.nii.gz", images={"CT": ct, "MR": mr}, labels="indices", precision="fp32")
    [b] = predict(run, tmp_path / "bf16.nii.gz", images={"CT": ct, "MR": mr}, labels="indices", precision="bf16")
    la, lb = (np.asarray(nib.load(p).dataobj) for p in (a, b))
    assert la.shape == lb.shape == SHAPE
    assert np.mean(la == lb) > 0.95  # bf16 keeps 8 bits of mantissa: a few boundary voxels may flip
    with pytest.raises(CrossModalNetError, match="needs a CUDA device"):
        predict(run, tmp_path / "x.nii.gz", images={"CT": ct, "MR": mr}, precision="fp16", device="cpu")
    with pytest.raises(CrossModalNetError, match="precision must be one of"):
        infer.autocast_dtype("int8", torch.device("cpu"))
    assert infer.autocast_dtype("auto", torch.device("cpu")) is None
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert infer.autocast_dtype("auto", torch.device("cuda")) is (torch.bfloat16 if bf16 else torch.float16)


def test_postprocess_follows_the_run_choice_or_the_option(tmp_path, monkeypatch):
    from scipy import ndimage

    run = _run(tmp_path / "run")
    # The oracle segments where CT is bright: a box of 343 voxels and one of 12 far from it.
    monkeypatch.setattr(RunFolder, "load_model", lambda self, device, checkpoint: (_Oracle(), self.read_config()))
    geom = Geometry.from_spacing(SHAPE, (1.0, 1.0, 1.0))
    bright = np.zeros(SHAPE)
    bright[1:8, 1:8, 1:8], bright[14:17, 11:13, 7:9] = 100.0, 100.0
    ct, mr = write_image(tmp_path / "ct.nii.gz", bright, geom), write_image(tmp_path / "mr.nii.gz", bright, geom)
    images = {"CT": ct, "MR": mr}

    def pieces(path):
        labels = np.asarray(nib.load(path).dataobj)
        return labels, ndimage.label(labels > 0, structure=np.ones((3, 3, 3)))[1]

    raw, n_raw = pieces(predict(run, tmp_path / "none.nii.gz", images=images, postprocess="none")[0])
    assert n_raw == 2
    auto, _ = pieces(predict(run, tmp_path / "auto.nii.gz", images=images)[0])
    np.testing.assert_array_equal(auto, raw)  # a run without postprocess.json: nothing
    kept, n_kept = pieces(predict(run, tmp_path / "kept.nii.gz", images=images, postprocess="largest-component")[0])
    assert n_kept == 1 and np.array_equal(kept[kept > 0], raw[kept > 0]) and (kept > 0).sum() < (raw > 0).sum()
    RunFolder(run).write_postprocess({"largest_component": True, "cases": 3, "score": 0.5,
                                      "score_largest_component": 0.6})
    main(["predict", str(run), "--image", f"CT={ct}", "--image", f"MR={mr}", "--out", str(tmp_path / "cli.nii.gz")])
    np.testing.assert_array_equal(pieces(tmp_path / "cli.nii.gz")[0], kept)  # auto: the run's choice
    main(["predict", str(run), "--image", f"CT={ct}", "--image", f"MR={mr}", "--out", str(tmp_path / "cli2.nii.gz"),
          "--postprocess", "none"])
    np.testing.assert_array_equal(pieces(tmp_path / "cli2.nii.gz")[0], raw)
    (run / "postprocess.json").write_text('{"largest_component": "yes"}')
    with pytest.raises(CrossModalNetError, match=r"postprocess.json: expected an object"):
        predict(run, tmp_path / "bad.nii.gz", images=images)
    with pytest.raises(CrossModalNetError, match="postprocess must be one of"):
        predict(run, tmp_path / "bad.nii.gz", images=images, postprocess="lcc")
    assert not (tmp_path / "bad.nii.gz").exists()
