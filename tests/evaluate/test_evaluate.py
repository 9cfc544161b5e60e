"""The evaluator: exact values on hand-computable shapes, both HD95 conventions against an
independent implementation, the empty-mask rules, file matching, and the CLI's error paths."""

import csv
import json
import math
import os

import numpy as np
import pytest
from scipy import ndimage

from crossmodalnet.cli import main
from crossmodalnet.data.io import Geometry, write_label
from crossmodalnet.data.labels import NAMES, to_codes
from crossmodalnet.data.spec import MMWHS, DataSpec
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.evaluate import (
    COLUMNS,
    compute_case_metrics,
    evaluate_arrays,
    evaluate_paths,
    format_table,
    match_cases,
    summarize,
)

SHAPE = (32, 32, 32)


def _box(lo, hi, label=1, shape=SHAPE) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = label
    return out


def _row(rows, name):
    return next(r for r in rows if r["structure"] == name)


# --- an independent HD95: surface voxels + scipy's exact Euclidean distance transform ---------


def _surface(mask: np.ndarray) -> np.ndarray:
    # Surface voxels: in the mask, with a face neighbour outside it (the array border counts as outside).
    padded = np.pad(mask, 1)
    return (padded & ~ndimage.binary_erosion(padded, ndimage.generate_binary_structure(3, 1)))[1:-1, 1:-1, 1:-1]


