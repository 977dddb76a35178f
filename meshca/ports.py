"""Exclusive use of the CA's listening ports by one ``meshca server`` (Linux).

Worker processes share their ports with SO_REUSEPORT, and Linux lets *any* socket of the
same effective user join such a port: a second ``meshca server`` started by mistake (another
state directory, another root, another config) would print "ready" and take half of the
connections. The kernel cannot be told to close the group to newcomers, so a supervisor
claims each port in three steps, and refuses to start when one fails:

1. Reserve: bind the address with SO_REUSEPORT, not listening (port 0 becomes a concrete
   port, kept for the supervisor's life so a restarted worker can always bind it again).
   A bound socket that is not listening receives no connections.
2. Lock: bind the abstract Unix socket ``@meshca-port-<port>`` and listen on it. Only one
   process can hold the name; a second meshca server finds it taken and names the holder
   (its pid, from SO_PEERCRED). This closes the race of two servers starting at once.
   The lock is keyed by port only (not by address): two CAs on one port of two addresses
   of one host are refused too, which is stricter than needed but never lets two share.
3. Probe: bind the port once more *without* SO_REUSEPORT. Linux refuses that bind while
   any socket listens on the port (whatever its owner or options, including a wildcard
   address), so it finds every other holder: a server of another program, or workers
   left behind by a supervisor that was killed.

Abstract Unix sockets and TCP ports both live in the network namespace, so the lock and
the port have the same scope, and the kernel releases the lock when the process dies,
however it dies. What this does not stop: a process of the same user that binds the port
with SO_REUSEPORT *after* meshca started (nothing meshca can do from user space prevents
that); run the CA under its own user, as SECURITY.md says.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from meshca.errors import ConfigError

LOCK_PREFIX = "meshca-port-"


@dataclass
class PortClaim:
    """One claimed listener: its concrete address and the sockets that hold the claim."""

    address: str
    port: int
    _reservation: socket.socket
    _lock: socket.socket

    def release(self) -> None:
        self._reservation.close()
        self._lock.close()


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tcp_socket(host: str, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def claim(host: str, port: int, what: str) -> PortClaim:
    """Reserve, lock and probe ``host:port`` (see the module docstring) or raise ConfigError."""
    listen = _format(host, port)
    reservation = _tcp_socket(host, reuse_port=True)
    try:
        reservation.bind((host, port))
    except OSError as exc:
        reservation.close()
        raise ConfigError(
            f"cannot listen for {what} on {listen}: {exc.strerror}{_holder_hint(port)}"
        ) from exc
    port = reservation.getsockname()[1]
    try:
        lock = _lock(port, what)
        try:
            _probe(host, port, what)
        except ConfigError:
            lock.close()
            raise
    except ConfigError:
        reservation.close()
        raise
    return PortClaim(_format(host, port), port, reservation, lock)


def _lock(port: int, what: str) -> socket.socket:
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0{LOCK_PREFIX}{port}"
    try:
        lock.bind(name)
        lock.listen(8)
    except OSError as exc:
        lock.close()
        if exc.errno != errno.EADDRINUSE:
            raise ConfigError(f"cannot lock port {port} for {what}: {exc.strerror}") from exc
        holder = _lock_holder(name)
        raise ConfigError(
            f"port {port} ({what}) is in use by another meshca server{holder}; stop it, or "
            "choose other ports (--grpc-listen, --grpc-mtls-listen, --http-listen)"
        ) from None
    return lock


def _lock_holder(name: str) -> str:
    """`` (pid N)`` of the process holding the abstract socket ``name``, when it answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(name)
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return ""
    pid = struct.unpack("3i", creds)[0]
    return f" (pid {pid})" if pid > 0 else ""


def _probe(host: str, port: int, what: str) -> None:
    with _tcp_socket(host, reuse_port=False) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(
                    f"cannot listen for {what} on {_format(host, port)}: {exc.strerror}"
                ) from exc
            raise ConfigError(
                f"port {port} ({what}) is in use by another process{_holder_hint(port)}; "
                "stop it, or choose other ports (--grpc-listen, --grpc-mtls-listen, "
                "--http-listen)"
            ) from None


def _holder_hint(port: int) -> str:
    pids = listening_pids(port)
    if not pids:
        return ""
    return " (pid " + ", ".join(str(p) for p in sorted(pids)) + ")"


def listening_pids(port: int) -> set[int]:
    """Processes with a TCP socket listening on ``port``, as far as /proc lets us see.

    Only processes whose descriptors we may read (our own user's) are found; an empty
    set means "not found", not "nobody".
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    pids: set[int] = set()
    if not inodes:
        return pids
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        pids.add(int(entry.name))
                        break
    return pids
