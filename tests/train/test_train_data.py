"""Patch sampling: a pure function of (seed, rank, step), foreground oversampling by structure,
augmentation that keeps labels valid and never mirrors unless asked; 1 to 4 channels, a missing one
zeros with `present` False."""

from dataclasses import replace as replace_case

import numpy as np
import pytest
import torch
from conftest import fast_config, make_label
from pydantic import ValidationError

from crossmodalnet.config import replace
from crossmodalnet.data.io import Geometry
from crossmodalnet.data.preprocess import ChannelNorm, Preprocessor
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.train.data import PatchSampler

SHAPE = (24, 24, 24)


GEOM = Geometry.from_spacing(SHAPE, (1, 1, 1))


def _cases(n=2):
    pre = Preprocessor((ChannelNorm("CT", "ct", (-1e9, 1e9), 0.0, 1.0), ChannelNorm("MR", "zscore")), None)
    out = []
    for i in range(n):
        label = make_label(SHAPE, np.random.default_rng(i))
        ct = label.astype(np.float32) * 10 + np.random.default_rng(100 + i).normal(size=SHAPE)
        out.append(pre.prepare([ct, ct * 2], GEOM, label, f"c{i}"))
    return out


def _ct(batch):
    return batch["image"][:, 0:1]


def _mr(batch):
    return batch["image"][:, 1:2]


@pytest.fixture(scope="module")
def cases():
    return _cases()


def test_batches_are_a_function_of_seed_rank_and_step(cases):
    cfg = fast_config(patch_size=(12, 12, 12), batch_size=3)
    a, b = PatchSampler(cases, cfg), PatchSampler(cases, cfg)
    first = a.batch(5)
    assert set(first) == {"image", "present", "label"}
    assert first["image"].shape == (3, 2, 12, 12, 12) and first["image"].dtype == torch.float32
    assert first["label"].shape == (3, 1, 12, 12, 12) and first["label"].dtype == torch.int64
    assert first["present"].dtype == torch.bool and first["present"].all() and first["present"].shape == (3, 2)
    b.batch(0)  # history does not matter, only the step number
    again = b.batch(5)
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(_ct(first), _ct(a.batch(6)))
    other_rank = PatchSampler(cases, cfg, rank=1).batch(5)
    assert not torch.equal(_ct(first), _ct(other_rank))  # DDP processes see different patches
    other_seed = PatchSampler(cases, replace(cfg, seed=1)).batch(5)
    assert not torch.equal(_ct(first), _ct(other_seed))


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
    assert torch.equal(torch.round(_ct(batch) / 10).long(), batch["label"])
    # MR is z-scored per image: still an increasing affine function of the CT of the same voxels.
    ct, mr = _ct(batch).flatten().double(), _mr(batch).flatten().double()
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
    assert torch.isfinite(batch["image"]).all()
    plain = PatchSampler(cases, replace(cfg, augment=False)).batch(0)
    assert not torch.equal(_ct(batch), _ct(plain))
    # With augmentation but no spatial/intensity change and no flip axes, patches are the plain ones.
    still = PatchSampler(cases, replace(cfg, spatial_prob=0.0, intensity_prob=0.0)).batch(0)
    assert torch.equal(still["image"], plain["image"]) and torch.equal(still["label"], plain["label"])


def test_small_volumes_are_padded(cases):
    cfg = fast_config(patch_size=(32, 32, 32), batch_size=1, augment=False)
    batch = PatchSampler(cases, cfg).batch(0)
    assert batch["image"].shape[2:] == (32, 32, 32)
    assert (batch["label"] > 0).any() and (batch["image"][..., :2, :, :] == 0).all()  # zero padding


def test_cases_without_label_are_refused(cases):
    bad = replace_case(cases[0], label=None)
    with pytest.raises(CrossModalNetError, match="case 'c0': training needs a label"):
        PatchSampler([bad], fast_config())
    with pytest.raises(CrossModalNetError, match="no training cases"):
        PatchSampler([], fast_config())


