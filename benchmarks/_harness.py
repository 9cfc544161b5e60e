"""The worker side of `benchmarks/compare.py`: one job, run in its own process, writes one result JSON.

    .venv/bin/python benchmarks/_harness.py WORK/jobs/budget-unet.json   # -> WORK/results/budget-unet.json

A job is a JSON spec written by `compare.py`. Kinds:
- "train": train with the project's trainer (equal time budget or equal steps), predict the test
  split with `infer.predict`, score it with `evaluate.evaluate_paths`, then count parameters and
  forward FLOPs and time whole-volume predictions;
- "misregistration": reload a finished run and score the test split with the MR shifted (or
  smoothly warped) against the CT at test time by each magnitude in voxels;
- "missing": reload a finished run and score the test split with both modalities, CT only, MR only.

Every job runs in its own process so that its peak memory (ru_maxrss) is its own and a crash or a
timeout fails that job only. Test-time perturbations act on the raw (X, Y, Z) MR volume on the CT
grid, before the run's own preprocessing, as a misregistered input would arrive.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from crossmodalnet.config import TrainConfig, from_dict
from crossmodalnet.data.dataset import load_case, load_dataset
from crossmodalnet.data.labels import NUM_CLASSES
from crossmodalnet.files import atomic_path

__all__ = [
    "write_json", "write_section", "merge_settings", "read_json", "fingerprint", "machine_info", "make_dataset",
    "spread",
    "budget_schedule", "sliding_windows", "split_steps", "shift_direction", "shift_volume", "smooth_field",
    "warp_volume", "run_job_file",
]

Result = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Files and identity
# ---------------------------------------------------------------------------------------------


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically (a killed run never leaves half a result)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return Path(path)


def write_section(path: str | os.PathLike, name: str, text: str) -> Path:
    """Replace the `<!-- name:begin -->` ... `<!-- name:end -->` section of a markdown file (append if absent).

    Every benchmark writes its own section of docs/benchmarks.md this way, atomically.
    """
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(new)
    return path


def merge_settings(defaults: Any, args: Any, quick: dict[str, Any]) -> dict[str, Any]:
    """A benchmark's settings as a dict: the dataclass `defaults`, then the `quick` preset when
    `args.quick`, then every flag the user gave (None = not given; lists become tuples)."""
    values = {**asdict(defaults), **(quick if args.quick else {}), "quick": args.quick}
    for f in fields(defaults):
        given = getattr(args, f.name, None)
        if given is not None and f.name != "quick":
            values[f.name] = tuple(given) if isinstance(given, list) else given
    return values


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON at `path`, or None when it is missing or unreadable (treated as not done)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def fingerprint(spec: dict[str, Any]) -> str:
    """Short hash of a job spec: a cached result is reused only for the very same spec."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=_json_default).encode()).hexdigest()[:12]


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch version and threads: what the reader needs to compare numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "system": platform.system()}


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


# ---------------------------------------------------------------------------------------------
# Schedules and statistics
# ---------------------------------------------------------------------------------------------


def budget_schedule(step_s: float, budget_s: float, validations: int, validation_s: float = 0.0,
                    margin: float = 1.25, validation_share: float = 0.1) -> tuple[int, int]:
    """(epochs, iterations_per_epoch) for a time budget, from measured seconds per step and per validation.

    Validation runs inside the budget (the trainer's clock), and a whole-volume validation costs a
    slow model as much as many of its steps: measured, SwinUNETR spent 100 of 150 s validating 5
    times while UNet spent 1 %. So at most `validations`, and no more than fit in
    `validation_share` of the budget (at least one; the trainer also validates when it stops).
    The horizon is `margin` times the steps the rest of the budget allows, so that the budget (not
    the epoch count) stops training while the cosine schedule still comes close to its end.
    """
    if validation_s > 0:
        validations = max(1, min(validations, math.floor(validation_share * budget_s / validation_s)))
    train_s = max(budget_s - validations * validation_s, 0.5 * budget_s)
    horizon = max(validations, math.ceil(margin * train_s / max(step_s, 1e-6)))
    ipe = max(1, math.ceil(horizon / validations))
    return math.ceil(horizon / ipe), ipe


def sliding_windows(edge: int, roi: int, overlap: float) -> int:
    """Windows MONAI's sliding window takes over an edge³ volume with roi³ windows (interval roi·(1-overlap))."""
    if roi >= edge:
        return 1
    interval = max(int(roi * (1 - overlap)), 1)
    return (math.ceil((edge - roi) / interval) + 1) ** 3


