"""The Authenticator seam.

An authenticator checks one kind of credential (a Kubernetes service-account token, a GCE
instance identity token, a presented X509-SVID) and returns a frozen :class:`Attestation`:
the SPIFFE ID the caller proved, the evidence behind it and when the credential expires.
Authenticators never build certificates; policy in ``meshca.ca`` decides what an
Attestation may be issued.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cryptography import x509

from meshca.spiffe import SpiffeId


class AuthMethod(enum.StrEnum):
    """How a caller proved its identity; recorded in the ledger."""

    K8S_TOKEN_REVIEW = "k8s-tokenreview"
    K8S_JWT = "k8s-jwt"
    GCE_IDENTITY = "gce-iit"
    X509_SVID = "x509-svid"
    JOIN_TOKEN = "join-token"


@dataclass(frozen=True, slots=True)
class Credential:
    """What the caller presented. ``bearer_token`` is secret and never shown in repr.

    ``csr`` is the request's CSR as sent (unchecked): a join token grants one SPIFFE ID,
    and its authenticator refuses a CSR asking for another before spending the token.
    """

    bearer_token: str | None = field(default=None, repr=False)
    cluster_id: str | None = None
    csr: bytes | str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Peer:
    """The transport-level caller: address (``ip:port``) and any TLS client certificates."""

    address: str
    certificates: tuple[x509.Certificate, ...] = ()


@dataclass(frozen=True, slots=True)
class Attestation:
    """A verified identity claim.

    ``selectors`` are ``kind:name:value`` strings (``k8s:ns:default``,
    ``k8s:pod-uid:...``, ``gce:project-id:p``) describing the evidence; ``expires_at`` is
    when the credential itself stops being valid (timezone-aware, UTC), if known.

    ``delegated_by`` is set when a node agent proved its own identity and was allowed to
    obtain ``spiffe_id`` for a workload it serves (:mod:`meshca.ca.node_authz`); ``node``
    is then the Kubernetes node both run on (None for an agent outside Kubernetes).
    """

    spiffe_id: SpiffeId
    method: AuthMethod
    selectors: tuple[str, ...] = ()
    expires_at: datetime | None = None
    delegated_by: SpiffeId | None = None
    node: str | None = None

    def selector(self, kind: str) -> str | None:
        """The value of the one selector ``kind:...`` (e.g. ``k8s:pod-uid``); None when
        there is none or more than one."""
        prefix = kind + ":"
        values = [s[len(prefix) :] for s in self.selectors if s.startswith(prefix)]
        return values[0] if len(values) == 1 else None

    def evidence_summary(self, limit: int = 1024) -> str:
        """Selectors joined for the ledger, truncated to ``limit`` characters."""
        text = ",".join(self.selectors)
        return text if len(text) <= limit else text[: limit - 3] + "..."


class Authenticator(Protocol):
    """Checks one kind of credential. Raises AuthenticationError with a reason on refusal."""

    async def authenticate(self, credential: Credential, peer: Peer) -> Attestation: ...
