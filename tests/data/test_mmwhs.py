"""prepare-mmwhs: pairing, bad inputs, resumption, the way back to the original grid, registration.

The fixture is analytic: seven ellipsoids ("structures") in a world frame, rasterised on a CT grid
and, through a known rigid misalignment, on a coarser MR grid with another field of view, so the
two label maps overlap only partly until registration undoes the misalignment.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import ndimage

import crossmodalnet.data.mmwhs.pipeline as mmwhs_pipeline
from crossmodalnet.cli import main
from crossmodalnet.data.dataset import load_dataset
from crossmodalnet.data.io import Geometry, read_image, read_label, write_image, write_label
from crossmodalnet.data.labels import to_codes
from crossmodalnet.data.mmwhs import (
    PrepareConfig,
    assign_splits,
    find_pairs,
    load_record,
    parse_split,
    prepare_mmwhs,
    read_pairs_csv,
    restore_to_moving,
    restore_to_original,
)
from crossmodalnet.data.mmwhs.grid import label_dice
from crossmodalnet.data.mmwhs.register import RegistrationConfig
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.errors import CrossModalNetError

# (centre mm, radii mm) of structures 1..7, painted in order (the LV cavity inside the myocardium).
_BLOBS = [((0, 0, 0), (24, 20, 22)), ((-6, 28, 12), (14, 10, 11)), ((0, 0, 0), (15, 12, 14)),
          ((-26, 14, -6), (12, 13, 12)), ((-22, -14, -4), (12, 16, 14)), ((10, 22, 30), (7, 7, 14)),
          ((-14, -8, 30), (7, 7, 12))]
_CT_VALUE = np.array([-100, 150, 320, 300, 310, 290, 340, 330])  # HU-like, blood bright
_MR_VALUE = np.array([300, 500, 900, 700, 800, 600, 1000, 400])  # another contrast, not monotone in CT


def _labels(geometry: Geometry, rotation_deg: float = 0.0, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """(X, Y, Z) class indices of the blobs, seen through p -> R p + shift (the misalignment)."""
    ijk = np.indices(geometry.shape).reshape(3, -1).astype(np.float64)
    world = geometry.affine[:3, :3] @ ijk + geometry.affine[:3, 3:4]
    a = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    world = rot @ world + np.asarray(shift, dtype=np.float64)[:, None]
    labels = np.zeros(world.shape[1], dtype=np.uint8)
    for index, (centre, radii) in enumerate(_BLOBS, start=1):
        d = (world - np.asarray(centre, float)[:, None]) / np.asarray(radii, float)[:, None]
        labels[(d**2).sum(0) <= 1.0] = index
    return labels.reshape(geometry.shape)


def _grid(shape, spacing, centre) -> Geometry:
    """LPS-style axes (as DICOM-derived NIfTI files have), centred on `centre` (RAS mm)."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = np.asarray(centre, float) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return Geometry(affine=affine, shape=tuple(shape))


def _write_pair(raw, number: int, split: str = "train", seed: int = 0, labels: bool = True,
                mr_number: int | None = None, misaligned: bool = True):
    rng = np.random.default_rng(seed)
    ct_geom = _grid((40, 40, 40), (2.5, 2.5, 2.5), (0, 0, 5))
    mr_geom = _grid((36, 36, 28), (3.0, 3.0, 4.0), (4, -3, 0))
    ct_lab = _labels(ct_geom)
    mr_lab = _labels(mr_geom, 8.0, (6.0, -5.0, 4.0)) if misaligned else _labels(mr_geom)
    ct = _CT_VALUE[ct_lab] + rng.normal(0, 20, ct_geom.shape)
    mr = _MR_VALUE[mr_lab] * rng.uniform(0.8, 1.2) + rng.normal(0, 30, mr_geom.shape)
    for mod, img, lab, geom, num in (("ct", ct, ct_lab, ct_geom, number),
                                     ("mr", mr, mr_lab, mr_geom, mr_number or number)):
        stem = raw / f"{mod}_{split}" / f"{mod}_{split}_{num}"
        write_image(f"{stem}_image.nii.gz", np.rint(img), geom, dtype=np.int16)
        if labels:
            write_label(f"{stem}_label.nii.gz", to_codes(lab), geom)


def _raw(tmp_path, train=(1001, 1002), test=()):
    raw = tmp_path / "raw"
    for i, n in enumerate(train):
        _write_pair(raw, n, seed=i)
    for i, n in enumerate(test):
        _write_pair(raw, n, split="test", seed=100 + i, labels=False)
    return raw


def _cli(raw, out, *extra) -> int:
    return main(["prepare-mmwhs", str(raw), str(out), "--register", "none", "--size", "24", "--spacing", "4",
                 "--workers", "1", "--split", "1/1", *map(str, extra)])