def _directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from each surface voxel of `a` to the nearest surface voxel of `b`."""
    return ndimage.distance_transform_edt(~_surface(b), sampling=spacing)[_surface(a)]


def _hd95_reference(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[float, float]:
    d_pr, d_rp = _directed(pred, ref, spacing), _directed(ref, pred, spacing)
    monai = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    pooled = np.percentile(np.concatenate([d_pr, d_rp]), 95)
    return float(monai), float(pooled)


# --- exact values -----------------------------------------------------------------------------


def test_dice_iou_exact_on_overlapping_cubes():
    ref = _box((10, 10, 10), (20, 20, 20), 1) + _box((0, 0, 0), (4, 8, 8), 3)
    pred = _box((12, 10, 10), (22, 20, 20), 1) + _box((0, 0, 0), (8, 8, 8), 3)
    rows = compute_case_metrics(pred, ref, (1.0, 1.0, 1.0), MMWHS)
    assert [r["structure"] for r in rows] == list(NAMES)
    myo, lv = _row(rows, "MYO"), _row(rows, "LV")
    # 10³ cubes overlapping 8x10x10: Dice 2·800/2000, IoU 800/1200
    assert myo["dice"] == pytest.approx(0.8, abs=1e-12)
    assert myo["iou"] == pytest.approx(2 / 3, abs=1e-12)
    # reference 4x8x8 inside prediction 8x8x8: Dice 2·256/768, IoU 256/512
    assert lv["dice"] == pytest.approx(2 / 3, abs=1e-12)
    assert lv["iou"] == pytest.approx(0.5, abs=1e-12)
    assert myo["note"] == lv["note"] == ""


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("hd95", ["monai", "pooled"])
def test_hd95_of_a_cube_shifted_along_an_anisotropic_axis(axis, hd95):
    # A 10³ cube shifted by 2 voxels along an axis of 3 mm: its leading face (a fifth of its surface)
    # lies 2 voxels = 6 mm from the other cube's surface and no surface voxel lies farther,
    # so the 95th percentile is exactly 6 mm in both directions and both conventions.
    spacing = [0.8, 1.25, 1.25]
    spacing[axis] = 3.0
    shift = [0, 0, 0]
    shift[axis] = 2
    ref = _box((10, 10, 10), (20, 20, 20))
    pred = np.roll(ref, shift, axis=(0, 1, 2))
    myo = _row(compute_case_metrics(pred, ref, spacing, MMWHS, hd95=hd95), "MYO")
    assert myo["hd95"] == pytest.approx(6.0, rel=1e-6)
    assert myo["dice"] == pytest.approx(0.8, abs=1e-12)
    assert _hd95_reference(pred.astype(bool), ref.astype(bool), spacing) == pytest.approx((6.0, 6.0))


def test_hd95_conventions_differ_on_a_distant_plate():
    # Prediction = the reference cube + a 6x6 one-voxel plate 11 voxels (x 2 mm) beyond its face.
    # pred->ref: 488 cube-surface zeros and 36 plate distances of 22 mm, 6.9% > 5% -> 22 mm;
    # ref->pred: 488 zeros. Pooled: 36 of 1012 distances (3.6% < 5%) are non-zero -> 0 mm.
    spacing = (2.0, 0.9, 1.1)
    ref = _box((10, 10, 10), (20, 20, 20))
    pred = ref.copy()
    pred[30, 12:18, 12:18] = 1
    monai = _row(compute_case_metrics(pred, ref, spacing, MMWHS, hd95="monai"), "MYO")
    pooled = _row(compute_case_metrics(pred, ref, spacing, MMWHS, hd95="pooled"), "MYO")
    assert monai["hd95"] == pytest.approx(22.0, rel=1e-6)
    assert pooled["hd95"] == 0.0
    assert _hd95_reference(pred.astype(bool), ref.astype(bool), spacing) == pytest.approx((22.0, 0.0))
    assert monai["dice"] == pooled["dice"] == pytest.approx(2000 / 2036, abs=1e-12)


def _blob(seed: int, shape=(28, 30, 26)) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(size=shape)
    return ndimage.gaussian_filter(noise, 3.0) > 0.02


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_conventions_match_the_independent_implementation(seed):
    spacing = (0.8, 1.5, 2.5)
    ref, pred = _blob(100 + seed), _blob(200 + seed)
    # Keep the shapes in the same region so distances are moderate; one structure per case.
    ref_l, pred_l = ref.astype(np.uint8) * 5, pred.astype(np.uint8) * 5
    expected_monai, expected_pooled = _hd95_reference(pred, ref, spacing)
    monai = _row(compute_case_metrics(pred_l, ref_l, spacing, MMWHS, "monai"), "RV")["hd95"]
    pooled = _row(compute_case_metrics(pred_l, ref_l, spacing, MMWHS, "pooled"), "RV")["hd95"]
    assert monai == pytest.approx(expected_monai, rel=1e-5)
    assert pooled == pytest.approx(expected_pooled, rel=1e-5)
    # The percentile of a union lies between the two directed percentiles: pooled <= monai.
    assert pooled <= monai + 1e-5
    assert monai - pooled > 0.05  # and on irregular shapes they really differ


# --- empty masks ------------------------------------------------------------------------------


def test_empty_mask_rules():
    ref = _box((2, 2, 2), (8, 8, 8), 1) + _box((10, 2, 2), (14, 6, 6), 2)  # MYO, LA
    pred = _box((2, 2, 2), (8, 8, 8), 1) + _box((20, 2, 2), (24, 6, 6), 3)  # MYO, LV (no LA)
    rows = compute_case_metrics(pred, ref, (1.0, 1.0, 2.0), MMWHS, topology=True)
    myo, la, lv, ra = (_row(rows, n) for n in ("MYO", "LA", "LV", "RA"))
    assert (myo["dice"], myo["iou"], myo["hd95"], myo["note"]) == (1.0, 1.0, 0.0, "")
    # Missed structure: Dice/IoU 0 is the true value; HD95 to an empty set is undefined.
    assert (la["dice"], la["iou"], la["note"]) == (0.0, 0.0, "empty prediction")
    assert math.isnan(la["hd95"])
    assert (lv["dice"], lv["iou"], lv["note"]) == (0.0, 0.0, "empty reference")
    assert math.isnan(lv["hd95"])
    assert ra["note"] == "both empty"
    assert all(math.isnan(ra[k]) for k in ("dice", "iou", "hd95", "betti_error_0", "betti_error_1"))
    assert (la["betti_error_0"], lv["betti_error_0"], myo["betti_error_0"]) == (1.0, 1.0, 0.0)

    summary = summarize([{"case": "c", **r} for r in rows], MMWHS)
    assert summary["per_structure"]["LA"]["nan"] == {"dice": 0, "iou": 0, "hd95": 1}
    assert summary["per_structure"]["RA"]["nan"] == {"dice": 1, "iou": 1, "hd95": 1}
    assert summary["per_structure"]["LA"]["notes"] == {"empty prediction": 1}
    assert summary["per_structure"]["RA"]["dice"] is None  # NaN -> null, never 0
    # Means over the structures that have a value: Dice (1 + 0 + 0) / 3, HD95 only MYO's 0 mm.
    assert summary["mean_dice"] == pytest.approx(1 / 3, abs=1e-6)
    assert summary["mean_hd95"] == 0.0
    assert summary["nan_counts"] == {"dice": 4, "iou": 4, "hd95": 6}


def test_summary_means_and_table():
    ref = _box((4, 4, 4), (12, 12, 12), 1)
    cases = {
        "a": (ref, ref, (1.0, 1.0, 1.0)),
        "b": (np.roll(ref, 2, axis=0), ref, (3.0, 1.0, 1.0)),  # Dice 0.75: 6 of 8 slabs overlap
    }
    rows, summary = evaluate_arrays(cases, MMWHS, hd95="pooled")
    assert [r["case"] for r in rows[:: len(NAMES)]] == ["a", "b"]
    myo = summary["per_structure"]["MYO"]
    assert myo["dice"] == pytest.approx((1.0 + 0.75) / 2, abs=1e-6)
    assert myo["iou"] == pytest.approx((1.0 + 0.6) / 2, abs=1e-6)
    assert myo["hd95"] == pytest.approx((0.0 + 6.0) / 2, abs=1e-5)
    assert summary["mean_dice"] == myo["dice"]  # the only structure with a value
    assert summary["num_cases"] == 2 and summary["hd95_convention"] == "pooled"
    table = format_table(summary)
    assert "| MYO | 0.875 ± 0.125 | 0.800 ± 0.200 | 3.00 ± 3.00 |" in table
    assert "| LA | n/a | n/a | n/a |" in table
    assert "HD95 (mm, pooled)" in table


def test_bad_arguments():
    ref = _box((1, 1, 1), (4, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        compute_case_metrics(ref, ref[:-1], (1, 1, 1), MMWHS)
    with pytest.raises(ValueError, match="0..7"):
        compute_case_metrics(ref * 9, ref, (1, 1, 1), MMWHS)
    with pytest.raises(ValueError, match="integer"):
        compute_case_metrics(ref.astype(float), ref, (1, 1, 1), MMWHS)
    with pytest.raises(ValueError, match="spacing"):
        compute_case_metrics(ref, ref, (1, 0, 1), MMWHS)
    with pytest.raises(CrossModalNetError, match="unknown HD95 convention 'medpy'"):
        compute_case_metrics(ref, ref, (1, 1, 1), MMWHS, hd95="medpy")


# --- files --------------------------------------------------------------------------------------

GEOM = Geometry.from_spacing((24, 24, 24), (1.0, 1.0, 2.0), origin=(5.0, -3.0, 7.0))


def _labels(seed: int) -> np.ndarray:
    """A small label map with MYO, LA and LV boxes at seeded positions."""
    rng = np.random.default_rng(seed)
    out = np.zeros(GEOM.shape, dtype=np.uint8)
    for label in (1, 2, 3):
        lo = rng.integers(1, 14, size=3)
        out[lo[0] : lo[0] + 6, lo[1] : lo[1] + 6, lo[2] : lo[2] + 6] = label
    return out


@pytest.fixture(autouse=True)
def _labels_beside_the_references(tmp_path):
    """The references' dataset names the labels (evaluate reads the dataset.json above REF)."""
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "t", **MMWHS.to_dict()}))


