"""benchmarks/real.py without training anything: folds, per-fold datasets, the nnU-Net conversion, the table.

The real benchmark trains for hours; this checks its bookkeeping on a tiny fabricated dataset
(values 0/200/500 as MyoPS writes them, two channels, one region) whose answers are known.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _real_folds  # noqa: E402
import _real_nnunet  # noqa: E402
import _real_ours  # noqa: E402
import _real_table  # noqa: E402
import real  # noqa: E402

from crossmodalnet.data.dataset import load_dataset, read_spec, write_dataset_json  # noqa: E402
from crossmodalnet.data.io import Geometry, read_label_values, write_image, write_label  # noqa: E402
from crossmodalnet.errors import CrossModalNetError  # noqa: E402

VALUES = (0, 200, 500)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 cases (10 training, 2 labelled test), channels A and B, labels MYO 200 and LV 500, region heart."""
    root = tmp_path_factory.mktemp("real") / "ds"
    rng = np.random.default_rng(0)
    geometry = Geometry.from_spacing((8, 8, 3), (1.5, 1.5, 10.0))
    entries = []
    for i in range(12):
        case = f"case{i:02d}"
        for channel in ("A", "B"):
            write_image(root / channel / f"{case}.nii.gz", rng.normal(size=(8, 8, 3)), geometry)
        label = np.zeros((8, 8, 3), dtype=np.int16)
        label[2:6, 2:6] = 200
        label[3:5, 3:5] = 500
        write_label(root / "gd" / f"{case}.nii.gz", label, geometry)
        entries.append({"id": case, "images": [f"A/{case}.nii.gz", f"B/{case}.nii.gz"], "label": f"gd/{case}.nii.gz"})
    meta = {"channel_names": {"0": "A", "1": "B"}, "labels": {"background": 0, "MYO": 200, "LV": 500},
            "regions": {"heart": [200, 500]}}
    from crossmodalnet.data.spec import DataSpec

    write_dataset_json(root, {"training": entries[:10], "test": entries[10:]}, "tiny", DataSpec.from_dict(meta))
    return root


def test_folds_disjoint_cover_deterministic_sizes() -> None:
    ids = [f"c{i:02d}" for i in range(25)]
    folds = _real_folds.folds(ids[::-1], seed=0)  # the input order does not matter: ids are sorted first
    assert [len(f) for f in folds] == [5, 5, 5, 5, 5]
    assert sorted(c for f in folds for c in f) == ids
    assert len({c for f in folds for c in f}) == 25
    assert folds == _real_folds.folds(ids, seed=0)
    assert folds != _real_folds.folds(ids, seed=1)
    assert [len(f) for f in _real_folds.folds(ids[:23], seed=0)] == [5, 5, 5, 4, 4]
    train, val = _real_folds.fold_split(folds, 2)
    assert val == folds[2] and set(train) == set(ids) - set(val)


def test_folds_refuse_too_few_or_repeated() -> None:
    with pytest.raises(CrossModalNetError, match="cannot make 5 folds"):
        _real_folds.folds(["a", "b"], seed=0)
    with pytest.raises(CrossModalNetError, match="repeat"):
        _real_folds.folds(["a", "a", "b", "c", "d"], seed=0)


def test_pool_takes_labelled_test_cases(dataset: Path) -> None:
    pool = _real_folds.cv_pool(load_dataset(dataset))
    assert [c.id for c in pool] == [f"case{i:02d}" for i in range(12)]


def test_fold_dataset_reads_back(dataset: Path, tmp_path: Path) -> None:
    data = load_dataset(dataset)
    pool = _real_folds.cv_pool(data)
    folds = _real_folds.folds([c.id for c in pool], seed=0)
    train, val = _real_folds.fold_split(folds, 1)
    subset = _real_folds.parse_subset("b", data.spec)
    out = _real_folds.write_fold_dataset(tmp_path / "fold1", pool, data.spec, subset, train, val, "tiny-fold1")
    back = load_dataset(out)
    assert [c.id for c in back["training"]] == train and [c.id for c in back["validation"]] == val
    assert back["test"] == [] and back.spec.channels == ("B",)
    assert back.spec.regions == data.spec.regions and back.spec.values == data.spec.values
    case = back["validation"][0]
    assert case.images[0].path == (dataset / "B" / f"{case.id}.nii.gz").resolve()  # a link, not a copy
    assert (out / "images" / "B" / f"{case.id}.nii.gz").is_symlink()


