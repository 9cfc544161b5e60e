"""The worker side of `benchmarks/compare.py`: one job, run in its own process, writes one result JSON.

    .venv/bin/python benchmarks/_harness.py WORK/jobs/budget-unet.json   # -> WORK/results/budget-unet.json

A job is a JSON spec written by `compare.py`. Kinds:
- "train": train with the project's trainer (equal time budget or equal steps), predict the test
  split with `infer.predict`, score it with `evaluate.evaluate_paths`, then count parameters and
  forward FLOPs and time whole-volume predictions (`_train_job.py`);
- "misregistration": reload a finished run and score the test split with the MR shifted (or
  smoothly warped) against the CT at test time by each magnitude in voxels (`_robustness.py`);
- "missing": reload a finished run and score the test split with both modalities, CT only, MR only
  (`_robustness.py`).

Every job runs in its own process so that its peak memory (ru_maxrss) is its own and a crash or a
timeout fails that job only. Test-time perturbations act on the raw (X, Y, Z) MR volume on the CT
grid, before the run's own preprocessing, as a misregistered input would arrive.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _files import write_json
from _robustness import misregistration_job, missing_job
from _train_job import train_job

__all__ = ["run_job_file"]

Result = dict[str, Any]

_JOBS: dict[str, Callable[[dict[str, Any], Path], Result]] = {
    "train": train_job, "misregistration": misregistration_job, "missing": missing_job,
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
