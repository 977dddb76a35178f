"""An SDS client that behaves as Envoy does, built from xds-protos, for agent tests.

What it copies from Envoy's state-of-the-world gRPC subscription (GrpcMuxImpl and
SdsApi): one StreamSecrets stream over the Unix socket; a first request with the node,
the type URL and the secret names, no version and no nonce; every response checked
(each resource a ``Secret`` of the type asked for) and answered with an ACK (the
response's version and nonce) or a NACK (the response's nonce, the last accepted version
and ``error_detail``); secrets it did not ask for ignored. Every response and every
ACK/NACK is recorded, with the ``time.perf_counter()`` of its arrival.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import code_pb2, status_pb2
from grpc import aio

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
NAMES = ("default", "ROOTCA")


@dataclass(frozen=True)
class Received:
    """One DiscoveryResponse as the client saw it."""

    version: str
    nonce: str
    secrets: dict[str, secret_pb2.Secret]
    at: float

    def chain(self) -> list[x509.Certificate]:
        tls = self.secrets["default"].tls_certificate
        return x509.load_pem_x509_certificates(tls.certificate_chain.inline_bytes)

    def key_pem(self) -> bytes:
        return bytes(self.secrets["default"].tls_certificate.private_key.inline_bytes)

    def public_key_der(self) -> bytes:
        key = serialization.load_pem_private_key(self.key_pem(), password=None)
        return key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def trusted_ca(self) -> list[x509.Certificate]:
        ctx = self.secrets["ROOTCA"].validation_context
        return x509.load_pem_x509_certificates(ctx.trusted_ca.inline_bytes)


def unpack(response: discovery_pb2.DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
    """The response's secrets by name; ValueError if a resource is not a Secret."""
    secrets = {}
    for resource in response.resources:
        secret = secret_pb2.Secret()
        if resource.type_url != SECRET_TYPE_URL or not resource.Unpack(secret):
            raise ValueError(f"unexpected resource type {resource.type_url}")
        secrets[secret.name] = secret
    return secrets


# Returns an error message to NACK the response with, or None to accept it.
Reject = Callable[[Received], str | None]


@dataclass
class EnvoySdsClient:
    """``async with EnvoySdsClient(path) as client``: subscribed until the block ends."""

    socket_path: Path
    resource_names: Sequence[str] = NAMES
    node_id: str = "sidecar~10.0.0.7~web-7d4b9.default~default.svc.cluster.local"
    reject: Reject | None = None
    # What Envoy reports in its first request after a reconnect: the version it holds.
    initial_version: str = ""
    received: list[Received] = field(default_factory=list)
    acks: list[tuple[str, str]] = field(default_factory=list)  # (version, nonce)
    nacks: list[tuple[str, str]] = field(default_factory=list)  # (version NACKed, nonce)
    accepted_version: str = ""
    ended: grpc.StatusCode | None = None  # how the stream ended, once it has
    ended_details: str = ""

    def __post_init__(self) -> None:
        self._changed = asyncio.Condition()
        self._channel: aio.Channel | None = None
        self._call: aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EnvoySdsClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        self._channel = aio.insecure_channel(f"unix:{self.socket_path}")
        self._call = sds_pb2_grpc.SecretDiscoveryServiceStub(self._channel).StreamSecrets()
        self.accepted_version = self.initial_version
        await self.send(self.request(version=self.initial_version))
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        """Hang up, as Envoy does when it exits (safe to call twice)."""
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    def request(
        self, *, version: str = "", nonce: str = "", error: str | None = None
    ) -> discovery_pb2.DiscoveryRequest:
        request = discovery_pb2.DiscoveryRequest(
            version_info=version,
            node=base_pb2.Node(id=self.node_id, cluster="web.default"),
            resource_names=list(self.resource_names),
            type_url=SECRET_TYPE_URL,
            response_nonce=nonce,
        )
        if error is not None:
            request.error_detail.CopyFrom(
                status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=error)
            )
        return request

    async def send(self, request: discovery_pb2.DiscoveryRequest) -> None:
        """Write a request as is (tests use it for stale nonces and re-subscriptions)."""
        assert self._call is not None
        await self._call.write(request)

    async def wait_for(
        self, predicate: Callable[[EnvoySdsClient], bool], timeout: float = 5.0
    ) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def wait_for_version(self, version: int | str, timeout: float = 5.0) -> Received:
        """The first response with ``version``, once it has arrived and been answered."""
        wanted = str(version)

        def arrived(client: EnvoySdsClient) -> bool:
            return any(r.version == wanted for r in client.received)

        await self.wait_for(arrived, timeout)
        return next(r for r in self.received if r.version == wanted)

    async def _read(self) -> None:
        call = self._call
        assert call is not None
        try:
            while True:
                response = await call.read()
                if response is aio.EOF:
                    self.ended = grpc.StatusCode.OK
                    break
                await self._on_response(response)
        except aio.AioRpcError as exc:
            self.ended, self.ended_details = exc.code(), exc.details() or ""
        except asyncio.CancelledError:
            self.ended = grpc.StatusCode.CANCELLED
        finally:
            async with self._changed:
                self._changed.notify_all()

    async def _on_response(self, response: discovery_pb2.DiscoveryResponse) -> None:
        at = time.perf_counter()
        error = None
        try:
            secrets = unpack(response)
        except ValueError as exc:
            error, secrets = str(exc), {}
        wanted = {k: v for k, v in secrets.items() if k in self.resource_names}
        received = Received(response.version_info, response.nonce, wanted, at)
        if error is None and self.reject is not None:
            error = self.reject(received)
        if error is None:
            await self.send(self.request(version=response.version_info, nonce=response.nonce))
            self.accepted_version = response.version_info
            self.acks.append((response.version_info, response.nonce))
        else:
            await self.send(
                self.request(version=self.accepted_version, nonce=response.nonce, error=error)
            )
            self.nacks.append((response.version_info, response.nonce))
        async with self._changed:
            self.received.append(received)
            self._changed.notify_all()


async def fetch_secrets(
    socket_path: Path, names: Sequence[str] = NAMES, timeout: float = 5.0
) -> discovery_pb2.DiscoveryResponse:
    """One unary FetchSecrets call."""
    async with aio.insecure_channel(f"unix:{socket_path}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        request = discovery_pb2.DiscoveryRequest(
            resource_names=list(names), type_url=SECRET_TYPE_URL
        )
        response: discovery_pb2.DiscoveryResponse = await stub.FetchSecrets(
            request, timeout=timeout
        )
        return response
