"""Repeated draws of the equal-budget comparison: one model against another over several work folders.

    .venv/bin/python benchmarks/draws.py runs/benchmark-8min runs/benchmark-8min-seed1 ...
    .venv/bin/python benchmarks/draws.py runs/benchmark-8min* --write docs/benchmarks.md

One `compare.py` run is one draw: one phantom dataset (its data seed) and one training seed. With
six test cases and a CPU whose speed drifts by about a tenth between sessions (a budget run's step
count moves with it), a margin of a few thousandths in one draw is within its noise, so the claim
"A is ahead of B at equal budget" is read off several draws made the same way: another training
seed (`--train-seed`) or other phantoms (`--seed`). This script reads the finished `budget-*`
results of each folder (it runs nothing) and prints, per draw, test and validation mean Dice of both
models, their steps, and the paired per-case difference; then the mean over draws and how many
draws each model leads on test and on validation Dice (validation chose the checkpoints; test only
reports). Where the folder also has both models' misregistration results (`--robustness`), the
Dice each loses with the MR shifted by 4 voxels against the CT at test time, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _files import read_json, write_section  # noqa: E402

from crossmodalnet.errors import CrossModalNetError  # noqa: E402

# Differences below this read as level: the tables print three decimals, and a test set of six
# cases cannot tell them apart.
LEVEL = 5e-4
SHIFT = "shift_4"  # the misregistration: the MR translated by 4 voxels at test time


def read_draw(work: Path, model: str, against: str) -> dict[str, Any]:
    """Both models' budget results of one work folder, and their paired per-case test Dice difference."""
    out: dict[str, Any] = {"work": str(work)}
    for role, name in (("model", model), ("against", against)):
        result = read_json(work / "results" / f"budget-{name}.json")
        job = read_json(work / "jobs" / f"budget-{name}.json")
        if not result or result.get("status") != "ok" or not job:
            raise CrossModalNetError(f"{work}: no finished budget-{name} result (run compare.py there first)")
        out[role] = result
        out[f"{role}_job"] = job
    seeds = {(j["dataset"][2], j["config"]["seed"]) for j in (out["model_job"], out["against_job"])}
    if len(seeds) != 1:
        raise CrossModalNetError(f"{work}: budget-{model} and budget-{against} were not made with the same seeds")
    out["data_seed"], out["train_seed"] = seeds.pop()
    a, b = out["model"]["test"]["per_case"], out["against"]["test"]["per_case"]
    if set(a) != set(b):
        raise CrossModalNetError(f"{work}: the two models were scored on different test cases")
    out["delta"] = [a[c]["dice"] - b[c]["dice"] for c in sorted(a)]
    losses = []
    for name in (model, against):
        r = read_json(work / "results" / f"misregistration-{name}.json")
        cond = r.get("conditions", {}) if r and r.get("status") == "ok" else {}
        if "none" in cond and SHIFT in cond:
            losses.append(cond["none"]["mean_dice"] - cond[SHIFT]["mean_dice"])
    out["shift_loss"] = tuple(losses) if len(losses) == 2 else None  # (model, against)
    return out


def table(draws: list[dict[str, Any]], model: str, against: str) -> str:
    """Markdown: one row per draw, then the mean over draws and the count of draws each model leads."""
    lines = [
        f"| data seed | training seed | {against} test Dice (val) | {model} test Dice (val) | steps "
        f"({against} / {model}) | paired per-case Δ test Dice (mean ± sd) | Dice lost at shift 4 "
        f"({against} / {model}, ratio) | work folder |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for d in draws:
        m, b = d["model"], d["against"]
        sd = statistics.stdev(d["delta"]) if len(d["delta"]) > 1 else 0.0
        shift = "not run"
        if d["shift_loss"]:
            lm, la = d["shift_loss"]
            shift = f"{la:.4f} / {lm:.4f}, {lm / la:.2f}" if la > 0 else f"{la:.4f} / {lm:.4f}"
        lines.append(
            f"| {d['data_seed']} | {d['train_seed']} | {b['test']['mean_dice']:.4f} ({b['best_val_dice']:.4f}) | "
            f"{m['test']['mean_dice']:.4f} ({m['best_val_dice']:.4f}) | {b['steps_done']} / {m['steps_done']} | "
            f"{statistics.fmean(d['delta']):+.4f} ± {sd:.4f} | {shift} | `{d['work']}` |")
    test = [d["model"]["test"]["mean_dice"] - d["against"]["test"]["mean_dice"] for d in draws]
    val = [d["model"]["best_val_dice"] - d["against"]["best_val_dice"] for d in draws]

    def mean(role: str, field: str) -> float:
        return statistics.fmean(d[role]["test"]["mean_dice"] if field == "test" else d[role]["best_val_dice"]
                                for d in draws)

    lines.append(f"| mean of {len(draws)} | | {mean('against', 'test'):.4f} ({mean('against', 'val'):.4f}) | "
                 f"{mean('model', 'test'):.4f} ({mean('model', 'val'):.4f}) | | | | |")
    spread = f" ± {statistics.stdev(test):.4f} (sd over draws)" if len(test) > 1 else ""

    def count(diffs: list[float]) -> str:
        ahead, behind = sum(x >= LEVEL for x in diffs), sum(x <= -LEVEL for x in diffs)
        return f"ahead in {ahead}, behind in {behind}, level (within {LEVEL}) in {len(diffs) - ahead - behind}"

    lines += [
        "",
        f"{model} against {against}, over {len(draws)} draws: test mean Dice {statistics.fmean(test):+.4f}{spread}; "
        f"test: {count(test)}; validation: {count(val)}.",
    ]
    shifted = [d["shift_loss"] for d in draws if d["shift_loss"] and d["shift_loss"][1] > 0]
    if shifted:
        ratios = [lm / la for lm, la in shifted]
        lines[-1] += (f" Dice lost at a 4-voxel MR shift, {model} / {against}, in the {len(shifted)} draws with "
                      f"it: ratio {min(ratios):.2f} to {max(ratios):.2f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", nargs="+", type=Path, help="compare.py work folders, one per draw")
    p.add_argument("--model", default="crossmodalnet", help="the model under test (default crossmodalnet)")
    p.add_argument("--against", default="unet", help="the model it is compared with (default unet)")
    p.add_argument("--write", type=Path, help="also replace the `draws` section of this markdown file")
    a = p.parse_args(argv)
    try:
        draws = [read_draw(w, a.model, a.against) for w in a.work]
    except CrossModalNetError as exc:
        sys.exit(f"error: {exc}")
    draws.sort(key=lambda d: (d["data_seed"], d["train_seed"]))
    command = "`.venv/bin/python benchmarks/draws.py " + " ".join(str(w) for w in a.work) + "`"
    text = f"Command: {command} (reads finished `compare.py` results; runs nothing).\n\n"
    text += table(draws, a.model, a.against)
    print(text)
    if a.write:
        write_section(a.write, "draws", text)
        print(f"wrote the section of {a.write}")


if __name__ == "__main__":
    main()
