"""Whole-volume prediction with a trained run, written as NIfTI on the input's own grid.

    run = load_run("runs/cmn", device="cpu")
    probs = predict_case(run.model, [ct, mr], run.preprocessor, geometry, roi_size=(64, 64, 64),
                         activation=run.spec.activation)
    labels = run.spec.decide(probs)                       # (X, Y, Z) class indices 0..K-1
    predict("runs/cmn", "runs/cmn/pred", data_dir="data/phantoms")   # the test split -> NIfTI

The preprocessing is the run's own (`preprocess.json`: normalisation, canonical orientation,
target spacing); the network runs with MONAI's sliding window (roi = the training patch size,
Gaussian blending); probabilities are resampled and reoriented back to the input grid before
the argmax (or, for a model trained on regions, the regions over 0.5 painted in the dataset's
order), so the label map has the input's shape and affine exactly; it holds the dataset's label
values (`spec.json` of the run), or class indices on request. For a dataset folder made
by `prepare-mmwhs` (a `records/<id>.json` per case) the same probabilities also go back onto the
original fixed image's grid (`mmwhs.restore_to_original`): `<out>/original/<id>.nii.gz`.
Shapes: one (X, Y, Z) array per channel (None where missing); network input (1, C, D, H, W);
probabilities (K, X, Y, Z).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from crossmodalnet.config import TrainConfig
from crossmodalnet.data.dataset import Case, ImageRef, check_case, load_case, load_dataset
from crossmodalnet.data.io import Geometry, write_label, write_probabilities
from crossmodalnet.data.mmwhs import load_record, restore_to_original
from crossmodalnet.data.preprocess import Preprocessor
from crossmodalnet.data.spec import DataSpec
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import check_output_folder
from crossmodalnet.models.inference import (
    PRECISIONS,
    autocast_dtype,
    keep_largest_foreground,
    sliding_window_probabilities,
)
from crossmodalnet.models.registry import check_input_size
from crossmodalnet.runs import RunFolder
from crossmodalnet.train.distributed import resolve_device

__all__ = [
    "ORIGINAL_DIR",
    "POSTPROCESS",
    "LoadedRun",
    "load_run",
    "PRECISIONS",
    "autocast_dtype",
    "sliding_window_probabilities",
    "predict_case",
    "predict",
    "predict_from_cli",
]

# Sub-folder of predict's output with the label maps on the original fixed-image grids (prepare-mmwhs folders).
ORIGINAL_DIR = "original"
# predict's label-map postprocessing: the run's own choice, none, or the largest foreground component.
POSTPROCESS = ("auto", "none", "largest-component")
# A case id becomes a file name in --out: nothing that could leave it (separators, "..") or hide.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class LoadedRun:
    """A trained model in eval mode on `device`, with the config and preprocessing it was trained with."""

    model: nn.Module
    config: TrainConfig
    preprocessor: Preprocessor
    device: torch.device
    spec: DataSpec

    @property
    def supports_missing_modality(self) -> bool:
        """True only for a model that can run on one modality *and* was trained with modality dropout."""
        return bool(getattr(self.model, "supports_missing_modality", False)) and self.config.model.modality_dropout > 0


def load_run(run_dir: str | os.PathLike, device: str | torch.device | None = None,
             checkpoint: Literal["best", "last"] = "best") -> LoadedRun:
    """Rebuild the model of run folder `run_dir` from config.yaml and its weights: model.safetensors
    ("best", by validation Dice) or RUN/last/ ("last": the final step's of a finished run)."""
    run = RunFolder(run_dir)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model, config = run.load_model(dev, checkpoint)
    try:  # the sliding window's roi is the training patch
        check_input_size(config.model, config.patch_size)
    except CrossModalNetError as exc:
        raise CrossModalNetError(f"{run.config_path}: patch_size {list(config.patch_size)}: {exc}") from None
    return LoadedRun(model, config, run.read_preprocess(), dev, run.read_spec())


def predict_case(
    model: nn.Module,
    images: Sequence[np.ndarray | None],
    preprocess: Preprocessor,
    geometry: Geometry,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    device: torch.device | None = None,
    precision: str = "auto",
    activation: str = "softmax",
) -> np.ndarray:
    """Probabilities (K, X, Y, Z) float32 of one case on its original grid `geometry`.

    images: one (X, Y, Z) array of raw intensities on `geometry` per channel, None where missing.
    activation: "softmax" over classes, or "sigmoid" per region (`DataSpec.activation`).
    """
    case = preprocess.prepare(images, geometry)
    image = torch.from_numpy(case.stacked())[None]
    present = torch.tensor([case.present], dtype=torch.bool)
    probs = sliding_window_probabilities(model, image, present, roi_size, overlap, sw_batch_size, device, precision,
                                         activation=activation)
    return preprocess.restore(probs[0], case)


def predict(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    split: str = "test",
    images: dict[str, str | os.PathLike] | None = None,
    labels: str = "values",
    probabilities: bool = False,
    device: str | torch.device | None = None,
    overlap: float | None = None,
    precision: str = "auto",
    checkpoint: Literal["best", "last"] = "best",
    postprocess: Literal["auto", "none", "largest-component"] = "auto",
) -> list[Path]:
    """Predict a dataset split (`data_dir`) or one case (`images`: channel name -> file) into `out`.

    out: a folder (one `<case id>.nii.gz` per case, on the case's input grid) or, for one case, a
    `.nii.gz` file name. For a `data_dir` made by `prepare-mmwhs`, each case with a record
    (`records/<id>.json`) is also written on the original fixed image's grid (the raw scan's shape and
    affine; background outside the prepared crop): `out/original/<id>.nii.gz`.
    labels: "values" (the dataset's label values; "codes", the old name, is the same) or "indices"
    (0..K-1), for both. probabilities: also write `<name>_probabilities.nii.gz`, a 4D float map
    (X, Y, Z, K: classes, or regions for a model trained on regions), on the input grid only.
    precision: see `sliding_window_probabilities` (bf16 on a CPU with AVX-512 BF16: docs/benchmarks.md).
    checkpoint: "best" (model.safetensors: the best validation Dice) or "last" (RUN/last/: the final
    step's weights of a finished run; nnU-Net's `-chk checkpoint_final.pth`). When the validation
    cases are the ones being scored, "best" was chosen on them and its score is optimistic.
    postprocess: "auto" follows the run's choice (RUN/postprocess.json, made on its validation cases
    after training: nnU-Net's; a run without one: none), "largest-component" keeps only the largest
    foreground component of every label map (`keep_largest_foreground`), "none" keeps the network's
    output. The choice was made with the best weights; "last" follows the same one. Probability maps
    are never postprocessed.
    Returns the label map paths on the input grids, one per case.

    All or nothing: every input (case ids, files, headers and voxels, records, the run) and --out are
    checked before the first inference; predictions go to a staging folder on --out's file system
    (`OUT.partial-<random>/`, or `OUT/.partial-<random>/` when OUT exists) and are renamed into OUT
    at the end, replaced files set aside until all are in. A failure leaves OUT as it was.
    """
    if labels not in ("values", "codes", "indices"):
        raise CrossModalNetError(f"labels must be 'values' or 'indices', got {labels!r}")
    if checkpoint not in ("best", "last"):
        raise CrossModalNetError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    if postprocess not in POSTPROCESS:
        raise CrossModalNetError(f"postprocess must be one of {', '.join(POSTPROCESS)}, got {postprocess!r}")
    if (data_dir is None) == (not images):
        raise CrossModalNetError("give either a dataset folder or --image files, not both or neither")
    out = Path(out)
    spec = RunFolder(run_dir).read_spec()
    keep_largest = (RunFolder(run_dir).read_postprocess()["largest_component"] if postprocess == "auto"
                    else postprocess == "largest-component")
    post = keep_largest_foreground if keep_largest else (lambda indices: indices)
    records: dict[str, dict] = {}  # case id -> prepare-mmwhs record, for the way back to the original scan
    if data_dir is not None:
        dataset = load_dataset(data_dir)
        if dataset.spec.channels != spec.channels:
            raise CrossModalNetError(f"{Path(data_dir) / 'dataset.json'}: channels {list(dataset.spec.channels)} "
                                     f"are not those run {run_dir} was trained on {list(spec.channels)}")
        cases = dataset[split]
        if not cases:
            raise CrossModalNetError(f"{Path(data_dir) / 'dataset.json'}: lists no {split!r} cases")
        records = {c.id: r for c in cases if (r := load_record(data_dir, c.id)) is not None}
        dest, names = out, [f"{_safe_id(c.id, Path(data_dir) / 'dataset.json')}.nii.gz" for c in cases]
    else:
        by_name = {c.casefold(): i for i, c in enumerate(spec.channels)}
        refs: list[ImageRef | None] = [None] * spec.num_channels
        for name, path in images.items():
            if name.casefold() not in by_name:
                raise CrossModalNetError(f"--image {name}={path}: {name!r} is not a channel of run {run_dir} "
                                         f"({', '.join(spec.channels)})")
            refs[by_name[name.casefold()]] = ImageRef(Path(path))
        ref = next(r.path for r in refs if r is not None)
        case_id = ref.name.split(".")[0]
        cases = [Case(id=case_id, images=tuple(refs))]
        is_file = out.name.endswith((".nii.gz", ".nii"))
        # Into a folder, the input's file name names the output: it must be one that stays in the folder.
        dest, names = (out.parent, [out.name]) if is_file else (out, [f"{_safe_id(case_id, ref)}.nii.gz"])
    # Every input is checked before the first prediction: names, files, headers, voxels, the run.
    outputs = _output_names(cases, names, records, probabilities)
    _check_outputs(dest, out, outputs, cases)
    for case in cases:
        for path in case.files:
            if not Path(path).is_file():
                raise CrossModalNetError(f"{path}: file not found")
        grid = check_case(Case(case.id, case.images))
        if case.id in records:
            _check_record(records[case.id], grid, case.id)
    inputs = [Case(c.id, c.images) for c in cases]  # predict never reads a label
    for case in tqdm(inputs, desc="check inputs", unit="case", disable=None if len(cases) > 1 else True):
        load_case(case, spec, with_label=False)  # the voxels too: a truncated file or NaN stops here, not mid-way
    run = load_run(run_dir, device, checkpoint)
    autocast_dtype(precision, run.device)  # a bad precision fails before the first case
    single = [c for c in cases if not all(c.present)]
    if single and not run.supports_missing_modality:
        missing = [n for n, has in zip(spec.channels, single[0].present, strict=True) if not has]
        raise CrossModalNetError(
            f"case {single[0].id!r} has no {', '.join(missing)}, but run {run_dir} was not trained for a missing "
            f"channel (model {run.config.model.name!r}, modality_dropout={run.config.model.modality_dropout}); "
            f"give every channel ({', '.join(spec.channels)})"
        )
    overlap = run.config.sw_overlap if overlap is None else overlap
    encode = spec.to_values if labels in ("values", "codes") else (lambda indices: indices)
    staging = _make_staging(dest, out)
    try:
        for case, name in zip(tqdm(inputs, desc="predict", unit="case"), names, strict=True):
            data = load_case(case, spec, with_label=False)
            try:
                probs = predict_case(run.model, data["images"], run.preprocessor, data["geometry"],
                                     run.config.patch_size, overlap, run.config.sw_batch_size, run.device, precision,
                                     activation=spec.activation)
            except MemoryError as exc:  # a volume too large for this machine: say which one
                raise CrossModalNetError(f"{case.first_image()}: out of memory predicting case {case.id!r} of "
                                         f"shape {data['geometry'].shape} ({exc})") from None
            write_label(staging / name, encode(post(spec.decide(probs))), data["geometry"])
            if case.id in records:
                original, original_grid = restore_to_original(probs, records[case.id], data["geometry"])
                write_label(staging / ORIGINAL_DIR / name, encode(post(original)), original_grid)
            if probabilities:
                write_probabilities(staging / _probabilities_name(name), probs, data["geometry"])
        _publish(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [dest / name for name in names]


def _safe_id(case_id: str, source: Path) -> str:
    """A case id usable as a file name in OUT: no separators, no `..`, no hidden or empty name."""
    if not _SAFE_ID.fullmatch(case_id):
        raise CrossModalNetError(f"{source}: case id {case_id!r} cannot name an output file (use letters, "
                                 "digits, _ . - and start with a letter or digit)")
    return case_id


def _probabilities_name(name: str) -> str:
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
    return f"{stem}_probabilities.nii.gz"


def _output_names(cases: Sequence[Case], names: Sequence[str], records: dict[str, dict],
                  probabilities: bool) -> list[str]:
    """Every file predict writes, relative to the destination; refuses two inputs that map to one
    output (compared case-blind: macOS and Windows file systems are)."""
    outputs: dict[str, tuple[str, str]] = {}  # case-folded name -> (name, case id)
    for case, name in zip(cases, names, strict=True):
        mine = [name, *([f"{ORIGINAL_DIR}/{name}"] if case.id in records else []),
                *([_probabilities_name(name)] if probabilities else [])]
        for rel in mine:
            if rel.casefold() in outputs:
                raise CrossModalNetError(f"case {case.id!r} and case {outputs[rel.casefold()][1]!r} would both "
                                         f"write {rel}; give the cases distinct ids")
            outputs[rel.casefold()] = (rel, case.id)
    return [rel for rel, _ in outputs.values()]


def _check_outputs(dest: Path, out: Path, outputs: Sequence[str], cases: Sequence[Case]) -> None:
    """Refuse an unusable --out before any work: a file where a folder must be (or the reverse), a path
    below a file, an output that would replace one of the inputs."""
    check_output_folder(dest, "--out")
    if out != dest and out.is_dir():
        raise CrossModalNetError(f"{out}: is a folder; give a .nii.gz file name or a folder without the suffix")
    inputs = {os.path.realpath(p) for c in cases for p in c.files}
    for rel in outputs:
        if os.path.realpath(dest / rel) in inputs:
            raise CrossModalNetError(f"{dest / rel}: is one of the inputs; predicting would overwrite it, "
                                     "choose another --out")


def _make_staging(dest: Path, out: Path) -> Path:
    """A new staging folder on the destination's file system (publishing is renames only): inside an
    existing destination (only it need be writable), else beside it (publishing is one rename).
    Creating it is also the check that --out can be written at all, before any inference."""
    where = Path(os.path.abspath(dest))
    tag = f"partial-{secrets.token_hex(4)}"
    staging = where / f".{tag}" if where.is_dir() else where.parent / f"{where.name}.{tag}"
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise CrossModalNetError(f"{out}: cannot write there ({exc.strerror}); choose another --out") from None
    return staging


def _publish(staging: Path, dest: Path) -> None:
    """Move every file of `staging` to the same place under `dest`: all of them, or none.

    A new destination is one rename. Into an existing folder each file is renamed in, a file it
    replaces first set aside in the staging folder; a failure renames everything back.
    """
    if not dest.exists():
        os.rename(staging, dest)
        return
    files = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
    aside, made, done = staging / ".replaced", [], []
    try:
        for rel in files:
            target = dest / rel
            if not target.parent.is_dir():
                target.parent.mkdir(parents=True)
                made.append(target.parent)
            if target.exists():
                (aside / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(target, aside / rel)
            done.append(rel)
            os.replace(staging / rel, target)
    except BaseException:
        for rel in reversed(done):
            if (dest / rel).exists() and not (staging / rel).exists():
                os.replace(dest / rel, staging / rel)
            if (aside / rel).exists():
                os.replace(aside / rel, dest / rel)
        for folder in reversed(made):
            folder.rmdir()
        raise


def _check_record(record: dict, grid: Geometry, case_id: str) -> None:
    """Raise unless `record` (prepare-mmwhs) names both grids and the case's files lie on its prepared grid."""
    def as_grid(d: dict) -> Geometry:
        return Geometry(np.asarray(d["affine"], dtype=np.float64).reshape(4, 4), tuple(int(s) for s in d["shape"]))

    where = f"case {case_id!r}: records/{case_id}.json"
    try:
        prepared, _ = as_grid(record["prepared"]), as_grid(record["original"])
    except (KeyError, TypeError, ValueError):
        raise CrossModalNetError(f"{where} has no prepared/original grid; run prepare-mmwhs again") from None
    if not prepared.same_grid(grid):
        raise CrossModalNetError(f"{where}: the case's images are not on the record's prepared grid "
                                 f"{prepared.shape}; were they changed after prepare-mmwhs?")


def predict_from_cli(args: argparse.Namespace) -> None:
    """`crossmodalnet predict RUN [INPUT] --out OUT [--image NAME=F ...] [--labels] [--probabilities]`.

    For a prepare-mmwhs folder the label maps are written twice: `OUT/<id>.nii.gz` on the prepared
    grid (the one `evaluate` compares with labelsTs/) and `OUT/original/<id>.nii.gz` on the original
    fixed image's grid (open it over the raw scan).
    """
    images = dict(args.image or [])
    for name in ("ct", "mr"):  # the MM-WHS shorthands --ct F, --mr F
        if getattr(args, name, None) is not None:
            images[name.upper()] = getattr(args, name)
    written = predict(args.run, args.out, data_dir=args.input, split=args.split, images=images or None,
                      labels=args.labels, probabilities=args.probabilities, device=args.device,
                      precision=args.precision, checkpoint=args.checkpoint, postprocess=args.postprocess)
    where = written[0] if len(written) == 1 else written[0].parent
    print(f"wrote {len(written)} label map(s) ({args.labels}) to {where}")
    original = [p.parent / ORIGINAL_DIR / p.name for p in written if args.input is not None
                and load_record(args.input, p.name[: -len(".nii.gz")]) is not None]
    if original:
        print(f"wrote {len(original)} on the original fixed-image grid(s) to {original[0].parent}")
