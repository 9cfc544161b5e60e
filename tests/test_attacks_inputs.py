"""Attack suite, input side of issue 20: one parametrised test per class of bad input.

Every attack goes through the CLI (`main([...])`) and must end the same way: exit status 2, one
line on stderr that starts with `error: ` and names the file (or the option) at fault, no
traceback, and nothing written or changed anywhere under the test's folder (inputs, output folder
and its parents: a traversal would write beside them). Each builder makes its inputs in `tmp_path`
and returns the arguments and the words the error line must hold.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import pathlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import spy_on_body_reads

from crossmodalnet.cli import main
from crossmodalnet.config import ModelConfig, TrainConfig, dump_yaml
from crossmodalnet.data.dataset import write_dataset_json
from crossmodalnet.data.io import Geometry, write_image, write_label
from crossmodalnet.data.labels import to_codes
from crossmodalnet.data.preprocess import ChannelNorm, Preprocessor
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.models.registry import build_model
from crossmodalnet.runs import save_weights

SHAPE = (12, 12, 12)
GEOM = Geometry.from_spacing(SHAPE, (1.0, 1.0, 2.0), origin=(3.0, -2.0, 5.0))
# The memory budget during these tests: small enough that an over-large header is caught by the
# allocation spy below on the code before the fix (which knew no budget), large for the inputs here.
BUDGET = 64 * 2**20

# A builder writes the inputs under tmp_path and returns (argv, words the error line must hold[, arm]):
# `arm(monkeypatch)`, when given, is called after the snapshot, just before the command runs.
Builder = Callable[[Path], tuple]


# --- observing: the whole folder, stderr, and every body allocation of nibabel -------------------


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` (symlinks not followed) -> what it is and, for files, a content hash."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir" if p.is_dir() else "other"
    return out


@pytest.fixture
def allocations(monkeypatch) -> list[int]:
    """Byte sizes nibabel was asked to read for image bodies; a request over BUDGET is recorded and
    refused (MemoryError) instead of being allocated, so the old code's attempt shows as a failure."""
    return spy_on_body_reads(monkeypatch, BUDGET)


def _attack(tmp_path: Path, capsys, build: Builder, allocations: list[int], monkeypatch=None) -> str:
    """Run the attack; assert exit 2, one `error:` line naming what it must, no traceback, nothing
    changed under tmp_path, no body allocation over the budget. Returns the error line."""
    argv, words, *arm = build(tmp_path)
    capsys.readouterr()
    before = _snapshot(tmp_path)
    for a in arm:
        a(monkeypatch)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert _snapshot(tmp_path) == before, "the attack changed files"
    assert all(n <= BUDGET for n in allocations), allocations
    return lines[0]


# --- inputs ---------------------------------------------------------------------------------------


