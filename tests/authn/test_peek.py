"""The unverified peek at a token's claims: used only to route tokens and bound caches."""

from __future__ import annotations

import base64
import json

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from meshca.authn._jwks import MAX_PEEK_CHARS, unverified_claims, unverified_expiry


def _segment(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_reads_the_same_claims_as_pyjwt() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    claims = {"iss": "https://accounts.google.com", "exp": 2000000000, "sub": "ü"}
    token = jwt.encode(claims, key, algorithm="ES256")
    assert unverified_claims(token) == jwt.decode(token, options={"verify_signature": False})
    assert unverified_expiry(token) is not None
    assert unverified_expiry(token).timestamp() == 2000000000  # type: ignore[union-attr]


def test_malformed_tokens_give_none() -> None:
    header = _segment(b'{"alg":"ES256"}')
    for token in (
        "",
        "a.b",
        "a.b.c.d",
        f"{header}.!!!.sig",
        f"{header}.{_segment(b'not json')}.sig",
        f"{header}.{_segment(json.dumps([1, 2]).encode())}.sig",
        f"{header}.{_segment(b'[' * 10_000)}.sig",  # deep enough to exhaust the recursion
        f"{header}.{_segment(b'{}' + b' ' * MAX_PEEK_CHARS)}.sig",
    ):
        assert unverified_claims(token) is None, token
    assert unverified_expiry("a.b") is None


@given(st.text(max_size=300))
def test_never_raises(text: str) -> None:
    result = unverified_claims(text)
    assert result is None or isinstance(result, dict)
