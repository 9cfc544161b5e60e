"""Random training patches from volumes cached in memory, with foreground oversampling and
augmentation on the CPU.

    sampler = PatchSampler(cases, config, rank=0, batch_size=2)
    batch = sampler.batch(step)   # {"image": (B, C, *P), "present": (B, C) bool, "label": (B, 1, *P) int64}

Every batch is a pure function of (seed, rank, step): the random generator is re-made from
those three numbers at each step, so a resumed run draws exactly the patches the uninterrupted
run drew, DDP processes (different ranks) draw different patches, and the batches are the same
whether they are drawn in the training loop or in background workers (`train.engine`).

C is the dataset's channels; a channel a case lacks is zeros with `present` False (the model puts
its learned placeholders there). Foreground oversampling: a share `foreground_ratio` of patches is
centred on a voxel of one class, the class picked uniformly among those present, so that small
structures (PA, scar) are seen as often as the large ones. Augmentation: rotation (+-15 deg about
each axis, in mm so anisotropic grids rotate correctly) and isotropic scaling (+-10 %) resampled
with `grid_sample` (trilinear images, nearest labels, zeros outside), every channel but the first
displaced against the first and the label, each by its own draw (`misalign_prob`,
`misalign_voxels`: registration error), intensity scale/shift per channel, and mirroring only
along `flip_axes` (none by default: see `TrainConfig`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from crossmodalnet.config import TrainConfig
from crossmodalnet.data.preprocess import PreparedCase
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.train.plan import slice_axes

__all__ = ["PatchSampler", "step_generator"]


def step_generator(seed: int, rank: int, step: int, sample: int = 0) -> np.random.Generator:
    """The numpy generator of one sample of one training step of one process."""
    return np.random.default_rng(np.random.SeedSequence([seed, rank, step, sample]))


class _CachedCase:
    """One case as tensors: image (C, D, H, W) float32 (missing channel = zeros), present (C,) bool,
    label (D, H, W) int64."""

    def __init__(self, case: PreparedCase) -> None:
        if case.label is None:
            raise CrossModalNetError(f"case {case.id!r}: training needs a label")
        self.id = case.id
        self.image = torch.from_numpy(case.stacked())
        self.present = torch.tensor(case.present, dtype=torch.bool)
        self.label = torch.from_numpy(case.label.astype(np.int64))
        self.shape = tuple(int(s) for s in case.label.shape)
        # Voxel coordinates of every class present, for foreground-centred patches.
        self.coords = {int(c): np.argwhere(case.label == c).astype(np.int32) for c in np.unique(case.label) if c}


class PatchSampler:
    """Batches of random patches (see module docstring). batch_size is per process."""

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        config: TrainConfig,
        rank: int = 0,
        batch_size: int | None = None,
        spacing: Sequence[float | None] | None = None,
    ) -> None:
        if not cases:
            raise CrossModalNetError("no training cases to sample patches from")
        self.cases = [_CachedCase(c) for c in cases]
        self.config = config
        self.rank = rank
        self.batch_size = batch_size or config.batch_size
        self.patch = tuple(int(p) for p in config.patch_size)
        spacing = tuple(spacing) if spacing is not None else (1.0, 1.0, 1.0)
        # Slice axes (the plan's rule: kept as stored, or over ANISOTROPY x the finest): spatial augmentation
        # stays in the slices' plane, as nnU-Net's "dummy 2D" augmentation; a tilt would mix slices 10-20 mm apart.
        self.flat = sorted(slice_axes(spacing))
        self.spacing = np.asarray([1.0 if s is None else s for s in spacing], dtype=np.float64)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of training step `step` (global step count, from 0)."""
        images, labels, present = [], [], []
        for i in range(self.batch_size):
            # One generator per sample: which patch is drawn does not depend on how many numbers
            # the augmentation of the samples before it consumed.
            image, label, has = self._sample(step_generator(self.config.seed, self.rank, step, i))
            images.append(image)
            labels.append(label)
            present.append(has)
        return {"image": torch.stack(images), "present": torch.stack(present), "label": torch.stack(labels)[:, None]}

    # --- one patch ---------------------------------------------------------------------------
    def _sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        case = self.cases[int(rng.integers(len(self.cases)))]
        center = self._center(case, rng, foreground=rng.random() < cfg.foreground_ratio)
        aug = np.random.default_rng(rng.integers(2**63))  # augmentation draws its own stream
        # Drawn only when enabled, so that runs without it keep their random streams.
        shifts = ({c: self._mr_shift(aug) for c in range(1, case.image.shape[0])}
                  if cfg.augment and cfg.misalign_prob > 0 else {})
        shifts = {c: v for c, v in shifts.items() if v is not None}
        if cfg.augment and aug.random() < cfg.spatial_prob:
            image, label = self._transformed(case, center, aug, shifts)
        else:
            image, label = self._crop(case, center)
            for c, shift in shifts.items():  # a channel whose patch centre is displaced (whole voxels)
                image[c] = self._window(case.image[c], center + np.rint(shift).astype(np.int64))
        if cfg.augment:
            for c in range(image.shape[0]):
                if aug.random() < cfg.intensity_prob:
                    scale = 1.0 + aug.uniform(-cfg.intensity_scale, cfg.intensity_scale)
                    shift = aug.uniform(-cfg.intensity_shift, cfg.intensity_shift)
                    if case.present[c]:  # a missing channel stays zeros (drawn all the same: same streams)
                        image[c] = image[c] * float(scale) + float(shift)
            for axis in cfg.flip_axes:
                if aug.random() < 0.5:
                    image, label = image.flip(1 + axis), label.flip(axis)
        return image.contiguous(), label.contiguous(), case.present.clone()

    def _mr_shift(self, rng: np.random.Generator) -> np.ndarray | None:
        """Displacement (3,) in voxels of a channel against the first, or None (it stays registered)."""
        if rng.random() >= self.config.misalign_prob:
            return None
        direction = rng.normal(size=3)
        return direction / max(np.linalg.norm(direction), 1e-12) * rng.uniform(0.0, self.config.misalign_voxels)

    def _center(self, case: _CachedCase, rng: np.random.Generator, foreground: bool) -> np.ndarray:
        """Patch centre in voxels: on a random voxel of a uniformly chosen structure, or uniform."""
        if foreground and case.coords:
            classes = sorted(case.coords)
            coords = case.coords[classes[int(rng.integers(len(classes)))]]
            center = coords[int(rng.integers(len(coords)))].astype(np.int64)
        else:
            center = np.array([int(rng.integers(n)) for n in case.shape])
        # Keep the patch inside the volume where the volume is large enough, so that patches
        # rarely waste voxels on padding (as nnU-Net does).
        for i, (n, p) in enumerate(zip(case.shape, self.patch, strict=True)):
            lo, hi = p // 2, n - (p - p // 2)
            center[i] = (n // 2) if hi < lo else min(max(center[i], lo), hi)
        return center

    def _crop(self, case: _CachedCase, center: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Axis-aligned patch around `center`, zero-padded where it leaves the volume."""
        return self._window(case.image, center), self._window(case.label, center)

    def _window(self, volume: torch.Tensor, center: np.ndarray) -> torch.Tensor:
        """The patch of `volume` (..., D, H, W) around `center`, zeros where it leaves the volume."""
        out = volume.new_zeros((*volume.shape[:-3], *self.patch))
        src, dst = [], []
        for n, p, c in zip(volume.shape[-3:], self.patch, center, strict=True):
            start = int(c) - p // 2
            a, b = max(start, 0), min(start + p, n)
            src.append(slice(a, b))
            dst.append(slice(a - start, b - start))
        out[(..., *dst)] = volume[(..., *src)]
        return out

    def _transformed(
        self, case: _CachedCase, center: np.ndarray, rng: np.random.Generator,
        shifts: dict[int, np.ndarray] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated and scaled patch around `center`, resampled from the whole cached volume; channel
        c sampled `shifts[c]` voxels away (volume axes) when given."""
        cfg = self.config
        angles = np.deg2rad(rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees, size=3))
        zoom = 1.0 + rng.uniform(-cfg.scale_range, cfg.scale_range)
        if self.flat:  # in the slices' plane only: rotation about the slice axis, no scaling along it
            angles = np.array([a if i in self.flat else 0.0 for i, a in enumerate(angles)])
            zoom = np.diag([1.0 if i in self.flat else zoom for i in range(3)])
        # Rotate in mm, not voxels, so that an anisotropic grid is not sheared.
        matrix = np.diag(1.0 / self.spacing) @ _rotation(angles) @ np.diag(self.spacing)
        matrix = matrix @ zoom if self.flat else matrix * zoom
        # Patch voxel i sits at centre - p // 2 + i, exactly as in `_crop`; rotation is about the centre.
        offsets = np.stack(
            np.meshgrid(*[np.arange(p) - p // 2 for p in self.patch], indexing="ij"), axis=-1
        ).astype(np.float64)  # (*P, 3) in (d, h, w) voxels
        points = offsets @ matrix.T + center  # source voxel of each patch voxel
        size = np.array(case.shape, dtype=np.float64)

        def grid(at: np.ndarray) -> torch.Tensor:
            norm = 2.0 * at / np.maximum(size - 1, 1) - 1.0  # align_corners=True convention
            return torch.from_numpy(norm[..., ::-1].copy()).float()[None]  # grid_sample wants (x=w, y=h, z=d)

        g = grid(points)
        image = F.grid_sample(case.image[None], g, mode="bilinear", padding_mode="zeros", align_corners=True)
        for c, shift in (shifts or {}).items():
            image[:, c:c + 1] = F.grid_sample(case.image[None, c:c + 1], grid(points + shift), mode="bilinear",
                                              padding_mode="zeros", align_corners=True)
        label = F.grid_sample(case.label[None, None].float(), g, mode="nearest", padding_mode="zeros",
                              align_corners=True)
        return image[0], label[0, 0].round().long()


def _rotation(angles: np.ndarray) -> np.ndarray:
    """3x3 rotation: about axis 0, then 1, then 2, by the given radians."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx
