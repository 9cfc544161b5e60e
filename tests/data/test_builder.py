"""build_dataset: a dataset folder from files as they lie on disk (MyoPS naming), and its case-id rule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import one_line_error as refused

from crossmodalnet.data.builder import build_dataset, case_ids
from crossmodalnet.data.dataset import check_case, load_case, load_dataset

SHAPE = (8, 8, 8)
AFFINE = np.diag([1.25, 1.25, 2.0, 1.0])
CHANNELS = ("C0", "LGE", "T2")
LABELS = [("MYO", 200), ("LV", 500), ("RV", 600), ("edema", 1220), ("scar", 2221)]
REGIONS = [("myocardium", ["MYO", "edema", "scar"]), ("edema+scar", [1220, 2221]), ("scar", ["2221"])]
IDS = ["Case3001", "Case3002", "Case3003"]


def nii(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def gd(values=(0, 200, 500, 600, 1220, 2221)) -> np.ndarray:
    data = np.zeros(SHAPE, dtype=np.int16)
    for i, v in enumerate(values):
        data[i] = v
    return data


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """MyoPS as released: raw/Case300{1,2,3}_{C0,LGE,T2,gd}.nii.gz."""
    folder = tmp_path / "raw"
    for case in IDS:
        for c, channel in enumerate(CHANNELS):
            nii(folder / f"{case}_{channel}.nii.gz", np.full(SHAPE, c + 1, dtype=np.float32))
        nii(folder / f"{case}_gd.nii.gz", gd())
    return folder


def globs(raw: Path) -> list[tuple[str, str]]:
    return [(c, str(raw / f"Case*_{c}.nii.gz")) for c in CHANNELS]


def build(raw: Path, out: Path, **kwargs):
    args = {"channels": globs(raw), "label_glob": str(raw / "Case*_gd.nii.gz"), "labels": LABELS, "regions": REGIONS,
            **kwargs}
    return build_dataset(out, **args)




def test_myops_files_become_a_dataset_of_links(raw, tmp_path):
    out = tmp_path / "myops"
    built = build(raw, out, name="MyoPS")
    assert built.path == out and os.fspath(built) == str(out)
    ds = load_dataset(built)
    assert ds.name == "MyoPS" and ds.layout == "listed"
    assert ds.spec.channels == CHANNELS
    assert ds.spec.values == (200, 500, 600, 1220, 2221)
    assert [(r.name, r.values) for r in ds.spec.regions] == [
        ("myocardium", (200, 1220, 2221)), ("edema+scar", (1220, 2221)), ("scar", (2221,))]
    assert [c.id for c in ds["training"]] == IDS and ds["test"] == []
    for case in ds["training"]:
        check_case(case)
        for channel, ref in zip(CHANNELS, case.images, strict=True):
            link = out / "images" / channel / f"{case.id}.nii.gz"
            assert link.is_symlink()
            assert Path(os.readlink(link)) == (raw / f"{case.id}_{channel}.nii.gz").resolve()
            assert ref.path == (raw / f"{case.id}_{channel}.nii.gz").resolve()
        assert os.readlink(out / "labels" / f"{case.id}.nii.gz") == str((raw / f"{case.id}_gd.nii.gz").resolve())
    loaded = load_case(ds["training"][0], ds.spec)
    assert [float(im.mean()) for im in loaded["images"]] == [1.0, 2.0, 3.0]
    assert np.array_equal(ds.spec.to_values(loaded["label"]), gd())
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["training"][0]["images"] == ["images/C0/Case3001.nii.gz", "images/LGE/Case3001.nii.gz",
                                             "images/T2/Case3001.nii.gz"]
    assert meta["training"][0]["label"] == "labels/Case3001.nii.gz"
    assert meta["linked_from"] == [str(raw.resolve())]
    assert built.splits == {"training": 3, "validation": 0, "test": 0}
    assert built.voxels == {0: 3 * (512 - 5 * 64)} | {v: 3 * 64 for v in (200, 500, 600, 1220, 2221)}
    text = str(built)
    assert "3 cases (training 3)" in text and "C0 (3 cases)" in text and "scar=2221 (192)" in text


def test_relative_globs_start_in_the_current_folder(raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    built = build_dataset("out", [(c, f"raw/Case*_{c}.nii.gz") for c in CHANNELS], "raw/Case*_gd.nii.gz", LABELS,
                          train_regions=False)
    assert [c.id for c in load_dataset(built)["training"]] == IDS
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["linked_from"] == [str(raw.resolve())]


def test_grid_mismatch_names_every_bad_case_and_writes_nothing(raw, tmp_path):
    nii(raw / "Case3001_LGE.nii.gz", np.zeros((8, 8, 9), dtype=np.float32))
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    nii(raw / "Case3003_gd.nii.gz", gd(), shifted)
    out = tmp_path / "out"
    text = refused(lambda: build(raw, out), "2 cases do not share a grid",
                   "Case3001 (LGE shape (8, 8, 9) vs C0 (8, 8, 8))", "Case3003 (label affine differs from C0")
    assert "Case3002" not in text
    assert not out.exists()


def test_missing_channel_file_makes_a_null_entry(raw, tmp_path):
    (raw / "Case3002_T2.nii.gz").unlink()
    built = build(raw, tmp_path / "out")
    assert built.missing == {"T2": ["Case3002"]}
    assert "T2 (2 cases; missing in Case3002)" in str(built)
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["training"][1]["images"][2] is None
    case = load_dataset(built)["training"][1]
    assert case.present == (True, True, False)
    check_case(case)


def test_case_without_label_goes_to_test_unlabelled(raw, tmp_path):
    (raw / "Case3003_gd.nii.gz").unlink()
    ds = load_dataset(build(raw, tmp_path / "out"))
    assert [c.id for c in ds["training"]] == IDS[:2]
    assert [c.id for c in ds["test"]] == ["Case3003"] and ds["test"][0].label is None


def test_test_fraction_holds_out_labelled_cases(raw, tmp_path):
    built = build(raw, tmp_path / "out", test_fraction=0.34, seed=1)
    assert built.splits == {"training": 2, "validation": 0, "test": 1}
    assert load_dataset(built)["test"][0].label is not None


def test_label_file_without_images_is_refused(raw, tmp_path):
    nii(raw / "Case3009_gd.nii.gz", gd())
    refused(lambda: build(raw, tmp_path / "out"), "Case3009_gd.nii.gz", "without images", "'Case3009'")
    assert not (tmp_path / "out").exists()


def test_undeclared_label_value_is_refused(raw, tmp_path):
    nii(raw / "Case3002_gd.nii.gz", gd((0, 200, 700)))
    refused(lambda: build(raw, tmp_path / "out"), str(raw / "Case3002_gd.nii.gz"), "label value 700 not declared",
            "MYO=200")
    assert not (tmp_path / "out").exists()


def test_declared_value_found_in_no_label_file_is_refused(raw, tmp_path):
    refused(lambda: build_dataset(tmp_path / "out", globs(raw), str(raw / "Case*_gd.nii.gz"),
                                  [*LABELS, ("other", 4000)]),
            "other=4000 found in no label file")
    assert not (tmp_path / "out").exists()


def test_copy_copies(raw, tmp_path):
    out = tmp_path / "out"
    built = build(raw, out, copy=True)
    link = out / "images" / "LGE" / "Case3002.nii.gz"
    assert link.is_file() and not link.is_symlink()
    assert link.read_bytes() == (raw / "Case3002_LGE.nii.gz").read_bytes()
    assert "linked_from" not in json.loads((out / "dataset.json").read_text())
    for case in load_dataset(built)["training"]:
        check_case(case)
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # no temp files left


def test_output_folder_must_be_new_or_empty(raw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    build(raw, out)  # empty: fine
    refused(lambda: build(raw, out), str(out), "not empty")
    (tmp_path / "file").write_text("x")
    refused(lambda: build(raw, tmp_path / "file"), "a file of that name exists")


def test_bad_arguments_are_refused_in_one_line(raw, tmp_path):
    out = tmp_path / "out"
    refused(lambda: build(raw, out, channels=[("C0", str(raw / "Nope*.nii.gz"))]), "C0", "matches no file")
    refused(lambda: build(raw, out, channels=[("C0", str(raw / "Case3001_C0.nii.gz"))]), "no wildcard")
    refused(lambda: build(raw, out, labels=[("MYO", 200), ("MYO", 500)]), "'MYO' is declared twice")
    refused(lambda: build(raw, out, regions=[("r", ["fat"])]), "--region r", "'fat'")
    refused(lambda: build(raw, out, channels=[("C0", str(raw / "Case*.nii.gz"))]), "Case3001_gd.nii.gz",
            "matched by both C0 glob", "and label glob")
    refused(lambda: build(raw, out, channels=[("C 0", str(raw / "Case*_C0.nii.gz"))]), "'C 0'")
    refused(lambda: build(raw, out, channels=[("Label", str(raw / "Case*_C0.nii.gz"))]), "--channel Label")
    refused(lambda: build(raw, out, test_fraction=1.0), "test fraction")
    (raw / "Case3001_C0.json").write_text("{}")
    refused(lambda: build(raw, out, channels=[("C0", str(raw / "Case*_C0.*"))]), "Case3001_C0.json", "not a NIfTI")
    assert not out.exists()


def test_train_regions_paints_back_in_nested_order(raw, tmp_path):
    regions = [("myocardium", "MYO,edema,scar"), ("edema+scar", "1220,2221"), ("scar", "scar")]  # as typed
    spec = load_dataset(build(raw, tmp_path / "out", regions=regions, train_regions=True)).spec
    assert [r.values for r in spec.regions] == [(200, 1220, 2221), (1220, 2221), (2221,)]
    assert spec.train_regions and spec.region_order == (200, 1220, 2221)


# --- the id rule --------------------------------------------------------------------------------
def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_ids_nnunet_naming(tmp_path):
    touch(tmp_path, "imagesTr/BraTS_001_0000.nii.gz", "imagesTr/BraTS_001_0001.nii.gz", "labelsTr/BraTS_001.nii.gz")
    found = case_ids([("T1", f"{tmp_path}/imagesTr/*_0000.nii.gz"), ("T2", f"{tmp_path}/imagesTr/*_0001.nii.gz"),
                      ("label", f"{tmp_path}/labelsTr/*.nii.gz")])
    assert list(found) == ["BraTS_001"]
    # Without the label the channel globs still share only "_": not "BraTS_001_000".
    found = case_ids([("T1", f"{tmp_path}/imagesTr/*_0000.nii.gz"), ("T2", f"{tmp_path}/imagesTr/*_0001.nii.gz")])
    assert list(found) == ["BraTS_001"]


def test_ids_folder_per_case(tmp_path):
    touch(tmp_path, "kits/case_00000/imaging.nii.gz", "kits/case_00000/segmentation.nii.gz",
          "kits/case_00001/imaging.nii.gz")
    found = case_ids([("CT", f"{tmp_path}/kits/*/imaging.nii.gz"), ("label", f"{tmp_path}/kits/*/segmentation.nii.gz")])
    assert {k: sorted(v) for k, v in found.items()} == {"case_00000": ["CT", "label"], "case_00001": ["CT"]}
    # One glob: the id stays within the folder that changes.
    assert list(case_ids([("CT", f"{tmp_path}/kits/*/imaging.nii.gz")])) == ["case_00000", "case_00001"]


def test_ids_shared_prefix_and_single_glob(tmp_path):
    touch(tmp_path, "mr_case7.nii.gz", "ct_case7.nii", "Case3001_C0.nii.gz")
    assert list(case_ids([("MR", f"{tmp_path}/mr_case*.nii.gz"), ("CT", f"{tmp_path}/ct_case*.nii")])) == ["case7"]
    # A single glob has no channel-specific text: the whole name is the id.
    assert list(case_ids([("C0", f"{tmp_path}/Case*_C0.nii.gz")])) == ["Case3001_C0"]


def test_ids_recursive_glob(tmp_path):
    touch(tmp_path, "a/Case1_C0.nii.gz", "a/Case1_gd.nii.gz", "b/c/Case2_C0.nii.gz", "b/c/Case2_gd.nii.gz",
          "Case3_C0.nii.gz", "Case3_gd.nii.gz")
    found = case_ids([("C0", f"{tmp_path}/**/Case*_C0.nii.gz"), ("label", f"{tmp_path}/**/Case*_gd.nii.gz")])
    assert sorted(found) == ["Case3", "a_Case1", "b_c_Case2"]
    assert all(len(files) == 2 for files in found.values())


def test_ids_clashes_are_refused(tmp_path):
    touch(tmp_path, "Case1_C0.nii.gz", "Case1_C0.nii", "Case2_C0.nii.gz", "case2_LGE.nii.gz")
    # Two files of one glob with one id.
    refused(lambda: case_ids([("C0", f"{tmp_path}/Case*_C0.nii*")]), "C0 glob", "gives case id 'Case1_C0'",
            "narrower")
    # Ids differing in letter case only.
    refused(lambda: case_ids([("C0", f"{tmp_path}/*_C0.nii.gz"), ("LGE", f"{tmp_path}/*_LGE.nii.gz")]),
            "case2_LGE.nii.gz", "'case2'", "'Case2'", "letter case")
    # An id that is not a file name.
    touch(tmp_path, "_.nii.gz")
    refused(lambda: case_ids([("C0", f"{tmp_path}/*.nii.gz")]), "_.nii.gz", "case id ''")


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_write_leaves_the_output_folder_as_found(raw, tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    calls = []
    real = os.symlink

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 5:
            raise OSError(28, "No space left on device", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "symlink", flaky)
    with pytest.raises(OSError):
        build(raw, out)
    assert (out.is_dir() and not any(out.iterdir())) if existing else not out.exists()
