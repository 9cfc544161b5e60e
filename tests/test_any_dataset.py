"""Any dataset end to end (issue 17): labels, regions and channels come from the dataset.

Synthetic MyoPS-like cases (three co-registered "sequences" C0, LGE, T2 of a ring-shaped
myocardium around a blood pool, with edema and scar inside the ring; values 200, 500, 600, 1220,
2221; anisotropic 1 x 1 x 4 mm voxels) train two steps, predict and evaluate with the challenge's
nested regions as rows; a 1-channel dataset, a case lacking a channel, region-based training, an
nnU-Net v2 raw folder read in place and a bad description are covered too.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from crossmodalnet.cli import main
from crossmodalnet.config import ModelConfig, TrainConfig
from crossmodalnet.data.dataset import load_dataset
from crossmodalnet.data.io import Geometry, read_label_values, write_image, write_label
from crossmodalnet.infer import load_run, predict
from crossmodalnet.runs import RunFolder
from crossmodalnet.train.trainer import train

SHAPE = (24, 24, 6)
SPACING = (1.0, 1.0, 4.0)
VALUES = {"MYO": 200, "LV": 500, "RV": 600, "edema": 1220, "scar": 2221}
REGIONS = {"LV": [500], "RV": [600], "myocardium": [200, 1220, 2221], "edema+scar": [1220, 2221], "scar": [2221]}
CHANNELS = ("C0", "LGE", "T2")
# Brightness of background, MYO, LV, RV, edema, scar in each sequence: scar shows on LGE, edema on T2.
_CONTRAST = {"C0": (10, 40, 120, 110, 40, 40), "LGE": (10, 30, 60, 55, 30, 150), "T2": (10, 30, 50, 50, 140, 60)}


def _label(rng: np.random.Generator) -> np.ndarray:
    """(24, 24, 6) label values: LV disc in a MYO ring, RV beside it, edema and scar in the ring."""
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    cx, cy = 11 + rng.integers(-1, 2), 12 + rng.integers(-1, 2)
    r = np.hypot(x - cx, y - cy)
    plane = np.zeros(SHAPE[:2], dtype=np.int32)
    plane[(r >= 4) & (r < 7)] = VALUES["MYO"]
    plane[r < 4] = VALUES["LV"]
    plane[(np.hypot(x - cx - 8, y - cy) < 3.5) & (plane == 0)] = VALUES["RV"]
    angle = np.arctan2(y - cy, x - cx)
    ring = plane == VALUES["MYO"]
    plane[ring & (angle > 0.3) & (angle < 1.6)] = VALUES["edema"]
    plane[ring & (angle > 0.7) & (angle < 1.2)] = VALUES["scar"]
    label = np.repeat(plane[:, :, None], SHAPE[2], axis=2)
    label[:, :, 0] = 0  # the apex slice: background only
    return label


def _write_case(root: Path, case_id: str, seed: int, channels=CHANNELS) -> dict:
    rng = np.random.default_rng(seed)
    label = _label(rng)
    geometry = Geometry.from_spacing(SHAPE, SPACING)
    classes = [0, *VALUES.values()]
    entry = {"id": case_id, "images": [], "label": f"labels/{case_id}.nii.gz"}
    for name in channels:
        lut = np.zeros(max(classes) + 1, dtype=np.float32)
        lut[classes] = _CONTRAST[name]
        image = lut[label] * rng.uniform(0.8, 1.2) + rng.normal(0, 6, SHAPE)
        rel = f"images/{name}/{case_id}.nii.gz"
        write_image(root / rel, image, geometry)
        entry["images"].append(rel)
    write_label(root / entry["label"], label, geometry)
    return entry


def _dataset(root: Path, n: int = 5, channels=CHANNELS, train_regions: bool = False, drop=None,
             registered: bool | None = True) -> Path:
    """n cases: n - 2 training, 1 validation, 1 test. drop: (case index, channel index) left out.
    registered: what dataset.json says of the channels (None: nothing)."""
    entries = [_write_case(root, f"case{i}", i, channels) for i in range(n)]
    if drop is not None:
        entries[drop[0]]["images"][drop[1]] = None
    meta = {"name": "myops-like", "channel_names": {str(i): c for i, c in enumerate(channels)},
            "labels": {"background": 0, **VALUES}, "regions": REGIONS,
            "training": entries[: n - 2], "validation": entries[n - 2: n - 1], "test": entries[n - 1:]}
    if registered is not None:
        meta["registered"] = registered
    if train_regions:
        meta["train_regions"] = True
        meta["regions_class_order"] = [500, 600, 200, 1220, 2221]
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _config(**overrides) -> TrainConfig:
    base = dict(model=ModelConfig.from_size("crossmodalnet", "tiny"), epochs=1, iterations_per_epoch=2,
                batch_size=2, patch_size=(24, 24, 6), lr=1e-3, warmup_epochs=0, val_every=1, sw_batch_size=4,
                device="cpu", num_workers=0)
    base.update(overrides)
    return TrainConfig(**base)


def test_three_channels_with_nested_regions_train_predict_and_evaluate(tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    run = train(data, tmp_path / "run", _config())
    loaded = load_run(run)
    assert loaded.config.model.modalities == 3 and loaded.config.model.out_channels == 6
    # Registered sequences: every channel's fine detail, no deformable offsets (recorded in the run).
    assert (loaded.config.model.fine_skips, loaded.config.model.deformable) == ("both", False)
    # 4 mm slices at 1 mm in plane: a 2D plan; the given 6-slice patch is never mixed across slices.
    assert loaded.config.target_spacing[2] is None and loaded.config.model.window_size[2] == 1
    assert all(s[2] == 1 for s in loaded.config.model.strides)
    assert loaded.spec.channels == CHANNELS and [r.name for r in loaded.spec.regions] == list(REGIONS)
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_dice_scar", "val_region_edema+scar", "val_region_mean"} <= set(header)
    written = predict(run, tmp_path / "pred", data_dir=data, split="test")
    values = set(np.unique(read_label_values(written[0])[0]).tolist())
    assert values <= {0, *VALUES.values()}  # the dataset's label values, not class indices
    # The dataset folder as the reference: its test split's labels, its labels and regions.
    assert main(["evaluate", str(tmp_path / "pred"), str(data), "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert list(summary["per_structure"]) == list(VALUES) and list(summary["per_region"]) == list(REGIONS)
    assert summary["num_cases"] == 1 and summary["region_mean_dice"] is not None
    rows = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert sum(",region," in r for r in rows) == len(REGIONS) and sum(",class," in r for r in rows) == len(VALUES)
    assert "region edema+scar" in capsys.readouterr().out


def test_channels_not_said_to_be_registered_keep_the_reference_skips_and_offsets(tmp_path):
    data = _dataset(tmp_path / "data", n=4, registered=None)
    run = train(data, tmp_path / "run", _config(epochs=1, iterations_per_epoch=1))
    model = load_run(run).config.model
    assert (model.fine_skips, model.deformable) == ("reference", True)


def test_one_channel_dataset_trains_a_single_stream(tmp_path):
    data = _dataset(tmp_path / "data", n=4, channels=("LGE",))
    run = train(data, tmp_path / "run", _config())
    loaded = load_run(run)
    assert loaded.config.model.modalities == 1 and loaded.model.cross is None
    assert predict(run, tmp_path / "one.nii.gz", images={"LGE": data / "images/LGE/case3.nii.gz"})[0].is_file()


def test_a_training_case_without_a_channel_is_used_with_placeholders(tmp_path):
    data = _dataset(tmp_path / "data", drop=(0, 1))  # case0 has no LGE
    case0 = load_dataset(data)["training"][0]
    assert case0.present == (True, False, True)
    run = train(data, tmp_path / "run", _config(iterations_per_epoch=3))
    assert RunFolder(run).has_weights()


def test_region_training_predicts_one_sigmoid_per_region_and_paints_values(tmp_path):
    data = _dataset(tmp_path / "data", train_regions=True)
    run = train(data, tmp_path / "run", _config())
    loaded = load_run(run)
    assert loaded.spec.train_regions and loaded.spec.activation == "sigmoid"
    assert loaded.config.model.out_channels == len(REGIONS)
    written = predict(run, tmp_path / "pred", data_dir=data, split="test", probabilities=True)
    assert set(np.unique(read_label_values(written[0])[0]).tolist()) <= {0, *VALUES.values()}
    assert nib.load(str(tmp_path / "pred" / "case4_probabilities.nii.gz")).shape == (*SHAPE, len(REGIONS))


def test_an_nnunet_raw_folder_trains_in_place(tmp_path):
    raw = tmp_path / "Dataset042_MyoLike"
    for i in range(4):
        entry = _write_case(tmp_path / "src", f"case{i}", i)
        for c, rel in enumerate(entry["images"]):
            (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
            (tmp_path / "src" / rel).rename(raw / "imagesTr" / f"myo_{i:03d}_{c:04d}.nii.gz")
        (raw / "labelsTr").mkdir(exist_ok=True)
        (tmp_path / "src" / entry["label"]).rename(raw / "labelsTr" / f"myo_{i:03d}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "C0", "1": "LGE", "2": "T2"}, "labels": {"background": 0, **VALUES},
        "numTraining": 4, "file_ending": ".nii.gz"}))
    before = sorted(p.name for p in raw.rglob("*"))
    run = train(raw, tmp_path / "run", _config())
    assert RunFolder(run).has_weights()
    assert sorted(p.name for p in raw.rglob("*")) == before  # read where it lies: nothing copied or added


def test_a_label_declared_but_in_no_training_label_is_refused_in_one_line(tmp_path, capsys):
    data = _dataset(tmp_path / "data", n=4)
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"]["thrombus"] = 3000
    (data / "dataset.json").write_text(json.dumps(meta))
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--size", "tiny", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "thrombus = 3000" in err and "dataset.json" in err
    assert not (tmp_path / "run").exists()
