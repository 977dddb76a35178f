"""Exclusive use of the CA's listening ports by one ``meshca server`` (Linux).

Worker processes share their ports with SO_REUSEPORT, and Linux lets *any* socket of the
same effective user join such a port: a second ``meshca server`` started by mistake (another
state directory, another root, another config) would print "ready" and take half of the
connections. The kernel cannot be told to close the group to newcomers, so a server
claims each port in three steps before it touches any state, and refuses to start when
one fails:

1. Reserve: bind the address with SO_REUSEPORT, not listening (port 0 becomes a concrete
   port, kept for the supervisor's life so a restarted worker can always bind it again).
   A bound socket that is not listening receives no connections.
2. Lock: bind the abstract Unix socket ``@meshca-port-<port>`` and listen on it. Only one
   process can hold the name; a second meshca server finds it taken and names the holder
   (pid, command and user, from SO_PEERCRED; any local user may bind the name, so it is
   not called a meshca server). This closes the race of two servers starting at once.
   The lock is keyed by port only (not by address): two CAs on one port of two addresses
   of one host are refused too, which is stricter than needed but never lets two share.
3. Probe: bind the port once more *without* SO_REUSEPORT. Linux refuses that bind while
   any socket listens on the port (whatever its owner or options, including a wildcard
   address), so it finds every other holder: a server of another program, or workers
   left behind by a supervisor that was killed.

A server of one process claims the ports the same way, then gives up the reservation
and binds without SO_REUSEPORT (so the kernel keeps everyone else out), holding the lock.

Abstract Unix sockets exist on Linux only; elsewhere steps 1 and 3 run alone (two
servers starting at the same instant may then both start). Abstract Unix sockets and
TCP ports both live in the network namespace, so the lock and
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
import sys
from dataclasses import dataclass
from pathlib import Path

from meshca.errors import ConfigError
from meshca.statedir import user_name

LOCK_PREFIX = "meshca-port-"


@dataclass
class PortClaim:
    """One claimed listener: its concrete address and the sockets that hold the claim."""

    address: str
    port: int
    _reservation: socket.socket
    _lock: socket.socket | None

    def unreserve(self) -> None:
        """Give up the reservation but keep the lock: for a server that then binds the port
        without SO_REUSEPORT itself (the kernel then keeps everyone else out)."""
        self._reservation.close()

    def release(self) -> None:
        self._reservation.close()
        if self._lock is not None:
            self._lock.close()


def split_host_port(listen: str, what: str) -> tuple[str, int]:
    """A listen address ``HOST:PORT`` (``[v6]:PORT``) -> (host, port); ConfigError naming
    ``what`` otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{what} {listen!r} must be HOST:PORT, e.g. 127.0.0.1:15012")
    return host.strip("[]"), int(port)


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
    reservation = _tcp_socket(host, reuse_port=True)
    try:
        reservation.bind((host, port))
    except OSError as exc:
        reservation.close()
        raise _cannot_listen(host, port, what, exc) from None
    port = reservation.getsockname()[1]
    lock: socket.socket | None = None
    try:
        if sys.platform.startswith("linux"):
            lock = _lock(port)
    except OSError as exc:
        reservation.close()
        raise _lock_refused(host, port, what, exc) from None
    try:
        with _tcp_socket(host, reuse_port=False) as probe:
            probe.bind((host, port))
    except OSError as exc:
        reservation.close()
        if lock is not None:
            lock.close()
        raise _cannot_listen(host, port, what, exc) from None
    return PortClaim(_format(host, port), port, reservation, lock)


def _lock(port: int) -> socket.socket:
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(_lock_name(port))
        lock.listen(8)
    except OSError:
        lock.close()
        raise
    return lock


def _lock_name(port: int) -> str:
    return f"\0{LOCK_PREFIX}{port}"


_CHOOSE_OTHER_PORTS = "choose other ports (--grpc-listen, --grpc-mtls-listen, --http-listen)"


def _cannot_listen(host: str, port: int, what: str, exc: OSError) -> ConfigError:
    """The refusal, naming who holds the port when it is taken."""
    prefix = f"cannot listen for {what} on {_format(host, port)}"
    if exc.errno != errno.EADDRINUSE or not port:
        return ConfigError(f"{prefix}: {exc.strerror or exc}")
    holder = _lock_holder(port)
    if holder:
        who = f"{holder}, which also holds its lock @{LOCK_PREFIX}{port}"
    else:
        pids = sorted(listening_pids(port))
        who = "another process" + (f" (pid {', '.join(map(str, pids))})" if pids else "")
    return ConfigError(
        f"{prefix}: port {port} is in use by {who}; stop it, or {_CHOOSE_OTHER_PORTS}"
    )


def _lock_refused(host: str, port: int, what: str, exc: OSError) -> ConfigError:
    """The refusal when the port's lock name is taken, naming its holder as the kernel
    reports it: any local process may bind the name, so it is not said to be meshca."""
    prefix = f"cannot listen for {what} on {_format(host, port)}"
    name = f"@{LOCK_PREFIX}{port}"
    if exc.errno != errno.EADDRINUSE:
        return ConfigError(f"{prefix}: cannot bind its lock {name}: {exc.strerror or exc}")
    holder = _lock_holder(port) or "a process that does not accept connections on it"
    return ConfigError(
        f"{prefix}: the abstract Unix socket {name}, which a meshca server binds to keep "
        f"the port its own, is held by {holder}; stop that process, or {_CHOOSE_OTHER_PORTS}"
    )


def _lock_holder(port: int) -> str:
    """``pid N (comm) of uid U (name)``: the process holding the lock of ``port``, as
    SO_PEERCRED reports it; "" if nobody answers on it."""
    if not sys.platform.startswith("linux"):
        return ""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(_lock_name(port))
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return ""
    pid, uid, _gid = struct.unpack("3i", creds)
    if pid <= 0:  # in another pid namespace
        return f"a process of another pid namespace, {user_name(uid)}"
    try:
        command = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"pid {pid} of {user_name(uid)}"
    return f"pid {pid} ({command}) of {user_name(uid)}"


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
