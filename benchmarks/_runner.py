"""Running `benchmarks/compare.py`'s jobs: reuse a cached result of the same fingerprint, else one subprocess each.

Each job runs in its own process (`_harness.py`) so that its peak memory is its own and a crash or
a timeout fails that job only; its result is WORK/results/<key>.json, its log WORK/logs/<key>.log.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _files import read_json, write_json
from _report import num

__all__ = ["HARNESS", "run_jobs"]

HARNESS = Path(__file__).with_name("_harness.py")


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
        what = f"test Dice {num(result['test']['mean_dice'])}, {result['steps_done']} steps"
    else:
        what = result["status"] + (f": {result['error']}" if "error" in result else "")
    print(f"{tag}: {what} ({took:.0f} s)", file=sys.stderr, flush=True)
    return result


