"""Helpers shared by test modules (importable because pytest puts tests/ on the path for its conftest)."""

from __future__ import annotations

import pytest

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
