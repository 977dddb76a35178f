"""A running CA (in this process, real gRPC over TLS and HTTP on loopback) and its fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from meshca.config import load_settings
from meshca.server import RunningServer, start_server
from tests.fakes.kube import FakeKubeApi
from tests.support import tls_channel


@dataclass
class CA:
    server: RunningServer
    kube: FakeKubeApi
    root_pem: bytes
    channel: grpc.aio.Channel

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.get(self.http + path) as resp:
            return resp.status, await resp.text()

    def ledger_rows(self) -> int:
        return self.server.store.counts().issued


StartCA = Callable[..., Awaitable[CA]]


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubeApi]:
    async with FakeKubeApi() as api:
        yield api


@pytest.fixture
async def start_ca(tmp_path: Path, kube: FakeKubeApi) -> AsyncIterator[StartCA]:
    """Start a CA with the given settings overrides (default: JWT mode against ``kube``)."""
    started: list[CA] = []

    async def start(**overrides: Any) -> CA:
        options: dict[str, Any] = {
            "state_dir": tmp_path / "state",
            "grpc_listen": "127.0.0.1:0",
            "grpc_mtls_listen": "127.0.0.1:0",
            "http_listen": "127.0.0.1:0",
        }
        if "clusters" not in overrides and "k8s_api_server" not in overrides:
            options["k8s_oidc_issuer"] = kube.issuer
        options.update(overrides)
        server = await start_server(load_settings(**options))
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.http_port}/v1/bundle"
            async with session.get(url) as resp:
                root_pem = await resp.read()
        address = f"127.0.0.1:{server.grpc_port}"
        if server.settings.plaintext:
            channel = grpc.aio.insecure_channel(address)
        else:
            channel = tls_channel(address, root_pem)
        ca = CA(server=server, kube=kube, root_pem=root_pem, channel=channel)
        started.append(ca)
        return ca

    yield start
    for ca in started:
        await ca.channel.close()
        await ca.server.stop(grace=0)


@pytest.fixture
async def ca(start_ca: StartCA) -> CA:
    return await start_ca()
