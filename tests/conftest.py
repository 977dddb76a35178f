"""Shared fixtures. Subpackages add their own conftest.py for area-specific fixtures."""

from __future__ import annotations

from meshca.spiffe import TrustDomain

TRUST_DOMAIN = TrustDomain("cluster.local")