def _labels(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros(SHAPE, dtype=np.uint8)
    for label in (1, 2, 3):
        lo = rng.integers(1, 7, size=3)
        out[lo[0] : lo[0] + 4, lo[1] : lo[1] + 4, lo[2] : lo[2] + 4] = label
    return out


def _case(root: Path, cid: str, folder: str = "imagesTs") -> dict:
    """Write one case's CT, MR and label; returns its dataset.json entry."""
    rng = np.random.default_rng(len(cid))
    label = _labels(len(cid))
    write_image(root / folder / f"{cid}_ct.nii.gz", 100.0 * label + rng.normal(0, 5, SHAPE), GEOM)
    write_image(root / folder / f"{cid}_mr.nii.gz", 50.0 * label + rng.normal(0, 5, SHAPE), GEOM)
    write_label(root / folder.replace("images", "labels") / f"{cid}.nii.gz", label, GEOM)
    return {"id": cid, "ct": f"{folder}/{cid}_ct.nii.gz", "mr": f"{folder}/{cid}_mr.nii.gz",
            "label": f"{folder.replace('images', 'labels')}/{cid}.nii.gz"}


def _run(root: Path) -> Path:
    """A run folder as training leaves it (untrained tiny U-Net): predict gets past loading it."""
    cfg = TrainConfig(model=ModelConfig.from_size("unet", "tiny"), patch_size=(16, 16, 16), sw_batch_size=1,
                      device="cpu")
    root.mkdir(parents=True)
    dump_yaml(cfg, root / "config.yaml")
    torch.manual_seed(0)
    save_weights(build_model(cfg.model.name, cfg.model), root / "model.safetensors", cfg.model)
    Preprocessor((ChannelNorm("CT", "ct", (-1000.0, 1000.0), 0.0, 100.0), ChannelNorm("MR", "zscore")),
                 (2.0, 2.0, 2.0)).save(root / "preprocess.json")
    return root


def _predict(tmp_path: Path, test: list[dict], **meta) -> list[str]:
    """predict RUN DATA --out OUT over a dataset.json with `test` entries (and `meta` fields)."""
    data = tmp_path / "data"
    write_dataset_json(data, {"test": test}, name="attack", spec=MMWHS, **meta)
    return ["predict", str(_run(tmp_path / "run")), str(data), "--out", str(tmp_path / "out" / "pred")]


def _write_json(tmp_path: Path, text: str | bytes, cases: tuple[str, ...] = ("a",)) -> list[str]:
    data = tmp_path / "data"
    for cid in cases:
        _case(data, cid)
    (data / "dataset.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["predict", str(_run(tmp_path / "run")), str(data), "--out", str(tmp_path / "out" / "pred")]


# --- class 1: case ids that become paths ------------------------------------------------------------


def _id(case_id: str) -> Builder:
    def build(tmp_path: Path):
        data = tmp_path / "data"
        cid = case_id.replace("ABS", str(tmp_path / "escaped"))
        entry = {**_case(data, "a"), "id": cid}
        return _predict(tmp_path, [entry]), ["dataset.json", "test[0]", repr(cid)[:40]]
    return build


def _duplicate(first: str, second: str, split: str = "test") -> Builder:
    def build(tmp_path: Path):
        data = tmp_path / "data"
        a, b = {**_case(data, "a"), "id": first}, {**_case(data, "b"), "id": second}
        write_dataset_json(data, {"training": [a], "test": [b]} if split == "training" else {"test": [a, b]},
                           name="attack", spec=MMWHS)
        argv = ["predict", str(_run(tmp_path / "run")), str(data), "--out", str(tmp_path / "out" / "pred")]
        where = "test[0]" if split == "training" else "test[1]"
        return argv, ["dataset.json", where, repr(second), "also the id of"]
    return build


def _derived_duplicate(tmp_path: Path):
    """No ids: both are derived from the same file name in two folders."""
    data = tmp_path / "data"
    a, b = _case(data, "x", "imagesTr"), _case(data, "x", "imagesTs")
    for e in (a, b):
        e.pop("id")
    return _predict(tmp_path, [a, b]), ["dataset.json", "test[1]", "'x_ct'", "also the id of"]


@pytest.mark.parametrize("build", [
    _id("../../escaped"), _id("ABS"), _id("sub/dir"), _id(".."), _id(".hidden"), _id("a\\b"), _id("x" * 200),
    _id("-rf"), _duplicate("case_a", "case_a"), _duplicate("Case_A", "case_a"),
    _duplicate("case_a", "case_a", "training"), _derived_duplicate,
], ids=["traversal", "absolute", "separator", "dotdot", "hidden", "backslash", "too_long", "dash",
        "duplicate", "duplicate_case", "duplicate_across_splits", "duplicate_derived"])
def test_case_ids_never_become_unsafe_or_clashing_paths(tmp_path, capsys, allocations, build):
    _attack(tmp_path, capsys, build, allocations)


# --- class 2: dataset.json structure ----------------------------------------------------------------

_ENTRY = {"id": "a", "ct": "imagesTs/a_ct.nii.gz", "mr": "imagesTs/a_mr.nii.gz"}


def _meta(**fields) -> str:
    """dataset.json text: the MM-WHS channels and labels (a dataset names its own), then `fields`."""
    return json.dumps({**MMWHS.to_dict(), **fields})


def _json(text: str | bytes, *words: str) -> Builder:
    def build(tmp_path: Path):
        return _write_json(tmp_path, text), ["dataset.json", *words]
    return build


def _entry(*words: str, **fields) -> Builder:
    return _json(_meta(test=[{**_ENTRY, **fields}]), *words)


def _symlink_outside(tmp_path: Path):
    outside = tmp_path / "outside"
    _case(outside, "a")
    argv = _write_json(tmp_path, _meta(test=[{**_ENTRY, "ct": "imagesTs/link_ct.nii.gz"}]))
    (tmp_path / "data" / "imagesTs" / "link_ct.nii.gz").symlink_to(outside / "imagesTs" / "a_ct.nii.gz")
    return argv, ["dataset.json", "link_ct.nii.gz", "symlink", "outside the dataset folder"]


@pytest.mark.parametrize("build", [
    _json(json.dumps({"modality": "CT", "labels": MMWHS.to_dict()["labels"], "test": [_ENTRY]}),
          "'modality' must be a non-empty mapping"),
    _json(_meta(labels=8, test=[_ENTRY]), "'labels' must be a non-empty mapping"),
    _json(b'{"name": "\xff\xfe", "test": []}', "not UTF-8"),
    _json("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    _json(_meta(test="imagesTs/a_ct.nii.gz"), "'test' must be a list"),
    _json(_meta(test=[5]), "test[0] must be a mapping"),
    _json(_meta(name=["x"], test=[_ENTRY]), "'name' must be a string"),
    _entry("test[0] id 5 must be a string", id=5),
    _entry("test[0].CT must be a non-empty relative path", ct=5),
    _entry("NUL character", ct="imagesTs/a\x00_ct.nii.gz"),
    _entry("absolute path", "leaves the dataset folder", ct="/etc/hostname"),
    _entry("leaves the dataset folder", ct="../data/../../outside.nii.gz"),
    _json(_meta(test=[{**_ENTRY, "ct": "imagesTs/" + "x" * 300}]), "cannot be resolved"),
    _symlink_outside,
], ids=["modality_string", "labels_int", "not_utf8", "deep_nesting", "split_not_list", "entry_not_mapping",
        "name_not_string", "id_not_string", "path_not_string", "nul_in_path", "absolute_path", "leaving_path",
        "name_too_long", "symlink_outside"])
def test_dataset_json_structure_is_checked(tmp_path, capsys, allocations, build):
    _attack(tmp_path, capsys, build, allocations)


# --- class 3: headers, bodies and voxels --------------------------------------------------------------


def _evaluate_folders(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    for cid, seed in (("a", 1), ("b", 2)):
        write_label(ref / f"{cid}.nii.gz", to_codes(_labels(seed)), GEOM)
        write_label(pred / f"{cid}.nii.gz", _labels(seed + 10), GEOM)
    data = tmp_path / "data"  # the dataset that names the labels: MM-WHS
    write_dataset_json(data, {}, name="labels", spec=MMWHS)
    return pred, ref, ["evaluate", str(pred), str(ref), "--dataset", str(data), "--out", str(tmp_path / "out" / "eval")]


def _header(dims: tuple[int, ...], dtype=np.uint8) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(dims)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(GEOM.affine, code=1)
    hdr.set_qform(GEOM.affine, code=1)
    return hdr


def _raw_file(dims: tuple[int, ...], gz: bool, body: bytes = b"") -> Builder:
    """A bare header (352 bytes) claiming `dims`, then `body`, as the prediction of case b."""
    def build(tmp_path: Path):
        pred, _, argv = _evaluate_folders(tmp_path)
        (pred / "b.nii.gz").unlink()
        raw = _header(dims).binaryblock + b"\0" * 4 + body
        path = pred / ("b.nii.gz" if gz else "b.nii")
        path.write_bytes(gzip.compress(raw) if gz else raw)
        return argv, [str(path)]
    return build


def _edit(case: str, edit: Callable[[Path], None], *words: str, where: str = "pred") -> Builder:
    """Rewrite file `case` of pred/ (or ref/) with `edit(path)`."""
    def build(tmp_path: Path):
        _, _, argv = _evaluate_folders(tmp_path)
        path = tmp_path / where / f"{case}.nii.gz"
        edit(path)
        return argv, [str(path), *words]
    return build


def _truncate(path: Path) -> None:
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 1000]))


def _corrupt_stream(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = np.random.default_rng(0).bytes(16)
    path.write_bytes(bytes(data))


def _header_field(**fields) -> Callable[[Path], None]:
    """Set header fields in the bytes of a .nii.gz, body untouched (nibabel's writer would repair them)."""
    def edit(path: Path) -> None:
        raw = gzip.decompress(path.read_bytes())
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
        for key, value in fields.items():
            hdr[key] = value
        path.write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))
    return edit


