"""Issue 20, the output side: bad input or a bad output place stops with ONE line naming the file,
exit status 2, no traceback, and the output as it was (the same listing and bytes, or still absent).

One parametrised test per class of attack (docs/reliability.md, "Outputs"):
1. failures the system raises (OSError, UnicodeDecodeError, RecursionError, MemoryError) are one line;
2. predict checks every input and --out before the first inference, and writes all or nothing;
3. prepare-mmwhs reads every pair before the first case is written;
4. synth never mixes with an old folder, and a failure part-way leaves none;
5. bad numbers (NaN in a validation CT, preprocess.json statistics) stop before anything is written;
6. a full or read-only disk, for synth, train, predict, evaluate and prepare-mmwhs.

A full or read-only disk is the real thing where the machine lets us mount a tmpfs (root with
CAP_SYS_ADMIN); elsewhere those cases skip, and the same class is attacked by making the Nth file
write raise ENOSPC (`files._new_file`, which every atomic write goes through) or `statvfs` report
a read-only file system.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import crossmodalnet.files as files
import crossmodalnet.infer as infer
from crossmodalnet.cli import main
from crossmodalnet.config import ModelConfig, TrainConfig, dump_yaml, load_config_file
from crossmodalnet.data.dataset import load_dataset, write_dataset_json
from crossmodalnet.data.io import read_image, read_label, write_image, write_label
from crossmodalnet.data.labels import to_codes
from crossmodalnet.data.phantom import synthesize
from crossmodalnet.data.preprocess import ChannelNorm, Preprocessor
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models.registry import build_model
from crossmodalnet.runs import RunFolder
from crossmodalnet.train import preflight

MODEL = ModelConfig.from_size("unet", "tiny")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 phantom cases of 24^3 listed as 2 training + 1 validation and as 3 test cases (read-only)."""
    root = synthesize(tmp_path_factory.mktemp("attack_data") / "data", cases=3, size=24, seed=0, workers=1)
    return _relist(root, root)


def _ct(case) -> Path:
    return case.images[0].path


def _mr(case) -> Path:
    return case.images[1].path


def _relist(source: Path, root: Path, ids: list[str] | None = None) -> Path:
    """Write root/dataset.json over `source`'s cases: 2 training, 1 validation, all 3 as test."""
    listed = {_ct(c): c for s in ("training", "validation", "test") for c in load_dataset(source)[s]}
    cases = sorted(listed.values(), key=lambda c: _ct(c).name)
    entries = [{"id": (ids or [c.id for c in cases])[i], "ct": os.path.relpath(_ct(c), root),
                "mr": os.path.relpath(_mr(c), root), "label": os.path.relpath(c.label, root)}
               for i, c in enumerate(cases)]
    write_dataset_json(root, {"training": entries[:2], "validation": entries[2:], "test": entries}, name="attack",
                       spec=MMWHS)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """An untrained tiny U-Net run folder (as training leaves one) on the phantoms' own grid."""
    folder = RunFolder(tmp_path_factory.mktemp("attack_run") / "run")
    folder.path.mkdir()
    folder.write_config(TrainConfig(model=MODEL, patch_size=(16, 16, 16), sw_batch_size=4, device="cpu"))
    torch.manual_seed(0)
    folder.save_weights(build_model("unet", MODEL), MODEL)
    folder.write_preprocess(Preprocessor((ChannelNorm("CT", "ct", (-1000.0, 1000.0), 0.0, 100.0),
                                          ChannelNorm("MR", "zscore")), None))
    return folder.path


