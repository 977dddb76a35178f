"""The meshca exception tree.

Every error meshca raises on purpose derives from :class:`MeshcaError`::

    MeshcaError                 root; ``reason`` is a short stable code (metric label)
    ├── SpiffeIdError           a string is not a valid SPIFFE ID or trust domain
    ├── AuthenticationError     the caller's credential was missing or not accepted
    ├── PolicyError             the caller is known but may not have what it asked for
    ├── CSRError                the certificate signing request is malformed or refused
    ├── SignerError             a key backend (file, PKCS#11, KMS) failed or is unreachable
    ├── StoreError              the database failed, or the ledger does not verify
    ├── OverloadError           a limit (in-flight, rate) was reached; retry after a hint
    ├── ConfigError             configuration is invalid; raised at start-up only
    │   (the node agent adds, in meshca.agent:)
    ├── CAError                 the CA refused or could not be reached (agent/client.py)
    ├── CredentialError         the agent's own credential is unusable (credential_sources.py)
    └── TrustError              a trust bundle or CA answer does not verify (agent/trust.py)

Only ``meshca.api`` maps these to wire status codes. ``message`` is safe to show to the
caller: it never contains a token, a key or a PIN.
"""

from __future__ import annotations


class MeshcaError(Exception):
    """Root of every meshca error.

    ``reason`` is a short snake_case code, stable across releases, used as a Prometheus
    label and in logs; ``message`` explains the problem to a human.
    """

    default_reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason

    def __str__(self) -> str:
        return self.message


class SpiffeIdError(MeshcaError, ValueError):
    """A string is not a valid SPIFFE ID or trust domain (SPIFFE-ID spec, section 2)."""

    default_reason = "invalid_spiffe_id"


class AuthenticationError(MeshcaError):
    """The caller's credential is missing, malformed, expired or not trusted."""

    default_reason = "authentication_failed"


class PolicyError(MeshcaError):
    """The caller was authenticated but may not be issued what it asked for."""

    default_reason = "policy_denied"


class CSRError(MeshcaError):
    """The certificate signing request is malformed or asks for something refused."""

    default_reason = "invalid_csr"


class SignerError(MeshcaError):
    """A signing backend failed or is unavailable; the request may be retried."""

    default_reason = "signer_unavailable"


class StoreError(MeshcaError):
    """The database failed or holds data that does not verify."""

    default_reason = "store_error"


class OverloadError(MeshcaError):
    """The CA is at a configured limit; the caller should retry after ``retry_after`` s."""

    default_reason = "overloaded"

    def __init__(self, message: str, *, reason: str | None = None, retry_after: float) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class ConfigError(MeshcaError):
    """The configuration is invalid. Raised at start-up, never per request."""

    default_reason = "invalid_config"
