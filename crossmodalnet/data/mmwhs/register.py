"""Registration of one modality onto the other with ANTsPy (affine, then SyN), and warping with the result.

    reg = register(fixed, fixed_geom, moving, moving_geom, RegistrationConfig("image"), workdir)
    warped = warp(moving, moving_geom, reg.forward, target_geom, "linear")       # moving -> target grid
    warped_label = warp(moving_label, moving_geom, reg.forward, target_geom, "label")

Arrays are (X, Y, Z) on an `io.Geometry` (RAS voxel-to-world affine, as nibabel gives it). ANTs
works in LPS physical space; `to_ants` flips the first two world axes on the way in, so that the
transform files written here are the ones `antsApplyTransforms` would use on the original NIfTI
files. Transforms map points of the fixed world to the moving world (ANTs' convention), so warping a
moving image onto *any* grid of the fixed world (the full fixed grid, a crop of it, a resampled
crop) is one interpolation from the original moving voxels.

Methods:
- "image": affine then SyN, both driven by Mattes mutual information between the images (usable
  when there are no labels, e.g. at inference time);
- "label": the same stages driven by the two label maps (as the public MM-WHS code does);
- "none": no transform; the moving image is only resampled through world coordinates.

Both images are first brought to a coarse isotropic grid (`spacing_mm`, 2 mm by default: the
heart's structures are 5-50 mm, and SyN's cost grows with the voxel count, which a 0.4 mm CT
would make ~100 times larger); the transforms live in world coordinates, so they apply to the
full-resolution images unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crossmodalnet.data.io import Geometry
from crossmodalnet.data.labels import NUM_CLASSES
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path

__all__ = ["METHODS", "RegistrationConfig", "Registration", "set_threads", "to_ants", "register", "warp"]

METHODS: tuple[str, ...] = ("image", "label", "none")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


@dataclass(frozen=True)
class RegistrationConfig:
    """How to register. Iterations are per resolution level, coarsest first.

    The affine levels shrink the registration grid by `affine_shrink` (so 4 -> 8 mm at 2 mm);
    SyN uses ANTs' own shrink factors 2^(levels-1) ... 1 with matching smoothing.
    """

    method: str = "image"
    spacing_mm: float = 2.0
    affine_iterations: tuple[int, ...] = (200, 100, 50)
    affine_shrink: tuple[int, ...] = (4, 2, 1)
    affine_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    syn_iterations: tuple[int, ...] = (60, 40, 20)
    mi_bins: int = 32
    # SyN step and regularisation (ANTs' defaults; flow_sigma smooths each update, in voxels).
    grad_step: float = 0.2
    flow_sigma: float = 3.0
    total_sigma: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CrossModalNetError(f"registration method must be one of {list(METHODS)}, got {self.method!r}")
        if not self.spacing_mm > 0:
            raise CrossModalNetError(f"registration spacing must be > 0 mm, got {self.spacing_mm}")
        if not (len(self.affine_iterations) == len(self.affine_shrink) == len(self.affine_sigmas)):
            raise CrossModalNetError("affine_iterations, affine_shrink and affine_sigmas need one entry per level")
        if not self.syn_iterations or any(int(i) < 0 for i in (*self.syn_iterations, *self.affine_iterations)):
            raise CrossModalNetError(f"iterations must be non-negative integers, got {self.syn_iterations}")

    def describe(self) -> dict:
        """JSON-ready settings (recorded per case, compared on resumption)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class Registration:
    """The result of `register`: ANTs transform files and their inversion flags.

    forward: fixed-world points -> moving-world points, the list `warp` (antsApplyTransforms)
    takes to bring a moving image onto a fixed-world grid. inverse: the other way round.
    """

    forward: list[str] = field(default_factory=list)
    forward_invert: list[bool] = field(default_factory=list)
    inverse: list[str] = field(default_factory=list)
    inverse_invert: list[bool] = field(default_factory=list)
    seconds: float = 0.0


def set_threads(threads: int) -> None:
    """Limit ITK (ANTs) to `threads` threads in this process; call before the first registration.

    ITK reads the variable when its thread pool starts; with several worker processes each gets
    its share of the cores instead of all of them fighting over every core.
    """
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(threads)))


