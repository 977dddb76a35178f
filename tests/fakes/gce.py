"""A fake GCE metadata server and a fake Google certificate endpoint, on loopback.

They speak the real wire format:

* :class:`FakeGoogleCerts` serves ``GET /oauth2/v3/certs``, Google's OAuth2 signing keys
  as a JWK Set, with the cache headers Google sends (``Cache-Control: public,
  max-age=..., must-revalidate, no-transform``, ``Expires``, ``Date``); it also mints
  tokens with those keys (RS256, 40-hex-digit ``kid``) the way Google does.
* :class:`FakeMetadataServer` serves ``GET /computeMetadata/v1/instance/service-accounts/
  default/identity?audience=...&format=full|standard``: it insists on the request header
  ``Metadata-Flavor: Google``, answers with the same header, refuses an empty audience
  (400) and a VM without a service account (404), and returns a fresh instance identity
  token with the real claim set for :class:`GceVm` every time it is asked.

Counters and failure switches let tests check what a client did and how it copes::

    async with FakeGoogleCerts() as google, FakeMetadataServer(google, GceVm()) as md:
        token = await fetch(md.url, audience="spiffe://cluster.local")
        assert md.identity_requests == 1
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.fakes.loopback import LoopbackApp

GOOGLE_ISSUER = "https://accounts.google.com"
CERTS_PATH = "/oauth2/v3/certs"
IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"
GOOGLE_MAX_AGE = 19_800  # what www.googleapis.com/oauth2/v3/certs typically says (5.5 h)

_FORBIDDEN_HTML = """<!DOCTYPE html>
<html lang=en>
  <meta charset=utf-8>
  <title>Error 403 (Forbidden)!!1</title>
  <p><b>403.</b> <ins>That's an error.</ins>
  <p>Your client does not have permission to get URL <code>{path}</code> from this server.
  Missing Metadata-Flavor:Google header. <ins>That's all we know.</ins>
