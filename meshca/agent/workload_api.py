"""The SPIFFE Workload API on a Unix socket: the agent's X509-SVID for any SPIFFE client.

Serves ``SpiffeWorkloadAPI`` (the SPIFFE project's workload.proto, kept in
``meshca/api/_proto/workload.proto``) so that go-spiffe, py-spiffe's ``WorkloadApiClient``
and ``X509Source``, java-spiffe or Envoy work against the agent unchanged.

Scope: only the agent's own identity is served. Everyone who can open the socket gets the
same SVID, key and bundle, because this issue covers one workload per agent (a sidecar in
the pod, or one agent per VM); the socket's mode, owner and group are the access control.
Telling callers apart (peer credentials, workload attestation, one SVID per caller) comes
with the node-agent issue.

Behaviour, with the rule each follows:

- Every call must carry the metadata ``workload.spiffe.io: true``; a call without it is
  refused with INVALID_ARGUMENT (SPIFFE Workload Endpoint, sections 3 and 6: a guard
  against server-side request forgery).
- ``FetchX509SVID`` streams the SVID (leaf first, then intermediates), its PKCS#8 key and
  the trust bundle; the first message as soon as the agent has credentials (a caller that
  connects earlier waits), then one message on every publication (Workload API 4.3, 5.2.1).
- ``FetchX509Bundles`` streams ``{"spiffe://<trust domain>": DER roots}``; a new message
  only when the bundle changes. Every root is passed, several during a root rotation.
- The JWT-SVID profile is answered with UNIMPLEMENTED: meshca issues X509-SVIDs only
  (Workload API 1 lets an operator disable a profile; clients do not retry UNIMPLEMENTED).
- On :meth:`WorkloadApiServer.stop` open streams end with OK; clients reconnect
  (Workload API 4.2) to the next agent.

The socket is bound inside a private (0700) directory beside its final path, given its
mode and owner there, then renamed into place, so it is never reachable with a wider mode
than configured whatever the umask. A stale socket (nobody listening) is replaced; a live
one, or a file that is not a socket, is refused.

One process only: the generated messages sit at the top of the protobuf namespace (the
contract has no package), and the default descriptor pool refuses a second file that
defines the same names. So this module and another copy of the contract (py-spiffe's
``spiffe._proto``) cannot be imported into one Python process; meshca never imports
``spiffe``, and tests run py-spiffe clients in a subprocess.

Key material is never logged: only the SPIFFE ID, serial number and expiry are.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import NoReturn, TypeVar

import grpc
from grpc import aio

from meshca.agent.credentials import CredentialStore, X509Credentials
from meshca.api._proto import workload_pb2, workload_pb2_grpc
from meshca.errors import ConfigError

log = logging.getLogger(__name__)

HEADER = "workload.spiffe.io"
HEADER_VALUE = "true"
HEADER_MISSING = (
    f"the '{HEADER}: {HEADER_VALUE}' gRPC metadata header is required on every Workload API "
    "call (SPIFFE Workload Endpoint, section 3)"
)
JWT_UNSUPPORTED = (
    "JWT-SVIDs are not available: meshca issues X509-SVIDs only; "
    "use FetchX509SVID or FetchX509Bundles"
)
STOP_GRACE_SECONDS = 2.0
MAX_REQUEST_BYTES = 4 * 1024
# sun_path holds 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

_T = TypeVar("_T")


def x509_svid_response(creds: X509Credentials) -> workload_pb2.X509SVIDResponse:
    """The FetchX509SVID message for these credentials (one SVID, no hint, no CRL)."""
    svid = workload_pb2.X509SVID(
        spiffe_id=str(creds.spiffe_id),
        x509_svid=creds.chain_der(),
        x509_svid_key=creds.key_der(),
        bundle=creds.bundle_der(),
    )
    return workload_pb2.X509SVIDResponse(svids=[svid])


def x509_bundles_response(creds: X509Credentials) -> workload_pb2.X509BundlesResponse:
    """The FetchX509Bundles message: the trust domain's roots keyed by its SPIFFE ID."""
    return workload_pb2.X509BundlesResponse(
        bundles={str(creds.trust_domain.id): creds.bundle_der()}
    )


