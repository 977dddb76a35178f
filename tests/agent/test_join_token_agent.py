"""``credential: join-token``: the first certificate from the token, then the SVID only;
after a restart the agent renews with the SVID it wrote, as its token is spent."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meshca.agent.config import load_agent_settings
from meshca.agent.run import RunningAgent
from meshca.authn.join_token import new_token, token_digest
from meshca.errors import ConfigError
from meshca.store import JoinToken
from tests.agent.conftest import CA, StartCA, eventually, metrics_text, settings_for, start

VM_ID = "spiffe://cluster.local/vm/db-1"


def _token_file(ca: CA, path: Path) -> Path:
    token = new_token()
    now = datetime.now(UTC)
    ca.running.store.add_join_tokens(
        [
            JoinToken(
                token_sha256=token_digest(token),
                spiffe_id=VM_ID,
                created_at=now,
                expires_at=now + timedelta(hours=1),
                created_by="test",
            )
        ]
    )
    path.write_text(token + "\n")
    return path


async def test_the_token_gets_the_first_certificate_and_the_svid_every_renewal(
    start_ca: StartCA, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    ca = await start_ca(max_ttl="3s", default_ttl="3s")
    out = tmp_path / "certs" / "vm"  # made by the agent
    settings = settings_for(
        ca,
        tmp_path,
        credential="join-token",
        token_file=_token_file(ca, tmp_path / "join-token"),
        mtls_address=ca.mtls_address,
        output_dir=out,
        ttl="3s",
    )
    agent = await start(agents, settings)
    creds = await asyncio.wait_for(agent.wait_ready(), 10)
    assert str(creds.spiffe_id) == VM_ID
    (record,) = ca.running.store.list_join_tokens()
    assert record.used_at is not None and record.used_by is not None
    text = ""

    def renewed_by_svid() -> bool:
        nonlocal text
        text = agent.metrics.exposition().decode()
        return 'meshca_agent_renewals_total{via="svid"} 1.0' in text

    await eventually(renewed_by_svid, 10, "a renewal with the SVID")
    assert 'meshca_agent_renewals_total{via="token"} 1.0' in text
    assert "join_token" not in text  # no refusal on the way
    assert (out / "cert-chain.pem").exists()

    await agent.stop()
    agents.remove(agent)
    again = await start(agents, settings)  # the token in the file is spent now
    creds = await asyncio.wait_for(again.wait_ready(), 10)
    assert str(creds.spiffe_id) == VM_ID
    text = await metrics_text(again)
    assert 'meshca_agent_renewals_total{via="svid"} 1.0' in text
    assert 'via="token"' not in text


async def test_without_an_earlier_svid_a_spent_token_is_refused_with_the_reason(
    start_ca: StartCA, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    ca = await start_ca()
    token_file = _token_file(ca, tmp_path / "join-token")
    options = {
        "credential": "join-token",
        "token_file": token_file,
        "mtls_address": ca.mtls_address,
    }
    first = await start(agents, settings_for(ca, tmp_path, **options))
    await asyncio.wait_for(first.wait_ready(), 10)
    second = await start(agents, settings_for(ca, tmp_path, **options))
    await eventually(lambda: second.engine.last_error is not None, 10, "a refusal")
    error = second.engine.last_error
    assert error is not None and error.reason == "unauthenticated"
    assert "already used" in str(error)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"token_file": "/tmp/t"}, "set mtls_address"),
        ({"mtls_address": "127.0.0.1:1"}, "set it to the file holding"),
    ],
)
def test_settings_name_what_a_join_token_agent_needs(options: dict[str, str], message: str) -> None:
    base = {"ca_address": "127.0.0.1:1", "ca_trust_bundle": "/x"}
    with pytest.raises(ConfigError, match=message):
        load_agent_settings(credential="join-token", **base, **options)
