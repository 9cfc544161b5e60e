"""Real-data benchmark: 5-fold cross-validation of our models and nnU-Net v2 at an equal CPU budget.

    .venv/bin/python benchmarks/real.py DATA --out DIR [--rows crossmodalnet,dynunet,unet,nnunet-default,nnunet-cpu]
        [--folds 0,1,2,3,4] [--minutes 20] [--seed 0] [--channels C0] [--channels LGE,T2] ...
        [--config-set model.deformable=false ...] [--nnunet-venv PATH] [--dry-run] [--table] [--score-last]
        [--postprocess-finished]

DATA: a crossmodalnet dataset folder (its labelled cases, all splits, form the pool). Folds by
case: ids sorted, permuted with `default_rng(seed)`, cut in 5 (`_real_folds.py`; the same folds
are nnU-Net's `splits_final.json`). One job = (row, fold, channel subset), run one after another:
- a registered model (`_real_ours.py`, in its own process): a per-fold dataset folder (training:
  the other folds; validation: the fold, which picks the checkpoint), the package's plan, size
  small, `max_minutes` = --minutes, defaults plus --config-set; predict and score the fold's cases;
- `nnunet-default`, `nnunet-cpu`: nnU-Net v2 through its own CLI (`_real_nnunet.py`).
Every job scores the fold's cases twice: with the checkpoint of the best validation Dice (`score`;
chosen on these very cases, so optimistic, for every row alike: nnU-Net's checkpoint_best.pth is
chosen the same way) and with the final step's weights (`score_last`; nothing chosen on them).
Our rows' predictions follow the postprocessing their training chose on the same cases (keep the
largest foreground component or not; `score_raw`: without it); --postprocess-finished makes that
choice for jobs finished before it existed.
Each finished job writes DIR/jobs/<job>/result.json (atomically); a rerun skips those and restarts
unfinished ones from scratch; --score-last adds `score_last` to jobs finished before it existed.
After each job and at the end the table (`_real_table.py`) is printed and written to DIR/table.md.
--table only rebuilds it; --dry-run lists the jobs, writes nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _files import read_json, write_json
from _machine import machine_info
from _real_folds import NUM_FOLDS, Subset, cv_pool, fold_split, folds, parse_subset, write_fold_dataset
from _real_nnunet import NNUNET_ROWS, NnunetDataset, NnunetSetup, run_nnunet_job
from _real_table import render_table

from crossmodalnet.data.dataset import Case, Dataset, load_dataset
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path
from crossmodalnet.models.registry import MODEL_NAMES

DEFAULT_ROWS = ("crossmodalnet", "dynunet", "unet", "nnunet-default", "nnunet-cpu")
DEFAULT_NNUNET_VENV = Path("/work/data/nnunet-cpu-venv")
OURS_WORKER = Path(__file__).with_name("_real_ours.py")


@dataclass(frozen=True)
class Job:
    """One training: a row (with its config overrides) on one fold of one channel subset."""

    row: str
    fold: int
    subset: Subset
    config_set: tuple[tuple[str, str], ...]

    @property
    def label(self) -> str:
        """The row as the table names it: the model, and its overrides for our rows."""
        sets = "" if self.row in NNUNET_ROWS else "".join(f"+{k}={v}" for k, v in self.config_set)
        return self.row + sets

    @property
    def name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{self.label}__{self.subset.name}__fold{self.fold}")


def _parse_config_set(items: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CrossModalNetError(f"--config-set {item!r}: expected KEY=VALUE (e.g. model.deformable=false)")
        out.append((key.strip(), value.strip()))
    return tuple(out)


def _list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CrossModalNetError(f"--{what}: empty list")
    return items


def _jobs(a: argparse.Namespace, dataset: Dataset) -> tuple[list[Job], list[Subset]]:
    """Every job, rows outermost, then channel subsets, then folds; each argument checked first."""
    rows = _list(a.rows, "rows")
    unknown = [r for r in rows if r not in MODEL_NAMES and r not in NNUNET_ROWS]
    if unknown:
        raise CrossModalNetError(f"--rows: unknown row(s) {', '.join(unknown)}; choose from "
                                 f"{', '.join([*MODEL_NAMES, *NNUNET_ROWS])}")
    try:
        fold_ids = sorted({int(f) for f in _list(a.folds, "folds")})
    except ValueError:
        raise CrossModalNetError(f"--folds {a.folds!r}: expected fold numbers such as 0,1,2,3,4") from None
    if any(not 0 <= f < NUM_FOLDS for f in fold_ids):
        raise CrossModalNetError(f"--folds {a.folds!r}: folds are 0-{NUM_FOLDS - 1}")
    spec = dataset.spec
    subsets = ([parse_subset(c, spec) for c in a.channels] if a.channels
               else [Subset(tuple(range(spec.num_channels)), spec.channels)])
    sets = _parse_config_set(a.config_set or [])
    if sets:
        from _real_ours import base_config  # validates every key and value before anything runs

        for row in rows:
            if row not in NNUNET_ROWS:
                base_config(row, a.minutes, a.seed, dict(sets))
    jobs = [Job(row, fold, subset, sets) for row in rows for subset in subsets for fold in fold_ids]
    return jobs, list(dict.fromkeys(subsets))


def _load(data: Path) -> tuple[Dataset, list[Case]]:
    if not (data / "dataset.json").is_file():
        raise CrossModalNetError(f"{data}: no dataset.json (DATA is a crossmodalnet dataset folder)")
    dataset = load_dataset(data)
    pool = cv_pool(dataset)
    if len(pool) < NUM_FOLDS:
        raise CrossModalNetError(f"{data}: {len(pool)} labelled cases; {NUM_FOLDS} folds need at least {NUM_FOLDS}")
    return dataset, pool


def _our_spacing(data: Path, out: Path) -> list[float]:
    """The target spacing of the crossmodalnet plan of DATA (`crossmodalnet plan DATA`), cached."""
    from crossmodalnet.config import ModelConfig
    from crossmodalnet.train.preflight import plan_dataset

    cached = read_json(out / "crossmodalnet_plan.json")
    if cached is None:
        _, plan = plan_dataset(data, ModelConfig.from_size("crossmodalnet", "small"), "cpu")
        cached = plan.to_dict()
        write_json(out / "crossmodalnet_plan.json", cached)
    return list(cached["target_spacing"])


def _run_ours(spec_path: Path, log: Path, minutes: float) -> None:
    with open(log, "w") as fh:
        try:
            subprocess.run([sys.executable, str(OURS_WORKER), str(spec_path)], stdout=fh, stderr=subprocess.STDOUT,
                           env={**os.environ, "TQDM_MININTERVAL": "10"}, timeout=60 * minutes + 1800,
                           check=False)
        except subprocess.TimeoutExpired:
            pass
    if not spec_path.with_name("result.json").is_file():
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        raise CrossModalNetError(f"failed: {tail[0][:300] if tail else 'no output'} (log {log})")


def _postprocess_finished(a: argparse.Namespace, jobs: list[Job]) -> None:
    """Choose the postprocessing for the given finished jobs of our rows that lack it and score them
    again (`_real_ours.postprocess_finished`); result.json is rewritten atomically, one job at a time."""
    from _real_ours import postprocess_finished

    todo = [(job, r) for job in jobs if job.row not in NNUNET_ROWS
            and (r := read_json(a.out / "jobs" / job.name / "result.json"))
            and r.get("status") == "ok" and "postprocess" not in r]
    for n, (job, result) in enumerate(todo, 1):
        updated = postprocess_finished(result)
        write_json(a.out / "jobs" / job.name / "result.json", updated)
        chosen = "largest component" if updated["postprocess"]["largest_component"] else "none"
        print(f"[{n}/{len(todo)}] {job.name}: {chosen}; mean Dice {updated['score_raw']['mean_dice']:.3f} -> "
              f"{updated['score']['mean_dice']:.3f}", file=sys.stderr, flush=True)


def _score_last(a: argparse.Namespace, jobs: list[Job], all_folds: list[list[str]], pool: list[Case],
                dataset: Dataset, setup: NnunetSetup) -> None:
    """Add `score_last` (the fold's cases predicted with the final step's weights) to the given
    finished jobs that lack it; result.json is rewritten atomically, one job at a time."""
    from _real_nnunet import nnunet_score
    from _real_ours import score_checkpoint

    todo = [(job, r) for job in jobs if (r := read_json(a.out / "jobs" / job.name / "result.json"))
            and r.get("status") == "ok" and "score_last" not in r]
    datasets = {s.name: NnunetDataset(setup, s) for s in {j.subset for j, _ in todo if j.row in NNUNET_ROWS}}
    for n, (job, result) in enumerate(todo, 1):
        t = time.monotonic()
        if job.row in NNUNET_ROWS:
            score, _ = nnunet_score({**result, "all_folds": all_folds}, setup, datasets[job.subset.name], pool,
                                    dataset.spec, "last")
        else:
            score, _ = score_checkpoint(result, "last")
        write_json(a.out / "jobs" / job.name / "result.json", {**result, "score_last": score})
        print(f"[{n}/{len(todo)}] {job.name}: mean Dice {result['score']['mean_dice']:.3f} best, "
              f"{score['mean_dice']:.3f} last ({time.monotonic() - t:.0f} s)", file=sys.stderr, flush=True)


def _check_settings(a: argparse.Namespace, jobs: list[Job]) -> None:
    """Refuse a DIR whose finished jobs were measured with other data, seed or budget: a rerun would
    skip them as if they were this command's."""
    for job in jobs:
        done = read_json(a.out / "jobs" / job.name / "result.json")
        if done and (done.get("data"), done.get("seed"), done.get("minutes")) != (str(a.data), a.seed, a.minutes):
            raise CrossModalNetError(f"{a.out}: job {job.name} finished with data {done.get('data')}, seed "
                                     f"{done.get('seed')}, --minutes {done.get('minutes')}; use another --out")