def to_ants(array: np.ndarray, geometry: Geometry):
    """(X, Y, Z) array on `geometry` -> an ants.ANTsImage (float32) at the same place in the world."""
    import ants  # heavy: ANTsPy (ITK) loads only when registering

    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    direction = _RAS_TO_LPS @ (geometry.affine[:3, :3] / spacing)
    origin = _RAS_TO_LPS @ geometry.affine[:3, 3]
    return ants.from_numpy(np.ascontiguousarray(array, dtype=np.float32), origin=tuple(origin.tolist()),
                           spacing=tuple(spacing.tolist()), direction=direction)


def _coarse_grid(geometry: Geometry, spacing_mm: float) -> Geometry:
    """The grid of `geometry`'s field of view with voxels of `spacing_mm` (never finer than its own)."""
    old = np.asarray(geometry.spacing)
    new = np.maximum(old, spacing_mm)
    shape = tuple(max(1, int(round(n * o / s))) for n, o, s in zip(geometry.shape, old, new, strict=True))
    # Keep the field of view's centre where it was.
    direction = geometry.affine[:3, :3] / old
    shift_mm = (np.asarray(geometry.shape) - 1) / 2 * old - (np.asarray(shape) - 1) / 2 * new
    first = geometry.affine[:3, 3] + direction @ shift_mm
    affine = np.eye(4)
    affine[:3, :3] = direction * new
    affine[:3, 3] = first
    return Geometry(affine=affine, shape=shape)


def _intensity_image(array: np.ndarray, geometry: Geometry, spacing_mm: float):
    """An image made for the MI metric: smoothed to the coarse grid, robustly rescaled to [0, 1]."""
    import ants  # heavy: ANTsPy (ITK) loads only when registering

    image = to_ants(array, geometry)
    coarse = _coarse_grid(geometry, spacing_mm)
    sigma = np.sqrt(np.maximum(np.asarray(coarse.spacing) ** 2 - np.asarray(geometry.spacing) ** 2, 0.0)) / 2.355
    if sigma.max() > 0:
        # Anti-aliasing before downsampling: a 0.4 mm CT sampled at 2 mm would alias its noise.
        image = ants.smooth_image(image, tuple(sigma.tolist()), sigma_in_physical_coordinates=True, FWHM=False)
    image = ants.resample_image_to_target(image, to_ants(np.zeros(coarse.shape, np.float32), coarse), "linear")
    values = image.numpy()
    # Clipping to robust percentiles removes metal, bone and air extremes that would squeeze the
    # soft tissue into a few histogram bins of the MI metric.
    lo, hi = np.percentile(values, (1.0, 99.5))
    values = (np.clip(values, lo, hi) - lo) / max(float(hi - lo), 1e-6)
    return image.new_image_like(values.astype(np.float32))


def _label_image(labels: np.ndarray, geometry: Geometry, spacing_mm: float):
    """A label map as a registration image: class index / 7 on the coarse grid (genericLabel)."""
    import ants  # heavy: ANTsPy (ITK) loads only when registering

    coarse = _coarse_grid(geometry, spacing_mm)
    image = ants.resample_image_to_target(to_ants(labels.astype(np.float32), geometry),
                                          to_ants(np.zeros(coarse.shape, np.float32), coarse), "genericLabel")
    # Distinct, evenly spread values: each class falls in its own bins of the MI histogram.
    return image.new_image_like((image.numpy() / (NUM_CLASSES - 1)).astype(np.float32))


def _keep(files: Sequence[str], workdir: Path, prefix: str) -> list[str]:
    """Copy ANTs' temporary `syn_*` transform files into `workdir` (atomically) as `<prefix>*`."""
    kept = []
    for src in files:
        dst = workdir / f"{prefix}{Path(src).name.removeprefix('syn_')}"
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        kept.append(str(dst))
    return kept


