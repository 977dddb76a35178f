"""What a first ``meshca server`` prints: the ready line once (not again as a log line),
one line for the schema it created, none of Alembic's plumbing (per process or not)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess, loopback_args, start_meshca

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_first_start_prints_each_thing_once(
    tmp_path: Path, processes: list[ServerProcess], workers: int
) -> None:
    server = await start_meshca(loopback_args(tmp_path / "state", workers=workers))
    processes.append(server)
    assert server.ready_line.startswith("meshca ready: ")
    assert await server.stop() == 0
    rest = (await server.process.stdout.read()).decode() if server.process.stdout else ""
    log = server.log()
    assert "meshca ready" not in log and "meshca ready" not in rest
    assert log.count("database schema upgraded from nothing (a new database) to revision") == 1
    for noise in ("alembic", "Context impl", "Will assume non-transactional DDL"):
        assert noise not in log
