"""Build a dataset folder from image files as they lie on disk (`crossmodalnet dataset`).

MyoPS ships one folder of files named by case and sequence:

    raw/Case3001_C0.nii.gz  raw/Case3001_LGE.nii.gz  raw/Case3001_T2.nii.gz  raw/Case3001_gd.nii.gz
    raw/Case3002_C0.nii.gz  ...

    crossmodalnet dataset data/myops \\
        --channel C0='raw/Case*_C0.nii.gz' --channel LGE='raw/Case*_LGE.nii.gz' \\
        --channel T2='raw/Case*_T2.nii.gz' --label 'raw/Case*_gd.nii.gz' \\
        --labels MYO=200 LV=500 RV=600 edema=1220 scar=2221 \\
        --region myocardium=MYO,edema,scar --region edema+scar=1220,2221 --region scar=2221

or, from Python, `build_dataset("data/myops", [("C0", "raw/Case*_C0.nii.gz"), ...],
"raw/Case*_gd.nii.gz", [("MYO", 200), ...], regions=[("scar", [2221]), ...])`. It writes

    data/myops/dataset.json                     channels, labels, regions, the cases of each split
    data/myops/images/C0/Case3001.nii.gz        a symlink to raw/Case3001_C0.nii.gz (a copy with copy=True)
    data/myops/labels/Case3001.nii.gz           a symlink to raw/Case3001_gd.nii.gz

Case ids: the part of the file names a case's files share (`naming.case_ids`): the globs above
give `Case3001`.

Cases are the union of the ids of the channels. A case lacking a channel gets null for it (listed
in the summary); a label file whose id no image has is an error. Labelled cases form the
`training` split (`test_fraction` of them, drawn by `seed`, go to `test`); cases without a label
go to `test`, unlabelled.

Everything is checked before anything is written: the ids are valid file names and unique, every
case's files share one grid (headers only; every case that does not is named), every value found
in a label file is declared and every declared value is found in some label file. `out` must be
new or empty. Paths in dataset.json are relative (`images/C0/Case3001.nii.gz`); the symlinks'
source folders are recorded as `linked_from`, which `load_dataset` trusts.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crossmodalnet.data.dataset import SPLITS, check_case_id, write_dataset_json
from crossmodalnet.data.io import Geometry, read_geometry, read_label_values
from crossmodalnet.data.naming import case_ids, nifti_ending
from crossmodalnet.data.spec import DataSpec, LabelClass, Region, default_region_order
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path, check_output_folder

__all__ = ["BuiltDataset", "build_dataset", "build_from_cli", "case_ids"]

LABEL = "label"  # how the label's files are named in messages


@dataclass(frozen=True)
class BuiltDataset:
    """What `build_dataset` wrote. Path-like (`load_dataset(built)` works); `str()` is the summary.

    splits: cases per split. missing: channel -> ids of the cases that lack it. voxels: label
    value -> voxels summed over the label files (0 is background).
    """

    path: Path
    name: str
    channels: tuple[str, ...]
    splits: dict[str, int]
    missing: dict[str, list[str]] = field(default_factory=dict)
    voxels: dict[int, int] = field(default_factory=dict)
    label_names: dict[int, str] = field(default_factory=dict)
    copied: bool = False

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        total = sum(self.splits.values())
        per_split = ", ".join(f"{s} {n}" for s, n in self.splits.items() if n)
        lines = [f"{self.path / 'dataset.json'}: {total} cases ({per_split}), files "
                 f"{'copied' if self.copied else 'linked'}"]
        channels = []
        for c in self.channels:
            lacking = self.missing.get(c, [])
            shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
            channels.append(f"{c} ({total - len(lacking)} cases" + (f"; missing in {shown})" if lacking else ")"))
        lines.append("channels: " + ", ".join(channels))
        if self.voxels:
            lines.append("labels (voxels): " + ", ".join(
                f"{self.label_names.get(v, 'background')}={v} ({n})" for v, n in sorted(self.voxels.items())))
        return "\n".join(lines)


def _spec(channels: list[str], labels: Sequence[tuple[str, int]],
          regions: Sequence[tuple[str, Sequence[int | str]]], train_regions: bool,
          registered: bool = True) -> DataSpec:
    """The dataset's description from the arguments, with one-line errors naming the argument."""
    for c in channels:
        if c.casefold() == LABEL:
            raise CrossModalNetError(f"--channel {c}: {LABEL!r} names the label files; choose another channel name")
        if check_case_id(c):  # the channel names a folder
            raise CrossModalNetError(f"--channel {c!r}: a channel name must be letters, digits, '.', '_' or "
                                     "'-', starting with a letter or digit (it names a folder)")
    if not labels:
        raise CrossModalNetError("--labels: declare the label values, e.g. --labels MYO=200 LV=500")
    classes, names = [], set()
    for name, value in labels:
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise CrossModalNetError(f"--labels {name}={value}: the value must be an integer") from None
        if name in names:
            raise CrossModalNetError(f"--labels: label {name!r} is declared twice")
        names.add(name)
        classes.append(LabelClass(str(name), value))
    by_name = {c.name: c.value for c in classes}
    built = []
    for name, values in regions:
        values = values.split(",") if isinstance(values, str) else values  # "1220,2221", as typed
        resolved = []
        for v in values:
            if isinstance(v, str) and v.strip() in by_name:
                resolved.append(by_name[v.strip()])
            elif isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit()):
                resolved.append(int(v))
            else:
                raise CrossModalNetError(f"--region {name}: names unknown label {v!r} "
                                         f"(labels: {', '.join(f'{n}={x}' for n, x in by_name.items())})")
        built.append(Region(str(name), tuple(sorted(set(resolved)))))
    try:
        return DataSpec(channels=tuple(channels), classes=tuple(classes), regions=tuple(built),
                        train_regions=train_regions,
                        region_order=default_region_order(built) if train_regions else (), registered=registered)
    except CrossModalNetError as exc:
        raise CrossModalNetError(str(exc).replace("dataset description:", "--channel/--labels/--region:")) from None


