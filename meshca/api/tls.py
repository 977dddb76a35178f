"""The CA's own TLS identity for its gRPC ports, renewed without a restart.

Two listeners share one certificate: the TLS port (callers authenticate with a token)
and the mTLS port, which requires a client certificate chaining to the current trust
bundle (callers renew with the SVID they hold). gRPC asks the credential fetchers for
a new configuration before each handshake; each listener's fetcher returns one only when
the certificate or the trust bundle changed since it last looked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.ca.authority import Authority, utcnow
from meshca.spiffe import SpiffeId

log = logging.getLogger(__name__)


class ServerCertificate:
    """Issues and renews (at half life) the gRPC server certificate."""

    def __init__(self, authority: Authority, spiffe_id: SpiffeId, dns_names: Sequence[str]) -> None:
        self._authority = authority
        self._spiffe_id = spiffe_id
        self._dns_names = list(dns_names)
        self._key_pem = b""
        self.chain_pem: tuple[str, ...] = ()
        self._roots_pem = b""
        self._generation = 0
        self._renew_at = utcnow()

    async def refresh(self, lifetime: timedelta, *, renew: bool = False) -> None:
        """Renew the certificate when due (or now, with ``renew``: the root changed) and
        pick up trust-bundle changes."""
        roots = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in self._authority.trust_bundle()
        )
        changed = roots != self._roots_pem
        self._roots_pem = roots
        if renew or not self.chain_pem or utcnow() >= self._renew_at:
            key_pem, chain = await self._authority.issue_server_certificate(
                self._spiffe_id, self._dns_names, lifetime
            )
            leaf = x509.load_pem_x509_certificate(chain[0].encode())
            self._key_pem, self.chain_pem = key_pem, chain
            now = utcnow()
            self._renew_at = now + (leaf.not_valid_after_utc - now) / 2
            log.info(
                "server certificate for %s valid until %s",
                self._spiffe_id,
                leaf.not_valid_after_utc.isoformat(),
            )
            changed = True
        if changed:
            self._generation += 1

    def _configuration(self, with_client_roots: bool) -> grpc.ServerCertificateConfiguration:
        served_chain = "".join(self.chain_pem[:-1]).encode()  # leaf + intermediate
        return grpc.ssl_server_certificate_configuration(
            [(self._key_pem, served_chain)],
            root_certificates=self._roots_pem if with_client_roots else None,
        )

    def credentials(self, *, require_client_certificate: bool) -> grpc.ServerCredentials:
        """Credentials for one listener; call :meth:`refresh` first."""
        assert self.chain_pem, "refresh() first"
        seen = self._generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal seen
            if seen == self._generation:
                return None
            seen = self._generation
            return self._configuration(require_client_certificate)

        fetcher: Callable[[], grpc.ServerCertificateConfiguration | None] = fetch
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(require_client_certificate),
            fetcher,
            require_client_authentication=require_client_certificate,
        )
