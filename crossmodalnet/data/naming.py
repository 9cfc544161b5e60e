"""Case ids from file names: which files of several globs belong to one case (`case_ids`).

Case ids. Each glob's wildcards (`*`, `?`, `[...]`, `**`) match the part of a file's path that
changes from case to case ("3001"). The id is that part, widened by the literal text beside it that
every glob shares (the text that is not channel-specific): to the left, the longest run of whole
words (letter-and-digit runs and single separators) that ends every glob's literal text before its
first wildcard, within the file name ("Case"); to the right, the same for the text that starts every
glob's literal after its last wildcard, without the NIfTI ending and not past a "/" ("_" here, since
"_C0", "_LGE", "_T2", "_gd" share only it). Separators (`_ - .`) at the ends are trimmed and a "/"
(a folder matched by `**` or between wildcards) becomes "_". So the globs above give `Case3001`;
nnU-Net's `imagesTr/*_0000.nii.gz` ... `labelsTr/*.nii.gz` give `BraTS_001`; a folder per case
(`kits/*/imaging.nii.gz`, `kits/*/segmentation.nii.gz`) gives `case_00000`. With a single glob
nothing is channel-specific: `raw/Case*_C0.nii.gz` alone gives `Case3001_C0`. The files of one case
must give one id: that is how they are grouped.
"""

from __future__ import annotations

import glob as globlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crossmodalnet.data.dataset import NIFTI_ENDINGS, check_case_id
from crossmodalnet.errors import CrossModalNetError

__all__ = ["case_ids", "nifti_ending"]

# Separators trimmed from the ends of an id; "/" inside an id becomes "_".
_SEPARATORS = "_-. /"
# Words of literal text: runs of letters and digits, or one other character.
_WORD = re.compile(r"[^\W_]+|[\W_]")


@dataclass(frozen=True)
class _Glob:
    """One glob, absolute, as a regular expression with a group per wildcard, and its literal text
    around the wildcards (for the id rule)."""

    name: str  # the channel name, or LABEL
    text: str  # as given
    pattern: str  # absolute
    regex: re.Pattern
    head: str  # literal text before the first wildcard, within its path component
    head_at: int  # where `head` starts in every matched path
    tail: str  # literal text after the last wildcard, NIfTI ending removed


def _compile(name: str, text: str) -> _Glob:
    if not isinstance(text, str) or not text.strip():
        raise CrossModalNetError(f"{name}: needs a glob of NIfTI files, got {text!r}")
    pattern = os.path.normpath(os.path.abspath(os.path.expanduser(text)))
    regex, literals, i = [], [""], 0
    while i < len(pattern):
        ch = pattern[i]
        whole = (i == 0 or pattern[i - 1] == "/") and pattern[i + 2: i + 3] in ("", "/")
        if pattern.startswith("**", i) and whole:  # glob's recursive wildcard: any folders
            regex.append("((?:[^/]*/)*)" if pattern.startswith("**/", i) else "(.*)")
            i += 3 if pattern.startswith("**/", i) else 2
            literals.append("")
        elif ch in "*?":
            regex.append("([^/]*)" if ch == "*" else "([^/])")
            literals.append("")
            i += 1
        elif ch == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            inner = pattern[i + 1:end]
            inner = "^" + inner[1:] if inner.startswith("!") else inner
            regex.append("([" + inner.replace("\\", "\\\\") + "])")
            literals.append("")
            i = end + 1
        else:
            regex.append(re.escape(ch))
            literals[-1] += ch
            i += 1
    if len(literals) == 1:
        raise CrossModalNetError(f"{name}: glob {text!r} has no wildcard (*): it must match one file per case")
    head_full = literals[0]
    head = head_full.rsplit("/", 1)[-1]
    tail = literals[-1]
    for ending in NIFTI_ENDINGS:
        if tail.endswith(ending):
            tail = tail[: -len(ending)]
            break
    else:
        tail = "" if ".nii.gz".endswith(tail) else tail
    return _Glob(name, text, pattern, re.compile("".join(regex)), head, len(head_full) - len(head), tail)


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _shared_prefix(texts: list[str]) -> str:
    """The longest run of whole words that starts every text."""
    words = [_words(t) for t in texts]
    out = []
    for group in zip(*words, strict=False):
        if any(w != group[0] for w in group):
            break
        out.append(group[0])
    return "".join(out)


