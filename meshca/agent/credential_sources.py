"""What the agent presents to the CA to prove who it is, other than an SVID.

A :class:`CredentialSource` hands the CA client a bearer token for each request. It is
asked again for every request, because the platform rotates these tokens under the
agent's feet: the kubelet rewrites a projected service-account token well before it
expires, and a GCE identity token lives one hour.

- :class:`ProjectedTokenFile`: the projected service-account token (Kubernetes), read
  from its file on every call.
- :class:`GceIdentityToken`: the instance identity token of a GCE VM, fetched through an
  :class:`IdentityTokenFetcher`. This build ships no fetcher (the metadata-server client
  comes with the GCE issue), so ``--credential gce`` is refused at start-up.
- :class:`NoToken`: for SVID-only agents, which authenticate with their certificate.

Tokens are never logged; errors name the file or the source, never the content.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Protocol

from meshca.errors import ConfigError, MeshcaError

MAX_TOKEN_BYTES = 64 * 1024
"""A projected token is a few KiB; anything far larger is not a token."""


class CredentialError(MeshcaError):
    """The agent's own credential could not be read. Retrying soon rarely helps: a
    missing or unreadable token file is a deployment problem, so the agent says which
    file and why, and retries slowly."""

    default_reason = "credential_unavailable"


class CredentialSource(Protocol):
    """A bearer credential for CreateCertificate, fetched anew for each request."""

    @property
    def description(self) -> str:
        """What the source is, for logs and the status line (never the token)."""
        ...

    async def token(self) -> str | None:
        """The token to send as ``authorization: Bearer``; None sends no header.

        Raises CredentialError when the credential cannot be had.
        """
        ...


class ProjectedTokenFile:
    """A Kubernetes projected service-account token, re-read on every call."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def description(self) -> str:
        return f"service-account token {self.path}"

    async def token(self) -> str:
        return await asyncio.to_thread(self._read)

    def _read(self) -> str:
        try:
            with self.path.open("rb") as handle:
                raw = handle.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise CredentialError(
                _why_unreadable(self.path, exc), reason="token_unreadable"
            ) from None
        if len(raw) > MAX_TOKEN_BYTES:
            raise CredentialError(
                f"the service-account token file {self.path} is larger than "
                f"{MAX_TOKEN_BYTES} bytes; it does not hold a token",
                reason="token_invalid",
            )
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise CredentialError(
                f"the service-account token file {self.path} is not ASCII text; "
                "it does not hold a JWT",
                reason="token_invalid",
            ) from None
        if not text:
            raise CredentialError(
                f"the service-account token file {self.path} is empty", reason="token_empty"
            )
        if any(c.isspace() for c in text):
            raise CredentialError(
                f"the service-account token file {self.path} holds more than one word; "
                "it does not hold a JWT",
                reason="token_invalid",
            )
        return text


def _why_unreadable(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return (
            f"the service-account token file {path} does not exist: mount a projected "
            "token there (audience istio-ca) or point --token-file at it"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"cannot read the service-account token file {path}: permission denied "
            "(check the agent's user and the volume's defaultMode)"
        )
    if exc.errno == errno.EISDIR:
        return f"the service-account token file {path} is a directory, not a file"
    return f"cannot read the service-account token file {path}: {exc.strerror or exc}"


class IdentityTokenFetcher(Protocol):
    """Fetches a GCE instance identity token for an audience (the metadata server's
    ``instance/service-accounts/default/identity?audience=...&format=full``)."""

    async def identity_token(self, audience: str) -> str: ...


class GceIdentityToken:
    """A GCE VM's instance identity token, for CAs that validate Google-signed tokens."""

    def __init__(self, fetcher: IdentityTokenFetcher, audience: str) -> None:
        self._fetcher = fetcher
        self.audience = audience

    @property
    def description(self) -> str:
        return f"GCE identity token (audience {self.audience})"

    async def token(self) -> str:
        return await self._fetcher.identity_token(self.audience)


class NoToken:
    """No bearer token: the agent authenticates with its SVID on the mTLS port."""

    @property
    def description(self) -> str:
        return "X509-SVID (mTLS)"

    async def token(self) -> None:
        return None


GCE_UNAVAILABLE = (
    "credential 'gce' is not available in this build: fetching GCE instance identity "
    "tokens from the metadata server comes with the GCE issue; use 'k8s' or 'svid'"
)


def credential_source(kind: str, token_file: Path) -> CredentialSource:
    """The source for ``--credential``; ConfigError for one this build cannot provide."""
    if kind == "k8s":
        return ProjectedTokenFile(token_file)
    if kind == "svid":
        return NoToken()
    if kind == "gce":
        raise ConfigError(GCE_UNAVAILABLE, reason="credential_unavailable")
    raise ConfigError(f"unknown credential {kind!r}; allowed: k8s, gce, svid")