def test_parse_subset_orders_and_refuses(dataset: Path) -> None:
    spec = read_spec(dataset)
    assert _real_folds.parse_subset("B,a", spec).channels == ("A", "B")
    with pytest.raises(CrossModalNetError, match="unknown channel"):
        _real_folds.parse_subset("C", spec)


def test_nnunet_conversion_round_trip(dataset: Path, tmp_path: Path) -> None:
    data = load_dataset(dataset)
    pool = _real_folds.cv_pool(data)
    subset = _real_folds.parse_subset("A,B", data.spec)
    raw = _real_nnunet.write_raw(tmp_path / "raw", pool, data.spec, subset)
    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "MYO": 1, "LV": 2} and meta["channel_names"] == {"0": "A", "1": "B"}
    assert meta["numTraining"] == 12
    assert (raw / "imagesTr" / "case03_0001.nii.gz").resolve() == (dataset / "B" / "case03.nii.gz").resolve()
    indices, _ = read_label_values(raw / "labelsTr" / "case03.nii.gz")
    assert set(np.unique(indices)) == {0, 1, 2}
    back = _real_nnunet.indices_to_values(raw / "labelsTr" / "case03.nii.gz", dataset / "gd" / "case03.nii.gz",
                                          data.spec, tmp_path / "back.nii.gz")
    values, _ = read_label_values(back)
    original, _ = read_label_values(dataset / "gd" / "case03.nii.gz")
    assert np.array_equal(values, original) and set(np.unique(values)) == set(VALUES)


def test_nnunet_splits_are_our_folds(tmp_path: Path) -> None:
    ids = [f"c{i:02d}" for i in range(25)]
    folds = _real_folds.folds(ids, seed=3)
    splits = json.loads(_real_nnunet.write_splits(tmp_path, folds).read_text())
    assert len(splits) == 5
    for k, split in enumerate(splits):
        train, val = _real_folds.fold_split(folds, k)
        assert split == {"train": train, "val": val}


def test_cpu_spacing_keeps_the_slice_axis() -> None:
    # nnU-Net's order (z, y, x) with z the slice axis; ours (x, y, z) in the stored order.
    assert _real_nnunet.cpu_spacing([12.0, 0.73, 0.73], [1.19, 1.19, 12.0]) == [12.0, 1.19, 1.19]
    assert _real_nnunet.cpu_spacing([12.0, 0.73, 0.73], [0.97, 0.97, None]) == [12.0, 0.97, 0.97]  # a 2D plan


def test_config_set_validated() -> None:
    config = _real_ours.base_config("dynunet", 2.0, 0, {"model.deformable": "false", "lr": "1e-3"})
    assert config.model.name == "dynunet" and config.model.size == "small" and config.max_minutes == 2.0
    assert config.model.deformable is False and config.lr == 1e-3
    with pytest.raises(CrossModalNetError, match="not a key"):
        _real_ours.base_config("dynunet", 2.0, 0, {"model.nope": "1"})
    with pytest.raises(CrossModalNetError):
        _real_ours.base_config("dynunet", 2.0, 0, {"lr": "-1"})


def _result(label: str, fold: int, dice: dict[str, float], hd95: float = 4.0) -> dict:
    return {"status": "ok", "label": label, "channels": "A+B", "fold": fold, "steps_done": 100, "s_per_step": 0.5,
            "score": {"kind": "region", "structures": list(dice), "dice": dice,
                      "hd95": dict.fromkeys(dice, hd95), "mean_dice": float(np.mean(list(dice.values())))}}