def _with_voxels(values: np.ndarray, **fields) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        hdr = nib.Nifti1Header()
        hdr.set_data_dtype(values.dtype)
        img = nib.Nifti1Image(values, GEOM.affine, hdr)
        for key, value in fields.items():
            img.header[key] = value
        nib.save(img, str(path))
    return edit


def _nan_label() -> np.ndarray:
    v = _labels(11).astype(np.float32)
    v[1, 2, 3] = np.nan
    return v


def _prepare_size(size: str) -> Builder:
    """prepare-mmwhs RAW OUT --size N over one tiny raw pair: refused before any allocation."""
    def build(tmp_path: Path):
        raw = tmp_path / "raw"
        for mod in ("ct", "mr"):
            write_image(raw / f"{mod}_train" / f"{mod}_train_1001_image.nii.gz", _labels(1) * 100.0, GEOM)
            write_label(raw / f"{mod}_train" / f"{mod}_train_1001_label.nii.gz", to_codes(_labels(1)), GEOM)
        argv = ["prepare-mmwhs", str(raw), str(tmp_path / "out" / "prep"), "--register", "none", "--size", size,
                "--workers", "1", "--split", "1/0"]
        return argv, ["--size", "memory budget"]
    return build


@pytest.mark.parametrize("build", [
    _raw_file((1200, 1200, 1200), gz=True),  # the reported attack: 360 bytes claiming 1200^3
    _raw_file((1200, 1200, 1200), gz=False),
    _raw_file((200, 200, 200), gz=False, body=b"\1" * 1000),  # within the budget, but the body is missing
    _raw_file((200, 200, 200), gz=True, body=b"\1" * 1000),
    _raw_file((12, 12, 12, 3), gz=True, body=b"\1" * 5184),  # 4D
    _edit("b", _truncate, "truncated or corrupt"),
    _edit("b", _corrupt_stream, "cannot read as NIfTI", where="ref"),
    _edit("b", _header_field(dim=[3, 12, 0, 12, 1, 1, 1, 1]), "must be positive"),
    _edit("b", _header_field(pixdim=[1, np.nan, 1, 2, 1, 1, 1, 1]), "voxel sizes"),
    _edit("b", _with_voxels(_labels(11).astype(np.complex64)), "not a real number type"),
    _edit("b", _with_voxels(_nan_label()), "NaN or Inf"),
    _edit("b", _header_field(scl_slope=0.5), "non-integer"),  # scaled labels: 0.5, 1, 1.5
    _prepare_size("100000"),
    _prepare_size("1700"),  # 4.9 G voxels: over even the default budget; here over the test's
], ids=["huge_header_gz", "huge_header_nii", "missing_body_nii", "missing_body_gz", "four_d", "truncated_body",
        "corrupt_deflate", "zero_dim", "nan_spacing", "complex_voxels", "nan_label",
        "half_scaling", "prepare_size_100000", "prepare_size_1700"])