def split_steps(steps: int, validations: int) -> tuple[int, int]:
    """(epochs, iterations_per_epoch) whose product is exactly `steps`, epochs closest to `validations`."""
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    epochs = min(divisors, key=lambda d: (abs(d - validations), -d))
    return epochs, steps // epochs


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sd (population, as the evaluator), quartiles over cases; NaN values skipped, None if none."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return dict.fromkeys(("mean", "std", "q1", "median", "q3", "n"), None) | {"n": 0}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"mean": float(v.mean()), "std": float(v.std()), "q1": float(q1), "median": float(med),
            "q3": float(q3), "n": int(v.size)}


def _per_case(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{case: mean Dice / IoU / HD95 over its structures}, NaN skipped (the evaluator's empty rules)."""
    out: dict[str, dict[str, float]] = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        out[case] = {}
        for m in ("dice", "iou", "hd95"):
            vals = [float(r[m]) for r in mine if r[m] not in ("", None) and not math.isnan(float(r[m]))]
            out[case][m] = float(np.mean(vals)) if vals else math.nan
    return out


def _score_record(summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The evaluator's summary numbers plus the per-case values and their spread."""
    cases = _per_case(rows)
    return {
        "mean_dice": summary["mean_dice"], "miou": summary["miou"], "mean_hd95": summary["mean_hd95"],
        "hd95_convention": summary["hd95_convention"], "nan_counts": summary["nan_counts"],
        "per_structure_dice": {k: v["dice"] for k, v in summary["per_structure"].items()},
        "per_case": {c: {k: (None if math.isnan(v) else v) for k, v in d.items()} for c, d in cases.items()},
        **{f"{m}_spread": spread([d[m] for d in cases.values()]) for m in ("dice", "iou", "hd95")},
    }


# ---------------------------------------------------------------------------------------------
# Test-time misregistration of the MR against the CT
# ---------------------------------------------------------------------------------------------


def shift_direction(seed: int, index: int) -> np.ndarray:
    """Unit vector (3,) of case `index`: every model sees the same misregistration of the same case."""
    v = np.random.default_rng([seed, index, 5]).normal(size=3)
    return v / np.linalg.norm(v)


def shift_volume(volume: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Translate (X, Y, Z) `volume` by `offset` voxels (trilinear; edge values extend, no wrap-around)."""
    if not np.any(offset):
        return volume
    return ndimage.shift(volume, offset, order=1, mode="nearest").astype(volume.dtype)


def smooth_field(shape: Sequence[int], seed: int, index: int, grid: int = 4) -> np.ndarray:
    """Smooth displacement field (3, X, Y, Z) of mean magnitude 1 voxel, scaled by the caller.

    Random vectors on a `grid`³ lattice, cubic-interpolated to the volume: a deformation that varies
    over a quarter of the field of view, like a residual elastic registration error.
    """
    coarse = np.random.default_rng([seed, index, 9]).normal(size=(3, grid, grid, grid))
    zoom = [s / grid for s in shape]
    field = np.stack([ndimage.zoom(c, zoom, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]
                      for c in coarse])
    return field / np.linalg.norm(field, axis=0).mean()


def warp_volume(volume: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Resample (X, Y, Z) `volume` at x + field(x) (trilinear, edges extended)."""
    if not np.any(field):
        return volume
    coords = np.indices(volume.shape, dtype=np.float64) + field
    return ndimage.map_coordinates(volume, coords, order=1, mode="nearest").astype(volume.dtype)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _probe(config: TrainConfig, steps: int = 3) -> tuple[float, float]:
    """Seconds of a training step (forward, loss, backward, AdamW) on random patches, and of one
    sliding-window batch of inference (`sw_batch_size` windows, no gradient): the fastest of `steps`.

    Used only to size the schedule of a time-budget run; the probe's own time is not in the budget.
    The fastest, not the median: another process on the CPU during the probe would otherwise make
    the schedule too short, and training would end before the budget (measured: 9 s against 0.14 s
    for one step while another benchmark ran). Too fast an estimate only leaves the cosine unfinished.
    """
    from crossmodalnet.models.registry import build_model
    from crossmodalnet.train.losses import DiceCETerms

    torch.manual_seed(config.seed)
    model = build_model(config.model.name, config.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    loss_fn = DiceCETerms()
    shape = (config.batch_size, 1, *config.patch_size)
    ct, mr = torch.randn(shape), torch.randn(shape)
    label = torch.randint(0, NUM_CLASSES, shape)
    train_times, infer_times = [], []
    for _ in range(steps + 1):  # the first step pays for allocator and kernel warm-up
        t = time.perf_counter()
        terms = loss_fn(model(ct, mr), label)
        opt.zero_grad(set_to_none=True)
        (terms["dice"] + terms["ce"]).backward()
        opt.step()
        train_times.append(time.perf_counter() - t)
    model.eval()
    x = torch.randn(config.sw_batch_size, 1, *config.patch_size)
    with torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            model(x, x)
            infer_times.append(time.perf_counter() - t)
    return min(train_times[1:]), min(infer_times[1:])


def _training_record(run_dir: Path) -> dict[str, Any]:
    """Steps done, training time and the checkpoint validation chose, from the run folder."""
    from safetensors import safe_open

    from crossmodalnet.train import checkpoint as ckpt

    with open(run_dir / ckpt.METRICS, newline="") as fh:
        history = list(csv.DictReader(fh))
    last = history[-1]
    steps, time_s = int(last["step"]), float(last["time_s"])
    with safe_open(str(run_dir / ckpt.BEST), "pt") as fh:
        meta = fh.metadata() or {}
    return {"steps_done": steps, "train_time_s": time_s, "s_per_step": time_s / max(steps, 1),
            "validations": sum(1 for r in history if r.get("val_dice_mean") not in ("", None)),
            "best_step": int(meta.get("step", -1)), "best_val_dice": float(meta.get("val_dice", "nan"))}


def _flops(model: torch.nn.Module, edge: int, patch: int) -> tuple[float, int]:
    """Forward GFLOPs at the dataset edge; at the patch edge for fixed-size models (UNETR) that refuse it."""
    from crossmodalnet.models.registry import forward_flops

    try:
        return forward_flops(model, edge) / 1e9, edge
    except ValueError:
        return forward_flops(model, patch) / 1e9, patch


def _latency(run: Any, cases: Sequence[dict[str, Any]], runs: int) -> dict[str, Any]:
    """Seconds per whole-volume prediction (preprocess, sliding window, restore), median of `runs`."""
    from crossmodalnet.infer import predict_case

    cfg = run.config
    times = []
    for i in range(runs + 1):  # the first prediction warms the oneDNN primitive cache up
        d = cases[i % len(cases)]
        t = time.perf_counter()
        predict_case(run.model, d["ct"], d["mr"], run.preprocessor, d["geometry"], cfg.patch_size,
                     cfg.sw_overlap, cfg.sw_batch_size, run.device)
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times[1:]), "min_s": min(times[1:]), "runs": runs}


def _score_cases(run: Any, cases: Sequence[tuple[str, dict[str, Any]]],
                 inputs: Callable[[int, dict[str, Any]], tuple[np.ndarray | None, np.ndarray | None]]) -> dict:
    """Predict every test case with the inputs `inputs(index, case)` gives and score with the evaluator."""
    from crossmodalnet.evaluate import evaluate_arrays
    from crossmodalnet.infer import predict_case

    cfg = run.config
    scored = {}
    for i, (case_id, d) in enumerate(cases):
        ct, mr = inputs(i, d)
        probs = predict_case(run.model, ct, mr, run.preprocessor, d["geometry"], cfg.patch_size,
                             cfg.sw_overlap, cfg.sw_batch_size, run.device)
        scored[case_id] = (probs.argmax(0).astype(np.uint8), d["label"], d["geometry"].spacing)
    rows, summary = evaluate_arrays(scored)
    return _score_record(summary, rows)


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------


def _test_cases(data_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(c.id, load_case(c)) for c in load_dataset(data_dir)["test"]]


def _train_job(job: dict[str, Any], work: Path) -> Result:
    from crossmodalnet.evaluate import evaluate_paths
    from crossmodalnet.infer import load_run, predict
    from crossmodalnet.models.registry import count_parameters
    from crossmodalnet.train.trainer import train

    key, data = job["key"], work / "data"
    run_dir, pred_dir, eval_dir = (work / part / key for part in ("runs", "predictions", "evaluation"))
    config: TrainConfig = from_dict(TrainConfig, job["config"], f"job {key}")
    out: Result = {}
    if job["budget_s"] is not None:
        out["probe_step_s"], forward_s = _probe(config)
        batches = math.ceil(sliding_windows(job["edge"], config.patch_size[0], config.sw_overlap)
                            / config.sw_batch_size)
        out["validation_s_estimate"] = len(load_dataset(data)["validation"]) * batches * forward_s
        config.epochs, config.iterations_per_epoch = budget_schedule(
            out["probe_step_s"], job["budget_s"], job["validations"], out["validation_s_estimate"])
    out["steps_target"] = config.epochs * config.iterations_per_epoch
    t = time.monotonic()
    train(data, run_dir, config)
    out["train_wall_s"] = time.monotonic() - t
    out.update(_training_record(run_dir))
    # Capped equal-steps runs stop early; their rows say so instead of comparing a partial run.
    out["fits"] = out["steps_done"] >= out["steps_target"] or job["budget_s"] is not None
    # A budget run whose schedule ran out first did not use its whole budget: the table says so.
    out["budget_bound"] = job["budget_s"] is not None and out["steps_done"] < out["steps_target"]

    predict(run_dir, pred_dir, data_dir=data, split="test", labels="indices", device="cpu")
    summary = evaluate_paths(pred_dir, work / "references", eval_dir, progress=False)
    with open(eval_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out["test"] = _score_record(summary, rows)

    run = load_run(run_dir, "cpu")
    out["params"] = count_parameters(run.model)
    out["gflops"], out["flops_edge"] = _flops(run.model, job["edge"], config.patch_size[0])
    out["latency"] = _latency(run, [d for _, d in _test_cases(data)], job["latency_runs"])
    return out


def _misregistration_job(job: dict[str, Any], work: Path) -> Result:
    from crossmodalnet.infer import load_run

    run = load_run(work / "runs" / job["source"], "cpu")
    cases, seed = _test_cases(work / "data"), job["seed"]
    fields = {i: smooth_field(d["mr"].shape, seed, i) for i, (_, d) in enumerate(cases)}
    conditions: dict[str, Any] = {}
    for mode in ("shift", "warp"):
        for m in sorted({0, *job["magnitudes"]}):  # 0 first: the unperturbed reference of every loss
            name = "none" if m == 0 else f"{mode}_{m:g}"
            if name in conditions:
                continue

            def inputs(i: int, d: dict[str, Any], mode: str = mode, m: float = m) -> tuple[np.ndarray, np.ndarray]:
                if mode == "shift":
                    return d["ct"], shift_volume(d["mr"], m * shift_direction(seed, i))
                return d["ct"], warp_volume(d["mr"], m * fields[i])

            conditions[name] = _score_cases(run, cases, inputs)
            print(f"{job['key']}: {name}: mean Dice {conditions[name]['mean_dice']}", flush=True)
    return {"conditions": conditions}


def _missing_job(job: dict[str, Any], work: Path) -> Result:
    from crossmodalnet.infer import load_run

    run = load_run(work / "runs" / job["source"], "cpu")
    cases = _test_cases(work / "data")
    pick = {"both": lambda i, d: (d["ct"], d["mr"]), "ct_only": lambda i, d: (d["ct"], None),
            "mr_only": lambda i, d: (None, d["mr"])}
    conditions = {name: _score_cases(run, cases, fn) for name, fn in pick.items()}
    return {"conditions": conditions, "modality_dropout": run.config.model.modality_dropout,
            "supports_missing_modality": run.supports_missing_modality}


_JOBS: dict[str, Callable[[dict[str, Any], Path], Result]] = {
    "train": _train_job, "misregistration": _misregistration_job, "missing": _missing_job,
}


def run_job_file(job_path: str | os.PathLike) -> int:
    """Run the job of `job_path` and write its result (status ok or failed); returns an exit status."""
    job = json.loads(Path(job_path).read_text())
    work = Path(job["work"])
    start, load0 = time.monotonic(), os.getloadavg()
    result: Result = {"key": job["key"], "fingerprint": job["fingerprint"], "kind": job["kind"]}
    try:
        result.update(_JOBS[job["kind"]](job, work))
        result["status"] = "ok"
    except Exception as exc:  # the failure becomes this job's result; the other jobs go on
        traceback.print_exc()
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    result["wall_s"] = time.monotonic() - start
    result["loadavg"] = [load0[0], os.getloadavg()[0]]  # 1-min load at start and end: other work on the CPU
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    write_json(work / "results" / f"{job['key']}.json", result)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: _harness.py JOB.json (written by benchmarks/compare.py)")
    sys.exit(run_job_file(sys.argv[1]))