def test_table_from_fabricated_results() -> None:
    results = [_result("dynunet", 0, {"LV": 0.8, "scar": 0.4}), _result("dynunet", 1, {"LV": 0.6, "scar": 0.2}, 6.0),
               _result("nnunet-cpu", 0, {"LV": 0.5, "scar": 0.1}), _result("unet", 0, {"LV": 0.9, "scar": 0.5})]
    results[0]["score_last"] = {"mean_dice": 0.45}  # fold 1 finished before the last checkpoint was scored
    results[3]["score_last"] = {"mean_dice": 0.65}
    results[3]["score_raw"] = {"mean_dice": 0.68}  # our row without the chosen postprocessing
    header = {"data": "ds", "cases": 25, "num_folds": 5, "seed": 0, "folds": "0,1", "minutes": 20.0,
              "machine": {"cpu": "cpu", "cores": 2, "torch": "2.13"}, "command": "real.py ds"}
    text = _real_table.render_table(results, header)
    dyn = next(line for line in text.splitlines() if line.startswith("| dynunet"))
    cells = [c.strip() for c in dyn.strip("|").split("|")]
    assert cells[:3] == ["dynunet", "A+B", "2"]
    assert cells[3:8] == ["0.700 ± 0.100", "0.300 ± 0.100", "**0.500 ± 0.100**", "0.450 (1 folds)", "–"]
    assert cells[8:10] == ["5.0 ± 1.0", "5.0 ± 1.0"]
    assert cells[10] == "0: 0.600, 1: 0.400"
    assert "| nnunet-cpu | A+B | 1 | 0.500 | 0.100 | **0.300** | – | – |" in text
    assert "| unet | A+B | 1 | 0.900 | 0.500 | **0.700** | 0.650 | 0.680 |" in text
    assert "seed 0" in text and "20 min" in text and "`real.py ds`" in text
    mean, sd, n = _real_table.fold_stats([0.2, None, math.nan, 0.4])
    assert n == 2 and mean == pytest.approx(0.3) and sd == pytest.approx(0.1)