def test_misalignment_displaces_the_mr_only(cases):
    cfg = fast_config(patch_size=(10, 10, 10), batch_size=4, spatial_prob=0.0, intensity_prob=0.0,
                      misalign_prob=1.0, misalign_voxels=3.0)
    moved = PatchSampler(cases, cfg).batch(2)
    plain = PatchSampler(cases, replace(cfg, misalign_prob=0.0)).batch(2)
    assert torch.equal(_ct(moved), _ct(plain)) and torch.equal(moved["label"], plain["label"])
    assert not torch.equal(_mr(moved), _mr(plain))
    # Each MR patch is the MR of the same case cut at a centre at most 3 voxels away (whole voxels).
    sampler = PatchSampler(cases, cfg)
    for i in range(4):
        ct = _ct(moved)[i, 0].numpy()
        hits = [(case, np.array(c)) for case in sampler.cases for c in np.ndindex(*case.shape)
                if 5 <= min(c) and max(c) <= 19 and np.array_equal(case.image[0, c[0] - 5:c[0] + 5, c[1] - 5:c[1] + 5,
                                                                            c[2] - 5:c[2] + 5].numpy(), ct)]
        assert len(hits) == 1
        case, c = hits[0]
        shifts = [d for d in np.ndindex(7, 7, 7)
                  if torch.equal(sampler._crop(case, c + np.array(d) - 3)[0][1], _mr(moved)[i, 0])]
        assert shifts and all(np.linalg.norm(np.array(d) - 3) <= 3.0 + 0.87 for d in shifts)  # rounding: <= sqrt(3)/2


def test_misalignment_in_the_resampled_path_equals_a_displaced_crop(cases):
    cfg = fast_config(patch_size=(10, 10, 10), rotation_degrees=0.0, scale_range=0.0)
    sampler = PatchSampler(cases, cfg)
    center = np.array([11, 12, 13])
    shift = np.array([2.0, -1.0, 0.0])
    img, lab = sampler._transformed(sampler.cases[0], center, np.random.default_rng(0), shifts={1: shift})
    plain_img, plain_lab = sampler._crop(sampler.cases[0], center)
    moved = sampler._crop(sampler.cases[0], center + shift.astype(np.int64))[0]
    assert torch.allclose(img[0], plain_img[0], atol=1e-4) and torch.equal(lab, plain_lab)
    assert torch.allclose(img[1], moved[1], atol=1e-4)


def _three_channel_cases():
    """Case p0 lacks channel 1 (LGE); case p1 has all three. Channel c holds (c + 1) * 10 * label + noise,
    as stored (noNorm), so each channel is recognisable in a patch."""
    names = ("C0", "LGE", "noNorm")
    pre = Preprocessor(tuple(ChannelNorm(n, "none") for n in names), None)
    out = []
    for i in range(2):
        label = make_label(SHAPE, np.random.default_rng(i))
        noise = np.random.default_rng(100 + i).normal(0, 0.1, size=SHAPE)
        images = [((c + 1) * 10 * label + noise).astype(np.float32) for c in range(3)]
        if i == 0:
            images[1] = None
        out.append(pre.prepare(images, GEOM, label, f"p{i}"))
    return out


