"""Command-line value types shared by the benchmark scripts."""

from __future__ import annotations

import argparse

from meshca.durations import parse_duration


def duration(text: str) -> float:
    """``20s``, ``1m``, ``500ms`` or plain seconds, as meshca writes durations; in seconds."""
    try:
        return parse_duration(text).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
