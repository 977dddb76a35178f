"""What the agent presents to the CA to prove who it is, other than an SVID.

A :class:`CredentialSource` hands the CA client a bearer token for each request. It is
asked again for every request, because the platform rotates these tokens under the
agent's feet: the kubelet rewrites a projected service-account token well before it
expires, and a GCE identity token lives one hour.

- :class:`ProjectedTokenFile`: the projected service-account token (Kubernetes), read
  from its file on every call.
- :class:`GceIdentityToken`: the instance identity token of a GCE VM, fetched through an
  :class:`IdentityTokenFetcher` (:class:`GceMetadataServer`, the VM's metadata server)
  before every request: the CA accepts each token once.
- :class:`JoinTokenFile`: a single-use join token, read from its file; the CA accepts
  it once, and the rotation engine renews with the SVID from then on.
- :class:`NoToken`: for SVID-only agents, which authenticate with their certificate.

Tokens are never logged; errors name the file or the source, never the content.
"""

from __future__ import annotations

import asyncio
import errno
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from meshca.errors import ConfigError, MeshcaError

if TYPE_CHECKING:
    import aiohttp

MAX_TOKEN_BYTES = 64 * 1024
"""A projected token is a few KiB; anything far larger is not a token."""


class CredentialError(MeshcaError):
    """The agent's own credential could not be had. Usually retrying soon does not help
    (a missing or unreadable token file is a deployment problem: the agent says which
    file and why, and retries slowly); ``retryable`` marks the passing failures (the
    metadata server unreachable or answering 5xx), which are retried with normal backoff.
    """

    default_reason = "credential_unavailable"

    def __init__(self, message: str, *, reason: str | None = None, retryable: bool = False) -> None:
        super().__init__(message, reason=reason)
        self.retryable = retryable


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


DEFAULT_GCE_METADATA_URL = "http://metadata.google.internal"
"""The GCE metadata server (also reachable as http://169.254.169.254)."""
IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"
_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_JOIN_TOKEN = re.compile(r"meshca-join\.[A-Za-z0-9_-]{43}")
JOIN_TOKEN_MAX_BYTES = 1024
_TAG = re.compile(r"<[^>]*>")


def _first_line(body: bytes) -> str:
    """The first line of an answer's body with text in it (HTML tags removed), short."""
    text = body[:4096].decode("utf-8", errors="replace")
    for line in text.splitlines():
        line = " ".join(_TAG.sub(" ", line).split())
        if line:
            return line if len(line) <= 200 else line[:197] + "..."
    return "(empty body)"


