"""Helpers shared by test modules (importable because pytest puts tests/ on the path for its conftest)."""

from __future__ import annotations

import nibabel.arrayproxy
import numpy as np
import pytest

from crossmodalnet.data.io import MAX_IMAGE_BYTES_ENV
from crossmodalnet.errors import CrossModalNetError


def one_line_error(call, *names: str) -> str:
    """The message of the CrossModalNetError `call()` raises; asserts it is one line naming `names`."""
    with pytest.raises(CrossModalNetError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text
    for name in names:
        assert name in text, (name, text)
    return text


def spy_on_body_reads(monkeypatch, budget: int) -> list[int]:
    """Set the image memory budget to `budget` and record the bytes of every image body nibabel reads;
    a read over `budget` is refused (MemoryError) instead of allocated, so an attempt shows as a failure."""
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, str(budget))
    seen: list[int] = []
    original = nibabel.arrayproxy.array_from_file

    def array_from_file(shape, in_dtype, *args, **kwargs):
        nbytes = int(np.prod(shape, dtype=np.float64) * np.dtype(in_dtype).itemsize)
        seen.append(nbytes)
        if nbytes > budget:
            raise MemoryError(f"test spy: {nbytes} bytes requested")
        return original(shape, in_dtype, *args, **kwargs)

    monkeypatch.setattr(nibabel.arrayproxy, "array_from_file", array_from_file)
    return seen
