"""Dataset layouts: listed (ours), nnU-Net v2 raw, MSD with 4D images; and one-line refusals of bad ones.

Every dataset is made here of 8^3 NIfTI files in tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from helpers import one_line_error

from crossmodalnet.data.dataset import check_case, load_case, load_dataset
from crossmodalnet.data.io import read_label

SHAPE = (8, 8, 8)
AFFINE = np.diag([1.25, 1.25, 2.0, 1.0])
MYOPS_LABELS = {"background": 0, "MYO": 200, "LV": 500, "RV": 600, "edema": 1220, "scar": 2221}
MYOPS_REGIONS = {"myocardium": [200, 1220, 2221], "edema+scar": [1220, 2221], "scar": [2221]}


def nii(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def image(path: Path, fill: float = 1.0) -> Path:
    return nii(path, np.full(SHAPE, fill, dtype=np.float32))


def label(path: Path, values: list[int]) -> Path:
    """A label map holding each of `values` in a slab."""
    data = np.zeros(SHAPE, dtype=np.int16)
    for i, v in enumerate(values):
        data[i % SHAPE[0]] = v
    return nii(path, data)


def write_json(root: Path, meta: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root




# --- listed -------------------------------------------------------------------------------------
def myops_listed(root: Path, cases: int = 3) -> Path:
    training = []
    for i in range(cases):
        case = f"Case{3001 + i}"
        for c, channel in enumerate(("C0", "LGE", "T2")):
            image(root / channel / f"{case}.nii.gz", fill=c + 1)
        label(root / "gd" / f"{case}.nii.gz", [0, 200, 500, 600, 1220, 2221])
        training.append({"id": case, "images": [f"{ch}/{case}.nii.gz" for ch in ("C0", "LGE", "T2")],
                         "label": f"gd/{case}.nii.gz"})
    meta = {"name": "MyoPS", "channel_names": {"0": "C0", "1": "LGE", "2": "T2"}, "labels": MYOPS_LABELS,
            "regions": MYOPS_REGIONS, "training": training[:-1], "validation": training[-1:]}
    return write_json(root, meta)


def test_listed_three_channels_myops(tmp_path):
    ds = load_dataset(myops_listed(tmp_path))
    assert ds.layout == "listed" and ds.name == "MyoPS"
    assert ds.spec.channels == ("C0", "LGE", "T2")
    assert ds.spec.values == (200, 500, 600, 1220, 2221)
    assert ds.spec.names == ("MYO", "LV", "RV", "edema", "scar")
    assert {r.name: list(r.values) for r in ds.spec.regions} == MYOPS_REGIONS
    assert not ds.spec.train_regions
    assert [c.id for c in ds["training"]] == ["Case3001", "Case3002"]
    assert [c.id for c in ds["validation"]] == ["Case3003"]
    assert ds["test"] == []
    case = ds["training"][0]
    assert case.images[1].path == (tmp_path / "LGE" / "Case3001.nii.gz").resolve()
    assert case.label == (tmp_path / "gd" / "Case3001.nii.gz").resolve()
    assert case.present == (True, True, True)
    assert check_case(case).shape == SHAPE
    loaded = load_case(case, ds.spec)
    assert [float(im.mean()) for im in loaded["images"]] == [1.0, 2.0, 3.0]
    assert set(np.unique(loaded["label"]).tolist()) == {0, 1, 2, 3, 4, 5}


def test_listed_one_channel_with_keys_named_by_channel(tmp_path):
    image(tmp_path / "ct" / "a.nii.gz")
    label(tmp_path / "seg" / "a.nii.gz", [0, 1, 2])
    image(tmp_path / "ct" / "b.nii.gz")
    write_json(tmp_path, {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
                          "training": [{"CT": "ct/a.nii.gz", "label": "seg/a.nii.gz"}],
                          "test": [{"ct": "ct/b.nii.gz"}]})
    ds = load_dataset(tmp_path)
    assert ds.spec.channels == ("CT",) and ds.spec.num_classes == 3
    assert [c.id for c in ds["training"]] == ["a"]  # the file name without its ending
    assert ds["test"][0].id == "b" and ds["test"][0].label is None
    loaded = load_case(ds["training"][0], ds.spec)
    assert len(loaded["images"]) == 1 and loaded["label"].max() == 2


def test_listed_case_missing_a_channel(tmp_path):
    root = myops_listed(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1]["images"][2] = None
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(root)
    case = ds["training"][1]
    assert case.present == (True, True, False)
    assert case.images[2] is None
    check_case(case)
    loaded = load_case(case, ds.spec)
    assert loaded["images"][2] is None and loaded["images"][0] is not None


# --- nnU-Net v2 raw -----------------------------------------------------------------------------
def nnunet_raw(root: Path, channels: int = 2, regions: bool = False) -> Path:
    for case in ("prostate_00", "prostate_01"):
        for c in range(channels):
            image(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", fill=c + 1)
        label(root / "labelsTr" / f"{case}.nii.gz", [0, 1, 2, 3] if regions else [0, 1, 2])
    for c in range(channels):
        image(root / "imagesTs" / f"prostate_09_{c:04d}.nii.gz")
    labels = ({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3} if regions
              else {"background": 0, "PZ": 1, "TZ": 2})
    meta = {"channel_names": {str(c): name for c, name in enumerate(["T2", "ADC", "DWI"][:channels])},
            "labels": labels, "numTraining": 2, "file_ending": ".nii.gz"}
    if regions:
        meta["regions_class_order"] = [1, 2, 3]
    return write_json(root, meta)


def test_nnunet_v2_raw_folder_loads_in_place(tmp_path):
    root = nnunet_raw(tmp_path / "Dataset005_Prostate")
    ds = load_dataset(root)
    assert ds.layout == "nnunet"
    assert ds.spec.channels == ("T2", "ADC") and ds.spec.names == ("PZ", "TZ")
    assert [c.id for c in ds["training"]] == ["prostate_00", "prostate_01"]
    assert [c.id for c in ds["test"]] == ["prostate_09"]
    case = ds["training"][1]
    # No copy: the case reads the files of the raw folder.
    assert case.images[0].path == (root / "imagesTr" / "prostate_01_0000.nii.gz").resolve()
    assert case.images[1].path == (root / "imagesTr" / "prostate_01_0001.nii.gz").resolve()
    assert case.label == (root / "labelsTr" / "prostate_01.nii.gz").resolve()
    assert ds["test"][0].label is None
    loaded = load_case(case, ds.spec)
    assert [float(im.mean()) for im in loaded["images"]] == [1.0, 2.0]
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == sorted(
        ["dataset.json", "prostate_00_0000.nii.gz", "prostate_00_0001.nii.gz", "prostate_01_0000.nii.gz",
         "prostate_01_0001.nii.gz", "prostate_00.nii.gz", "prostate_01.nii.gz", "prostate_09_0000.nii.gz",
         "prostate_09_0001.nii.gz"])


def test_nnunet_v2_region_dataset_trains_on_regions(tmp_path):
    ds = load_dataset(nnunet_raw(tmp_path / "Dataset001_BraTS", regions=True))
    spec = ds.spec
    assert spec.train_regions and spec.region_order == (1, 2, 3)
    assert [r.name for r in spec.regions] == ["whole", "core", "enhancing"]
    assert spec.num_outputs == 3
    loaded = load_case(ds["training"][0], spec)
    masks = spec.region_masks(loaded["label"])
    assert np.array_equal(spec.paint_regions(masks), loaded["label"])


def test_nnunet_v2_case_missing_a_test_channel(tmp_path):
    root = nnunet_raw(tmp_path / "Dataset005_Prostate")
    (root / "imagesTs" / "prostate_09_0001.nii.gz").unlink()
    case = load_dataset(root)["test"][0]
    assert case.present == (True, False)


# --- MSD ----------------------------------------------------------------------------------------
def msd(root: Path, volumes: int = 4, channels: int = 4) -> Path:
    for case in ("BRATS_001", "BRATS_002"):
        data = np.stack([np.full(SHAPE, v + 1, dtype=np.float32) for v in range(volumes)], axis=-1)
        nii(root / "imagesTr" / f"{case}.nii.gz", data)
        label(root / "labelsTr" / f"{case}.nii.gz", [0, 1, 2, 3])
    nii(root / "imagesTs" / "BRATS_485.nii.gz", np.ones((*SHAPE, volumes), dtype=np.float32))
    meta = {"name": "BrainTumour", "modality": {str(i): n for i, n in enumerate(["FLAIR", "T1w", "t1gd", "T2w"])
                                                if i < channels},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "numTraining": 2, "numTest": 1,
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                         for c in ("BRATS_001", "BRATS_002")],
            "test": ["./imagesTs/BRATS_485.nii.gz"]}
    return write_json(root, meta)


def test_msd_4d_images_are_read_volume_by_volume(tmp_path):
    root = msd(tmp_path / "Task01_BrainTumour")
    ds = load_dataset(root)
    assert ds.spec.channels == ("FLAIR", "T1w", "t1gd", "T2w")
    assert ds.spec.names == ("edema", "non-enhancing tumor", "enhancing tumour")
    assert [c.id for c in ds["training"]] == ["BRATS_001", "BRATS_002"]
    assert [c.id for c in ds["test"]] == ["BRATS_485"] and ds["test"][0].label is None
    case = ds["training"][0]
    file = (root / "imagesTr" / "BRATS_001.nii.gz").resolve()
    assert [(ref.path, ref.volume) for ref in case.images] == [(file, v) for v in range(4)]
    assert check_case(case).shape == SHAPE
    loaded = load_case(case, ds.spec)
    for v, im in enumerate(loaded["images"]):
        assert im.shape == SHAPE and float(im.mean()) == v + 1  # volume v of the 4D file
    assert set(np.unique(loaded["label"]).tolist()) == {0, 1, 2, 3}


# --- refusals -----------------------------------------------------------------------------------
def test_nnunet_unknown_channel_index_names_the_file(tmp_path):
    root = nnunet_raw(tmp_path / "Dataset005_Prostate", channels=3)
    image(root / "imagesTr" / "prostate_00_0003.nii.gz")
    text = one_line_error(lambda: load_dataset(root), "prostate_00_0003.nii.gz", "0003")
    assert "3: ['T2', 'ADC', 'DWI']" in text


def test_msd_4d_file_with_fewer_volumes_than_channels(tmp_path):
    root = msd(tmp_path / "Task01_BrainTumour", volumes=2)
    ds = load_dataset(root)  # headers are not read here
    case = ds["training"][0]
    text = one_line_error(lambda: load_case(case, ds.spec), "BRATS_001.nii.gz")
    assert "has 2 channels along its 4th axis, no channel 2" in text
    one_line_error(lambda: check_case(case), "BRATS_001.nii.gz")


def test_region_naming_an_unknown_label(tmp_path):
    root = myops_listed(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["regions"]["scar"] = ["scarr"]
    (root / "dataset.json").write_text(json.dumps(meta))
    text = one_line_error(lambda: load_dataset(root), str(root / "dataset.json"), "'scarr'")
    assert "region 'scar' names unknown label" in text
    meta["regions"]["scar"] = [2222]
    (root / "dataset.json").write_text(json.dumps(meta))
    one_line_error(lambda: load_dataset(root), str(root / "dataset.json"), "[2222]")


def test_undeclared_label_value_in_a_label_file(tmp_path):
    root = myops_listed(tmp_path)
    label(root / "gd" / "Case3002.nii.gz", [0, 200, 700])
    ds = load_dataset(root)
    bad = str((root / "gd" / "Case3002.nii.gz").resolve())
    text = one_line_error(lambda: load_case(ds["training"][1], ds.spec), bad, "[700]")
    assert "not labels of the dataset" in text
    one_line_error(lambda: read_label(bad, ds.spec), bad, "[700]")


def test_channel_names_with_a_gap(tmp_path):
    root = nnunet_raw(tmp_path / "Dataset005_Prostate")
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T2", "2": "ADC"}
    (root / "dataset.json").write_text(json.dumps(meta))
    text = one_line_error(lambda: load_dataset(root), str(root / "dataset.json"), "channel_names")
    assert "without gaps, got [0, 2]" in text


def test_duplicate_label_values(tmp_path):
    root = myops_listed(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"]["LV"] = 200
    (root / "dataset.json").write_text(json.dumps(meta))
    one_line_error(lambda: load_dataset(root), str(root / "dataset.json"), "'MYO' and 'LV' share the value 200")


def test_listed_images_of_the_wrong_length(tmp_path):
    root = myops_listed(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["images"] = meta["training"][0]["images"][:2]
    (root / "dataset.json").write_text(json.dumps(meta))
    one_line_error(lambda: load_dataset(root), str(root / "dataset.json"), "training[0].images lists 2 files")


def test_nnunet_label_without_images(tmp_path):
    root = nnunet_raw(tmp_path / "Dataset005_Prostate")
    label(root / "labelsTr" / "prostate_05.nii.gz", [0, 1])
    one_line_error(lambda: load_dataset(root), "prostate_05.nii.gz", "a label without images")
