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

Case ids. Each glob's wildcards (`*`, `?`, `[...]`, `**`) match the part of a file's path that
changes from case to case ("3001"). The id is that part, widened by the literal text beside it that
every glob shares (the text that is not channel-specific): to the left, the longest run of whole
words (letter-and-digit runs and single separators) that ends every glob's literal text before its
first wildcard, within the file name ("Case"); to the right, the same for the text that starts every
glob's literal after its last wildcard, without the NIfTI ending and not past a "/" ("_" here, since
"_C0", "_LGE", "_T2", "_gd" share only it). Separators (`_ - .`) at the ends are trimmed and a "/"
(a folder matched by `**` or between wildcards) becomes "_". So the globs above give `Case3001`;
nnU-Net's `imagesTr/*_0000.nii.gz` ... `labelsTr/*.nii.gz` give `BraTS_001`; a folder per case
(`kits/*/imaging.nii.gz`, `kits/*/segmentation.nii.gz`) gives `case_00000`. With a single glob
nothing is channel-specific: `raw/Case*_C0.nii.gz` alone gives `Case3001_C0`. The files of one case
must give one id: that is how they are grouped.

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

import glob as globlib
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crossmodalnet.data.dataset import NIFTI_ENDINGS, SPLITS, check_case_id, write_dataset_json
from crossmodalnet.data.io import Geometry, read_geometry, read_label_values
from crossmodalnet.data.spec import DataSpec, LabelClass, Region, default_region_order
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path, check_output_folder

__all__ = ["BuiltDataset", "build_dataset", "build_from_cli", "case_ids"]

LABEL = "label"  # how the label's files are named in messages
# Separators trimmed from the ends of an id; "/" inside an id becomes "_".
_SEPARATORS = "_-. /"
# Words of literal text: runs of letters and digits, or one other character.
_WORD = re.compile(r"[^\W_]+|[\W_]")


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


@dataclass(frozen=True)
class _Glob:
    """One glob, absolute, as a regular expression with a group per wildcard, and its literal text
    around the wildcards (for the id rule)."""

    name: str  # the channel name, or LABEL
    text: str  # as given
    pattern: str  # absolute
    regex: re.Pattern
    head: str  # literal text before the first wildcard, within its path component
    head_at: int  # where `head` starts in every matched path
    tail: str  # literal text after the last wildcard, NIfTI ending removed


def _compile(name: str, text: str) -> _Glob:
    if not isinstance(text, str) or not text.strip():
        raise CrossModalNetError(f"{name}: needs a glob of NIfTI files, got {text!r}")
    pattern = os.path.normpath(os.path.abspath(os.path.expanduser(text)))
    regex, literals, i = [], [""], 0
    while i < len(pattern):
        ch = pattern[i]
        whole = (i == 0 or pattern[i - 1] == "/") and pattern[i + 2: i + 3] in ("", "/")
        if pattern.startswith("**", i) and whole:  # glob's recursive wildcard: any folders
            regex.append("((?:[^/]*/)*)" if pattern.startswith("**/", i) else "(.*)")
            i += 3 if pattern.startswith("**/", i) else 2
            literals.append("")
        elif ch in "*?":
            regex.append("([^/]*)" if ch == "*" else "([^/])")
            literals.append("")
            i += 1
        elif ch == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            inner = pattern[i + 1:end]
            inner = "^" + inner[1:] if inner.startswith("!") else inner
            regex.append("([" + inner.replace("\\", "\\\\") + "])")
            literals.append("")
            i = end + 1
        else:
            regex.append(re.escape(ch))
            literals[-1] += ch
            i += 1
    if len(literals) == 1:
        raise CrossModalNetError(f"{name}: glob {text!r} has no wildcard (*): it must match one file per case")
    head_full = literals[0]
    head = head_full.rsplit("/", 1)[-1]
    tail = literals[-1]
    for ending in NIFTI_ENDINGS:
        if tail.endswith(ending):
            tail = tail[: -len(ending)]
            break
    else:
        tail = "" if ".nii.gz".endswith(tail) else tail
    return _Glob(name, text, pattern, re.compile("".join(regex)), head, len(head_full) - len(head), tail)


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _shared_prefix(texts: list[str]) -> str:
    """The longest run of whole words that starts every text."""
    words = [_words(t) for t in texts]
    out = []
    for group in zip(*words, strict=False):
        if any(w != group[0] for w in group):
            break
        out.append(group[0])
    return "".join(out)


def _shared_suffix(texts: list[str]) -> str:
    return _shared_prefix([t[::-1] for t in texts])[::-1] if texts else ""


def _nifti_ending(path: str) -> str | None:
    return next((e for e in NIFTI_ENDINGS if path.endswith(e)), None)


