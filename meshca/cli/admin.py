"""``meshca admin``: inspect and audit the CA. Works while the server runs.

The commands that only read (``status``, ``ledger verify``, ``ledger list``, ``root
list``) open the database read-only and refuse a missing database or an old schema;
``db upgrade`` and ``root create`` are the ones that write.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from meshca.cli.admin_join_token import join_token
from meshca.cli.admin_ledger import CA_INTERNAL_METHOD, ledger, open_read_only
from meshca.cli.admin_output import echo_json, json_time, output_option
from meshca.cli.admin_root import root
from meshca.cli.admin_root_rotation import COMMANDS as ROOT_ROTATION
from meshca.cli.common import load, reports_errors, settings_options, table, utc_text
from meshca.store import IntermediateRecord, Store

HEARTBEAT_STALE_AFTER = timedelta(minutes=2)
"""An intermediate whose process has not vouched for it this long is abandoned (the
server refreshes ``last_seen_at`` every 30 s)."""


@click.group()
def admin() -> None:
    """Inspect and audit the CA: status, roots, ledger verification, join tokens, database
    migrations."""


admin.add_command(root)
for _command in ROOT_ROTATION:
    root.add_command(_command)
admin.add_command(ledger)
admin.add_command(join_token)


def intermediate_state(record: IntermediateRecord, now: datetime) -> str:
    """``in-use``, ``abandoned``, ``retired``, ``expired`` or ``unknown`` (no heartbeat)."""
    if record.not_after <= now:
        return "expired"
    if record.retired_at is not None:
        return "retired"
    if record.last_seen_at is None:
        return "unknown"
    if now - record.last_seen_at <= HEARTBEAT_STALE_AFTER:
        return "in-use"
    return "abandoned"


def _state_text(record: IntermediateRecord, state: str) -> str:
    if state == "retired" and record.retired_at is not None:
        return f"retired {utc_text(record.retired_at)}"
    if state == "abandoned" and record.last_seen_at is not None:
        return f"abandoned (last seen {utc_text(record.last_seen_at)})"
    if state == "unknown":
        return "unknown (no heartbeat recorded)"
    return state.replace("-", " ")


@admin.command()
@settings_options
@click.option(
    "--intermediates",
    "limit",
    default=10,
    show_default=True,
    help="How many of the newest intermediates to list.",
)
@output_option
@reports_errors
def status(
    config_file: Path | None,
    state_dir: Path | None,
    database_url: str | None,
    limit: int,
    output: str,
) -> None:
    """Roots, recent issuing intermediates (in use or not) and ledger counts."""
    store = open_read_only(config_file, state_dir, database_url)
    try:
        now = datetime.now(UTC)
        roots = store.list_roots()
        inters = [(i, intermediate_state(i, now)) for i in store.list_intermediates(limit=limit)]
        counts = store.counts()
        by_method = store.count_issued_by_method()
        revision = store.current_revision()
        where = store.redacted_url()
    finally:
        store.close()
    ca_server = by_method.get(CA_INTERNAL_METHOD, 0)
    if output == "json":
        echo_json(
            {
                "database": where,
                "schema_revision": revision,
                "roots": [
                    {
                        "fingerprint": r.fingerprint,
                        "state": r.state,
                        "backend": r.backend,
                        "key_ref": r.key_ref,
                        "algorithm": r.algorithm,
                        "subject": r.subject,
                        "not_before": json_time(r.not_before),
                        "not_after": json_time(r.not_after),
                    }
                    for r in roots
                ],
                "intermediates": [
                    {
                        "fingerprint": i.fingerprint,
                        "owner": i.owner,
                        "root_fingerprint": i.root_fingerprint,
                        "not_before": json_time(i.not_before),
                        "not_after": json_time(i.not_after),
                        "state": state,
                        "last_seen_at": json_time(i.last_seen_at),
                        "retired_at": json_time(i.retired_at),
                    }
                    for i, state in inters
                ],
                "counts": {
                    "roots": counts.roots,
                    "intermediates": counts.intermediates,
                    "ledger_rows": counts.issued,
                    "issued_to_workloads": counts.issued - ca_server,
                    "ca_server_certificates": ca_server,
                    "by_method": dict(sorted(by_method.items())),
                },
            }
        )
        return
    click.echo("Roots")
    click.echo(
        table(
            ["fingerprint", "state", "backend", "key", "algorithm", "not after"],
            [
                [
                    r.fingerprint[:16],
                    r.state,
                    r.backend,
                    r.key_ref,
                    r.algorithm,
                    utc_text(r.not_after),
                ]
                for r in roots
            ],
        )
    )
    click.echo("\nIssuing intermediates (newest first)")
    click.echo(
        table(
            ["fingerprint", "owner", "not before", "not after", "state"],
            [
                [
                    i.fingerprint[:16],
                    i.owner,
                    utc_text(i.not_before),
                    utc_text(i.not_after),
                    _state_text(i, state),
                ]
                for i, state in inters
            ],
        )
    )
    click.echo("\nCounts")
    click.echo(
        table(
            ["roots", "intermediates", "issued to workloads", "CA server certificates"],
            [[counts.roots, counts.intermediates, counts.issued - ca_server, ca_server]],
        )
    )
    if by_method:
        methods = ", ".join(f"{m}: {n}" for m, n in sorted(by_method.items()))
        click.echo(f"ledger rows by method: {methods}")
    click.echo(f"\ndatabase: {where} (schema revision {revision})")


@admin.group()
def db() -> None:
    """Database schema migrations."""


@db.command()
@settings_options
@reports_errors
def upgrade(config_file: Path | None, state_dir: Path | None, database_url: str | None) -> None:
    """Create the database or apply pending schema migrations (the server does this on start)."""
    settings = load(config_file, state_dir=state_dir, database_url=database_url)
    store = Store.open(settings.effective_database_url)
    try:
        click.echo(f"database {store.redacted_url()} at revision {store.current_revision()}")
    finally:
        store.close()
