"""``meshca admin``: inspect and audit the CA. Works while the server runs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from meshca.cli.admin_root import root
from meshca.cli.common import fail, load, reports_errors, settings_options, table, utc_text
from meshca.store import Store


def _open(config_file: Path | None, state_dir: Path | None, database_url: str | None) -> Store:
    settings = load(config_file, state_dir=state_dir, database_url=database_url)
    return Store.open(settings.effective_database_url)


@click.group()
def admin() -> None:
    """Inspect and audit the CA: status, roots, ledger verification, database migrations."""


admin.add_command(root)


@admin.command()
@settings_options
@click.option(
    "--intermediates",
    "limit",
    default=10,
    show_default=True,
    help="How many of the newest intermediates to list.",
)
@reports_errors
def status(
    config_file: Path | None, state_dir: Path | None, database_url: str | None, limit: int
) -> None:
    """Roots, recent issuing intermediates and ledger counts, as tables."""
    store = _open(config_file, state_dir, database_url)
    try:
        now = datetime.now(UTC)
        roots = store.list_roots()
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
        inters = store.list_intermediates(limit=limit)
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
                        "valid" if i.not_after > now else "expired",
                    ]
                    for i in inters
                ],
            )
        )
        counts = store.counts()
        click.echo("\nCounts")
        click.echo(
            table(
                ["roots", "intermediates", "certificates issued (ledger rows)"],
                [[counts.roots, counts.intermediates, counts.issued]],
            )
        )
        click.echo(f"\ndatabase: {store.redacted_url()}")
    finally:
        store.close()


@admin.group()
def ledger() -> None:
    """The hash-chained issuance ledger."""


@ledger.command()
@settings_options
@reports_errors
def verify(config_file: Path | None, state_dir: Path | None, database_url: str | None) -> None:
    """Check every ledger row's hash and link; name each edited, deleted or reordered row.

    Exit status 0 when the ledger verifies, 1 when it does not.
    """
    store = _open(config_file, state_dir, database_url)
    try:
        report = store.verify_ledger()
    finally:
        store.close()
    if report.ok:
        click.echo(
            f"ledger OK: {report.rows_checked} rows verified, head at sequence "
            f"{report.head_sequence}"
        )
        return
    for problem in report.problems:
        click.echo(f"sequence {problem.sequence}: {problem.problem}")
    fail(f"ledger does not verify: {len(report.problems)} problem(s) in {report.rows_checked} rows")


@admin.group()
def db() -> None:
    """Database schema migrations."""


@db.command()
@settings_options
@reports_errors
def upgrade(config_file: Path | None, state_dir: Path | None, database_url: str | None) -> None:
    """Apply pending schema migrations (the server also does this on start)."""
    store = _open(config_file, state_dir, database_url)
    try:
        click.echo(f"database {store.redacted_url()} at revision {store.current_revision()}")
    finally:
        store.close()
