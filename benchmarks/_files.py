"""Result files and job identity, shared by every benchmark: atomic JSON, marked markdown sections, fingerprints.

A killed benchmark never leaves half a file: every write goes through `atomic_path`. A job's
fingerprint is the short hash of its spec; a cached result is reused only when it carries the
fingerprint of the very same spec, so `fingerprint` must stay stable across refactorings.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from crossmodalnet.files import atomic_path

__all__ = ["write_json", "read_json", "write_section", "fingerprint"]


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
