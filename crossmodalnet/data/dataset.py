"""The dataset: a folder with `dataset.json` and NIfTI files, in any of the layouts researchers hold.

- **Listed** (ours, MSD's): `dataset.json` lists the cases of each split,

      {"name": ..., "channel_names": {"0": "C0", "1": "LGE", "2": "T2"},
       "labels": {"background": 0, "MYO": 200, "LV": 500, ...}, "regions": {"scar": [2221]},
       "training": [{"id": "Case3001", "images": ["C0/Case3001.nii.gz", "LGE/...", "T2/..."],
                     "label": "gd/Case3001.nii.gz"}], "validation": [...], "test": [...]}

  An entry gives its channels as `images` (one path per channel in channel order, null where the
  case lacks one), as keys named by the channels (`"ct": ..., "mr": ...`, any letter case), or as
  MSD's one 4D `image` (X, Y, Z, channels), read volume by volume without copying.
- **nnU-Net v2 raw** (`DatasetXXX_Name/`): no lists; `imagesTr/{case}_{XXXX}{file_ending}` (XXXX the
  channel index), `labelsTr/{case}{file_ending}`, `imagesTs/` as the test split.

Channels, labels and regions are the dataset's (`spec.DataSpec.from_dict`). Paths are relative to
the folder and may not leave it (symlinks followed), except into the folders a
`crossmodalnet dataset` build linked from (`linked_from`). `load_dataset` checks every listed file
exists, and `check_case` that a case's channels and label share one grid, before any work starts.
A case may lack channels (not all of them); training fills them with the model's placeholders.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from crossmodalnet.data.io import Geometry, check_same_grid, read_geometry, read_image, read_label
from crossmodalnet.data.spec import DataSpec
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path

__all__ = ["ImageRef", "Case", "Dataset", "SPLITS", "CASE_ID_PATTERN", "check_case_id", "load_dataset",
           "write_dataset_json", "check_case", "load_case", "read_spec"]

SPLITS: tuple[str, ...] = ("training", "validation", "test")


@dataclass(frozen=True)
class ImageRef:
    """One channel of a case: a 3D file, or volume `volume` of a 4D file (MSD)."""

    path: Path
    volume: int | None = None

    def __str__(self) -> str:
        return str(self.path) if self.volume is None else f"{self.path}[{self.volume}]"


@dataclass(frozen=True)
class Case:
    """One case: absolute paths, one entry per channel of the dataset (None where the case lacks
    that channel); `label` may be None (unlabeled, e.g. a target domain or a test case)."""

    id: str
    images: tuple[ImageRef | None, ...]
    label: Path | None = None

    @property
    def present(self) -> tuple[bool, ...]:
        return tuple(ref is not None for ref in self.images)

    @property
    def files(self) -> list[Path]:
        """Every file the case reads (images and label)."""
        out = [ref.path for ref in self.images if ref is not None]
        return out + ([self.label] if self.label is not None else [])

    def first_image(self) -> ImageRef:
        return next(ref for ref in self.images if ref is not None)


@dataclass(frozen=True)
class Dataset:
    root: Path
    name: str
    spec: DataSpec
    splits: dict[str, list[Case]]
    layout: str = "listed"  # "listed" or "nnunet"

    def __getitem__(self, split: str) -> list[Case]:
        return self.splits.get(split, [])


# A case id becomes file names (predictions, records/<id>.json): one safe path component, no
# separators, not "." or "..", not hidden, short enough for every file system.
CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A dataset.json of 10 000 cases is about 2 MB; a larger file is not a dataset description.
MAX_JSON_BYTES = 64 * 2**20
NIFTI_ENDINGS = (".nii.gz", ".nii")


def check_case_id(case_id: object) -> str | None:
    """None when `case_id` is a safe case id (it becomes a file name), else what is wrong with it."""
    if not isinstance(case_id, str):
        return f"must be a string, got {type(case_id).__name__}"
    if not CASE_ID_PATTERN.fullmatch(case_id):
        return ("must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
                "(it becomes a file name)")
    return None


def _resolve(root: Path, rel: object, json_path: Path, where: str, must_exist: bool,
             trusted: tuple[Path, ...] = ()) -> Path:
    """`root/rel` made absolute, refused unless `rel` is a relative path whose target (symlinks
    followed) lies inside the dataset folder, or inside one of `trusted` (the folders a
    `crossmodalnet dataset` build linked from)."""
    if isinstance(rel, str) and rel.startswith("./"):  # MSD writes "./imagesTr/x.nii.gz"
        rel = rel[2:]
    if not isinstance(rel, str) or not rel:
        raise CrossModalNetError(f"{json_path}: {where} must be a non-empty relative path, got {rel!r}")
    if "\0" in rel:
        raise CrossModalNetError(f"{json_path}: {where} path {rel!r} holds a NUL character")
    if Path(rel).is_absolute():
        raise CrossModalNetError(f"{json_path}: {where} absolute path {rel!r} leaves the dataset folder "
                                 "(paths are relative to it)")
    try:
        path = (root / rel).resolve()
        inside = any(base in path.parents for base in (root.resolve(), *trusted))
        exists = not must_exist or path.is_file()
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
        raise CrossModalNetError(f"{json_path}: {where} {rel!r} cannot be resolved ({exc.strerror or exc})") from None
    if not inside:
        how = "is a symlink to a file outside" if (root / rel).is_symlink() else "leaves"
        raise CrossModalNetError(f"{json_path}: {where} path {rel!r} {how} the dataset folder")
    if not exists:
        raise CrossModalNetError(f"{json_path}: listed file {rel!r} ({where}) does not exist")
    return path


def _read_json(json_path: Path) -> dict:
    """dataset.json's top-level object, with a one-line error for every way it can be unreadable."""
    root = json_path.parent
    if not json_path.is_file():
        raise CrossModalNetError(f"{json_path}: not found (is {root} a crossmodalnet dataset folder?)")
    try:
        if json_path.stat().st_size > MAX_JSON_BYTES:
            raise CrossModalNetError(f"{json_path}: larger than {MAX_JSON_BYTES // 2**20} MiB; "
                                     "not a dataset description")
        raw = json_path.read_bytes()
    except OSError as exc:
        raise CrossModalNetError(f"{json_path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CrossModalNetError(f"{json_path}: not UTF-8 text (byte {exc.start})") from None
    try:
        meta = json.loads(text)
    except RecursionError:
        raise CrossModalNetError(f"{json_path}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        raise CrossModalNetError(f"{json_path}: invalid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(meta, dict):
        raise CrossModalNetError(f"{json_path}: expected a JSON object at the top, got {type(meta).__name__}")
    return meta


def read_spec(root: str | os.PathLike) -> DataSpec:
    """The channels, labels and regions of the dataset in `root` (its `dataset.json`)."""
    json_path = Path(root) / "dataset.json"
    return DataSpec.from_dict(_read_json(json_path), str(json_path))


def _trusted(meta: dict, json_path: Path) -> tuple[Path, ...]:
    linked = meta.get("linked_from", [])
    if not isinstance(linked, list) or not all(isinstance(p, str) and Path(p).is_absolute() for p in linked):
        raise CrossModalNetError(f"{json_path}: 'linked_from' must be a list of absolute folders, got {linked!r:.80}")
    return tuple(Path(p).resolve() for p in linked)


def _default_id(rel: str) -> str:
    name = Path(rel).name
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return name.split(".")[0]


def _listed_case(entry: object, where: str, spec: DataSpec, root: Path, json_path: Path, check_files: bool,
                 trusted: tuple[Path, ...]) -> Case:
    """One entry of a split list: channels as `images`, as keys named by the channels, or one 4D `image`."""
    if isinstance(entry, str):  # MSD lists test cases as bare paths
        entry = {"image": entry}
    if not isinstance(entry, dict):
        raise CrossModalNetError(f"{json_path}: {where} must be a mapping with the case's images, got "
                                 f"{type(entry).__name__}")
    n = spec.num_channels
    by_name = {c.casefold(): i for i, c in enumerate(spec.channels)}
    rels: list[str | None] = [None] * n
    volumes: list[int | None] = [None] * n
    if "images" in entry:
        given = entry["images"]
        if not isinstance(given, list):
            raise CrossModalNetError(f"{json_path}: {where}.images must be a list of {n} paths (null for a "
                                     f"missing channel), got {type(given).__name__}")
        if len(given) != n:
            raise CrossModalNetError(f"{json_path}: {where}.images lists {len(given)} files; the dataset has "
                                     f"{n} channels {list(spec.channels)} (null for a missing one)")
        rels = [g if g not in (None, "") else None for g in given]
    elif "image" in entry:  # MSD: one 4D file, or 3D when there is one channel
        rel = entry["image"]
        rels = [rel] * n
        volumes = [None] if n == 1 else list(range(n))
    else:
        for key, value in entry.items():
            # "record": the per-case record `prepare-mmwhs` lists beside the files (not an image).
            if key in ("id", "label", "record"):
                continue
            if key.casefold() not in by_name:
                raise CrossModalNetError(f"{json_path}: {where} key {key!r} is not a channel of the dataset "
                                         f"{list(spec.channels)} (nor 'id', 'label', 'record', 'images', 'image')")
            rels[by_name[key.casefold()]] = value if value not in (None, "") else None
    if all(r is None for r in rels):
        raise CrossModalNetError(f"{json_path}: {where} gives none of the channels {list(spec.channels)}")
    images = tuple(
        None if rel is None else ImageRef(_resolve(root, rel, json_path, f"{where}.{spec.channels[i]}", check_files,
                                                   trusted), volumes[i])
        for i, rel in enumerate(rels)
    )
    label = entry.get("label")
    label_path = (_resolve(root, label, json_path, f"{where}.label", check_files, trusted)
                  if label not in (None, "") else None)
    given = entry.get("id")
    case_id = given if given is not None else _default_id(str(next(r for r in rels if r is not None)))
    problem = check_case_id(case_id)
    if problem:
        source = "id" if given is not None else "id (taken from the file name)"
        raise CrossModalNetError(f"{json_path}: {where} {source} {case_id!r:.80} {problem}")
    return Case(id=case_id, images=images, label=label_path)


def _nnunet_cases(root: Path, folder: str, spec: DataSpec, ending: str, json_path: Path,
                  labels: str | None) -> list[Case]:
    """Cases of an nnU-Net v2 raw folder: `{folder}/{case}_{XXXX}{ending}` (+ `{labels}/{case}{ending}`)."""
    images_dir = root / folder
    if not images_dir.is_dir():
        return []
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(ending))
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        if path.name.startswith("."):
            continue
        match = pattern.fullmatch(path.name)
        if not match:
            raise CrossModalNetError(f"{path}: not named {{case}}_{{XXXX}}{ending} as nnU-Net v2 names images "
                                     f"(file_ending {ending!r} in {json_path.name})")
        channel = int(match.group(2))
        if channel >= spec.num_channels:
            raise CrossModalNetError(f"{path}: channel index {channel:04d} is not a channel of the dataset "
                                     f"(channel_names has {spec.num_channels}: {list(spec.channels)})")
        found.setdefault(match.group(1), {})[channel] = path
    label_paths: dict[str, Path] = {}
    if labels is not None and (root / labels).is_dir():
        for path in sorted((root / labels).iterdir()):
            if path.name.startswith("."):
                continue
            if not path.name.endswith(ending):
                raise CrossModalNetError(f"{path}: not a {ending} label file (file_ending in {json_path.name})")
            label_paths[path.name[: -len(ending)]] = path
    if labels is not None:
        orphans = sorted(set(label_paths) - set(found))
        if orphans:
            raise CrossModalNetError(f"{label_paths[orphans[0]]}: a label without images in {folder}/")
    cases = []
    for case_id, channels in found.items():
        problem = check_case_id(case_id)
        if problem:
            raise CrossModalNetError(f"{next(iter(channels.values()))}: case id {case_id!r:.80} {problem}")
        images = tuple(None if i not in channels else ImageRef(_resolve(root, str(channels[i].relative_to(root)),
                                                                        json_path, f"{folder}/{case_id}", True))
                       for i in range(spec.num_channels))
        label = label_paths.get(case_id)
        if labels is not None and label is None:
            raise CrossModalNetError(f"{root / labels / (case_id + ending)}: missing (case {case_id!r} has images in "
                                     f"{folder}/ but no label)")
        label_path = None if label is None else _resolve(root, str(label.relative_to(root)), json_path,
                                                         f"{labels}/{case_id}", True)
        cases.append(Case(case_id, images, label_path))
    return cases


def load_dataset(root: str | os.PathLike, check_files: bool = True) -> Dataset:
    """Read and validate a dataset folder (listed or nnU-Net v2 raw; see module docstring).

    Every case id (given, or the first image's file name without suffixes) must be a safe file name
    and unique across all splits (ignoring letter case), since outputs are named by it; only the
    same case (same files) may appear under one id in two splits; every path must be relative and
    stay inside the folder, symlinks followed (or inside `linked_from`).
    """
    root = Path(root)
    json_path = root / "dataset.json"
    meta = _read_json(json_path)
    name = meta.get("name")
    if name is not None and not isinstance(name, str):
        raise CrossModalNetError(f"{json_path}: 'name' must be a string, got {type(name).__name__}")
    spec = DataSpec.from_dict(meta, str(json_path))
    trusted = _trusted(meta, json_path)
    # A split given as anything but a list is a broken listing, not an nnU-Net v2 folder (whose
    # dataset.json lists nothing): say so rather than look for imagesTr/.
    listed = any(meta.get(split) not in (None, []) for split in SPLITS)
    raw: dict[str, list[Case]] = {}
    if listed:
        layout = "listed"
        for split in SPLITS:
            entries = meta.get(split, [])
            if entries is None:
                entries = []
            if not isinstance(entries, list):
                raise CrossModalNetError(f"{json_path}: {split!r} must be a list, got {type(entries).__name__}")
            raw[split] = [_listed_case(e, f"{split}[{i}]", spec, root, json_path, check_files, trusted)
                          for i, e in enumerate(entries)]
    else:
        layout = "nnunet"
        ending = meta.get("file_ending", ".nii.gz")
        if ending not in NIFTI_ENDINGS:
            raise CrossModalNetError(f"{json_path}: file_ending {ending!r} is not NIfTI ({', '.join(NIFTI_ENDINGS)})")
        raw["training"] = _nnunet_cases(root, "imagesTr", spec, ending, json_path, labels="labelsTr")
        raw["test"] = _nnunet_cases(root, "imagesTs", spec, ending, json_path, labels=None)
        declared = meta.get("numTraining")
        if isinstance(declared, int) and not isinstance(declared, bool) and declared != len(raw["training"]):
            raise CrossModalNetError(f"{json_path}: numTraining is {declared} but imagesTr/ holds "
                                     f"{len(raw['training'])} cases")
    splits: dict[str, list[Case]] = {}
    seen: dict[str, tuple[str, Case]] = {}  # casefolded id -> where it was first listed, and the case
    for split in SPLITS:
        in_split: dict[str, str] = {}
        for i, case in enumerate(raw.get(split, [])):
            where = f"{split}[{i}]"
            key = case.id.casefold()
            # One case may be listed in two splits (same id, same files: its outputs are the same
            # files); any other repeat would let one case's outputs overwrite another's.
            clash = in_split.get(key) or (seen[key][0] if key in seen and seen[key][1] != case else None)
            if clash:
                raise CrossModalNetError(
                    f"{json_path}: {where} id {case.id!r} is also the id of {clash} "
                    "(ids name output files, so they must differ, beyond letter case too)")
            in_split[key] = where
            seen.setdefault(key, (where, case))
        splits[split] = raw.get(split, [])
    if not any(splits.values()):
        where = list(SPLITS) if layout == "listed" else ["imagesTr/", "imagesTs/"]
        raise CrossModalNetError(f"{json_path}: lists no cases in {where}")
    return Dataset(root=root, name=str(name or root.name), spec=spec, splits=splits, layout=layout)


def write_dataset_json(root: str | os.PathLike, splits: dict[str, list[dict]], name: str, spec: DataSpec,
                       **extra) -> Path:
    """Write `dataset.json` (atomically) for `splits` of relative-path entries."""
    root = Path(root)
    meta = {"name": name, **spec.to_dict(), **extra, **{split: splits.get(split, []) for split in SPLITS}}
    with atomic_path(root / "dataset.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return root / "dataset.json"


def check_case(case: Case) -> Geometry:
    """Header-only check that the case's channels and label share one grid. Returns that grid.

    Each header passes `io.read_geometry`'s checks (3D, memory budget, file size, affine)."""
    geoms: dict[str, Geometry] = {str(ref): read_geometry(ref.path, ref.volume) for ref in case.images
                                  if ref is not None}
    if case.label is not None:
        geoms[str(case.label)] = read_geometry(case.label)
    check_same_grid(geoms)
    return next(iter(geoms.values()))


def load_case(case: Case, spec: DataSpec, with_label: bool = True) -> dict:
    """Read a case fully. Returns {"images": [(X,Y,Z) float32 | None per channel],
    "label": (X,Y,Z) uint8 class indices | None, "geometry": Geometry}; checks the grids agree."""
    out: dict = {"images": [], "label": None}
    geoms: dict[str, Geometry] = {}
    for ref in case.images:
        if ref is None:
            out["images"].append(None)
            continue
        image, geoms[str(ref)] = read_image(ref.path, ref.volume)
        out["images"].append(image)
    if with_label and case.label is not None:
        out["label"], geoms[str(case.label)], _ = read_label(case.label, spec)
    check_same_grid(geoms)
    out["geometry"] = next(iter(geoms.values()))
    return out