def case_ids(globs: Sequence[tuple[str, str]]) -> dict[str, dict[str, Path]]:
    """{case id: {glob name: file}} for (name, glob) pairs, by the rule of the module docstring.

    Raises a one-line error for a glob that matches no file, a match that is not NIfTI, an id that
    is not a valid file name, and two files of one glob with the same id.
    """
    compiled = [_compile(name, text) for name, text in globs]
    if len({g.name for g in compiled}) != len(compiled):
        raise CrossModalNetError(f"two globs share a name: {[g.name for g in compiled]}")
    left = _shared_suffix([g.head for g in compiled])
    # To the right, not past a "/": the id stays within the path component of the last wildcard.
    right = _shared_prefix([g.tail for g in compiled]).split("/", 1)[0]
    by_id: dict[str, dict[str, Path]] = {}
    folded: dict[str, str] = {}
    taken: dict[str, _Glob] = {}  # file -> the glob that matched it first
    for g in compiled:
        files = sorted(p for p in globlib.glob(g.pattern, recursive=True) if os.path.isfile(p))
        if not files:
            raise CrossModalNetError(f"{g.name}: glob {g.text!r} matches no file (relative globs start in "
                                     f"{os.getcwd()})")
        for path in files:
            first = taken.setdefault(path, g)
            if first is not g:
                raise CrossModalNetError(f"{path}: matched by both {first.name} glob {first.text!r} and {g.name} glob "
                                         f"{g.text!r}; make them narrower")
            ending = _nifti_ending(path)
            if ending is None:
                raise CrossModalNetError(f"{path}: matched by {g.name} glob {g.text!r} but not a NIfTI file "
                                         f"({', '.join(NIFTI_ENDINGS)}); make the glob narrower")
            if not g.regex.fullmatch(path):  # glob and regex disagree (a pattern we do not translate)
                raise CrossModalNetError(f"{g.name}: glob {g.text!r} is too complex to take case ids from "
                                         f"(matched {path}); use *, ?, [...] and **")
            core = path[g.head_at: len(path) - len(ending)]
            keep_right = len(right) if core.endswith(g.tail) else len(g.tail)  # a tail inside the ending
            raw = core[len(g.head) - len(left): len(core) - len(g.tail) + keep_right]
            case_id = raw.strip(_SEPARATORS).replace("/", "_")
            problem = check_case_id(case_id)
            if problem:
                raise CrossModalNetError(f"{path}: case id {case_id!r:.80} (the part of the name that changes "
                                         f"from case to case, by {g.name} glob {g.text!r}) {problem}")
            other = folded.setdefault(case_id.casefold(), case_id)
            if other != case_id:
                raise CrossModalNetError(f"{path}: case id {case_id!r} differs from {other!r} only in letter case "
                                         "(ids name output files)")
            files_of_case = by_id.setdefault(case_id, {})
            if g.name in files_of_case:
                raise CrossModalNetError(f"{path}: {g.name} glob {g.text!r} gives case id {case_id!r} to this "
                                         f"file and to {files_of_case[g.name]}; make the glob narrower")
            files_of_case[g.name] = Path(path)
    return dict(sorted(by_id.items()))


def _spec(channels: list[str], labels: Sequence[tuple[str, int]],
          regions: Sequence[tuple[str, Sequence[int | str]]], train_regions: bool) -> DataSpec:
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
                        region_order=default_region_order(built) if train_regions else ())
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
                  name: str | None = None) -> BuiltDataset:
    """Make the dataset folder `out` from files found by globs; see the module docstring (MyoPS example).

    channels: (name, glob) in channel order, e.g. [("C0", "raw/Case*_C0.nii.gz"), ("LGE", ...)];
    globs are relative to the current folder or absolute, `**` spans folders. label_glob: the label
    files' glob, or None (every case unlabelled, in `test`). labels: (name, value in the files), e.g.
    [("MYO", 200), ("scar", 2221)]. regions: (name, label values or names), e.g. [("scar", [2221])];
    train_regions: train on the regions (painted back largest-exclusive-value first, see
    `spec.default_region_order`). copy: copy the files instead of linking them. test_fraction:
    share of the labelled cases held out as a labelled `test` split, drawn by `seed`. name: the
    dataset's name (default: the folder's).

    Returns a `BuiltDataset`: path-like, and its `str()` is a summary (cases per split, channels
    and the cases missing them, label voxels). Raises `CrossModalNetError` (one line) before writing
    anything when a check fails.
    """
    out = Path(out)
    _check_out(out)
    if not channels:
        raise CrossModalNetError("--channel: give at least one channel as NAME=GLOB")
    names = [str(c) for c, _ in channels]
    spec = _spec(names, labels, regions, train_regions)
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
            rel = Path("images", c, case_id + _nifti_ending(str(files[c])))
            entry["images"].append(rel.as_posix())
            plan.append((files[c], out / rel))
        if LABEL in files:
            rel = Path("labels", case_id + _nifti_ending(str(files[LABEL])))
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
    [--region NAME=V1,V2 ...] [--train-regions] [--copy] [--name N]`: parse the values, build, print
    the summary."""
    labels = []
    for name, value in args.labels:
        try:
            labels.append((name, int(value)))
        except ValueError:
            raise CrossModalNetError(f"--labels {name}={value}: the value must be an integer") from None
    regions = [(name, [v.strip() for v in value.split(",") if v.strip()]) for name, value in args.region or []]
    built = build_dataset(args.out, channels=list(args.channel), label_glob=args.label, labels=labels,
                          regions=regions, train_regions=args.train_regions, copy=args.copy, name=args.name)
    print(built)
    return built