def test_headers_are_checked_before_any_body_is_read(tmp_path, capsys, allocations, build):
    _attack(tmp_path, capsys, build, allocations)


# --- class 4: evaluate's folders: nothing skipped without a word; messages name the bad values ----


def _entry_kind(folder: str, name: str, kind: str) -> Builder:
    def build(tmp_path: Path):
        _, _, argv = _evaluate_folders(tmp_path)
        path = tmp_path / folder / name
        if path.exists():
            path.unlink()
        if kind == "broken_symlink":
            path.symlink_to(tmp_path / "nowhere.nii.gz")
        elif kind == "folder":
            path.mkdir()
            write_label(path / "inner.nii.gz", _labels(1), GEOM)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "loop":
            path.symlink_to(path)
        expected = {"broken_symlink": "a broken symlink", "folder": "a folder", "fifo": "not a regular file",
                    "loop": "a broken symlink"}[kind]
        return argv, [str(path), expected]
    return build


def _mixed_encoding(tmp_path: Path):
    pred, _, argv = _evaluate_folders(tmp_path)
    values = _labels(3)
    values[values == 1] = 205  # codes and indices (2, 3) in one file: each value is valid somewhere
    write_label(pred / "b.nii.gz", values, GEOM)
    return argv, [str(pred / "b.nii.gz"), "mixes class indices [2, 3] with label values [205]"]


