"""The synthetic phantom: anatomy (present, connected, enclosed, related as in a heart), rendering,
domains, the two layouts, misalignment records, determinism and bad arguments.

Connectivity is tested with 6-connectivity (face neighbours), the stricter choice: one
6-connected component is also one 26-connected component.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from crossmodalnet.cli import main
from crossmodalnet.data.dataset import check_case, load_case, load_dataset, read_spec
from crossmodalnet.data.io import read_image, read_label
from crossmodalnet.data.labels import CODES, NUM_CLASSES, to_codes
from crossmodalnet.data.phantom import FOV_MM, generate_case, split_cases, synthesize
from crossmodalnet.data.phantom.render import (
    DOMAINS,
    SOURCE,
    TARGET,
    BSplineField,
    Tissue,
    get_domain,
    render_from_labels,
    tissue_from_labels,
)
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.errors import CrossModalNetError

SIX = ndimage.generate_binary_structure(3, 1)
MYO, LA, LV, RA, RV, AO, PA = range(1, 8)
LPS = np.array([-1.0, -1.0, 1.0])  # RAS world -> (left, posterior, superior)


@pytest.fixture(scope="module")
def cases48():
    """Six source cases at 48^3 (3 mm voxels), in memory."""
    return [generate_case(11, i, 48) for i in range(6)]


@pytest.fixture(scope="module")
def case96():
    """One case at the default size, 96^3 (1.5 mm voxels)."""
    return generate_case(3, 0, 96)


def _lv_shell(label: np.ndarray) -> np.ndarray:
    """Labels of the voxels face-adjacent to the LV cavity (its outer one-voxel shell)."""
    lv = label == LV
    return label[ndimage.binary_dilation(lv, SIX) & ~lv]


def _centroid_lps(label: np.ndarray, affine: np.ndarray, index: int) -> np.ndarray:
    idx = np.argwhere(label == index).mean(0)
    return LPS * (affine[:3, :3] @ idx + affine[:3, 3])


# ----------------------------------------------------------------------------- anatomy
def _check_anatomy(label: np.ndarray) -> None:
    counts = np.bincount(label.ravel(), minlength=NUM_CLASSES)
    assert counts.size == NUM_CLASSES and np.all(counts[1:] > 0), f"missing structure: {counts.tolist()}"
    for index in range(1, NUM_CLASSES):
        assert ndimage.label(label == index, SIX)[1] == 1, f"structure {index} is not one component"
    # Myocardium encloses the LV cavity: the cavity's shell is myocardium except at the mitral (LA)
    # and aortic (AO) valves, never background or a right-heart structure; MYO is >= 85 % of it.
    shell = np.bincount(_lv_shell(label), minlength=NUM_CLASSES)
    assert shell.sum() - shell[[MYO, LA, AO]].sum() == 0, f"LV touches {shell.tolist()}"
    assert shell[MYO] / shell.sum() >= 0.85


def test_anatomy_present_connected_enclosed(cases48, case96):
    for case in [*cases48, case96]:
        _check_anatomy(case.label)


@pytest.mark.parametrize("size", [16, 32])
def test_anatomy_holds_on_coarse_grids(size):
    for i in range(3):
        _check_anatomy(generate_case(5, i, size).label)


def test_mmwhs_mr_labels_hold_the_anatomy_too():
    case = generate_case(2, 0, 48, layout="mmwhs")
    _check_anatomy(case.label)
    _check_anatomy(case.mr_label)


def test_anatomy_relations_and_sizes(cases48):
    for case in cases48:
        lab, aff = case.label, case.geometry.affine
        c = {k: _centroid_lps(lab, aff, k) for k in range(1, 8)}
        assert c[LA][1] - c[LV][1] > 20  # LA is posterior of the LV
        assert c[LA][2] > c[LV][2]  # ... and superior
        assert c[RA][0] - c[LA][0] < -15  # RA is right of the LA
        assert c[RV][1] < c[LV][1]  # RV is anterior of the LV
        assert c[AO][2] - c[LV][2] > 15 and c[PA][2] - c[LV][2] > 15  # great vessels rise above
        assert c[PA][1] < c[AO][1]  # the pulmonary trunk runs in front of the aorta
        # LV apex (the cavity voxel farthest from the LA) points anterior, left and inferior.
        lv = np.argwhere(lab == LV)
        lv_mm = (LPS[:, None] * (aff[:3, :3] @ lv.T + aff[:3, 3:4])).T
        apex = lv_mm[np.argmax(np.linalg.norm(lv_mm - c[LA], axis=1))]
        d = apex - c[LV]
        assert d[0] > 0 and d[1] < 0 and d[2] < 0
        # RV wraps the septum: it shares a boundary with the myocardium.
        assert np.any(ndimage.binary_dilation(lab == RV, SIX) & (lab == MYO))
        sp = case.geometry.spacing
        voxel_ml = float(np.prod(sp)) / 1000
        assert 60 <= (lab == LV).sum() * voxel_ml <= 200  # LV end-diastolic volume, ml
        extent = (np.ptp(np.argwhere(lab > 0), axis=0) + 1) * np.array(sp)
        assert 90 <= extent.max() <= 140  # a heart is ~12 cm
        # Wall thickness: inside a slab, distance to the cavity + distance to the outside = thickness
        # (+ one voxel on a voxel grid); the median over the myocardium measures the wall.
        myo, lv_mask = lab == MYO, lab == LV
        d_in = ndimage.distance_transform_edt(~lv_mask, sampling=sp)
        d_out = ndimage.distance_transform_edt(myo | lv_mask, sampling=sp)
        assert 7.0 <= np.median((d_in + d_out)[myo]) - sp[0] <= 13.0


def test_surroundings_are_not_empty(case96):
    """Lung, fat, bone and unlabelled blood surround the heart, so intensity alone gives no label."""
    tissue, label, ct = case96.tissue, case96.label, case96.ct
    bg = label == 0
    for t in (Tissue.LUNG, Tissue.FAT, Tissue.BONE, Tissue.MYOCARDIUM, Tissue.BLOOD_LEFT, Tissue.SOFT):
        assert np.count_nonzero(bg & (tissue == t)) > 500, t.name  # e.g. descending aorta, RV free wall
    assert np.median(ct[tissue == Tissue.LUNG]) < -700
    assert np.median(ct[tissue == Tissue.BONE]) > 400
    # Unlabelled blood (descending aorta, arch, veins) is as bright in CT as the labelled aorta.
    unlabelled = np.median(ct[bg & (tissue == Tissue.BLOOD_LEFT)])
    assert abs(unlabelled - np.median(ct[label == AO])) < 60


# ----------------------------------------------------------------------------- rendering
def test_ct_and_mr_are_different_functions_of_tissue(cases48):
    for case in cases48:
        heart = case.label > 0
        # Measured 0.57-0.76 inside the labels (both show bright blood, dark muscle; the CT right
        # heart is washed out by the saline chaser, the MR is not) and 0.50-0.57 in the organ.
        assert np.corrcoef(case.ct[heart], case.mr[heart])[0, 1] < 0.85
        organ = ndimage.binary_dilation(heart, iterations=2)  # + 6 mm: walls, epicardial fat
        assert np.corrcoef(case.ct[organ], case.mr[organ])[0, 1] < 0.7
        # Not monotone: fat is darker than myocardium in CT but brighter in MR.
        fat, myo = case.tissue == Tissue.FAT, case.label == MYO
        assert np.median(case.ct[fat]) < np.median(case.ct[myo]) - 100
        assert np.median(case.mr[fat]) > 1.5 * np.median(case.mr[myo])


def test_ct_values_are_hounsfield_like(case96):
    ct, label = case96.ct, case96.label
    assert 300 <= np.median(ct[label == LV]) <= 450  # contrast-enhanced left heart
    assert 200 <= np.median(ct[label == RV]) <= 350
    assert 70 <= np.median(ct[label == MYO]) <= 150
    assert -130 <= np.median(ct[case96.tissue == Tissue.FAT]) <= -60
    assert ct.dtype == np.float32 and ct.min() >= -1024


def _spheres(shape=(40, 40, 40)) -> np.ndarray:
    """LV cavity (r 8) inside a myocardial shell (r 12), an RV sphere beside it, an aorta above."""
    grid = np.indices(shape).astype(float)
    def ball(c, r):
        return ((grid - np.reshape(c, (3, 1, 1, 1))) ** 2).sum(0) <= r * r
    lab = np.zeros(shape, np.uint8)
    lab[ball((22, 22, 18), 8)] = RV
    lab[ball((15, 15, 15), 12)] = MYO
    lab[ball((15, 15, 15), 8)] = LV
    lab[ball((15, 15, 30), 4)] = AO
    return lab


def test_render_from_labels_on_spheres():
    lab, sp = _spheres(), (2.0, 2.0, 2.0)
    ct = render_from_labels(lab, sp, "CT", "source", seed=1)
    mr = render_from_labels(lab, sp, "mr", "source", seed=1)
    for img in (ct, mr):
        assert img.shape == lab.shape and img.dtype == np.float32 and np.all(np.isfinite(img))
    lv, myo = ndimage.binary_erosion(lab == LV, iterations=2), ndimage.binary_erosion(lab == MYO)
    assert 300 <= ct[lv].mean() <= 460 and 60 <= ct[myo].mean() <= 160
    assert mr[lv].mean() > 2.5 * mr[myo].mean()
    # Made-up surroundings: fat around the heart, lung far away.
    dist = ndimage.distance_transform_edt(lab == 0, sampling=sp)
    assert np.median(ct[dist > 20]) < -600
    tissue = tissue_from_labels(lab, sp)
    assert np.count_nonzero(tissue == Tissue.FAT) > 100
    # Deterministic by seed; codes and indices give the same image; another seed another image.
    np.testing.assert_array_equal(ct, render_from_labels(to_codes(lab), sp, "CT", SOURCE, seed=1))
    assert not np.array_equal(ct, render_from_labels(lab, sp, "CT", "source", seed=2))
    # A given tissue map is used as is.
    uniform = np.full(lab.shape, Tissue.SOFT, np.uint8)
    flat = render_from_labels(lab, sp, "CT", "source", seed=1, tissue=uniform)
    assert abs(np.median(flat) - SOURCE.ct_hu["soft"]) < 15


def test_render_from_labels_bad_arguments():
    lab = _spheres((12, 12, 12))
    for kwargs in ({"modality": "PET"}, {"spacing": (1.0, 1.0)}, {"spacing": (1.0, 0.0, 1.0)},
                   {"domain": "hospital"}, {"tissue": np.zeros((3, 3, 3), np.uint8)},
                   {"tissue": np.full(lab.shape, 99, np.uint8)}):
        args = {"labels": lab, "spacing": (1.0, 1.0, 1.0), "modality": "CT", **kwargs}
        with pytest.raises(CrossModalNetError):
            render_from_labels(**args)
    with pytest.raises(CrossModalNetError, match=r"label values \[9\] are not labels"):
        render_from_labels(np.full((4, 4, 4), 9), (1, 1, 1), "CT")
    with pytest.raises(CrossModalNetError, match="3D"):
        render_from_labels(np.zeros((4, 4)), (1, 1, 1), "CT")


# ----------------------------------------------------------------------------- domains
def test_domains_differ_measurably(case96):
    """The same anatomy rendered by both presets: contrast, noise, fat and bias all move."""
    lab, tissue, sp = case96.label, case96.tissue, case96.geometry.spacing
    stats = {}
    for name in ("source", "target"):
        ct = render_from_labels(lab, sp, "CT", name, seed=4, tissue=tissue)
        mr = render_from_labels(lab, sp, "MR", name, seed=4, tissue=tissue)
        lv = ndimage.binary_erosion(lab == LV, iterations=3)
        myo = lab == MYO
        fat = tissue == Tissue.FAT
        # Noise (+ texture): the std of a uniform soft-tissue volume.
        uniform = render_from_labels(lab, sp, "CT", name, seed=4, tissue=np.full_like(tissue, Tissue.SOFT))
        smooth = ndimage.gaussian_filter(mr, 4)
        stats[name] = {"ct_lv": np.median(ct[lv]), "ct_contrast": np.median(ct[lv]) - np.median(ct[myo]),
                       "ct_noise": uniform.std(), "mr_fat_myo": np.median(mr[fat]) / np.median(mr[myo]),
                       "mr_lv_cv": smooth[lv].std() / smooth[lv].mean()}
    s, t = stats["source"], stats["target"]
    assert s["ct_lv"] - t["ct_lv"] > 100  # less enhancement
    assert s["ct_contrast"] > 1.8 * t["ct_contrast"]
    assert t["ct_noise"] > 1.5 * s["ct_noise"]
    assert s["mr_fat_myo"] > 2.5 and t["mr_fat_myo"] < 0.8  # fat suppression
    assert t["mr_lv_cv"] > s["mr_lv_cv"]  # stronger bias field
    assert np.prod(TARGET.mr_voxel) > 1.3 * np.prod(SOURCE.mr_voxel)  # thicker MR slices
    assert set(DOMAINS) == {"source", "target"} and get_domain(TARGET) is TARGET


# ----------------------------------------------------------------------------- layouts
def test_dataset_layout(tiny_dataset, tiny_case):
    ds = load_dataset(tiny_dataset)
    assert [len(ds[s]) for s in ("training", "validation", "test")] == [4, 1, 1]
    meta = json.loads((tiny_dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "MR"} and meta["labels"]["LV"] == 500
    assert ds.spec == read_spec(tiny_dataset) == MMWHS and ds.spec.index("LV") == 3
    for case in ds["training"] + ds["validation"] + ds["test"]:
        geom = check_case(case)
        assert geom.shape == (32, 32, 32)
        np.testing.assert_allclose(geom.spacing, FOV_MM / 32)
        assert np.abs(geom.affine[:3, 3]).min() > 1.0  # a scanner-like origin, not 0
        assert case.present == (True, True)
        ct, mr = (ref.path for ref in case.images)
        assert "imagesTs" in str(ct) if case in ds["test"] else "imagesTr" in str(ct)
        assert ct.parent == mr.parent and ct != mr
        label, _, encoding = read_label(case.label, MMWHS)
        assert encoding == "indices" and set(np.unique(label)) == set(range(NUM_CLASSES))
    ct, mr = tiny_case["images"]
    assert ct.shape == mr.shape == tiny_case["label"].shape == (32, 32, 32)
    # The residual MR misalignment is recorded per case (~1-2 mm, ~1-2 degrees, ~1 mm elastic).
    side = json.loads((tiny_dataset / "phantom.json").read_text())
    assert sorted(side["cases"]) == sorted(c.id for c in ds["training"] + ds["validation"] + ds["test"])
    for cid, c in side["cases"].items():
        r = c["mr_residual"]
        assert np.abs(r["rotation_deg"]).max() <= 2.0 and np.abs(r["translation_mm"]).max() <= 2.0
        assert 0.2 < r["elastic_rms_mm"] < 2.5
        assert np.array(r["elastic"]["coefficients_mm"]).shape[0] == 3
        assert meta["phantom"]["mr_residual"][cid]["rotation_deg"] == r["rotation_deg"]


def test_split_is_deterministic_and_complete():
    ids = [f"c{i}" for i in range(20)]
    split = split_cases(ids, seed=0)
    assert [len(split[s]) for s in ("training", "validation", "test")] == [14, 2, 4]
    assert sorted(sum(split.values(), [])) == sorted(ids)
    assert split == split_cases(ids, seed=0) and split != split_cases(ids, seed=1)
    assert [len(v) for v in split_cases(ids[:3], 0).values()] == [1, 1, 1]
    assert [len(v) for v in split_cases(ids[:1], 0).values()] == [1, 0, 0]


def test_mmwhs_layout(tmp_path):
    out = synthesize(tmp_path / "raw", cases=2, size=48, seed=0, layout="mmwhs", preview=True)
    truth = json.loads((out / "mmwhs_truth.json").read_text())
    assert sorted(truth["cases"]) == ["1001", "1002"]
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for cid, meta in truth["cases"].items():
        ct, ct_geom = read_image(out / "ct_train" / f"ct_train_{cid}_image.nii.gz")
        ct_lab, ct_lgeom, ct_enc = read_label(out / "ct_train" / f"ct_train_{cid}_label.nii.gz", MMWHS)
        mr, mr_geom = read_image(out / "mr_train" / f"mr_train_{cid}_image.nii.gz")
        mr_lab, mr_lgeom, mr_enc = read_label(out / "mr_train" / f"mr_train_{cid}_label.nii.gz", MMWHS)
        assert ct_enc == mr_enc == "values"  # the codes 205..850 in the files
        assert ct_lgeom.same_grid(ct_geom) and mr_lgeom.same_grid(mr_geom)
        for lab in (ct_lab, mr_lab):
            assert set(np.unique(to_codes(lab))) == {0, *CODES}
        # Different spacings and fields of view: the MR is coarser and sees more.
        assert all(m > c for m, c in zip(mr_geom.spacing, ct_geom.spacing, strict=True))
        assert all(m * a > c * b for m, a, c, b in zip(mr_geom.spacing, mr_geom.shape, ct_geom.spacing,
                                                      ct_geom.shape, strict=True))
        # The recorded transform maps MR voxels onto the CT voxels of the same structure; without it
        # (identity) they mostly miss, since the misalignment is several mm and degrees.
        t = meta["mr_to_ct"]
        m = np.array(t["matrix"])
        el = t["elastic"]
        field = BSplineField(np.array(el["coefficients_mm"], np.float32), np.array(el["origin_mm"]),
                             np.array(el["spacing_mm"]))
        idx = np.argwhere(mr_lab > 0).T
        p = mr_geom.affine[:3, :3] @ idx + mr_geom.affine[:3, 3:4]
        agree = {}
        for name, q in (("truth", m[:3, :3] @ p + m[:3, 3:4] + field.at(p)), ("identity", p)):
            v = np.rint(np.linalg.solve(ct_geom.affine[:3, :3], q - ct_geom.affine[:3, 3:4])).astype(int)
            inside = np.all((v >= 0) & (v < np.array(ct_geom.shape)[:, None]), axis=0)
            hit = np.zeros(v.shape[1], np.uint8)
            hit[inside] = ct_lab[tuple(v[:, inside])]
            agree[name] = float(np.mean(hit == mr_lab[tuple(idx)]))
        assert agree["truth"] > 0.85 and agree["identity"] < agree["truth"] - 0.2, agree
        assert np.abs(t["rotation_deg"]).max() > 1.0 or np.abs(t["translation_mm"]).max() > 3.0


# ----------------------------------------------------------------------------- determinism, CLI
def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = synthesize(tmp_path / "a", cases=2, size=24, seed=7, preview=True)
    b = synthesize(tmp_path / "b", cases=2, size=24, seed=7)
    c = synthesize(tmp_path / "c", cases=2, size=24, seed=8)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert len(files) == 6 and (a / "preview.png").is_file()
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()  # deterministic gzip too
        assert not np.array_equal(read_image(a / rel)[0], read_image(c / rel)[0])
    for name in ("dataset.json", "phantom.json"):
        assert (a / name).read_text() == (b / name).read_text()
    # The target domain draws other patients and renders them differently.
    t = load_case(load_dataset(synthesize(tmp_path / "t", cases=2, size=24, seed=7, domain="target"))["training"][0],
                  MMWHS)
    s = load_case(load_dataset(a)["training"][0], MMWHS)
    assert not np.array_equal(s["label"], t["label"])


def test_bspline_field_grid_and_points_agree():
    rng = np.random.default_rng(0)
    field = BSplineField.random(rng, (0, 0, 0), (100, 80, 60), 30.0, 2.0, channels=3)
    axes = [np.linspace(0, 100, 11), np.linspace(0, 80, 9), np.linspace(0, 60, 7)]
    grid = field.on_grid(axes)
    pts = np.stack(np.meshgrid(*axes, indexing="ij"))
    np.testing.assert_allclose(field.at(pts), grid, atol=1e-4)
    np.testing.assert_allclose(field.at(pts, step_mm=4.0), grid, atol=0.1)
    assert 1.0 < grid.std() < 3.5


@pytest.mark.parametrize("kwargs, match", [
    ({"cases": 0}, "--cases"), ({"size": 8}, "--size"), ({"size": 1000}, "--size"), ({"seed": -1}, "--seed"),
    ({"domain": "hospital"}, "unknown domain"), ({"layout": "nnunet"}, "layout"), ({"cases": 2.5}, "--cases"),
])
def test_synthesize_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(CrossModalNetError, match=match) as err:
        synthesize(tmp_path / "out", **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_synthesize_output_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(CrossModalNetError, match="cannot create the output folder"):
        synthesize(tmp_path / "taken", cases=1, size=16)


def test_cli_synth(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "bad"), "--cases", "0"]) == 2
    assert "error: --cases" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "ok"), "--cases", "1", "--size", "16", "--layout", "mmwhs"]) == 0
    assert (tmp_path / "ok" / "ct_train" / "ct_train_1001_label.nii.gz").is_file()
