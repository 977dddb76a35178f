"""``meshca admin join-token create|list|revoke``: single-use tokens for machines that
have no platform credential (a VM on premises, a laptop).

``create`` prints each new token once, on standard output (one per line, for scripts);
the database keeps only its SHA-256. ``list`` and ``revoke`` name tokens by an id, the
first 16 hex digits of that digest. The commands run against the same database as the
CA (``--config`` / ``--state-dir`` / ``--database-url``) and refuse a missing one, so a
token never lands in a database no CA reads.
"""

from __future__ import annotations

import getpass
import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from meshca.authn.join_token import new_token, token_digest
from meshca.cli.admin_ledger import open_read_only
from meshca.cli.admin_output import echo_json, json_time, output_option
from meshca.cli.common import fail, load, reports_errors, settings_options, table, utc_text
from meshca.durations import format_duration, parse_duration
from meshca.errors import SpiffeIdError
from meshca.spiffe import SpiffeId
from meshca.store import JoinToken, Store
from meshca.store.join_tokens import state_of, token_id

DEFAULT_TTL = "1h"
MAX_TTL = timedelta(days=30)
MAX_COUNT = 1000


def _now() -> datetime:
    return datetime.now(UTC)


def creator() -> str:
    """``user@host`` of whoever runs the command (the uid when the user has no name)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _open_writable(config_file: Path | None, state_dir: Path | None, url: str | None) -> Store:
    """The CA's existing database, for writing; StoreError when there is none (checked
    read-only first, so a mistyped --state-dir creates nothing)."""
    open_read_only(config_file, state_dir, url).close()
    settings = load(config_file, state_dir=state_dir, database_url=url)
    return Store(settings.effective_database_url)


@click.group("join-token")
def join_token() -> None:
    """Single-use tokens that give a machine its first certificate (then it renews with
    its SVID): create, list, revoke."""


@join_token.command()
@settings_options
@click.option(
    "--spiffe-id",
    required=True,
    help="The identity the token grants: spiffe://<trust-domain>/path, or just /path.",
)
@click.option(
    "--ttl",
    default=DEFAULT_TTL,
    show_default=True,
    help=f"How long the token may wait to be used (at most {format_duration(MAX_TTL)}).",
)
@click.option(
    "--count",
    type=click.IntRange(1, MAX_COUNT),
    default=1,
    show_default=True,
    help="How many tokens (one per machine; each is good for one certificate).",
)
@output_option
@reports_errors
def create(
    config_file: Path | None,
    state_dir: Path | None,
    database_url: str | None,
    spiffe_id: str,
    ttl: str,
    count: int,
    output: str,
) -> None:
    """Create join tokens and print them, one per line; only their hashes are kept."""
    settings = load(config_file, state_dir=state_dir, database_url=database_url)
    identity = _identity(spiffe_id, settings.trust_domain_value.name)
    try:
        lifetime = parse_duration(ttl)
    except ValueError as exc:
        fail(f"--ttl: {exc}", 2)
    if not timedelta(0) < lifetime <= MAX_TTL:
        fail(f"--ttl {ttl} must be positive and at most {format_duration(MAX_TTL)}", 2)
    now = _now()
    tokens = [new_token() for _ in range(count)]
    records = [
        JoinToken(
            token_sha256=token_digest(token),
            spiffe_id=str(identity),
            created_at=now,
            expires_at=now + lifetime,
            created_by=creator(),
        )
        for token in tokens
    ]
    store = _open_writable(config_file, state_dir, database_url)
    try:
        store.add_join_tokens(records)
    finally:
        store.close()
    if output == "json":
        echo_json(
            [
                {
                    "id": token_id(record),
                    "token": token,
                    "spiffe_id": record.spiffe_id,
                    "expires_at": json_time(record.expires_at),
                }
                for token, record in zip(tokens, records, strict=True)
            ]
        )
    else:
        for token in tokens:
            click.echo(token)
    click.echo(
        f"{count} join token(s) for {identity}, each good for one certificate until "
        f"{utc_text(now + lifetime)} (ids {', '.join(token_id(r) for r in records)}); on the "
        "machine: meshca agent --credential join-token --token-file FILE ...",
        err=True,
    )


def _identity(text: str, trust_domain: str) -> SpiffeId:
    full = f"spiffe://{trust_domain}{text}" if text.startswith("/") else text
    try:
        identity = SpiffeId.parse(full)
    except SpiffeIdError as exc:
        fail(f"--spiffe-id: {exc}", 2)
    if identity.trust_domain.name != trust_domain:
        fail(
            f"--spiffe-id {identity} is outside the CA's trust domain {trust_domain} "
            "(set --config or MESHCA_TRUST_DOMAIN as for the CA)",
            2,
        )
    if identity.is_trust_domain_id:
        fail(f"--spiffe-id {identity} names the trust domain; give a workload path", 2)
    return identity


@join_token.command("list")
@settings_options
@click.option("--spiffe-id", help="Only the tokens for this SPIFFE ID.")
@output_option
@reports_errors
def list_tokens(
    config_file: Path | None,
    state_dir: Path | None,
    database_url: str | None,
    spiffe_id: str | None,
    output: str,
) -> None:
    """Every join token (never the token itself): id, SPIFFE ID, state, who created it,
    when it expires, when and by which peer it was used."""
    store = open_read_only(config_file, state_dir, database_url)
    try:
        records = store.list_join_tokens()
    finally:
        store.close()
    if spiffe_id is not None:
        records = [r for r in records if r.spiffe_id == spiffe_id]
    now = _now()
    if output == "json":
        echo_json([_json(record, now) for record in records])
        return
    if not records:
        click.echo("no join tokens")
        return
    rows = [
        (
            token_id(r),
            r.spiffe_id,
            state_of(r, now),
            utc_text(r.created_at),
            r.created_by,
            utc_text(r.expires_at),
            utc_text(r.used_at) if r.used_at else "-",
            r.used_by or "-",
        )
        for r in records
    ]
    headers = ("ID", "SPIFFE ID", "STATE", "CREATED", "BY", "EXPIRES", "USED", "USED BY")
    click.echo(table(headers, rows))


def _json(record: JoinToken, now: datetime) -> dict[str, object]:
    return {
        "id": token_id(record),
        "spiffe_id": record.spiffe_id,
        "state": str(state_of(record, now)),
        "created_at": json_time(record.created_at),
        "created_by": record.created_by,
        "expires_at": json_time(record.expires_at),
        "used_at": json_time(record.used_at),
        "used_by": record.used_by,
        "revoked_at": json_time(record.revoked_at),
    }


@join_token.command()
@settings_options
@click.argument("ids", metavar="[ID]...", nargs=-1)
@click.option("--spiffe-id", help="Revoke every unused token for this SPIFFE ID.")
@reports_errors
def revoke(
    config_file: Path | None,
    state_dir: Path | None,
    database_url: str | None,
    ids: tuple[str, ...],
    spiffe_id: str | None,
) -> None:
    """Revoke unused join tokens, by id (8+ hex digits, as `list` shows) or SPIFFE ID."""
    if not ids and spiffe_id is None:
        fail(
            "name the tokens to revoke: ids (as `meshca admin join-token list` shows) "
            "or --spiffe-id",
            2,
        )
    store = _open_writable(config_file, state_dir, database_url)
    try:
        revoked, skipped = store.revoke_join_tokens(ids, spiffe_id, _now())
    finally:
        store.close()
    now = _now()
    for record in revoked:
        click.echo(f"revoked {token_id(record)} ({record.spiffe_id})")
    for record in skipped:
        click.echo(f"left {token_id(record)} ({record.spiffe_id}): already {state_of(record, now)}")
    if not revoked and not skipped:
        click.echo(f"no join tokens for {spiffe_id}")
