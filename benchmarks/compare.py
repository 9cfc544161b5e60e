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
import fnmatch
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from _dataset import make_dataset
from _files import fingerprint, read_json, write_json, write_section
from _machine import machine_info
from _options import merge_settings
from _schedule import split_steps
from _scoring import spread

from crossmodalnet.config import CROSSMODALNET_SIZES, ModelConfig, TrainConfig, to_dict
from crossmodalnet.data.io import atomic_path
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models.baselines import BASELINE_SIZES
from crossmodalnet.models.registry import MODEL_NAMES

HARNESS = Path(__file__).with_name("_harness.py")
# Part of every job's identity: bump it when a change of the harness changes what a job measures,
# so that cached results made the old way are not reused.
PROTOCOL = 2
CMN = "crossmodalnet"


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers (and the work folder they live in)."""

    work: Path = Path("runs/benchmark")
    models: tuple[str, ...] = MODEL_NAMES
    model_size: str = "small"
    cases: int = 30  # split 70/10/20 by the phantom: 21 training, 3 validation, 6 test
    edge: int = 64
    patch: int = 64  # training patch = sliding-window roi; 64³ batch 2 is the reference step
    batch_size: int = 2
    seed: int = 0
    minutes: float = 8.0
    steps: int = 150
    steps_cap_minutes: float = 24.0
    tables: tuple[str, ...] = ("budget", "steps")
    ablations: bool = False
    robustness: bool = False
    dropout: float = 0.3
    misalign: float = 0.5  # TrainConfig.misalign_prob of the misregistration-augmented robustness runs
    train_seed: int | None = None  # seed of the trainings (patches, init); None: `seed` (the data's)
    magnitudes: tuple[float, ...] = (0, 2, 4, 8)
    validations: int = 12  # whole-volume validations per run (one per epoch)
    latency_runs: int = 5
    quick: bool = False


QUICK = dict(work=Path("runs/benchmark-quick"), models=(CMN, "unet"), model_size="tiny", cases=8, edge=32,
             patch=32, minutes=1 / 3, steps=10, steps_cap_minutes=1.0, validations=3, latency_runs=2)


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def _train_job(s: Settings, key: str, group: str, label: str, model: ModelConfig, budget: bool,
               **train_overrides: Any) -> dict[str, Any]:
    """Spec of one training job; equal budget (schedule sized in the worker) or exactly `s.steps` steps."""
    if budget:
        epochs, ipe, minutes = 1, 1, s.minutes  # epochs and iterations filled in by the worker's probe
    else:
        (epochs, ipe), minutes = split_steps(s.steps, s.validations), s.steps_cap_minutes
    seed = s.seed if s.train_seed is None else s.train_seed
    config = TrainConfig(model=model, seed=seed, epochs=epochs, iterations_per_epoch=ipe, max_minutes=minutes,
                         batch_size=s.batch_size, patch_size=(s.patch,) * 3, val_every=1, warmup_epochs=1,
                         device="cpu", **train_overrides)
    return {"key": key, "kind": "train", "group": group, "label": label, "model": model.name,
            "config": to_dict(config), "budget_s": 60 * s.minutes if budget else None,
            "validations": s.validations, "edge": s.edge, "latency_runs": s.latency_runs,
            "dataset": [s.cases, s.edge, s.seed]}


def _model(s: Settings, name: str, **overrides: Any) -> ModelConfig:
    # img_size: UNETR's absolute position embedding is made for the sliding-window roi.
    return ModelConfig.from_size(name, s.model_size, img_size=s.patch, **overrides)


# The ablations that switch what is meant to handle misregistration; each is also scored under it.
ALIGNMENT_FIELDS = frozenset({"cross_blocks", "cross_first_stage", "deformable", "fine_skips"})


def _ablations(s: Settings) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(key, label, model overrides, train overrides): each flips one default of CrossModalNet."""
    m, t = ModelConfig.from_size(CMN, s.model_size), TrainConfig()
    other = "paper" if m.cross_attention == "standard" else "standard"
    on_off = {True: "on", False: "off"}
    fine = "both" if m.fine_skips == "reference" else "reference"
    return [
        (f"ablation-attention-{other}", f"cross attention `{other}`", {"cross_attention": other}, {}),
        (f"ablation-deformable-{on_off[not m.deformable]}", f"deformable {on_off[not m.deformable]}",
         {"deformable": not m.deformable}, {}),
        (f"ablation-cross-blocks-{on_off[not m.cross_blocks]}",
         "no Cross Transformer blocks (fusion in the decoder only)" if m.cross_blocks else "Cross Transformer blocks",
         {"cross_blocks": not m.cross_blocks}, {}),
        (f"ablation-balancing-{on_off[not t.loss_balancing]}", f"loss balancing {on_off[not t.loss_balancing]}",
         {}, {"loss_balancing": not t.loss_balancing}),
        (f"ablation-fine-skips-{fine}", f"fine skips `{fine}`", {"fine_skips": fine}, {}),
        *([("ablation-cross-from-stage-2", "Cross Transformer blocks from stage 2 on (none at the finest tokens)",
            {"cross_first_stage": 1}, {})] if m.cross_blocks and m.cross_first_stage == 0 else []),
        *([("ablation-cross-every-stage", "Cross Transformer blocks after every stage (the paper's)",
            {"cross_first_stage": 0}, {})] if m.cross_blocks and m.cross_first_stage > 0 else []),
    ]


