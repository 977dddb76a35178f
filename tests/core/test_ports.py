"""The port lock names whoever holds it, as the kernel reports it, without calling it
meshca: any local user may bind the abstract name ``@meshca-port-<port>``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from meshca.errors import ConfigError
from meshca.ports import claim

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="abstract Unix sockets are Linux only"
)

NOBODY = 65534

_HOLD_THE_LOCK = """
import socket, sys
lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
lock.bind("\\0meshca-port-" + sys.argv[1])
if sys.argv[2] == "listen":
    lock.listen()
print("held", flush=True)
sys.stdin.read()
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def uid() -> int:
    """Another user (nobody) when the tests run as root, else ours."""
    return NOBODY if os.geteuid() == 0 else os.geteuid()


@contextmanager
def _hold(port: int, uid: int, mode: str) -> Iterator[subprocess.Popen[str]]:
    python = sys.executable
    if uid != os.geteuid():  # the test's interpreter may live where nobody may not enter
        python = shutil.which("python3", path="/usr/bin:/bin") or ""
        if not python:
            pytest.skip("no system python3 for another user to run")
    with subprocess.Popen(
        [python, "-c", _HOLD_THE_LOCK, str(port), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        user=uid if uid != os.geteuid() else None,
        cwd="/",
    ) as holder:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        try:
            yield holder
        finally:
            holder.kill()


def test_a_lock_held_by_another_process_names_its_pid_and_user(uid: int) -> None:
    port = _free_port()
    with _hold(port, uid, "listen") as holder, pytest.raises(ConfigError) as refused:
        claim("127.0.0.1", port, "HTTP")
    message = refused.value.message
    assert message.startswith(f"cannot listen for HTTP on 127.0.0.1:{port}: ")
    assert f"@meshca-port-{port}" in message
    assert f"held by pid {holder.pid} (python" in message
    assert f"of uid {uid} " in message
    assert "meshca server (" not in message and "another meshca" not in message
    # the port itself was free: it is still claimable once the name is let go
    claim("127.0.0.1", port, "HTTP").release()


def test_a_lock_bound_by_a_process_that_does_not_answer_is_refused_saying_so(
    uid: int,
) -> None:
    port = _free_port()
    with _hold(port, uid, "bind-only"), pytest.raises(ConfigError) as refused:
        claim("127.0.0.1", port, "HTTP")
    assert "held by a process that does not accept connections on it" in refused.value.message
    assert "in use by another process" not in refused.value.message