"""


@dataclass(frozen=True)
class GoogleKey:
    """A Google token-signing key: RSA-2048, ``kid`` 40 hex digits like Google's."""

    kid: str
    private_key: rsa.RSAPrivateKey

    @classmethod
    def generate(cls) -> GoogleKey:
        return cls.from_private_key(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def from_private_key(cls, key: rsa.RSAPrivateKey) -> GoogleKey:
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(hashlib.sha1(der).hexdigest(), key)

    def public_jwk(self) -> dict[str, Any]:
        """As Google publishes it: ``e``, ``kty``, ``alg``, ``n``, ``use``, ``kid``."""
        jwk = RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {
            "e": jwk["e"],
            "kty": "RSA",
            "alg": "RS256",
            "n": jwk["n"],
            "use": "sig",
            "kid": self.kid,
        }

    def sign(self, claims: Mapping[str, Any], **header: Any) -> str:
        return jwt.encode(
            dict(claims),
            self.private_key,
            algorithm="RS256",
            headers={"kid": self.kid, "typ": "JWT", **header},
        )


@dataclass(frozen=True)
class GceVm:
    """The VM a fake metadata server runs on."""

    project_id: str = "meshca-vms"
    project_number: int = 123456789012
    zone: str = "europe-west1-b"
    instance_id: str = "4613265537823984331"
    instance_name: str = "web-1"
    instance_creation_timestamp: int = 1_700_000_000
    service_account: str | None = "web@meshca-vms.iam.gserviceaccount.com"
    service_account_id: str = "104857600123456789012"
    """The service account's unique id: the token's ``sub`` and ``azp``."""

    def but(self, **changes: Any) -> GceVm:
        return replace(self, **changes)


def identity_claims(
    vm: GceVm,
    audience: str,
    *,
    issued_at: int | None = None,
    ttl: int = 3600,
    full: bool = True,
    issuer: str = GOOGLE_ISSUER,
) -> dict[str, Any]:
    """The claim set of an instance identity token (``format=full`` or ``standard``)."""
    iat = int(time.time()) if issued_at is None else issued_at
    claims: dict[str, Any] = {
        "aud": audience,
        "azp": vm.service_account_id,
        "exp": iat + ttl,
        "iat": iat,
        "iss": issuer,
        "sub": vm.service_account_id,
    }
    if vm.service_account is not None:
        claims["email"] = vm.service_account
        claims["email_verified"] = True
    if full:
        claims["google"] = {
            "compute_engine": {
                "instance_creation_timestamp": vm.instance_creation_timestamp,
                "instance_id": vm.instance_id,
                "instance_name": vm.instance_name,
                "project_id": vm.project_id,
                "project_number": vm.project_number,
                "zone": vm.zone,
            }
        }
    return claims


class _Loopback(LoopbackApp):
    def _routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def build(self) -> web.Application:
        app = web.Application()
        self._routes(app)
        return app


class FakeGoogleCerts(_Loopback):
    """Google's OAuth2 certificate endpoint (JWK Set form) and Google's token signer.

    ``keys`` are published (all of them, unless ``published`` names a subset); the first
    signs. Switches: ``fail`` (HTTP status for every fetch), ``cache_headers`` (the
    caching headers to send instead of Google's; ``{}`` sends none), ``max_age``.
    """

    def __init__(
        self, keys: list[GoogleKey] | None = None, *, max_age: int = GOOGLE_MAX_AGE
    ) -> None:
        super().__init__()
        self.keys = list(keys) if keys else [GoogleKey.generate()]
        self.published: list[str] | None = None
        self.max_age = max_age
        self.cache_headers: dict[str, str] | None = None
        self.fail: int | None = None
        self.fetches = 0

    def _routes(self, app: web.Application) -> None:
        app.router.add_get(CERTS_PATH, self._certs)

    @property
    def url(self) -> str:
        return self.base_url + CERTS_PATH

    @property
    def signing_key(self) -> GoogleKey:
        return self.keys[0]

    def rotate(self) -> GoogleKey:
        """A new key that signs from now on, published next to the old ones."""
        key = GoogleKey.generate()
        self.keys.insert(0, key)
        return key

    def mint(self, claims: Mapping[str, Any], key: GoogleKey | None = None) -> str:
        return (key or self.signing_key).sign(claims)

    async def _certs(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.fail is not None:
            return web.Response(status=self.fail, text="backend error")
        keys = [
            k.public_jwk() for k in self.keys if self.published is None or k.kid in self.published
        ]
        if self.cache_headers is not None:
            headers = dict(self.cache_headers)
        else:
            now = time.time()
            headers = {
                "Cache-Control": f"public, max-age={self.max_age}, must-revalidate, no-transform",
                "Date": formatdate(now, usegmt=True),
                "Expires": formatdate(now + self.max_age, usegmt=True),
            }
        return web.json_response({"keys": keys}, headers=headers)


@dataclass
class _Switches:
    fail_status: int | None = None
    fail_body: str = "Internal Server Error"
    delay: float = 0.0
    omit_flavor: bool = False
    body: str | None = None
    """Answer 200 with this instead of a token."""
    audience_override: str | None = None
    """Mint tokens for this audience whatever was asked (a misconfigured VM)."""
    seen_tokens: list[str] = field(default_factory=list)


class FakeMetadataServer(_Loopback):
    """The GCE metadata server's identity endpoint for ``vm``, tokens signed by ``google``."""

    def __init__(self, google: FakeGoogleCerts, vm: GceVm | None = None) -> None:
        super().__init__()
        self.google = google
        self.vm = vm or GceVm()
        self.switches = _Switches()
        self.identity_requests = 0
        self.last_query: dict[str, str] = {}
        self._last_iat = 0

    def _routes(self, app: web.Application) -> None:
        app.router.add_get(IDENTITY_PATH, self._identity)

    @property
    def url(self) -> str:
        """What ``--gce-metadata-url`` takes: the base, without the path."""
        return self.base_url

    @property
    def tokens(self) -> list[str]:
        """Every token handed out, oldest first."""
        return self.switches.seen_tokens

    async def _identity(self, request: web.Request) -> web.Response:
        self.identity_requests += 1
        self.last_query = dict(request.query)
        s = self.switches
        if s.delay:
            await asyncio.sleep(s.delay)
        flavor = {} if s.omit_flavor else {"Metadata-Flavor": "Google"}
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(
                status=403,
                text=_FORBIDDEN_HTML.format(path=request.path),
                content_type="text/html",
                headers=flavor,
            )
        if s.fail_status is not None:
            return web.Response(status=s.fail_status, text=s.fail_body, headers=flavor)
        audience = request.query.get("audience", "")
        if not audience:
            return web.Response(
                status=400, text="non-empty audience parameter required\n", headers=flavor
            )
        if self.vm.service_account is None:
            return web.Response(
                status=404,
                text="The requested URL was not found on this server: the instance has no "
                "service account\n",
                headers=flavor,
            )
        if s.body is not None:
            return web.Response(text=s.body, headers=flavor)
        full = request.query.get("format", "standard") == "full"
        # Claims have one-second resolution: tests that renew several times a second
        # still get a distinct token per request (iat strictly increasing).
        iat = max(int(time.time()), self._last_iat + 1)
        self._last_iat = iat
        claims = identity_claims(self.vm, s.audience_override or audience, issued_at=iat, full=full)
        token = self.google.mint(claims)
        s.seen_tokens.append(token)
        return web.Response(text=token, content_type="text/html", headers=flavor)


WEB_ID = "spiffe://cluster.local/ns/vms/sa/web"
DEFAULT_RULES: list[dict[str, Any]] = [
    {"project": "meshca-vms", "instance_name": "web-*", "spiffe_id": "/ns/vms/sa/web"},
]
"""Maps the default :class:`GceVm` (``web-1`` in ``meshca-vms``) to :data:`WEB_ID`."""


def ca_options(google: FakeGoogleCerts, **overrides: Any) -> dict[str, Any]:
    """``load_settings`` options turning GCE authentication on against ``google``."""
    options: dict[str, Any] = {
        "gce_projects": ["meshca-vms"],
        "gce_certs_url": google.url,
        "gce_rules": DEFAULT_RULES,
    }
    options.update(overrides)
    return options
