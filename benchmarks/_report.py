"""The markdown of `benchmarks/compare.py`: its tables, the computed findings, and the section that holds them.

Every function reads finished results only ({key: result}, results of failed or skipped jobs
shown as such); nothing here runs a job.
"""

from __future__ import annotations

import math
from typing import Any

from _plan import ALIGNMENT_FIELDS, CMN, Settings, ablations
from _scoring import spread

__all__ = ["num", "ok_result", "main_table", "findings", "ablation_table", "misregistration_table",
           "missing_table", "report"]


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _duration(minutes: float) -> str:
    return f"{60 * minutes:.0f} s" if minutes < 1 else f"{minutes:g} min"


def num(x: float | None, digits: int = 3) -> str:
    """`x` with `digits` decimals, "n/a" for None or NaN: how every table and progress line prints a number."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(sp: dict[str, Any], digits: int = 3) -> str:
    return "n/a" if sp.get("mean") is None else f"{sp['mean']:.{digits}f} ± {sp['std']:.{digits}f}"


def _paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Spread over test cases of per-case Dice differences a - b (same cases, so paired)."""
    cases = [c for c in a["test"]["per_case"] if c in b["test"]["per_case"]]
    return spread([a["test"]["per_case"][c]["dice"] - b["test"]["per_case"][c]["dice"] for c in cases
                   if a["test"]["per_case"][c]["dice"] is not None and b["test"]["per_case"][c]["dice"] is not None])


def ok_result(results: dict[str, dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The result of job `key` if it finished ok, else None (failed, skipped, not run or unknown)."""
    r = results.get(key)
    return r if r and r.get("status") == "ok" else None


def main_table(jobs: list[dict[str, Any]], results: dict[str, dict[str, Any]], group: str, edge: int) -> str:
    """Markdown: one row per model of `group` ("budget" or "steps"), best mean test Dice first."""
    head = ("| model | size | params (M) | GFLOPs at {e}³ | steps | s/step with validation | test Dice (mean ± sd) | "
            "Dice IQR | MIoU ± sd | HD95 mm ± sd | latency s/volume | peak memory MiB | checkpoint: val Dice @ step |")
    lines = [head.format(e=edge), "|---|---|" + "---:|" * 11]
    mine = [j for j in jobs if j.get("group") == group]
    done = sorted((j for j in mine if ok_result(results, j["key"])),
                  key=lambda j: -(results[j["key"]]["test"]["mean_dice"] or -1))
    for j in done:
        r = results[j["key"]]
        t = r["test"]
        steps = str(r["steps_done"]) if r["fits"] else f"{r['steps_done']}/{r['steps_target']} (cap)"
        if group == "budget" and not r.get("budget_bound", True):
            steps += " (schedule ended before the budget)"
        flops = num(r["gflops"], 1) + ("" if r["flops_edge"] == edge else f" (at {r['flops_edge']}³)")
        iqr = "n/a" if t["dice_spread"]["q1"] is None else f"{t['dice_spread']['q1']:.3f}–{t['dice_spread']['q3']:.3f}"
        lines.append(
            f"| {j['label']} | {j['config']['model']['size']} | {r['params'] / 1e6:.2f} | {flops} | {steps} | "
            f"{r['s_per_step']:.2f} | {_pm(t['dice_spread'])} | {iqr} | {_pm(t['iou_spread'])} | "
            f"{_pm(t['hd95_spread'], 1)} | {r['latency']['median_s']:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{num(r['best_val_dice'])} @ {r['best_step']} |")
    for j in mine:
        if not ok_result(results, j["key"]):
            r = results.get(j["key"], {"status": "not run"})
            lines.append(f"| {j['label']} | {r['status']}: {r.get('error', '')} |" + " |" * 11)
    return "\n".join(lines)


def findings(jobs: list[dict[str, Any]], results: dict[str, dict[str, Any]], group: str) -> str:
    """Where CrossModalNet stands in `group`: rank, and its paired margin over the best other model."""
    rows = [(j, results[j["key"]]) for j in jobs if j.get("group") == group and ok_result(results, j["key"])
            and results[j["key"]]["fits"]]
    if not rows:
        return ""
    rows.sort(key=lambda x: -(x[1]["test"]["mean_dice"] or -1))
    text = f"Best mean test Dice: {rows[0][0]['label']} ({num(rows[0][1]['test']['mean_dice'])})."
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
    ref = ok_result(results, f"budget-{CMN}")
    lines = ["| variant | steps | s/step with validation | test Dice (mean ± sd) | "
             "Δ Dice vs default (paired, mean ± sd) | MIoU | HD95 mm |", "|---|---:|---:|---:|---:|---:|---:|"]
    rows = [("default (as configured)", ref)] if ref else []
    rows += [(j["label"], ok_result(results, j["key"])) for j in jobs if j.get("group") == "ablation"]
    for label, r in rows:
        if r is None:
            lines.append(f"| {label} | failed or not run | | | | | |")
            continue
        delta = "—" if r is ref or ref is None else _pm(_paired(r, ref))
        lines.append(f"| {label} | {r['steps_done']} | {r['s_per_step']:.2f} | {_pm(r['test']['dice_spread'])} | "
                     f"{delta} | {num(r['test']['miou'])} | {num(r['test']['mean_hd95'], 1)} |")
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
    switched = [(key, label) for key, label, mo, _ in ablations(s)
                if ALIGNMENT_FIELDS & set(mo)]
    rows += [(f"{CMN}, {label}", f"misregistration-{key}") for key, label in (switched if s.ablations else [])]
    rows += [(f"{n}, trained with MR misalignment {s.misalign:g}", f"misregistration-misalign-{n}")
             for n in (CMN, "unet") if n in s.models]
    for name, key in rows:
        r = ok_result(results, key)
        if r is None:
            lines.append(f"| {name} | not available |" + " |" * (len(conds) + 1))
            continue
        c = r["conditions"]
        cells = [num(c[k]["mean_dice"]) if k in c else "n/a" for k in conds]
        losses = [num(c["none"]["mean_dice"] - c[k]["mean_dice"]) if k in c else "n/a" for k in ("shift_4", "warp_4")]
        lines.append(f"| {name} | " + " | ".join(cells + losses) + " |")
    text = "\n".join(lines)
    pairs = [("", f"misregistration-{CMN}", [(n, f"misregistration-{n}") for n in s.models if n != CMN]),
             (f" (both trained with MR misalignment {s.misalign:g})", f"misregistration-misalign-{CMN}",
              [("unet", "misregistration-misalign-unet")])]
    for trained, cmn_key, base_keys in pairs:
        cmn = ok_result(results, cmn_key)
        base = [(n, r) for n, r in ((n, ok_result(results, k)) for n, k in base_keys) if r]
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
        r = ok_result(results, f"missing-{src}")
        if r is None:
            lines.append(f"| {src} | not available | | | | |")
            continue
        c = {k: v["mean_dice"] for k, v in r["conditions"].items()}
        label = f"CrossModalNet, modality dropout {r['modality_dropout']:g}"
        if not r["supports_missing_modality"]:
            label += " (not trained for a missing modality; for reference)"
        lines.append(f"| {label} | {num(c['both'])} | {num(c['ct_only'])} | {num(c['mr_only'])} | "
                     f"{num(c['both'] - c['ct_only'])} | {num(c['both'] - c['mr_only'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


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


