"""Patch sampling: a pure function of (seed, rank, step), foreground oversampling by structure,
augmentation that keeps labels valid and never mirrors unless asked."""

from dataclasses import replace as replace_case

import numpy as np
import pytest
import torch
from conftest import fast_config, make_label
from pydantic import ValidationError

from crossmodalnet.config import replace
from crossmodalnet.data.io import Geometry
from crossmodalnet.data.preprocess import Preprocessor
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.train.data import PatchSampler

SHAPE = (24, 24, 24)


def _cases(n=2):
    pre = Preprocessor(ct_clip=(-1e9, 1e9), ct_mean=0.0, ct_std=1.0, target_spacing=None)
    out = []
    for i in range(n):
        label = make_label(SHAPE, np.random.default_rng(i))
        ct = label.astype(np.float32) * 10 + np.random.default_rng(100 + i).normal(size=SHAPE)
        out.append(pre.prepare(ct, ct * 2, Geometry.from_spacing(SHAPE, (1, 1, 1)), label, f"c{i}"))
    return out


@pytest.fixture(scope="module")
def cases():
    return _cases()


def test_batches_are_a_function_of_seed_rank_and_step(cases):
    cfg = fast_config(patch_size=(12, 12, 12), batch_size=3)
    a, b = PatchSampler(cases, cfg), PatchSampler(cases, cfg)
    first = a.batch(5)
    assert first["ct"].shape == first["mr"].shape == first["label"].shape == (3, 1, 12, 12, 12)
    assert first["label"].dtype == torch.int64
    b.batch(0)  # history does not matter, only the step number
    again = b.batch(5)
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["ct"], a.batch(6)["ct"])
    other_rank = PatchSampler(cases, cfg, rank=1).batch(5)
    assert not torch.equal(first["ct"], other_rank["ct"])  # DDP processes see different patches
    other_seed = PatchSampler(cases, replace(cfg, seed=1)).batch(5)
    assert not torch.equal(first["ct"], other_seed["ct"])


def test_foreground_patches_are_centred_on_uniformly_chosen_structures(cases):
    cfg = fast_config(patch_size=(8, 8, 8), batch_size=1, foreground_ratio=1.0, augment=False)
    sampler = PatchSampler(cases, cfg)
    counts = np.zeros(8)
    for step in range(700):
        counts[int(sampler.batch(step)["label"][0, 0, 4, 4, 4])] += 1
    # Every patch centre is a structure voxel, and each of the 7 structures - however small -
    # is the centre about 1/7 of the time (chance of < 9 % for any of them is negligible).
    assert counts[0] == 0
    assert (counts[1:] / counts.sum() > 0.09).all(), counts
    fg = PatchSampler(cases, replace(cfg, foreground_ratio=0.0))
    bg_centres = sum(int(fg.batch(s)["label"][0, 0, 4, 4, 4] == 0) for s in range(100))
    assert bg_centres > 40  # uniform patches: mostly background in these volumes


def test_image_and_label_stay_aligned_without_augmentation(cases):
    cfg = fast_config(patch_size=(10, 10, 10), batch_size=4, augment=False)
    batch = PatchSampler(cases, cfg).batch(3)
    # ct = 10 * label + noise(std 1) in these cases: the label is recoverable from the image.
    assert torch.equal(torch.round(batch["ct"] / 10).long(), batch["label"])
    # MR is z-scored per image: still an increasing affine function of the CT of the same voxels.
    ct, mr = batch["ct"].flatten().double(), batch["mr"].flatten().double()
    assert torch.corrcoef(torch.stack([ct, mr]))[0, 1] > 0.9999


def test_identity_transform_equals_the_plain_crop(cases):
    cfg = fast_config(patch_size=(10, 10, 10), rotation_degrees=0.0, scale_range=0.0)
    sampler = PatchSampler(cases, cfg)
    center = np.array([11, 12, 13])
    img_t, lab_t = sampler._transformed(sampler.cases[0], center, np.random.default_rng(0))
    img_c, lab_c = sampler._crop(sampler.cases[0], center)
    assert torch.allclose(img_t, img_c, atol=1e-4) and torch.equal(lab_t, lab_c)