def _grid_problem(case_id: str, files: dict[str, Path], channels: list[str]) -> str | None:
    """How the case's files disagree on their grid (headers only), or None."""
    geoms: dict[str, Geometry] = {name: read_geometry(files[name]) for name in [*channels, LABEL] if name in files}
    (ref_name, ref), *others = geoms.items()
    for name, geom in others:
        if geom.shape != ref.shape:
            return f"{case_id} ({name} shape {geom.shape} vs {ref_name} {ref.shape})"
        if not geom.same_grid(ref):
            diff = float(np.abs(geom.affine - ref.affine).max())
            return f"{case_id} ({name} affine differs from {ref_name} by up to {diff:.3g} mm)"
    return None


def _label_values(cases: dict[str, dict[str, Path]], spec: DataSpec) -> dict[int, int]:
    """Voxels per value over all label files; refuses undeclared values and declared values found nowhere."""
    declared = {0, *spec.values}
    voxels: dict[int, int] = {}
    bad: list[tuple[Path, list[int]]] = []
    for files in cases.values():
        if LABEL not in files:
            continue
        data, _ = read_label_values(files[LABEL])
        values, counts = np.unique(data, return_counts=True)
        for v, n in zip(values.tolist(), counts.tolist(), strict=True):
            voxels[v] = voxels.get(v, 0) + n
        undeclared = sorted(set(values.tolist()) - declared)
        if undeclared:
            bad.append((files[LABEL], undeclared))
    table = ", ".join(f"{c.name}={c.value}" for c in spec.classes)
    if bad:
        path, values = bad[0]
        more = f"; {len(bad) - 1} more label files hold undeclared values" if len(bad) > 1 else ""
        raise CrossModalNetError(f"{path}: label value{'s' if len(values) > 1 else ''} "
                                 f"{', '.join(map(str, values[:8]))} not declared (--labels {table}){more}")
    absent = [c for c in spec.classes if c.value not in voxels]
    if absent and voxels:
        raise CrossModalNetError(f"--labels: {', '.join(f'{c.name}={c.value}' for c in absent)} found in no label "
                                 f"file ({sum(LABEL in f for f in cases.values())} read); check the value or drop it")
    return voxels


def _check_out(out: Path) -> None:
    check_output_folder(out, "output folder")
    if out.is_dir() and any(out.iterdir()):
        raise CrossModalNetError(f"{out}: the output folder is not empty; choose a new or empty folder")


def _linked_from(globs: list[str], files: list[Path]) -> list[str]:
    """The resolved folders the links point into: each glob's fixed folder, plus the folder of any
    file that resolves (through symlinks) outside all of them; none inside another."""
    roots = set()
    for text in globs:
        fixed = re.split(r"[*?\[]", os.path.abspath(os.path.expanduser(text)), maxsplit=1)[0]
        roots.add(Path(os.path.dirname(fixed)).resolve())
    for f in files:
        real = f.resolve()
        if not any(r in real.parents for r in roots):
            roots.add(real.parent)
    kept = sorted(r for r in roots if not any(o in r.parents for o in roots))
    return [str(r) for r in kept]


