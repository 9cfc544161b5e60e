"""Normalisation by channel name (CT dataset statistics, others per image, noNorm none), preprocess.json
(format 2, and format 1 of earlier runs), and the exact geometry
round trip (reorientation + resampling undone) of `data.preprocess`."""

import json

import numpy as np
import pytest

from crossmodalnet.data.io import Geometry
from crossmodalnet.data.preprocess import ChannelNorm, Preprocessor, fit_preprocessor
from crossmodalnet.errors import CrossModalNetError


def _case(seed, shape=(10, 12, 14), spacing=(1.0, 1.0, 1.0)):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    label[2:8, 3:9, 4:10] = 1 + seed % 7
    ct = np.where(label > 0, rng.normal(300, 50, shape), rng.normal(-1000, 5, shape)).astype(np.float32)
    ct[tuple(np.argwhere(label > 0)[:1].T)] = 5000  # an outlier inside the foreground, to be clipped
    mr = rng.normal(500 + 100 * seed, 30 + seed, shape).astype(np.float32)
    return {"images": [ct, mr], "label": label, "geometry": Geometry.from_spacing(shape, spacing)}


def _zscored(x):
    return abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-4


def test_ct_statistics_come_from_foreground_of_the_whole_training_set():
    cases = [_case(s) for s in range(3)]
    pre = fit_preprocessor(cases, ("CT", "MR"))
    ct = pre.channels[0]
    assert (ct.name, ct.scheme) == ("CT", "ct")
    fg = np.concatenate([c["images"][0][c["label"] > 0] for c in cases]).astype(np.float64)
    lo, hi = np.percentile(fg, [0.5, 99.5])
    assert ct.clip == pytest.approx((lo, hi))
    assert ct.clip[0] > 0  # the -1000 background did not enter the statistics
    assert fg.max() == 5000 and ct.clip[1] < 1000  # the outliers are clipped
    clipped = np.clip(fg, lo, hi)
    assert ct.mean == pytest.approx(clipped.mean()) and ct.std == pytest.approx(clipped.std())
    normed = np.concatenate([pre.normalize(0, c["images"][0])[c["label"] > 0] for c in cases])
    assert _zscored(normed)
    assert pre.normalize(0, np.array([1e6, -1e6])).tolist() == pytest.approx(
        [(hi - ct.mean) / ct.std, (lo - ct.mean) / ct.std])


def test_mr_is_z_scored_per_image():
    pre = fit_preprocessor([_case(0)], ("CT", "MR"))
    assert pre.channels[1] == ChannelNorm("MR", "zscore")
    for seed in (1, 4):
        assert _zscored(pre.normalize(1, _case(seed)["images"][1]))
    geom = Geometry.from_spacing((4, 4, 4), (1.0, 1.0, 1.0))
    with pytest.raises(CrossModalNetError, match=r"case 'x': 3 channels given, the preprocessing has 2 \(CT, MR\)"):
        pre.prepare([np.zeros((4, 4, 4))] * 3, geom, case_id="x")
    with pytest.raises(CrossModalNetError, match="case 'x': no channel given"):
        pre.prepare([None, None], geom, case_id="x")


def test_the_channel_name_picks_the_normalisation():
    """As nnU-Net: a channel named CT (any case) gets the dataset-wide foreground clip and z-score,
    any other name (LGE) a z-score per image, `noNorm` none; by name, not by position."""
    cases = []
    for seed in range(3):
        c = _case(seed)
        ct, mr = c["images"]
        c["images"] = [mr, ct, 10 * mr + 3]
        cases.append(c)
    pre = fit_preprocessor(cases, ("LGE", "ct", "noNorm"), target_spacing=(1.0, 1.0, 1.0))
    lge, ct, raw = pre.channels
    assert (lge.name, lge.scheme) == ("LGE", "zscore") and (raw.name, raw.scheme) == ("noNorm", "none")
    assert (ct.name, ct.scheme) == ("ct", "ct")
    fg = np.concatenate([c["images"][1][c["label"] > 0] for c in cases]).astype(np.float64)
    assert ct.clip == pytest.approx(tuple(np.percentile(fg, [0.5, 99.5])))
    assert ct.clip[1] < 1000  # the outlier of 5000 is clipped: dataset statistics, not this image's
    case = cases[1]
    prepared = pre.prepare(case["images"], case["geometry"], case["label"], case_id="c1")
    assert prepared.present == (True, True, True)
    out_lge, out_ct, out_raw = prepared.images
    assert _zscored(out_lge)  # per image
    np.testing.assert_allclose(out_ct, (np.clip(case["images"][1], *ct.clip) - ct.mean) / ct.std, rtol=1e-5, atol=1e-5)
    assert not _zscored(out_ct)  # the dataset's statistics: one image is not standardised on its own
    np.testing.assert_array_equal(out_raw, case["images"][2])  # as stored
    # A missing channel stays missing (None), and stacks as zeros.
    partial = pre.prepare([case["images"][0], None, case["images"][2]], case["geometry"], case_id="c1")
    assert partial.present == (True, False, True) and partial.images[1] is None
    stacked = partial.stacked()
    assert stacked.shape == (3, *case["label"].shape) and stacked.dtype == np.float32
    assert not stacked[1].any()
    np.testing.assert_array_equal(stacked[0], out_lge)


