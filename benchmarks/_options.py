"""A benchmark's settings from its command line: dataclass defaults, then the quick preset, then the flags given."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

__all__ = ["merge_settings"]


def merge_settings(defaults: Any, args: Any, quick: dict[str, Any]) -> dict[str, Any]:
    """A benchmark's settings as a dict: the dataclass `defaults`, then the `quick` preset when
    `args.quick`, then every flag the user gave (None = not given; lists become tuples)."""
    values = {**asdict(defaults), **(quick if args.quick else {}), "quick": args.quick}
    for f in fields(defaults):
        given = getattr(args, f.name, None)
        if given is not None and f.name != "quick":
            values[f.name] = tuple(given) if isinstance(given, list) else given
    return values