class _WorkloadApiServicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    """The five RPCs; streams follow the store until the server stops."""

    def __init__(self, store: CredentialStore, stopping: asyncio.Event) -> None:
        self._store = store
        self._stopping = stopping
        self.open_streams = 0

    async def FetchX509SVID(  # noqa: N802 (gRPC method name)
        self, request: object, context: aio.ServicerContext[object, object]
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        await _require_header(context)
        self.open_streams += 1
        try:
            async for creds in self._follow():
                log.debug(
                    "workload API: sending X509-SVID %s serial %x (v%d, expires %s)",
                    creds.spiffe_id,
                    creds.leaf.serial_number,
                    creds.version,
                    creds.not_after.isoformat(),
                )
                yield x509_svid_response(creds)
        finally:
            self.open_streams -= 1

    async def FetchX509Bundles(  # noqa: N802
        self, request: object, context: aio.ServicerContext[object, object]
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        await _require_header(context)
        self.open_streams += 1
        try:
            sent: tuple[object, ...] | None = None
            async for creds in self._follow():
                if creds.bundle == sent:
                    continue
                sent = creds.bundle
                log.debug(
                    "workload API: sending bundle of %s (%d roots)",
                    creds.trust_domain,
                    len(creds.bundle),
                )
                yield x509_bundles_response(creds)
        finally:
            self.open_streams -= 1

    async def FetchJWTSVID(  # noqa: N802
        self, request: object, context: aio.ServicerContext[object, object]
    ) -> workload_pb2.JWTSVIDResponse:
        await _refuse_jwt(context)

    async def FetchJWTBundles(  # noqa: N802
        self, request: object, context: aio.ServicerContext[object, object]
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        await _refuse_jwt(context)
        yield  # unreachable; the yield makes this a streaming handler

    async def ValidateJWTSVID(  # noqa: N802
        self, request: object, context: aio.ServicerContext[object, object]
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        await _refuse_jwt(context)

    async def _follow(self) -> AsyncIterator[X509Credentials]:
        """The current credentials (once there are any), then each newer version."""
        seen = 0
        while not self._stopping.is_set():
            creds = await self._unless_stopping(self._store.wait_newer(seen))
            if creds is None:
                return
            seen = creds.version
            yield creds

    async def _unless_stopping(self, awaitable: Awaitable[_T]) -> _T | None:
        """``awaitable``'s result, or None if the server starts stopping first."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            work.cancel()
            stop.cancel()
        if self._stopping.is_set() or not work.done() or work.cancelled():
            return None
        return work.result()


async def _require_header(context: aio.ServicerContext[object, object]) -> None:
    for key, value in context.invocation_metadata() or ():
        if key == HEADER and value == HEADER_VALUE:
            return
    log.info("workload API: refused a call without the %s header", HEADER)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, HEADER_MISSING)
    raise AssertionError("unreachable: abort raises")


async def _refuse_jwt(context: aio.ServicerContext[object, object]) -> NoReturn:
    await _require_header(context)
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, JWT_UNSUPPORTED)
    raise AssertionError("unreachable: abort raises")


class WorkloadApiServer:
    """A :class:`~meshca.agent.credentials.CredentialSink` serving the SPIFFE Workload API.

    ``socket_path`` is where clients connect (``SPIFFE_ENDPOINT_SOCKET=unix://<path>``);
    its directory must exist. ``socket_mode`` (default 0600) and the optional ``owner`` and
    ``group`` (a name or a numeric id) decide who may fetch the agent's SVID and key.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        socket_mode: int = 0o600,
        owner: int | str | None = None,
        group: int | str | None = None,
    ) -> None:
        if not 0 <= socket_mode <= 0o777:
            raise ConfigError(
                f"workload API socket mode {socket_mode:#o} is not a permission mode "
                "(allowed: 0 to 0o777)"
            )
        self.socket_path = Path(os.path.abspath(socket_path))
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH_BYTES:
            raise ConfigError(
                f"workload API socket path {self.socket_path} is longer than "
                f"{MAX_SOCKET_PATH_BYTES} bytes, the limit for a Unix socket"
            )
        self.socket_mode = socket_mode
        self._uid = _user_id(owner)
        self._gid = _group_id(group)
        self._server: aio.Server | None = None
        self._servicer: _WorkloadApiServicer | None = None
        self._stopping = asyncio.Event()
        self._staging: Path | None = None
        self._inode: tuple[int, int] | None = None

    @property
    def open_streams(self) -> int:
        """FetchX509SVID and FetchX509Bundles streams now open (for metrics and tests)."""
        return self._servicer.open_streams if self._servicer else 0

    async def start(self, store: CredentialStore) -> None:
        """Bind the socket, replacing a stale one, and serve ``store``'s credentials."""
        if self._server is not None:
            raise RuntimeError("the workload API server is already started")
        directory = self.socket_path.parent
        if not directory.is_dir():
            raise ConfigError(
                f"workload API socket directory {directory} does not exist; "
                "create it (the operator chooses who may reach it)"
            )
        _check_path_is_free(self.socket_path)
        self._staging = Path(tempfile.mkdtemp(prefix=".wl", dir=directory))
        staged = self._staging / "s"
        if len(os.fsencode(staged)) > MAX_SOCKET_PATH_BYTES:
            self._remove_staging()
            raise ConfigError(
                f"workload API socket directory {directory} is too deep: the socket is "
                f"first bound at {staged}, longer than {MAX_SOCKET_PATH_BYTES} bytes"
            )
        self._stopping.clear()
        self._servicer = _WorkloadApiServicer(store, self._stopping)
        server = aio.server(options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self._servicer, server)
        self._server = server
        try:
            server.add_insecure_port(f"unix:{staged}")
            await server.start()
            self._restrict(staged)
            os.rename(staged, self.socket_path)
            st = os.stat(self.socket_path)
            self._inode = (st.st_dev, st.st_ino)
        except BaseException:
            await self.stop()
            raise
        finally:
            self._remove_staging()
        if self.socket_mode & 0o007:
            log.warning(
                "workload API socket %s has mode %#o: every local user can fetch this "
                "agent's SVID and private key",
                self.socket_path,
                self.socket_mode,
            )
        log.info("serving the SPIFFE Workload API on unix://%s", self.socket_path)

    async def stop(self) -> None:
        """End every stream, stop serving and remove the socket (if it is still ours)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        await server.stop(STOP_GRACE_SECONDS)
        if self._inode is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(self.socket_path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.socket_path)
            self._inode = None
        self._remove_staging()
        log.info("stopped the SPIFFE Workload API on unix://%s", self.socket_path)

    def _restrict(self, path: Path) -> None:
        """Give the freshly bound (still private) socket its configured mode and owner."""
        try:
            os.chmod(path, self.socket_mode)
            if self._uid != -1 or self._gid != -1:
                os.chown(path, self._uid, self._gid)
        except OSError as exc:
            raise ConfigError(
                f"cannot set mode {self.socket_mode:#o} / owner {self._uid}:{self._gid} on "
                f"the workload API socket: {exc.strerror}"
            ) from None

    def _remove_staging(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def _check_path_is_free(path: Path) -> None:
    """Refuse a live socket or a file that is not a socket; a stale socket may go.

    A stale socket is not unlinked here: the rename in :meth:`WorkloadApiServer.start`
    replaces it atomically. A non-blocking ``connect`` on a Unix socket answers at once:
    refused (nobody listens), accepted, or EAGAIN (listening with a full backlog).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(
            f"{path} exists and is not a socket; refusing to replace it with the "
            "workload API socket"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("workload API socket %s is stale (nobody listens); replacing it", path)
        return
    except BlockingIOError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot check whether {path} is in use: {exc.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"{path} is in use by a running process (another agent?)")


def _user_id(owner: int | str | None) -> int:
    if owner is None:
        return -1
    if isinstance(owner, int):
        return owner
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ConfigError(f"workload API socket owner {owner!r} is not a known user") from None


def _group_id(group: int | str | None) -> int:
    if group is None:
        return -1
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"workload API socket group {group!r} is not a known group") from None