def test_save_load_round_trip(tmp_path):
    pre = fit_preprocessor([_case(0), _case(1, spacing=(1.0, 1.0, 3.0))], ("CT", "MR"), target_spacing=None)
    assert pre.target_spacing == (1.0, 1.0, 2.0)  # per-axis median
    path = pre.save(tmp_path / "preprocess.json")
    assert json.loads(path.read_text())["format"] == 2
    loaded = Preprocessor.load(path)
    assert loaded == pre
    with pytest.raises(CrossModalNetError, match="not found"):
        Preprocessor.load(tmp_path / "missing.json")
    for text in ('{"channels": {}}', '{"format": 2, "channels": {}}', '{"format": 2, "channels": [{"name": "T2"}]}',
                 '{"format": 3, "channels": []}'):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(CrossModalNetError, match="bad.json: malformed"):
            Preprocessor.load(tmp_path / "bad.json")


def test_format_1_files_of_earlier_runs_still_load(tmp_path):
    """preprocess.json of runs before per-channel normalisation (format 1: CT statistics and MR)."""
    old = {"format": 1,
           "channels": {"CT": {"scheme": "ct", "percentiles": [0.5, 99.5], "clip": [-120.0, 880.0], "mean": 310.0,
                               "std": 95.0},
                        "MR": {"scheme": "zscore per image"}},
           "orientation": "closest canonical (RAS)", "target_spacing": [1.5, 1.5, 2.0]}
    path = tmp_path / "preprocess.json"
    path.write_text(json.dumps(old))
    pre = Preprocessor.load(path)
    assert pre == Preprocessor((ChannelNorm("CT", "ct", (-120.0, 880.0), 310.0, 95.0), ChannelNorm("MR", "zscore")),
                               (1.5, 1.5, 2.0))
    assert pre.normalize(0, np.array([1000.0, 310.0])).tolist() == pytest.approx([(880 - 310) / 95, 0.0])
    # The one written back is format 2 and loads to the same.
    assert Preprocessor.load(pre.save(tmp_path / "again.json")) == pre
    del old["channels"]["CT"]["std"]
    path.write_text(json.dumps(old))
    with pytest.raises(CrossModalNetError, match=r"malformed .*missing channels.CT.std"):
        Preprocessor.load(path)


def test_load_keeps_what_fitting_can_write_and_refuses_what_would_divide_by_zero(tmp_path):
    # MR-only training data fits the identity (infinite clip); a one-valued CT foreground an empty clip range.
    mr = ChannelNorm("MR", "zscore")
    for pre in (Preprocessor((ChannelNorm("CT", "ct"), mr), None),
                Preprocessor((ChannelNorm("CT", "ct", (5.0, 5.0), 5.0, 1e-8), mr), (1.0, 2.0, 1.0))):
        assert Preprocessor.load(pre.save(tmp_path / "ok.json")) == pre
    assert fit_preprocessor([{**_case(0), "images": [None, _case(0)["images"][1]]}], ("CT", "MR")).channels[0] == \
        ChannelNorm("CT", "ct")  # no CT foreground to fit: the identity
    path = tmp_path / "preprocess.json"
    for std, match in ((0.0, "std must be > 0"), (float("nan"), "std must be finite"), (True, "std must be a number")):
        data = Preprocessor((ChannelNorm("CT", "ct", (-1.0, 1.0), 0.0, 1.0), mr), None).to_dict()
        data["channels"][0]["std"] = std
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
    pre = Preprocessor((ChannelNorm("CT", "ct", (-1e9, 1e9), 0.0, 1.0), ChannelNorm("MR", "zscore")), target)
    label = np.zeros(geom.shape, dtype=np.uint8)
    label[1:6, 2:9, 3:12] = 3  # asymmetric, so a wrong flip or permutation would show
    case = pre.prepare([label.astype(np.float32), None], geom, label=label)
    assert case.present == (True, False) and case.images[0].shape == case.label.shape == case.shape
    # The image went the same way as the label (its values are the label's: the CT norm is the identity here).
    if target is None:
        np.testing.assert_array_equal(case.images[0], case.label)
    else:
        assert ((case.images[0] > 1.5) == (case.label == 3)).mean() > 0.95
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
