"""Domain-adaptation benchmark: source-only, DANN, DANN + CDAN, full JADA and a target oracle on one target test set.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adaptation.py          # 20 + 20 phantoms of 64³, ~45 min, 1 thread
    .venv/bin/python benchmarks/adaptation.py --write docs/benchmarks.md
    .venv/bin/python benchmarks/adaptation.py --quick                    # smoke run: tiny model, 32³, ~1 min
    .venv/bin/python benchmarks/adaptation.py --report-only --write docs/benchmarks.md   # re-render the last run

Two synthetic datasets of the same anatomy generator (fixed seeds; different patients): the
`source` rendering and the `target` rendering (another scanner and protocol; `crossmodalnet synth
--domain target`). Runs, each in WORK/runs/<key>:
- source-only: the project's trainer on the labeled source data (settings of `crossmodalnet.demo.DEMO`:
  deep supervision, batch 2, lr 3e-3, patch 48³, with the model size and time budget of this benchmark;
  checkpoint = best source-validation Dice);
- oracle: the same training on the *labeled target* data (an upper bound nobody has in practice);
- finetune / dann / dann+cdan / jada: `crossmodalnet adapt` from the source-only run with the terms
  none / marginal / marginal,conditional / marginal,conditional,topology, on the unlabeled target
  training + validation images, the same number of steps (and time cap) each, every other setting
  the `AdaptConfig` defaults; final weights. `finetune` is the ablation: the adaptation's recipe
  (schedule, source intensity remapping) without any term, so that the rows after it show what
  the terms themselves add.
Every run predicts the target test split (`infer.predict`) and is scored with
`evaluate.evaluate_paths(..., topology=True)` (Dice, MIoU, HD95, Betti-number errors per dimension);
the source test split is scored too, to show what adaptation costs on the source.

Resumable: each finished run leaves WORK/results/<key>.json with the fingerprint of its settings;
a later call reuses it (unless --fresh) and redoes only what is missing or was made differently
(an unfinished run folder is removed and redone). Prints a markdown table; --write replaces the
section between the adaptation markers of a markdown file.

One file for one idea (this benchmark's rows): its planning, runs, table and command line all read
the same METHODS, VARIANTS and Settings; the parts it shares with compare.py live in `_files.py`,
`_dataset.py`, `_machine.py` and `_options.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from _dataset import make_dataset
from _files import fingerprint as job_fingerprint
from _files import read_json, write_json, write_section
from _machine import machine_info
from _options import merge_settings

from crossmodalnet.config import MODEL_SIZES, AdaptConfig, imply_missing_fields, to_dict
from crossmodalnet.config import replace as replace_config
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.runs import RunFolder

PROTOCOL = 2  # bump when a change here changes what a run measures, so that old results are redone
TARGET_SEED_OFFSET = 1  # the target phantoms are other patients than the source ones
# The code a run depends on: a result made by other code is redone (hashed once, at the start, so that
# edits during a run cannot mislabel it).
PACKAGE = Path(__file__).resolve().parents[1] / "crossmodalnet"
CODE: dict[str, tuple[str, ...]] = {
    "training": ("models", "train/trainer.py", "train/losses.py", "train/data.py", "data/preprocess.py"),
    "adaptation": ("train/adapt.py", "train/domain.py", "train/topoloss.py"),
}


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers."""

    work: Path = Path("runs/adaptation")
    cases: int = 20  # per domain; split 70/10/20 by the phantom (14 / 2 / 4)
    size: int = 64
    seed: int = 0
    model_size: str = "small"
    cross_first_stage: int | None = None  # None: the model size's; the table in docs was measured with 0
    patch: int = 48
    train_minutes: float = 12.0  # budget of each of the two trainings (source-only, oracle)
    adapt_steps: int = 200  # optimizer steps of each adaptation (the DANN ramp and lr annealing span them)
    adapt_minutes: float = 6.0  # time cap of each adaptation
    quick: bool = False


QUICK = dict(work=Path("runs/adaptation-quick"), cases=6, size=32, model_size="tiny", patch=32,
             train_minutes=0.4, adapt_steps=20, adapt_minutes=0.25)

