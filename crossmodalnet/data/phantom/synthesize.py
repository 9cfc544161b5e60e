"""`synthesize`: write a set of synthetic paired CT/MR cases to disk, in one of two layouts.

Layout "dataset" writes imagesTr/, labelsTr/, imagesTs/, labelsTs/ (`case_000_ct.nii.gz`,
`case_000_mr.nii.gz`, `case_000.nii.gz`), `dataset.json` and the sidecar `phantom.json`; layout
"mmwhs" writes the raw MM-WHS naming and `mmwhs_truth.json`. Images (X, Y, Z) are int16 on disk
(HU for CT, as scanners write them), labels class indices (dataset) or MM-WHS codes (mmwhs).

OUT must be new (absent or an empty folder): old files would mix with the new set. Everything is
written into a staging folder, `OUT.partial-<random>/` beside a new OUT (renamed onto it in one
step at the end) or `OUT/.partial-<random>/` in an empty one (its entries renamed up); a failure
part-way (a full disk, Ctrl-C) removes what was written and leaves OUT as it was.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from crossmodalnet.data.dataset import write_dataset_json
from crossmodalnet.data.io import read_image, read_label, write_image, write_label
from crossmodalnet.data.labels import to_codes
from crossmodalnet.data.phantom.generate import FOV_MM, PhantomCase, check_args, generate_case, split_cases
from crossmodalnet.data.phantom.preview import write_preview
from crossmodalnet.data.phantom.render import Domain, get_domain
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path, check_output_folder

__all__ = ["synthesize"]


def _write_dataset_case(out: Path, case_id: str, test: bool, case: PhantomCase) -> dict:
    img, lab = ("imagesTs", "labelsTs") if test else ("imagesTr", "labelsTr")
    entry = {"id": case_id, "ct": f"{img}/{case_id}_ct.nii.gz", "mr": f"{img}/{case_id}_mr.nii.gz",
             "label": f"{lab}/{case_id}.nii.gz"}
    # Integers on disk, as scanners write them (HU for CT); half the bytes to compress.
    write_image(out / entry["ct"], np.rint(case.ct), case.geometry, dtype=np.int16)
    write_image(out / entry["mr"], np.rint(case.mr), case.geometry, dtype=np.int16)
    write_label(out / entry["label"], case.label, case.geometry)
    return entry


def _write_mmwhs_case(out: Path, number: int, case: PhantomCase) -> None:
    for mod, img, lab, geom in (("ct", case.ct, case.label, case.geometry),
                                ("mr", case.mr, case.mr_label, case.mr_geometry)):
        stem = out / f"{mod}_train" / f"{mod}_train_{number}"
        # The released MM-WHS volumes are integers (HU for CT) with MM-WHS codes in the labels.
        write_image(f"{stem}_image.nii.gz", np.rint(img), geom, dtype=np.int16)
        write_label(f"{stem}_label.nii.gz", to_codes(lab), geom)


def _make_and_write(job: tuple) -> tuple[str, dict]:
    out, i, case_id, test, size, seed, dom, layout = job
    case = generate_case(seed, i, size, dom, layout)
    if layout == "dataset":
        return case_id, {"entry": _write_dataset_case(out, case_id, test, case), **case.meta}
    _write_mmwhs_case(out, 1001 + i, case)
    meta = {**case.meta, "ct": {"shape": list(case.geometry.shape), "spacing_mm": list(case.geometry.spacing)},
            "mr": {"shape": list(case.mr_geometry.shape), "spacing_mm": list(case.mr_geometry.spacing)}}
    return case_id, meta


def _json_text(meta: dict) -> str:
    """Indented settings, then one line per case (B-spline coefficients make a case long)."""
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items() if k != "cases")
    cases = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in meta["cases"].items())
    return "{\n" + head + ',\n "cases": {\n' + cases + "\n }\n}\n"



def synthesize(out: str | os.PathLike, cases: int = 20, size: int = 96, seed: int = 0,
               domain: str | Domain = "source", layout: str = "dataset", preview: bool = False,
               workers: int | None = None) -> Path:
    """Write `cases` synthetic CT/MR pairs into `out` and return `out`.

    layout "dataset": NIfTI on one grid + dataset.json (split by `seed`) + phantom.json (per-case
    anatomy and residual MR misalignment). layout "mmwhs": raw MM-WHS names and codes, CT and MR on
    different grids, misaligned; mmwhs_truth.json holds each case's MR -> CT transform.
    workers: processes (default: up to 2 for big jobs). Same arguments give byte-identical files.
    """
    check_args(cases, size, seed, layout)
    dom = get_domain(domain)
    final = Path(out)
    _check_new_folder(final)
    where = Path(os.path.abspath(final))  # "." or "a/.." have no name to put a sibling beside
    # Beside a new OUT (published by one rename); inside an existing empty one, which may be a
    # mount point (a container's volume) that a sibling could not be renamed onto.
    tag = f"partial-{secrets.token_hex(4)}"
    inside = where.is_dir()
    staging = where / f".{tag}" if inside else where.parent / f"{where.name}.{tag}"
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise CrossModalNetError(f"{final}: cannot create the output folder ({exc.strerror})") from None
    try:
        _write_all(staging, _case_ids(cases, layout), cases, size, seed, dom, layout, preview, workers)
        if inside:
            for entry in sorted(staging.iterdir()):
                os.rename(entry, where / entry.name)
        else:
            os.rename(staging, where)
    except BaseException:
        if inside:  # OUT was empty: whatever is in it now is ours
            for entry in where.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if inside:
        staging.rmdir()
    return final


def _check_new_folder(out: Path) -> None:
    """Refuse an OUT that is a file, lies below a file, or already holds files."""
    check_output_folder(out)
    if out.is_dir() and any(out.iterdir()):
        raise CrossModalNetError(f"{out}: folder is not empty; pass a new folder (old files would mix "
                                 "with the new set)")


def _case_ids(cases: int, layout: str) -> list[str]:
    """Case ids: case_000... (dataset layout) or MM-WHS numbers 1001... (mmwhs layout)."""
    width = max(3, len(str(cases - 1)))
    if layout == "dataset":
        return [f"case_{i:0{width}d}" for i in range(cases)]
    return [str(1001 + i) for i in range(cases)]  # MM-WHS numbering


def _write_all(out: Path, ids: list[str], cases: int, size: int, seed: int, dom: Domain, layout: str,
               preview: bool, workers: int | None) -> None:
    """Every file of the set into the (staging) folder `out`."""
    split = split_cases(ids, seed) if layout == "dataset" else {"training": ids}
    test = set(split.get("test", []))
    jobs = [(out, i, cid, cid in test, int(size), int(seed), dom, layout) for i, cid in enumerate(ids)]
    if workers is None:
        workers = min(2, os.cpu_count() or 1, cases) if cases * size**3 >= 4 * 64**3 else 1
    results: dict[str, dict] = {}
    with tqdm(total=cases, desc=f"synth {layout} ({dom.name})", unit="case", disable=None) as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for cid, meta in pool.map(_make_and_write, jobs):
                    results[cid] = meta
                    bar.update()
        else:
            for job in jobs:
                cid, meta = _make_and_write(job)
                results[cid] = meta
                bar.update()

    settings = {"generator": "crossmodalnet.data.phantom", "seed": int(seed), "size": int(size), "layout": layout,
                "domain": asdict(dom)}
    if layout == "dataset":
        entries = {cid: results[cid].pop("entry") for cid in ids}
        sidecar = {**settings, "ct_spacing_mm": FOV_MM / size, "cases": results}
        with atomic_path(out / "phantom.json") as tmp:
            tmp.write_text(_json_text(sidecar))
        keys = ("rotation_deg", "translation_mm", "elastic_rms_mm")
        summary = {cid: {k: results[cid]["mr_residual"][k] for k in keys} for cid in ids}
        write_dataset_json(out, {k: [entries[c] for c in v] for k, v in split.items()},
                           name=f"crossmodalnet-phantom-{dom.name}", spec=MMWHS, description=dom.description,
                           phantom={"sidecar": "phantom.json", "seed": int(seed), "domain": dom.name,
                                    "mr_residual": summary})
        first = ids[0]
        if preview:
            ct, geom = read_image(out / entries[first]["ct"])
            mr, _ = read_image(out / entries[first]["mr"])
            lab, _, _ = read_label(out / entries[first]["label"], MMWHS)
            write_preview(out / "preview.png", ct, mr, lab, geom, title=f"{first} ({dom.name} domain)")
        return
    with atomic_path(out / "mmwhs_truth.json") as tmp:
        tmp.write_text(_json_text({**settings, "cases": results}))
    if preview:
        stem = out / "ct_train" / "ct_train_1001"
        ct, geom = read_image(f"{stem}_image.nii.gz")
        lab, _, _ = read_label(f"{stem}_label.nii.gz", MMWHS)
        mr, mr_geom = read_image(out / "mr_train" / "mr_train_1001_image.nii.gz")
        write_preview(out / "preview.png", ct, mr, lab, geom, mr_geom, title=f"MM-WHS layout, case 1001 ({dom.name})")