@pytest.mark.parametrize("augment", [False, True])
def test_a_missing_channel_is_zeros_and_marked_absent(augment):
    partial, full = _three_channel_cases()
    assert partial.present == (True, False, True) and full.present == (True, True, True)
    cfg = fast_config(patch_size=(10, 10, 10), batch_size=6, augment=augment, spatial_prob=1.0, intensity_prob=1.0,
                      misalign_prob=1.0 if augment else 0.0)
    only_partial = PatchSampler([partial], cfg).batch(0)
    assert only_partial["image"].shape == (6, 3, 10, 10, 10) and only_partial["present"].shape == (6, 3)
    assert only_partial["present"].tolist() == [[True, False, True]] * 6
    assert (only_partial["image"][:, 1] == 0).all()  # the missing channel: zeros, whatever the augmentation
    assert (only_partial["image"][:, 0] != 0).any() and (only_partial["image"][:, 2] != 0).any()
    # Mixed in one batch: each sample says which of its channels it has, and only those hold values.
    batch = PatchSampler([partial, full], replace(cfg, batch_size=16)).batch(1)
    present = batch["present"]
    assert {tuple(row) for row in present.tolist()} == {(True, False, True), (True, True, True)}
    assert present[:, 0].all() and present[:, 2].all()
    assert (batch["image"][~present[:, 1], 1] == 0).all()
    assert (batch["image"][present[:, 1], 1].flatten(1) != 0).any(1).all()
    if not augment:  # the channels are the case's own: channel c is (c + 1) times channel 0 (noise aside)
        image = batch["image"]
        assert torch.allclose(image[:, 2], 3 * image[:, 0], atol=2.0)
        assert torch.allclose(image[present[:, 1], 1], 2 * image[present[:, 1], 0], atol=2.0)
        assert torch.equal(torch.round(image[:, 0] / 10).long(), batch["label"][:, 0])


def test_one_channel_cases():
    pre = Preprocessor((ChannelNorm("T2", "zscore"),), None)
    cases = []
    for i in range(2):
        label = make_label(SHAPE, np.random.default_rng(i))
        t2 = label.astype(np.float32) * 10 + np.random.default_rng(100 + i).normal(size=SHAPE)
        cases.append(pre.prepare([t2], GEOM, label, f"t{i}"))
    assert cases[0].stacked().shape == (1, *SHAPE)
    cfg = fast_config(patch_size=(12, 12, 12), batch_size=3)
    batch = PatchSampler(cases, cfg).batch(4)
    assert batch["image"].shape == (3, 1, 12, 12, 12) and batch["label"].shape == (3, 1, 12, 12, 12)
    assert batch["present"].tolist() == [[True]] * 3
    assert torch.isfinite(batch["image"]).all()
    for key in batch:
        assert torch.equal(batch[key], PatchSampler(cases, cfg).batch(4)[key])  # still a function of the step
    plain = PatchSampler(cases, replace(cfg, augment=False)).batch(4)
    # z-scored per image, still increasing with the label in the same voxels.
    image, label = plain["image"].flatten().double(), plain["label"].flatten().double()
    assert torch.corrcoef(torch.stack([image, label]))[0, 1] > 0.95


def test_bad_augmentation_settings_are_refused():
    # Refused by the schema, before any sampler exists.
    with pytest.raises(ValidationError, match="misalign_prob\n  Input should be less than or equal to 1"):
        fast_config(misalign_prob=1.5)
    with pytest.raises(ValidationError, match="misalign_voxels\n  Input should be greater than or equal to 0"):
        fast_config(misalign_voxels=-1.0)


@pytest.mark.parametrize("spacing, mixed", [((1.0, 1.0, None), False), ((1.0, 1.0, 12.0), False),
                                            ((1.0, 1.0, 1.0), True)])
def test_augmentation_stays_in_the_plane_of_thick_or_stored_slices(spacing, mixed):
    # Label = slice number + 1 on every voxel: a patch slice showing two values was sampled across slices.
    shape = (32, 32, 8)
    label = np.broadcast_to(np.arange(1, 9, dtype=np.uint8), shape).copy()
    pre = Preprocessor((ChannelNorm("MR", "zscore"),), None)
    case = pre.prepare([label.astype(np.float32)], Geometry.from_spacing(shape, (1, 1, 1)), label, "slices")
    cfg = replace(fast_config(patch_size=(16, 16, 4), batch_size=16), spatial_prob=1.0, rotation_degrees=30.0,
                  scale_range=0.2, foreground_ratio=0.0)
    labels = PatchSampler([case], cfg, spacing=spacing).batch(0)["label"][:, 0]  # (B, 16, 16, 4)
    per_slice = [len(set(torch.unique(labels[b, ..., k]).tolist()) - {0}) for b in range(16) for k in range(4)]
    assert (max(per_slice) > 1) == mixed
