"""Preprocessing shared by training and prediction: orientation, intensity, spacing.

The channel name picks the normalisation, as in nnU-Net (`spec.normalization_scheme`):
- **CT**: clip to the 0.5 / 99.5 percentiles of the *foreground* (label > 0) intensities of the
  whole training set, then standardise with the mean and std of those clipped voxels
  (dataset-wide statistics: Hounsfield units mean the same thing in every scan);
- **anything else** (MR sequences, ADC, PET...): z-score per image (arbitrary units per scan);
- `noNorm`: as stored.

Geometry: a volume is turned to the network's axis order by permutations and flips only (exact,
no interpolation), then resampled to the training spacing when its own spacing differs. The
order is the closest canonical (RAS) one, or, with `orientation="stored"`, the voxel axes as
stored: short-axis cardiac MR is oblique to the body, so the closest canonical axis of the slice
direction differs from scan to scan (MyoPS 2020: LSP and PSR files), and a canonical order would
put 12-23 mm slices on different axes of different cases; `fit_preprocessor` picks (`"auto"`).
`restore` undoes both exactly in reverse, so predictions come back on the input's original grid
(same shape and affine).

Arrays: volumes (X, Y, Z) as stored; network space (D, H, W) = canonical, resampled axes;
probabilities (C, D, H, W) -> (C, X, Y, Z). The fitted statistics are saved as
`preprocess.json` in the run folder, so that `predict` applies exactly what training did.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, io_orientation

from crossmodalnet.data.io import Geometry
from crossmodalnet.data.spec import normalization_scheme
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path

__all__ = ["Preprocessor", "ChannelNorm", "PreparedCase", "fit_preprocessor", "choose_orientation", "network_spacing",
           "network_grid_shape",
           "CT_PERCENTILES", "ORIENTATIONS"]

CT_PERCENTILES: tuple[float, float] = (0.5, 99.5)
# Foreground voxels kept per case for the CT statistics (nnU-Net samples too); enough for stable
# percentiles, bounded memory on large datasets.
_FOREGROUND_SAMPLES_PER_CASE = 200_000
_FORMAT = 2
_SCHEMES = ("ct", "zscore", "none")
ORIENTATIONS = ("canonical", "stored")
# Spacing ratio above which a case's coarsest axis is its slice axis (for the orientation choice).
_SLICE_RATIO = 2.0


@dataclass
class PreparedCase:
    """A case in network space, with what `Preprocessor.restore` needs to go back.

    images: per channel (D, H, W) float32 normalised, or None where the case lacks it.
    label: (D, H, W) uint8 class indices or None. geometry: the original grid.
    ornt: (3, 2) nibabel orientation original -> canonical.
    canonical_shape: shape after reorientation, before resampling.
    """

    id: str
    images: list[np.ndarray | None]
    label: np.ndarray | None
    geometry: Geometry
    ornt: np.ndarray
    canonical_shape: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        ref = next(x for x in self.images if x is not None)
        return tuple(int(s) for s in ref.shape)

    @property
    def present(self) -> tuple[bool, ...]:
        return tuple(x is not None for x in self.images)

    def stacked(self) -> np.ndarray:
        """(C, D, H, W) float32, zeros for a missing channel."""
        ref = next(x for x in self.images if x is not None)
        return np.stack([x if x is not None else np.zeros_like(ref) for x in self.images]).astype(np.float32)


@dataclass(frozen=True)
class ChannelNorm:
    """How one channel is normalised: its name, scheme ("ct", "zscore", "none") and, for "ct",
    the dataset-wide clip and statistics."""

    name: str
    scheme: str
    clip: tuple[float, float] = (-np.inf, np.inf)
    mean: float = 0.0
    std: float = 1.0

    def apply(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image, dtype=np.float32)
        if self.scheme == "ct":
            lo, hi = self.clip
            return ((np.clip(image, lo, hi) - self.mean) / self.std).astype(np.float32)
        if self.scheme == "zscore":
            mean, std = float(image.mean()), float(image.std())
            return ((image - mean) / max(std, 1e-8)).astype(np.float32)
        return image


@dataclass
class Preprocessor:
    """Fitted normalisation per channel and target spacing. Build with `fit_preprocessor` or `load`."""

    channels: tuple[ChannelNorm, ...]
    # mm per network axis; None: keep the grid; an axis None: that axis as stored (a 2D plan's slices)
    target_spacing: tuple[float | None, float | None, float | None] | None
    orientation: str = "canonical"  # "canonical" (closest RAS) or "stored" (the voxel axes as they are)

    # --- intensity ---------------------------------------------------------------------------
    def normalize(self, channel: int, image: np.ndarray) -> np.ndarray:
        """Normalise one volume of channel index `channel`. Same shape, float32."""
        return self.channels[channel].apply(image)

    # --- geometry ----------------------------------------------------------------------------
    def network_shape(self, geometry: Geometry) -> tuple[tuple[int, int, int], np.ndarray, tuple[int, ...]]:
        """(network shape, orientation, canonical shape) of a volume on `geometry`."""
        ornt = _orientation(geometry, self.orientation)
        canonical_shape = [0, 0, 0]
        spacing = [0.0, 0.0, 0.0]
        for axis, (target_axis, _flip) in enumerate(ornt):
            canonical_shape[int(target_axis)] = geometry.shape[axis]
            spacing[int(target_axis)] = geometry.spacing[axis]
        if self.target_spacing is None:
            return tuple(canonical_shape), ornt, tuple(canonical_shape)
        shape = tuple(
            n if t is None else max(1, int(round(n * s / t)))
            for n, s, t in zip(canonical_shape, spacing, self.target_spacing, strict=True)
        )
        return shape, ornt, tuple(canonical_shape)

    def prepare(
        self,
        images: Sequence[np.ndarray | None],
        geometry: Geometry,
        label: np.ndarray | None = None,
        case_id: str = "",
    ) -> PreparedCase:
        """Original volumes (X, Y, Z), one per channel (None where missing) -> network space:
        normalise, reorient, resample."""
        if len(images) != len(self.channels):
            raise CrossModalNetError(f"case {case_id!r}: {len(images)} channels given, the preprocessing has "
                                     f"{len(self.channels)} ({', '.join(c.name for c in self.channels)})")
        if all(x is None for x in images):
            raise CrossModalNetError(f"case {case_id!r}: no channel given")
        shape, ornt, canonical_shape = self.network_shape(geometry)
        out: list[np.ndarray | None] = []
        for i, image in enumerate(images):
            if image is None:
                out.append(None)
                continue
            canon = apply_orientation(self.normalize(i, image), ornt)
            out.append(_resize(canon[None], shape, mode="trilinear")[0])
        lab = None
        if label is not None:
            canon = apply_orientation(np.asarray(label, dtype=np.uint8), ornt)
            lab = _resize(canon[None].astype(np.float32), shape, mode="nearest-exact")[0].astype(np.uint8)
        return PreparedCase(case_id, out, lab, geometry, ornt, canonical_shape)

    @staticmethod
    def restore(values: np.ndarray | torch.Tensor, case: PreparedCase) -> np.ndarray:
        """(C, D, H, W) values in network space -> (C, X, Y, Z) on the case's original grid.

        Resampled back with trilinear interpolation (probabilities; argmax afterwards), then
        reoriented with the exact inverse permutation and flips.
        """
        arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        arr = _resize(arr.astype(np.float32, copy=False), case.canonical_shape, mode="trilinear")
        inverse = np.zeros_like(case.ornt)
        for axis, (target_axis, flip) in enumerate(case.ornt):
            inverse[int(target_axis)] = (axis, flip)
        # nibabel reorients the leading axes: move channels last and back.
        out = apply_orientation(np.moveaxis(arr, 0, -1), inverse)
        return np.ascontiguousarray(np.moveaxis(out, -1, 0))

    # --- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        channels = []
        for c in self.channels:
            entry: dict = {"name": c.name, "scheme": c.scheme}
            if c.scheme == "ct":
                entry.update(percentiles=list(CT_PERCENTILES), clip=list(c.clip), mean=c.mean, std=c.std)
            channels.append(entry)
        return {
            "format": _FORMAT,
            "channels": channels,
            "orientation": self.orientation,
            "target_spacing": None if self.target_spacing is None else list(self.target_spacing),
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "preprocess") -> Preprocessor:
        """The statistics of `to_dict`, validated: a damaged or edited file must not divide by zero
        or spread NaN through every prediction. Errors name `source` and the key. Reads format 1
        (runs before per-channel normalisation: CT and MR)."""
        def number(value: object, key: str, allow_inf: bool = False) -> float:
            # bool is an int to Python, and a string would pass float(): both are wrong types here.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _malformed(source, f"{key} must be a number, got {value!r}")
            value = float(value)
            if math.isnan(value) or (math.isinf(value) and not allow_inf):
                raise _malformed(source, f"{key} must be finite, got {value}")
            return value

        def ct_norm(name: str, ct: object, key: str) -> ChannelNorm:
            if not isinstance(ct, dict):
                raise _malformed(source, f"missing {key} (the CT normalisation)")
            for field in ("clip", "mean", "std"):
                if field not in ct:
                    raise _malformed(source, f"missing {key}.{field}")
            clip = ct["clip"]
            if not isinstance(clip, list) or len(clip) != 2:
                raise _malformed(source, f"{key}.clip must be a list [low, high], got {clip!r}")
            # An infinite clip is the identity fitted on data without CT foreground (fit_preprocessor).
            lo, hi = (number(v, f"{key}.clip", allow_inf=True) for v in clip)
            if not lo <= hi:  # equal: a training set whose CT foreground is one value
                raise _malformed(source, f"{key}.clip must have low <= high, got {clip!r}")
            mean, std = number(ct["mean"], f"{key}.mean"), number(ct["std"], f"{key}.std")
            if not std > 0:
                raise _malformed(source, f"{key}.std must be > 0, got {std}")
            return ChannelNorm(name, "ct", (lo, hi), mean, std)

        if not isinstance(data, dict):
            raise _malformed(source, f"expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format", 1)
        if fmt not in (1, _FORMAT):
            raise _malformed(source, f"format {fmt!r} is not {_FORMAT}: written by another version of crossmodalnet")
        raw = data.get("channels")
        if fmt == 1:
            ct = raw.get("CT") if isinstance(raw, dict) else None
            channels = (ct_norm("CT", ct, "channels.CT"), ChannelNorm("MR", "zscore"))
        else:
            if not isinstance(raw, list) or not raw:
                raise _malformed(source, f"channels must be a non-empty list, got {raw!r:.80}")
            channels = []
            for i, entry in enumerate(raw):
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                    raise _malformed(source, f"channels[{i}] must be an object with a name, got {entry!r:.80}")
                scheme = entry.get("scheme")
                if scheme not in _SCHEMES:
                    raise _malformed(source, f"channels[{i}].scheme must be one of {_SCHEMES}, got {scheme!r}")
                channels.append(ct_norm(entry["name"], entry, f"channels[{i}]") if scheme == "ct"
                                else ChannelNorm(entry["name"], scheme))
            channels = tuple(channels)
        spacing = data.get("target_spacing")
        if spacing is not None:
            if not isinstance(spacing, list) or len(spacing) != 3:
                raise _malformed(source, f"target_spacing must be null or 3 numbers (mm) or nulls, got {spacing!r}")
            spacing = tuple(None if v is None else number(v, "target_spacing") for v in spacing)
            if not all(v is None or v > 0 for v in spacing):
                raise _malformed(source, f"target_spacing must be positive (mm), got {list(spacing)}")
        orientation = data.get("orientation", "canonical")
        if orientation == "closest canonical (RAS)":  # how format 1 and early format 2 files say it
            orientation = "canonical"
        if orientation not in ORIENTATIONS:
            raise _malformed(source, f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        return cls(channels=channels, target_spacing=spacing, orientation=orientation)

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Preprocessor:
        path = Path(path)
        if not path.is_file():
            raise CrossModalNetError(f"{path}: preprocessing statistics not found (is this a complete run folder?)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise CrossModalNetError(f"{path}: not a UTF-8 text file") from None
        except json.JSONDecodeError as exc:
            raise CrossModalNetError(f"{path}: invalid JSON ({exc})") from None
        except RecursionError:
            raise CrossModalNetError(f"{path}: JSON nested too deeply") from None
        return cls.from_dict(data, str(path))


def _malformed(source: str, detail: str) -> CrossModalNetError:
    return CrossModalNetError(f"{source}: malformed preprocessing statistics: {detail}")


def choose_orientation(geometries: Sequence[Geometry]) -> str:
    """"canonical" unless the cases' slice axes (a spacing over twice the finest) land on different
    canonical axes, or a case has a slice axis and another does not: then "stored"."""
    slice_axes = set()
    for geometry in geometries:
        spacing = network_spacing(geometry, "canonical")
        coarse = int(np.argmax(spacing))
        slice_axes.add(coarse if spacing[coarse] > _SLICE_RATIO * min(spacing) else None)
    return "canonical" if len(slice_axes) <= 1 else "stored"


def fit_preprocessor(
    cases: Sequence[dict], channels: Sequence[str], target_spacing: Sequence[float | None] | None = None, seed: int = 0,
    orientation: str = "auto",
) -> Preprocessor:
    """Fit the normalisation of every channel, the axis order and the target spacing on training cases.

    cases: dicts from `dataset.load_case` ({"images", "label", "geometry"}), all labelled.
    channels: the dataset's channel names; each picks its scheme (`spec.normalization_scheme`).
    target_spacing: mm per network axis (an axis None: as stored); None takes the per-axis median of the cases.
    orientation: "canonical", "stored" or "auto" (`choose_orientation`).
    """
    rng = np.random.default_rng(seed)
    if orientation == "auto":
        orientation = choose_orientation([case["geometry"] for case in cases])
    if orientation not in ORIENTATIONS:
        raise CrossModalNetError(f"orientation must be auto or one of {ORIENTATIONS}, got {orientation!r}")
    spacings = []
    for case in cases:
        if case.get("label") is None:
            raise CrossModalNetError("fitting the normalisation needs labelled training cases")
        spacings.append(network_spacing(case["geometry"], orientation))
    norms = []
    for i, name in enumerate(channels):
        scheme = normalization_scheme(name)
        if scheme != "ct":
            norms.append(ChannelNorm(name, scheme))
            continue
        foreground = []
        for case in cases:
            image = case["images"][i]
            if image is None:
                continue
            values = image[case["label"] > 0]
            if values.size > _FOREGROUND_SAMPLES_PER_CASE:
                values = rng.choice(values, _FOREGROUND_SAMPLES_PER_CASE, replace=False)
            foreground.append(values.astype(np.float64))
        if foreground and sum(v.size for v in foreground) > 0:
            values = np.concatenate(foreground)
            lo, hi = (float(v) for v in np.percentile(values, CT_PERCENTILES))
            clipped = np.clip(values, lo, hi)
            norms.append(ChannelNorm(name, "ct", (lo, hi), float(clipped.mean()), max(float(clipped.std()), 1e-8)))
        else:  # no foreground of this channel in the training data: identity
            norms.append(ChannelNorm(name, "ct"))
    if target_spacing is None and spacings:
        target_spacing = tuple(float(v) for v in np.median(np.array(spacings), axis=0))
    spacing = None if target_spacing is None else tuple(None if s is None else float(s) for s in target_spacing)
    return Preprocessor(channels=tuple(norms), target_spacing=spacing, orientation=orientation)


def _orientation(geometry: Geometry, orientation: str) -> np.ndarray:
    """(3, 2) nibabel orientation from the stored voxel axes to the network's."""
    if orientation == "stored":
        return np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)
    return io_orientation(geometry.affine)


def network_spacing(geometry: Geometry, orientation: str) -> tuple[float, float, float]:
    """Voxel size (mm) per network axis of a volume on `geometry` (before resampling)."""
    spacing = [0.0, 0.0, 0.0]
    for axis, (target_axis, _flip) in enumerate(_orientation(geometry, orientation)):
        spacing[int(target_axis)] = geometry.spacing[axis]
    return tuple(spacing)


def network_grid_shape(geometry: Geometry, orientation: str) -> tuple[int, int, int]:
    """Shape per network axis of a volume on `geometry` (before resampling)."""
    shape = [0, 0, 0]
    for axis, (target_axis, _flip) in enumerate(_orientation(geometry, orientation)):
        shape[int(target_axis)] = int(geometry.shape[axis])
    return tuple(shape)


def _resize(array: np.ndarray, shape: Sequence[int], mode: str) -> np.ndarray:
    """(C, *spatial) -> (C, *shape); no-op when the shape already matches (exact round trip)."""
    if tuple(array.shape[1:]) == tuple(shape):
        return np.ascontiguousarray(array)
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return F.interpolate(t, size=tuple(int(s) for s in shape), mode=mode, **kwargs)[0].numpy()