@pytest.fixture
def folders(tmp_path):
    """ref/ with cases a (codes) and b (indices); pred/ with a, b (as .nii) and an extra c."""
    ref_a, ref_b = _labels(1), _labels(2)
    write_label(tmp_path / "ref" / "a.nii.gz", to_codes(ref_a), GEOM)
    write_label(tmp_path / "ref" / "b.nii.gz", ref_b, GEOM)
    write_label(tmp_path / "pred" / "a.nii.gz", ref_a, GEOM)  # indices against codes: identical
    write_label(tmp_path / "pred" / "b.nii", to_codes(ref_b), GEOM)
    write_label(tmp_path / "pred" / "c.nii.gz", _labels(3), GEOM)
    return tmp_path / "pred", tmp_path / "ref"


def test_folders_matched_by_case_name_with_codes_or_indices(folders, tmp_path, capsys):
    pred, ref = folders
    pairs, extra = match_cases(pred, ref)
    assert {k: (p.name, r.name) for k, (p, r) in pairs.items()} == {
        "a": ("a.nii.gz", "a.nii.gz"), "b": ("b.nii", "b.nii.gz")}
    assert extra == ["c"]
    summary = evaluate_paths(pred, ref, tmp_path / "out", progress=False)
    # Had a case been paired with the wrong file, or codes read as indices, Dice would not be 1.
    assert summary["mean_dice"] == 1.0 and summary["mean_hd95"] == 0.0
    assert summary["cases"] == ["a", "b"] and summary["unmatched_predictions"] == ["c"]
    err = capsys.readouterr().err
    assert "warning: 1 prediction(s)" in err and "c" in err