def plan(s: Settings) -> list[dict[str, Any]]:
    """Every job of the requested tables, training jobs before the evaluations that reuse their runs."""
    jobs: list[dict[str, Any]] = []
    need_budget = "budget" in s.tables or s.robustness
    budget_models = s.models if need_budget else ()
    if s.ablations and CMN not in budget_models:
        budget_models = (*budget_models, CMN)  # the ablations' reference row
    for name in budget_models:
        jobs.append(_train_job(s, f"budget-{name}", "budget", name, _model(s, name), budget=True))
    if "steps" in s.tables:
        for name in s.models:
            jobs.append(_train_job(s, f"steps-{name}", "steps", name, _model(s, name), budget=False))
    if s.ablations:
        for key, label, mo, to in _ablations(s):
            jobs.append(_train_job(s, key, "ablation", label, _model(s, CMN, **mo), budget=True, **to))
    if s.robustness:
        jobs.append(_train_job(s, f"dropout-{CMN}", "dropout", f"{CMN}, modality dropout {s.dropout:g}",
                               _model(s, CMN, modality_dropout=s.dropout), budget=True))
        for name in s.models:
            jobs.append({"key": f"misregistration-{name}", "kind": "misregistration", "label": name,
                         "source": f"budget-{name}", "seed": s.seed, "magnitudes": list(s.magnitudes)})
        # Does training with a modality missing at times also make the model lean less on a shifted MR?
        jobs.append({"key": f"misregistration-dropout-{CMN}", "kind": "misregistration",
                     "label": f"{CMN}, modality dropout {s.dropout:g}", "source": f"dropout-{CMN}", "seed": s.seed,
                     "magnitudes": list(s.magnitudes)})
        # What the mechanisms meant for misregistration (the Cross Transformer blocks, the deformable
        # operator, reference-only fine skips) buy under it: the ablations that switch them are scored too.
        for key, label, mo, _ in _ablations(s) if s.ablations else []:
            if ALIGNMENT_FIELDS & set(mo):
                jobs.append({"key": f"misregistration-{key}", "kind": "misregistration", "label": f"{CMN}, {label}",
                             "source": key, "seed": s.seed, "magnitudes": list(s.magnitudes)})
        # Training with the MR displaced at random (registration error, `misalign_prob`): CrossModalNet
        # and the early-fusion U-Net, the same budget, then the same test-time misregistration.
        for name in [n for n in (CMN, "unet") if n in s.models]:
            jobs.append(_train_job(s, f"misalign-{name}", "misalign", f"{name}, MR misalignment {s.misalign:g}",
                                   _model(s, name), budget=True, misalign_prob=s.misalign))
            jobs.append({"key": f"misregistration-misalign-{name}", "kind": "misregistration",
                         "label": f"{name}, trained with MR misalignment {s.misalign:g}",
                         "source": f"misalign-{name}", "seed": s.seed, "magnitudes": list(s.magnitudes)})
        for src in (f"dropout-{CMN}", f"budget-{CMN}"):
            jobs.append({"key": f"missing-{src}", "kind": "missing", "label": src, "source": src})
    by_key = {j["key"]: j for j in jobs}
    for job in jobs:  # a job's identity includes its source's, so retraining invalidates the evaluation
        job["protocol"] = PROTOCOL
        if "source" in job:
            job["source_fingerprint"] = by_key[job["source"]]["fingerprint"]
        job["fingerprint"] = fingerprint(job)
        job["work"] = str(s.work.resolve())
    return jobs


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run_jobs(jobs: list[dict[str, Any]], work: Path, fresh: bool, dry_run: bool,
             report_only: bool = False, only: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run (or reuse) every job in order, each in a subprocess; returns {key: result}.

    report_only: reuse what is finished and run nothing (the tables mark the rest as not run).
    only: shell patterns of job keys; the other jobs are treated as with report_only, so that
    two processes can share one work folder (e.g. trainings in one, evaluations in the other).
    """
    results: dict[str, dict[str, Any]] = {}
    for n, job in enumerate(jobs, 1):
        key, tag = job["key"], f"[{n}/{len(jobs)}] {job['key']}"
        cached = read_json(work / "results" / f"{key}.json")
        if not fresh and cached and cached.get("status") == "ok" and cached.get("fingerprint") == job["fingerprint"]:
            results[key] = cached
            print(f"{tag}: reused {work / 'results' / (key + '.json')}", file=sys.stderr)
            continue
        if dry_run:
            print(f"{tag}: would run", file=sys.stderr)
            continue
        if report_only or (only and not any(fnmatch.fnmatchcase(key, pat) for pat in only)):
            results[key] = {"key": key, "status": "not run"}
            continue
        if "source" in job and results.get(job["source"], {}).get("status") != "ok":
            results[key] = {"key": key, "status": "skipped", "error": f"{job['source']} did not finish"}
            print(f"{tag}: skipped ({job['source']} did not finish)", file=sys.stderr)
            continue
        results[key] = _run_one(job, work, tag)
    return results


def _run_one(job: dict[str, Any], work: Path, tag: str) -> dict[str, Any]:
    key = job["key"]
    if job["kind"] == "train":  # an interrupted run restarts whole: resuming would grant a second budget
        for part in ("runs", "predictions", "evaluation"):
            if (work / part / key).exists():
                shutil.rmtree(work / part / key)
    job_path = write_json(work / "jobs" / f"{key}.json", job)
    log = work / "logs" / f"{key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    limit = (job["config"]["max_minutes"] * 60 if job["kind"] == "train" else 0) + 1800
    print(f"{tag}: running (log {log})", file=sys.stderr, flush=True)
    start = time.monotonic()
    with open(log, "w") as fh:
        try:
            # Progress bars every 10 s, not every step: the log stays readable.
            env = {**os.environ, "TQDM_MININTERVAL": "10"}
            subprocess.run([sys.executable, str(HARNESS), str(job_path)], stdout=fh, stderr=subprocess.STDOUT,
                           timeout=limit, check=False, env=env)
        except subprocess.TimeoutExpired:
            pass  # no result file: reported below as a failure
    result = read_json(work / "results" / f"{key}.json")
    if not result or result.get("fingerprint") != job["fingerprint"]:
        tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
        result = {"key": key, "status": "failed", "error": (tail[0] if tail else "no result")[:300]}
    took = time.monotonic() - start
    if result["status"] == "ok" and "test" in result:
        what = f"test Dice {_num(result['test']['mean_dice'])}, {result['steps_done']} steps"
    else:
        what = result["status"] + (f": {result['error']}" if "error" in result else "")
    print(f"{tag}: {what} ({took:.0f} s)", file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _duration(minutes: float) -> str:
    return f"{60 * minutes:.0f} s" if minutes < 1 else f"{minutes:g} min"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(sp: dict[str, Any], digits: int = 3) -> str:
    return "n/a" if sp.get("mean") is None else f"{sp['mean']:.{digits}f} ± {sp['std']:.{digits}f}"


def _paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Spread over test cases of per-case Dice differences a - b (same cases, so paired)."""
    cases = [c for c in a["test"]["per_case"] if c in b["test"]["per_case"]]
    return spread([a["test"]["per_case"][c]["dice"] - b["test"]["per_case"][c]["dice"] for c in cases
                     if a["test"]["per_case"][c]["dice"] is not None and b["test"]["per_case"][c]["dice"] is not None])


def _ok(results: dict[str, dict[str, Any]], key: str) -> dict[str, Any] | None:
    r = results.get(key)
    return r if r and r.get("status") == "ok" else None


def main_table(jobs: list[dict[str, Any]], results: dict[str, dict[str, Any]], group: str, edge: int) -> str:
    """Markdown: one row per model of `group` ("budget" or "steps"), best mean test Dice first."""
    head = ("| model | size | params (M) | GFLOPs at {e}³ | steps | s/step with validation | test Dice (mean ± sd) | "
            "Dice IQR | MIoU ± sd | HD95 mm ± sd | latency s/volume | peak memory MiB | checkpoint: val Dice @ step |")
    lines = [head.format(e=edge), "|---|---|" + "---:|" * 11]
    mine = [j for j in jobs if j.get("group") == group]
    done = sorted((j for j in mine if _ok(results, j["key"])),
                  key=lambda j: -(results[j["key"]]["test"]["mean_dice"] or -1))
    for j in done:
        r = results[j["key"]]
        t = r["test"]
        steps = str(r["steps_done"]) if r["fits"] else f"{r['steps_done']}/{r['steps_target']} (cap)"
        if group == "budget" and not r.get("budget_bound", True):
            steps += " (schedule ended before the budget)"
        flops = _num(r["gflops"], 1) + ("" if r["flops_edge"] == edge else f" (at {r['flops_edge']}³)")
        iqr = "n/a" if t["dice_spread"]["q1"] is None else f"{t['dice_spread']['q1']:.3f}–{t['dice_spread']['q3']:.3f}"
        lines.append(
            f"| {j['label']} | {j['config']['model']['size']} | {r['params'] / 1e6:.2f} | {flops} | {steps} | "
            f"{r['s_per_step']:.2f} | {_pm(t['dice_spread'])} | {iqr} | {_pm(t['iou_spread'])} | "
            f"{_pm(t['hd95_spread'], 1)} | {r['latency']['median_s']:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{_num(r['best_val_dice'])} @ {r['best_step']} |")
    for j in mine:
        if not _ok(results, j["key"]):
            r = results.get(j["key"], {"status": "not run"})
            lines.append(f"| {j['label']} | {r['status']}: {r.get('error', '')} |" + " |" * 11)
    return "\n".join(lines)


def findings(jobs: list[dict[str, Any]], results: dict[str, dict[str, Any]], group: str) -> str:
    """Where CrossModalNet stands in `group`: rank, and its paired margin over the best other model."""
    rows = [(j, results[j["key"]]) for j in jobs if j.get("group") == group and _ok(results, j["key"])
            and results[j["key"]]["fits"]]
    if not rows:
        return ""
    rows.sort(key=lambda x: -(x[1]["test"]["mean_dice"] or -1))
    text = f"Best mean test Dice: {rows[0][0]['label']} ({_num(rows[0][1]['test']['mean_dice'])})."
    cmn = next(((j, r) for j, r in rows if j["model"] == CMN), None)
    others = [(j, r) for j, r in rows if j["model"] != CMN]
    if cmn and others:
        rank = [j["model"] for j, _ in rows].index(CMN) + 1
        d = _paired(cmn[1], others[0][1])
        text += (f" CrossModalNet ranks {rank} of {len(rows)}; against the best other model ({others[0][0]['label']}) "
                 f"its per-case Dice difference is {_pm(d)} (mean ± sd over {d['n']} test cases).")
    return text


def ablation_table(jobs: list[dict[str, Any]], results: dict[str, dict[str, Any]]) -> str:
    """Markdown: the default CrossModalNet, then each single change with its paired Dice difference."""
    ref = _ok(results, f"budget-{CMN}")
    lines = ["| variant | steps | s/step with validation | test Dice (mean ± sd) | "
             "Δ Dice vs default (paired, mean ± sd) | MIoU | HD95 mm |", "|---|---:|---:|---:|---:|---:|---:|"]
    rows = [("default (as configured)", ref)] if ref else []
    rows += [(j["label"], _ok(results, j["key"])) for j in jobs if j.get("group") == "ablation"]
    for label, r in rows:
        if r is None:
            lines.append(f"| {label} | failed or not run | | | | | |")
            continue
        delta = "—" if r is ref or ref is None else _pm(_paired(r, ref))
        lines.append(f"| {label} | {r['steps_done']} | {r['s_per_step']:.2f} | {_pm(r['test']['dice_spread'])} | "
                     f"{delta} | {_num(r['test']['miou'])} | {_num(r['test']['mean_hd95'], 1)} |")
    return "\n".join(lines)


def _conditions(s: Settings) -> list[str]:
    return ["none"] + [f"{mode}_{m:g}" for mode in ("shift", "warp") for m in s.magnitudes if m != 0]


def misregistration_table(s: Settings, results: dict[str, dict[str, Any]]) -> str:
    """Markdown: mean test Dice per model under each MR perturbation, and the loss at 4 voxels."""
    conds = _conditions(s)
    lines = ["| model | " + " | ".join(c.replace("_", " ") for c in conds) + " | loss at shift 4 | loss at warp 4 |",
             "|---|" + "---:|" * (len(conds) + 2)]
    rows = [(name, f"misregistration-{name}") for name in s.models]
    rows.append((f"{CMN}, modality dropout {s.dropout:g}", f"misregistration-dropout-{CMN}"))
    switched = [(key, label) for key, label, mo, _ in _ablations(s)
                if ALIGNMENT_FIELDS & set(mo)]
    rows += [(f"{CMN}, {label}", f"misregistration-{key}") for key, label in (switched if s.ablations else [])]
    rows += [(f"{n}, trained with MR misalignment {s.misalign:g}", f"misregistration-misalign-{n}")
             for n in (CMN, "unet") if n in s.models]
    for name, key in rows:
        r = _ok(results, key)
        if r is None:
            lines.append(f"| {name} | not available |" + " |" * (len(conds) + 1))
            continue
        c = r["conditions"]
        cells = [_num(c[k]["mean_dice"]) if k in c else "n/a" for k in conds]
        losses = [_num(c["none"]["mean_dice"] - c[k]["mean_dice"]) if k in c else "n/a" for k in ("shift_4", "warp_4")]
        lines.append(f"| {name} | " + " | ".join(cells + losses) + " |")
    text = "\n".join(lines)
    pairs = [("", f"misregistration-{CMN}", [(n, f"misregistration-{n}") for n in s.models if n != CMN]),
             (f" (both trained with MR misalignment {s.misalign:g})", f"misregistration-misalign-{CMN}",
              [("unet", "misregistration-misalign-unet")])]
    for trained, cmn_key, base_keys in pairs:
        cmn = _ok(results, cmn_key)
        base = [(n, r) for n, r in ((n, _ok(results, k)) for n, k in base_keys) if r]
        if not (cmn and base):
            continue
        best, br = max(base, key=lambda x: x[1]["conditions"]["none"]["mean_dice"])
        for mode in ("shift", "warp"):
            k = f"{mode}_4"
            if k in cmn["conditions"] and k in br["conditions"]:
                a = cmn["conditions"]["none"]["mean_dice"] - cmn["conditions"][k]["mean_dice"]
                b = br["conditions"]["none"]["mean_dice"] - br["conditions"][k]["mean_dice"]
                ratio = "n/a (the baseline loses nothing)" if b <= 0 else f"{a / b:.2f}"
                text += (f"\n\nAt a 4-voxel {mode}{trained}, CrossModalNet loses {a:.3f} Dice; the best early-fusion "
                         f"baseline without misregistration ({best}) loses {b:.3f}; ratio {ratio} (goal: at most 0.5).")
    return text


def missing_table(s: Settings, results: dict[str, dict[str, Any]]) -> str:
    """Markdown: mean test Dice with both modalities, CT only, MR only, and the drop of each."""
    lines = ["| model | both | CT only | MR only | drop, CT only | drop, MR only |", "|---|---:|---:|---:|---:|---:|"]
    for src in (f"dropout-{CMN}", f"budget-{CMN}"):
        r = _ok(results, f"missing-{src}")
        if r is None:
            lines.append(f"| {src} | not available | | | | |")
            continue
        c = {k: v["mean_dice"] for k, v in r["conditions"].items()}
        label = f"CrossModalNet, modality dropout {r['modality_dropout']:g}"
        if not r["supports_missing_modality"]:
            label += " (not trained for a missing modality; for reference)"
        lines.append(f"| {label} | {_num(c['both'])} | {_num(c['ct_only'])} | {_num(c['mr_only'])} | "
                     f"{_num(c['both'] - c['ct_only'])} | {_num(c['both'] - c['mr_only'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots and the report
# ---------------------------------------------------------------------------------------------


def plot_dice(jobs: list[dict[str, Any]], results: dict[str, dict[str, Any]], groups: list[tuple[str, str]],
              path: Path) -> Path | None:
    """Per-case test Dice (points) and the mean (bar) per model, one panel per table; PNG via Agg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(title, [(j["label"], results[j["key"]]) for j in jobs if j.get("group") == g and _ok(results, j["key"])])
              for g, title in groups]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig = Figure(figsize=(max(6.0, 1.1 * max(len(p[1]) for p in panels) + 2), 3.6 * len(panels)))
    FigureCanvasAgg(fig)
    rng = np.random.default_rng(0)  # fixed jitter: same results, same picture
    for ax, (title, rows) in zip(np.atleast_1d(fig.subplots(len(panels), 1)), panels, strict=True):
        for x, (_, r) in enumerate(rows):
            dice = [v["dice"] for v in r["test"]["per_case"].values() if v["dice"] is not None]
            ax.scatter(x + rng.uniform(-0.12, 0.12, len(dice)), dice, s=14, color="tab:blue", zorder=3)
            ax.hlines(r["test"]["mean_dice"] or 0.0, x - 0.3, x + 0.3, color="black", linewidth=2)
        ax.set_xticks(range(len(rows)), [label for label, _ in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("test Dice")
        ax.set_title(f"{title} — dots: test cases; bar: mean Dice", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path


def plot_misregistration(s: Settings, results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Mean test Dice against the MR perturbation magnitude: solid shift, dashed warp."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [(n, _ok(results, f"misregistration-{n}")) for n in s.models]
    runs = [(n, r) for n, r in runs if r]
    if not runs:
        return None
    fig = Figure(figsize=(6.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (name, r) in enumerate(runs):
        for mode, style in (("shift", "-"), ("warp", "--")):
            c = r["conditions"]
            ys = [c["none"]["mean_dice"] if m == 0 else c[f"{mode}_{m:g}"]["mean_dice"] for m in s.magnitudes]
            ax.plot(s.magnitudes, ys, style, marker="o", color=f"C{i}", label=f"{name} ({mode})")
    ax.set_xlabel("MR misregistration (voxels)")
    ax.set_ylabel("mean test Dice")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path


def report(s: Settings, dataset: dict[str, Any], machine: dict[str, Any], command: str, jobs: list[dict[str, Any]],
           results: dict[str, dict[str, Any]], images: dict[str, str]) -> str:
    """The markdown section: protocol, machine, tables and computed findings."""
    loads = [x for r in results.values() for x in r.get("loadavg", [])]
    sp = dataset["splits"]
    parts = ["## Accuracy: CrossModalNet against the baselines (CPU)", ""]
    if s.quick:
        parts += ["**Smoke run (`--quick`): tiny models, seconds of training; the numbers say nothing about the "
                  "models.**", ""]
    parts += [
        f"Command: `{command}`. Seed {s.seed}. Machine: {machine['cpu']} ({machine['arch']}), {machine['cores']} "
        f"cores, torch {machine['torch']} with {machine['torch_threads']} threads; 1-minute load average "
        f"{min(loads, default=0):.1f}–{max(loads, default=0):.1f} during the jobs (above the thread count means "
        "other work shared the CPU).",
        "",
        f"Data: {s.cases} synthetic CT/MR phantoms of {s.edge}³ (source domain, seed {s.seed}), split "
        f"{sp['training']} training / {sp['validation']} validation / {sp['test']} test. Training: the project's "
        f"trainer, {s.patch}³ patches, batch {s.batch_size}, its default optimiser and loss; the checkpoint is the "
        "best validation mean Dice (validated once per epoch); the test cases are only scored. Metrics: the "
        "project's evaluator (HD95 in mm, MONAI convention); ± is the sd over test cases, IQR of per-case mean "
        "Dice. Latency: median whole-volume prediction (preprocessing, sliding window, restore). Peak memory: max "
        "RSS of the process that trained and evaluated the model.",
    ]
    if any(j.get("group") == "budget" for j in jobs):  # also when only the robustness studies needed them
        parts += ["", f"### (a) Equal CPU time budget: {_duration(s.minutes)} of training per model", "",
                  "The budget includes validation. The schedule is sized from a measured step and inference "
                  "time: validations (one per epoch) get at most a tenth of the budget, and the budget stops "
                  "training near the end of the cosine decay.", "", main_table(jobs, results, "budget", s.edge), "",
                  findings(jobs, results, "budget")]
    if "steps" in s.tables:
        parts += ["", f"### (b) Equal optimizer steps: {s.steps} per model (cap {_duration(s.steps_cap_minutes)})", "",
                  main_table(jobs, results, "steps", s.edge), "", findings(jobs, results, "steps")]
    if "dice" in images:
        parts += ["", f"![test Dice per model and case]({images['dice']})"]
    if s.ablations:
        parts += ["", f"### Ablations of CrossModalNet (same {_duration(s.minutes)} budget)", "",
                  ablation_table(jobs, results)]
    if s.robustness:
        mags = ", ".join(f"{m:g}" for m in s.magnitudes)
        parts += ["", f"### Robustness: MR misregistered against the CT at test time ({mags} voxels)", "",
                  "Mean test Dice of the equal-budget runs. shift: the MR translated by the magnitude along a "
                  "direction drawn per case; warp: a smooth random displacement field (4³ control lattice, cubic) of "
                  "that mean magnitude. Same perturbation of each case for every model.", "",
                  misregistration_table(s, results)]
        if "misregistration" in images:
            parts += ["", f"![Dice against misregistration]({images['misregistration']})"]
        parts += ["", f"### Robustness: a missing modality (same {_duration(s.minutes)} budget)", "",
                  missing_table(s, results)]
    return "\n".join(parts).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _settings(a: argparse.Namespace) -> Settings:
    values = merge_settings(Settings(), a, QUICK)
    if a.tables is not None:
        values["tables"] = ("budget", "steps") if a.tables == "both" else (a.tables,)
    if a.patch is None:
        values["patch"] = values["edge"]
    values["magnitudes"] = tuple(sorted({0, *values["magnitudes"]}))  # 0: the unperturbed reference
    s = replace(Settings(), **values)
    for name in s.models:
        sizes = CROSSMODALNET_SIZES if name == CMN else BASELINE_SIZES.get(name)
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