def test_cli_errors_exit_2_before_writing(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv in (["--rows", "nope"], ["--channels", "C"], ["--folds", "7"], ["--config-set", "lr"]):
        with pytest.raises(SystemExit) as exc:
            real.main([str(dataset), "--out", str(tmp_path / "out"), *argv])
        assert exc.value.code == 2
        assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit) as exc:
        real.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_jobs_and_writes_nothing(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [str(dataset), "--out", str(tmp_path / "out"), "--rows", "dynunet,nnunet-cpu", "--folds", "0,4",
            "--channels", "A", "--channels", "A,B", "--config-set", "model.deformable=false", "--dry-run"]
    # nnU-Net rows need an environment with nnunetv2, checked before anything is listed or written;
    # a stand-in with its entry point keeps this test independent of the machine's.
    with pytest.raises(SystemExit) as exc:
        real.main([*args, "--nnunet-venv", str(tmp_path / "no-venv")])
    assert exc.value.code == 2 and "no bin/nnUNetv2_train" in capsys.readouterr().err
    venv = tmp_path / "nnunet-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "nnUNetv2_train").touch()
    real.main([*args, "--nnunet-venv", str(venv)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8
    assert lines[0].startswith("[1/8] dynunet+model.deformable=false__A__fold0: train 9, validation 3 cases")
    assert "nnunet-cpu__A+B__fold4: train 10, validation 2 cases" in lines[-1]
    assert not (tmp_path / "out").exists()


def test_rerun_with_other_settings_is_refused(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    job = out / "jobs" / "dynunet__A+B__fold0"
    job.mkdir(parents=True)
    (job / "result.json").write_text(json.dumps({"status": "ok", "data": str(dataset), "seed": 0, "minutes": 20.0}))
    with pytest.raises(SystemExit) as exc:
        real.main([str(dataset), "--out", str(out), "--rows", "dynunet", "--folds", "0", "--minutes", "1"])
    assert exc.value.code == 2 and "--minutes 20.0" in capsys.readouterr().err
    real.main([str(dataset), "--out", str(out), "--rows", "dynunet", "--folds", "0", "--dry-run"])
    assert "(finished)" in capsys.readouterr().out


def test_score_last_adds_the_final_weights_score_to_finished_jobs(dataset: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A job finished before `score_last` existed: --score-last predicts its fold with the run's
    last/ weights, scores them, and leaves `score` (the best checkpoint's) as it was."""
    import torch

    from crossmodalnet.config import ModelConfig, TrainConfig
    from crossmodalnet.models.registry import build_model
    from crossmodalnet.runs import RunFolder, save_weights
    from crossmodalnet.train.trainer import train

    out = tmp_path / "out"
    pool = _real_folds.cv_pool(load_dataset(dataset))
    spec = load_dataset(dataset).spec
    all_folds = _real_folds.folds([c.id for c in pool], 0)
    train_ids, val_ids = _real_folds.fold_split(all_folds, 0)
    subset = _real_folds.parse_subset("A,B", spec)
    data_dir = _real_folds.write_fold_dataset(out / "folds" / "A+B" / "fold0", pool, spec, subset, train_ids,
                                              val_ids, "tiny-fold0")
    job_dir = out / "jobs" / "unet__A+B__fold0"
    config = TrainConfig(model=ModelConfig.from_size("unet", "tiny"), epochs=2, iterations_per_epoch=2,
                         val_every=1, batch_size=2, patch_size=(8, 8, 3), plan=False, device="cpu")
    train(data_dir, job_dir / "run", config)
    # "best" made different from the final weights: an untrained network in model.safetensors.
    trained = RunFolder(job_dir / "run").read_config().model  # with the data's channels and outputs
    torch.manual_seed(5)
    save_weights(build_model("unet", trained), job_dir / "run" / "model.safetensors", trained)
    job = {"name": job_dir.name, "label": "unet", "row": "unet", "fold": 0, "channels": "A+B", "config_set": {},
           "minutes": 20.0, "seed": 0, "data": str(dataset), "data_dir": str(data_dir), "job_dir": str(job_dir),
           "train_cases": train_ids, "val_cases": val_ids, "status": "ok"}
    best, _ = _real_ours.score_checkpoint(job, "best")
    (job_dir / "result.json").write_text(json.dumps({**job, "score": best}))
    real.main([str(dataset), "--out", str(out), "--rows", "unet", "--folds", "0", "--score-last"])
    result = json.loads((job_dir / "result.json").read_text())
    assert result["score"] == best
    last = result["score_last"]
    assert last["num_cases"] == len(val_ids) == 3 and 0.0 <= last["mean_dice"] <= 1.0
    assert last["mean_dice"] != best["mean_dice"]
    assert sorted(p.name for p in (job_dir / "predictions_last").iterdir()) == [f"{c}.nii.gz" for c in val_ids]
    assert "unet | A+B | 1 |" in capsys.readouterr().out
    # Finished before training chose the postprocessing: chosen now on the fold's cases, as training does.
    (job_dir / "run" / "postprocess.json").unlink()
    real.main([str(dataset), "--out", str(out), "--rows", "unet", "--folds", "0", "--postprocess-finished"])
    result = json.loads((job_dir / "result.json").read_text())
    record = json.loads((job_dir / "run" / "postprocess.json").read_text())
    assert result["postprocess"] == record and record["cases"] == 3
    assert record["largest_component"] == (record["score_largest_component"] > record["score"])
    assert result["score_raw"] == best and (result["score"] == best) == (not record["largest_component"])
    # With the choice, the network's own predictions move to predictions_raw/ (as new jobs keep them).
    assert (job_dir / "predictions_raw").is_dir() == record["largest_component"]
    assert sorted(p.name for p in (job_dir / "predictions").iterdir()) == [f"{c}.nii.gz" for c in val_ids]
    assert "| unet | A+B | 1 |" in capsys.readouterr().out
    real.main([str(dataset), "--out", str(out), "--rows", "unet", "--folds", "0", "--postprocess-finished"])
    assert json.loads((job_dir / "result.json").read_text()) == result  # done once