def build_dataset(out: str | os.PathLike, channels: Sequence[tuple[str, str]], label_glob: str | None,
                  labels: Sequence[tuple[str, int]], regions: Sequence[tuple[str, Sequence[int | str]]] = (),
                  train_regions: bool = False, copy: bool = False, test_fraction: float = 0.0, seed: int = 0,
                  name: str | None = None, registered: bool = True) -> BuiltDataset:
    """Make the dataset folder `out` from files found by globs; see the module docstring (MyoPS example).

    channels: (name, glob) in channel order, e.g. [("C0", "raw/Case*_C0.nii.gz"), ("LGE", ...)];
    globs are relative to the current folder or absolute, `**` spans folders. label_glob: the label
    files' glob, or None (every case unlabelled, in `test`). labels: (name, value in the files), e.g.
    [("MYO", 200), ("scar", 2221)]. regions: (name, label values or names), e.g. [("scar", [2221])];
    train_regions: train on the regions (painted back largest-exclusive-value first, see
    `spec.default_region_order`). copy: copy the files instead of linking them. test_fraction:
    share of the labelled cases held out as a labelled `test` split, drawn by `seed`. name: the
    dataset's name (default: the folder's). registered: the channels are registered voxel to voxel
    (sequences of one session, the usual case of files on one grid); False for channels that may be a
    few voxels apart (CT and MR of separate scans). Recorded in dataset.json; models fuse accordingly.

    Returns a `BuiltDataset`: path-like, and its `str()` is a summary (cases per split, channels
    and the cases missing them, label voxels). Raises `CrossModalNetError` (one line) before writing
    anything when a check fails.
    """
    out = Path(out)
    _check_out(out)
    if not channels:
        raise CrossModalNetError("--channel: give at least one channel as NAME=GLOB")
    names = [str(c) for c, _ in channels]
    spec = _spec(names, labels, regions, train_regions, registered)
    if not 0.0 <= test_fraction < 1.0:
        raise CrossModalNetError(f"test fraction must lie in [0, 1), got {test_fraction}")
    globs = list(channels) + ([(LABEL, label_glob)] if label_glob is not None else [])
    cases = case_ids(globs)
    orphans = [case_id for case_id, files in cases.items() if set(files) == {LABEL}]
    if orphans:
        more = f" (and {len(orphans) - 1} more label files)" if len(orphans) > 1 else ""
        raise CrossModalNetError(f"{cases[orphans[0]][LABEL]}: a label file without images: no channel glob "
                                 f"matches a file of case {orphans[0]!r}{more}")
    bad = [p for case_id, files in cases.items() if (p := _grid_problem(case_id, files, names))]
    if bad:
        raise CrossModalNetError(f"{len(bad)} case{'s do' if len(bad) > 1 else ' does'} not share a grid: "
                                 f"{', '.join(bad)}")
    voxels = _label_values(cases, spec) if label_glob is not None else {}

    labelled = [i for i, f in cases.items() if LABEL in f]
    held_out: set[str] = set()
    if test_fraction and labelled:
        rng = np.random.default_rng(seed)
        n_test = round(test_fraction * len(labelled))
        held_out = {labelled[i] for i in rng.permutation(len(labelled))[:n_test]}
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    missing: dict[str, list[str]] = {}
    plan: list[tuple[Path, Path]] = []  # (source, destination)
    for case_id, files in cases.items():
        entry: dict = {"id": case_id, "images": []}
        for c in names:
            if c not in files:
                entry["images"].append(None)
                missing.setdefault(c, []).append(case_id)
                continue
            rel = Path("images", c, case_id + nifti_ending(str(files[c])))
            entry["images"].append(rel.as_posix())
            plan.append((files[c], out / rel))
        if LABEL in files:
            rel = Path("labels", case_id + nifti_ending(str(files[LABEL])))
            entry["label"] = rel.as_posix()
            plan.append((files[LABEL], out / rel))
        split = "training" if LABEL in files and case_id not in held_out else "test"
        splits[split].append(entry)

    name = name or out.resolve().name
    extra: dict = {"built_with": {"channels": dict(channels), **({"label": label_glob} if label_glob else {})}}
    if not copy:
        extra["linked_from"] = _linked_from([g for _, g in globs], [src for src, _ in plan])
    created = not out.exists()
    try:
        for src, dst in plan:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if copy:
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)
            else:
                os.symlink(src.resolve(), dst)
        write_dataset_json(out, splits, name, spec, **extra)
    except BaseException:
        # Leave `out` as it was found: new folders removed, an empty one emptied.
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in ("images", "labels", "dataset.json"):
                target = out / child
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        raise
    return BuiltDataset(path=out, name=name, channels=tuple(names), splits={s: len(v) for s, v in splits.items()},
                        missing=missing, voxels=voxels, label_names={c.value: c.name for c in spec.classes},
                        copied=copy)


def build_from_cli(args) -> BuiltDataset:
    """`crossmodalnet dataset OUT --channel NAME=GLOB ... --label GLOB --labels NAME=VALUE ...
    [--region NAME=V1,V2 ...] [--train-regions] [--test-fraction F] [--seed S] [--copy] [--name N]`:
    parse the values, build, print
    the summary."""
    labels = []
    for name, value in args.labels:
        try:
            labels.append((name, int(value)))
        except ValueError:
            raise CrossModalNetError(f"--labels {name}={value}: the value must be an integer") from None
    regions = [(name, [v.strip() for v in value.split(",") if v.strip()]) for name, value in args.region or []]
    built = build_dataset(args.out, channels=list(args.channel), label_glob=args.label, labels=labels,
                          regions=regions, train_regions=args.train_regions, copy=args.copy, name=args.name,
                          test_fraction=args.test_fraction, seed=args.seed,
                          registered=not getattr(args, "unregistered", False))
    print(built)
    return built