def _one_line_error(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for w in words:
        assert w in err, err
    return err


def _nothing_written(out) -> None:
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert written == [], written


# ---------------------------------------------------------------------------------------------- pairing


def test_pairs_by_number_with_unlabeled_test_folders(tmp_path):
    raw = _raw(tmp_path, train=(1002, 1001), test=(2001,))
    pairs = find_pairs(raw)
    assert [p.id for p in pairs] == ["train_1001", "train_1002", "test_2001"]
    assert pairs[0].ct.name == "ct_train_1001_image.nii.gz" and pairs[0].mr_label.name == "mr_train_1001_label.nii.gz"
    assert pairs[2].ct_label is None and pairs[2].mr_label is None


def test_pairs_by_rank_when_numbers_differ(tmp_path):
    raw = tmp_path / "raw"
    _write_pair(raw, 1001, mr_number=1007)
    _write_pair(raw, 1002, mr_number=1003)
    assert [p.id for p in find_pairs(raw)] == ["train_ct1001_mr1003", "train_ct1002_mr1007"]


def test_ct_without_its_mr_names_the_missing_file(tmp_path, capsys):
    raw = _raw(tmp_path, train=(1001, 1002))
    _write_pair(raw, 1003)
    (raw / "mr_train" / "mr_train_1003_image.nii.gz").unlink()
    (raw / "mr_train" / "mr_train_1003_label.nii.gz").unlink()
    assert _cli(raw, tmp_path / "out") == 2
    _one_line_error(capsys, "ct_train_1003_image.nii.gz", "mr_train_1003_image.nii.gz", "--pairs")
    _nothing_written(tmp_path / "out")


def test_pairs_csv(tmp_path, capsys):
    raw = _raw(tmp_path, train=(1001, 1002))
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "ct", "mr"])
        w.writerow(["a", "ct_train/ct_train_1001_image.nii.gz", "mr_train/mr_train_1002_image.nii.gz"])
        w.writerow(["b", "ct_train/ct_train_1002_image.nii.gz", "mr_train/mr_train_1001_image.nii.gz"])
    pairs = read_pairs_csv(table, raw)
    assert [(p.id, p.ct.name, p.mr.name) for p in pairs] == [
        ("a", "ct_train_1001_image.nii.gz", "mr_train_1002_image.nii.gz"),
        ("b", "ct_train_1002_image.nii.gz", "mr_train_1001_image.nii.gz")]
    assert pairs[0].mr_label.name == "mr_train_1002_label.nii.gz"  # found beside the image
    with open(table, "a", newline="") as f:
        csv.writer(f).writerow(["c", "ct_train/ct_train_1009_image.nii.gz", "mr_train/mr_train_1001_image.nii.gz"])
    assert _cli(raw, tmp_path / "out", "--pairs", table) == 2
    _one_line_error(capsys, "pairs.csv line 4", "ct_train_1009_image.nii.gz", "not found")
    _nothing_written(tmp_path / "out")


# ---------------------------------------------------------------------------------------------- bad inputs


def test_missing_raw_folders(tmp_path, capsys):
    assert _cli(tmp_path / "nowhere", tmp_path / "out") == 2
    _one_line_error(capsys, "nowhere", "not found")
    raw = _raw(tmp_path, train=(1001,))
    for f in (raw / "mr_train").iterdir():
        f.unlink()
    (raw / "mr_train").rmdir()
    assert _cli(raw, tmp_path / "out") == 2
    _one_line_error(capsys, "mr_train", "folder not found")
    _nothing_written(tmp_path / "out")


def test_unreadable_file(tmp_path, capsys):
    raw = _raw(tmp_path, train=(1001, 1002))
    (raw / "mr_train" / "mr_train_1002_image.nii.gz").write_bytes(b"not a nifti file")
    assert _cli(raw, tmp_path / "out") == 2
    _one_line_error(capsys, "mr_train_1002_image.nii.gz", "cannot read as NIfTI")
    _nothing_written(tmp_path / "out")


def test_training_image_without_label(tmp_path, capsys):
    raw = _raw(tmp_path, train=(1001,))
    (raw / "ct_train" / "ct_train_1001_label.nii.gz").unlink()
    assert _cli(raw, tmp_path / "out") == 2
    _one_line_error(capsys, "ct_train_1001_image.nii.gz", "ct_train_1001_label.nii.gz")


def _poison_label(path, voxel: tuple[int, int, int], code: int) -> None:
    """Rewrite the MM-WHS label file `path` with `code` (outside the table) at `voxel`."""
    codes, geom, _ = read_label(path, MMWHS)
    bad = to_codes(codes)
    bad[voxel] = code
    write_label(path, bad, geom)


