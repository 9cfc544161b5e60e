"""Cross-validation folds of `benchmarks/real.py`: the case pool, the folds, one dataset folder per fold.

The pool is every labelled case of a dataset folder (its training split, plus its validation and
test splits where they are labelled). `folds` splits it by case, the same way for our models and
for nnU-Net v2's `splits_final.json`. `write_fold_dataset` writes a listed dataset folder whose
`training` are the other folds' cases and whose `validation` are the fold's own: the trainer picks
its checkpoint on them, and the evaluator scores them (split "validation"). Images and labels are
symlinks to the original files (never copies); `linked_from` names the folders they resolve into,
so that `load_dataset` accepts them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossmodalnet.data.dataset import Case, Dataset, load_dataset, write_dataset_json
from crossmodalnet.data.spec import DataSpec
from crossmodalnet.errors import CrossModalNetError

__all__ = ["NUM_FOLDS", "Subset", "cv_pool", "folds", "fold_split", "parse_subset", "subset_spec",
           "write_fold_dataset"]

NUM_FOLDS = 5


@dataclass(frozen=True)
class Subset:
    """A channel subset: the dataset's channel indices, in the dataset's order, and its name."""

    indices: tuple[int, ...]
    channels: tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(self.channels)


def parse_subset(text: str, spec: DataSpec) -> Subset:
    """`"LGE,T2"` -> the subset of those channels (any letter case, in the dataset's order); one line
    naming the dataset's channels for an unknown one."""
    by_name = {c.casefold(): i for i, c in enumerate(spec.channels)}
    wanted = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in wanted if t.casefold() not in by_name]
    if not wanted or unknown:
        what = f"unknown channel(s) {', '.join(unknown)}" if unknown else "empty"
        raise CrossModalNetError(f"--channels {text!r}: {what}; the dataset's channels are {', '.join(spec.channels)}")
    indices = tuple(sorted({by_name[t.casefold()] for t in wanted}))
    return Subset(indices, tuple(spec.channels[i] for i in indices))


def subset_spec(spec: DataSpec, subset: Subset) -> DataSpec:
    """The dataset's spec with only the subset's channels (labels and regions unchanged)."""
    meta = spec.to_dict()
    meta["channel_names"] = {str(i): name for i, name in enumerate(subset.channels)}
    return DataSpec.from_dict(meta, "channel subset")


def cv_pool(dataset: Dataset) -> list[Case]:
    """Every labelled case of the dataset (training, validation, test), each once, sorted by id."""
    pool: dict[str, Case] = {}
    for split in ("training", "validation", "test"):
        for case in dataset[split]:
            if case.label is not None:
                pool.setdefault(case.id, case)
    return [pool[k] for k in sorted(pool)]


def folds(case_ids: Sequence[str], seed: int, k: int = NUM_FOLDS) -> list[list[str]]:
    """`k` disjoint folds covering `case_ids`: the ids sorted, permuted by `default_rng(seed)`, cut
    into near-equal parts (sizes differ by at most one); each fold's ids sorted."""
    if len(set(case_ids)) != len(case_ids):
        raise CrossModalNetError("folds: case ids repeat")
    if len(case_ids) < k:
        raise CrossModalNetError(f"folds: {len(case_ids)} labelled cases cannot make {k} folds")
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    return [sorted(ids[i] for i in part) for part in np.array_split(order, k)]


def fold_split(all_folds: Sequence[Sequence[str]], fold: int) -> tuple[list[str], list[str]]:
    """(training ids: the other folds', validation ids: the fold's), each sorted."""
    val = sorted(all_folds[fold])
    train = sorted(c for i, f in enumerate(all_folds) if i != fold for c in f)
    return train, val


def _link(target: Path, link: Path) -> str:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)
    return link.as_posix()


def write_fold_dataset(out: Path, pool: Sequence[Case], spec: DataSpec, subset: Subset,
                       train_ids: Sequence[str], val_ids: Sequence[str], name: str) -> Path:
    """A listed dataset folder `out` of the dataset `spec`: `training` = train_ids, `validation` =
    val_ids, only the subset's channels; every image and label a symlink to the original file. Read back and checked
    with `load_dataset`. Returns `out`."""
    by_id = {c.id: c for c in pool}
    out.mkdir(parents=True, exist_ok=True)
    linked: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        entries = []
        for case_id in ids:
            case = by_id[case_id]
            images = []
            for i, channel in zip(subset.indices, subset.channels, strict=True):
                ref = case.images[i]
                if ref is None:
                    images.append(None)
                    continue
                if ref.volume is not None:
                    raise CrossModalNetError(f"{ref}: a volume of a 4D file; real.py links 3D files only")
                target = ref.path.resolve()
                linked.add(str(target.parent))
                images.append(os.path.relpath(_link(target, out / "images" / channel / f"{case_id}.nii.gz"), out))
            assert case.label is not None
            label = case.label.resolve()
            linked.add(str(label.parent))
            _link(label, out / "labels" / f"{case_id}.nii.gz")
            entries.append({"id": case_id, "images": images, "label": f"labels/{case_id}.nii.gz"})
        splits[split] = entries
    write_dataset_json(out, splits, name, subset_spec(spec, subset), linked_from=sorted(linked))
    back = load_dataset(out)
    assert [c.id for c in back["training"]] == list(train_ids) and [c.id for c in back["validation"]] == list(val_ids)
    return out
