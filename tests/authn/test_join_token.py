"""Join tokens: each grants one SPIFFE ID once, whichever CA replica it is shown to.

Against the real store on SQLite and PostgreSQL; two Store objects on one database stand
for two replicas. Every refusal names its reason, and a refused request leaves the token
as it was (unless it was the one spending it).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshca.authn.base import AuthMethod, Credential, Peer
from meshca.authn.join_token import (
    TOKEN_PREFIX,
    JoinTokenAuthenticator,
    is_join_token,
    new_token,
    token_digest,
)
from meshca.errors import AuthenticationError, CSRError
from meshca.spiffe import TrustDomain
from meshca.store import JoinToken, Store
from meshca.store.join_tokens import JoinTokenState, state_of
from tests.support import make_csr

TD = TrustDomain("cluster.local")
VM_ID = "spiffe://cluster.local/vm/db-1"
PEER = Peer(address="192.0.2.7:40000")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared' / 'meshca.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def stores(database_url: str) -> Iterator[tuple[Store, Store]]:
    first = Store.open(database_url)
    second = Store(database_url)
    yield first, second
    first.close()
    second.close()


def _create(store: Store, spiffe_id: str = VM_ID, *, ttl: timedelta = timedelta(hours=1)) -> str:
    token = new_token()
    now = datetime.now(UTC)
    store.add_join_tokens(
        [
            JoinToken(
                token_sha256=token_digest(token),
                spiffe_id=spiffe_id,
                created_at=now,
                expires_at=now + ttl,
                created_by="alice@ops",
            )
        ]
    )
    return token


def _record(store: Store, token: str) -> JoinToken:
    record = store.find_join_token(token_digest(token))
    assert record is not None
    return record


async def _refused(
    authenticator: JoinTokenAuthenticator, token: str, csr: str | None = None
) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        await authenticator.authenticate(Credential(bearer_token=token, csr=csr), PEER)
    return info.value


def test_a_token_is_long_random_and_only_its_sha256_is_kept(stores: tuple[Store, Store]) -> None:
    store, _ = stores
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    token = tokens.pop()
    assert token.startswith(TOKEN_PREFIX) and len(token) == len(TOKEN_PREFIX) + 43
    assert is_join_token(token) and not is_join_token("eyJhbGciOi.x.y")
    token = _create(store)
    record = _record(store, token)
    assert record.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr(record)


async def test_the_first_use_gets_the_identity_and_every_later_use_is_refused(
    stores: tuple[Store, Store],
) -> None:
    first, second = stores
    token = _create(first)
    _, csr = make_csr(None)
    attestation = await JoinTokenAuthenticator(TD, first).authenticate(
        Credential(bearer_token=token, csr=csr), PEER
    )
    assert str(attestation.spiffe_id) == VM_ID
    assert attestation.method is AuthMethod.JOIN_TOKEN
    digest_id = token_digest(token)[:16]
    assert attestation.selectors == (
        f"join-token:id:{digest_id}",
        "join-token:created-by:alice@ops",
    )
    record = _record(first, token)
    assert record.used_by == PEER.address and record.used_at is not None
    for store in (first, second):  # the same replica, and another one
        error = await _refused(JoinTokenAuthenticator(TD, store), token)
        assert error.reason == "join_token_used"
        assert PEER.address in error.message and "create a new one" in error.message
        assert token not in error.message


async def test_replicas_racing_with_one_token_issue_once(stores: tuple[Store, Store]) -> None:
    first, second = stores
    token = _create(first)
    authenticators = [JoinTokenAuthenticator(TD, s) for s in (first, second) for _ in range(4)]
    outcomes = await asyncio.gather(
        *(a.authenticate(Credential(bearer_token=token), PEER) for a in authenticators),
        return_exceptions=True,
    )
    won = [o for o in outcomes if not isinstance(o, BaseException)]
    lost = [o for o in outcomes if isinstance(o, AuthenticationError)]
    assert len(won) == 1 and len(lost) == len(authenticators) - 1
    assert {e.reason for e in lost} == {"join_token_used"}


async def test_expired_revoked_and_unknown_tokens_are_refused_with_their_reason(
    stores: tuple[Store, Store],
) -> None:
    store, _ = stores
    now = datetime.now(UTC)
    later = JoinTokenAuthenticator(TD, store, clock=lambda: now + timedelta(hours=2))
    expired = _create(store)
    error = await _refused(later, expired)
    assert error.reason == "join_token_expired" and "expired at" in error.message
    assert state_of(_record(store, expired), now) is JoinTokenState.UNUSED  # untouched

    revoked = _create(store)
    (done, skipped) = store.revoke_join_tokens([token_digest(revoked)[:8]], None, now)
    assert [r.token_sha256 for r in done] == [token_digest(revoked)] and skipped == []
    error = await _refused(JoinTokenAuthenticator(TD, store), revoked)
    assert error.reason == "join_token_revoked"

    error = await _refused(JoinTokenAuthenticator(TD, store), new_token())
    assert error.reason == "join_token_unknown"

    error = await _refused(JoinTokenAuthenticator(TD, store), TOKEN_PREFIX + "short")
    assert error.reason == "join_token_malformed"


async def test_a_token_for_another_trust_domain_is_refused(stores: tuple[Store, Store]) -> None:
    store, _ = stores
    token = _create(store, "spiffe://other.example/vm/db-1")
    error = await _refused(JoinTokenAuthenticator(TD, store), token)
    assert error.reason == "join_token_foreign_trust_domain"
    assert _record(store, token).used_at is None


async def test_a_csr_for_another_identity_is_refused_and_the_token_kept(
    stores: tuple[Store, Store],
) -> None:
    store, _ = stores
    token = _create(store)
    authenticator = JoinTokenAuthenticator(TD, store)
    _, other = make_csr("spiffe://cluster.local/vm/web-1")
    error = await _refused(authenticator, token, other)
    assert error.reason == "join_token_wrong_identity"
    assert VM_ID in error.message and "not spent" in error.message
    assert _record(store, token).used_at is None
    _, same = make_csr(VM_ID)  # the same token still works for its own identity
    attestation = await authenticator.authenticate(Credential(bearer_token=token, csr=same), PEER)
    assert str(attestation.spiffe_id) == VM_ID


async def test_an_unusable_csr_is_refused_before_the_token_is_spent(
    stores: tuple[Store, Store],
) -> None:
    store, _ = stores
    token = _create(store)
    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(weak_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    with pytest.raises(CSRError, match="RSA-1024"):
        await JoinTokenAuthenticator(TD, store).authenticate(
            Credential(bearer_token=token, csr=csr), PEER
        )
    assert _record(store, token).used_at is None


def test_revoke_by_spiffe_id_leaves_used_tokens_alone(stores: tuple[Store, Store]) -> None:
    store, _ = stores
    now = datetime.now(UTC)
    used, unused = _create(store), _create(store)
    assert store.spend_join_token(token_digest(used), PEER.address, now)
    revoked, skipped = store.revoke_join_tokens([], VM_ID, now)
    assert [r.token_sha256 for r in revoked] == [token_digest(unused)]
    assert [r.token_sha256 for r in skipped] == [token_digest(used)]


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (["abc"], "at least 8 hex digits"),
        (["meshca-join.xyz"], "not an id"),
        (["0123456789abcdef"], "no join token has the id"),
    ],
)
def test_revoke_names_what_it_cannot_find(
    stores: tuple[Store, Store], ids: list[str], message: str
) -> None:
    store, _ = stores
    _create(store)
    with pytest.raises(Exception, match=message):
        store.revoke_join_tokens(ids, None, datetime.now(UTC))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tail=st.text(max_size=80))
def test_no_made_up_token_authenticates_or_changes_anything(
    stores: tuple[Store, Store], tail: str
) -> None:
    store, _ = stores
    token = _create(store)
    before = _record(store, token)
    guess = TOKEN_PREFIX + tail
    with pytest.raises(AuthenticationError) as info:
        asyncio.run(
            JoinTokenAuthenticator(TD, store).authenticate(Credential(bearer_token=guess), PEER)
        )
    assert info.value.reason in {"join_token_malformed", "join_token_unknown"}
    assert _record(store, token) == before
