"""Atomic file writes: the one way the package writes a file.

    with atomic_path("runs/cmn/config.yaml") as tmp:
        tmp.write_text(text)          # renamed onto the final path only if the block succeeds

A killed process never leaves a half-written file, and a failed write leaves the old one in place.
At the bottom of the package (below `config` and `data`), so that every stage may use it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from crossmodalnet.errors import CrossModalNetError

__all__ = ["atomic_path", "temp_file_beside", "write_csv", "check_output_folder"]


def _new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Create a new empty file `folder/prefix<random>suffix` and return its path.

    Created with mode 0o666, which the kernel reduces by the process umask: the permissions a plain
    open() gives (mkstemp would make it 0o600), without reading or changing the umask.
    """
    for _ in range(tempfile.TMP_MAX):
        candidate = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"{folder}: no free temporary file name with prefix {prefix!r}")


def temp_file_beside(path: str | os.PathLike) -> Path:
    """A new empty hidden file in `path`'s folder whose name keeps `path`'s suffixes (to be renamed onto it)."""
    path = Path(path)
    return _new_file(path.parent, f".{path.name.split('.')[0]}.", "".join(path.suffixes) or ".tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temp name keeps the final suffixes (nibabel picks gzip from `.nii.gz`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_file_beside(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    """Write `rows` (dicts; missing or NaN values left empty) under `columns`, atomically."""
    def fmt(v: Any) -> Any:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return ""
        return f"{v:.6g}" if isinstance(v, float) else v

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: fmt(row.get(k)) for k in columns})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return Path(path)


def check_output_folder(out: str | os.PathLike, flag: str = "output folder") -> None:
    """Refuse an output folder that is a file or lies below one, in one line naming it (`flag`: how
    the user names it, e.g. "--out"). Creating it, later, is the check that it can be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CrossModalNetError(f"{out}: cannot create the output folder (a file of that name exists); "
                                 f"choose another {flag}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CrossModalNetError(f"{out}: cannot create the output folder ({parent} is a file); "
                                         f"choose another {flag}")
            break
