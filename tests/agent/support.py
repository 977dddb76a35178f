"""Credentials for agent tests: a real root -> intermediate -> leaf chain, no CA server."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509

from meshca.agent.credentials import CredentialStore, X509Credentials
from meshca.pki import profile
from meshca.pki.keys import KeyAlgorithm, PrivateKey
from meshca.spiffe import SpiffeId, TrustDomain

TD = TrustDomain("cluster.local")
WEB = TD.workload("default", "web")


@dataclass
class LocalCA:
    """A root and an intermediate held in memory; issues leaves like meshca does."""

    trust_domain: TrustDomain = TD
    root_key: PrivateKey = field(default_factory=KeyAlgorithm.EC_P256.generate)
    inter_key: PrivateKey = field(default_factory=KeyAlgorithm.EC_P256.generate)

    def __post_init__(self) -> None:
        now = datetime.now(UTC)
        self.root = profile.build_root(
            self.root_key, self.trust_domain, ttl=timedelta(days=30), now=now
        )
        self.intermediate = profile.build_intermediate(
            self.root_key,
            self.root,
            self.inter_key.public_key(),
            self.trust_domain,
            ttl=timedelta(days=2),
            now=now,
        )

    def issue(
        self, spiffe_id: SpiffeId = WEB, ttl: timedelta = timedelta(hours=1)
    ) -> tuple[PrivateKey, tuple[x509.Certificate, ...]]:
        key = KeyAlgorithm.EC_P256.generate()
        now = datetime.now(UTC)
        leaf = profile.build_svid(
            self.inter_key,
            self.intermediate,
            key.public_key(),
            spiffe_id,
            not_after=now + ttl,
            now=now,
        )
        return key, (leaf, self.intermediate)

    async def publish(
        self,
        store: CredentialStore,
        spiffe_id: SpiffeId = WEB,
        ttl: timedelta = timedelta(hours=1),
    ) -> X509Credentials:
        """Issue a fresh leaf and publish it with this CA's root as the bundle."""
        key, chain = self.issue(spiffe_id, ttl)
        return await store.publish(spiffe_id, key, chain, (self.root,))
