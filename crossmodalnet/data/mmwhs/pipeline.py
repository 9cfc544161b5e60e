"""`prepare-mmwhs`: the raw MM-WHS release (or any unpaired CT and MR) -> a paired, registered, cropped
dataset folder, case by case in worker processes, with a registration report.

OUT:
    dataset.json                 training / validation / test ("test" also lists unlabeled pairs, no label)
    imagesTr/<id>_ct.nii.gz      (X, Y, Z) float32 on the prepared grid, its true affine; <id>_mr likewise
    labelsTr/<id>.nii.gz         (X, Y, Z) class indices 0..7 of the fixed modality's label
    imagesTs/, labelsTs/         the test split
    transforms/<id>_*            ANTs files: 1Warp + 0GenericAffine (fixed -> moving world), 1InverseWarp
    records/<id>.json            per-case record (original fixed geometry, box, grid, transforms, Dice, time);
                                 written last, atomically: it is the case's done marker
    registration_report.csv/json label Dice between the modalities before / after registration, time
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

from tqdm import tqdm

from crossmodalnet.data.dataset import write_dataset_json
from crossmodalnet.data.labels import NAMES
from crossmodalnet.data.mmwhs.pairing import check_headers, find_pairs, read_pairs_csv
from crossmodalnet.data.mmwhs.prepare import PrepareConfig, done_record, nanmean, prepare_case, read_pair
from crossmodalnet.data.mmwhs.register import RegistrationConfig, set_threads
from crossmodalnet.data.mmwhs.splits import assign_splits, parse_split
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path, check_output_folder

__all__ = ["prepare_mmwhs", "prepare_from_cli"]


def _worker(args: tuple) -> dict:
    return prepare_case(*args)


def _run(jobs: list[tuple], workers: int, bar: tqdm) -> list[dict]:
    """prepare_case over `jobs` in `workers` processes; the first error stops the rest (finished cases stay done)."""
    if workers <= 1 or len(jobs) <= 1:
        records = []
        for job in jobs:
            records.append(prepare_case(*job))
            bar.update()
        return records
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn: ITK's thread pool and torch's OpenMP state do not survive a fork safely.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=set_threads, initargs=(threads,)) as pool:
        pending = {pool.submit(_worker, job) for job in jobs}
        records = []
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                records.append(future.result())
                bar.update()
    return records


def _write_report(out: Path, records: list[dict], splits: dict[str, list[str]]) -> None:
    """registration_report.csv (one row per case) and .json (the same plus means)."""
    split_of = {cid: s for s, ids in splits.items() for cid in ids}
    rows = []
    for r in sorted(records, key=lambda r: r["id"]):
        reg = r["registration"]
        row = {"id": r["id"], "split": split_of.get(r["id"], ""), "fixed": r["fixed"], "moving": r["moving"],
               "method": reg["method"], "mean_dice_before": reg.get("mean_dice_before", math.nan),
               "mean_dice_after": reg.get("mean_dice_after", math.nan),
               **{f"before_{n}": reg.get("dice_before", {}).get(n, math.nan) for n in NAMES},
               **{f"after_{n}": reg.get("dice_after", {}).get(n, math.nan) for n in NAMES},
               "label_inside_grid": reg.get("label_inside_grid", math.nan), "register_s": reg["seconds"],
               "case_s": r["seconds"], "cpu_s": r["cpu_seconds"]}
        rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(out / "registration_report.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {key: nanmean([float(r[key]) for r in rows]) for key in
               ("mean_dice_before", "mean_dice_after", "register_s", "case_s", "cpu_s")}
    summary["note"] = ("Dice per structure between the fixed label and the moving label on the prepared grid, "
                       "before (world coordinates only) and after registration; means skip NaN (structure in "
                       "neither map; null where a case has no labels); times: seconds per case of this run's "
                       "workers (case_s: wall, cpu_s: CPU).")

    def strict(v):  # JSON has no NaN: null, as the note says
        return None if isinstance(v, float) and math.isnan(v) else v

    report = {"summary": {k: strict(v) for k, v in summary.items()},
              "cases": [{k: strict(v) for k, v in row.items()} for row in rows]}
    with atomic_path(out / "registration_report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, allow_nan=False))


def prepare_mmwhs(raw: str | os.PathLike, out: str | os.PathLike, config: PrepareConfig | None = None,
                  split: str = "15/5", seed: int = 0, workers: int = 2, pairs: str | os.PathLike | None = None,
                  progress: bool = True) -> Path:
    """Pair, register, crop and resample RAW into the dataset folder `out`. Returns dataset.json's path.

    Every input is checked before any case starts or any file moves: pairing, headers, and the
    voxels of every pair still to do (readable, finite, label codes in the table); finished cases
    (record present, same settings and raw files) are skipped; a case without its record is redone.
    A failure part-way (a full disk) leaves the finished cases (each complete with its record: a
    rerun resumes), removes the failing case's files and the folders this run made and left empty.
    """
    config = config or PrepareConfig()
    split_counts = parse_split(split)
    if workers < 1:
        raise CrossModalNetError(f"--workers must be >= 1, got {workers}")
    if pairs is None:
        found = find_pairs(raw)
    else:
        if not Path(raw).is_dir():
            raise CrossModalNetError(f"{raw}: raw folder not found")
        found = read_pairs_csv(pairs, raw)
    check_headers(found)
    out = Path(out)
    fixed_label = {p.id: p.label(config.fixed) is not None for p in found}
    splits = assign_splits([p.id for p in found if fixed_label[p.id]], [p.id for p in found if not fixed_label[p.id]],
                           split_counts, seed)
    test = set(splits["test"])
    folder = {p.id: "Ts" if p.id in test else "Tr" for p in found}
    if config.registration.method == "label":
        unlabeled = [p.id for p in found if p.label("ct") is None or p.label("mr") is None]
        if unlabeled:
            tqdm.write(f"note: {len(unlabeled)} pair(s) without both labels (first {unlabeled[0]}) are registered "
                       "by image: --register label needs the labels of both modalities")
    check_output_folder(out)
    todo = [p for p in found if done_record(p, out, folder[p.id], config, move=False) is None]
    for p in tqdm(todo, desc="check pairs", unit="pair", disable=None if progress else True):
        read_pair(p)  # the voxels: a truncated file or NaN in the last pair stops the run before the first
    before = _folders(out)
    try:
        return _prepare_all(found, out, folder, splits, config, split, split_counts, seed, workers, progress)
    except BaseException:
        _prune(out, before)
        raise


def _folders(out: Path) -> set[Path]:
    return {out, *(p for p in out.rglob("*") if p.is_dir())} if out.is_dir() else set()


def _prune(out: Path, before: set[Path]) -> None:
    """Remove the folders made by this run that it left empty (deepest first), OUT included."""
    for folder in sorted(_folders(out) - before, key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def _prepare_all(found: list, out: Path, folder: dict[str, str], splits: dict[str, list[str]],
                 config: PrepareConfig, split: str, split_counts: tuple, seed: int, workers: int,
                 progress: bool) -> Path:
    """Every check passed: move or prepare the cases, then the report and dataset.json."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CrossModalNetError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    records: dict[str, dict] = {}
    jobs = []
    for p in found:
        record = done_record(p, out, folder[p.id], config)
        if record is not None:
            records[p.id] = record
        else:
            jobs.append((p, out, folder[p.id], config))
    with tqdm(total=len(found), initial=len(records), desc="prepare-mmwhs", unit="case",
              disable=None if progress else True) as bar:  # None: on a terminal only
        for record in _run(jobs, workers, bar):
            records[record["id"]] = record

    def entry(cid: str) -> dict:
        files = records[cid]["files"]
        return {"id": cid, **{k: files[k] for k in ("ct", "mr", "label") if k in files},
                "record": f"records/{cid}.json"}

    _write_report(out, list(records.values()), splits)
    cut = sorted((r["registration"]["label_inside_grid"], r["id"]) for r in records.values()
                 if r["registration"].get("label_inside_grid", 1.0) < 0.995)
    if cut:
        grid = "x".join(map(str, config.size))
        tqdm.write(f"note: the {grid} grid of {config.spacing[0]:g} mm voxels cuts off part of the fixed label in "
                   f"{len(cut)} case(s) (worst {cut[0][1]}: {cut[0][0]:.1%} inside); use a larger --size or --spacing")
    return write_dataset_json(
        out, {s: [entry(cid) for cid in ids] for s, ids in splits.items()}, name="mmwhs-prepared", spec=MMWHS,
        mmwhs={**config.describe(), "split": split, "seed": int(seed), "report": "registration_report.csv",
               "validation": "given" if split_counts[1] is not None else "20% of the training part"},
    )


