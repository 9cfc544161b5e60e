"""dataset.json: round trip, files checked before work, paths kept inside, grids checked per case."""

import json
import zlib

import numpy as np
import pytest

from crossmodalnet.data.dataset import (
    ImageRef,
    check_case,
    check_case_id,
    load_case,
    load_dataset,
    read_spec,
    write_dataset_json,
)
from crossmodalnet.data.io import Geometry, write_image, write_label
from crossmodalnet.data.labels import NUM_CLASSES, to_codes
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.errors import CrossModalNetError

SHAPE = (6, 7, 8)
GEOM = Geometry.from_spacing(SHAPE, (1.0, 1.0, 2.0), origin=(-3.0, 4.0, 5.0))


def _write_case(root, cid, geom=GEOM, mr_geom=None, label=None, ct=None):
    rng = np.random.default_rng(zlib.crc32(cid.encode()))  # fixed per case, not per process
    ct = rng.normal(size=SHAPE).astype(np.float32) if ct is None else ct
    label = rng.integers(0, NUM_CLASSES, size=SHAPE) if label is None else label
    mr_geom = geom if mr_geom is None else mr_geom
    write_image(root / "imagesTr" / f"{cid}_ct.nii.gz", ct, geom)
    write_image(root / "imagesTr" / f"{cid}_mr.nii.gz", rng.normal(size=mr_geom.shape), mr_geom)
    write_label(root / "labelsTr" / f"{cid}.nii.gz", label, geom)
    return {"id": cid, "ct": f"imagesTr/{cid}_ct.nii.gz", "mr": f"imagesTr/{cid}_mr.nii.gz",
            "label": f"labelsTr/{cid}.nii.gz"}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    entries = [_write_case(root, f"case_{i}") for i in range(3)]
    write_dataset_json(root, {"training": entries[:2], "test": entries[2:]}, name="tiny", spec=MMWHS)
    return root


def _load_mmwhs(case):
    return load_case(case, MMWHS)


def _edit_json(root, **changes):
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta))


def test_round_trip(folder):
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "MR"}
    assert meta["labels"] == {"background": 0, "MYO": 205, "LA": 420, "LV": 500, "RA": 550, "RV": 600, "AO": 820,
                              "PA": 850}
    assert meta["encloses"] == {"MYO": ["LV"]}
    ds = load_dataset(folder)
    assert ds.name == "tiny" and ds.layout == "listed"
    assert ds.spec == MMWHS == read_spec(folder)
    assert ds.spec.enclosures == MMWHS.enclosures == ((1, (3,)),)
    assert [c.id for c in ds["training"]] == ["case_0", "case_1"]
    assert [c.id for c in ds["test"]] == ["case_2"]
    assert ds["validation"] == []
    case = ds["training"][1]
    assert case.images == (ImageRef((folder / "imagesTr" / "case_1_ct.nii.gz").resolve()),
                           ImageRef((folder / "imagesTr" / "case_1_mr.nii.gz").resolve()))
    assert case.present == (True, True)
    assert case.label.is_absolute()
    assert case.files == [ref.path for ref in case.images] + [case.label]


def test_load_case_reads_arrays_on_one_grid(folder):
    case = load_dataset(folder)["training"][0]
    assert check_case(case).same_grid(GEOM)
    data = load_case(case, MMWHS)
    ct, mr = data["images"]
    assert ct.shape == mr.shape == data["label"].shape == SHAPE
    assert ct.dtype == mr.dtype == np.float32 and data["label"].dtype == np.uint8
    assert data["geometry"].same_grid(GEOM)
    assert load_case(case, MMWHS, with_label=False)["label"] is None


def test_labels_in_codes_are_read_as_indices(tmp_path):
    root = tmp_path / "d"
    indices = np.random.default_rng(1).integers(0, NUM_CLASSES, size=SHAPE).astype(np.uint8)
    entry = _write_case(root, "c", label=to_codes(indices))
    write_dataset_json(root, {"training": [entry]}, name="codes", spec=MMWHS)
    np.testing.assert_array_equal(load_case(load_dataset(root)["training"][0], MMWHS)["label"], indices)