def test_augmented_patches_keep_valid_labels_and_no_default_mirroring(cases):
    cfg = fast_config(patch_size=(12, 12, 12), batch_size=4, spatial_prob=1.0, intensity_prob=1.0)
    assert cfg.flip_axes == ()
    batch = PatchSampler(cases, cfg).batch(0)
    assert set(batch["label"].unique().tolist()) <= set(range(8))
    assert torch.isfinite(batch["ct"]).all()
    plain = PatchSampler(cases, replace(cfg, augment=False)).batch(0)
    assert not torch.equal(batch["ct"], plain["ct"])
    # With augmentation but no spatial/intensity change and no flip axes, patches are the plain ones.
    still = PatchSampler(cases, replace(cfg, spatial_prob=0.0, intensity_prob=0.0)).batch(0)
    assert torch.equal(still["ct"], plain["ct"]) and torch.equal(still["label"], plain["label"])


def test_small_volumes_are_padded(cases):
    cfg = fast_config(patch_size=(32, 32, 32), batch_size=1, augment=False)
    batch = PatchSampler(cases, cfg).batch(0)
    assert batch["ct"].shape[2:] == (32, 32, 32)
    assert (batch["label"] > 0).any() and (batch["ct"][..., :2, :, :] == 0).all()  # zero padding


def test_cases_without_label_are_refused(cases):
    bad = replace_case(cases[0], label=None)
    with pytest.raises(CrossModalNetError, match="needs CT, MR and a label"):
        PatchSampler([bad], fast_config())
    with pytest.raises(CrossModalNetError, match="no training cases"):
        PatchSampler([], fast_config())


def test_misalignment_displaces_the_mr_only(cases):
    cfg = fast_config(patch_size=(10, 10, 10), batch_size=4, spatial_prob=0.0, intensity_prob=0.0,
                      misalign_prob=1.0, misalign_voxels=3.0)
    moved = PatchSampler(cases, cfg).batch(2)
    plain = PatchSampler(cases, replace(cfg, misalign_prob=0.0)).batch(2)
    assert torch.equal(moved["ct"], plain["ct"]) and torch.equal(moved["label"], plain["label"])
    assert not torch.equal(moved["mr"], plain["mr"])
    # Each MR patch is the MR of the same case cut at a centre at most 3 voxels away (whole voxels).
    sampler = PatchSampler(cases, cfg)
    for i in range(4):
        ct = moved["ct"][i, 0].numpy()
        hits = [(case, np.array(c)) for case in sampler.cases for c in np.ndindex(*case.shape)
                if 5 <= min(c) and max(c) <= 19 and np.array_equal(case.image[0, c[0] - 5:c[0] + 5, c[1] - 5:c[1] + 5,
                                                                            c[2] - 5:c[2] + 5].numpy(), ct)]
        assert len(hits) == 1
        case, c = hits[0]
        shifts = [d for d in np.ndindex(7, 7, 7)
                  if torch.equal(sampler._crop(case, c + np.array(d) - 3)[0][1], moved["mr"][i, 0])]
        assert shifts and all(np.linalg.norm(np.array(d) - 3) <= 3.0 + 0.87 for d in shifts)  # rounding: <= sqrt(3)/2


def test_misalignment_in_the_resampled_path_equals_a_displaced_crop(cases):
    cfg = fast_config(patch_size=(10, 10, 10), rotation_degrees=0.0, scale_range=0.0)
    sampler = PatchSampler(cases, cfg)
    center = np.array([11, 12, 13])
    shift = np.array([2.0, -1.0, 0.0])
    img, lab = sampler._transformed(sampler.cases[0], center, np.random.default_rng(0), mr_shift=shift)
    plain_img, plain_lab = sampler._crop(sampler.cases[0], center)
    moved = sampler._crop(sampler.cases[0], center + shift.astype(np.int64))[0]
    assert torch.allclose(img[0], plain_img[0], atol=1e-4) and torch.equal(lab, plain_lab)
    assert torch.allclose(img[1], moved[1], atol=1e-4)


def test_bad_augmentation_settings_are_refused():
    # Refused by the schema, before any sampler exists.
    with pytest.raises(ValidationError, match="misalign_prob\n  Input should be less than or equal to 1"):
        fast_config(misalign_prob=1.5)
    with pytest.raises(ValidationError, match="misalign_voxels\n  Input should be greater than or equal to 0"):
        fast_config(misalign_voxels=-1.0)