def register(
    fixed: np.ndarray,
    fixed_geometry: Geometry,
    moving: np.ndarray,
    moving_geometry: Geometry,
    config: RegistrationConfig,
    workdir: str | os.PathLike,
    prefix: str = "",
    fixed_label: np.ndarray | None = None,
    moving_label: np.ndarray | None = None,
) -> Registration:
    """Register `moving` onto `fixed`; transform files are written into `workdir` as `<prefix>...`.

    fixed, moving: (X, Y, Z) intensities on their geometries; fixed_label, moving_label: (X, Y, Z)
    class indices on the same geometries (needed by method "label"). Returns the transforms.
    """
    if config.method == "none":
        return Registration()
    import ants  # heavy: ANTsPy (ITK) loads only when registering

    start = time.perf_counter()
    if config.method == "label":
        if fixed_label is None or moving_label is None:
            raise CrossModalNetError("registration method 'label' needs the label maps of both images")
        fixed_r = _label_image(fixed_label, fixed_geometry, config.spacing_mm)
        moving_r = _label_image(moving_label, moving_geometry, config.spacing_mm)
    else:
        fixed_r = _intensity_image(fixed, fixed_geometry, config.spacing_mm)
        moving_r = _intensity_image(moving, moving_geometry, config.spacing_mm)
    # ANTsPy passes its random seed (for the metric's point sampling) from this module attribute.
    ants.config._random_seed = int(config.seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cmn_reg_") as tmp:
        # Two calls rather than ANTs' "SyN" preset: the preset hard-codes 2100x1200x1200 affine
        # iterations at shrink 4x2x2x1, minutes per case on 2 cores for no better result here.
        # The initial transform (none given) aligns the centres of mass of the two images.
        affine = ants.registration(
            fixed_r, moving_r, "Affine", outprefix=f"{tmp}/aff_", aff_metric="mattes", aff_sampling=config.mi_bins,
            aff_iterations=tuple(config.affine_iterations), aff_shrink_factors=tuple(config.affine_shrink),
            aff_smoothing_sigmas=tuple(config.affine_sigmas), aff_random_sampling_rate=0.25,
        )
        syn = ants.registration(
            fixed_r, moving_r, "SyNOnly", outprefix=f"{tmp}/syn_", initial_transform=affine["fwdtransforms"],
            syn_metric="mattes", syn_sampling=config.mi_bins, reg_iterations=tuple(config.syn_iterations),
            grad_step=config.grad_step, flow_sigma=config.flow_sigma, total_sigma=config.total_sigma,
        )
        seconds = time.perf_counter() - start
        # With -r and collapsed outputs, SyNOnly writes the initial affine again (0GenericAffine.mat)
        # beside its deformation (1Warp, 1InverseWarp): the pair is the whole transform.
        fwd_files = [str(f) for f in syn["fwdtransforms"]]
        names = [Path(f).name for f in (*fwd_files, *syn["invtransforms"])]
        if len(fwd_files) != 2 or not fwd_files[0].endswith("Warp.nii.gz") or not fwd_files[1].endswith(".mat"):
            raise CrossModalNetError(f"ANTs returned unexpected transforms {names}")
        inv_warp = [str(f) for f in syn["invtransforms"] if str(f).endswith("InverseWarp.nii.gz")]
        if len(inv_warp) != 1:
            raise CrossModalNetError(f"ANTs returned unexpected transforms {names}")
        fwd, aff, inv = _keep([fwd_files[0], fwd_files[1], inv_warp[0]], workdir, prefix)
    return Registration(forward=[fwd, aff], forward_invert=[False, False], inverse=[aff, inv],
                        inverse_invert=[True, False], seconds=seconds)


def warp(
    array: np.ndarray,
    geometry: Geometry,
    transforms: Sequence[str],
    target: Geometry,
    interpolation: str = "linear",
    invert: Sequence[bool] | None = None,
    fill: float = 0.0,
) -> np.ndarray:
    """Resample `array` (X, Y, Z) on `geometry` onto the `target` grid through `transforms`.

    interpolation: "linear" (images) or "label" (ANTs genericLabel: each class interpolated
    linearly, the largest wins; smoother than nearest neighbour and never invents a class).
    transforms: ANTs files mapping target-world points to `geometry`-world points (empty: identity,
    i.e. world coordinates). fill: value outside `geometry`'s field of view. Returns (target.shape).
    """
    import ants  # heavy: ANTsPy (ITK) loads only when registering

    if interpolation not in ("linear", "label"):
        raise ValueError(f"interpolation must be 'linear' or 'label', got {interpolation!r}")
    transforms = [str(t) for t in transforms]
    invert = [False] * len(transforms) if invert is None else [bool(i) for i in invert]
    for t in transforms:
        if not Path(t).is_file():
            raise CrossModalNetError(f"{t}: transform file not found")
    out = ants.apply_transforms(
        to_ants(np.zeros(target.shape, np.float32), target), to_ants(array, geometry), transforms,
        interpolator="genericLabel" if interpolation == "label" else "linear",
        # Passed explicitly: ANTsPy otherwise guesses inversion flags from the file names.
        whichtoinvert=invert, defaultvalue=float(fill),
    )
    result = out.numpy()
    return np.rint(result).astype(np.uint8) if interpolation == "label" else result.astype(np.float32)
