"""A Unix socket that knows which process is on the other end of each connection.

gRPC's Python server does not expose a connection's peer credentials, so a node agent's
Workload API and SDS servers listen behind a small relay:

- the public socket (placed like :class:`~meshca.agent._unix_socket.PrivateUnixSocket`:
  bound privately, given its mode and owner, then renamed into place) is an asyncio
  server; on each accepted connection it reads ``SO_PEERCRED`` (pid, uid, gid; the
  kernel records them at ``connect``, the caller cannot choose them) and pins the
  process with a pidfd (``SO_PEERPIDFD`` where the kernel has it, Linux 6.5+, else
  ``pidfd_open`` at once), so a pid reused after the caller exits is never taken for it;
- it then connects to the gRPC server, which listens in a fresh 0700 directory beside
  the public socket (``.<socket name>.<random>``), from a client socket bound to a
  unique path in that directory; gRPC reports that path as the call's peer
  (``context.peer()``), and the :class:`CallerRegistry` maps it back to the caller's
  credentials;
- bytes are copied both ways until either side closes; the registry entry and the
  pidfd go with the connection.

Only the agent's own user can reach the private directory, so no other process can
connect to the gRPC server directly or bind a path that names a registered caller; a
call whose peer is not in the registry is refused by the sinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import select
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from grpc import aio

from meshca.agent._unix_socket import MAX_SOCKET_PATH_BYTES, PrivateUnixSocket
from meshca.errors import ConfigError

log = logging.getLogger(__name__)

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
"""Linux 6.5+: a pidfd of the process that connected (``asm-generic/socket.h``)."""
_UCRED = struct.Struct("3i")
CHUNK = 64 * 1024


@dataclass(eq=False, slots=True)
class Caller:
    """The process at the other end of one connection (``SO_PEERCRED``), pinned by a
    pidfd for as long as the connection is open."""

    pid: int
    uid: int
    gid: int
    pidfd: int | None = field(default=None, repr=False)

    def alive(self) -> bool:
        """Whether the process that connected still runs (its pid was not recycled).
        False when it could not be pinned at all."""
        if self.pidfd is None:
            return False
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)  # a pidfd turns readable when its process exits

    def close(self) -> None:
        fd, self.pidfd = self.pidfd, None
        if fd is not None:
            os.close(fd)


def peer_caller(sock: socket.socket) -> Caller:
    """The credentials of the process that connected ``sock``, with a pidfd."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    pidfd: int | None = None
    if pid > 0:
        try:
            pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                pidfd = None  # gone already: alive() says so
    return Caller(pid=pid, uid=uid, gid=gid, pidfd=pidfd)


class CallerRegistry:
    """Which caller each relayed connection carries, by the peer gRPC reports."""

    def __init__(self) -> None:
        self._callers: dict[str, Caller] = {}

    def lookup(self, peer: str | None) -> Caller | None:
        return self._callers.get(peer or "")

    def add(self, peer: str, caller: Caller) -> None:
        self._callers[peer] = caller

    def remove(self, peer: str) -> None:
        caller = self._callers.pop(peer, None)
        if caller is not None:
            caller.close()

    def __len__(self) -> int:
        return len(self._callers)


class CallerSocket:
    """The public socket of a node agent's sink and its relay; see the module docstring.

    Has the interface :class:`~meshca.agent._unix_socket.UnixGrpcServer` uses
    (``path``, ``label``, ``serve``, ``remove``).
    """

    def __init__(self, public: PrivateUnixSocket, registry: CallerRegistry) -> None:
        self._public = public
        self._registry = registry
        self._private: Path | None = None
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self._numbers = itertools.count(1)

    @property
    def path(self) -> Path:
        return self._public.path

    @property
    def label(self) -> str:
        return self._public.label

    async def serve(self, server: aio.Server) -> None:
        """Start ``server`` on the private socket, then the relay on the public path."""
        self._public.check()  # nobody serves on the public path: earlier relays are gone
        prefix = f".{self._public.path.name}."
        for stale in self._public.path.parent.glob(prefix + "*"):
            if stale.is_dir() and not stale.is_symlink():
                log.info("%s: removing %s, left by an earlier run", self.label, stale)
                shutil.rmtree(stale, ignore_errors=True)
        private = Path(tempfile.mkdtemp(prefix=prefix, dir=self._public.path.parent))
        self._private = private
        target = private / "grpc"
        if len(os.fsencode(private / f"c{10**9}")) > MAX_SOCKET_PATH_BYTES:
            raise ConfigError(
                f"{self.label} directory {self._public.path.parent} is too deep for the "
                f"relay's sockets (at most {MAX_SOCKET_PATH_BYTES} bytes)"
            )
        server.add_insecure_port(f"unix:{target}")
        await server.start()
        with self._public.staging() as staged:
            self._server = await asyncio.start_unix_server(
                lambda r, w: self._accept(r, w, target), path=os.fspath(staged)
            )
            self._public.place(staged)

    def remove(self) -> None:
        """Stop relaying, drop every connection, remove both sockets."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._relays):
            task.cancel()
        self._public.remove()
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Path
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        caller = peer_caller(writer.get_extra_info("socket"))
        assert self._private is not None
        local = self._private / f"c{next(self._numbers)}"
        peer = f"unix:{local}"
        inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            inner.setblocking(False)
            inner.bind(os.fspath(local))
            self._registry.add(peer, caller)
            await asyncio.get_running_loop().sock_connect(inner, os.fspath(target))
            os.unlink(local)  # the socket keeps its name; the file is not needed
            inner_reader, inner_writer = await asyncio.open_unix_connection(sock=inner)
        except OSError as exc:
            log.warning("%s: cannot relay a connection: %s", self.label, exc)
            inner.close()
            writer.close()
            self._registry.remove(peer)
            self._relays.discard(task)
            return
        try:
            await asyncio.gather(_copy(reader, inner_writer), _copy(inner_reader, writer))
        except asyncio.CancelledError:
            # remove() stops the relay. This is the connection task's outermost frame: end
            # it normally, as Python 3.11's stream server calls exception() on the task
            # and reports a cancelled one as an error in its callback.
            pass
        finally:
            self._registry.remove(peer)
            self._relays.discard(task)
            for w in (inner_writer, writer):
                w.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or an error, then close ``writer`` (the other side's end)."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()