def test_cli_writes_the_report(folders, tmp_path, capsys):
    pred, ref = folders
    out = tmp_path / "report"
    assert main(["evaluate", str(pred), str(ref), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["dice.png", "hd95.png", "metrics.csv", "summary.json"]
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == COLUMNS == ("case", "kind", "structure", "dice", "iou", "hd95", "note")
    assert len(table) == 1 + 2 * 7
    assert table[1] == ["a", "class", "MYO", "1", "1", "0", ""]
    assert table[4] == ["a", "class", "RA", "nan", "nan", "nan", "both empty"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hd95_convention"] == "monai" and summary["num_cases"] == 2
    assert summary["nan_counts"] == {"dice": 8, "iou": 8, "hd95": 8}
    for png in ("dice.png", "hd95.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = capsys.readouterr().out
    assert "| MYO | 1.000 ± 0.000 | 1.000 ± 0.000 | 0.00 ± 0.00 |" in stdout
    assert "| **mean** | 1.000 | 1.000 | 0.00 |" in stdout


def test_cli_single_files_pooled_with_topology(tmp_path, capsys):
    ref = _box((4, 4, 4), (14, 14, 14), 1, shape=GEOM.shape)
    pred = np.roll(ref, 2, axis=2)  # along the 2 mm axis: 4 mm
    pred[20, 20, 20] = 1  # a stray voxel: one extra component
    write_label(tmp_path / "ref.nii.gz", ref, GEOM)
    write_label(tmp_path / "pred.nii.gz", pred, GEOM)
    out = tmp_path / "out"
    argv = ["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"), "--out", str(out),
            "--hd95", "pooled", "--topology"]
    assert main(argv) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [*COLUMNS, "betti_error_0", "betti_error_1", "betti_error_2"]
    assert rows[0]["case"] == "ref" and rows[0]["structure"] == "MYO"
    assert float(rows[0]["hd95"]) == pytest.approx(4.0)
    assert (rows[0]["betti_error_0"], rows[0]["betti_error_1"], rows[0]["betti_error_2"]) == ("1", "0", "0")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hd95_convention"] == "pooled" and summary["mean_betti_errors"]["betti_error_0"] == 1.0
    stdout = capsys.readouterr().out
    assert "| structure | Dice | IoU | HD95 (mm, pooled) | Betti errors b0/b1/b2 |" in stdout
    # Dice 1600/2001 and IoU 800/1201 with the stray voxel
    assert "| MYO | 0.800 ± 0.000 | 0.666 ± 0.000 | 4.00 ± 0.00 | 1.00/0.00/0.00 |" in stdout


def _assert_clean_failure(capsys, out, match: str) -> None:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and match in errors[0] and err.endswith(errors[0] + "\n"), err
    assert "Traceback" not in err
    assert not out.exists() or os.listdir(out) == []


def test_cli_reference_without_prediction(folders, tmp_path, capsys):
    pred, ref = folders
    os.remove(pred / "b.nii")
    out = tmp_path / "out"
    assert main(["evaluate", str(pred), str(ref), "--out", str(out)]) == 2
    _assert_clean_failure(capsys, out, "no prediction for reference b.nii.gz")


def test_cli_corrupt_file_leaves_no_partial_output(folders, tmp_path, capsys):
    pred, ref = folders
    # "b" is scored after "a", so "a" has already been measured when the corrupt file is met.
    os.remove(pred / "b.nii")
    (pred / "b.nii.gz").write_bytes(np.random.default_rng(0).bytes(2048))
    out = tmp_path / "out"
    out.mkdir()
    assert main(["evaluate", str(pred), str(ref), "--out", str(out)]) == 2
    _assert_clean_failure(capsys, out, "b.nii.gz: cannot read as NIfTI")


def test_cli_grid_mismatch(folders, tmp_path, capsys):
    pred, ref = folders
    moved = Geometry(GEOM.affine.copy(), GEOM.shape)
    moved.affine[2, 3] += 1.0
    write_label(pred / "b.nii", _labels(2), moved)
    out = tmp_path / "out"
    assert main(["evaluate", str(pred), str(ref), "--out", str(out)]) == 2
    _assert_clean_failure(capsys, out, "b.nii: affine differs from")


@pytest.mark.parametrize("problem", ["file_vs_folder", "missing_ref", "empty_ref", "out_is_file", "bad_label"])
def test_cli_other_bad_inputs(folders, tmp_path, capsys, problem):
    pred, ref = folders
    out = tmp_path / "out"
    if problem == "file_vs_folder":
        pred, match = pred / "a.nii.gz", "two files or two folders"
    elif problem == "missing_ref":
        ref, match = tmp_path / "nowhere", "nowhere: reference not found"
    elif problem == "empty_ref":
        (ref := tmp_path / "empty").mkdir()
        match = "no .nii.gz or .nii reference files"
    elif problem == "out_is_file":
        out.write_text("x")
        match = "exists and is not a folder"
    else:
        write_label(pred / "a.nii.gz", _labels(1) * 40, GEOM)  # 40, 80, 120: not in the table
        match = "a.nii.gz: label values"
    assert main(["evaluate", str(pred), str(ref), "--out", str(out)]) == 2
    _assert_clean_failure(capsys, tmp_path / "no_such_dir" if problem == "out_is_file" else out, match)
    assert out.is_file() if problem == "out_is_file" else not out.exists()


def test_entries_that_are_not_nifti_are_named_not_skipped_silently(folders, tmp_path, capsys):
    pred, ref = folders
    (pred / "original").mkdir()  # predict's folder of label maps on the original grids
    write_label(pred / "original" / "a.nii.gz", _labels(1), GEOM)
    (ref / "README.txt").write_text("labels of the test split")
    (ref / ".a.1234.nii.gz").write_bytes(b"")  # a temp file of an atomic write: not a case, not named
    out = tmp_path / "out"
    summary = evaluate_paths(pred, ref, out, progress=False)
    assert summary["cases"] == ["a", "b"]
    assert summary["ignored_entries"] == [str(pred / "original"), str(ref / "README.txt")]
    assert json.loads((out / "summary.json").read_text())["ignored_entries"] == summary["ignored_entries"]
    err = capsys.readouterr().err
    assert f"note: 2 entries without a .nii/.nii.gz name ignored: {pred / 'original'}, {ref / 'README.txt'}" in err


def test_a_second_report_replaces_the_first_and_keeps_other_files(folders, tmp_path, capsys):
    pred, ref = folders
    out = tmp_path / "out"
    assert main(["evaluate", str(pred), str(ref), "--out", str(out)]) == 0
    first = (out / "summary.json").read_text()
    (out / "notes.txt").write_text("mine")
    os.remove(pred / "b.nii")
    write_label(pred / "b.nii.gz", _labels(7), GEOM)  # another prediction: another report
    assert main(["evaluate", str(pred), str(ref), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["dice.png", "hd95.png", "metrics.csv", "notes.txt", "summary.json"]
    assert (out / "summary.json").read_text() != first and (out / "notes.txt").read_text() == "mine"
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "metrics.csv").stat().st_mode & 0o777 == 0o666 & ~umask
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["dataset.json", "out", "pred", "ref"]  # no staging folder left beside it


def test_regions_are_scored_as_their_own_rows(tmp_path):
    """MyoPS-like values and nested regions: one row per class, then one per region, each the union."""
    spec = DataSpec.from_dict({"channel_names": {"0": "C0"}, "labels": {"background": 0, "MYO": 200, "LV": 500,
                                                                         "edema": 1220, "scar": 2221},
                               "regions": {"myocardium": ["MYO", "edema", "scar"], "edema+scar": [1220, 2221]}})
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[2:6, 2:6, 2:6] = spec.index("MYO")
    ref[2:6, 2:6, 6:8] = spec.index("scar")
    pred = ref.copy()
    pred[2:6, 2:6, 6:8] = spec.index("edema")  # scar called edema: wrong class, right region
    rows = compute_case_metrics(pred, ref, (1, 1, 1), spec)
    assert [(r["kind"], r["structure"]) for r in rows] == [
        ("class", "MYO"), ("class", "LV"), ("class", "edema"), ("class", "scar"),
        ("region", "myocardium"), ("region", "edema+scar")]
    by = {(r["kind"], r["structure"]): r for r in rows}
    assert by["class", "scar"]["dice"] == 0.0 and by["class", "edema"]["dice"] == 0.0
    assert by["region", "myocardium"]["dice"] == 1.0 and by["region", "edema+scar"]["dice"] == 1.0
    assert math.isnan(by["class", "LV"]["dice"]) and by["class", "LV"]["note"] == "both empty"
    summary = summarize([{"case": "c", **r} for r in rows], spec)
    assert summary["region_mean_dice"] == 1.0 and summary["mean_dice"] == pytest.approx(1 / 3)
    assert "region edema+scar" in format_table(summary)


def test_without_a_dataset_description_evaluate_asks_for_one(tmp_path, capsys):
    (tmp_path / "dataset.json").unlink()
    write_label(tmp_path / "ref" / "a.nii.gz", _labels(0), GEOM)
    write_label(tmp_path / "pred" / "a.nii.gz", _labels(0), GEOM)
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "ref"), "--out", str(tmp_path / "out")]) == 2
    assert "give --dataset DATA or --run RUN" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dataset.json").write_text(json.dumps({"name": "t", **MMWHS.to_dict()}))
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "ref"), "--out", str(tmp_path / "out"),
                 "--dataset", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["mean_dice"] == 1.0
