"""Real CAs for agent tests: meshca in this process on loopback, tokens from the fake
Kubernetes API, and agents built from real AgentSettings.

A CA can be stopped and started again on the same ports with the same state directory
(same root), which is how the resilience tests take it away and bring it back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshca.agent.config import AgentSettings, load_agent_settings
from meshca.agent.run import RunningAgent, start_agent
from meshca.config import load_settings
from meshca.server import RunningServer, start_server
from tests.fakes.kube import FakeKubeApi

MAINTENANCE_SECONDS = 0.5


@dataclass
class CA:
    """A running CA, restartable on the same ports."""

    kube: FakeKubeApi
    state_dir: Path
    overrides: dict[str, Any]
    server: RunningServer | None = None
    root_pem: bytes = b""
    _maintenance: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def running(self) -> RunningServer:
        assert self.server is not None, "the CA is stopped"
        return self.server

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.grpc_port}"

    @property
    def mtls_address(self) -> str:
        assert self.running.mtls_port is not None
        return f"127.0.0.1:{self.running.mtls_port}"

    @property
    def bundle_url(self) -> str:
        return f"http://127.0.0.1:{self.running.http_port}/v1/bundle"

    async def start(self) -> None:
        options: dict[str, Any] = {
            "state_dir": self.state_dir,
            "grpc_listen": "127.0.0.1:0",
            "grpc_mtls_listen": "127.0.0.1:0",
            "http_listen": "127.0.0.1:0",
            "k8s_oidc_issuer": self.kube.issuer,
        }
        options.update(self.overrides)
        self.server = await start_server(load_settings(**options))
        async with aiohttp.ClientSession() as session, session.get(self.bundle_url) as resp:
            self.root_pem = await resp.read()
        # Short test TTLs also shorten the CA's own TLS certificate (it lives max_ttl);
        # run its maintenance often so new handshakes always meet a valid one.
        self._maintenance = asyncio.create_task(self._maintain(self.server))

    async def _maintain(self, server: RunningServer) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_SECONDS)
            await server.maintain_once()

    async def stop(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop(grace=0)

    async def restart(self) -> None:
        """Start again on the ports it had (the same root, from the same state dir)."""
        assert self.server is None, "stop() first"
        assert "grpc_listen" in self.overrides, "pinned ports are set by start_ca"
        await self.start()


StartCA = Callable[..., Awaitable[CA]]


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubeApi]:
    async with FakeKubeApi() as api:
        yield api


@pytest.fixture
async def start_ca(tmp_path: Path, kube: FakeKubeApi) -> AsyncIterator[StartCA]:
    """Start a CA with settings overrides; its ports are then pinned for restarts."""
    started: list[CA] = []

    async def start(**overrides: Any) -> CA:
        ca = CA(kube=kube, state_dir=tmp_path / f"ca-state-{len(started)}", overrides=overrides)
        started.append(ca)
        await ca.start()
        server = ca.running
        ca.overrides = {
            **overrides,
            "grpc_listen": f"127.0.0.1:{server.grpc_port}",
            "grpc_mtls_listen": f"127.0.0.1:{server.mtls_port}",
            "http_listen": f"127.0.0.1:{server.http_port}",
        }
        return ca

    yield start
    for ca in started:
        await ca.stop()


def write_token(path: Path, kube: FakeKubeApi, service_account: str = "web", **kwargs: Any) -> Path:
    path.write_text(kube.mint_token("default", service_account, **kwargs) + "\n")
    return path


def settings_for(ca: CA, workdir: Path, **overrides: Any) -> AgentSettings:
    """Agent settings against ``ca``: its root as the trust bundle file, a token for
    ``default/web`` (unless a token_file is given), quick backoff for tests."""
    root = workdir / "ca-root.pem"
    if not root.exists():
        root.write_bytes(ca.root_pem)
    options: dict[str, Any] = {
        "ca_address": ca.address,
        "ca_trust_bundle": root,
        "ca_server_name": "localhost",
        "backoff_initial": "100ms",
        "backoff_max": "1s",
        "request_timeout": "5s",
    }
    if "token_file" not in overrides:
        options["token_file"] = write_token(workdir / "token", ca.kube)
    options.update(overrides)
    return load_agent_settings(**options)


@pytest.fixture
async def agents() -> AsyncIterator[list[RunningAgent]]:
    """Agents a test started (append them); all stopped at the end."""
    started: list[RunningAgent] = []
    yield started
    for agent in started:
        await agent.stop()


async def start(agents: list[RunningAgent], settings: AgentSettings) -> RunningAgent:
    agent = await start_agent(settings)
    agents.append(agent)
    return agent


async def metrics_text(agent: RunningAgent) -> str:
    return agent.metrics.exposition().decode()


async def eventually(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``check`` until it holds, at most ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)
