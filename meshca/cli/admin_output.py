"""``--output table|json`` for the ``meshca admin`` commands that print tables.

Tables are for people and may change; the JSON documents are for scripts and keep their
field names (README, "Admin CLI"). Timestamps in JSON are RFC 3339 UTC strings ending
in ``Z``; absent values are ``null``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

OUTPUT_FORMATS = ("table", "json")


def output_option(func: F) -> F:
    """``--output/-o table|json`` (passed as ``output``)."""
    return click.option(
        "--output",
        "-o",
        "output",
        type=click.Choice(OUTPUT_FORMATS),
        default="table",
        show_default=True,
        help="table for people; json for scripts (a stable, documented format).",
    )(func)


def json_time(value: datetime | None) -> str | None:
    """``2026-11-26T12:00:00.123456Z`` (RFC 3339, UTC), or None."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def echo_json(document: object) -> None:
    click.echo(json.dumps(document, indent=2))
