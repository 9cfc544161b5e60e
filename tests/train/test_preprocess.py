"""Normalisation by channel name (CT dataset statistics, MR per image), and the exact geometry
round trip (reorientation + resampling undone) of `data.preprocess`."""

import json

import numpy as np
import pytest

from crossmodalnet.data.io import Geometry
from crossmodalnet.data.preprocess import Preprocessor, fit_preprocessor
from crossmodalnet.errors import CrossModalNetError


def _case(seed, shape=(10, 12, 14), spacing=(1.0, 1.0, 1.0)):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    label[2:8, 3:9, 4:10] = 1 + seed % 7
    ct = np.where(label > 0, rng.normal(300, 50, shape), rng.normal(-1000, 5, shape)).astype(np.float32)
    ct[tuple(np.argwhere(label > 0)[:1].T)] = 5000  # an outlier inside the foreground, to be clipped
    mr = rng.normal(500 + 100 * seed, 30 + seed, shape).astype(np.float32)
    return {"ct": ct, "mr": mr, "label": label, "geometry": Geometry.from_spacing(shape, spacing)}


def test_ct_statistics_come_from_foreground_of_the_whole_training_set():
    cases = [_case(s) for s in range(3)]
    pre = fit_preprocessor(cases)
    fg = np.concatenate([c["ct"][c["label"] > 0] for c in cases]).astype(np.float64)
    lo, hi = np.percentile(fg, [0.5, 99.5])
    assert pre.ct_clip == pytest.approx((lo, hi))
    assert pre.ct_clip[0] > 0  # the -1000 background did not enter the statistics
    assert fg.max() == 5000 and pre.ct_clip[1] < 1000  # the outliers are clipped
    clipped = np.clip(fg, lo, hi)
    assert pre.ct_mean == pytest.approx(clipped.mean()) and pre.ct_std == pytest.approx(clipped.std())
    normed = np.concatenate([pre.normalize("CT", c["ct"])[c["label"] > 0] for c in cases])
    assert abs(normed.mean()) < 1e-4 and abs(normed.std() - 1) < 1e-4
    assert pre.normalize("CT", np.array([1e6, -1e6])).tolist() == pytest.approx(
        [(hi - pre.ct_mean) / pre.ct_std, (lo - pre.ct_mean) / pre.ct_std])


def test_mr_is_z_scored_per_image():
    pre = fit_preprocessor([_case(0)])
    for seed in (1, 4):
        out = pre.normalize("MR", _case(seed)["mr"])
        assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-4
    with pytest.raises(ValueError, match="unknown channel"):
        pre.normalize("PET", np.zeros(3))


def test_save_load_round_trip(tmp_path):
    pre = fit_preprocessor([_case(0), _case(1, spacing=(1.0, 1.0, 3.0))], target_spacing=None)
    assert pre.target_spacing == (1.0, 1.0, 2.0)  # per-axis median
    loaded = Preprocessor.load(pre.save(tmp_path / "preprocess.json"))
    assert loaded == pre
    with pytest.raises(CrossModalNetError, match="not found"):
        Preprocessor.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"channels": {}}')
    with pytest.raises(CrossModalNetError, match="bad.json: malformed"):
        Preprocessor.load(tmp_path / "bad.json")


def test_load_keeps_what_fitting_can_write_and_refuses_what_would_divide_by_zero(tmp_path):
    # MR-only training data fits the identity (infinite clip); a one-valued CT foreground an empty clip range.
    for pre in (Preprocessor((-np.inf, np.inf), 0.0, 1.0, None), Preprocessor((5.0, 5.0), 5.0, 1e-8, (1.0, 2.0, 1.0))):
        assert Preprocessor.load(pre.save(tmp_path / "ok.json")) == pre
    path = tmp_path / "preprocess.json"
    for std, match in ((0.0, "std must be > 0"), (float("nan"), "std must be finite"), (True, "std must be a number")):
        data = Preprocessor((-1.0, 1.0), 0.0, 1.0, None).to_dict()
        data["channels"]["CT"]["std"] = std
        path.write_text(json.dumps(data))
        with pytest.raises(CrossModalNetError, match=f"preprocess.json: malformed .*{match}") as err:
            Preprocessor.load(path)
        assert "\n" not in str(err.value)


def _oblique(shape, spacing):
    """An affine with a rotation that is not a multiple of 90 degrees and a flipped, permuted axis."""
    a = np.deg2rad(20)
    rot = np.array([[0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)], [-1, 0, 0]])  # permutes + flips
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = (12.0, -40.0, 7.5)
    return Geometry(affine, shape)


@pytest.mark.parametrize("target", [None, (1.5, 1.5, 1.5)])
def test_prepare_restore_is_the_identity_on_the_original_grid(target):
    geom = _oblique((9, 11, 13), (1.0, 2.0, 3.0))
    pre = Preprocessor(ct_clip=(-1e9, 1e9), ct_mean=0.0, ct_std=1.0, target_spacing=target)
    label = np.zeros(geom.shape, dtype=np.uint8)
    label[1:6, 2:9, 3:12] = 3  # asymmetric, so a wrong flip or permutation would show
    case = pre.prepare(label.astype(np.float32), None, geom, label=label)
    if target is None:
        assert sorted(case.shape) == sorted(geom.shape)
    else:
        assert case.shape != tuple(case.canonical_shape)  # really resampled
    one_hot = np.stack([case.label == c for c in range(4)]).astype(np.float32)
    back = pre.restore(one_hot, case)
    assert back.shape == (4, *geom.shape)
    restored = back.argmax(0)
    if target is None:
        assert np.array_equal(restored, label)  # permutations and flips only: exact
    else:
        agree = (restored == label).mean()
        assert agree > 0.9, agree
