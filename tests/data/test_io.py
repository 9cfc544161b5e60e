"""NIfTI I/O: geometry round trip, atomic writes, and a one-line error naming the file per bad input."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from crossmodalnet.data.io import (
    DEFAULT_MAX_IMAGE_BYTES,
    GRID_ATOL_MM,
    MAX_IMAGE_BYTES_ENV,
    Geometry,
    atomic_path,
    check_same_grid,
    max_image_bytes,
    read_geometry,
    read_image,
    read_label,
    read_label_values,
    write_image,
    write_label,
)
from crossmodalnet.data.labels import to_codes
from crossmodalnet.data.spec import MMWHS, DataSpec, LabelClass
from crossmodalnet.errors import CrossModalNetError

SPACING = (0.7, 1.3, 2.5)


def _oblique_affine() -> np.ndarray:
    """Rotation about a non-axis direction, anisotropic voxels, an off-grid origin."""
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    angle = 0.4
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k  # Rodrigues
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(SPACING)
    affine[:3, 3] = (-90.5, 12.25, 33.0)
    return affine


def _labels(shape=(7, 9, 11), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 8, size=shape).astype(np.uint8)


def _save_raw(path, data, affine=None) -> None:
    """Write with nibabel directly, to make files our writer refuses to make."""
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def _read_mmwhs_label(path):
    return read_label(path, MMWHS)


def _assert_one_line_naming(exc: pytest.ExceptionInfo, path) -> None:
    msg = str(exc.value)
    assert str(path) in msg
    assert "\n" not in msg


# --- geometry -------------------------------------------------------------------------------


def test_image_round_trip_keeps_data_and_oblique_affine(tmp_path):
    affine = _oblique_affine()
    data = np.random.default_rng(0).normal(size=(7, 9, 11)).astype(np.float32)
    path = write_image(tmp_path / "ct.nii.gz", data, Geometry(affine, data.shape))
    back, geom = read_image(path)
    np.testing.assert_array_equal(back, data)
    assert back.dtype == np.float32
    assert geom.shape == (7, 9, 11)
    # The header stores the affine in float32: the round trip is exact up to that rounding.
    np.testing.assert_array_equal(geom.affine, affine.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(geom.affine, affine, atol=1e-5)
    np.testing.assert_allclose(geom.spacing, SPACING, rtol=1e-6)
    # qform and sform agree, so Slicer / ITK-SNAP (qform) and nibabel (sform) see one grid.
    img = nib.load(str(path))
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-4)
    assert img.header.get_xyzt_units()[0] == "mm"


def test_label_round_trip_with_codes_on_oblique_grid(tmp_path):
    indices = _labels()
    geom = Geometry(_oblique_affine(), indices.shape)
    write_label(tmp_path / "codes.nii.gz", to_codes(indices), geom)
    write_label(tmp_path / "indices.nii", indices, geom)
    for name, encoding in (("codes.nii.gz", "values"), ("indices.nii", "indices")):
        back, g, enc = read_label(tmp_path / name, MMWHS)
        assert enc == encoding
        np.testing.assert_array_equal(back, indices)
        assert back.dtype == np.uint8
        assert g.same_grid(geom)


MYOPS = DataSpec(channels=("C0", "LGE", "T2"),
                 classes=(LabelClass("MYO", 200), LabelClass("LV", 500), LabelClass("RV", 600),
                          LabelClass("edema", 1220), LabelClass("scar", 2221)))


@pytest.mark.parametrize(
    "top, dtype",
    [(7, np.uint8), (255, np.uint8), (850, np.int16), (2221, np.int16), (2**15 - 1, np.int16), (2**15, np.int32),
     (70000, np.int32)],
)
def test_write_label_takes_the_smallest_integer_type_that_holds_the_values(tmp_path, top, dtype):
    labels = np.zeros((4, 4, 4), dtype=np.int64)
    labels[0, 0, 0], labels[1, 1, 1] = top, 1
    path = write_label(tmp_path / "lab.nii.gz", labels, Geometry.from_spacing(labels.shape, (1, 1, 1)))
    assert nib.load(str(path)).get_data_dtype() == dtype
    back, _ = read_label_values(path)
    np.testing.assert_array_equal(back, labels)


def test_write_label_negative_values_are_not_written_unsigned(tmp_path):
    labels = np.array([-1, 0, 3], dtype=np.int64).reshape(3, 1, 1)
    path = write_label(tmp_path / "neg.nii.gz", labels, Geometry.from_spacing(labels.shape, (1, 1, 1)))
    assert nib.load(str(path)).get_data_dtype() == np.int16
    np.testing.assert_array_equal(read_label_values(path)[0], labels)


def test_read_label_maps_the_datasets_own_values_to_indices(tmp_path):
    values = np.array([0, 200, 500, 600, 1220, 2221] * 2, dtype=np.int16).reshape(3, 2, 2)
    geom = Geometry.from_spacing(values.shape, (1, 1, 1))
    write_label(tmp_path / "myops.nii.gz", values, geom)
    indices, g, enc = read_label(tmp_path / "myops.nii.gz", MYOPS)
    assert enc == "values" and indices.dtype == np.uint8 and g.same_grid(geom)
    np.testing.assert_array_equal(indices, MYOPS.to_indices(values))
    assert sorted(np.unique(indices)) == [0, 1, 2, 3, 4, 5]
    # The same file is not an MM-WHS label map, and the message names the values that are not labels.
    with pytest.raises(CrossModalNetError, match=r"label values \[200, 1220, 2221\] are not labels") as exc:
        read_label(tmp_path / "myops.nii.gz", MMWHS)
    _assert_one_line_naming(exc, tmp_path / "myops.nii.gz")


def test_read_image_takes_one_volume_of_a_4d_file(tmp_path):
    data = np.random.default_rng(0).normal(size=(4, 5, 6, 3)).astype(np.float32)
    path = tmp_path / "msd.nii.gz"
    _save_raw(path, data, np.diag([1.5, 1.5, 3.0, 1.0]))
    for volume in range(3):
        back, geom = read_image(path, volume)
        np.testing.assert_array_equal(back, data[..., volume])
        assert geom.shape == (4, 5, 6) and geom.spacing == (1.5, 1.5, 3.0)
        assert read_geometry(path, volume).same_grid(geom)
    with pytest.raises(CrossModalNetError, match="has 3 channels along its 4th axis, no channel 3") as exc:
        read_image(path, 3)
    _assert_one_line_naming(exc, path)
    three_d = tmp_path / "three_d.nii.gz"
    _save_raw(three_d, data[..., 0])
    with pytest.raises(CrossModalNetError, match=r"expected a 4D image .* channel 1") as exc:
        read_image(three_d, 1)
    _assert_one_line_naming(exc, three_d)


def test_geometry_from_spacing_and_same_grid():
    g = Geometry.from_spacing((4, 5, 6), (0.5, 1.0, 3.0), origin=(1.0, 2.0, 3.0))
    assert g.spacing == (0.5, 1.0, 3.0)
    assert g.shape == (4, 5, 6)
    np.testing.assert_array_equal(g.affine[:3, 3], [1.0, 2.0, 3.0])
    moved = Geometry(g.affine + np.pad(np.full((3, 1), GRID_ATOL_MM / 2), ((0, 1), (3, 0))), g.shape)
    assert g.same_grid(moved)
    far = Geometry(g.affine + np.pad(np.full((3, 1), 10 * GRID_ATOL_MM), ((0, 1), (3, 0))), g.shape)
    assert not g.same_grid(far)
    assert not g.same_grid(Geometry(g.affine, (4, 5, 7)))


# --- atomic writes ----------------------------------------------------------------------------


def test_atomic_path_leaves_only_the_final_file(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("a,b\n")
        assert not target.exists()  # nothing visible before the block succeeds
    assert target.read_text() == "a,b\n"
    assert os.listdir(target.parent) == ["table.csv"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o007])
def test_atomic_path_mode_follows_the_current_umask(tmp_path, umask):
    """The mode is 0o666 less the umask in force at write time (the kernel applies it), as open() gives;
    nothing is read (or set) at import time."""
    old = os.umask(umask)
    try:
        for name in ("table.csv", "volume.nii.gz"):
            with atomic_path(tmp_path / name) as tmp:
                tmp.write_bytes(b"x")
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
        (tmp_path / "plain.txt").write_text("x")
        assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    finally:
        os.umask(old)


def test_atomic_path_failure_mid_write_leaves_no_file(tmp_path):
    target = tmp_path / "volume.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a volume")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    # An existing file survives a failed rewrite untouched.
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["volume.nii.gz"]


def test_write_image_refuses_a_shape_that_does_not_match_the_geometry(tmp_path):
    path = tmp_path / "x.nii.gz"
    with pytest.raises(CrossModalNetError) as exc:
        write_image(path, np.zeros((4, 4, 4)), Geometry.from_spacing((4, 4, 5), (1, 1, 1)))
    _assert_one_line_naming(exc, path)
    assert os.listdir(tmp_path) == []


# --- bad inputs: each one a CrossModalNetError naming the file ----------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    for reader in (read_image, _read_mmwhs_label, read_label_values):
        with pytest.raises(CrossModalNetError, match="not found") as exc:
            reader(path)
        _assert_one_line_naming(exc, path)


def test_corrupt_files(tmp_path):
    noise = tmp_path / "noise.nii.gz"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    # A valid header followed by truncated voxel data: fails only when the data are read.
    good = tmp_path / "good.nii"
    _save_raw(good, np.arange(4096, dtype=np.float32).reshape(16, 16, 16))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(good.read_bytes()[:2000]))
    for path in (noise, truncated):
        for reader in (read_image, _read_mmwhs_label):
            with pytest.raises(CrossModalNetError, match="cannot read as NIfTI") as exc:
                reader(path)
            _assert_one_line_naming(exc, path)


def test_not_3d(tmp_path):
    path = tmp_path / "four_d.nii.gz"
    _save_raw(path, np.zeros((4, 4, 4, 2), dtype=np.float32))
    for reader in (read_image, _read_mmwhs_label):
        with pytest.raises(CrossModalNetError, match=r"3D volume.*\(4, 4, 4, 2\)") as exc:
            reader(path)
        _assert_one_line_naming(exc, path)
    # A trailing singleton axis, as some converters write, is accepted.
    single = tmp_path / "singleton.nii.gz"
    _save_raw(single, np.ones((4, 4, 4, 1), dtype=np.float32))
    assert read_image(single)[0].shape == (4, 4, 4)


def test_nan_and_inf_voxels(tmp_path):
    data = np.zeros((4, 4, 4), dtype=np.float32)
    data[0, 0, 0], data[1, 2, 3] = np.nan, np.inf
    path = tmp_path / "nan.nii.gz"
    _save_raw(path, data)
    with pytest.raises(CrossModalNetError, match="2 voxels are NaN or Inf") as exc:
        read_image(path)
    _assert_one_line_naming(exc, path)
    with pytest.raises(CrossModalNetError, match="NaN or Inf") as exc:
        read_label(path, MMWHS)
    _assert_one_line_naming(exc, path)


def test_singular_affine(tmp_path):
    path = tmp_path / "flat.nii"
    _save_raw(path, np.zeros((4, 4, 4), dtype=np.float32))
    raw = bytearray(path.read_bytes())
    raw[296:312] = bytes(16)  # zero the sform's second row (srow_y): a flat, singular affine
    path.write_bytes(bytes(raw))
    with pytest.raises(CrossModalNetError, match="affine") as exc:
        read_image(path)
    _assert_one_line_naming(exc, path)


@pytest.mark.parametrize(
    "values, match",
    [
        ([0, 1, 9], r"\[9\]"),  # an index past the table
        ([0, 205, 300], r"\[300\]"),  # a code not in the table
        ([0, 3, -1], r"\[-1\]"),
        ([0, 1, 205], r"mixes class indices \[1\] with label values \[205\]"),  # indices and codes mixed
    ],
)
def test_label_values_outside_the_table(tmp_path, values, match):
    data = np.zeros((4, 4, 4), dtype=np.int16)
    data.flat[: len(values)] = values
    path = tmp_path / "bad_label.nii.gz"
    _save_raw(path, data)
    with pytest.raises(CrossModalNetError, match=match) as exc:
        read_label(path, MMWHS)
    _assert_one_line_naming(exc, path)


def test_float_labels(tmp_path):
    whole = tmp_path / "whole.nii.gz"
    _save_raw(whole, np.full((4, 4, 4), 3.0, dtype=np.float32))
    assert read_label(whole, MMWHS)[0].max() == 3
    frac = tmp_path / "fractional.nii.gz"
    _save_raw(frac, np.full((4, 4, 4), 2.5, dtype=np.float32))
    with pytest.raises(CrossModalNetError, match="non-integer") as exc:
        read_label(frac, MMWHS)
    _assert_one_line_naming(exc, frac)


def test_check_same_grid_names_both_files():
    g = Geometry.from_spacing((8, 8, 8), (1.0, 1.0, 2.0))
    check_same_grid({"ct.nii.gz": g, "mr.nii.gz": Geometry(g.affine + 1e-4, g.shape)})  # within tolerance
    with pytest.raises(CrossModalNetError, match=r"mr.nii.gz: shape \(8, 8, 9\) differs from ct.nii.gz"):
        check_same_grid({"ct.nii.gz": g, "mr.nii.gz": Geometry(g.affine, (8, 8, 9))})
    shifted = g.affine.copy()
    shifted[0, 3] += 0.5
    with pytest.raises(CrossModalNetError, match=r"label.nii.gz: affine differs from ct.nii.gz by up to 0.5 mm"):
        check_same_grid({"ct.nii.gz": g, "mr.nii.gz": g, "label.nii.gz": Geometry(shifted, g.shape)})


# --- the memory budget and the header's claims, checked before any voxel is read ------------------


def test_memory_budget_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "vol.nii.gz"
    _save_raw(path, np.zeros((16, 16, 16), dtype=np.int16))  # 16 KiB as float32
    monkeypatch.delenv(MAX_IMAGE_BYTES_ENV, raising=False)
    assert max_image_bytes() == DEFAULT_MAX_IMAGE_BYTES == 4 * 2**30
    assert read_image(path)[0].shape == (16, 16, 16)
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, str(16 * 16 * 16 * 4 - 1))
    for reader in (read_geometry, read_image, _read_mmwhs_label):
        with pytest.raises(CrossModalNetError, match=r"16x16x16 voxels of int16 .* over the budget") as exc:
            reader(path)
        _assert_one_line_naming(exc, path)
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, "lots")
    with pytest.raises(CrossModalNetError, match=f"{MAX_IMAGE_BYTES_ENV}: expected a positive number"):
        read_image(path)


def test_header_claims_checked_against_the_file_size(tmp_path):
    good = tmp_path / "good.nii"
    _save_raw(good, np.arange(4096, dtype=np.float32).reshape(16, 16, 16))
    short = tmp_path / "short.nii"
    short.write_bytes(good.read_bytes()[:-1])  # one byte of the body missing
    # Found from the header and the file size alone: read_geometry refuses it too.
    for reader in (read_geometry, read_image):
        with pytest.raises(CrossModalNetError, match=r"file of 16735 bytes is too small .* \(16736 bytes\)") as exc:
            reader(short)
        _assert_one_line_naming(exc, short)
    # gzip cannot compress beyond 1032:1: a 16 MiB body cannot hide in a few hundred bytes.
    liar = tmp_path / "liar.nii.gz"
    raw = bytearray(good.read_bytes())
    raw[40:56] = np.array([3, 256, 256, 256, 1, 1, 1, 1], dtype="<i2").tobytes()
    liar.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(CrossModalNetError, match=r"too small .* uncompressed\): truncated or a bad header") as exc:
        read_geometry(liar)
    _assert_one_line_naming(exc, liar)


def test_an_sform_whose_voxel_sizes_disagree_with_pixdim_gives_way_to_the_qform(tmp_path):
    """As ITK reads it: an ACDC copy on GitHub carries a unit-scale sform beside correct pixdim and qform."""
    data = np.zeros((6, 5, 4), dtype=np.float32)
    qform = np.diag([-1.5625, -1.5625, 10.0, 1.0])
    img = nib.Nifti1Image(data, qform)
    img.set_qform(qform, code=1)
    img.set_sform(np.diag([-1.0, -1.0, 1.0, 1.0]), code=2)
    img.header.set_zooms((1.5625, 1.5625, 10.0))
    nib.save(img, tmp_path / "acdc.nii.gz")
    assert read_geometry(tmp_path / "acdc.nii.gz").spacing == pytest.approx((1.5625, 1.5625, 10.0))
    consistent = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))  # sform agrees with pixdim: kept
    nib.save(consistent, tmp_path / "ok.nii.gz")
    assert np.allclose(read_geometry(tmp_path / "ok.nii.gz").affine, np.diag([2.0, 2.0, 3.0, 1.0]))
