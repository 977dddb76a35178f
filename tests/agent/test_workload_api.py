"""The SPIFFE Workload API server against py-spiffe, the reference Python client.

py-spiffe runs unchanged in a subprocess (tests/agent/wlapi_client.py): its generated
workload_pb2 and meshca's define the same top-level protobuf names and cannot share a
process, so ``spiffe`` is never imported here. In-process checks (the security header,
exact wire bytes, shutdown) use a plain gRPC client built from meshca's own stubs.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import meshca
from meshca.agent.credentials import CredentialStore, X509Credentials
from meshca.agent.workload_api import HEADER, WorkloadApiServer
from meshca.api._proto import workload_pb2, workload_pb2_grpc
from meshca.errors import ConfigError
from tests.agent.support import WEB, LocalCA

CLIENT = Path(__file__).with_name("wlapi_client.py")
WAIT = 10.0  # upper bound on every wait in this module, in seconds
ROTATIONS = 5
WITH_HEADER = ((HEADER, "true"),)

StartServer = Callable[..., Awaitable[WorkloadApiServer]]


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def der(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


def as_seen_by_py_spiffe(creds: X509Credentials) -> dict[str, Any]:
    return {
        "spiffe_id": str(creds.spiffe_id),
        "serial": format(creds.leaf.serial_number, "x"),
        "chain": [fingerprint(c) for c in creds.chain],
        "key_matches_leaf": True,
    }


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory: pytest's tmp_path can pass the 107-byte Unix socket limit."""
    path = Path(tempfile.mkdtemp(prefix="wlapi-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store() -> CredentialStore:
    return CredentialStore()


@pytest.fixture
def ca() -> LocalCA:
    return LocalCA()


@pytest.fixture
async def start_server(sock_dir: Path, store: CredentialStore) -> AsyncIterator[StartServer]:
    started: list[WorkloadApiServer] = []

    async def start(path: Path | None = None, **options: Any) -> WorkloadApiServer:
        server = WorkloadApiServer(path or sock_dir / "agent.sock", **options)
        await server.start(store)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def server(start_server: StartServer) -> WorkloadApiServer:
    return await start_server()


@pytest.fixture
async def stub(server: WorkloadApiServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"unix:{server.socket_path}") as channel:
        yield workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)


@contextlib.asynccontextmanager
async def py_spiffe(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """wlapi_client.py in a subprocess of this virtualenv's interpreter, killed on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CLIENT),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), WAIT)


async def next_event(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None and proc.stderr is not None
    line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
    if not line:
        stderr = await asyncio.wait_for(proc.stderr.read(), WAIT)
        pytest.fail(f"py-spiffe client exited without output: {stderr.decode()[-2000:]}")
    event: dict[str, Any] = json.loads(line)
    assert "error" not in event, f"py-spiffe client: {event['error']}"
    return event


async def fetch_with_py_spiffe(socket_path: Path) -> dict[str, Any]:
    async with py_spiffe("fetch", str(socket_path), str(WAIT)) as proc:
        return await next_event(proc)


async def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT}s waiting for {what}")
        await asyncio.sleep(0.01)


# py-spiffe, unchanged, against the server


async def test_py_spiffe_fetches_the_svid_key_and_bundle(
    server: WorkloadApiServer, store: CredentialStore, ca: LocalCA
) -> None:
    creds = await ca.publish(store)

    got = await fetch_with_py_spiffe(server.socket_path)

    assert got["svid"] == as_seen_by_py_spiffe(creds)
    assert got["context"] == {**as_seen_by_py_spiffe(creds), "chain_verifies": True}
    roots = {"cluster.local": [fingerprint(ca.root)]}
    assert got["bundles"] == roots
    assert got["context_bundles"] == roots


async def test_a_bundle_with_several_roots_is_passed_whole(
    server: WorkloadApiServer, store: CredentialStore, ca: LocalCA
) -> None:
    next_root = LocalCA().root  # a second root of the same trust domain, as in a rotation
    key, chain = ca.issue()
    creds = await store.publish(WEB, key, chain, (ca.root, next_root))

    got = await fetch_with_py_spiffe(server.socket_path)

    roots = {"cluster.local": sorted([fingerprint(ca.root), fingerprint(next_root)])}
    assert got["bundles"] == roots
    assert got["context_bundles"] == roots
    assert got["context"] == {**as_seen_by_py_spiffe(creds), "chain_verifies": True}


async def test_x509_source_receives_every_rotation(
    server: WorkloadApiServer,
    store: CredentialStore,
    ca: LocalCA,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = await ca.publish(store)
    latencies: list[float] = []
    async with py_spiffe("watch", str(server.socket_path), str(ROTATIONS), str(WAIT)) as proc:
        ready = await next_event(proc)
        assert ready["serial"] == format(first.leaf.serial_number, "x")
        assert ready["chain_verifies"] is True

        for _ in range(ROTATIONS):
            key, chain = ca.issue()
            published_at = time.monotonic()  # system-wide clock: comparable across processes
            creds = await store.publish(WEB, key, chain, (ca.root,))
            update = await next_event(proc)
            assert update == {
                "event": "update",
                "at": update["at"],
                **as_seen_by_py_spiffe(creds),
            }
            latencies.append(update["at"] - published_at)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0

    with capsys.disabled():
        print(
            f"\nWorkload API publish -> py-spiffe X509Source update over {ROTATIONS} "
            f"rotations: p50 {statistics.median(latencies) * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms"
        )


async def test_a_client_connecting_before_credentials_exist_gets_them_when_published(
    server: WorkloadApiServer, store: CredentialStore, ca: LocalCA
) -> None:
    async with py_spiffe("fetch", str(server.socket_path), str(WAIT)) as proc:
        await eventually(lambda: server.open_streams > 0, "py-spiffe to open its stream")
        creds = await ca.publish(store)
        got = await next_event(proc)

    assert got["svid"] == as_seen_by_py_spiffe(creds)


# The wire, checked with meshca's own stubs


async def test_the_svid_message_carries_der_chain_pkcs8_key_and_roots(
    stub: Any, store: CredentialStore, ca: LocalCA
) -> None:
    creds = await ca.publish(store)

    call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=WITH_HEADER)
    response = await asyncio.wait_for(call.read(), WAIT)
    call.cancel()

    (svid,) = response.svids
    assert svid.spiffe_id == "spiffe://cluster.local/ns/default/sa/web"
    assert svid.x509_svid == der(creds.leaf, ca.intermediate)  # leaf first
    assert svid.x509_svid_key == creds.key_der()
    assert svid.bundle == der(ca.root)
    assert svid.hint == ""
    assert not response.crl and not response.federated_bundles


@pytest.mark.parametrize(
    "metadata",
    [(), ((HEADER, "false"),), ((HEADER, "True"),)],
    ids=["no-header", "header-false", "header-wrong-case"],
)
@pytest.mark.parametrize("method", ["FetchX509SVID", "FetchX509Bundles"])
async def test_a_call_without_the_security_header_is_invalid_argument(
    stub: Any, store: CredentialStore, ca: LocalCA, method: str, metadata: tuple[Any, ...]
) -> None:
    await ca.publish(store)  # credentials exist: only the header is wrong
    request = {
        "FetchX509SVID": workload_pb2.X509SVIDRequest,
        "FetchX509Bundles": workload_pb2.X509BundlesRequest,
    }[method]

    call = getattr(stub, method)(request(), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(call.read(), WAIT)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'workload.spiffe.io: true' gRPC metadata header is required" in str(
        refused.value.details()
    )


async def test_the_jwt_profile_is_unimplemented(stub: Any) -> None:
    calls = [
        stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=WITH_HEADER, timeout=WAIT
        ),
        stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="x", svid="a.b.c"),
            metadata=WITH_HEADER,
            timeout=WAIT,
        ),
    ]
    bundles = stub.FetchJWTBundles(
        workload_pb2.JWTBundlesRequest(), metadata=WITH_HEADER, timeout=WAIT
    )
    for call in [*calls, bundles.read()]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "X509-SVIDs only" in str(refused.value.details())


async def test_the_bundle_stream_pushes_when_the_bundle_changes_not_on_svid_rotation(
    server: WorkloadApiServer, stub: Any, store: CredentialStore, ca: LocalCA
) -> None:
    await ca.publish(store)
    bundles = stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=WITH_HEADER)
    svids = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=WITH_HEADER)
    first = await asyncio.wait_for(bundles.read(), WAIT)
    assert dict(first.bundles) == {"spiffe://cluster.local": der(ca.root)}
    await asyncio.wait_for(svids.read(), WAIT)

    rotated = await ca.publish(store)  # new SVID, same bundle
    pushed = await asyncio.wait_for(svids.read(), WAIT)
    assert pushed.svids[0].x509_svid == rotated.chain_der()
    await asyncio.sleep(0.2)  # room for a (wrong) bundle push before the real change
    next_root = LocalCA().root
    await store.publish_bundle((ca.root, next_root))

    second = await asyncio.wait_for(bundles.read(), WAIT)
    assert dict(second.bundles) == {"spiffe://cluster.local": der(ca.root, next_root)}
    bundles.cancel()
    svids.cancel()
    await eventually(lambda: server.open_streams == 0, "cancelled streams to be released")


# The socket


@pytest.mark.parametrize(
    ("mode", "group"), [(0o600, None), (0o660, os.getgid())], ids=["default", "0660+group"]
)
async def test_the_socket_has_its_mode_whatever_the_umask(
    start_server: StartServer, sock_dir: Path, mode: int, group: int | None
) -> None:
    umask = os.umask(0)  # the widest a process could have: the socket must not follow it
    try:
        server = await start_server(socket_mode=mode, group=group)
    finally:
        os.umask(umask)

    st = os.lstat(server.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode
    assert st.st_gid == os.getgid()
    assert os.listdir(sock_dir) == ["agent.sock"]  # the private bind directory is gone


async def test_a_stale_socket_is_replaced(
    start_server: StartServer, sock_dir: Path, store: CredentialStore, ca: LocalCA
) -> None:
    path = sock_dir / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # left behind, as by an agent that was killed
    os.chmod(path, 0o666)

    server = await start_server(path)
    creds = await ca.publish(store)

    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    got = await fetch_with_py_spiffe(server.socket_path)
    assert got["svid"] == as_seen_by_py_spiffe(creds)


async def test_a_live_socket_or_another_file_is_not_replaced(
    server: WorkloadApiServer, stub: Any, sock_dir: Path, store: CredentialStore, ca: LocalCA
) -> None:
    with pytest.raises(ConfigError, match="is in use: another process"):
        await WorkloadApiServer(server.socket_path).start(store)
    await ca.publish(store)
    call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=WITH_HEADER)
    assert (await asyncio.wait_for(call.read(), WAIT)).svids  # the first server still serves
    call.cancel()

    other = sock_dir / "notes.txt"
    other.write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        await WorkloadApiServer(other).start(store)
    assert other.read_text() == "keep me"


async def test_stop_ends_open_streams_and_removes_the_socket(
    start_server: StartServer, store: CredentialStore, ca: LocalCA
) -> None:
    server = await start_server()
    await ca.publish(store)
    async with grpc.aio.insecure_channel(f"unix:{server.socket_path}") as channel:
        call = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=WITH_HEADER
        )
        await asyncio.wait_for(call.read(), WAIT)

        await asyncio.wait_for(server.stop(), WAIT)

        assert await asyncio.wait_for(call.read(), WAIT) is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert not server.socket_path.exists()


def test_meshca_never_imports_py_spiffe() -> None:
    """Importing ``spiffe`` next to meshca's Workload API stubs would fail (same names)."""
    offenders = []
    for source in Path(meshca.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{source}: {n}" for n in names if n.split(".")[0] == "spiffe"]
    assert offenders == []
    assert "spiffe" not in sys.modules
