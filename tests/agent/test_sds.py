"""Envoy SDS v3 (meshca.agent.sds) against an Envoy-like client on a real Unix socket."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import stat
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from grpc import aio

from meshca.agent import _unix_socket
from meshca.agent._sds_protocol import Kind, StreamState
from meshca.agent.credentials import CredentialStore
from meshca.agent.sds import SdsServer
from meshca.errors import ConfigError
from tests.agent.sds_client import (
    SECRET_TYPE_URL,
    EnvoySdsClient,
    Received,
    fetch_secrets,
    unpack,
)
from tests.agent.support import WEB, LocalCA

QUIET = 0.3  # seconds to wait when asserting that nothing more arrives
NAMES_SORTED = ("ROOTCA", "default")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short, so that the socket path stays under the 107-byte sun_path limit.
    path = Path(tempfile.mkdtemp(prefix="sds-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store() -> CredentialStore:
    return CredentialStore()


@pytest.fixture
def ca() -> LocalCA:
    return LocalCA()


@pytest.fixture
async def sds(sock_dir: Path, store: CredentialStore) -> AsyncIterator[SdsServer]:
    server = SdsServer(sock_dir / "sds.sock")
    await server.start(store)
    yield server
    await server.stop()


async def _eventually(predicate: object, timeout: float = 5.0) -> None:
    """Poll a condition the test cannot await (server-side state), bounded."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def _spiffe_ids(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(uri) for uri in san.get_values_for_type(x509.UniformResourceIdentifier)]


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- subscription and the secrets' contents -------------------------------------------


async def test_subscriber_receives_certificate_key_and_bundle(
    sds: SdsServer, store: CredentialStore, ca: LocalCA
) -> None:
    creds = await ca.publish(store)
    async with EnvoySdsClient(sds.socket_path) as envoy:
        got = await envoy.wait_for_version(creds.version)
    assert set(got.secrets) == {"default", "ROOTCA"}
    chain = got.chain()
    assert chain == [*creds.chain]  # leaf, then the intermediate
    assert _spiffe_ids(chain[0]) == [str(WEB)]
    assert got.public_key_der() == _spki(chain[0])  # the key belongs to the leaf
    assert got.trusted_ca() == [ca.root]
    chain[0].verify_directly_issued_by(chain[1])
    chain[1].verify_directly_issued_by(got.trusted_ca()[0])
    assert envoy.acks == [(got.version, got.nonce)]


async def test_every_root_of_a_rotating_bundle_is_sent(
    sds: SdsServer, store: CredentialStore, ca: LocalCA
) -> None:
    next_root = LocalCA().root
    key, chain = ca.issue()
    await store.publish(WEB, key, chain, (ca.root, next_root))
    async with EnvoySdsClient(sds.socket_path) as envoy:
        got = await envoy.wait_for_version(1)
    assert got.trusted_ca() == [ca.root, next_root]


async def test_stream_opened_before_credentials_gets_them_when_published(
    sds: SdsServer, store: CredentialStore, ca: LocalCA
) -> None:
    async with EnvoySdsClient(sds.socket_path) as envoy:
        await _eventually(lambda: [s.resource_names for s in sds.streams()] == [NAMES_SORTED])
        await asyncio.sleep(QUIET)
        assert envoy.received == []
        creds = await ca.publish(store)
        got = await envoy.wait_for_version(creds.version)
    assert _spiffe_ids(got.chain()[0]) == [str(WEB)]


async def test_a_reconnecting_envoy_gets_the_secrets_whatever_version_it_reports(
    sds: SdsServer, store: CredentialStore, ca: LocalCA
) -> None:
    # After an agent restart versions start again at 1; Envoy may report that it holds "1"
    # (of the previous agent): it must still be sent this agent's secrets.
    creds = await ca.publish(store)
    async with EnvoySdsClient(sds.socket_path, initial_version="1") as envoy:
        got = await envoy.wait_for_version(1)
    assert got.chain()[0] == creds.leaf


async def test_only_subscribed_secrets_are_sent_and_pushed(
    sds: SdsServer, store: CredentialStore, ca: LocalCA
) -> None:
    await ca.publish(store)
    async with EnvoySdsClient(sds.socket_path, resource_names=["ROOTCA"]) as envoy:
        assert set((await envoy.wait_for_version(1)).secrets) == {"ROOTCA"}
        await ca.publish(store)
        assert set((await envoy.wait_for_version(2)).secrets) == {"ROOTCA"}