def test_label_codes_outside_the_table(tmp_path, capsys):
    raw = _raw(tmp_path, train=(1001,))
    path = raw / "ct_train" / "ct_train_1001_label.nii.gz"
    _poison_label(path, (0, 0, 0), 300)
    assert _cli(raw, tmp_path / "out") == 2
    _one_line_error(capsys, "ct_train_1001_label.nii.gz", "[300]")
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("text", ["15", "a/b", "1/2/3/4", "-1/5", "0/0"])
def test_bad_split(text):
    with pytest.raises(CrossModalNetError, match="--split"):
        parse_split(text)


def test_splits():
    ids = [f"train_{1001 + i}" for i in range(20)]
    s = assign_splits(ids, ["test_2001"], parse_split("15/5"), seed=0)
    assert [len(s[k]) for k in ("training", "validation", "test")] == [12, 3, 6]
    assert "test_2001" in s["test"] and sorted(sum(s.values(), [])) == sorted([*ids, "test_2001"])
    assert assign_splits(ids, [], parse_split("15/5"), seed=0) == assign_splits(ids, [], (15, None, 5), 0)
    assert assign_splits(ids, [], parse_split("15/5"), seed=1) != assign_splits(ids, [], (15, None, 5), 0)
    assert [len(v) for v in assign_splits(ids, [], parse_split("10/4/6"), 0).values()] == [10, 4, 6]


# ---------------------------------------------------------------------------------------------- resumption


def test_resumption_skips_done_cases_and_redoes_half_written_ones(tmp_path, monkeypatch, capsys):
    raw, out = _raw(tmp_path, train=(1001, 1002, 1003)), tmp_path / "out"
    assert _cli(raw, out) == 0
    assert "wrote" in capsys.readouterr().out
    data = load_dataset(out)  # every listed file exists; the per-case "record" key is no channel
    assert sum(len(data[s]) for s in ("training", "validation", "test")) == 3
    assert data.spec == MMWHS and all(c.present == (True, True) for s in data.splits.values() for c in s)
    calls = []
    real = mmwhs_pipeline.prepare_case
    monkeypatch.setattr(mmwhs_pipeline, "prepare_case", lambda pair, *a: calls.append(pair.id) or real(pair, *a))
    assert _cli(raw, out) == 0
    assert calls == []
    # Files present but no record (the marker written last): the case was cut short and is redone.
    (out / "records" / "train_1002.json").unlink()
    assert _cli(raw, out) == 0
    assert calls == ["train_1002"]
    # Other settings: every case is redone.
    calls.clear()
    assert _cli(raw, out, "--margin", "5") == 0
    assert sorted(calls) == ["train_1001", "train_1002", "train_1003"]
    # Another split seed moves the files of done cases instead of redoing them.
    calls.clear()
    before = {c.id for c in load_dataset(out)["test"]}
    for seed in range(1, 10):
        assert _cli(raw, out, "--margin", "5", "--seed", seed) == 0
        if {c.id for c in load_dataset(out)["test"]} != before:
            break
    assert calls == []
    data = load_dataset(out)
    assert all("imagesTs" in str(c.images[0].path) for c in data["test"])
    assert all("imagesTr" in str(c.images[0].path) for c in data["training"])


def test_two_worker_processes(tmp_path):
    raw, out = _raw(tmp_path, train=(1001, 1002)), tmp_path / "out"
    config = PrepareConfig(registration=RegistrationConfig("none"), spacing=(4.0,) * 3, size=(24,) * 3)
    path = prepare_mmwhs(raw, out, config, split="1/1", workers=2, progress=False)
    assert len(json.loads(path.read_text())["training"]) == 1
    assert sorted(p.name for p in (out / "records").iterdir()) == ["train_1001.json", "train_1002.json"]


