"""Issuance policy: what an authenticated caller may be issued.

Authenticators say who the caller is; this module decides whether that identity may get a
certificate from this CA and for how long. Policy never builds certificates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from meshca.authn.base import Attestation
from meshca.durations import format_duration
from meshca.errors import PolicyError
from meshca.spiffe import TrustDomain

MIN_LIFETIME = timedelta(seconds=1)


@dataclass(frozen=True, slots=True)
class IssuancePolicy:
    """Trust-domain membership and lifetime rules for X509-SVIDs."""

    trust_domain: TrustDomain
    max_ttl: timedelta
    default_ttl: timedelta

    def check_identity(self, attestation: Attestation) -> None:
        """Refuse identities outside this CA's trust domain, or without a path.

        SPIFFE X509-SVID spec, section 2: a leaf SVID's SPIFFE ID has a non-empty path.
        """
        sid = attestation.spiffe_id
        if not sid.member_of(self.trust_domain):
            raise PolicyError(
                f"{sid} is not in trust domain {self.trust_domain}; this CA issues only there",
                reason="foreign_trust_domain",
            )
        if sid.is_trust_domain_id:
            raise PolicyError(
                f"{sid} names a trust domain, not a workload", reason="trust_domain_id"
            )

    def lifetime(self, requested: timedelta | None) -> timedelta:
        """The certificate lifetime to grant.

        Unset or non-positive requests get ``default_ttl``; longer than ``max_ttl`` is
        clamped to it (Istio clients ask for 24h by default and expect clamping, not a
        refusal).
        """
        if requested is None or requested <= timedelta(0):
            return self.default_ttl
        # X.509 times have whole seconds (RFC 5280 4.1.2.5): grant at least one.
        return max(min(requested, self.max_ttl), MIN_LIFETIME)

    def describe(self) -> str:
        return (
            f"trust domain {self.trust_domain}, default TTL {format_duration(self.default_ttl)}, "
            f"max TTL {format_duration(self.max_ttl)}"
        )