async def test_adding_a_name_on_an_open_stream_sends_just_that_secret(
    sds: SdsServer, store: CredentialStore, ca: LocalCA
) -> None:
    await ca.publish(store)
    async with EnvoySdsClient(sds.socket_path, resource_names=["ROOTCA"]) as envoy:
        first = await envoy.wait_for_version(1)
        envoy.resource_names = ["ROOTCA", "default"]
        await envoy.send(envoy.request(version=first.version, nonce=first.nonce))
        await envoy.wait_for(lambda c: len(c.received) == 2)
    assert set(envoy.received[1].secrets) == {"default"}
    assert envoy.received[1].version == "1"


async def test_unknown_names_are_left_out_and_logged_once(
    sds: SdsServer, store: CredentialStore, ca: LocalCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meshca.agent.sds")
    await ca.publish(store)
    names = ["default", "file-cert:/etc/certs/x.pem"]
    async with (
        EnvoySdsClient(sds.socket_path, resource_names=names) as one,
        EnvoySdsClient(sds.socket_path, resource_names=names) as two,
    ):
        for envoy in (one, two):
            assert set((await envoy.wait_for_version(1)).secrets) == {"default"}
        await ca.publish(store)
        for envoy in (one, two):
            await envoy.wait_for_version(2)
    warnings = [r for r in caplog.records if "file-cert:/etc/certs/x.pem" in r.getMessage()]
    assert len(warnings) == 1
    assert "does not serve" in warnings[0].getMessage()


# --- rotation, ACK and NACK ------------------------------------------------------------


async def test_rotation_is_pushed_to_every_open_stream(
    sds: SdsServer, store: CredentialStore, ca: LocalCA
) -> None:
    first = await ca.publish(store)
    clients = [EnvoySdsClient(sds.socket_path, node_id=f"envoy-{i}") for i in range(3)]
    for client in clients:
        await client.open()
    try:
        for client in clients:
            await client.wait_for_version(1)
        second = await ca.publish(store)
        for client in clients:
            got = await client.wait_for_version(2)
            assert got.chain()[0] == second.leaf != first.leaf
            assert [v for v, _ in client.acks] == ["1", "2"]
        await _eventually(lambda: sorted(s.acked_version for s in sds.streams()) == ["2"] * 3)
        assert sorted(s.node_id for s in sds.streams()) == ["envoy-0", "envoy-1", "envoy-2"]
    finally:
        for client in clients:
            await client.close()


async def test_nack_is_logged_not_resent_and_the_next_rotation_still_arrives(
    sds: SdsServer, store: CredentialStore, ca: LocalCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meshca.agent.sds")

    def reject(got: Received) -> str | None:
        return "Failed to load certificate chain: bad key" if got.version == "2" else None

    await ca.publish(store)
    async with EnvoySdsClient(sds.socket_path, reject=reject) as envoy:
        await envoy.wait_for_version(1)
        # Wait for the server to take the ACK: one that arrives after the v2 push would
        # carry a stale nonce and be ignored.
        await _eventually(lambda: [s.acked_version for s in sds.streams()] == ["1"])
        await ca.publish(store)
        nacked = await envoy.wait_for_version(2)
        # A client that keeps repeating its NACK does not get the version again.
        for _ in range(3):
            await envoy.send(envoy.request(version="1", nonce=nacked.nonce, error="again"))
        await _eventually(lambda: [s.nacked_version for s in sds.streams()] == ["2"])
        await asyncio.sleep(QUIET)
        assert [r.version for r in envoy.received] == ["1", "2"]
        assert envoy.nacks == [("2", nacked.nonce)]
        assert [s.acked_version for s in sds.streams()] == ["1"]

        await ca.publish(store)
        await envoy.wait_for_version(3)
        assert envoy.accepted_version == "3"
    nack_logs = [r.getMessage() for r in caplog.records if "rejected version 2" in r.getMessage()]
    assert len(nack_logs) == 1
    assert "bad key" in nack_logs[0]


async def test_requests_with_a_stale_nonce_are_ignored(
    sds: SdsServer, store: CredentialStore, ca: LocalCA
) -> None:
    await ca.publish(store)
    async with EnvoySdsClient(sds.socket_path) as envoy:
        v1 = await envoy.wait_for_version(1)
        await ca.publish(store)
        await envoy.wait_for_version(2)
        # A late request answering v1, which would also drop "default": superseded.
        envoy.resource_names = ["ROOTCA", "extra"]
        await envoy.send(envoy.request(version="1", nonce=v1.nonce))
        await envoy.send(envoy.request(version="1", nonce="never-sent"))
        await asyncio.sleep(QUIET)
        assert [r.version for r in envoy.received] == ["1", "2"]
        assert [s.resource_names for s in sds.streams()] == [NAMES_SORTED]
        assert [s.acked_version for s in sds.streams()] == ["2"]


async def test_a_burst_of_rotations_ends_on_the_newest_version(
    sds: SdsServer, store: CredentialStore, ca: LocalCA
) -> None:
    await ca.publish(store)
    async with EnvoySdsClient(sds.socket_path) as envoy:
        await envoy.wait_for_version(1)
        for _ in range(5):
            await ca.publish(store)
        await envoy.wait_for_version(6)
        await asyncio.sleep(QUIET)
        versions = [int(r.version) for r in envoy.received]
    assert versions == sorted(set(versions))  # never the same version twice, never back
    assert versions[-1] == 6


# --- FetchSecrets, DeltaSecrets, protocol errors -----------------------------------------


async def test_fetch_secrets(sds: SdsServer, store: CredentialStore, ca: LocalCA) -> None:
    with pytest.raises(aio.AioRpcError) as before:
        await fetch_secrets(sds.socket_path)
    assert before.value.code() is grpc.StatusCode.UNAVAILABLE

    creds = await ca.publish(store)
    response = await fetch_secrets(sds.socket_path)
    assert (response.version_info, response.type_url) == (str(creds.version), SECRET_TYPE_URL)
    assert response.nonce
    got = Received(response.version_info, response.nonce, unpack(response), 0.0)
    assert set(got.secrets) == {"default", "ROOTCA"}
    assert _spiffe_ids(got.chain()[0]) == [str(WEB)]
    assert got.public_key_der() == _spki(got.chain()[0])
    assert got.trusted_ca() == [ca.root]

    assert set(unpack(await fetch_secrets(sds.socket_path, ["ROOTCA", "nope"]))) == {"ROOTCA"}
    with pytest.raises(aio.AioRpcError) as unknown:
        await fetch_secrets(sds.socket_path, ["nope"])
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    assert "ROOTCA, default" in (unknown.value.details() or "")


async def test_delta_secrets_is_unimplemented(sds: SdsServer) -> None:
    async with aio.insecure_channel(f"unix:{sds.socket_path}") as channel:
        call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).DeltaSecrets(timeout=5)
        with pytest.raises(aio.AioRpcError) as refused:  # the server may answer first
            await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=SECRET_TYPE_URL))
            await call.read()
    assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_a_request_for_another_resource_type_ends_the_stream(
    sds: SdsServer, store: CredentialStore, ca: LocalCA
) -> None:
    await ca.publish(store)
    cluster_type = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    async with aio.insecure_channel(f"unix:{sds.socket_path}") as channel:
        call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(timeout=5)
        with pytest.raises(aio.AioRpcError) as refused:
            await call.write(discovery_pb2.DiscoveryRequest(type_url=cluster_type))
            await call.read()
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "envoy.extensions.transport_sockets.tls.v3.Secret" in (refused.value.details() or "")


