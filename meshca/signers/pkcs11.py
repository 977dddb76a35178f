"""The ``pkcs11`` signer backend: a CA key inside an HSM (or SoftHSM2), used through PKCS#11.

The private key never leaves the token: :meth:`Pkcs11Signer.create` generates it there
as sensitive and non-extractable, and :meth:`Pkcs11Signer.sign` sends the token a digest
(ECDSA) or the data (RSASSA-PKCS1-v1_5 with SHA-256) and gets a signature back. The user
PIN is read once, from an environment variable or an owner-only file, and kept only to
log in again after the HSM comes back; it is never logged or shown.

Signing survives a lost HSM: a failed call drops the signer's sessions and raises
SignerError ``signer_unavailable``; later calls reconnect (with backoff) and, once the
token is back and still holds the same key, sign again. Module loading, login sharing,
call serialisation live in :mod:`~meshca.signers._pkcs11_module`, the session pool in
:mod:`~meshca.signers._pkcs11_pool`, key objects in :mod:`~meshca.signers._pkcs11_keys`.

Reason codes raised here: ``module_not_found``, ``module_load_failed``,
``token_not_found``, ``token_ambiguous``, ``pin_missing``, ``pin_file_permissions``,
``pin_file_unreadable``, ``pin_incorrect``, ``pin_locked``, ``key_not_found``,
``key_ambiguous``, ``key_exists``, ``key_id_invalid``, ``key_not_allowed``,
``key_mismatch``, ``key_not_usable``, ``key_generation_failed``, ``signer_unavailable``,
``key_lost`` (a non-persistent key died with its session), ``sign_failed``,
``signer_closed``.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding
from pkcs11.exceptions import PKCS11Error
from pkcs11.types import Session, SignMixin, Token

from meshca.config import Pkcs11SignerConfig
from meshca.errors import SignerError
from meshca.pki.keys import KeyAlgorithm, PublicKey
from meshca.signers import _pkcs11_keys as keys
from meshca.signers._pkcs11_module import (
    Module,
    close_quietly,
    describe,
    ensure_initialized,
    open_session,
)
from meshca.signers._pkcs11_pin import Pin, read_pin
from meshca.signers._pkcs11_pool import ReconnectPolicy, SessionPool

if TYPE_CHECKING:
    from meshca.signers.base import Signer

__all__ = ["Pkcs11Signer", "ReconnectPolicy"]

log = logging.getLogger(__name__)

SELF_TEST_DATA = b"meshca pkcs11 signer self-test"


class Pkcs11Signer:
    """A :class:`~meshca.signers.base.Signer` whose key lives in a PKCS#11 token."""

    backend: ClassVar[str] = "pkcs11"
    __slots__ = (
        "_algorithm",
        "_closed",
        "_find",
        "_key_id",
        "_mechanism",
        "_module",
        "_owner",
        "_owner_epoch",
        "_owner_session",
        "_pin",
        "_pool",
        "_prehash",
        "_public",
        "_token_label",
        "_token_serial",
    )

    def __init__(
        self,
        module: Module,
        pin: Pin,
        find: keys.KeySearch,
        *,
        owner: str,
        pool_size: int,
        reconnect: ReconnectPolicy,
        owner_session: Session | None = None,
    ) -> None:
        """Attach to an existing key; use :meth:`open` or :meth:`create` instead."""
        self._module = module
        self._pin = pin
        self._owner = owner
        self._owner_session = owner_session
        self._owner_epoch = module.epoch
        self._closed = False
        try:
            with module.lock:
                session, private, token = self._open_session(find, recovering=False)
                try:
                    self._describe_key(session, private, token, find)
                except BaseException:
                    close_quietly(session)
                    raise
        except BaseException:
            self._release_login()
            raise
        name = f"PKCS#11 key {self._key_id_uri()}"
        self._pool = SessionPool(module, self._reopen, size=pool_size, name=name, policy=reconnect)
        self._pool.prime(session, private.signer)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def open(
        cls, config: Pkcs11SignerConfig, *, reconnect: ReconnectPolicy | None = None
    ) -> Pkcs11Signer:
        """Attach to the existing key ``config`` names, checking it with one test signature.

        The token is found by label and/or serial, the process logs in with the user PIN,
        and the key pair is found by ``key_label`` (and CKA_ID when ``key_id`` is set).
        """
        pin = read_pin(config)
        module = Module.load(config.module)
        find = keys.KeySearch(
            config.token_label, config.token_serial, config.key_label, _key_id(config.key_id)
        )
        return cls(
            module,
            pin,
            find,
            owner=secrets.token_hex(8),
            pool_size=config.pool_size,
            reconnect=reconnect or ReconnectPolicy(),
        )

    @classmethod
    def create(
        cls,
        config: Pkcs11SignerConfig,
        algorithm: KeyAlgorithm,
        *,
        label: str | None = None,
        persistent: bool = True,
        reconnect: ReconnectPolicy | None = None,
    ) -> Pkcs11Signer:
        """Generate a key pair inside the token and attach to it; refuse a label in use.

        The private key is sensitive, non-extractable, private and may only sign.
        ``label`` defaults to ``config.key_label``; CKA_ID is ``config.key_id`` when the
        configured key is created and that is set, else 16 random bytes. A key with
        ``persistent=False`` is a session object: it lives until :meth:`close` (or until
        the HSM connection is lost) and suits short-lived issuing intermediates.
        """
        pin = read_pin(config)
        module = Module.load(config.module)
        key_label = label if label is not None else config.key_label
        configured = _key_id(config.key_id) if label is None else None
        find = keys.KeySearch(
            config.token_label,
            config.token_serial,
            key_label,
            configured or secrets.token_bytes(16),
        )
        creator = secrets.token_hex(8)  # holds the login while the key is made and checked
        with module.lock:  # no module reset between generating the key and attaching to it
            ensure_initialized(module)
            token = module.find_token(config.token_label, config.token_serial)
            module.login(token, pin, creator)
            try:
                session = open_session(token, rw=True)
                try:
                    keys.refuse_existing(session, token.label, key_label)
                    keys.generate(session, token.label, algorithm, find, persistent)
                    signer = cls(
                        module,
                        pin,
                        find,
                        owner=secrets.token_hex(8),
                        pool_size=config.pool_size,
                        reconnect=reconnect or ReconnectPolicy(),
                        owner_session=None if persistent else session,
                    )
                except SignerError as exc:
                    if exc.reason != "key_exists":  # never delete a key made by someone else
                        keys.delete_quietly(session, find)
                    close_quietly(session)
                    raise
                except BaseException:
                    keys.delete_quietly(session, find)
                    close_quietly(session)
                    raise
                if persistent:
                    close_quietly(session)
                return signer
            finally:
                module.logout(token.serial, creator)

    # -- the Signer interface ----------------------------------------------------------

    @property
    def key_id(self) -> str:
        """The key as an RFC 7512 PKCS#11 URI (token label, object label, CKA_ID)."""
        return self._key_id_uri()

    @property
    def algorithm(self) -> KeyAlgorithm:
        return self._algorithm

    def public_key(self) -> PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        """DER ECDSA with the algorithm's digest, or RSASSA-PKCS1-v1_5 with SHA-256.

        Thread-safe. Raises SignerError ``signer_unavailable`` while the HSM is away.
        """
        payload = data
        if self._prehash:
            payload = hashlib.new(self._algorithm.hash_algorithm().name, data).digest()
        mechanism = self._mechanism
        raw = self._pool.run(lambda key: key.sign(payload, mechanism=mechanism))
        return self._encode(raw)

    # -- lifecycle ---------------------------------------------------------------------

    def destroy(self) -> None:
        """Delete this key pair from the token, then close the signer. Irreversible."""
        if self._closed:
            raise SignerError(f"{self!r} is closed", reason="signer_closed")
        try:
            with self._module.lock:
                ensure_initialized(self._module)
                session = self._owner_session
                if session is None or not self._owner_current():
                    token = self._module.find_token(self._find.token_label, self._find.token_serial)
                    session = open_session(token, rw=True)
                try:
                    for obj in keys.objects_of(session, self._find):
                        obj.destroy()
                finally:
                    if session is not self._owner_session:
                        close_quietly(session)
        except PKCS11Error as exc:
            raise SignerError(
                f"cannot delete {self.key_id}: {describe(exc)}", reason="signer_unavailable"
            ) from None
        finally:
            self.close()

    def close(self) -> None:
        """Close the signer's sessions (and end its share of the token login). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        if self._owner_session is not None:
            with self._module.lock:
                if self._owner_current():
                    close_quietly(self._owner_session)
            self._owner_session = None
        self._release_login()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return (
            f"Pkcs11Signer(key_id={self._key_id_uri()!r}, "
            f"algorithm={self._algorithm.value!r}, module={self._module.path!r}{state})"
        )

    # -- internals ---------------------------------------------------------------------

    def _open_session(
        self, find: keys.KeySearch, *, recovering: bool
    ) -> tuple[Session, keys.SigningKey, Token]:
        """Find the token, log in, open a session and find the key (under the module lock)."""
        module = self._module
        ensure_initialized(module)
        try:
            token = module.find_token(find.token_label, find.token_serial)
        except (SignerError, PKCS11Error):
            if not recovering:
                raise
            # Many modules (SoftHSM2 too) only see a returning token after re-initialising.
            module.reset()
            token = module.find_token(find.token_label, find.token_serial)
        module.login(token, self._pin, self._owner)
        self._token_serial = token.serial
        session = open_session(token)
        try:
            private = keys.find_private(session, token.label, find)
            if private is None and keys.public_visible(session, find):
                # The public half is there but the private one is not: the login was lost.
                module.login(token, self._pin, self._owner, again=True)
                private = keys.find_private(session, token.label, find)
            if private is None:
                raise keys.not_found(token.label, find, lost=self._owner_session is not None)
        except BaseException:
            close_quietly(session)
            raise
        return session, private, token

    def _reopen(self, recovering: bool) -> tuple[Session, SignMixin]:
        """The pool's opener: a new session on the same key, checked to be the same key."""
        session, private, token = self._open_session(self._find, recovering=recovering)
        try:
            public = keys.public_key(keys.find_public(session, token.label, self._find))
        except BaseException:
            close_quietly(session)
            raise
        if not keys.same_key(public, self._public):
            close_quietly(session)
            raise SignerError(
                f"refusing to sign: the key labelled {self._find.key_label!r} on token "
                f"{token.label!r} is no longer the key this signer opened",
                reason="signer_unavailable",
            )
        return session, private.signer

    def _describe_key(
        self, session: Session, private: keys.SigningKey, token: Token, find: keys.KeySearch
    ) -> None:
        """Learn the key's id, algorithm and public key, pick the mechanism, test-sign."""
        self._token_label = token.label
        self._key_id = keys.attr_bytes(private.obj, keys.Attribute.ID)
        self._find = find.pinned(self._key_id)
        public_object = keys.find_public(session, token.label, self._find)
        self._public = keys.public_key(public_object)
        self._algorithm = keys.algorithm_of(self._public, token.label, find.key_label)
        self._mechanism, self._prehash = keys.mechanism_for(
            self._algorithm, token.slot.get_mechanisms(), token.label
        )
        if keys.extractable(private.obj):
            log.warning("PKCS#11 key %s may leave the token (CKA_EXTRACTABLE)", self.key_id)
        payload = SELF_TEST_DATA
        if self._prehash:
            payload = hashlib.new(self._algorithm.hash_algorithm().name, payload).digest()
        try:
            signature = self._encode(private.signer.sign(payload, mechanism=self._mechanism))
        except PKCS11Error as exc:
            raise SignerError(
                f"test signature with {self.key_id} failed: {describe(exc)}",
                reason="key_not_usable",
            ) from None
        try:
            _verify(self._public, self._algorithm, signature, SELF_TEST_DATA)
        except InvalidSignature:
            raise SignerError(
                f"the public key object of {self.key_id} does not match its private key "
                "(a test signature did not verify); fix the token's objects",
                reason="key_mismatch",
            ) from None

    def _encode(self, raw: bytes) -> bytes:
        return keys.x509_signature(self._public, raw)

    def _key_id_uri(self) -> str:
        return keys.pkcs11_uri(self._token_label, self._find.key_label, self._key_id)

    def _owner_current(self) -> bool:
        # A module reset closes every session; an old handle must not be used or closed.
        return self._owner_session is not None and self._owner_epoch == self._module.epoch

    def _release_login(self) -> None:
        serial = getattr(self, "_token_serial", None)
        if serial is not None:
            self._module.logout(serial, self._owner)


def _key_id(value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        return bytes.fromhex(value.replace(":", ""))
    except ValueError:
        raise SignerError(
            f"key_id {value!r} is not hex (the CKA_ID bytes, e.g. 'a1b2c3')",
            reason="key_id_invalid",
        ) from None


def _verify(public: PublicKey, algorithm: KeyAlgorithm, signature: bytes, data: bytes) -> None:
    digest = algorithm.hash_algorithm()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, data, ec.ECDSA(digest))
    else:
        public.verify(signature, data, padding.PKCS1v15(), digest)


if TYPE_CHECKING:
    _satisfies_protocol: type[Signer] = Pkcs11Signer
