"""Accuracy benchmark: every registered model trained and tested under one protocol, on one CPU.

    .venv/bin/python benchmarks/compare.py                     # all models, 8 min each, then 150 steps each
    .venv/bin/python benchmarks/compare.py --ablations --robustness --write docs/benchmarks.md
    .venv/bin/python benchmarks/compare.py --quick             # smoke run: tiny models, 32³, minutes

One synthetic dataset (source domain, fixed seed; training / validation / test split by the
phantom) is made once in the work folder. Each model is trained with the project's trainer
(the checkpoint is the best *validation* mean Dice), the test split is predicted with
`infer.predict` and scored with `evaluate.evaluate_paths`. Two protocols, chosen by --tables:
(a) the same CPU time budget for every model (`TrainConfig.max_minutes`; the schedule is sized
from a measured step time so that the budget, not the epoch count, stops training), and (b) the
same number of optimizer steps, within a time cap (a model that cannot finish is marked).
--ablations: CrossModalNet with one design choice flipped at a time, same budget.
--robustness: test-time MR shift / smooth warp against the CT (CrossModalNet vs the early-fusion
baselines, reusing the budget runs), and CT-only / MR-only inference of a CrossModalNet trained
with modality dropout.

Each job (one training, or one robustness evaluation) runs in its own subprocess (`_harness.py`)
so that its peak memory is its own and a failure fails that job only. Results are JSON files in
WORK/results/; a finished job is reused when its spec is unchanged (--fresh redoes it), so a long
benchmark can be run in pieces. Writes WORK/results.json, WORK/dice.png (and misregistration.png),
prints markdown tables, and --write replaces the marked section of a markdown file.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from _dataset import make_dataset
from _files import write_json, write_section
from _machine import machine_info
from _options import merge_settings
from _plan import QUICK, Settings, plan
from _plots import plot_dice, plot_misregistration
from _report import report
from _runner import run_jobs

from crossmodalnet.config import MODEL_SIZES
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models.registry import MODEL_NAMES

# The parts, one idea each (this file is the command line only): _plan.py (settings and job specs),
# _runner.py (cache reuse, one subprocess per job), _harness.py (the worker: _train_job.py,
# _robustness.py), _report.py (tables and the markdown section), _plots.py (figures).


def _settings(a: argparse.Namespace) -> Settings:
    values = merge_settings(Settings(), a, QUICK)
    if a.tables is not None:
        values["tables"] = ("budget", "steps") if a.tables == "both" else (a.tables,)
    if a.patch is None:
        values["patch"] = values["edge"]
    values["magnitudes"] = tuple(sorted({0, *values["magnitudes"]}))  # 0: the unperturbed reference
    s = replace(Settings(), **values)
    for name in s.models:
        sizes = MODEL_SIZES.get(name)
        if sizes is None:
            raise CrossModalNetError(f"--models: unknown model {name!r}; registered: {', '.join(MODEL_NAMES)}")
        if s.model_size not in sizes:
            raise CrossModalNetError(f"--model-size {s.model_size!r} is not a size of {name}; "
                                     f"choose from {sorted(sizes)}")
    if s.patch > s.edge:
        raise CrossModalNetError(f"--patch {s.patch} is larger than the volumes (--edge {s.edge})")
    return s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models, 32³, crossmodalnet + unet, 20 s each")
    p.add_argument("--work", type=Path, help="work folder (default runs/benchmark, quick: runs/benchmark-quick)")
    p.add_argument("--models", nargs="+", help=f"subset of {', '.join(MODEL_NAMES)} (default all)")
    p.add_argument("--model-size", dest="model_size", help="named size of every model (default small)")
    p.add_argument("--cases", type=int, help="phantom cases, split 70/10/20 (default 30)")
    p.add_argument("--edge", type=int, help="volume edge in voxels (default 64)")
    p.add_argument("--patch", type=int, help="training patch and sliding-window edge (default: --edge)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="training batch (default 2)")
    p.add_argument("--seed", type=int, help="seed of the data and the training (default 0)")
    p.add_argument("--minutes", type=float, help="training budget per model, table (a) (default 8)")
    p.add_argument("--steps", type=int, help="optimizer steps per model, table (b) (default 150)")
    p.add_argument("--steps-cap-minutes", dest="steps_cap_minutes", type=float,
                   help="time cap of a table (b) run; slower models are marked as not fitting (default 24)")
    p.add_argument("--tables", choices=("budget", "steps", "both"), help="which main table(s) (default both)")
    p.add_argument("--ablations", action="store_true", default=None, help="CrossModalNet ablations, same budget")
    p.add_argument("--robustness", action="store_true", default=None, help="misregistration and missing modality")
    p.add_argument("--dropout", type=float, help="modality dropout of the missing-modality run (default 0.3)")
    p.add_argument("--train-seed", dest="train_seed", type=int,
                   help="seed of the trainings only (default: --seed): the same data, another draw of the runs")
    p.add_argument("--misalign", type=float,
                   help="MR misalignment probability (TrainConfig.misalign_prob) of the robustness runs that train "
                        "CrossModalNet and the U-Net with a randomly displaced MR (default 0.5)")
    p.add_argument("--magnitudes", type=float, nargs="+", help="misregistration in voxels (default 0 2 4 8)")
    p.add_argument("--validations", type=int, help="whole-volume validations per run (default 12)")
    p.add_argument("--latency-runs", dest="latency_runs", type=int, help="timed predictions per model (default 5)")
    p.add_argument("--fresh", action="store_true", help="redo every job instead of reusing finished results")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="list the jobs and what is cached; run none")
    p.add_argument("--only", nargs="+", metavar="PATTERN",
                   help="run only the jobs whose key matches one of these shell patterns (e.g. 'budget-*' "
                        "'misregistration-unet'); the others are reused if finished, else marked as not run")
    p.add_argument("--report-only", dest="report_only", action="store_true",
                   help="write the tables from the finished jobs; run none (the rest are marked as not run)")
    p.add_argument("--write", type=Path, help="markdown file whose marked section to replace (docs/benchmarks.md)")
    a = p.parse_args(argv)
    # SIGTERM (timeout, a scheduler) becomes SystemExit, so that subprocess.run kills the running job too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        s = _settings(a)
        s.work.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        machine = machine_info()
        dataset = make_dataset(s.work / "data", s.cases, s.edge, s.seed, references={"test": s.work / "references"})
        jobs = plan(s)
        results = run_jobs(jobs, s.work, a.fresh, a.dry_run, a.report_only, a.only)
    except CrossModalNetError as exc:
        sys.exit(f"error: {exc}")
    if a.dry_run:
        return
    command = ".venv/bin/python benchmarks/compare.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    images: dict[str, str] = {}
    groups = [(g, t) for g, t in (("budget", "(a) equal time budget"), ("steps", "(b) equal steps"),
                                  ("ablation", "ablations")) if g in s.tables or (g == "ablation" and s.ablations)]
    made = {"dice": plot_dice(jobs, results, groups, s.work / "dice.png")}
    if s.robustness:
        made["misregistration"] = plot_misregistration(s, results, s.work / "misregistration.png")
    for name, png in made.items():
        if png is None:
            continue
        images[name] = str(png)
        if a.write:  # the figure goes next to the markdown that shows it
            target = a.write.parent / f"{a.write.stem}-compare-{name}.png"
            shutil.copyfile(png, target)
            images[name] = target.name
    text = report(s, dataset, machine, command, jobs, results, images)
    write_json(s.work / "results.json", {"command": command, "settings": asdict(s), "machine": machine,
                                           "dataset": dataset, "jobs": jobs, "results": results})
    print(text)
    if a.write:
        write_section(a.write, "compare", text)
        print(f"wrote the section of {a.write}", file=sys.stderr)
    failed = [k for k, r in results.items() if r.get("status") != "ok"]
    print(f"done in {(time.monotonic() - start) / 60:.1f} min; results {s.work / 'results.json'}"
          + (f"; not ok: {', '.join(failed)}" if failed else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
