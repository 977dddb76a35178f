"""``meshca admin join-token create|list|revoke`` against a real database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshca.authn.join_token import TOKEN_PREFIX, token_digest
from meshca.cli.main import main
from meshca.store import Store


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    Store.open(f"sqlite:///{state / 'meshca.db'}").close()
    return state


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["admin", "join-token", *args])
    return result.exit_code, result.stdout, result.stderr


def _raw_database(state_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in state_dir.glob("meshca.db*"))


def test_create_prints_tokens_and_stores_only_their_hashes(state_dir: Path) -> None:
    code, out, err = _run(
        "create", "--state-dir", str(state_dir), "--spiffe-id", "/vm/db", "--count", "3"
    )
    assert code == 0, err
    tokens = out.split()
    assert len(tokens) == 3 and all(t.startswith(TOKEN_PREFIX) for t in tokens)
    assert "3 join token(s) for spiffe://cluster.local/vm/db" in err
    raw = _raw_database(state_dir)
    for token in tokens:
        assert token.encode() not in raw
        assert token_digest(token).encode() in raw

    code, out, _ = _run("list", "--state-dir", str(state_dir), "-o", "json")
    listed = json.loads(out)
    assert {t["id"] for t in listed} == {token_digest(t)[:16] for t in tokens}
    assert {t["state"] for t in listed} == {"unused"}
    assert all(t["created_by"] and t["used_by"] is None for t in listed)
    assert tokens[0] not in out

    code, out, _ = _run("revoke", "--state-dir", str(state_dir), token_digest(tokens[0])[:8])
    assert code == 0 and out.startswith(f"revoked {token_digest(tokens[0])[:16]}")
    code, out, _ = _run("list", "--state-dir", str(state_dir))
    assert out.count("revoked") == 1 and out.count("unused") == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spiffe-id", "spiffe://other.example/vm/db"], "outside the CA's trust domain"),
        (["--spiffe-id", "spiffe://cluster.local"], "names the trust domain"),
        (["--spiffe-id", "vm/db"], "--spiffe-id"),
        (["--spiffe-id", "/vm/db", "--ttl", "31d"], "at most 30d"),
        (["--spiffe-id", "/vm/db", "--ttl", "soon"], "--ttl"),
        (["--spiffe-id", "/vm/db", "--count", "0"], "--count"),
    ],
)
def test_create_refuses_bad_input_and_stores_nothing(
    state_dir: Path, args: list[str], message: str
) -> None:
    code, out, err = _run("create", "--state-dir", str(state_dir), *args)
    assert code == 2 and message in err
    assert TOKEN_PREFIX not in out
    _, listed, _ = _run("list", "--state-dir", str(state_dir))
    assert listed.strip() == "no join tokens"


def test_a_mistyped_state_dir_creates_no_token_and_no_database(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    code, out, err = _run("create", "--state-dir", str(missing), "--spiffe-id", "/vm/db")
    assert code == 1 and "no meshca database" in err
    assert out == "" and not missing.exists()