def _finished(out: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    """Every finished job in DIR (not only this command's) measured with the header's data, seed, budget."""
    results = [read_json(p) for p in sorted((out / "jobs").glob("*/result.json"))]
    return [r for r in results if r and r.get("status") == "ok"
            and (r["data"], r["seed"], r["minutes"]) == (header["data"], header["seed"], header["minutes"])]


def _table(out: Path, header: dict[str, Any]) -> str:
    """The table of the finished jobs, written to DIR/table.md (atomically) and returned."""
    text = render_table(_finished(out, header), header)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="crossmodalnet dataset folder (dataset.json)")
    p.add_argument("--out", type=Path, required=True, help="work folder: fold datasets, jobs, nnunet, table.md")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help=f"comma-separated registered models and/or nnunet-default, nnunet-cpu (default "
                        f"{','.join(DEFAULT_ROWS)})")
    p.add_argument("--folds", default="0,1,2,3,4", help="folds to run (default 0,1,2,3,4)")
    p.add_argument("--minutes", type=float, default=20.0, help="training wall budget per job (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and of the trainings (default 0)")
    p.add_argument("--channels", action="append", metavar="C1,C2",
                   help="a channel subset (repeatable; default: all channels)")
    p.add_argument("--config-set", dest="config_set", action="append", metavar="KEY=VALUE",
                   help="override of our rows' training config (repeatable; YAML value), e.g. model.deformable=false")
    p.add_argument("--nnunet-venv", dest="nnunet_venv", type=Path, default=DEFAULT_NNUNET_VENV,
                   help=f"environment with nnunetv2 (default {DEFAULT_NNUNET_VENV})")
    p.add_argument("--nnunet-config", dest="nnunet_config", default="2d",
                   help="nnU-Net configuration trained by both nnU-Net rows (default 2d)")
    p.add_argument("--nnunet-gpu-memory", dest="nnunet_gpu_memory", type=float, default=0.5,
                   help="-gpu_memory_target (GB) of the nnunet-cpu plan: sizes its patch and batch (default 0.5)")
    p.add_argument("--workers", type=int, default=1, help="nnU-Net preprocessing/prediction processes (default 1)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the jobs; write nothing")
    p.add_argument("--table", action="store_true", help="only rebuild DIR/table.md from the finished jobs")
    p.add_argument("--score-last", dest="score_last", action="store_true",
                   help="only score the given finished jobs that lack it with their last checkpoint (jobs "
                        "finished before both checkpoints were scored), then rebuild the table")
    p.add_argument("--postprocess-finished", dest="postprocess_finished", action="store_true",
                   help="only, for the given finished jobs of our rows that lack it, choose the postprocessing "
                        "as training now does (on the fold's cases) and score them again with it, then rebuild "
                        "the table")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = ".venv/bin/python benchmarks/real.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        dataset, pool = _load(a.data)
        jobs, subsets = _jobs(a, dataset)
        setup = NnunetSetup(a.nnunet_venv, a.out.resolve() / "nnunet", a.nnunet_config, a.nnunet_gpu_memory, a.workers)
        if any(j.row in NNUNET_ROWS for j in jobs) and not a.table:
            setup.check()
        if not a.table:  # the table only shows the jobs of the given settings
            _check_settings(a, jobs)
    except CrossModalNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    all_folds = folds([c.id for c in pool], a.seed)
    header = {"data": str(a.data), "cases": len(pool), "num_folds": NUM_FOLDS, "seed": a.seed,
              "folds": ",".join(str(f) for f in sorted({j.fold for j in jobs})), "minutes": a.minutes,
              "machine": machine_info(), "command": command}
    if a.dry_run:
        for n, job in enumerate(jobs, 1):
            train, val = fold_split(all_folds, job.fold)
            done = (a.out / "jobs" / job.name / "result.json").is_file()
            print(f"[{n}/{len(jobs)}] {job.name}: train {len(train)}, validation {len(val)} cases"
                  + (" (finished)" if done else ""))
        return
    if a.table:
        if not (a.out / "jobs").is_dir():
            print(f"error: {a.out}: no jobs/ folder (nothing has run there)", file=sys.stderr)
            sys.exit(2)
        print(_table(a.out, header))
        return
    if a.score_last:
        _score_last(a, jobs, all_folds, pool, dataset, setup)
        print(_table(a.out, header))
        return
    if a.postprocess_finished:
        _postprocess_finished(a, jobs)
        print(_table(a.out, header))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "folds.json", {"seed": a.seed, "folds": all_folds})
    spacing = _our_spacing(a.data, a.out) if any(j.row == "nnunet-cpu" for j in jobs) else []
    nnunet = {s.name: NnunetDataset(setup, s) for s in subsets} if any(j.row in NNUNET_ROWS for j in jobs) else {}
    start = time.monotonic()
    for n, job in enumerate(jobs, 1):
        tag, job_dir = f"[{n}/{len(jobs)}] {job.name}", a.out / "jobs" / job.name
        if (job_dir / "result.json").is_file():
            print(f"{tag}: finished before, skipped", file=sys.stderr)
            continue
        if job_dir.exists():  # unfinished: restart from scratch (equal budget)
            shutil.rmtree(job_dir)
        job_dir.mkdir(parents=True)
        train_ids, val_ids = fold_split(all_folds, job.fold)
        data_dir = write_fold_dataset(a.out / "folds" / job.subset.name / f"fold{job.fold}", pool, dataset.spec,
                                      job.subset, train_ids, val_ids, f"{dataset.name}-fold{job.fold}")
        spec = {"name": job.name, "label": job.label, "row": job.row, "fold": job.fold, "channels": job.subset.name,
                "config_set": dict(job.config_set), "minutes": a.minutes, "seed": a.seed, "data": str(a.data),
                "data_dir": str(data_dir), "job_dir": str(job_dir), "train_cases": train_ids, "val_cases": val_ids}
        print(f"{tag}: running ({len(train_ids)} training, {len(val_ids)} validation cases)", file=sys.stderr,
              flush=True)
        t = time.monotonic()
        try:
            if job.row in NNUNET_ROWS:
                result = {**spec, **run_nnunet_job({**spec, "all_folds": all_folds, "our_spacing": spacing}, setup,
                                                   nnunet[job.subset.name], pool, dataset.spec)}
                training, plan = result["training"], result["nnunet_plan"]
                result.update(steps_done=training["iterations"], s_per_step=training["s_per_iteration"],
                              note=f"nnU-Net {plan['configuration']} ({plan['plans']}): patch "
                                   f"{'x'.join(map(str, plan['patch_size']))}, batch {plan['batch_size']}, spacing "
                                   f"{'x'.join(f'{s:.3g}' for s in plan['spacing'])} mm")
                result.update(status="ok", job_wall_s=time.monotonic() - t)
                write_json(job_dir / "result.json", result)
            else:
                write_json(job_dir / "job.json", spec)
                _run_ours(job_dir / "job.json", job_dir / "log.txt", a.minutes)
        except Exception as exc:  # the failure is this job's (failed.json; rerun retries it); the others go on
            error = str(exc) if isinstance(exc, CrossModalNetError) else f"{type(exc).__name__}: {exc}"
            write_json(job_dir / "failed.json", {**spec, "status": "failed", "error": error})
            print(f"{tag}: {error}", file=sys.stderr, flush=True)
            continue
        result = read_json(job_dir / "result.json") or {}
        print(f"{tag}: mean Dice {result['score']['mean_dice']}, {result.get('steps_done')} steps "
              f"({time.monotonic() - t:.0f} s)", file=sys.stderr, flush=True)
        print(_table(a.out, header), flush=True)
    print(_table(a.out, header))
    print(f"done in {(time.monotonic() - start) / 60:.1f} min; table {a.out / 'table.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
