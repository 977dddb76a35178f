"""What the issue's "Resilience" section asks, each shown against a real CA on loopback:
an outage longer than a renewal interval, retryable and permanent refusals, a restarted
agent, a missing token file, and 200 agents starting at once."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization

from meshca.agent.credential_sources import CredentialError
from meshca.agent.credentials import X509Credentials
from meshca.agent.run import RunningAgent, start_agent
from tests.agent.conftest import (
    StartCA,
    eventually,
    metrics_text,
    settings_for,
    start,
    write_token,
)
from tests.agent.support import WEB

SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def _spki(creds: X509Credentials) -> bytes:
    return creds.private_key.public_key().public_bytes(serialization.Encoding.PEM, SPKI)


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def test_ca_outage_longer_than_a_renewal_interval(
    start_ca: StartCA, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    ca = await start_ca(max_ttl="8s", default_ttl="8s")
    settings = settings_for(ca, tmp_path, ttl="8s", renew_jitter=0.0, http_listen="127.0.0.1:0")
    agent = await start(agents, settings)
    async with asyncio.timeout(10):
        first = await agent.wait_ready()
    renewal_due = agent.engine.next_renewal
    assert renewal_due is not None

    await ca.stop()
    await eventually(
        lambda: datetime.now(UTC) > renewal_due and agent.engine.failures >= 2,
        10,
        "renewal attempts failing after the renewal time",
    )
    # The last valid certificate is still the one served, and that is visible.
    assert agent.store.current() is first and first.not_after > datetime.now(UTC)
    text = await metrics_text(agent)
    assert 'meshca_agent_renewal_failures_total{reason="unavailable"}' in text
    expiry = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("meshca_agent_certificate_expiry_seconds ")
    )
    assert 0 < expiry < 8
    status, body = await _get(f"http://127.0.0.1:{agent.http_port}/readyz")
    assert status == 200 and str(WEB) in body

    await ca.restart()  # same ports, same root
    backoff_max = settings.backoff_max.total_seconds()
    async with asyncio.timeout(backoff_max + 2.0):  # one backoff period, plus a handshake
        second = await agent.store.wait_newer(first.version)
    assert second.spiffe_id == WEB and _spki(second) != _spki(first)
    assert second.not_after > first.not_after
    assert agent.engine.failures == 0
    assert "meshca_agent_consecutive_failures 0.0" in await metrics_text(agent)


async def test_resource_exhausted_waits_for_the_servers_hint(
    start_ca: StartCA, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    # Two pods of one service account start together; the CA allows one request per
    # identity every two seconds.
    ca = await start_ca(rate_limit_per_identity="1/2second")
    settings = settings_for(ca, tmp_path)
    pair = [await start(agents, settings), await start(agents, settings)]
    async with asyncio.timeout(10):
        await asyncio.gather(*(a.wait_ready() for a in pair))
    assert sorted(a.engine.attempts for a in pair) == [1, 2]  # one retry, after the hint
    throttled = next(a for a in pair if a.engine.attempts == 2)
    text = await metrics_text(throttled)
    assert 'meshca_agent_renewal_failures_total{reason="resource_exhausted"} 1.0' in text


async def test_permission_denied_is_logged_with_its_reason_and_not_hammered(
    start_ca: StartCA,
    tmp_path: Path,
    agents: list[RunningAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca = await start_ca()
    # A tiny initial backoff: were the refusal treated as retryable, it would be hammered.
    settings = settings_for(ca, tmp_path, backoff_initial="10ms", backoff_max="1s")
    agent = await start(agents, settings)
    async with asyncio.timeout(10):
        first = await agent.wait_ready()
    write_token(tmp_path / "token", ca.kube, "db")  # the pod's token now names another SA
    caplog.set_level(logging.WARNING, logger="meshca.agent")
    agent.engine.renew_now()
    await eventually(lambda: agent.engine.failures >= 1, 5, "the renewal is refused")
    attempts = agent.engine.attempts
    await asyncio.sleep(2.5)
    assert agent.engine.attempts - attempts <= 3  # about one per backoff_max, no more
    assert agent.store.current() is first
    err = agent.engine.last_error
    assert err is not None and err.reason == "permission_denied"
    refusals = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert refusals and "permission_denied" in refusals[0].getMessage()
    assert "CSR asks for the identity" in refusals[0].getMessage()
    assert "retrying will not help" in refusals[0].getMessage()


async def test_restarted_agent_gets_a_fresh_certificate_and_key(
    start_ca: StartCA, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    ca = await start_ca()
    settings = settings_for(ca, tmp_path)
    before = await start(agents, settings)
    async with asyncio.timeout(10):
        old = await before.wait_ready()
    ledger = ca.running.store.counts().issued
    await before.stop()
    agents.remove(before)

    after = await start(agents, settings)
    async with asyncio.timeout(10):
        new = await after.wait_ready()
    assert new.spiffe_id == old.spiffe_id
    assert _spki(new) != _spki(old)
    assert new.leaf.serial_number != old.leaf.serial_number
    assert ca.running.store.counts().issued == ledger + 1  # issued anew, not reused


async def test_missing_token_file_is_a_clear_error_and_the_agent_recovers(
    start_ca: StartCA,
    tmp_path: Path,
    agents: list[RunningAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca = await start_ca()
    missing = tmp_path / "no-such-dir" / "istio-token"
    with pytest.raises(CredentialError) as info:
        await start_agent(settings_for(ca, tmp_path, token_file=missing))
    assert str(missing) in info.value.message

    # Removed while the agent runs: each attempt says which file, and none gives up.
    settings = settings_for(ca, tmp_path, backoff_max="300ms")
    agent = await start(agents, settings)
    async with asyncio.timeout(10):
        first = await agent.wait_ready()
    token = tmp_path / "token"
    token.unlink()
    agent.engine.renew_now()
    await eventually(lambda: agent.engine.failures >= 2, 5, "renewals fail without a token")
    err = agent.engine.last_error
    assert err is not None and err.reason == "token_unreadable" and str(token) in err.message
    assert any(str(token) in r.getMessage() for r in caplog.records)
    write_token(token, ca.kube)
    async with asyncio.timeout(5):
        second = await agent.store.wait_newer(first.version)
    assert second.spiffe_id == WEB


async def test_200_agents_starting_at_once_all_get_certificates(
    start_ca: StartCA, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    # One CA replica with tight limits; every agent shares the loopback peer address.
    ca = await start_ca(rate_limit_per_peer="50/second", max_in_flight=32)
    count = 200
    fleet_settings = []
    for i in range(count):
        workdir = tmp_path / f"agent-{i}"
        workdir.mkdir()
        token = write_token(workdir / "token", ca.kube, f"sa-{i}")
        fleet_settings.append(
            settings_for(ca, workdir, token_file=token, backoff_initial="200ms", backoff_max="1s")
        )
    # The agents start while the CA is still coming up, so that their requests reach it
    # together (within one backoff period) however slowly this machine starts them.
    await ca.stop()
    fleet = await asyncio.gather(*(start(agents, s) for s in fleet_settings))
    await eventually(lambda: all(a.engine.failures for a in fleet), 20, "every agent tried")
    await ca.restart()
    async with asyncio.timeout(45):
        issued = await asyncio.gather(*(a.wait_ready() for a in fleet))
    assert len({str(c.spiffe_id) for c in issued}) == count
    assert not [a for a in fleet if a.task.done()]  # none gave up
    assert all(a.engine.failures == 0 for a in fleet)
    throttled = [
        a
        for a in fleet
        if 'renewal_failures_total{reason="resource_exhausted"}' in await metrics_text(a)
    ]
    assert throttled  # the limits were reached, and retried through
