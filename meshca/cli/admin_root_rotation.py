"""``meshca admin root prepare|activate|retire|status``: rotating the root.

``prepare`` makes a new key and root and publishes it beside the active one;
``activate`` makes it sign every replica's next intermediate once the two-root bundle
has had time to reach every relying party; ``retire`` takes the old root out of the
bundle once the ledger holds no unexpired certificate under it. ``status`` says which
step is next and when it is safe. Each step is checked and applied by the store in one
locked transaction, so two operators at once are serialised and a refusal changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from meshca.ca.roots import open_root_signer, prepare_root
from meshca.cli.admin_ledger import open_read_only
from meshca.cli.admin_output import echo_json, json_time, output_option
from meshca.cli.admin_root import (
    backend_options,
    new_root_key,
    root_lifetime,
    settings_for_new_key,
)
from meshca.cli.common import fail, load, reports_errors, settings_options, table, utc_text
from meshca.config import GcpKmsSignerConfig, Pkcs11SignerConfig, Settings
from meshca.durations import format_duration
from meshca.errors import MeshcaError
from meshca.signers.base import Signer, close_signer
from meshca.store import RootRecord, Store
from meshca.store.root_lifecycle import UnderRoot


def _now() -> datetime:
    return datetime.now(UTC)


def _new_key_defaults(settings: Settings, now: datetime) -> dict[str, Any]:
    """Where a rotation's new key goes unless the operator says: beside the old one,
    named after the time (a file, a PKCS#11 label, a version of the same KMS key)."""
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    config = settings.signer
    if isinstance(config, Pkcs11SignerConfig):
        return {"key_label": f"{config.key_label}-{stamp}"}
    if isinstance(config, GcpKmsSignerConfig):
        return {}
    return {"key_file": str(settings.state_dir / f"root-key-{stamp}.pem")}


def _discard(signer: Signer) -> str:
    """Remove a key made for a prepare the store refused; say what was done."""
    from meshca.signers.file import FileSigner
    from meshca.signers.pkcs11 import Pkcs11Signer

    if isinstance(signer, FileSigner):
        signer.path.unlink(missing_ok=True)
        return f"the new key file {signer.path} was removed"
    if isinstance(signer, Pkcs11Signer):
        signer.destroy()
        return "the new HSM key was destroyed"
    return f"the new key {signer.key_id} was left in the backend; disable it there"


@click.command()
@settings_options
@backend_options
@click.option("--ttl", default="10y", show_default=True, help="Root certificate lifetime.")
@click.option(
    "--cross-sign",
    is_flag=True,
    help="Have the active root also certify the new root's key, so peers that hold only "
    "the old bundle verify certificates under the new root.",
)
@reports_errors
def prepare(
    config_file: Path | None,
    state_dir: Path | None,
    database_url: str | None,
    ttl: str,
    cross_sign: bool,
    **backend: Any,
) -> None:
    """Make a new root key and root, publish it beside the active root (state prepared)."""
    now = _now()
    base = load(config_file, state_dir=state_dir, database_url=database_url)
    settings = settings_for_new_key(
        config_file, state_dir, database_url, backend, _new_key_defaults(base, now)
    )
    if backend["kind"] == "gcpkms" and not backend["kms_crypto_key"]:
        configured = base.signer
        if isinstance(configured, GcpKmsSignerConfig):
            backend["kms_crypto_key"] = configured.key_version.split("/cryptoKeyVersions/")[0]
    lifetime = root_lifetime(ttl)
    store = Store.open(settings.effective_database_url)
    try:
        active = store.check_prepare_root()  # refuse before a key is made
        cross_signer = open_root_signer(active, base.signer, base.state_dir) if cross_sign else None
        try:
            signer = new_root_key(settings, backend)
            try:
                record = prepare_root(
                    store,
                    signer,
                    settings.trust_domain_value,
                    ttl=lifetime,
                    now=now,
                    cross_signer=cross_signer,
                )
            except MeshcaError as exc:
                fail(f"{exc.message} ({_discard(signer)})", 1)
            finally:
                close_signer(signer)
        finally:
            if cross_signer is not None:
                close_signer(cross_signer)
    finally:
        store.close()
    propagation = settings.effective_root_propagation
    ready = record.created_at + propagation
    click.echo(f"root {record.fingerprint} prepared, valid until {utc_text(record.not_after)}")
    click.echo(f"  key:     {record.backend}: {record.key_ref}")
    if record.cross_certificate_pem:
        click.echo(f"  cross-signed by the active root {active.fingerprint[:16]}")
    click.echo(
        "every trust bundle now holds it beside the active root (each CA replica within "
        "its maintenance interval, each agent within its bundle refresh interval)"
    )
    click.echo(
        f"next: `meshca admin root activate {record.fingerprint[:16]}` at or after "
        f"{utc_text(ready)} (root_propagation {format_duration(propagation)})"
    )


@click.command()
@settings_options
@click.argument("root_id", metavar="ID")
@click.option(
    "--force",
    is_flag=True,
    help="Activate before root_propagation has passed (relying parties that have not "
    "fetched the new bundle yet will refuse certificates issued under it).",
)
@reports_errors
def activate(
    config_file: Path | None,
    state_dir: Path | None,
    database_url: str | None,
    root_id: str,
    force: bool,
) -> None:
    """Make the prepared root ID sign every replica's next intermediate."""
    settings = load(config_file, state_dir=state_dir, database_url=database_url)
    store = Store.open(settings.effective_database_url)
    try:
        candidate = store.find_root(root_id)
        if candidate.state == "prepared":
            # A root whose key is gone would leave every replica unable to switch.
            close_signer(open_root_signer(candidate, settings.signer, settings.state_dir))
        new, previous, forced = store.activate_root(
            root_id, now=_now(), propagation=settings.effective_root_propagation, force=force
        )
        under = store.certificates_under_root(previous.fingerprint, _now()) if previous else None
    finally:
        store.close()
    if forced:
        click.echo(
            f"meshca: warning: root {new.fingerprint[:16]} activated before "
            f"{utc_text(new.created_at + settings.effective_root_propagation)}: a relying "
            "party that has not fetched the two-root bundle yet refuses certificates issued "
            "under it",
            err=True,
        )
    click.echo(
        f"root {new.fingerprint} is active: each CA replica signs its next intermediate "
        "with it within its maintenance interval; workloads move at their next renewal"
    )
    if previous is not None and under is not None:
        click.echo(
            f"root {previous.fingerprint[:16]} is retiring and stays in every bundle; "
            f"next: `meshca admin root retire {previous.fingerprint[:16]}` "
            f"{_retire_when(under)}"
        )


def _retire_when(under: UnderRoot) -> str:
    if under.count == 0 or under.last_expiry is None:
        return "once the replicas have switched"
    return (
        f"at or after {utc_text(under.last_expiry)} ({under.count} unexpired certificate(s) "
        "under it now; replicas still switching may add a few)"
    )


@click.command()
@settings_options
@click.argument("root_id", metavar="ID")
@click.option(
    "--force",
    is_flag=True,
    help="Retire although unexpired certificates chain to the root (their holders fail "
    "verification until they renew).",
)
@reports_errors
def retire(
    config_file: Path | None,
    state_dir: Path | None,
    database_url: str | None,
    root_id: str,
    force: bool,
) -> None:
    """Take the retiring (or prepared) root ID out of every trust bundle."""
    settings = load(config_file, state_dir=state_dir, database_url=database_url)
    store = Store.open(settings.effective_database_url)
    try:
        record, under = store.retire_root(root_id, now=_now(), force=force)
    finally:
        store.close()
    if under.count:
        click.echo(
            f"meshca: warning: {under.count} unexpired certificate(s) still chain to root "
            f"{record.fingerprint[:16]} (the last until {utc_text(under.last_expiry or _now())}); "
            "their holders fail verification until they renew",
            err=True,
        )
    click.echo(
        f"root {record.fingerprint} is retired: it leaves every trust bundle within one "
        "maintenance interval (agents within their bundle refresh interval)"
    )


@dataclass(frozen=True, slots=True)
class NextStep:
    command: str
    earliest: datetime | None
    why: str


def next_step(
    roots: list[RootRecord], under: dict[str, UnderRoot], propagation: timedelta, now: datetime
) -> NextStep:
    """What the operator can do next, and from when it is safe."""
    by_state = {r.state: r for r in roots}
    if "prepared" in by_state:
        root = by_state["prepared"]
        ready = root.created_at + propagation
        return NextStep(
            f"meshca admin root activate {root.fingerprint[:16]}",
            max(ready, now),
            "the two-root bundle has then had root_propagation to reach every relying party",
        )
    if "retiring" in by_state:
        root = by_state["retiring"]
        left = under[root.fingerprint]
        return NextStep(
            f"meshca admin root retire {root.fingerprint[:16]}",
            max(left.last_expiry or now, now),
            f"{left.count} unexpired certificate(s) chain to it"
            if left.count
            else "no unexpired certificate chains to it",
        )
    active = by_state.get("active")
    if active is None:
        return NextStep("meshca admin root create", now, "no root is active")
    return NextStep(
        "meshca admin root prepare",
        None,
        f"rotation is optional now; the active root expires {utc_text(active.not_after)}",
    )


@click.command()
@settings_options
@output_option
@reports_errors
def status(
    config_file: Path | None, state_dir: Path | None, database_url: str | None, output: str
) -> None:
    """Roots with state and certificates under each, and the next safe step."""
    settings = load(config_file, state_dir=state_dir, database_url=database_url)
    store = open_read_only(config_file, state_dir, database_url)
    now = _now()
    try:
        roots = store.list_roots()
        under = {r.fingerprint: store.certificates_under_root(r.fingerprint, now) for r in roots}
    finally:
        store.close()
    step = next_step(roots, under, settings.effective_root_propagation, now)
    if output == "json":
        echo_json(
            {
                "roots": [
                    {
                        "fingerprint": r.fingerprint,
                        "state": r.state,
                        "backend": r.backend,
                        "key_ref": r.key_ref,
                        "not_after": json_time(r.not_after),
                        "prepared_at": json_time(r.created_at),
                        "activated_at": json_time(r.activated_at),
                        "cross_signed": r.cross_certificate_pem is not None,
                        "unexpired_certificates": under[r.fingerprint].count,
                        "last_expiry": json_time(under[r.fingerprint].last_expiry),
                    }
                    for r in roots
                ],
                "next_step": {
                    "command": step.command,
                    "earliest": json_time(step.earliest),
                    "why": step.why,
                },
            }
        )
        return
    click.echo(
        table(
            ["fingerprint", "state", "backend", "not after", "unexpired certs", "last expiry"],
            [
                [
                    r.fingerprint[:16],
                    r.state,
                    r.backend,
                    utc_text(r.not_after),
                    under[r.fingerprint].count,
                    _when(under[r.fingerprint].last_expiry),
                ]
                for r in roots
            ],
        )
    )
    when = "now" if step.earliest is not None and step.earliest <= now else _when(step.earliest)
    click.echo(f"next: `{step.command}` ({'when you choose' if step.earliest is None else when})")
    click.echo(f"  {step.why}")


def _when(value: datetime | None) -> str:
    return utc_text(value) if value is not None else "-"


COMMANDS = (prepare, activate, retire, status)
