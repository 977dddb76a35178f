"""``meshca admin ledger verify|list`` as an operator runs them, table and JSON."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

from click.testing import CliRunner, Result
from sqlalchemy import insert, text

from meshca.cli.main import main
from meshca.store import LedgerEntry, NewIssuance, Store

from .helpers import issuance, tamper


def run(database_url: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["admin", "ledger", *args, "--database-url", database_url])


def forge_row_past_the_head(database_url: str, sequence: int) -> LedgerEntry:
    forged = issuance(77).to_entry(sequence, "ff" * 32)
    with tamper(database_url) as db:
        db.execute(insert(LedgerEntry.__table__).values(**forged.model_dump()))  # type: ignore[attr-defined]
    return forged


def test_verify_names_a_row_inserted_far_past_the_head(store: Store, database_url: str) -> None:
    store.append_issuances([issuance(i) for i in range(1, 43)])
    forged = forge_row_past_the_head(database_url, 5000)
    result = run(database_url, "verify")
    assert result.exit_code == 1
    assert (
        f"  sequence 5000 (serial {forged.serial_hex}): lies past the chain's head 42: "
        "inserted outside meshca"
    ) in result.output
    assert "past-head (1):" in result.output
    assert "missing" not in result.output
    assert "1 problem(s) of 1 kind(s) in 43 rows" in result.output


def test_verify_groups_problems_by_class_and_counts_the_unlisted(
    store: Store, database_url: str
) -> None:
    store.append_issuances([issuance(i) for i in range(1, 31)])
    with tamper(database_url) as db:
        db.execute(text("UPDATE ledger SET evidence = 'forged' WHERE sequence <= 25"))
        db.execute(text("DELETE FROM ledger WHERE sequence IN (27, 28)"))
    result = run(database_url, "verify")
    assert result.exit_code == 1
    assert "edited (25):" in result.output
    assert "  ... and 5 more edited problem(s), not listed" in result.output
    assert "missing (1):\n  sequences 27..28 (2 rows): missing (deleted)" in result.output
    assert f"sequence 1 (serial {issuance(1).serial_hex}): row hash does not match" in (
        result.output
    )


def test_verify_json(store: Store, database_url: str) -> None:
    store.append_issuances([issuance(i) for i in range(1, 6)])
    clean = run(database_url, "verify", "--output", "json")
    assert clean.exit_code == 0
    assert json.loads(clean.stdout) == {
        "ok": True,
        "rows_checked": 5,
        "head_sequence": 5,
        "totals": {},
        "problems": [],
        "omitted": 0,
    }
    forged = forge_row_past_the_head(database_url, 900)
    broken = run(database_url, "verify", "-o", "json")
    assert broken.exit_code == 1
    document = json.loads(broken.stdout)
    assert document["ok"] is False and document["totals"] == {"past-head": 1}
    assert document["problems"] == [
        {
            "kind": "past-head",
            "sequence": 900,
            "last_sequence": 900,
            "serial": forged.serial_hex,
            "detail": "lies past the chain's head 5: inserted outside meshca",
        }
    ]


def _issue(n: int, *, method: str = "k8s-jwt", at: datetime | None = None) -> NewIssuance:
    base = issuance(n, spiffe_id=f"spiffe://cluster.local/ns/prod/sa/app-{n % 2}")
    return dataclasses.replace(base, auth_method=method, issued_at=at or base.issued_at)


def test_list_filters_and_orders_newest_first(store: Store, database_url: str) -> None:
    now = datetime.now(UTC)
    store.append_issuances(
        [
            *(_issue(i) for i in range(1, 7)),
            _issue(7, method="ca-internal"),
            _issue(8, method="x509-svid", at=now - timedelta(minutes=5)),
        ]
    )

    def sequences(*args: str) -> list[int]:
        result = run(database_url, "list", "--output", "json", *args)
        assert result.exit_code == 0, result.output
        return [row["sequence"] for row in json.loads(result.stdout)]

    assert sequences() == [8, 7, 6, 5, 4, 3, 2, 1]
    assert sequences("--limit", "3") == [8, 7, 6]
    assert sequences("--spiffe-id", "spiffe://cluster.local/ns/prod/sa/app-1") == [7, 5, 3, 1]
    assert sequences("--method", "ca-internal") == [7]
    assert sequences("--method", "x509-svid", "--method", "ca-internal") == [8, 7]
    assert sequences("--since", "1h") == [8]
    assert sequences("--since", "2024-05-01T12:00:05Z") == [8, 7, 6, 5]
    assert sequences("--since", "2024-05-01T14:00:05+02:00") == [8, 7, 6, 5]
    serial = issuance(3).serial_hex
    colons = ":".join(serial.upper()[i : i + 2] for i in range(0, len(serial), 2))
    assert sequences("--serial", colons) == [3]
    assert sequences("--serial", "00" + serial) == [3]


def test_list_json_fields_and_table(store: Store, database_url: str) -> None:
    row = store.append_issuance(_issue(1))
    (listed,) = json.loads(run(database_url, "list", "-o", "json").stdout)
    assert listed == {
        "sequence": 1,
        "serial": row.serial_hex,
        "spiffe_id": "spiffe://cluster.local/ns/prod/sa/app-1",
        "auth_method": "k8s-jwt",
        "evidence": row.evidence,
        "peer_address": row.peer_address,
        "issued_at": "2024-05-01T12:00:01.123456Z",
        "not_before": "2024-05-01T11:59:01.123456Z",
        "not_after": "2024-05-01T13:00:01.123456Z",
        "intermediate_fingerprint": row.intermediate_fingerprint,
        "request_id": None,
        "csr_sha256": row.csr_sha256,
        "agent_spiffe_id": None,
        "node_name": None,
        "row_hash": row.row_hash,
    }
    table = run(database_url, "list")
    assert table.exit_code == 0
    header, _, line = table.output.splitlines()
    assert header.split() == [
        "sequence", "issued", "at", "serial", "spiffe", "id", "method", "not", "after", "peer"
    ]  # fmt: skip
    assert line.split()[:6] == [
        "1",
        "2024-05-01",
        "12:00:01Z",
        row.serial_hex,
        "spiffe://cluster.local/ns/prod/sa/app-1",
        "k8s-jwt",
    ]
    empty = run(database_url, "list", "--method", "gce-iit")
    assert empty.exit_code == 0 and empty.output == "no ledger rows match\n"


def test_list_refuses_unreadable_filters(store: Store, database_url: str) -> None:
    cases = {
        ("--since", "yesterday"): "--since 'yesterday' is neither a duration",
        ("--since", "2026-12-01T09:00:00"): "has no time zone; add Z (UTC)",
        ("--serial", "7g"): "--serial '7g' is not a hexadecimal serial number",
        ("--spiffe-id", "cluster.local/x"): "--spiffe-id: 'cluster.local/x' is not a SPIFFE ID",
        ("--method", "password"): "Invalid value for '--method'",
    }
    for args, message in cases.items():
        result = run(database_url, "list", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
