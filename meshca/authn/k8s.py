"""Kubernetes service-account tokens: who is calling, according to its cluster?

A workload presents its projected service-account token as ``authorization: Bearer``
and may name its cluster in the ``clusterid`` header (the Istio CA contract). Each
configured cluster validates tokens one of two ways:

* ``tokenreview``: ask the cluster's API server (TokenReview v1), see ``_tokenreview``;
* ``jwt``: verify the signature and claims locally against the issuer's JWKS,
  see ``_jwks``.

Either way the result is the Kubernetes-style SPIFFE ID
``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`` with selectors
``k8s:cluster:``, ``k8s:ns:``, ``k8s:sa:`` and, when the token is bound to a pod,
``k8s:pod-name:``, ``k8s:pod-uid:`` and (when the issuer names it) ``k8s:node-name:``.

Reason codes raised (``AuthenticationError.reason``): ``unknown_cluster``,
``missing_token``, ``token_too_large``, ``malformed_token``, ``invalid_identity``;
TokenReview: ``tokenreview_unavailable``, ``token_rejected``, ``wrong_audience``,
``not_a_service_account``; JWT: ``bad_algorithm``, ``unknown_key``, ``bad_signature``,
``token_expired``, ``token_not_yet_valid``, ``wrong_audience``, ``wrong_issuer``,
``missing_claims``, ``inconsistent_claims``, ``jwks_unavailable``.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from meshca.authn._jwks import JwksVerifier, ServiceAccountIdentity
from meshca.authn._tokenreview import TokenReviewer
from meshca.authn.base import Attestation, AuthMethod, Credential, Peer
from meshca.authn.issuers import Issuer
from meshca.config import JwtCluster, TokenReviewCluster
from meshca.errors import AuthenticationError, ConfigError, SpiffeIdError
from meshca.spiffe import TrustDomain

__all__ = ["MAX_TOKEN_BYTES", "KubernetesAuthenticator"]

_log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 16 * 1024
"""Longer bearer tokens are refused unread (Kubernetes tokens are about 1 KiB)."""

_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
"""RFC 6750 section 2.1 ``b64token``: the characters a bearer token may have."""

_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
"""One SPIFFE ID path segment (SPIFFE-ID spec, section 2.2)."""

_SELECTOR_VALUE = re.compile(r"[A-Za-z0-9._:-]{1,253}")
"""Pod and node names (RFC 1123 subdomains) and UIDs; anything else is left out of the
selectors."""


class _Validator(Protocol):
    """One cluster's way of checking a token."""

    @property
    def method(self) -> AuthMethod: ...

    async def verify(self, token: str) -> ServiceAccountIdentity: ...

    async def close(self) -> None: ...

    @property
    def issuer(self) -> str: ...

    @property
    def answered(self) -> bool: ...

    async def probe(self) -> None: ...