@pytest.fixture(scope="module")
def train_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("attack_config") / "tiny.yaml"
    dump_yaml(TrainConfig(model=MODEL, epochs=1, iterations_per_epoch=1, batch_size=1, patch_size=(16, 16, 16),
                          warmup_epochs=0, device="cpu", num_workers=0), path)
    return path


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Raw MM-WHS naming, 2 pairs (1001, 1002), CT 24^3 (read-only)."""
    return synthesize(tmp_path_factory.mktemp("attack_raw") / "raw", cases=2, size=24, seed=0, layout="mmwhs",
                      workers=1)


# ---------------------------------------------------------------------------------------------- helpers


def _snapshot(path: Path) -> dict[str, str] | None:
    """Every entry below `path` with a digest of each file's bytes; None when `path` is absent."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha1(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


def _attack(capsys, argv: list[str], watched: Path, *named: str) -> str:
    """Run the CLI; it must exit 2 with one `error:` line naming `named`, and leave `watched` as it was."""
    before = _snapshot(watched)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "%|" not in line]  # tqdm's bars are not messages
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in named:
        assert word.lower() in lines[0].lower(), lines[0]
    assert _snapshot(watched) == before
    return lines[0]


def _copy_data(data: Path, to: Path) -> Path:
    """A writable copy of the dataset folder."""
    for p in data.rglob("*"):
        if p.is_file():
            (to / p.relative_to(data)).parent.mkdir(parents=True, exist_ok=True)
            (to / p.relative_to(data)).write_bytes(p.read_bytes())
    return to


def _nan_image(path: Path) -> None:
    image, geometry = read_image(path)
    image[1, 2, 3] = np.nan
    write_image(path, image, geometry)


def _truncate(path: Path) -> None:
    """Keep the header, cut the voxels: the header check passes, reading the body fails."""
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _bad_label(path: Path, code: int = 421) -> None:
    labels, geometry, _ = read_label(path, MMWHS)
    codes = to_codes(labels)
    codes[0, 0, 0] = code
    write_label(path, codes, geometry)


def _fail_nth_write(monkeypatch, n: int, code: int = errno.ENOSPC) -> None:
    """The nth atomic file write (and every later one) raises OSError(code), as a full disk's write() does:
    without a file name."""
    real, count = files._new_file, [0]

    def new_file(folder: Path, prefix: str, suffix: str) -> Path:
        count[0] += 1
        if count[0] >= n:
            raise OSError(code, os.strerror(code))
        return real(folder, prefix, suffix)

    monkeypatch.setattr(files, "_new_file", new_file)


