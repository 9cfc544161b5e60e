"""Fixtures of the training tests: tiny paired CT/MR datasets made of ellipsoids, and fast configs.

Each structure is an ellipsoid at a jittered position; CT is HU-like (blood bright, muscle
darker), MR has another contrast per structure; both noisy. Small enough (16-24 voxels a side)
that a few training steps take well under a second on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossmodalnet.config import ModelConfig, TrainConfig
from crossmodalnet.data.dataset import write_dataset_json
from crossmodalnet.data.io import Geometry, write_image, write_label
from crossmodalnet.data.spec import MMWHS

# Centre (fraction of the edge) and radius (fraction) of structures 1..7.
_LAYOUT = [((0.5, 0.5, 0.5), 0.22), ((0.3, 0.3, 0.7), 0.12), ((0.5, 0.5, 0.5), 0.12), ((0.7, 0.3, 0.7), 0.12),
           ((0.7, 0.7, 0.4), 0.14), ((0.3, 0.7, 0.3), 0.09), ((0.25, 0.75, 0.75), 0.08)]
_CT_HU = np.array([-80, 150, 320, 330, 310, 300, 340, 335], dtype=np.float32)
_MR = np.array([20, 60, 140, 150, 130, 145, 160, 155], dtype=np.float32)


def make_label(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """(X, Y, Z) uint8 label map of the 7 structures; later structures overwrite earlier ones."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    size = np.array(shape, dtype=np.float32)
    for index, (centre, radius) in enumerate(_LAYOUT, start=1):
        c = (np.array(centre) + rng.uniform(-0.04, 0.04, 3)) * size
        r = radius * size * rng.uniform(0.9, 1.1, 3)
        label[(((grid - c) / r) ** 2).sum(-1) <= 1.0] = index
    return label


def write_case(root: Path, case_id: str, shape=(20, 20, 20), spacing=(1.0, 1.0, 1.0), seed: int = 0,
               geometry: Geometry | None = None, mr_geometry: Geometry | None = None) -> dict:
    """Write one case (CT, MR, label) and return its dataset.json entry."""
    rng = np.random.default_rng(seed)
    geometry = geometry or Geometry.from_spacing(shape, spacing)
    label = make_label(geometry.shape, rng)
    ct = _CT_HU[label] + rng.normal(0, 15, geometry.shape)
    mr = _MR[label] * rng.uniform(0.8, 1.2) + rng.normal(0, 8, geometry.shape)
    entry = {"id": case_id, "ct": f"images/{case_id}_ct.nii.gz", "mr": f"images/{case_id}_mr.nii.gz",
             "label": f"labels/{case_id}.nii.gz"}
    write_image(root / entry["ct"], ct, geometry)
    write_image(root / entry["mr"], mr, mr_geometry or geometry)
    write_label(root / entry["label"], label, geometry)
    return entry


def make_dataset(root: Path, n_train: int = 3, n_val: int = 1, n_test: int = 1, shape=(20, 20, 20)) -> Path:
    entries = [write_case(root, f"case_{i:03d}", shape=shape, seed=i) for i in range(n_train + n_val + n_test)]
    splits = {"training": entries[:n_train], "validation": entries[n_train:n_train + n_val],
              "test": entries[n_train + n_val:]}
    write_dataset_json(root, splits, name="ellipsoids", spec=MMWHS)
    return root


def fast_config(model: str | ModelConfig = "unet", **overrides) -> TrainConfig:
    """A config that trains a tiny model (name, size tiny) for a few steps on 16-voxel patches."""
    model = model if isinstance(model, ModelConfig) else ModelConfig.from_size(model, "tiny")
    base = dict(model=model, epochs=2, iterations_per_epoch=2, batch_size=2,
                patch_size=(16, 16, 16), lr=1e-3, warmup_epochs=1, val_every=1, sw_batch_size=8, device="cpu",
                num_workers=0)  # worker processes: tested on their own (test_engine)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def ellipsoid_data(tmp_path_factory) -> Path:
    """3 training, 1 validation, 1 test case of 20³ voxels (shared; do not modify)."""
    return make_dataset(tmp_path_factory.mktemp("ellipsoids"))


@pytest.fixture(scope="session")
def train_only_data(tmp_path_factory) -> Path:
    """2 training cases of 20³ and no validation split: with val_fraction=0 nothing validates."""
    return make_dataset(tmp_path_factory.mktemp("train_only"), n_train=2, n_val=0, n_test=0)
