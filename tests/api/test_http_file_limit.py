"""The HTTP port never takes the descriptors issuance needs: ``meshca server`` under a
small open-file limit, its HTTP port flooded, still issues certificates."""

from __future__ import annotations

import asyncio
import os
import resource
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import READY, ServerProcess, loopback_args
from tests.fakes.kube import FakeKubeApi
from tests.support import (
    create_certificate,
    make_csr,
    tls_channel,
    uri_sans,
    verify_with_cryptography,
)

pytestmark = pytest.mark.e2e

FILE_LIMIT = 160
FLOOD = 400
WEB_ID = "spiffe://cluster.local/ns/default/sa/web"


def _small_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, FILE_LIMIT))


async def _start(args: list[str], log: Path) -> ServerProcess:
    """``meshca server`` under the small file limit; its log goes to a file, so a full
    pipe can never stall it."""
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshca",
            "server",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=dict(os.environ),
            preexec_fn=_small_file_limit,
        )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    match = READY.search(line)
    if match is None:
        process.kill()
        await process.wait()
        raise AssertionError(f"meshca did not start: {line}{log.read_text()}")
    return ServerProcess(process, int(match["grpc"]), int(match["http"]), line, log)


async def test_a_flooded_http_port_leaves_descriptors_for_issuance(tmp_path: Path) -> None:
    async with FakeKubeApi() as kube:
        args = [*loopback_args(tmp_path / "state"), "--k8s-oidc-issuer", kube.issuer]
        server = await _start(args, tmp_path / "server.log")
        try:
            await _flood_and_issue(server, kube)
        finally:
            await server.stop()


async def _flood_and_issue(server: ServerProcess, kube: FakeKubeApi) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    writer.write(b"GET /v1/bundle HTTP/1.1\r\nHost: meshca\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    root_pem = answer.partition(b"\r\n\r\n")[2]

    flood: list[asyncio.StreamWriter] = []
    try:
        # Half-sent requests from 40 addresses: more than the process could hold
        # beside its database, its gRPC ports and its callers, were they all kept.
        for i in range(FLOOD):
            try:
                async with asyncio.timeout(2):
                    _, held = await asyncio.open_connection(
                        "127.0.0.1", server.http_port, local_addr=(f"127.0.0.{2 + i % 40}", 0)
                    )
            except TimeoutError:
                break  # the listen backlog is full: the server stopped accepting
            held.write(b"GET /healthz HTTP/1.1\r\nHo")
            flood.append(held)
        await asyncio.sleep(0.5)  # let the server accept the backlog

        async with (
            asyncio.timeout(30),
            tls_channel(f"127.0.0.1:{server.grpc_port}", root_pem) as channel,
        ):
            chain = await create_certificate(
                channel, make_csr(WEB_ID)[1], token=kube.mint_token("default", "web")
            )
        assert uri_sans(verify_with_cryptography(chain)) == [WEB_ID]
    finally:
        for held in flood:
            held.close()
    assert server.process.returncode is None  # still serving
