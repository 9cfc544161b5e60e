"""The synthetic dataset a benchmark runs on: made once per work folder, refused when another one is there."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from _files import read_json, write_json

from crossmodalnet.data.dataset import load_dataset

__all__ = ["make_dataset"]


def make_dataset(root: Path, cases: int, edge: int, seed: int, domain: str = "source",
                 references: dict[str, Path] | None = None, min_cases: int = 8) -> dict[str, Any]:
    """Synthesize a benchmark dataset into `root` once; copy the labels of each split of `references`
    ({split: folder}) into its folder, where the evaluator reads them.

    Reused when `root/benchmark.json` records the same (cases, edge, seed, domain); another dataset
    in the folder is refused rather than silently mixed with results made on it.
    """
    from crossmodalnet.data.phantom import synthesize
    from crossmodalnet.errors import CrossModalNetError

    wanted = {"cases": cases, "edge": edge, "seed": seed, "domain": domain}
    marker = read_json(root / "benchmark.json")
    if marker is not None and marker != wanted:
        raise CrossModalNetError(f"{root}: holds another benchmark dataset ({marker}, wanted {wanted}); "
                                 "use another --work folder")
    if marker is None:
        if root.exists():
            shutil.rmtree(root)  # an interrupted synthesis: start it over
        synthesize(root, cases=cases, size=edge, seed=seed, domain=domain, layout="dataset")
        write_json(root / "benchmark.json", wanted)
    dataset = load_dataset(root)
    if not dataset["test"] or not dataset["validation"]:
        raise CrossModalNetError(f"{root}: needs test and validation cases; use --cases {min_cases} or more")
    for split, folder in (references or {}).items():
        folder.mkdir(parents=True, exist_ok=True)
        for case in dataset[split]:
            if not (folder / f"{case.id}.nii.gz").is_file():
                shutil.copyfile(case.label, folder / f"{case.id}.nii.gz")
    return {**wanted, "splits": {k: len(dataset[k]) for k in ("training", "validation", "test")},
            "test_cases": [c.id for c in dataset["test"]]}