def test_missing_file_is_found_before_any_work(folder):
    (folder / "imagesTr" / "case_2_mr.nii.gz").unlink()
    with pytest.raises(CrossModalNetError, match=r"dataset.json: listed file 'imagesTr/case_2_mr.nii.gz'"):
        load_dataset(folder)
    assert load_dataset(folder, check_files=False)["test"][0].id == "case_2"


@pytest.mark.parametrize("bad", ["../outside.nii.gz", "imagesTr/../../outside.nii.gz", "/etc/passwd"])
def test_paths_may_not_leave_the_folder(folder, bad):
    (folder.parent / "outside.nii.gz").write_bytes(b"x")
    _edit_json(folder, training=[{"ct": bad, "mr": "imagesTr/case_0_mr.nii.gz"}])
    with pytest.raises(CrossModalNetError, match="leaves the dataset folder") as exc:
        load_dataset(folder)
    assert str(folder / "dataset.json") in str(exc.value)


def _mmwhs_json(**fields) -> str:
    """dataset.json text: the MM-WHS channels and labels, and `fields`."""
    return json.dumps({**MMWHS.to_dict(), **fields})


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"training": [', "invalid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"training": []}', "names no channels"),
        ('{"modality": {"0": "MR", "1": "CT"}, "training": []}', "'labels' must be a non-empty mapping"),
        (_mmwhs_json(training={}), "'training' must be a list"),
        (_mmwhs_json(test="imagesTs/a.nii.gz"), "'test' must be a list"),
        (_mmwhs_json(training=[{"label": "x.nii.gz"}]), r"training\[0\] gives none of the channels"),
        (_mmwhs_json(training=[{"pet": "x.nii.gz"}]), r"training\[0\] key 'pet' is not a channel"),
        (_mmwhs_json(training=[]), "lists no cases"),
        ('{"modality": {"0": "MR", "1": "mr"}, "labels": {"0": "background", "1": "LV"}}', "channel names must differ"),
        ('{"modality": {"0": "A", "1": "B", "2": "C", "3": "D", "4": "E"}, "labels": {"1": "x"}}',
         "5 channels; crossmodalnet takes 1 to 4"),
        ('{"modality": {"0": "CT"}, "labels": {"0": "background"}, "training": []}',
         "needs at least one foreground label"),
    ],
)
def test_invalid_dataset_json(tmp_path, text, match):
    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(CrossModalNetError, match=match) as exc:
        load_dataset(tmp_path)
    assert str(tmp_path / "dataset.json") in str(exc.value)
    assert "\n" not in str(exc.value)


def test_channel_order_is_the_datasets_own(tmp_path):
    """Channels are named by the dataset: MR before CT is a valid two-channel dataset (it was refused when
    the package knew only CT + MR), and keys named by the channels land in the dataset's order."""
    root = tmp_path / "d"
    entry = _write_case(root, "c")
    meta = {"name": "swapped", "modality": {"0": "MR", "1": "CT"}, "labels": {"0": "background", "1": "MYO"},
            "training": [entry]}
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(root)
    assert ds.spec.channels == ("MR", "CT")
    case = ds["training"][0]
    assert [ref.path.name for ref in case.images] == ["c_mr.nii.gz", "c_ct.nii.gz"]


def test_no_dataset_json(tmp_path):
    with pytest.raises(CrossModalNetError, match="dataset.json: not found"):
        load_dataset(tmp_path)


def test_ct_mr_label_grids_that_disagree(tmp_path):
    root = tmp_path / "d"
    shifted = Geometry(GEOM.affine + np.pad(np.full((3, 1), 0.5), ((0, 1), (3, 0))), SHAPE)
    other_shape = Geometry.from_spacing((6, 7, 9), (1.0, 1.0, 2.0), origin=(-3.0, 4.0, 5.0))
    entries = [_write_case(root, "moved", mr_geom=shifted), _write_case(root, "resized", mr_geom=other_shape)]
    write_dataset_json(root, {"training": entries}, name="bad grids", spec=MMWHS)
    moved, resized = load_dataset(root)["training"]
    for reader in (check_case, _load_mmwhs):
        with pytest.raises(CrossModalNetError, match=r"moved_mr.nii.gz: affine differs .* by up to 0.5 mm"):
            reader(moved)
        with pytest.raises(CrossModalNetError, match=r"resized_mr.nii.gz: shape \(6, 7, 9\) differs"):
            reader(resized)


