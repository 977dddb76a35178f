"""The agent's current X.509 credentials, and how delivery paths learn of new ones.

The rotation engine publishes a new :class:`X509Credentials` on every renewal (and when
only the trust bundle changes); every sink (Envoy SDS, the SPIFFE Workload API, the file
sink) reads :meth:`CredentialStore.current` and waits on :meth:`CredentialStore.updates`
to push the change to its clients. The private key lives only here and in the sinks'
outputs; it is never logged or shown in ``repr``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.pki.keys import PrivateKey
from meshca.spiffe import SpiffeId, TrustDomain

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class X509Credentials:
    """One X509-SVID with its key, and the trust bundle to verify peers with.

    ``chain`` is leaf first, then intermediates (no root); ``bundle`` holds the trust
    anchors (every root of the trust domain, several during a root rotation).
    ``version`` grows by one with each publication.
    """

    spiffe_id: SpiffeId
    private_key: PrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...]
    bundle: tuple[x509.Certificate, ...]
    version: int = 0

    @property
    def trust_domain(self) -> TrustDomain:
        return self.spiffe_id.trust_domain

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    def key_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted: for sinks that hand the key to a local data plane."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def key_der(self) -> bytes:
        """PKCS#8 DER (the SPIFFE Workload API's ``x509_svid_key``)."""
        return self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def chain_der(self) -> bytes:
        """Concatenated DER, leaf first (the Workload API's ``x509_svid``)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.chain)

    def bundle_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.bundle)

    def bundle_der(self) -> bytes:
        """Concatenated DER of the trust anchors (the Workload API's ``bundle``)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.bundle)


class CredentialStore:
    """Holds the latest credentials; sinks wait for new versions. One per agent."""

    def __init__(self) -> None:
        self._current: X509Credentials | None = None
        self._changed = asyncio.Condition()
        self._version = 0

    def current(self) -> X509Credentials | None:
        return self._current

    async def publish(
        self,
        spiffe_id: SpiffeId,
        private_key: PrivateKey,
        chain: tuple[x509.Certificate, ...],
        bundle: tuple[x509.Certificate, ...],
    ) -> X509Credentials:
        """Make these the current credentials (next version) and wake every waiter."""
        self._version += 1
        creds = X509Credentials(spiffe_id, private_key, chain, bundle, self._version)
        async with self._changed:
            self._current = creds
            self._changed.notify_all()
        return creds

    async def publish_bundle(self, bundle: tuple[x509.Certificate, ...]) -> X509Credentials | None:
        """Replace only the trust bundle (a refresh from the CA's bundle endpoint)."""
        current = self._current
        if current is None or current.bundle == bundle:
            return current
        return await self.publish(current.spiffe_id, current.private_key, current.chain, bundle)

    async def wait_newer(self, version: int) -> X509Credentials:
        """The first credentials with a version greater than ``version``."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._current is not None and self._current.version > version
            )
            assert self._current is not None
            return self._current

    async def updates(self) -> AsyncIterator[X509Credentials]:
        """The current credentials (once there are any), then every newer version."""
        seen = 0
        while True:
            creds = await self.wait_newer(seen)
            seen = creds.version
            yield creds


class CredentialSink(Protocol):
    """A delivery path: started with the agent's store, stopped on shutdown."""

    async def start(self, store: CredentialStore) -> None: ...

    async def stop(self) -> None: ...


async def stop_sinks(sinks: Sequence[tuple[str, CredentialSink]]) -> None:
    """Stop ``(name, sink)`` pairs in reverse order of starting; a sink that fails to stop is
    logged and the rest still stop."""
    for name, sink in reversed(sinks):
        try:
            await sink.stop()
        except OSError as exc:
            log.warning("stopping %s: %s", name, exc)
