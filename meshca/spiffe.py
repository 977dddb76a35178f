"""SPIFFE identity value objects, parsed and validated once at the edge.

Rules follow the SPIFFE-ID specification (section 2): the scheme is ``spiffe``; the trust
domain uses only lowercase letters, digits, ``.``, ``-`` and ``_``; the path is a sequence
of ``/``-prefixed segments of letters, digits, ``.``, ``-`` and ``_``, none empty, none
``.`` or ``..``; no port, user info, query or fragment. A SPIFFE ID is at most 2048
bytes and a trust domain name at most 255 bytes.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from meshca.errors import SpiffeIdError

SCHEME_PREFIX = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_TD_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


def _check_trust_domain_name(name: str) -> None:
    if not name:
        raise SpiffeIdError("trust domain is empty")
    if len(name.encode()) > MAX_TRUST_DOMAIN_LENGTH:
        raise SpiffeIdError(f"trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} bytes")
    bad = sorted({c for c in name if c not in _TD_CHARS})
    if bad:
        raise SpiffeIdError(
            f"trust domain {name!r} has characters {''.join(bad)!r}; "
            "allowed: lowercase letters, digits, '.', '-', '_'"
        )


def _check_path(path: str) -> None:
    if not path:
        return
    if not path.startswith("/"):
        raise SpiffeIdError(f"path {path!r} must start with '/'")
    for segment in path[1:].split("/"):
        if not segment:
            raise SpiffeIdError(f"path {path!r} has an empty segment or a trailing '/'")
        if segment in (".", ".."):
            raise SpiffeIdError(f"path {path!r} has a '.' or '..' segment")
        bad = sorted({c for c in segment if c not in _SEGMENT_CHARS})
        if bad:
            raise SpiffeIdError(
                f"path segment {segment!r} has characters {''.join(bad)!r}; "
                "allowed: letters, digits, '.', '-', '_'"
            )


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    """A SPIFFE trust domain name, such as ``cluster.local`` or ``example.org``."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain_name(self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accept a bare name or ``spiffe://name`` (without a path)."""
        if "://" in text:
            sid = SpiffeId.parse(text)
            if sid.path:
                raise SpiffeIdError(f"{text!r} is a workload ID, not a trust domain")
            return sid.trust_domain
        return cls(text)

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own SPIFFE ID, ``spiffe://<name>`` (used by CA certificates)."""
        return SpiffeId(self, "")

    def workload(self, namespace: str, service_account: str) -> SpiffeId:
        """The Kubernetes-style workload ID ``spiffe://<td>/ns/<ns>/sa/<sa>``."""
        return SpiffeId(self, f"/ns/{namespace}/sa/{service_account}")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A parsed SPIFFE ID. ``path`` is empty for a trust domain ID, else starts with '/'."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        _check_path(self.path)
        if len(str(self).encode()) > MAX_ID_LENGTH:
            raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://trust-domain/path``; raise SpiffeIdError naming the defect."""
        if len(text.encode()) > MAX_ID_LENGTH:
            raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes")
        if not text.startswith(SCHEME_PREFIX):
            raise SpiffeIdError(f"{text[:80]!r} is not a SPIFFE ID: the scheme must be 'spiffe://'")
        rest = text[len(SCHEME_PREFIX) :]
        for char, what in (("?", "a query"), ("#", "a fragment")):
            if char in rest:
                raise SpiffeIdError(f"a SPIFFE ID may not have {what}")
        td, slash, path = rest.partition("/")
        if "@" in td:
            raise SpiffeIdError("a SPIFFE ID may not have user info")
        if ":" in td:
            raise SpiffeIdError("a SPIFFE ID may not have a port")
        return cls(TrustDomain(td), slash + path)

    @property
    def is_trust_domain_id(self) -> bool:
        return not self.path

    def member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"