async def test_key_material_is_never_logged(
    sds: SdsServer, store: CredentialStore, ca: LocalCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    keys = []
    async with EnvoySdsClient(sds.socket_path, reject=lambda r: "no" * (r.version == "2")) as e:
        for version in (1, 2, 3):
            keys.append((await ca.publish(store)).key_pem())
            await e.wait_for_version(version)
        await fetch_secrets(sds.socket_path)
    assert caplog.records  # the test saw the log at all
    for key in keys:
        body = b"".join(key.splitlines()[1:-1]).decode()
        for start in range(0, len(body) - 16, 16):
            assert body[start : start + 16] not in caplog.text
    assert "PRIVATE KEY" not in caplog.text


# --- the socket --------------------------------------------------------------------------


async def test_socket_has_mode_0600_and_nothing_else_is_left_beside_it(
    sds: SdsServer, sock_dir: Path
) -> None:
    st = os.stat(sds.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert os.listdir(sock_dir) == ["sds.sock"]


async def test_socket_is_bound_in_a_private_directory_before_its_mode_is_set(
    sock_dir: Path, store: CredentialStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int]] = []
    place = _unix_socket.PrivateUnixSocket.place

    def spy(self: _unix_socket.PrivateUnixSocket, staged: Path) -> None:
        seen.append((stat.S_IMODE(os.stat(staged.parent).st_mode), os.stat(staged).st_uid))
        place(self, staged)

    monkeypatch.setattr(_unix_socket.PrivateUnixSocket, "place", spy)
    server = SdsServer(sock_dir / "sds.sock", socket_mode=0o660, group=os.getgid())
    await server.start(store)
    try:
        assert seen == [(0o700, os.getuid())]
        st = os.stat(server.socket_path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, os.getgid())
    finally:
        await server.stop()


async def test_stale_socket_is_replaced(
    sock_dir: Path, store: CredentialStore, ca: LocalCA
) -> None:
    path = sock_dir / "sds.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # bound, never listening, file left behind
        dead.bind(os.fspath(path))
    server = SdsServer(path)
    await server.start(store)
    try:
        await ca.publish(store)
        async with EnvoySdsClient(path) as envoy:
            await envoy.wait_for_version(1)
    finally:
        await server.stop()
    assert not path.exists()  # stop removes the socket


async def test_a_socket_in_use_is_refused_and_keeps_serving(
    sds: SdsServer, store: CredentialStore, ca: LocalCA
) -> None:
    await ca.publish(store)
    with pytest.raises(ConfigError, match="in use"):
        await SdsServer(sds.socket_path).start(CredentialStore())
    response = await fetch_secrets(sds.socket_path)  # the first server still answers
    assert response.version_info == "1"


async def test_a_second_start_is_refused_and_a_failed_start_can_be_retried(
    sds: SdsServer, sock_dir: Path, store: CredentialStore, ca: LocalCA
) -> None:
    await ca.publish(store)
    with pytest.raises(RuntimeError, match="already started"):
        await sds.start(store)
    assert (await fetch_secrets(sds.socket_path)).version_info == "1"
    blocked = sock_dir / "later.sock"
    blocked.write_text("in the way")
    server = SdsServer(blocked)
    with pytest.raises(ConfigError, match="is not a socket"):
        await server.start(store)
    blocked.unlink()
    await server.start(store)  # nothing was left half-started
    try:
        assert (await fetch_secrets(blocked)).version_info == "1"
    finally:
        await server.stop()
    assert not blocked.exists()


async def test_bad_paths_and_owners_are_refused(sock_dir: Path, store: CredentialStore) -> None:
    regular = sock_dir / "not-a-socket"
    regular.write_text("keep me")
    with pytest.raises(ConfigError, match="is not a socket"):
        await SdsServer(regular).start(store)
    assert regular.read_text() == "keep me"
    made = SdsServer(sock_dir / "missing" / "sds.sock")
    await made.start(store)  # the directory is created, closed to others
    await made.stop()
    assert stat.S_IMODE((sock_dir / "missing").stat().st_mode) == 0o700
    shared = SdsServer(sock_dir / "shared" / "sds.sock", socket_mode=0o660)
    await shared.start(store)  # reachable by name for the socket's group, not listable
    await shared.stop()
    assert stat.S_IMODE((sock_dir / "shared").stat().st_mode) == 0o711
    for made_dir in ("missing", "shared"):  # the socket went; the directory stays
        (sock_dir / made_dir).rmdir()
    with pytest.raises(ConfigError, match="not a known user"):
        SdsServer(sock_dir / "sds.sock", owner="meshca-no-such-user")
    with pytest.raises(ConfigError, match="not a known group"):
        SdsServer(sock_dir / "sds.sock", group="meshca-no-such-group")
    with pytest.raises(ConfigError, match="longer than 107 bytes"):
        SdsServer(sock_dir / ("x" * 120))
    with pytest.raises(ConfigError, match="not a permission mode"):
        SdsServer(sock_dir / "sds.sock", socket_mode=0o4700)
    assert sorted(os.listdir(sock_dir)) == ["not-a-socket"]


# --- stream lifetime ---------------------------------------------------------------------


async def test_stop_ends_streams_and_a_new_server_takes_over(
    sock_dir: Path, store: CredentialStore, ca: LocalCA
) -> None:
    path = sock_dir / "sds.sock"
    server = SdsServer(path)
    await server.start(store)
    await ca.publish(store)
    envoy = EnvoySdsClient(path)
    await envoy.open()
    try:
        await envoy.wait_for_version(1)
        await server.stop()
        await envoy.wait_for(lambda c: c.ended is not None)
        # Ended by the server on purpose, not cancelled when the grace period ran out.
        assert (envoy.ended, envoy.ended_details) == (
            grpc.StatusCode.UNAVAILABLE,
            "the meshca agent is stopping",
        )
    finally:
        await envoy.close()
    successor = SdsServer(path)
    await successor.start(store)
    try:
        async with EnvoySdsClient(path) as again:
            await again.wait_for_version(1)
    finally:
        await successor.stop()


async def test_a_client_that_disconnects_is_forgotten(
    sds: SdsServer, store: CredentialStore, ca: LocalCA
) -> None:
    await ca.publish(store)
    async with EnvoySdsClient(sds.socket_path, node_id="stays") as stays:
        async with EnvoySdsClient(sds.socket_path, node_id="leaves") as leaves:
            await leaves.wait_for_version(1)
            await stays.wait_for_version(1)
            assert len(sds.streams()) == 2
        await _eventually(lambda: [s.node_id for s in sds.streams()] == ["stays"])
        await ca.publish(store)
        await stays.wait_for_version(2)


async def test_clients_leaving_during_a_burst_of_rotations_do_not_disturb_the_others(
    sds: SdsServer, store: CredentialStore, ca: LocalCA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await ca.publish(store)
    issued = [ca.issue() for _ in range(10)]
    clients = [EnvoySdsClient(sds.socket_path, node_id=f"envoy-{i}") for i in range(20)]
    await asyncio.gather(*(c.open() for c in clients))
    leaving, staying = clients[::2], clients[1::2]
    try:
        await asyncio.gather(*(c.wait_for_version(1) for c in clients))

        async def burst() -> None:
            for key, chain in issued:
                await store.publish(WEB, key, chain, (ca.root,))
                await asyncio.sleep(0)

        await asyncio.gather(burst(), *(c.close() for c in leaving))
        await asyncio.gather(*(c.wait_for_version(11) for c in staying))
        await _eventually(lambda: len(sds.streams()) == len(staying))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- many streams ------------------------------------------------------------------------


async def test_a_rotation_reaches_100_streams(
    sds: SdsServer, store: CredentialStore, ca: LocalCA
) -> None:
    await ca.publish(store)
    clients = [EnvoySdsClient(sds.socket_path, node_id=f"envoy-{i}") for i in range(100)]
    await asyncio.gather(*(c.open() for c in clients))
    try:
        await asyncio.gather(*(c.wait_for_version(1, timeout=15) for c in clients))
        key, chain = ca.issue()
        published = time.perf_counter()
        await store.publish(WEB, key, chain, (ca.root,))
        pushed = await asyncio.gather(*(c.wait_for_version(2, timeout=15) for c in clients))
        assert all(got.chain()[0] == chain[0] for got in pushed)
        await _eventually(lambda: sorted(s.acked_version for s in sds.streams()) == ["2"] * 100)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    latency_ms = sorted((got.at - published) * 1000 for got in pushed)
    p50 = statistics.median(latency_ms)
    p99 = latency_ms[98]
    print(
        f"\nSDS push latency, publish -> client, 100 streams: p50 {p50:.1f} ms, "
        f"p99 {p99:.1f} ms, last {latency_ms[-1]:.1f} ms"
    )


# --- the per-stream state machine (no I/O) ---------------------------------------------


def _request(
    names: list[str], *, version: str = "", nonce: str = "", error: str | None = None
) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(
        version_info=version, resource_names=names, response_nonce=nonce
    )
    if error is not None:
        request.error_detail.message = error
    return request


def test_wildcard_subscriptions() -> None:
    state = StreamState()
    outcome = state.on_request(_request([]), current=1)  # empty first request: everything
    assert outcome.send == {"default", "ROOTCA"}
    state.sent(1, "n1")
    state.on_request(_request([], version="1", nonce="n1"), current=1)
    assert state.names == {"default", "ROOTCA"}  # still wildcard
    star = StreamState()
    assert star.on_request(_request(["*", "x"]), current=1).send == {"default", "ROOTCA"}


def test_legacy_nack_and_a_pending_rotation() -> None:
    state = StreamState()
    state.on_request(_request(["ROOTCA"]), current=1)
    state.sent(1, "n1")
    # A client from before error_detail NACKs by repeating its previous version.
    assert state.on_request(_request(["ROOTCA"], version="", nonce="n1"), 1).kind is Kind.NACK
    # Adding a name while a newer version is not yet sent: send everything at that version.
    outcome = state.on_request(_request(["ROOTCA", "default"], version="", nonce="n1"), 2)
    assert outcome.send == {"default", "ROOTCA"}