def _shared_suffix(texts: list[str]) -> str:
    return _shared_prefix([t[::-1] for t in texts])[::-1] if texts else ""


def nifti_ending(path: str) -> str | None:
    return next((e for e in NIFTI_ENDINGS if path.endswith(e)), None)


def case_ids(globs: Sequence[tuple[str, str]]) -> dict[str, dict[str, Path]]:
    """{case id: {glob name: file}} for (name, glob) pairs, by the rule of the module docstring.

    Raises a one-line error for a glob that matches no file, a match that is not NIfTI, an id that
    is not a valid file name, and two files of one glob with the same id.
    """
    compiled = [_compile(name, text) for name, text in globs]
    if len({g.name for g in compiled}) != len(compiled):
        raise CrossModalNetError(f"two globs share a name: {[g.name for g in compiled]}")
    left = _shared_suffix([g.head for g in compiled])
    # To the right, not past a "/": the id stays within the path component of the last wildcard.
    right = _shared_prefix([g.tail for g in compiled]).split("/", 1)[0]
    by_id: dict[str, dict[str, Path]] = {}
    folded: dict[str, str] = {}
    taken: dict[str, _Glob] = {}  # file -> the glob that matched it first
    for g in compiled:
        files = sorted(p for p in globlib.glob(g.pattern, recursive=True) if os.path.isfile(p))
        if not files:
            raise CrossModalNetError(f"{g.name}: glob {g.text!r} matches no file (relative globs start in "
                                     f"{os.getcwd()})")
        for path in files:
            first = taken.setdefault(path, g)
            if first is not g:
                raise CrossModalNetError(f"{path}: matched by both {first.name} glob {first.text!r} and {g.name} glob "
                                         f"{g.text!r}; make them narrower")
            ending = nifti_ending(path)
            if ending is None:
                raise CrossModalNetError(f"{path}: matched by {g.name} glob {g.text!r} but not a NIfTI file "
                                         f"({', '.join(NIFTI_ENDINGS)}); make the glob narrower")
            if not g.regex.fullmatch(path):  # glob and regex disagree (a pattern we do not translate)
                raise CrossModalNetError(f"{g.name}: glob {g.text!r} is too complex to take case ids from "
                                         f"(matched {path}); use *, ?, [...] and **")
            core = path[g.head_at: len(path) - len(ending)]
            keep_right = len(right) if core.endswith(g.tail) else len(g.tail)  # a tail inside the ending
            raw = core[len(g.head) - len(left): len(core) - len(g.tail) + keep_right]
            case_id = raw.strip(_SEPARATORS).replace("/", "_")
            problem = check_case_id(case_id)
            if problem:
                raise CrossModalNetError(f"{path}: case id {case_id!r:.80} (the part of the name that changes "
                                         f"from case to case, by {g.name} glob {g.text!r}) {problem}")
            other = folded.setdefault(case_id.casefold(), case_id)
            if other != case_id:
                raise CrossModalNetError(f"{path}: case id {case_id!r} differs from {other!r} only in letter case "
                                         "(ids name output files)")
            files_of_case = by_id.setdefault(case_id, {})
            if g.name in files_of_case:
                raise CrossModalNetError(f"{path}: {g.name} glob {g.text!r} gives case id {case_id!r} to this "
                                         f"file and to {files_of_case[g.name]}; make the glob narrower")
            files_of_case[g.name] = Path(path)
    return dict(sorted(by_id.items()))
