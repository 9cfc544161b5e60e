"""Fuzzing the two readers of untrusted input: NIfTI files (`io.read_*`) and dataset.json.

Valid files are mutated (header bytes flipped, dims, datatype, pixdim, vox_offset, scaling set to
odd values, files truncated or padded; random JSON structures and bytes) and read. Every failure
must be a `CrossModalNetError` of one line naming the file, and no image body larger than the
memory budget may ever be allocated: nibabel's body reader is spied on, with a small budget.

Examples per test: $CROSSMODALNET_FUZZ_EXAMPLES (default 300, a few seconds); run thousands with
    CROSSMODALNET_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/data/test_fuzz_inputs.py
Derandomized: the same examples on every run (hypothesis's database is not used).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import spy_on_body_reads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossmodalnet.data.dataset import CASE_ID_PATTERN, load_dataset, write_dataset_json
from crossmodalnet.data.io import (
    Geometry,
    read_geometry,
    read_image,
    read_label,
    read_label_values,
    write_label,
)
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.errors import CrossModalNetError

EXAMPLES = int(os.environ.get("CROSSMODALNET_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Small, so that a header claiming a few hundred voxels a side is over it: the spy below then
# catches any allocation the header checks let through.
BUDGET = 256 * 2**10
SHAPE = (6, 5, 4)
GEOM = Geometry.from_spacing(SHAPE, (1.0, 1.5, 2.0), origin=(1.0, 2.0, 3.0))


def _valid_bytes(dtype) -> bytes:
    """An uncompressed single-file NIfTI-1 of labels 0..7 in `dtype`."""
    labels = (np.arange(np.prod(SHAPE)) % 8).reshape(SHAPE).astype(dtype)
    img = nib.Nifti1Image(labels, GEOM.affine)
    img.set_sform(GEOM.affine, code=1)
    img.set_qform(GEOM.affine, code=1)
    buf = io.BytesIO()
    img.to_file_map({"image": nib.FileHolder(fileobj=buf), "header": nib.FileHolder(fileobj=buf)})
    return buf.getvalue()


VALID = {np.dtype(d).name: _valid_bytes(d) for d in (np.uint8, np.int16, np.float32)}
# (byte offset, struct format) of the header fields worth aiming at.
FIELDS = {"dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"), "pixdim": (76, "<8f"),
          "vox_offset": (108, "<f"), "scl_slope": (112, "<f"), "scl_inter": (116, "<f"),
          "qform_code": (252, "<h"), "sform_code": (254, "<h"), "quatern": (256, "<6f"), "srow": (280, "<12f")}
DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 3, 7, -1, 32767]
ODD_FLOATS = st.sampled_from([0.0, -0.0, -1.0, 1e-30, 1e30, 3.4e38, float("nan"), float("inf"), float("-inf")])
ODD_INTS = st.one_of(st.integers(-5, 12), st.integers(-32768, 32767), st.sampled_from([0, 1, 2, 3, 4, 7, 8, 1200]))


def _value(fmt: str) -> st.SearchStrategy:
    n = int(fmt[1:-1] or 1)
    one = ODD_INTS if fmt[-1] == "h" else st.one_of(ODD_FLOATS, st.floats(-1e6, 1e6, allow_nan=False))
    return st.lists(one, min_size=n, max_size=n)


@st.composite
def mutated_nifti(draw) -> tuple[bytes, bool]:
    """(file bytes, gzip?) from a valid file and a few mutations."""
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "field", "field", "datatype", "truncate", "pad", "dims_big"]))
        if kind == "flip" and data:
            at = draw(st.integers(0, min(len(data), 352) - 1))
            data[at] = draw(st.integers(0, 255))
        elif kind == "field":
            name = draw(st.sampled_from(sorted(FIELDS)))
            offset, fmt = FIELDS[name]
            if len(data) >= offset + struct.calcsize(fmt):
                struct.pack_into(fmt, data, offset, *draw(_value(fmt)))
        elif kind == "datatype" and len(data) >= 72:
            struct.pack_into("<h", data, 70, draw(st.sampled_from(DATATYPES)))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "pad":
            data += bytes(draw(st.integers(1, 4096)))
        elif kind == "dims_big" and len(data) >= 56:  # a few plausible dims, one very large
            dims = [3, *draw(st.lists(st.integers(1, 32_767), min_size=3, max_size=3)), 1, 1, 1, 1]
            struct.pack_into("<8h", data, 40, *dims)
    return bytes(data), draw(st.booleans())


@pytest.fixture
def spy(monkeypatch) -> list[int]:
    """Bytes of every body nibabel reads, with the budget set to BUDGET; over it is refused, not allocated."""
    return spy_on_body_reads(monkeypatch, BUDGET)


def _read_mmwhs_label(path: Path):
    return read_label(path, MMWHS)


def _assert_clean(exc: CrossModalNetError, path: Path) -> None:
    msg = str(exc)
    assert str(path) in msg and "\n" not in msg, msg


@FUZZ
@given(case=mutated_nifti())
def test_nifti_reader_fails_only_cleanly_and_within_budget(tmp_path_factory, spy, case):
    raw, compressed = case
    folder = tmp_path_factory.getbasetemp() / "fuzz_nifti"
    folder.mkdir(exist_ok=True)
    path = folder / ("case.nii.gz" if compressed else "case.nii")
    path.write_bytes(gzip.compress(raw, compresslevel=1) if compressed else raw)
    for reader in (read_geometry, read_image, read_label_values, _read_mmwhs_label):
        spy.clear()
        try:
            result = reader(path)
        except CrossModalNetError as exc:
            _assert_clean(exc, path)
        else:
            arrays = [r for r in (result if isinstance(result, tuple) else ()) if isinstance(r, np.ndarray)]
            assert all(a.nbytes <= 2 * BUDGET for a in arrays)
        assert all(n <= BUDGET for n in spy), spy


def test_the_fuzzer_reaches_the_budget_and_the_body(tmp_path, spy):
    """The mutations are not all refused at the door: a valid file reads, a large header is refused
    before its body, a truncated one after the header (a fuzz test that cannot fail is a defect)."""
    path = tmp_path / "ok.nii"
    path.write_bytes(VALID["int16"])
    assert read_label(path, MMWHS)[0].shape == SHAPE and spy == [np.prod(SHAPE) * 2]
    big = bytearray(VALID["int16"])
    struct.pack_into("<8h", big, 40, 3, 400, 400, 400, 1, 1, 1, 1)
    path.write_bytes(big)
    with pytest.raises(CrossModalNetError, match="over the budget"):
        read_label(path, MMWHS)
    gz = tmp_path / "cut.nii.gz"
    gz.write_bytes(gzip.compress(VALID["int16"][:-20]))
    with pytest.raises(CrossModalNetError, match="truncated or corrupt"):
        read_image(gz)


# --- dataset.json -------------------------------------------------------------------------------------

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                      st.text(max_size=12))
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)
NAMES = st.sampled_from(["a", "b", "A", "case_0", "../x", "/abs", "..", ".", ".h", "a/b", "", " ", "x" * 200,
                         "é", "a\x00b", "-rf", "c.d", 5, None, ["a"]])
PATHS = st.sampled_from(["images/a_ct.nii.gz", "images/a_mr.nii.gz", "images/b_ct.nii.gz", "labels/a.nii.gz",
                         "images/link_out.nii.gz", "../outside.nii.gz", "/etc/hostname", "images/../images/a_ct.nii.gz",
                         "images/missing.nii.gz", "images", "", 7, None, "images/" + "y" * 300, "a\x00b"])


# Paths a dataset.json may hold: half the structured examples draw only these (and unique ids), so that some are
# accepted and the checks after loading are reached (test_the_dataset_json_fuzzer_reaches_acceptance).
GOOD_PATHS = st.sampled_from(["images/a_ct.nii.gz", "images/a_mr.nii.gz", "images/b_ct.nii.gz", "labels/a.nii.gz"])


@st.composite
def dataset_json(draw) -> bytes:
    """dataset.json bytes: a valid file with fields replaced, random JSON, or random bytes."""
    kind = draw(st.sampled_from(["structured", "structured", "structured", "any_json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "any_json":
        return json.dumps(draw(JSON_ANY)).encode()
    meta: dict = {"name": "fuzz", "modality": {"0": "CT", "1": "MR"}, "labels": {str(i): str(i) for i in range(8)}}
    good = draw(st.booleans())
    paths = GOOD_PATHS if good else PATHS
    for split in ("training", "validation", "test"):
        entries = []
        for _ in range(draw(st.integers(0, 3))):
            # The channels as keys named by them, as an `images` list (null: a missing channel), or as
            # one 4D `image` (MSD); any of the keys may be dropped.
            form = draw(st.sampled_from(["keys", "keys", "images", "image"]))
            # Good ids are unique (or dropped below, then taken from the file name, and may clash).
            entry = {"id": f"{split}_{len(entries)}" if good else draw(NAMES), "label": draw(paths)}
            if form == "keys":
                entry.update(ct=draw(paths), mr=draw(paths))
            elif form == "images":
                entry["images"] = draw(st.lists(st.one_of(paths, st.none()), min_size=0 if not good else 2,
                                                max_size=3 if not good else 2))
            else:
                entry["image"] = draw(paths)
            for key in draw(st.lists(st.sampled_from(["id", "ct", "mr", "label", "images", "image"]), max_size=2)):
                entry.pop(key, None)
            entries.append(entry if good or draw(st.integers(0, 9)) else draw(JSON_ANY))
        meta[split] = entries
    keys = ["name", "modality", "labels", "training", "test", "channel_names", "regions", "label_codes", "encloses",
            "linked_from", "file_ending"]
    for key in draw(st.lists(st.sampled_from(keys), max_size=0 if good else 2)):
        meta[key] = draw(JSON_ANY)
    return json.dumps(meta).encode()


@pytest.fixture(scope="module")
def json_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_json") / "data"
    labels = np.zeros(SHAPE, dtype=np.uint8)
    for rel in ("images/a_ct.nii.gz", "images/a_mr.nii.gz", "images/b_ct.nii.gz", "labels/a.nii.gz"):
        write_label(root / rel, labels, GEOM)
    write_label(root.parent / "outside.nii.gz", labels, GEOM)
    (root / "images" / "link_out.nii.gz").symlink_to(root.parent / "outside.nii.gz")
    write_dataset_json(root, {"training": [{"ct": "images/a_ct.nii.gz", "mr": "images/a_mr.nii.gz"}]}, name="x",
                       spec=MMWHS)
    return root


@FUZZ
@given(text=dataset_json())
def test_dataset_json_reader_fails_only_cleanly(json_root, text):
    json_path = json_root / "dataset.json"
    json_path.write_bytes(text)
    try:
        ds = load_dataset(json_root)
    except CrossModalNetError as exc:
        _assert_clean(exc, json_path)
        return
    # Accepted: every id is a safe file name naming one case only (a case may be in two splits),
    # unique within its split; every path a file inside the folder.
    by_id: dict[str, object] = {}
    for cases in ds.splits.values():
        assert len({c.id.casefold() for c in cases}) == len(cases)
        for c in cases:
            assert by_id.setdefault(c.id.casefold(), c) == c
    inside = json_root.resolve()
    for cases in ds.splits.values():
        for case in cases:
            assert CASE_ID_PATTERN.fullmatch(case.id)
            assert len(case.images) == ds.spec.num_channels and any(case.present)
            for p in case.files:
                assert inside in p.parents and p.is_file()


def test_the_dataset_json_fuzzer_reaches_acceptance(json_root):
    """Some structured examples are accepted, so the checks after loading run (a fuzz test whose every
    example is refused at the door could not fail)."""
    outcomes = {"accepted": 0, "refused": 0}

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(text=dataset_json())
    def probe(text):
        (json_root / "dataset.json").write_bytes(text)
        try:
            load_dataset(json_root)
        except CrossModalNetError:
            outcomes["refused"] += 1
        else:
            outcomes["accepted"] += 1

    probe()
    assert outcomes["accepted"] >= 5 and outcomes["refused"] >= 5, outcomes