# ---------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("fixed", ["mr", "ct"])
def test_round_trip_to_the_original_grid(tmp_path, fixed):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _write_pair(raw, 1001)
    config = PrepareConfig(fixed=fixed, registration=RegistrationConfig("none"), spacing=(1.5,) * 3, size=(80,) * 3)
    prepare_mmwhs(raw, out, config, split="1/0", workers=1, progress=False)
    record = load_record(out, "train_1001")
    prepared, grid, _ = read_label(out / record["files"]["label"], MMWHS)
    image, image_grid = read_image(out / record["files"][fixed])
    original, original_grid, _ = read_label(raw / f"{fixed}_train" / f"{fixed}_train_1001_label.nii.gz", MMWHS)
    # The prepared files carry the crop's own affine: a voxel's world position is where it shows.
    assert grid.same_grid(image_grid) and grid.spacing == pytest.approx((1.5, 1.5, 1.5))
    assert not grid.same_grid(original_grid)
    assert record["registration"]["label_inside_grid"] == 1.0
    # Each prepared voxel holds the original image's value at the same world point (the crop's affine,
    # not the uncropped one): compare with scipy's linear interpolation where the original reaches.
    raw_image, raw_grid = read_image(raw / f"{fixed}_train" / f"{fixed}_train_1001_image.nii.gz")
    ijk = np.indices(image.shape).reshape(3, -1).astype(np.float64)
    m = np.linalg.inv(raw_grid.affine) @ image_grid.affine
    where = m[:3, :3] @ ijk + m[:3, 3:4]
    inside = np.all((where >= 0) & (where <= np.asarray(raw_grid.shape)[:, None] - 1), axis=0)
    expected = ndimage.map_coordinates(raw_image, where[:, inside], order=1)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(image.reshape(-1)[inside], expected, atol=1e-3 * np.ptp(raw_image))
    back, back_grid = restore_to_original(prepared, record, grid)
    assert back_grid.same_grid(original_grid) and back.shape == original.shape
    dice = label_dice(back, original)
    assert min(dice.values()) >= 0.95 and np.mean(list(dice.values())) >= 0.98, dice
    # Scores (C, X, Y, Z) give the same label map as their argmax.
    one_hot = np.stack([prepared == c for c in range(8)]).astype(np.float32)
    assert np.array_equal(restore_to_original(one_hot, record)[0], back)
    with pytest.raises(CrossModalNetError, match="prepared grid"):
        restore_to_original(prepared[:-1], record)
    with pytest.raises(CrossModalNetError, match="prepared grid"):
        restore_to_original(prepared, record, original_grid)


def test_box_fallback_without_labels(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _write_pair(raw, 1001)
    _write_pair(raw, 2001, split="test", labels=False)
    config = PrepareConfig(registration=RegistrationConfig("none"), spacing=(4.0,) * 3, size=(24,) * 3)
    meta = json.loads(prepare_mmwhs(raw, out, config, split="1/0", workers=1, progress=False).read_text())
    assert [e["id"] for e in meta["test"]] == ["test_2001"] and "label" not in meta["test"][0]
    record = load_record(out, "test_2001")
    assert record["box"]["source"] == "field_of_view_centre"
    assert "dice_before" not in record["registration"]


# ---------------------------------------------------------------------------------------------- registration


@pytest.mark.parametrize("method, least", [("label", 0.85), ("image", None)])
def test_registration_raises_label_dice(tmp_path, method, least):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _write_pair(raw, 1001)
    reg = RegistrationConfig(method, spacing_mm=3.0, affine_iterations=(100, 50, 0), syn_iterations=(20, 10, 0))
    config = PrepareConfig(registration=reg, spacing=(2.0,) * 3, size=(56,) * 3)
    prepare_mmwhs(raw, out, config, split="1/0", workers=1, progress=False)
    record = load_record(out, "train_1001")
    before, after = record["registration"]["mean_dice_before"], record["registration"]["mean_dice_after"]
    assert after >= before + 0.15, (before, after)
    if least is not None:
        assert after >= least, (before, after)
    # The inverse carries the fixed label onto the moving (CT) grid, where it meets the CT's own label.
    prepared, _, _ = read_label(out / record["files"]["label"], MMWHS)
    on_ct, ct_grid = restore_to_moving(prepared, record, out)
    ct_label, ct_geom, _ = read_label(raw / "ct_train" / "ct_train_1001_label.nii.gz", MMWHS)
    assert ct_grid.same_grid(ct_geom)
    assert np.nanmean(list(label_dice(on_ct, ct_label).values())) >= after - 0.1
    report = (out / "registration_report.csv").read_text().splitlines()
    assert report[0].startswith("id,split,fixed,moving,method,mean_dice_before,mean_dice_after") and len(report) == 2


def test_bad_voxels_of_the_last_pair_stop_the_run_before_the_first_case(tmp_path, capsys):
    raw = _raw(tmp_path, train=(1001, 1002))
    path = raw / "mr_train" / "mr_train_1002_label.nii.gz"
    _poison_label(path, (1, 1, 1), 301)
    assert _cli(raw, tmp_path / "out") == 2
    _one_line_error(capsys, "mr_train_1002_label.nii.gz", "[301]")
    _nothing_written(tmp_path / "out")  # case 1001 comes first and was not started


def test_prepared_grid_over_the_memory_budget(tmp_path, capsys, monkeypatch):
    raw = _raw(tmp_path, train=(1001,))
    monkeypatch.setenv("CROSSMODALNET_MAX_IMAGE_BYTES", str(24**3 * 4 - 1))
    assert _cli(raw, tmp_path / "out") == 2  # --size 24
    _one_line_error(capsys, "--size 24x24x24", "over the memory budget")
    _nothing_written(tmp_path / "out")