@contextlib.contextmanager
def _tmpfs(where: Path, kind: str) -> Iterator[Path]:
    """A real small file system at `where`: "full" (64 KiB, filled up) or "readonly" (one file in it).
    Skips when this machine does not let us mount (not root, or no CAP_SYS_ADMIN)."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the ENOSPC "
                    "cases of this test cover the class")
    try:
        if kind == "full":
            with contextlib.suppress(OSError), open(where / "filler", "wb") as f:
                while True:
                    f.write(b"x" * 4096)
                    f.flush()
        else:
            (where / "kept.txt").write_text("was here before")
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# ---------------------------------------------------------------------------------------------- 1. errors


def _non_utf8(path: Path) -> None:
    path.write_bytes(b'{"name": "caf\xe9"}')


def _deep_json(path: Path) -> None:
    path.write_text("[" * 200_000 + "]" * 200_000)


def _out_of_memory(monkeypatch) -> None:
    def huge(*args, **kwargs):
        raise MemoryError("Unable to allocate 1.21 TiB for an array with shape (8, 4096, 4096, 2400)")
    monkeypatch.setattr(infer, "predict_case", huge)


@pytest.mark.parametrize("attack", ["out_below_a_file", "dataset_json_not_utf8", "dataset_json_nested_deeply",
                                    "pairs_csv_not_utf8", "config_yaml_not_utf8", "out_of_memory"])
def test_1_system_failures_are_one_line(attack, data, run, raw, train_config, tmp_path, monkeypatch, capsys):
    folder = _copy_data(data, tmp_path / "data")
    out = tmp_path / "out"
    predict = ["predict", str(run), str(folder), "--out", str(out)]
    if attack == "out_below_a_file":
        (tmp_path / "notes.txt").write_text("a file")
        _attack(capsys, ["predict", str(run), str(folder), "--out", str(tmp_path / "notes.txt" / "pred")], tmp_path,
                "notes.txt")
    elif attack == "dataset_json_not_utf8":
        _non_utf8(folder / "dataset.json")
        _attack(capsys, predict, out, "dataset.json", "UTF-8")
    elif attack == "dataset_json_nested_deeply":
        _deep_json(folder / "dataset.json")
        _attack(capsys, predict, out, "dataset.json")
    elif attack == "pairs_csv_not_utf8":
        (tmp_path / "pairs.csv").write_bytes(b"ct,mr\nct_train/ct_train_1001_image.nii.gz,caf\xe9.nii.gz\n")
        _attack(capsys, ["prepare-mmwhs", str(raw), str(out), "--pairs", str(tmp_path / "pairs.csv")], out,
                "pairs.csv", "UTF-8")
    elif attack == "config_yaml_not_utf8":
        (tmp_path / "bad.yaml").write_bytes(b"epochs: 1\nname: caf\xe9\n")
        _attack(capsys, ["train", str(folder), "--out", str(out), "--config", str(tmp_path / "bad.yaml")], out,
                "bad.yaml")
    else:
        _out_of_memory(monkeypatch)
        _attack(capsys, predict, out, "case_000_ct.nii.gz", "out of memory")


def test_debug_shows_the_traceback_and_still_ends_with_the_line(data, run, tmp_path, capsys):
    folder = _copy_data(data, tmp_path / "data")
    _non_utf8(folder / "dataset.json")
    for argv in (["--debug", "predict", str(run), str(folder)], ["predict", str(run), str(folder), "--debug"]):
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback (most recent call last)" in err  # the dataset reader names the decoding problem
        assert err.splitlines()[-1].startswith("error: ") and "dataset.json" in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- 2. predict


@pytest.mark.parametrize("attack", ["nan_in_last_case", "truncated_last_case", "old_out_kept", "out_below_a_file",
                                    "id_escapes_out", "two_cases_one_output", "output_replaces_input",
                                    "file_name_without_a_case_id"])
def test_2_predict_checks_everything_before_the_first_inference(attack, data, run, tmp_path, monkeypatch, capsys):
    folder = _copy_data(data, tmp_path / "data")
    out = tmp_path / "out"
    calls: list[int] = []
    real = infer.predict_case
    monkeypatch.setattr(infer, "predict_case", lambda *a, **k: calls.append(1) or real(*a, **k))
    argv = ["predict", str(run), str(folder), "--out", str(out)]
    if attack in ("nan_in_last_case", "truncated_last_case", "old_out_kept"):
        last = folder / "imagesTr" / "case_002_ct.nii.gz"
        last = last if last.exists() else next(folder.rglob("case_002_ct.nii.gz"))
        if attack == "old_out_kept":  # an earlier prediction and another file stay exactly as they were
            out.mkdir()
            (out / "case_000.nii.gz").write_bytes(b"an older prediction")
            (out / "notes.txt").write_text("mine")
        (_truncate if attack == "truncated_last_case" else _nan_image)(last)
        _attack(capsys, argv, out, "case_002_ct.nii.gz")
    elif attack == "out_below_a_file":
        (tmp_path / "taken").write_text("a file")
        _attack(capsys, ["predict", str(run), str(folder), "--out", str(tmp_path / "taken" / "pred")], tmp_path,
                "taken")
    elif attack == "id_escapes_out":
        _relist(folder, folder, ids=["case_000", "../../escaped", "case_002"])
        _attack(capsys, argv, tmp_path, "dataset.json", "../../escaped")
    elif attack == "two_cases_one_output":
        _relist(folder, folder, ids=["case_000", "twin", "twin"])
        _attack(capsys, argv, tmp_path, "twin")
    elif attack == "file_name_without_a_case_id":  # "..nii.gz" would name the output ".nii.gz", hidden
        [case] = [c for c in load_dataset(folder)["test"] if c.id == "case_000"]
        odd = _ct(case).with_name("..nii.gz")
        odd.write_bytes(_ct(case).read_bytes())
        _attack(capsys, ["predict", str(run), "--ct", str(odd), "--mr", str(_mr(case)), "--out", str(out)], tmp_path,
                "..nii.gz", "case id")
    else:  # --ct DIR/case_000_ct.nii.gz --out DIR would write DIR/case_000_ct.nii.gz over the CT
        [case] = [c for c in load_dataset(folder)["test"] if c.id == "case_000"]
        _attack(capsys, ["predict", str(run), "--ct", str(_ct(case)), "--mr", str(_mr(case)), "--out",
                         str(_ct(case).parent)], folder, str(_ct(case)))
    assert calls == []  # refused before the first inference


# ---------------------------------------------------------------------------------------------- 3. prepare-mmwhs


@pytest.mark.parametrize("attack", ["truncated_ct", "nan_mr", "label_421"])
def test_3_prepare_mmwhs_reads_every_pair_before_the_first_case(attack, raw, tmp_path, capsys):
    copy = _copy_data(raw, tmp_path / "raw")
    second = {"truncated_ct": copy / "ct_train" / "ct_train_1002_image.nii.gz",
              "nan_mr": copy / "mr_train" / "mr_train_1002_image.nii.gz",
              "label_421": copy / "ct_train" / "ct_train_1002_label.nii.gz"}[attack]
    {"truncated_ct": _truncate, "nan_mr": _nan_image, "label_421": _bad_label}[attack](second)
    out = tmp_path / "prep"
    _attack(capsys, ["prepare-mmwhs", str(copy), str(out), "--register", "none", "--size", "16", "--spacing", "6",
                     "--split", "1/1", "--workers", "1"], out, second.name)


# ---------------------------------------------------------------------------------------------- 4. synth


@pytest.mark.parametrize("attack", ["into_an_old_dataset", "disk_full_part_way", "disk_full_into_an_empty_folder",
                                    "killed_by_a_bug_part_way"])
def test_4_synth_never_mixes_and_never_leaves_half(attack, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "synth"
    argv = ["synth", str(out), "--cases", "3", "--size", "16"]
    if attack == "into_an_old_dataset":
        _copy_data(data, out)
        _attack(capsys, argv, out, str(out), "not empty")
    elif attack in ("disk_full_part_way", "disk_full_into_an_empty_folder"):
        if attack == "disk_full_into_an_empty_folder":  # staged inside (OUT may be a mount point)
            out.mkdir()
        _fail_nth_write(monkeypatch, 4)  # three files written, then the disk is full
        _attack(capsys, argv, tmp_path, "no space left")
    else:  # not one line (a bug keeps its traceback), but the folder must still be as it was
        real = files._new_file
        count = [0]

        def flaky(*a):
            count[0] += 1
            if count[0] == 4:
                raise RuntimeError("a bug")
            return real(*a)
        monkeypatch.setattr(files, "_new_file", flaky)
        with pytest.raises(RuntimeError):
            main(argv)
        assert _snapshot(tmp_path) == {}


# ---------------------------------------------------------------------------------------------- 5. bad numbers


@pytest.mark.parametrize("attack", ["nan_in_validation_ct", "std_zero", "std_nan", "std_negative", "std_missing",
                                    "std_a_string", "spacing_zero", "not_an_object"])
def test_5_bad_numbers_stop_before_anything_is_written(attack, data, run, train_config, tmp_path, capsys):
    out = tmp_path / "out"
    if attack == "nan_in_validation_ct":
        folder = _copy_data(data, tmp_path / "data")
        [val] = load_dataset(folder)["validation"]
        _nan_image(_ct(val))
        _attack(capsys, ["train", str(folder), "--out", str(out), "--config", str(train_config)], out, _ct(val).name,
                "NaN")
        return
    bad = _copy_data(run, tmp_path / "run")
    stats = json.loads((bad / "preprocess.json").read_text())
    [ct] = [c for c in stats["channels"] if c["name"] == "CT"]  # format 2: a list of channels
    if attack == "std_missing":
        del ct["std"]
    elif attack == "spacing_zero":
        stats["target_spacing"] = [1.0, 0.0, 1.0]
    elif attack == "not_an_object":
        stats = [stats]
    else:
        ct["std"] = {"std_zero": 0.0, "std_nan": float("nan"), "std_negative": -1.0, "std_a_string": "1.0"}[attack]
    (bad / "preprocess.json").write_text(json.dumps(stats))
    line = _attack(capsys, ["predict", str(bad), str(data), "--out", str(out)], out, "preprocess.json")
    assert "std" in line or attack in ("spacing_zero", "not_an_object")


def test_5_under_ddp_every_validation_case_is_read_before_the_run_folder(data, train_config, tmp_path,
                                                                          monkeypatch):
    # Under DDP each process loads only its share of the validation cases, after the run folder is
    # made; the preflight (main process, before it) must read them all. Without DDP the trainer does.
    folder = _copy_data(data, tmp_path / "data")
    [val] = load_dataset(folder)["validation"]
    _nan_image(_ct(val))
    config = load_config_file(train_config)
    preflight.dataset_splits(folder, config)  # one process: headers only here
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(CrossModalNetError, match=f"{_ct(val).name}: .*NaN"):
        preflight.dataset_splits(folder, config)


# ---------------------------------------------------------------------------------------------- 6. full / read-only


def _case_6(command: str, data: Path, run: Path, raw: Path, config: Path, out: Path) -> list[str]:
    return {
        "synth": ["synth", str(out), "--cases", "2", "--size", "16"],
        "train": ["train", str(data), "--out", str(out), "--config", str(config)],
        "predict": ["predict", str(run), str(data), "--out", str(out)],
        # The reference labels are the phantoms' test labels; the predictions: the same files.
        "evaluate": ["evaluate", str(data / "labelsTs"), str(data / "labelsTs"), "--out", str(out)],
        "prepare-mmwhs": ["prepare-mmwhs", str(raw), str(out), "--register", "none", "--size", "16", "--spacing",
                          "6", "--split", "1/1", "--workers", "1"],
    }[command]


_COMMANDS = ["synth", "train", "predict", "prepare-mmwhs", "evaluate"]


def _fake_readonly_statvfs(monkeypatch) -> None:
    real: Callable = os.statvfs

    def statvfs(path):
        s = real(path)
        return os.statvfs_result((*s[:8], s.f_flag | os.ST_RDONLY, s[9]))
    monkeypatch.setattr(os, "statvfs", statvfs)


@pytest.mark.parametrize("where", ["tmpfs_full", "tmpfs_readonly", "enospc_at_second_write"])
@pytest.mark.parametrize("command", _COMMANDS)
def test_6_full_or_readonly_disk(command, where, data, run, raw, train_config, tmp_path, monkeypatch, capsys,
                                 request):
    if where == "enospc_at_second_write":
        out = tmp_path / "out"
        if command == "train":  # train refuses before it writes: the check sees the file system
            _fake_readonly_statvfs(monkeypatch)
            _attack(capsys, _case_6(command, data, run, raw, train_config, out), tmp_path, "read-only")
            return
        _fail_nth_write(monkeypatch, 2)
        _attack(capsys, _case_6(command, data, run, raw, train_config, out), tmp_path, "no space left")
        return
    with _tmpfs(tmp_path / "mnt", where.removeprefix("tmpfs_")) as mnt:
        out = mnt / "out"
        words = ["read-only"] if where == "tmpfs_readonly" else [str(mnt)]
        _attack(capsys, _case_6(command, data, run, raw, train_config, out), mnt, *words)