def test_bad_voxels_name_the_file(tmp_path):
    root = tmp_path / "d"
    ct = np.zeros(SHAPE, dtype=np.float32)
    ct[1, 1, 1] = np.nan
    label = np.zeros(SHAPE, dtype=np.int16)
    label[0, 0, 0] = 9
    entries = [_write_case(root, "nan_ct", ct=ct), _write_case(root, "bad_label", label=label)]
    write_dataset_json(root, {"training": entries}, name="bad voxels", spec=MMWHS)
    nan_case, label_case = load_dataset(root)["training"]
    with pytest.raises(CrossModalNetError, match=r"nan_ct_ct.nii.gz: 1 voxels are NaN or Inf"):
        load_case(nan_case, MMWHS)
    with pytest.raises(CrossModalNetError, match=r"bad_label.nii.gz: label values \[9\]"):
        load_case(label_case, MMWHS)


def test_corrupt_file_in_check_case(folder):
    (folder / "imagesTr" / "case_0_mr.nii.gz").write_bytes(np.random.default_rng(0).bytes(512))
    case = load_dataset(folder)["training"][0]
    with pytest.raises(CrossModalNetError, match=r"case_0_mr.nii.gz: cannot read as NIfTI"):
        check_case(case)
    with pytest.raises(CrossModalNetError, match=r"case_0_mr.nii.gz: cannot read as NIfTI"):
        load_case(case, MMWHS)


# --- case ids: they name output files ---------------------------------------------------------------


@pytest.mark.parametrize("good", ["case_0", "A", "1001", "ct.mr-2", "x" * 128])
def test_safe_case_ids(good):
    assert check_case_id(good) is None


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "/x", "a/b", "a\\b", ".hidden", "-x", "_x", "x" * 129, "é",
                                 "a b", "a\x00", 5, None])
def test_unsafe_case_ids(bad):
    assert check_case_id(bad)


def test_case_ids_unique_across_splits_ignoring_case(folder):
    meta = json.loads((folder / "dataset.json").read_text())
    meta["test"][0]["id"] = "CASE_0"  # training[0] is case_0
    (folder / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(CrossModalNetError, match=r"test\[0\] id 'CASE_0' is also the id of training\[0\]"):
        load_dataset(folder)


def test_ids_taken_from_file_names_are_checked(folder):
    meta = json.loads((folder / "dataset.json").read_text())
    for entry in meta["training"]:
        entry.pop("id")
    (folder / "dataset.json").write_text(json.dumps(meta))
    assert [c.id for c in load_dataset(folder)["training"]] == ["case_0_ct", "case_1_ct"]
    (folder / "imagesTr" / "case_0_ct.nii.gz").rename(folder / "imagesTr" / ".case_0_ct.nii.gz")
    meta["training"][0]["ct"] = "imagesTr/.case_0_ct.nii.gz"
    (folder / "dataset.json").write_text(json.dumps(meta))
    # The id is the file name less .nii.gz: a hidden name is refused, as a given id would be.
    with pytest.raises(CrossModalNetError, match=r"training\[0\] id \(taken from the file name\) '\.case_0_ct' must"):
        load_dataset(folder)


def test_check_case_applies_the_header_checks(folder, monkeypatch):
    case = load_dataset(folder)["training"][0]
    monkeypatch.setenv("CROSSMODALNET_MAX_IMAGE_BYTES", "1000")  # below the 6x7x8 float32 volume
    with pytest.raises(CrossModalNetError, match=r"case_0_ct.nii.gz: the header claims 6x7x8 voxels"):
        check_case(case)


def test_one_case_may_be_listed_in_two_splits_but_not_twice_in_one(folder):
    meta = json.loads((folder / "dataset.json").read_text())
    meta["test"].append(dict(meta["training"][0]))  # case_0 in training and in test: the same files
    (folder / "dataset.json").write_text(json.dumps(meta))
    assert [c.id for c in load_dataset(folder)["test"]] == ["case_2", "case_0"]
    meta["test"].append(dict(meta["training"][0]))  # and twice in test
    (folder / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(CrossModalNetError, match=r"test\[2\] id 'case_0' is also the id of test\[1\]"):
        load_dataset(folder)