def _client_ssl_context(ca_file: Path | None, cluster_id: str) -> ssl.SSLContext | None:
    """Verify the server against ``ca_file`` when given; None means the system roots."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cluster {cluster_id!r}: cannot load ca_file {ca_file}: {exc}") from exc


def _refusal(reason: str, message: str) -> AuthenticationError:
    return AuthenticationError(message, reason=reason)


def _check_segment(what: str, value: str) -> None:
    if not _PATH_SEGMENT.fullmatch(value) or value in (".", ".."):
        raise _refusal(
            "invalid_identity",
            f"the token's {what} {value[:80]!r} cannot be a SPIFFE ID path segment; "
            "allowed: letters, digits, '.', '-', '_'",
        )


class KubernetesAuthenticator:
    """Authenticates Kubernetes service-account tokens from one or more clusters.

    ``clusters`` are selected by ``Credential.cluster_id``; a credential without one
    goes to ``default_cluster``, or to the first cluster. Raises ConfigError at
    construction if the clusters are empty or inconsistent, or a ``ca_file`` is
    unreadable. Call :meth:`close` to release HTTP connections.
    """

    def __init__(
        self,
        trust_domain: TrustDomain,
        clusters: Sequence[TokenReviewCluster | JwtCluster],
        default_cluster: str | None = None,
    ) -> None:
        if not clusters:
            raise ConfigError("no Kubernetes clusters are configured")
        ids = [cluster.cluster_id for cluster in clusters]
        if len(ids) != len(set(ids)):
            raise ConfigError(f"cluster ids must be unique, got {ids}")
        if default_cluster is not None and default_cluster not in ids:
            raise ConfigError(f"default_cluster {default_cluster!r} is not among {ids}")
        self._trust_domain = trust_domain
        self._default = default_cluster if default_cluster is not None else ids[0]
        self._validators: dict[str, _Validator] = {}
        for cluster in clusters:
            context = _client_ssl_context(cluster.ca_file, cluster.cluster_id)
            if isinstance(cluster, TokenReviewCluster):
                self._validators[cluster.cluster_id] = TokenReviewer(cluster, context)
            else:
                self._validators[cluster.cluster_id] = JwksVerifier(cluster, context)

    @property
    def cluster_ids(self) -> tuple[str, ...]:
        return tuple(self._validators)

    @property
    def issuers(self) -> tuple[Issuer, ...]:
        """Each cluster's token validator, as :mod:`meshca.authn.issuers` watches it."""
        return tuple(self._validators.values())

    async def close(self) -> None:
        """Close every cluster's HTTP session. Safe to call more than once."""
        for validator in self._validators.values():
            await validator.close()

    async def authenticate(self, credential: Credential, peer: Peer) -> Attestation:
        """Check the bearer token with the selected cluster; see the module docstring."""
        cluster_id = credential.cluster_id or self._default
        try:
            validator = self._validators.get(cluster_id)
            if validator is None:
                raise _refusal(
                    "unknown_cluster",
                    f"unknown cluster {cluster_id[:80]!r}; "
                    f"configured: {', '.join(self._validators)}",
                )
            token = self._checked_token(credential.bearer_token)
            identity = await validator.verify(token)
            attestation = self._attest(cluster_id, validator.method, identity)
        except AuthenticationError as exc:
            _log.info(
                "refused Kubernetes token from %s for cluster %r: %s (reason=%s)",
                peer.address,
                cluster_id[:80],
                exc.message,
                exc.reason,
            )
            raise
        _log.debug("authenticated %s from %s", attestation.spiffe_id, peer.address)
        return attestation

    @staticmethod
    def _checked_token(token: str | None) -> str:
        if not token:
            raise _refusal("missing_token", "no bearer token was presented")
        if len(token) > MAX_TOKEN_BYTES:
            raise _refusal(
                "token_too_large",
                f"the bearer token is {len(token)} bytes; the limit is {MAX_TOKEN_BYTES}",
            )
        if not _BEARER_TOKEN.fullmatch(token):
            raise _refusal(
                "malformed_token",
                "the bearer token has characters a token may not have (RFC 6750 section 2.1)",
            )
        return token

    def _attest(
        self, cluster_id: str, method: AuthMethod, identity: ServiceAccountIdentity
    ) -> Attestation:
        _check_segment("namespace", identity.namespace)
        _check_segment("service account", identity.service_account)
        try:
            spiffe_id = self._trust_domain.workload(identity.namespace, identity.service_account)
        except SpiffeIdError as exc:
            raise _refusal("invalid_identity", f"no SPIFFE ID for the token: {exc}") from None
        selectors = [
            f"k8s:cluster:{cluster_id}",
            f"k8s:ns:{identity.namespace}",
            f"k8s:sa:{identity.service_account}",
        ]
        for kind, value in (
            ("pod-name", identity.pod_name),
            ("pod-uid", identity.pod_uid),
            ("node-name", identity.node_name),
        ):
            if value is None:
                continue
            if _SELECTOR_VALUE.fullmatch(value):
                selectors.append(f"k8s:{kind}:{value}")
            else:
                _log.warning("left out %s %r: not a Kubernetes name or UID", kind, value[:80])
        return Attestation(
            spiffe_id=spiffe_id,
            method=method,
            selectors=tuple(selectors),
            expires_at=identity.expires_at,
        )