@pytest.mark.parametrize("build", [
    _entry_kind("ref", "c.nii.gz", "broken_symlink"),
    _entry_kind("ref", "c.nii.gz", "folder"),
    _entry_kind("ref", "c.nii.gz", "fifo"),
    _entry_kind("ref", "c.nii.gz", "loop"),
    _entry_kind("pred", "a.nii.gz", "broken_symlink"),
    _entry_kind("pred", "b.nii.gz", "folder"),
    _mixed_encoding,
], ids=["ref_broken_symlink", "ref_folder", "ref_fifo", "ref_symlink_loop", "pred_broken_symlink", "pred_folder",
        "mixed_encoding"])
def test_evaluate_scores_every_case_or_says_why_not(tmp_path, capsys, allocations, build):
    line = _attack(tmp_path, capsys, build, allocations)
    assert "[500]" not in line


# --- class 5: evaluate's report is written whole or not at all ----------------------------------------


def _write_fails(target: str, out_state: str) -> Builder:
    """The disk fills while `target` is written; the output folder is new, or holds an old report."""
    def build(tmp_path: Path):
        _, _, argv = _evaluate_folders(tmp_path)
        out = Path(argv[-1])
        if out_state == "old_report":
            assert main(argv) == 0  # a previous report, and a file of the user's
            (out / "notes.txt").write_text("mine")
        elif out_state == "deep_new":
            out = tmp_path / "new" / "deeper" / "eval"
            argv[-1] = str(out)
        real = pathlib.Path.write_bytes

        def full_disk(self: Path, data: bytes) -> int:
            if target in self.name:
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            return real(self, data)

        def arm(monkeypatch) -> None:
            monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)

        return argv, [str(out), "No space left on device"], arm
    return build


@pytest.mark.parametrize("build", [
    _write_fails("dice", "new"), _write_fails("metrics", "new"), _write_fails("dice", "deep_new"),
    _write_fails("dice", "old_report"), _write_fails("summary", "old_report"),
    _edit("b", _truncate, "truncated or corrupt"),  # the last case fails after the first was scored
], ids=["new_out_last_file", "new_out_first_file", "new_parents", "old_report_last_file",
        "old_report_second_file", "last_case_corrupt"])
def test_evaluate_writes_all_or_nothing(tmp_path, capsys, allocations, build, monkeypatch):
    _attack(tmp_path, capsys, build, allocations, monkeypatch)