def prepare_from_cli(args) -> None:
    """`crossmodalnet prepare-mmwhs RAW OUT [...]` (argparse namespace from cli.py)."""
    try:
        iterations = tuple(int(i) for i in str(args.syn_iterations).split("x"))
    except ValueError:
        raise CrossModalNetError(f"--syn-iterations must look like 60x40x20, got {args.syn_iterations!r}") from None
    config = PrepareConfig(
        fixed=args.fixed,
        # The registration keeps its own fixed seed: --seed only draws the split, so that a new
        # split reuses the registered cases.
        registration=RegistrationConfig(method=args.register, spacing_mm=args.reg_spacing, syn_iterations=iterations),
        spacing=(args.spacing,) * 3, size=(args.size,) * 3, margin_mm=args.margin,
    )
    path = prepare_mmwhs(args.raw, args.out, config, split=args.split, seed=args.seed, workers=args.workers,
                         pairs=args.pairs)
    summary = json.loads((path.parent / "registration_report.json").read_text())["summary"]
    dice = ("" if summary["mean_dice_before"] is None else
            f"mean label Dice between the modalities {summary['mean_dice_before']:.3f} -> "
            f"{summary['mean_dice_after']:.3f}; ")
    print(f"wrote {path} ({args.register} registration): {dice}{summary['case_s']:.1f} s per case "
          f"(see {path.parent / 'registration_report.csv'})")
