"""The audit's report: audit.json (everything) and audit.md (one table row per claim)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from crossmodalnet.analysis.audit.claims import VERDICTS
from crossmodalnet.analysis.cmif import json_safe
from crossmodalnet.files import atomic_path

__all__ = ["write_audit"]


def _fmt(value: Any) -> str:
    """Compact numbers for the markdown table."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _md_numbers(numbers: dict[str, Any]) -> str:
    # per-block details stay in audit.json; the table shows the headline numbers.
    keep = {k: v for k, v in numbers.items() if k not in ("per_block", "operators", "power_iteration_trace")}
    return _fmt(keep).replace("|", "/")


def write_audit(results: dict[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """audit.json (everything) and audit.md (one row per claim) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {**results, "claims": [asdict(c) for c in results["claims"]]}
    with atomic_path(out / "audit.json") as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=1, default=str))
    lines = [
        "# Audit of the paper's claims", "",
        f"Run `{results['run']}` ({results['model']['size']}, cross attention `{results['model']['cross_attention']}`, "
        f"{results['model']['parameters']:,} parameters); data `{results['data']}`, cases {results['cases']} "
        f"({'x'.join(map(str, results['case_shape']))} voxels); MI estimators {results['estimators']}, PCA dimension "
        f"{results['pca_dim']}; {results['seconds']:.0f} s.", "",
        "| claim | verdict | how tested | numbers | criterion | note |", "|---|---|---|---|---|---|",
    ]
    for c in results["claims"]:
        cells = [c.claim, f"**{c.verdict}**", c.test, _md_numbers(c.numbers), c.criterion, c.note]
        lines.append("| " + " | ".join(str(x).replace("|", "/").replace("\n", " ") for x in cells) + " |")
    counts = {v: sum(c.verdict == v for c in results["claims"]) for v in VERDICTS}
    lines += ["", "Verdict counts: " + ", ".join(f"{v}: {n}" for v, n in counts.items()), ""]
    with atomic_path(out / "audit.md") as tmp:
        tmp.write_text("\n".join(lines))
    return {"json": out / "audit.json", "md": out / "audit.md"}

