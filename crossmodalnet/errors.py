"""The one exception type users see, and the one line every expected failure becomes.

`CrossModalNetError` is a problem with the user's input (file, config, arguments) that they can act
on: a one-line message that names the file and the problem. The CLI prints `describe(exc)` as
`error: <line>` and exits with status 2, with no traceback (`crossmodalnet --debug` shows it).

`describe` also turns the failures the system raises on bad input or a bad output place into such a
line: `OSError` (a read-only or full disk, a path below a file, permission denied), `UnicodeError`
(a text file that is not UTF-8), `RecursionError` (a document nested too deeply to parse) and
`MemoryError`. These carry no file name (or only a temp file's), so the file is found where the
failure happened: the innermost open file object or path among the traceback's frames. Anything
else is a bug and keeps its traceback. At the bottom of the package: imports nothing from it.
"""

from __future__ import annotations

import errno
import io
import os
import re
import types
from pathlib import PurePath

__all__ = ["CrossModalNetError", "EXPECTED", "describe"]


class CrossModalNetError(Exception):
    """A problem with the user's input (file, config, arguments) that they can act on."""


# Failures that come from the user's files or machine, not from a bug: one line, exit status 2.
EXPECTED: tuple[type[BaseException], ...] = (CrossModalNetError, OSError, UnicodeError, RecursionError, MemoryError)

# What the user can do about the common OSErrors (strerror alone says what, not what next).
_ADVICE: dict[int, str] = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    errno.EROFS: "read-only file system; write elsewhere",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENAMETOOLONG: "file name too long",
}
# Names of the package's own temporary files and folders, shown as the file they become: a temp
# file of `files.atomic_path` (`.<stem>.<8 hex><suffixes>`) and a staging folder (`<name>.partial-<8 hex>`,
# or `.partial-<8 hex>` inside the destination itself).
_TEMP_FILE = re.compile(r"\.(?P<stem>[^./]+)\.[0-9a-f]{8}(?P<suffix>\.[^/]*)?")
_STAGING = re.compile(r"(?P<name>[^/]*)\.partial-[0-9a-f]{8}")
# Local names that hold the file a function works on, by the package's naming habits.
_PATH_NAMES: tuple[str, ...] = ("path", "tmp", "tmp_path", "json_path", "csv_path", "target", "file", "filename")


def describe(exc: BaseException) -> str | None:
    """One line for an expected failure (see the module docstring), or None for a bug."""
    if isinstance(exc, CrossModalNetError):
        return _one_line(str(exc))
    if not isinstance(exc, EXPECTED):
        return None
    where = _culprit(exc)
    if isinstance(exc, OSError):
        name = exc.filename if exc.filename is not None else where
        what = _ADVICE.get(exc.errno or -1) or exc.strerror or type(exc).__name__
        if exc.filename2 is not None:
            name = f"{name} -> {exc.filename2}"
        if name is not None:  # a path, or a file descriptor
            name = _public(os.fsdecode(name) if isinstance(name, str | bytes | os.PathLike) else str(name))
        line = f"{name}: {what}" if name is not None else what
    elif isinstance(exc, UnicodeDecodeError):
        byte = bytes(exc.object[exc.start:exc.start + 1]).hex()
        line = f"{where or 'an input file'}: not UTF-8 text (byte 0x{byte} at position {exc.start}); save it as UTF-8"
    elif isinstance(exc, UnicodeError):
        line = f"{where or 'a file name or text'}: cannot be encoded ({exc.reason})"
    elif isinstance(exc, RecursionError):
        line = f"{where or 'an input file'}: nested too deeply to read"
    else:  # MemoryError (numpy's says how much it wanted)
        detail = f" ({exc})" if str(exc) else ""
        line = f"{where or 'the input'}: out of memory{detail}; use smaller inputs or a machine with more memory"
    return _one_line(line)


def _one_line(text: str) -> str:
    """Messages of third-party libraries may span lines; the promise is one."""
    return " ".join(text.split())


def _culprit(exc: BaseException) -> str | None:
    """The file in use where `exc` was raised: innermost frame first, open file objects before paths."""
    frames: list[types.FrameType] = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        found = _in_frame(frame.f_locals)
        if found is not None:
            return _public(found)
    return None


def _in_frame(local: dict) -> str | None:
    """The file one frame works on, if its locals show it."""
    for value in local.values():  # a stream being read or written names its file
        name = getattr(value, "name", None) if isinstance(value, io.IOBase) else None
        if isinstance(name, str | bytes) and name:  # a GzipFile over a file object has the name ""
            return os.fsdecode(name)
    if isinstance(local.get("self"), PurePath):  # pathlib's read_text, open, mkdir ...
        return str(local["self"])
    for key in _PATH_NAMES:
        value = local.get(key)
        if isinstance(value, PurePath) or (isinstance(value, str) and os.sep in value and len(value) < 4096):
            return str(value)
    return None


def _public(path: str) -> str:
    """`path` with the package's temporary names replaced by the names they stand for."""
    parts = []
    for part in path.split(os.sep):
        if m := _STAGING.fullmatch(part):
            part = m["name"]
        elif m := _TEMP_FILE.fullmatch(part):
            part = m["stem"] + (m["suffix"] or "")
        if part or not parts:  # "" first: an absolute path; elsewhere: a staging folder inside its destination
            parts.append(part)
    return os.sep.join(parts)
