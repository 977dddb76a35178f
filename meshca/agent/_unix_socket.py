"""A Unix socket that is never reachable with a wider mode than configured.

gRPC creates the socket file itself, with the process umask (typically 0755 after
``bind``), and it first unlinks whatever is at the path, even a socket another process
is serving on. Changing the umask around the bind would affect every thread of the agent
(the file sink writes its own files at the same time), so instead the socket is bound
inside a fresh 0700 directory beside its final path (``mkdtemp``), given its mode and
owner there, where no other user can reach it, and then renamed into place: ``rename(2)``
is atomic and keeps the listening socket (a socket is found by its inode).

What is at the final path beforehand: nothing, fine; a socket nobody listens on (the
``connect`` probe is refused), stale, replaced by the rename; a socket someone listens
on, or anything that is not a socket, refused with :class:`~meshca.errors.ConfigError`.
Between the probe and the rename another process could start listening there; two
agents started at the same instant on one path are not defended against.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from grpc import aio

from meshca.agent._dirs import ensure_directory, socket_directory_mode
from meshca.errors import ConfigError

log = logging.getLogger(__name__)

# sun_path holds 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


class PrivateUnixSocket:
    """Where a sink listens: checked before binding, placed after, removed on stop.

    ``label`` names the socket in errors and logs ("SDS socket").
    """

    def __init__(
        self,
        path: Path,
        *,
        mode: int,
        owner: str | int | None,
        group: str | int | None,
        label: str,
        callers_identified: bool = False,
    ) -> None:
        if not 0 <= mode <= 0o777:
            raise ConfigError(
                f"{label} mode {mode:#o} is not a permission mode (allowed: 0 to 0o777)"
            )
        self.path = Path(os.path.abspath(path))
        self.label = label
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH_BYTES:
            raise ConfigError(
                f"{label} path {self.path} is longer than {MAX_SOCKET_PATH_BYTES} bytes, "
                "the limit for a Unix socket"
            )
        self.mode = mode
        self.callers_identified = callers_identified
        self.uid = _user_id(owner, label)
        self.gid = _group_id(group, label)
        self._inode: tuple[int, int] | None = None

    def check(self) -> None:
        """Create the directory if missing; refuse to start unless the path is free or
        stale."""
        directory = self.path.parent
        ensure_directory(directory, socket_directory_mode(self.mode), self.label)
        if not directory.is_dir():
            raise ConfigError(f"{self.label} directory {directory} is not a directory")
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError(
                f"{self.path} exists and is not a socket; refusing to replace it with the "
                f"{self.label}"
            )
        if _listening(self.path):
            raise ConfigError(
                f"{self.path} is in use: another process (another agent?) is serving on it"
            )
        log.info("%s %s is stale (nobody listens); replacing it", self.label, self.path)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A path inside a new 0700 directory beside the final path, removed on exit."""
        directory = Path(tempfile.mkdtemp(prefix=".bind-", dir=self.path.parent))
        try:
            staged = directory / "s"
            if len(os.fsencode(staged)) > MAX_SOCKET_PATH_BYTES:
                raise ConfigError(
                    f"{self.label} directory {self.path.parent} is too deep: the socket is "
                    f"first bound at {staged}, longer than {MAX_SOCKET_PATH_BYTES} bytes"
                )
            yield staged
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def place(self, staged: Path) -> None:
        """Give the bound (still private) socket its mode and owner, then move it in."""
        try:
            os.chmod(staged, self.mode)
            if self.uid != -1 or self.gid != -1:
                os.chown(staged, self.uid, self.gid)
        except OSError as exc:
            raise ConfigError(
                f"cannot set mode {self.mode:#o} and owner {self.uid}:{self.gid} on the "
                f"{self.label}: {exc.strerror}"
            ) from None
        os.rename(staged, self.path)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        if self.mode & 0o007 and not self.callers_identified:
            log.warning(
                "%s %s has mode %#o: every local user can fetch this agent's private key",
                self.label,
                self.path,
                self.mode,
            )

    async def serve(self, server: aio.Server) -> None:
        """Check the path, bind ``server`` privately, start it, and move the socket in."""
        self.check()
        with self.staging() as staged:
            server.add_insecure_port(f"unix:{staged}")
            await server.start()
            self.place(staged)

    def remove(self) -> None:
        """Unlink the socket, unless another process has replaced it since."""
        inode, self._inode = self._inode, None
        if inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == inode:
                os.unlink(self.path)


class GrpcSocket(Protocol):
    """Where a sink's gRPC server is reached: a :class:`PrivateUnixSocket`, or a node
    agent's :class:`~meshca.agent._caller_socket.CallerSocket` in front of one."""

    @property
    def path(self) -> Path: ...

    async def serve(self, server: aio.Server) -> None: ...

    def remove(self) -> None: ...


class UnixGrpcServer:
    """A grpc.aio server on a :class:`GrpcSocket`: the life cycle the SDS and Workload
    API sinks share (start once, stop with a grace, remove the socket).

    ``what`` names the service in logs ("Envoy SDS").
    """

    def __init__(
        self,
        socket: GrpcSocket,
        what: str,
        *,
        max_request_bytes: int,
        stop_grace_seconds: float,
    ) -> None:
        self.socket = socket
        self._what = what
        self._max_request_bytes = max_request_bytes
        self._stop_grace = stop_grace_seconds
        self._server: aio.Server | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self, register: Callable[[aio.Server], None]) -> None:
        """``register`` adds the servicer; then bind and serve. If binding fails the
        server is stopped again and the error raised. RuntimeError if already started."""
        if self._server is not None:
            raise RuntimeError(f"the {self._what} server is already started")
        server = aio.server(options=[("grpc.max_receive_message_length", self._max_request_bytes)])
        register(server)
        self._server = server
        try:
            await self.socket.serve(server)
        except BaseException:
            await self.stop()
            raise
        log.info("serving %s on unix://%s", self._what, self.socket.path)

    async def stop(self) -> None:
        """Stop serving (streams get the grace) and remove the socket if still ours."""
        server, self._server = self._server, None
        if server is None:
            return
        await server.stop(self._stop_grace)
        self.socket.remove()
        log.info("stopped %s on unix://%s", self._what, self.socket.path)


def _listening(path: Path) -> bool:
    """Whether a process accepts connections on the socket at ``path``.

    A non-blocking ``connect`` on a Unix socket answers at once: refused (nobody listens),
    accepted, or EAGAIN (listening with a full backlog).
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except BlockingIOError:
        return True
    except OSError as exc:
        raise ConfigError(f"cannot check whether {path} is in use: {exc.strerror}") from None
    finally:
        probe.close()
    return True


def _user_id(owner: str | int | None, label: str) -> int:
    if owner is None:
        return -1
    if isinstance(owner, int) or owner.isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ConfigError(f"{label} owner {owner!r} is not a known user") from None


def _group_id(group: str | int | None, label: str) -> int:
    if group is None:
        return -1
    if isinstance(group, int) or group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"{label} group {group!r} is not a known group") from None