# key -> (label in the table, terms of the adaptation or None for a training, training domain)
METHODS: dict[str, tuple[str, tuple[str, ...] | None, str]] = {
    "source-only": ("source-only", None, "source"),
    # The ablation: `adapt --terms none`, the adaptation's recipe (schedule, source intensity
    # remapping) without any alignment term, so that the table separates what the terms add.
    "finetune": ("source fine-tuning, no terms (ablation)", (), "target"),
    "dann": ("DANN (marginal)", ("marginal",), "target"),
    "dann-cdan": ("DANN + CDAN (marginal, conditional)", ("marginal", "conditional"), "target"),
    "jada": ("JADA (marginal, conditional, topology)", ("marginal", "conditional", "topology"), "target"),
    # The first topology penalty (every bar, both ends), max- and average-pooled to 16^3: kept as
    # ablations of the default ("decision" bars: fragments removed, holes filled; components from the
    # max-pooled, holes from the min-pooled softmax at 24^3), as is the default with average pooling.
    "jada-decision-avg": ("JADA, decision bars average-pooled 24³ (holes of thin walls unseen)",
                          ("marginal", "conditional", "topology"), "target"),
    "jada-all-max": ("JADA, first topology penalty (all bars, max-pooled 16³)",
                     ("marginal", "conditional", "topology"), "target"),
    "jada-all-avg": ("JADA, first topology penalty (all bars, average-pooled 16³)",
                     ("marginal", "conditional", "topology"), "target"),
    # The same two rows with another adaptation seed (patches, dropout, discriminator init): how much
    # of a difference between them is the run's own chance.
    "dann-cdan-seed1": ("DANN + CDAN, adaptation seed 1", ("marginal", "conditional"), "target"),
    "jada-seed1": ("JADA, adaptation seed 1", ("marginal", "conditional", "topology"), "target"),
    "oracle": ("target oracle (supervised on target)", None, "target"),
}
# Rows whose adaptation differs from the `AdaptConfig` defaults (every other row uses the defaults).
VARIANTS: dict[str, dict[str, Any]] = {
    "jada-decision-avg": {"topology_pool": "avg"},
    "dann-cdan-seed1": {"seed": 1},
    "jada-seed1": {"seed": 1},
    "jada-all-max": {"topology_bars": "all", "topology_pool": "max", "topology_size": 16},
    "jada-all-avg": {"topology_bars": "all", "topology_pool": "avg", "topology_size": 16},
}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def make_data(s: Settings, domain: str) -> Path:
    """Synthesize one domain's dataset into WORK/<domain> once; copy its test labels to WORK/references/<domain>
    and its validation labels (the split settings are chosen on) to WORK/references/<domain>-validation."""
    root, refs = s.work / domain, s.work / "references" / domain
    seed = s.seed + (TARGET_SEED_OFFSET if domain == "target" else 0)
    make_dataset(root, s.cases, s.size, seed, domain, min_cases=6,
                   references={"test": refs, "validation": refs.with_name(f"{domain}-validation")})
    return root


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def train_config(s: Settings) -> Any:
    """The demo's training recipe with this benchmark's model size, patch and budget."""
    from crossmodalnet.demo import DEMO

    quick = dict(epochs=4, iterations_per_epoch=5, val_every=2) if s.quick else {}
    config = replace(DEMO, model_size=s.model_size, patch_size=(s.patch,) * 3, minutes=s.train_minutes,
                     device="cpu", **quick).train_config(s.seed)
    if s.cross_first_stage is not None:
        config = replace_config(config, model=replace_config(config.model, cross_first_stage=s.cross_first_stage))
    return config


def adapt_config(s: Settings, terms: tuple[str, ...], **overrides: Any) -> Any:
    per_epoch = min(20, s.adapt_steps)
    settings = dict(terms=terms, epochs=max(1, math.ceil(s.adapt_steps / per_epoch)), iterations_per_epoch=per_epoch,
                    max_minutes=s.adapt_minutes, val_every=0, seed=s.seed, device="cpu")
    return AdaptConfig(**{**settings, **overrides})


def code_digests() -> dict[str, str]:
    """{"training": hash, "adaptation": hash} of the source files in CODE (folders: their .py files)."""
    out = {}
    for part, names in CODE.items():
        digest = hashlib.sha1()
        for name in names:
            path = PACKAGE / name
            for f in sorted(path.glob("*.py")) if path.is_dir() else [path]:
                digest.update(f.relative_to(PACKAGE).as_posix().encode() + b"\0" + f.read_bytes())
        out[part] = digest.hexdigest()[:12]
    return out


