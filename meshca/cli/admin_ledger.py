"""``meshca admin ledger verify|list``: audit the hash-chained ledger and search it.

Both open the database read-only: a mistyped ``--state-dir`` is an error, never a new,
empty (and so "verified") ledger.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from pathlib import Path

import click

from meshca.authn.base import AuthMethod
from meshca.cli.admin_output import echo_json, json_time, output_option
from meshca.cli.common import fail, load, reports_errors, settings_options, table, utc_text
from meshca.durations import parse_duration
from meshca.errors import SpiffeIdError
from meshca.spiffe import SpiffeId
from meshca.store import LedgerEntry, LedgerReport, ProblemKind, Store

CA_INTERNAL_METHOD = "ca-internal"
"""The ledger's auth method for the CA's own TLS certificates (not issued to workloads)."""
LEDGER_METHODS = (*(m.value for m in AuthMethod), CA_INTERNAL_METHOD)
_HEX = re.compile(r"[0-9a-f]+")


def open_read_only(
    config_file: Path | None, state_dir: Path | None, database_url: str | None
) -> Store:
    """The configured database, opened read-only with its schema checked (see Store)."""
    settings = load(config_file, state_dir=state_dir, database_url=database_url)
    return Store.open_read_only(settings.effective_database_url)


@click.group()
def ledger() -> None:
    """The hash-chained issuance ledger: verify it, list its rows."""


@ledger.command()
@settings_options
@output_option
@reports_errors
def verify(
    config_file: Path | None, state_dir: Path | None, database_url: str | None, output: str
) -> None:
    """Check every row's hash and link and the head; name each broken row by class.

    Exit status 0 when the ledger verifies, 1 when it does not.
    """
    store = open_read_only(config_file, state_dir, database_url)
    try:
        report = store.verify_ledger()
    finally:
        store.close()
    if output == "json":
        echo_json(_report_json(report))
    elif report.ok:
        click.echo(
            f"ledger OK: {report.rows_checked} rows verified, head at sequence "
            f"{report.head_sequence}"
        )
    else:
        _print_report(report)
    if not report.ok:
        total = sum(report.totals.values())
        fail(
            f"ledger does not verify: {total} problem(s) of {len(report.totals)} kind(s) in "
            f"{report.rows_checked} rows"
        )


def _print_report(report: LedgerReport) -> None:
    click.echo(
        f"ledger does NOT verify: {report.rows_checked} rows checked, head at sequence "
        f"{report.head_sequence}"
    )
    for kind in ProblemKind:
        total = report.totals.get(kind, 0)
        if not total:
            continue
        click.echo(f"\n{kind} ({total}):")
        for problem in report.listed(kind):
            click.echo(f"  {problem.describe()}")
        if omitted := report.omitted(kind):
            click.echo(f"  ... and {omitted} more {kind} problem(s), not listed")


def _report_json(report: LedgerReport) -> dict[str, object]:
    return {
        "ok": report.ok,
        "rows_checked": report.rows_checked,
        "head_sequence": report.head_sequence,
        "totals": {str(kind): report.totals[kind] for kind in ProblemKind if kind in report.totals},
        "problems": [
            {
                "kind": str(p.kind),
                "sequence": p.sequence,
                "last_sequence": p.last_sequence if p.last_sequence is not None else p.sequence,
                "serial": p.serial_hex,
                "detail": p.problem,
            }
            for p in report.problems
        ],
        "omitted": report.problems_omitted,
    }


@ledger.command(name="list")
@settings_options
@click.option("--spiffe-id", help="Only rows issued to this SPIFFE ID.")
@click.option("--serial", help="Only the row of this serial number (hex; colons allowed).")
@click.option(
    "--since",
    help="Only rows issued since: a duration back from now (30m, 24h, 7d) or an RFC 3339 "
    "time (2026-12-01T09:00:00Z) or a date (UTC midnight).",
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    type=click.Choice(LEDGER_METHODS),
    help=f"Only rows of this auth method (repeatable); {CA_INTERNAL_METHOD} = the CA's own "
    "TLS certificates.",
)
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    help="At most this many rows, newest first.",
)
@output_option
@reports_errors
def list_rows(
    config_file: Path | None,
    state_dir: Path | None,
    database_url: str | None,
    spiffe_id: str | None,
    serial: str | None,
    since: str | None,
    methods: tuple[str, ...],
    limit: int,
    output: str,
) -> None:
    """Ledger rows, newest first, filtered by identity, serial, time and method."""
    wanted_id = _spiffe_id(spiffe_id) if spiffe_id is not None else None
    wanted_serial = _serial(serial) if serial is not None else None
    since_time = _since(since, datetime.now(UTC)) if since is not None else None
    store = open_read_only(config_file, state_dir, database_url)
    try:
        rows = store.list_ledger(
            spiffe_id=wanted_id,
            serial_hex=wanted_serial,
            since=since_time,
            methods=methods,
            limit=limit,
        )
    finally:
        store.close()
    if output == "json":
        echo_json([_row_json(row) for row in rows])
        return
    if not rows:
        click.echo("no ledger rows match")
        return
    click.echo(
        table(
            ["sequence", "issued at", "serial", "spiffe id", "method", "not after", "peer"],
            [
                [
                    r.sequence,
                    utc_text(r.issued_at),
                    r.serial_hex,
                    r.spiffe_id,
                    r.auth_method,
                    utc_text(r.not_after),
                    r.peer_address,
                ]
                for r in rows
            ],
        )
    )
    if len(rows) == limit:
        click.echo(f"(the newest {limit} matching rows; --limit shows more)")


def _row_json(row: LedgerEntry) -> dict[str, object]:
    return {
        "sequence": row.sequence,
        "serial": row.serial_hex,
        "spiffe_id": row.spiffe_id,
        "auth_method": row.auth_method,
        "evidence": row.evidence,
        "peer_address": row.peer_address,
        "issued_at": json_time(row.issued_at),
        "not_before": json_time(row.not_before),
        "not_after": json_time(row.not_after),
        "intermediate_fingerprint": row.intermediate_fingerprint,
        "request_id": row.request_id,
        "csr_sha256": row.csr_sha256,
        "agent_spiffe_id": row.agent_spiffe_id,
        "node_name": row.node_name,
        "row_hash": row.row_hash,
    }


def _spiffe_id(text: str) -> str:
    try:
        return str(SpiffeId.parse(text))
    except SpiffeIdError as exc:
        fail(f"--spiffe-id: {exc.message}", 2)


def _serial(text: str) -> str:
    """The serial as the ledger stores it: lowercase hex, no separators or leading zeros."""
    digits = text.strip().lower().replace(":", "").removeprefix("0x")
    if not _HEX.fullmatch(digits):
        fail(f"--serial {text!r} is not a hexadecimal serial number (e.g. 7f3a:01 or 7f3a01)", 2)
    return digits.lstrip("0") or "0"


def _since(text: str, now: datetime) -> datetime:
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
            day = date.fromisoformat(text.strip())
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        fail(
            f"--since {text!r} is neither a duration (30m, 24h, 7d) nor an RFC 3339 time "
            "(2026-12-01T09:00:00Z)",
            2,
        )
    if when.tzinfo is None:
        fail(f"--since {text!r} has no time zone; add Z (UTC) or an offset such as +01:00", 2)
    return when.astimezone(UTC)
