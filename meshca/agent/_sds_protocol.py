"""Envoy SDS v3 on the wire: the two secrets, and one stream's state-of-the-world xDS state.

Nothing here does I/O. :class:`StreamState` is fed every DiscoveryRequest and every new
credentials version and answers which secrets to send; :class:`Snapshot` turns one
credentials version into the ``Secret`` resources, built once and shared by all streams.
The rules, each from the xDS protocol document (envoyproxy.io, "xDS REST and gRPC
protocol"), are listed in :mod:`meshca.agent.sds`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from meshca.agent.credentials import X509Credentials

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
CERTIFICATE = "default"
TRUST_BUNDLE = "ROOTCA"
SERVED_NAMES = frozenset({CERTIFICATE, TRUST_BUNDLE})
WILDCARD = "*"
CONTROL_PLANE = "meshca-agent"


# The envoy protos ship without type stubs; these describe the fields meshca reads.
class _Status(Protocol):
    code: int
    message: str


class _Node(Protocol):
    id: str


class DiscoveryRequest(Protocol):
    version_info: str
    node: _Node
    resource_names: Sequence[str]
    type_url: str
    response_nonce: str
    error_detail: _Status

    def HasField(self, name: str) -> bool: ...  # noqa: N802 (protobuf API)


class DiscoveryResponse(Protocol):
    version_info: str
    type_url: str
    nonce: str


class SdsProtocolError(Exception):
    """The client broke the protocol; the stream or call ends with ``code``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_type_url(request: DiscoveryRequest) -> None:
    """An SDS request names the Secret type, or nothing (implicit on a singleton xDS API)."""
    if request.type_url and request.type_url != SECRET_TYPE_URL:
        raise SdsProtocolError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"type_url {request.type_url[:200]!r} is not served here; "
            f"the secret discovery service serves only {SECRET_TYPE_URL}",
        )


def _packed_secret(secret: object) -> object:
    resource = any_pb2.Any()
    resource.Pack(secret)
    return resource


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One credentials version as packed ``Secret`` resources, keyed by name."""

    version: int
    resources: Mapping[str, object] = field(repr=False)

    @classmethod
    def of(cls, creds: X509Credentials) -> Snapshot:
        """``default``: the chain (leaf first) and key; ``ROOTCA``: every trust anchor."""
        certificate = secret_pb2.Secret(
            name=CERTIFICATE,
            tls_certificate=common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(inline_bytes=creds.chain_pem()),
                private_key=base_pb2.DataSource(inline_bytes=creds.key_pem()),
            ),
        )
        bundle = secret_pb2.Secret(
            name=TRUST_BUNDLE,
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(inline_bytes=creds.bundle_pem()),
            ),
        )
        return cls(
            creds.version,
            {CERTIFICATE: _packed_secret(certificate), TRUST_BUNDLE: _packed_secret(bundle)},
        )

    def response(self, names: Iterable[str], nonce: str) -> DiscoveryResponse:
        """A DiscoveryResponse carrying the named secrets (in a stable order)."""
        wanted = set(names)
        message: DiscoveryResponse = discovery_pb2.DiscoveryResponse(
            version_info=str(self.version),
            resources=[self.resources[name] for name in sorted(wanted & SERVED_NAMES)],
            type_url=SECRET_TYPE_URL,
            nonce=nonce,
            control_plane=base_pb2.ControlPlane(identifier=CONTROL_PLANE),
        )
        return message


def fetch_names(request: DiscoveryRequest) -> frozenset[str]:
    """The names a unary FetchSecrets asks for: none listed, or ``*``, means all."""
    names = frozenset(request.resource_names)
    if not names or WILDCARD in names:
        return SERVED_NAMES | (names - {WILDCARD})
    return names


def new_nonce() -> str:
    """A fresh, unguessable nonce for one response."""
    return secrets.token_hex(8)


class Kind(Enum):
    """What a request on a stream was, as the xDS protocol defines it."""

    SUBSCRIBE = "subscribe"  # no response_nonce: the stream's first request (or a re-send)
    ACK = "ack"  # the last response's nonce and its version: applied
    NACK = "nack"  # the last response's nonce with error_detail (or the old version)
    STALE = "stale"  # an older response's nonce: superseded, ignored


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    send: frozenset[str] = frozenset()
    first_nack: bool = False  # a NACK of this nonce not seen before (log it once)


@dataclass(slots=True)
class StreamState:
    """One StreamSecrets stream: what the client subscribed to and what it has been sent."""

    node_id: str = ""
    names: frozenset[str] = frozenset()
    requests: int = 0
    legacy_wildcard: bool = False
    nonce: str = ""
    sent_version: int = 0
    acked_version: str = ""
    nacked_version: str = ""
    nacked_nonce: str = ""

    @property
    def served(self) -> frozenset[str]:
        return self.names & SERVED_NAMES

    def on_request(self, request: DiscoveryRequest, current: int | None) -> Outcome:
        """Classify ``request`` and decide what to send, ``current`` being the version the
        agent now holds (None before the first credentials)."""
        check_type_url(request)
        first = self.requests == 0
        self.requests += 1
        if not self.node_id and request.node.id:
            self.node_id = request.node.id[:200]
        kind, first_nack = self._acknowledgement(request)
        if kind is Kind.STALE:
            return Outcome(kind)
        names = self._subscription(request.resource_names, first)
        added = names - self.names
        self.names = names
        served = self.served
        if current is None or not served:
            send: frozenset[str] = frozenset()
        elif kind is Kind.SUBSCRIBE or current > self.sent_version:
            send = served
        else:
            # Same version as last sent: only secrets newly asked for, so a NACKed
            # version is never sent again on its own.
            send = added & SERVED_NAMES
        return Outcome(kind, send, first_nack)

    def on_rotation(self, current: int) -> frozenset[str]:
        """The secrets to push now that the agent holds version ``current``."""
        if current > self.sent_version:
            return self.served
        return frozenset()

    def sent(self, version: int, nonce: str) -> None:
        self.sent_version = version
        self.nonce = nonce

    def _acknowledgement(self, request: DiscoveryRequest) -> tuple[Kind, bool]:
        nonce = request.response_nonce
        if not nonce:
            return Kind.SUBSCRIBE, False
        if nonce != self.nonce:
            return Kind.STALE, False
        if request.HasField("error_detail") or request.version_info != str(self.sent_version):
            first = nonce != self.nacked_nonce
            self.nacked_nonce = nonce
            self.nacked_version = str(self.sent_version)
            return Kind.NACK, first
        self.acked_version = request.version_info
        return Kind.ACK, False

    def _subscription(self, requested: Sequence[str], first: bool) -> frozenset[str]:
        """xDS wildcard rules: ``*`` subscribes to everything; so does an empty first
        request, and empty requests after it, until the client names resources."""
        names = frozenset(requested)
        if first:
            self.legacy_wildcard = not names
        elif names:
            self.legacy_wildcard = False
        if WILDCARD in names or (not names and self.legacy_wildcard):
            return SERVED_NAMES | (names - {WILDCARD})
        return names
