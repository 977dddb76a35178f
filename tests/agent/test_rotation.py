"""The rotation engine: the schedule, jitter and backoff arithmetic under freezegun, then
real rotation in real time against a real CA issuing certificates of a few seconds."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from freezegun import freeze_time

from meshca.agent.credentials import CredentialStore, X509Credentials
from meshca.agent.metrics import AgentMetrics
from meshca.agent.rotation import Backoff, RenewalSchedule
from meshca.agent.run import RunningAgent
from meshca.pki.keys import KeyAlgorithm
from tests.agent.conftest import StartCA, eventually, metrics_text, settings_for, start
from tests.agent.support import WEB, LocalCA

PEM = serialization.Encoding.PEM

# -- arithmetic, on a frozen clock ------------------------------------------------------


def test_renewal_is_at_half_life_counted_from_the_request_with_bounded_jitter() -> None:
    with freeze_time("2030-01-01 00:00:00"):
        asked = datetime.now(UTC)
        _, chain = LocalCA().issue(ttl=timedelta(hours=1))
        leaf = chain[0]
        assert leaf.not_valid_before_utc < asked  # backdated by the CA for clock skew
        exact = RenewalSchedule(0.5, 0.0).for_leaf(leaf, asked, random.Random(1))
        assert exact == asked + timedelta(minutes=30)
        times = [
            RenewalSchedule(0.5, 0.1).for_leaf(leaf, asked, random.Random(seed))
            for seed in range(300)
        ]
    assert all(asked + timedelta(minutes=27) <= t <= asked + timedelta(minutes=33) for t in times)
    assert max(times) - min(times) > timedelta(minutes=5)  # a fleet is spread out
    assert len(set(times)) == len(times)


def test_a_certificate_already_past_its_life_renews_at_once() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert RenewalSchedule().renew_at(now, now - timedelta(seconds=1), random.Random(0)) == now


@pytest.mark.parametrize(("ratio", "jitter"), [(0.05, 0.2), (0.95, 0.2), (1.0, 0.0)])
def test_schedules_reaching_outside_the_life_are_refused(ratio: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        RenewalSchedule(ratio, jitter)


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    backoff = Backoff(timedelta(seconds=1), timedelta(seconds=60))
    rng = random.Random(42)
    for failures in range(1, 12):
        cap = min(60.0, 2.0 ** (failures - 1))
        delays = [backoff.delay(failures, rng) for _ in range(400)]
        assert all(0 <= d <= cap for d in delays)
        assert statistics.mean(delays) == pytest.approx(cap / 2, rel=0.15)


def test_backoff_honours_the_server_hint_and_spreads_above_it() -> None:
    backoff = Backoff(timedelta(milliseconds=200), timedelta(seconds=10))
    rng = random.Random(3)
    delays = [backoff.delay(1, rng, hint=2.0) for _ in range(200)]
    assert all(2.0 <= d <= 2.2 for d in delays) and max(delays) - min(delays) > 0.1
    assert backoff.delay(1, rng, hint=30.0) == 30.0  # a hint beyond the cap still wins


def test_permanent_errors_wait_the_maximum_every_time() -> None:
    backoff = Backoff(timedelta(milliseconds=10), timedelta(seconds=60))
    rng = random.Random(5)
    delays = [backoff.delay(n, rng, retryable=False) for n in range(1, 100)]
    assert all(48 <= d <= 60 for d in delays)


def test_expiry_metric_follows_the_clock() -> None:
    with freeze_time("2030-01-01 00:00:00") as frozen:
        store = CredentialStore()
        key, chain = LocalCA().issue(ttl=timedelta(hours=1))
        store._current = X509Credentials(WEB, key, chain, (chain[-1],), 1)
        metrics = AgentMetrics()
        metrics.track(store)
        assert b"meshca_agent_certificate_expiry_seconds 3600.0" in metrics.exposition()
        frozen.tick(timedelta(minutes=45))
        assert b"meshca_agent_certificate_expiry_seconds 900.0" in metrics.exposition()


# -- real rotation in real time ---------------------------------------------------------


def _spki(creds: X509Credentials) -> bytes:
    return creds.private_key.public_key().public_bytes(
        PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_renews_at_half_life_with_a_new_key_each_time_in_real_time(
    start_ca: StartCA, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    ca = await start_ca(max_ttl="4s", default_ttl="4s")
    settings = settings_for(ca, tmp_path, ttl="4s", renew_jitter=0.0, mtls_address=ca.mtls_address)
    agent = await start(agents, settings)
    seen: list[tuple[datetime, X509Credentials]] = []
    async with asyncio.timeout(15):
        version = 0
        while len(seen) < 3:
            creds = await agent.store.wait_newer(version)
            version = creds.version
            seen.append((datetime.now(UTC), creds))
    assert [c.version for _, c in seen] == [1, 2, 3]
    assert len({_spki(c) for _, c in seen}) == 3  # a new key for every certificate
    assert len({c.leaf.serial_number for _, c in seen}) == 3
    for (got_old, old), (got_new, new) in itertools.pairwise(seen):
        assert new.spiffe_id == old.spiffe_id == WEB
        assert got_new < old.not_after  # renewed while the old one was still valid
        # ...and not much before half its life (3-4 s here: notAfter is whole seconds)
        assert got_new - got_old >= timedelta(seconds=1)
    text = await metrics_text(agent)
    assert 'meshca_agent_renewals_total{via="token"} 1.0' in text  # the first certificate
    assert 'meshca_agent_renewals_total{via="svid"} 2.0' in text  # renewals on the mTLS port
    assert "meshca_agent_renewal_failures_total{" not in text

    await agent.stop()
    agents.remove(agent)
    assert agent.task.done()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "meshca-agent-rotation"]


async def test_every_root_of_the_bundle_is_passed_on_and_refreshed(
    start_ca: StartCA, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    ca = await start_ca()
    settings = settings_for(ca, tmp_path, bundle_refresh_interval="200ms")
    agent = await start(agents, settings)
    async with asyncio.timeout(10):
        first = await agent.wait_ready()
    assert [c.public_bytes(PEM) for c in first.bundle] == [ca.root_pem]

    next_root = LocalCA().root  # a root rotation under way: both roots trusted
    (tmp_path / "ca-root.pem").write_bytes(ca.root_pem + next_root.public_bytes(PEM))
    async with asyncio.timeout(10):
        second = await agent.store.wait_newer(first.version)
    assert len(second.bundle) == 2 and second.bundle[1] == next_root
    assert second.leaf == first.leaf  # only the bundle changed
    assert "meshca_agent_trust_bundle_roots 2.0" in await metrics_text(agent)

    (tmp_path / "ca-root.pem").write_text("not a bundle")  # a broken ConfigMap update
    await eventually(
        lambda: (
            "meshca_agent_bundle_refresh_failures_total" in agent.metrics.exposition().decode()
            and 'reason="bundle_malformed"' in agent.metrics.exposition().decode()
        ),
        5,
        "a refused bundle refresh is counted",
    )
    assert agent.store.current() == second  # the anchors in force are kept


async def test_plaintext_development_mode_learns_the_root(
    start_ca: StartCA, tmp_path: Path, agents: list[RunningAgent]
) -> None:
    ca = await start_ca(plaintext=True)
    settings = settings_for(
        ca, tmp_path, ca_trust_bundle=None, ca_server_name=None, ca_plaintext=True
    )
    agent = await start(agents, settings)
    async with asyncio.timeout(10):
        creds = await agent.wait_ready()
    assert creds.spiffe_id == WEB
    assert [c.public_bytes(PEM) for c in creds.bundle] == [ca.root_pem]
    assert "(plaintext)" in agent.status_line()


@pytest.mark.parametrize("key_type", [KeyAlgorithm.EC_P384, KeyAlgorithm.RSA_2048])
async def test_svid_credential_renews_from_a_bootstrap_svid(
    start_ca: StartCA, tmp_path: Path, agents: list[RunningAgent], key_type: KeyAlgorithm
) -> None:
    ca = await start_ca()
    first = await start(agents, settings_for(ca, tmp_path))
    async with asyncio.timeout(10):
        bootstrap = await first.wait_ready()
    (tmp_path / "svid.pem").write_bytes(bootstrap.chain_pem())
    (tmp_path / "svid-key.pem").write_bytes(bootstrap.key_pem())
    (tmp_path / "token").unlink()  # no token: the SVID is the only credential
    svid_settings = settings_for(
        ca,
        tmp_path,
        token_file=tmp_path / "token",
        credential="svid",
        mtls_address=ca.mtls_address,
        svid_cert_file=tmp_path / "svid.pem",
        svid_key_file=tmp_path / "svid-key.pem",
        key_type=key_type,
    )
    agent = await start(agents, svid_settings)
    async with asyncio.timeout(10):
        creds = await agent.wait_ready()
    assert creds.spiffe_id == WEB
    assert KeyAlgorithm.of(creds.private_key) is key_type
    assert _spki(creds) != _spki(bootstrap)
    assert 'meshca_agent_renewals_total{via="svid"} 1.0' in await metrics_text(agent)