def _score(run: Path, data: Path, s: Settings, key: str, domain: str, topology: bool,
           split: str = "test") -> dict[str, Any]:
    """Predict the `split` of `data` with `run` and score it; returns evaluate's summary."""
    from crossmodalnet.data.dataset import read_spec
    from crossmodalnet.evaluate import evaluate_paths
    from crossmodalnet.infer import predict

    name = domain if split == "test" else f"{domain}-{split}"
    pred = s.work / "predictions" / key / name
    if pred.exists():
        shutil.rmtree(pred)
    predict(run, pred, data_dir=data, split=split, device="cpu")
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the final report only
        return evaluate_paths(pred, s.work / "references" / name, s.work / "evaluation" / key / name,
                              spec=read_spec(data), topology=topology, progress=False)


def _selection_scores(folder: Path, data: dict[str, Path], s: Settings, key: str) -> dict[str, Any]:
    """Dice and Betti errors on the target *validation* split: what adaptation settings are chosen on."""
    summary = _score(folder, data["target"], s, key, "target", topology=True, split="validation")
    return {k: summary.get(k) for k in ("mean_dice", "miou", "mean_hd95", "mean_betti_errors", "per_structure")}


def run_method(s: Settings, key: str, data: dict[str, Path], fresh: bool,
               results: dict[str, dict[str, Any]], code: dict[str, str], run: bool = True) -> dict[str, Any] | None:
    """One row of the table: train or adapt (unless a matching finished result exists), then score.
    With run False only a matching finished result is returned (None when there is none)."""
    from crossmodalnet.train.adapt import adapt
    from crossmodalnet.train.trainer import train

    label, terms, domain = METHODS[key]
    config = train_config(s) if terms is None else adapt_config(s, terms, **VARIANTS.get(key, {}))
    spec = {"protocol": PROTOCOL, "key": key, "config": to_dict(config), "code": code["training"],
            "data": {d: read_json(root / "benchmark.json") for d, root in data.items()}}
    if terms is not None:  # an adaptation is only as current as the source-only run it starts from
        if results.get("source-only") is None:
            if not run:
                return None
            raise CrossModalNetError(f"[{key}] needs the source-only run: run it first (--only source-only)")
        spec["from"] = results["source-only"]["fingerprint"]
        spec["adaptation_code"] = code["adaptation"]
    fingerprint = job_fingerprint(spec)
    result_path = s.work / "results" / f"{key}.json"
    old = read_json(result_path)
    if old is not None and old.get("fingerprint") == fingerprint and not fresh:
        print(f"[{key}] finished earlier with these settings: reused ({result_path})", file=sys.stderr)
        if "target_validation" not in old:  # a result from before validation scores were kept: score it now
            old["target_validation"] = _selection_scores(s.work / "runs" / key, data, s, key)
            write_json(result_path, old)
        return old
    if not run:
        return None
    folder = s.work / "runs" / key
    if folder.exists():
        shutil.rmtree(folder)  # unfinished, or made with other settings
    print(f"[{key}] {label}", file=sys.stderr)
    start = time.monotonic()
    if terms is None:
        train(data[domain], folder, config)
        steps = RunFolder(folder).checkpoint_step()
    else:
        adapt(s.work / "runs" / "source-only", data["source"], data["target"], folder, config)
        steps = int(RunFolder(folder).read_summary(RunFolder.ADAPT_SUMMARY)["step"])
    minutes = (time.monotonic() - start) / 60
    target = _score(folder, data["target"], s, key, "target", topology=True)
    source = _score(folder, data["source"], s, key, "source", topology=False)
    result = {"key": key, "label": label, "fingerprint": fingerprint, "spec": spec, "minutes": minutes,
              "steps": steps, "target": target, "source_mean_dice": source["mean_dice"],
              "target_validation": _selection_scores(folder, data, s, key)}
    write_json(result_path, result)
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def table(results: dict[str, dict[str, Any]]) -> str:
    """The markdown table, one row per method, in METHODS order: target test scores, then the target
    validation scores (the split to choose adaptation settings on), then the source test Dice."""
    src, oracle = results.get("source-only"), results.get("oracle")
    lines = ["| method | Dice | MIoU | HD95 (mm) | Betti err. b0 | b1 | b2 | gap closed | val Dice "
             "| val Betti b0/b1/b2 | source Dice | steps | min |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in results.items():
        t = r["target"]
        betti = t.get("mean_betti_errors", {})
        gap = "–"
        if src and oracle and key not in ("source-only", "oracle"):
            lo, hi = src["target"]["mean_dice"], oracle["target"]["mean_dice"]
            if None not in (lo, hi, t["mean_dice"]) and hi - lo > 1e-6:
                gap = f"{100 * (t['mean_dice'] - lo) / (hi - lo):.0f} %"
        v = r.get("target_validation") or {}
        vb = v.get("mean_betti_errors") or {}
        val_betti = "/".join(_num(vb.get(f"betti_error_{d}"), 1) for d in range(3)) if vb else "–"
        lines.append(f"| {r['label']} | {_num(t['mean_dice'])} | {_num(t['miou'])} | {_num(t['mean_hd95'], 2)} | "
                     + " | ".join(_num(betti.get(f"betti_error_{d}"), 2) for d in range(3))
                     + f" | {gap} | {_num(v.get('mean_dice'))} | {val_betti} | {_num(r['source_mean_dice'])} "
                     f"| {r['steps']} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def _reading(results: dict[str, dict[str, Any]]) -> str:
    """What the table says, computed from it (so that a rerun cannot leave a stale sentence behind)."""
    need = ("source-only", "finetune", "dann-cdan", "jada", "oracle")
    if any(k not in results for k in need):
        return ""
    dice = {k: results[k]["target"]["mean_dice"] for k in need}
    val = {k: (results[k].get("target_validation") or {}).get("mean_dice") for k in need}
    lo, hi = dice["source-only"], dice["oracle"]
    gap = {k: 100 * (dice[k] - lo) / (hi - lo) for k in ("finetune", "jada")} if hi - lo > 1e-6 else {}

    def betti(key: str, part: str = "target") -> str:
        b = (results[key].get(part) or {}).get("mean_betti_errors") or {}
        return "/".join(_num(b.get(f"betti_error_{d}"), 2) for d in range(3))

    terms_add = dice["jada"] - dice["finetune"]
    verdict = ("the alignment and topology terms add nothing measurable to the source remapping here"
               if abs(terms_add) < 0.01 else "the terms cost Dice against the source remapping alone here"
               if terms_add < 0 else "the terms add Dice to the source remapping")
    parts = [f"Reading: JADA closes {gap.get('jada', math.nan):.0f} % of the source-only → oracle Dice gap on the "
             f"test split; the no-term ablation (the same recipe with source remapping, no alignment, no topology) "
             f"closes {gap.get('finetune', math.nan):.0f} % (validation Dice: JADA {_num(val['jada'])}, ablation "
             f"{_num(val['finetune'])}), so {verdict} (JADA − ablation: {terms_add:+.3f} test Dice)."]
    parts.append(f"Topology term (JADA vs DANN + CDAN), Betti errors b0/b1/b2: test {betti('dann-cdan')} → "
                 f"{betti('jada')}, validation {betti('dann-cdan', 'target_validation')} → "
                 f"{betti('jada', 'target_validation')}.")
    if "jada-seed1" in results and "dann-cdan-seed1" in results:
        parts.append(f"With adaptation seed 1: test {betti('dann-cdan-seed1')} → {betti('jada-seed1')}, validation "
                     f"{betti('dann-cdan-seed1', 'target_validation')} → {betti('jada-seed1', 'target_validation')} "
                     f"(Dice {_num(results['dann-cdan-seed1']['target']['mean_dice'])} → "
                     f"{_num(results['jada-seed1']['target']['mean_dice'])}).")
    return " ".join(parts)


def _adapt_settings(results: dict[str, dict[str, Any]]) -> str:
    """The settings that decide the adaptation rows, read from the JADA run's saved config."""
    jada = results.get("jada")
    if jada is None:
        return "–"
    c = jada["spec"]["config"]
    return (f"lr {c['lr']:g} (annealed), discriminators lr {c['discriminator_lr']:g}, hidden {c['hidden']}, "
            f"GRL scale {c['grl_scale']:g} (ramp gamma {c['grl_gamma']:g}), aligned encoder stage "
            f"{c['feature_stage']} {'per token' if c['token_level'] else 'globally pooled'}, Def. 4 balancing "
            f"alpha {c['balancing_alpha']:g}, source intensity remapping p {c['source_remap']:g}, target entropy "
            f"weight {c['entropy_weight']:g}, topology on the target softmax {c['topology_pool']}-pooled to "
            f"{c['topology_size']}³, {c.get('topology_bars', 'all')} bars")


def report(s: Settings, results: dict[str, dict[str, Any]], machine: dict[str, Any], command: str,
           splits: dict[str, dict[str, int]]) -> str:
    parts = ["## Domain adaptation: JADA on the target phantoms (CPU)", ""]
    if s.quick:
        parts += ["**Smoke run (`--quick`): tiny model, seconds of training; the numbers say nothing about the "
                  "methods.**", ""]
    sp, tp = splits["source"], splits["target"]
    model = _source_model(results, s)
    parts += [
        f"Command: `OMP_NUM_THREADS={machine['torch_threads']} {command}`. Seed {s.seed}. Machine: {machine['cpu']}, "
        f"{machine['cores']} cores, one or two processes at a time (`--only` splits the rows; every run is "
        f"step-bound, so the load changes its minutes, not its numbers), torch {machine['torch']} with "
        f"{machine['torch_threads']} thread(s) per process.",
        "",
        f"Data: {s.cases} source-domain and {s.cases} target-domain phantoms of {s.size}³ (other patients, other "
        f"rendering: `synth --domain target`), split {sp['training']}/{sp['validation']}/{sp['test']} and "
        f"{tp['training']}/{tp['validation']}/{tp['test']} (training/validation/test). Model: CrossModalNet "
        f"`{s.model_size}` (Cross Transformer blocks from encoder stage {model['cross_first_stage'] + 1} on, "
        f"`cross_first_stage: {model['cross_first_stage']}`, `fine_skips: {model['fine_skips']}`), deep supervision, "
        f"{s.patch}³ patches, the demo's recipe, "
        f"{s.train_minutes:g} min of "
        "training for source-only and for the oracle (checkpoint: best validation Dice of its own domain). "
        f"Adaptations start from the source-only run: {s.adapt_steps} steps (cap {s.adapt_minutes:g} min) on "
        "labeled source and unlabeled target training + validation images, final weights (no target labels "
        f"select anything). Adaptation settings (the `AdaptConfig` defaults): {_adapt_settings(results)}. "
        "Scores on the target test set: mean over the 7 structures of Dice, IoU and HD95 "
        "(MONAI convention), and the mean absolute Betti-number error per dimension (b0 components, b1 "
        "tunnels, b2 cavities; 0 is right). Gap closed: (Dice − source-only) / (oracle − source-only). val Dice, "
        "val Betti: the same on the target *validation* split, the split to choose adaptation settings on "
        "(its labels are read by this benchmark only, never by `adapt`). Source "
        "Dice: the same model on the source test set. min: wall time of the training or adaptation alone "
        f"(all runs together {sum(r['minutes'] for r in results.values()):.0f} min, plus prediction and scoring).",
        "",
        table(results),
        "",
        _reading(results),
    ]
    return "\n".join(parts).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _source_model(results: dict[str, dict[str, Any]], s: Settings) -> dict[str, Any]:
    """ModelConfig fields of the model the source-only run trained (what every row adapts)."""
    done = results.get("source-only")
    if done is None:
        return to_dict(train_config(s).model)
    # A spec made before a field lacks it and meant what a saved run config then meant.
    return imply_missing_fields({"model": dict(done["spec"]["config"]["model"])})["model"]


def _settings(a: argparse.Namespace) -> Settings:
    values = merge_settings(Settings(), a, QUICK)
    s = replace(Settings(), **values)
    if s.model_size not in MODEL_SIZES["crossmodalnet"]:
        raise CrossModalNetError(f"--model-size {s.model_size!r}: choose from {sorted(MODEL_SIZES['crossmodalnet'])}")
    if s.patch > s.size:
        raise CrossModalNetError(f"--patch {s.patch} is larger than the volumes (--size {s.size})")
    if s.cases < 6:
        raise CrossModalNetError(f"--cases {s.cases}: at least 6 per domain (training, validation and test)")
    return s


def _saved_run(s: Settings) -> tuple[Settings, dict[str, dict[str, Any]], str]:
    """Settings, results and command of the last complete run in WORK/results.json (for --report-only)."""
    saved = read_json(s.work / "results.json")
    if saved is None:
        raise CrossModalNetError(f"{s.work / 'results.json'}: not found; run the benchmark first")
    settings = replace(Settings(), **{**saved["settings"], "work": Path(saved["settings"]["work"])})
    code = code_digests()
    for key, r in saved["results"].items():
        part = "training" if METHODS[key][1] is None else "adaptation"
        made = r["spec"].get("code") if part == "training" else r["spec"].get("adaptation_code")
        if made != code[part]:
            print(f"warning: [{key}] was made by other {part} code than the working tree's ({made} != "
                  f"{code[part]})", file=sys.stderr)
    return settings, saved["results"], saved["command"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 6 cases of 32³, ~3 min")
    p.add_argument("--work", type=Path, help="work folder (default runs/adaptation, quick: runs/adaptation-quick)")
    p.add_argument("--cases", type=int, help="phantoms per domain (default 20)")
    p.add_argument("--size", type=int, help="volume edge in voxels (default 64)")
    p.add_argument("--seed", type=int, help="seed of the data, training and adaptation (default 0)")
    p.add_argument("--model-size", dest="model_size", help="tiny | small | base (default small)")
    p.add_argument("--cross-first-stage", dest="cross_first_stage", type=int,
                   help="first encoder stage with a Cross Transformer block (default: the size's; the table "
                        "in docs/benchmarks.md was measured with 0, the small size's default until 2026-11-27)")
    p.add_argument("--patch", type=int, help="training patch and sliding-window edge (default 48)")
    p.add_argument("--train-minutes", dest="train_minutes", type=float,
                   help="budget of the source-only and the oracle training (default 12)")
    p.add_argument("--adapt-steps", dest="adapt_steps", type=int, help="steps of each adaptation (default 200)")
    p.add_argument("--adapt-minutes", dest="adapt_minutes", type=float,
                   help="time cap of each adaptation (default 6)")
    p.add_argument("--fresh", action="store_true", help="redo every run instead of reusing finished ones")
    p.add_argument("--only", nargs="+", choices=list(METHODS), metavar="ROW",
                   help="run just these rows (the others are only read back if finished); two processes "
                        "can share the rows of one work folder, e.g. `--only source-only finetune dann` and, "
                        "once source-only is done, `--only oracle jada`")
    p.add_argument("--write", type=Path, help="markdown file whose adaptation section to replace (docs/benchmarks.md)")
    p.add_argument("--report-only", dest="report_only", action="store_true",
                   help="print (and --write) the table of the last complete run in WORK/results.json; runs nothing")
    a = p.parse_args(argv)
    start = time.monotonic()
    try:
        s = _settings(a)
        if a.report_only:
            s, results, command = _saved_run(s)
            data = {d: s.work / d for d in ("source", "target")}
        else:
            code = code_digests()
            s.work.mkdir(parents=True, exist_ok=True)
            data = {d: make_data(s, d) for d in ("source", "target")}
            results = {}
            for key in METHODS:
                run = a.only is None or key in a.only
                made = run_method(s, key, data, a.fresh and run, results, code, run=run)
                if made is not None:
                    results[key] = made
            command = ".venv/bin/python benchmarks/adaptation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    except CrossModalNetError as exc:
        sys.exit(f"error: {exc}")
    from crossmodalnet.data.dataset import load_dataset

    splits = {d: {k: len(load_dataset(root)[k]) for k in ("training", "validation", "test")}
              for d, root in data.items()}
    text = report(s, results, machine_info(), command, splits)
    complete = all(k in results for k in METHODS)
    if not a.report_only and complete:  # results.json is the last *complete* run (what --report-only shows)
        write_json(s.work / "results.json", {"command": command, "settings": asdict(s), "results": results})
    print(text)
    if a.write and not complete:
        print(f"not written to {a.write}: rows missing ({', '.join(k for k in METHODS if k not in results)})",
              file=sys.stderr)
    elif a.write:
        write_section(a.write, "adaptation", text)
        print(f"wrote the section of {a.write}", file=sys.stderr)
    print(f"done in {(time.monotonic() - start) / 60:.1f} min; results {s.work / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
