"""Fixtures for proxy tests: an in-memory CA, loopback applications, and a check that no
exception reached the event loop's default handler during the test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from tests.agent.support import LocalCA
from tests.proxy.support import echo_server, port_of


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Proxy tests run on asyncio's loop and on uvloop's (what ``meshca proxy`` uses);
    those with a CA in the process on asyncio's only (grpc.aio)."""
    import uvloop

    if item.path.name == "test_with_agent.py":
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
def ca() -> LocalCA:
    return LocalCA()


@pytest.fixture
def loop_errors() -> list[dict[str, Any]]:
    """Every call of the loop's exception handler; the test fails if there was any."""
    return []


@pytest.fixture(autouse=True)
async def _record_loop_errors(loop_errors: list[dict[str, Any]]) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    yield
    await asyncio.sleep(0.05)  # callbacks scheduled by the last closes
    loop.set_exception_handler(None)
    assert not loop_errors, f"exceptions reached the event loop's handler: {loop_errors}"


class Echo:
    """An echo application on loopback that counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return port_of(self.server)


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    app = Echo()
    inner = await echo_server()

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        app.accepted += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    inner.close()
    app.server = await asyncio.start_server(counting, "127.0.0.1", 0)
    yield app
    app.server.close()


@pytest.fixture
async def http_app() -> AsyncIterator[int]:
    """An HTTP application on loopback: GET / says hello; any other path is 404."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello from the app\n")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield int(runner.addresses[0][1])
    await runner.cleanup()
