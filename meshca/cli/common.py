"""Options and helpers shared by the ``meshca`` sub-commands."""

from __future__ import annotations

import atexit
import functools
import logging
import logging.handlers
import queue
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from meshca.durations import parse_duration
from meshca.errors import ConfigError, MeshcaError, SignerError

if TYPE_CHECKING:
    from meshca.config import Settings

F = TypeVar("F", bound=Callable[..., Any])


def env_option(*decls: str, env: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option that also reads ``MESHCA_<env>`` and shows it in --help."""
    return click.option(*decls, envvar=f"MESHCA_{env}", show_envvar=True, **kwargs)


def settings_options(func: F) -> F:
    """--config, --state-dir and --database-url: what every command needs to find its data."""
    for option in reversed(
        (
            env_option(
                "--config",
                "config_file",
                env="CONFIG",
                type=click.Path(path_type=Path, dir_okay=False),
                help="YAML or TOML config file; flags and MESHCA_* variables override it.",
            ),
            env_option(
                "--state-dir",
                env="STATE_DIR",
                type=click.Path(path_type=Path, file_okay=False),
                help="Directory for the SQLite database and the file root key "
                "[default: $XDG_STATE_HOME/meshca or ~/.local/state/meshca].",
            ),
            env_option(
                "--database-url",
                env="DATABASE_URL",
                help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db "
                "[default: sqlite:///<state-dir>/meshca.db].",
            ),
        )
    ):
        func = option(func)
    return func


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"meshca: error: {message}", err=True)
    sys.exit(code)


def load(config_file: Path | None, **overrides: Any) -> Settings:
    # Imported here: the CA's settings models are no part of ``meshca agent``.
    from meshca.config import load_settings

    try:
        return load_settings(config_file, **overrides)
    except ConfigError as exc:
        fail(exc.message, 2)


class DurationParam(click.ParamType):  # type: ignore[type-arg]
    """``90s``, ``30m``, ``24h``, ``10y``: the same syntax as the config file."""

    name = "duration"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> object:
        if not isinstance(value, str):
            return value
        try:
            parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return value


DURATION = DurationParam()


EXIT_CODES = """\b
Exit codes:
  0    stopped by SIGINT or SIGTERM after start-up
  1    failed at run time, or at start for a reason that may pass by itself
       (database, HSM or KMS unreachable): retrying may help
  2    refused to start: a flag, the config, or what they point to must be fixed
       first (bad value, port in use, no root, wrong HSM PIN, key not found)
  130  interrupted during start-up by SIGINT (Ctrl-C); 143 by SIGTERM"""
"""The exit code scheme, shown in ``--help`` (a supervisor such as systemd can keep
restarting on 1 and stop on 2: ``RestartPreventExitStatus=2``)."""

TRANSIENT_SIGNER_REASONS = frozenset(
    {"signer_unavailable", "signer_closed", "sign_failed", "kms_error", "key_version_not_ready"}
)
"""Signer failures that may pass without the operator doing anything."""


def exit_code(exc: MeshcaError) -> int:
    """2 when the operator must change something before a retry can work, else 1."""
    if isinstance(exc, ConfigError):
        return 2
    if isinstance(exc, SignerError) and exc.reason not in TRANSIENT_SIGNER_REASONS:
        return 2
    return 1


def reports_errors(func: F) -> F:
    """Turn meshca errors into one clear line on stderr and an exit code from
    :data:`EXIT_CODES`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MeshcaError as exc:
            fail(exc.message, exit_code(exc))

    return wrapper  # type: ignore[return-value]


def setup_logging(level: str, *, background: bool = False) -> None:
    """Log to stderr. ``background``: the caller only enqueues records and a thread
    writes them, so a slow stderr (a full pipe) never stalls the server's event loop."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(level.upper())
    if root.level > logging.DEBUG:
        # Alembic announces its plumbing at INFO on every connection it inspects
        # ("Context impl SQLiteImpl.", plugin set-up); meshca logs the upgrades it applies.
        logging.getLogger("alembic").setLevel(logging.WARNING)
    if not background:
        root.addHandler(handler)
        return
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler)
    listener.start()
    atexit.register(listener.stop)
    root.addHandler(logging.handlers.QueueHandler(records))


def utc_text(value: datetime) -> str:
    """A timestamp for tables: ``2026-11-26 12:00:00Z``."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table for terminals."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
