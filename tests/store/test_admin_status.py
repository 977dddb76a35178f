"""``meshca admin status`` and ``root list``: what is issued to whom, which intermediates live."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from alembic import command
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text

from meshca.cli.main import main
from meshca.store import IntermediateRecord, Store
from meshca.store.migrate import alembic_config

from .helpers import issuance
from .test_roots import root


def run(database_url: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["admin", *args, "--database-url", database_url])


def live_intermediate(fp_char: str, owner: str, now: datetime) -> IntermediateRecord:
    return IntermediateRecord(
        fingerprint=fp_char * 64,
        serial_hex="7f" * 10,
        root_fingerprint="a" * 64,
        certificate_pem=f"INTERMEDIATE {fp_char}",
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(hours=47),
        owner=owner,
        created_at=now - timedelta(hours=1),
    )


def test_status_counts_the_cas_own_certificates_apart(store: Store, database_url: str) -> None:
    ca_cert = dataclasses.replace(issuance(4), auth_method="ca-internal", evidence="process:ca-0:1")
    store.append_issuances([issuance(1), issuance(2), issuance(3), ca_cert])
    result = run(database_url, "status")
    assert result.exit_code == 0, result.output
    header, _, values = result.output.split("Counts\n")[1].splitlines()[:3]
    assert header.split("  ")[:4] == [
        "roots",
        "intermediates",
        "issued to workloads",
        "CA server certificates",
    ]
    assert values.split() == ["0", "0", "3", "1"]
    assert "ledger rows by method: ca-internal: 1, k8s-jwt: 3" in result.output
    counts = json.loads(run(database_url, "status", "-o", "json").stdout)["counts"]
    assert counts == {
        "roots": 0,
        "intermediates": 0,
        "ledger_rows": 4,
        "issued_to_workloads": 3,
        "ca_server_certificates": 1,
        "by_method": {"ca-internal": 1, "k8s-jwt": 3},
    }


def test_status_tells_intermediates_in_use_from_abandoned_ones(
    store: Store, database_url: str
) -> None:
    now = datetime.now(UTC)
    store.add_root(root("a"))
    crashed = live_intermediate("1", "ca-0:100", now - timedelta(minutes=30))
    store.add_intermediate(crashed)  # never heard of since its creation 90 min ago: crashed
    stopped = live_intermediate("2", "ca-0:200", now)
    store.add_intermediate(stopped)
    assert store.retire_intermediates("ca-0:200", now) == 1
    replaced = live_intermediate("3", "ca-1:300", now)
    store.add_intermediate(replaced)
    current = live_intermediate("4", "ca-1:300", now)
    store.add_intermediate(current)
    store.heartbeat_intermediate("ca-1:300", current.fingerprint, now)

    document = json.loads(run(database_url, "status", "-o", "json").stdout)
    states = {i["fingerprint"][0]: i["state"] for i in document["intermediates"]}
    assert states == {"1": "abandoned", "2": "retired", "3": "retired", "4": "in-use"}
    by_fp = {i["fingerprint"][0]: i for i in document["intermediates"]}
    assert by_fp["1"]["last_seen_at"] == (now - timedelta(minutes=90)).isoformat().replace(
        "+00:00", "Z"
    )
    assert by_fp["2"]["retired_at"] is not None and by_fp["4"]["retired_at"] is None

    table = run(database_url, "status").output
    lines = {line[:16]: line for line in table.splitlines() if line[:1] in "1234"}
    assert lines["1" * 16].endswith(
        f"abandoned (last seen {(now - timedelta(minutes=90)).strftime('%Y-%m-%d %H:%M:%S')}Z)"
    )
    assert lines["4" * 16].endswith("in use")
    assert "retired " in lines["2" * 16] and "retired " in lines["3" * 16]


def test_root_list_json(store: Store, database_url: str) -> None:
    store.add_root(root("a"))
    result = run(database_url, "root", "list", "--output", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {
            "fingerprint": "a" * 64,
            "state": "active",
            "backend": "pkcs11",
            "key_ref": "token=meshca;label=root-a",
            "algorithm": "ecdsa-p256",
            "subject": "O=cluster.local, CN=meshca root a",
            "not_before": "2024-05-01T12:00:00.123456Z",
            "not_after": "2034-04-29T12:00:00.123456Z",
        }
    ]


def test_intermediates_recorded_before_revision_0003_keep_their_rows(database_url: str) -> None:
    """Upgrading a 0002 database keeps its intermediates; with no heartbeat on record,
    status says so instead of guessing."""
    engine = create_engine(database_url)
    if engine.dialect.name == "sqlite":
        Path(engine.url.database or "").parent.mkdir(parents=True)
    try:
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "0002")
        now = datetime.now(UTC)
        with engine.begin() as connection:
            # The roots table as 0002 had it (today's model has more columns).
            record = root("a")
            connection.execute(
                text(
                    "INSERT INTO roots (fingerprint, subject, backend, key_ref, algorithm, "
                    "certificate_pem, not_before, not_after, state, created_at) VALUES "
                    "(:fp, :subject, 'file', 'k', 'ec-p256', 'PEM', :nb, :na, 'active', :nb)"
                ),
                {
                    "fp": record.fingerprint,
                    "subject": record.subject,
                    "nb": record.not_before,
                    "na": record.not_after,
                },
            )
            connection.execute(
                text(
                    "INSERT INTO intermediates (fingerprint, serial_hex, root_fingerprint, "
                    "certificate_pem, not_before, not_after, owner, created_at) "
                    "VALUES (:fp, '7f', :root, 'PEM', :nb, :na, 'ca-0:1', :nb)"
                ),
                {"fp": "1" * 64, "root": "a" * 64, "nb": now, "na": now + timedelta(hours=1)},
            )
    finally:
        engine.dispose()
    Store.open(database_url).close()
    (inter,) = json.loads(run(database_url, "status", "-o", "json").stdout)["intermediates"]
    assert inter["fingerprint"] == "1" * 64 and inter["owner"] == "ca-0:1"
    assert inter["state"] == "unknown" and inter["last_seen_at"] is None
    assert "unknown (no heartbeat recorded)" in run(database_url, "status").output