class GceMetadataServer:
    """Fetches instance identity tokens from the GCE metadata server.

    ``GET {base_url}/computeMetadata/v1/instance/service-accounts/default/identity
    ?audience=<aud>&format=full`` with ``Metadata-Flavor: Google`` (Compute Engine
    documentation, "Verifying the identity of instances"). Every call is a new request
    (a new token, since the CA accepts each token once), bounded by ``timeout``, never
    through an HTTP proxy. The answer must carry ``Metadata-Flavor: Google`` too, the
    sign that the metadata server, not something else on that name, answered.
    """

    def __init__(
        self, base_url: str = DEFAULT_GCE_METADATA_URL, *, timeout: timedelta = timedelta(seconds=5)
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self.url = self.base_url + IDENTITY_PATH

    async def identity_token(self, audience: str) -> str:
        """A fresh ``format=full`` token for ``audience``; CredentialError naming the
        metadata server's answer (status and first line) when there is none."""
        import aiohttp  # only GCE agents need an HTTP client

        seconds = self._timeout.total_seconds()
        try:
            async with (
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=seconds), trust_env=False
                ) as session,
                session.get(
                    self.url,
                    params={"audience": audience, "format": "full"},
                    headers={"Metadata-Flavor": "Google"},
                    allow_redirects=False,
                ) as response,
            ):
                body = await _read_at_most(response.content, MAX_TOKEN_BYTES + 1)
                status, flavor = response.status, response.headers.get("Metadata-Flavor")
        except TimeoutError:
            raise CredentialError(
                f"the GCE metadata server at {self.base_url} did not answer within {seconds:g}s",
                reason="gce_metadata_unavailable",
                retryable=True,
            ) from None
        except aiohttp.ClientError as exc:
            raise CredentialError(
                f"cannot reach the GCE metadata server at {self.base_url} (is this a GCE "
                f"VM?): {type(exc).__name__}: {exc}".rstrip(": "),
                reason="gce_metadata_unavailable",
                retryable=True,
            ) from None
        if status != 200:
            raise CredentialError(
                f"the GCE metadata server refused the identity token request: HTTP {status}: "
                f"{_first_line(body)}{_hint(status)}",
                reason="gce_metadata_refused",
                retryable=status >= 500 or status == 429,
            )
        if flavor != "Google":
            raise CredentialError(
                f"{self.base_url} answered without the 'Metadata-Flavor: Google' header: it "
                "is not a GCE metadata server",
                reason="gce_metadata_invalid",
            )
        return _checked_token(body, self.base_url)


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes (enough to tell it is too long)."""
    data = bytearray()
    while len(data) < limit:
        chunk = await stream.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _hint(status: int) -> str:
    if status == 404:
        return " (does the VM have a service account? identity tokens need one)"
    if status == 400:
        return " (check --gce-audience)"
    return ""


def _checked_token(body: bytes, source: str) -> str:
    if len(body) > MAX_TOKEN_BYTES:
        raise CredentialError(
            f"the GCE metadata server at {source} sent more than {MAX_TOKEN_BYTES} bytes; "
            "that is not an identity token",
            reason="gce_metadata_invalid",
        )
    try:
        text = body.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if not _JWS.fullmatch(text):
        raise CredentialError(
            f"the GCE metadata server at {source} answered 200 without a JWT: {_first_line(body)}",
            reason="gce_metadata_invalid",
        )
    return text


class JoinTokenFile:
    """A join token (``meshca admin join-token create``) read from ``path``: what the
    agent's first request carries. The token is checked for its shape, never shown."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def description(self) -> str:
        return f"join token {self.path}"

    async def token(self) -> str:
        return await asyncio.to_thread(self._read)

    def _read(self) -> str:
        try:
            with self.path.open("rb") as handle:
                raw = handle.read(JOIN_TOKEN_MAX_BYTES + 1)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno == errno.ENOENT:
                why = (
                    "it does not exist (write the output of `meshca admin join-token create` there)"
                )
            raise CredentialError(
                f"cannot read the join token file {self.path}: {why}", reason="token_unreadable"
            ) from None
        text = raw.decode("ascii", errors="replace").strip()
        if not _JOIN_TOKEN.fullmatch(text):
            raise CredentialError(
                f"the join token file {self.path} does not hold a join token (one line: "
                "meshca-join. and 43 base64url characters, as `meshca admin join-token "
                "create` prints it)",
                reason="token_invalid",
            )
        return text


class NoToken:
    """No bearer token: the agent authenticates with its SVID on the mTLS port."""

    @property
    def description(self) -> str:
        return "X509-SVID (mTLS)"

    async def token(self) -> None:
        return None


def credential_source(
    kind: str,
    token_file: Path,
    *,
    gce_metadata_url: str = DEFAULT_GCE_METADATA_URL,
    gce_audience: str | None = None,
    timeout: timedelta = timedelta(seconds=5),
) -> CredentialSource:
    """The source for ``--credential``; ConfigError for an unknown kind or a missing
    GCE audience."""
    if kind == "k8s":
        return ProjectedTokenFile(token_file)
    if kind == "svid":
        return NoToken()
    if kind == "join-token":
        return JoinTokenFile(token_file)
    if kind == "gce":
        if not gce_audience:
            raise ConfigError("credential 'gce' needs an audience (gce_audience)")
        return GceIdentityToken(GceMetadataServer(gce_metadata_url, timeout=timeout), gce_audience)
    raise ConfigError(f"unknown credential {kind!r}; allowed: k8s, gce, join-token, svid")
