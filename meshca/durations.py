"""Durations written the same way everywhere: flags, environment and config files.

``90s``, ``30m``, ``24h``, ``7d``, ``10y`` and combinations such as ``1h30m``. A bare
number is seconds. A year is 365 days.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")


def parse_duration(text: str | int | float | timedelta) -> timedelta:
    """Parse a duration; raise ValueError that says what is accepted."""
    if isinstance(text, timedelta):
        return text
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"duration {text} is negative")
        return timedelta(seconds=text)
    if not isinstance(text, str):
        raise ValueError(f"duration must be a string such as '90s', '1h', '10y', not {text!r}")
    raw = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        return timedelta(seconds=float(raw))
    pos, total = 0, 0.0
    for match in _PART.finditer(raw):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(raw) or not raw:
        raise ValueError(
            f"invalid duration {text!r}: write a number and a unit (ms, s, m, h, d, w, y), "
            "such as '90s', '30m', '24h', '10y'"
        )
    return timedelta(seconds=total)


def format_duration(value: timedelta) -> str:
    """The shortest exact form, parseable again: ``1h30m``, ``10y``, ``90s``, ``1s500ms``.

    Exact to the millisecond (settings travel to worker processes in this form).
    """
    millis = round(value.total_seconds() * 1000)
    if millis == 0:
        return "0s"
    parts = []
    for unit in ("y", "d", "h", "m", "s"):
        size = int(_UNITS[unit]) * 1000
        if millis >= size:
            parts.append(f"{millis // size}{unit}")
            millis %= size
    if millis:
        parts.append(f"{millis}ms")
    return "".join(parts)


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
"""A settings field holding a duration: written as above, shown as ``format_duration``."""
