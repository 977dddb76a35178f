"""Loaded PKCS#11 modules and the login per token, shared by every pkcs11 signer.

Three facts about PKCS#11 and python-pkcs11 shape this module:

* A module (the vendor's shared library) is loaded and initialised once per process;
  python-pkcs11 caches it by path and calls ``C_Initialize(NULL_PTR)``. With NULL
  arguments the application promises not to call the library from several threads at
  once (PKCS#11 base spec, ``C_Initialize``), and SoftHSM2 takes it at its word: it turns
  its own locks off, and two threads signing at once crash the process. :class:`Module`
  therefore serialises every call into a module with one lock.
* Login state belongs to the application, not to a session: the first ``C_Login`` logs
  every session of the process in, a second one fails with CKR_USER_ALREADY_LOGGED_IN,
  and python-pkcs11 calls ``C_Logout`` when the session that logged in is closed. One
  login per token is kept by the module, shared by every signer on that token and ended
  with the last of them; pooled sessions never log in or out themselves.
* Many modules (SoftHSM2 among them) only discover tokens at ``C_Initialize``. Recovering
  from a token that went away may need ``C_Finalize`` + ``C_Initialize``, which closes
  every session in the process; each initialisation bumps :attr:`Module.epoch`, and a
  session from an older epoch is dropped, never used or closed (its handle number may
  already belong to a new session).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import pkcs11
from pkcs11 import TokenFlag
from pkcs11.exceptions import (
    DeviceRemoved,
    PKCS11Error,
    SessionClosed,
    SessionHandleInvalid,
    TokenNotPresent,
    TokenNotRecognised,
    UserAlreadyLoggedIn,
)
from pkcs11.types import Session, Token

from meshca.errors import SignerError
from meshca.signers._pkcs11_pin import Pin

if TYPE_CHECKING:
    from pkcs11 import _pkcs11


def describe(exc: PKCS11Error) -> str:
    """A short, PIN-free name for a PKCS#11 failure (python-pkcs11 raises one class per CKR_)."""
    text = str(exc).strip()
    if type(exc) is PKCS11Error:
        if "not initialized" in text:
            return "CKR_CRYPTOKI_NOT_INITIALIZED"
        return text.removesuffix("Should never see this.").strip() or "PKCS11Error"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_HANDLES_GONE = (SessionHandleInvalid, SessionClosed, DeviceRemoved, TokenNotPresent)


def handles_gone(exc: PKCS11Error) -> bool:
    """True when the module has already discarded the session handles (do not close them)."""
    return isinstance(exc, _HANDLES_GONE) or describe(exc) == "CKR_CRYPTOKI_NOT_INITIALIZED"


@dataclass(eq=False, slots=True)
class _Login:
    session: Session | None  # None: someone outside meshca logged this process in
    pin: Pin
    epoch: int
    owners: set[str]


class Module:
    """One PKCS#11 module, shared by every signer in the process that names the same file."""

    _registry: ClassVar[dict[str, Module]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str, lib: _pkcs11.lib) -> None:
        self.path = path
        self._lib = lib
        self.lock = threading.RLock()
        """Held for every call into the module (see the module docstring)."""
        self.epoch = 0
        self._logins: dict[bytes, _Login] = {}

    def __repr__(self) -> str:
        return f"Module({self.path!r}, epoch={self.epoch})"

    @classmethod
    def load(cls, path: Path) -> Module:
        """Load (once per process) the module at ``path``; SignerError if it cannot be."""
        if not path.exists():
            raise SignerError(
                f"PKCS#11 module {path} does not exist; set signer.module to the vendor's "
                "library (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)",
                reason="module_not_found",
            )
        real = os.path.realpath(path)  # python-pkcs11 caches by string: one key per file
        with cls._registry_lock:
            module = cls._registry.get(real)
            if module is None:
                try:
                    lib = pkcs11.lib(real)
                except PKCS11Error as exc:
                    raise SignerError(
                        f"cannot load PKCS#11 module {path}: {describe(exc)}",
                        reason="module_load_failed",
                    ) from None
                module = cls._registry[real] = cls(real, lib)
            return module

    def ensure_initialized(self) -> None:
        """``C_Initialize`` again if someone finalised the module (call under :attr:`lock`)."""
        if not self._lib.initialized:
            self._lib.initialize()
            self.epoch += 1

    def reset(self) -> None:
        """``C_Finalize`` + ``C_Initialize``, so that the module rescans its tokens.

        Every session in the process ends, including other signers' (they reopen on
        their next call) and their non-persistent keys; callers reset only when their
        own token has vanished from the module's view.
        """
        with self.lock:
            try:
                self._lib.finalize()
            except PKCS11Error:
                pass  # already finalised underneath us; initialising is what matters
            self.epoch += 1
            self._lib.initialize()

    def present_tokens(self) -> tuple[list[Token], list[str]]:
        """The initialised tokens present, and a note per slot that could not be read."""
        tokens: list[Token] = []
        unreadable: list[str] = []
        for slot in self._lib.get_slots(token_present=True):
            try:
                token = slot.get_token()
            except (TokenNotPresent, TokenNotRecognised):
                continue
            except PKCS11Error as exc:
                unreadable.append(f"slot {slot.slot_id}: {describe(exc)}")
                continue
            if token.flags & TokenFlag.TOKEN_INITIALIZED:
                tokens.append(token)
        return tokens, unreadable

    def find_token(self, label: str | None, serial: str | None) -> Token:
        """The one initialised token with this label and/or serial (call under :attr:`lock`)."""
        tokens, unreadable = self.present_tokens()
        matches = [
            t
            for t in tokens
            if (label is None or t.label == label)
            and (serial is None or t.serial.decode(errors="replace") == serial)
        ]
        wanted = " and ".join(
            part
            for part in (
                f"label {label!r}" if label is not None else "",
                f"serial {serial!r}" if serial is not None else "",
            )
            if part
        )
        if len(matches) == 1:
            return matches[0]
        if matches:
            serials = ", ".join(t.serial.decode(errors="replace") for t in matches)
            raise SignerError(
                f"{len(matches)} PKCS#11 tokens match {wanted} in {self.path} "
                f"(serials {serials}); set token_serial to pick one",
                reason="token_ambiguous",
            )
        present = ", ".join(
            f"{t.label!r} (serial {t.serial.decode(errors='replace')})" for t in tokens
        )
        extra = f"; unreadable: {'; '.join(unreadable)}" if unreadable else ""
        raise SignerError(
            f"no PKCS#11 token with {wanted} in module {self.path}; "
            f"tokens present: {present or 'none'}{extra}",
            reason="token_not_found",
        )

    def login(self, token: Token, pin: Pin, owner: str, *, again: bool = False) -> None:
        """Make sure this process is logged in to ``token`` as the user (under :attr:`lock`).

        ``again`` forgets the current login first (its session is left alone: the module
        may have dropped it, and closing it would log the process out).
        """
        current = self._logins.get(token.serial)
        if current is not None and current.epoch == self.epoch and not again:
            if not current.pin.same_as(pin):
                raise SignerError(
                    f"token {token.label!r} is already logged in by another signer in this "
                    f"process with a different PIN than the one from {pin.source}",
                    reason="pin_incorrect",
                )
            current.owners.add(owner)
            return
        owners = {owner} | (current.owners if current is not None else set())
        try:
            session: Session | None = token.open(user_pin=pin.reveal())
        except UserAlreadyLoggedIn:
            session = None
        except PKCS11Error as exc:
            raise _login_error(token, pin, exc) from None
        self._logins[token.serial] = _Login(session, pin, self.epoch, owners)

    def logout(self, token_serial: bytes, owner: str) -> None:
        """Drop ``owner``'s hold on the token's login; the last one out logs the process out."""
        with self.lock:
            current = self._logins.get(token_serial)
            if current is None:
                return
            current.owners.discard(owner)
            if current.owners:
                return
            del self._logins[token_serial]
            if current.session is not None and current.epoch == self.epoch:
                try:
                    current.session.close()
                except PKCS11Error:
                    pass


def _login_error(token: Token, pin: Pin, exc: PKCS11Error) -> SignerError:
    name = describe(exc)
    if name.startswith(("PinIncorrect", "PinInvalid", "PinLenRange")):
        return SignerError(
            f"the user PIN from {pin.source} was refused by token {token.label!r} ({name}); "
            f"put the token's user PIN in {pin.source} (signer.pin_env or signer.pin_file "
            "say where it is read) and start again; each wrong PIN counts toward locking "
            "the token",
            reason="pin_incorrect",
        )
    if name.startswith(("PinLocked", "PinExpired")):
        return SignerError(
            f"the user PIN of token {token.label!r} is locked or expired ({name}); "
            "the token's security officer must reset it",
            reason="pin_locked",
        )
    return SignerError(
        f"cannot log in to token {token.label!r}: {name}", reason="signer_unavailable"
    )


def ensure_initialized(module: Module) -> None:
    try:
        module.ensure_initialized()
    except PKCS11Error as exc:
        raise SignerError(
            f"cannot initialise PKCS#11 module {module.path}: {describe(exc)}",
            reason="signer_unavailable",
        ) from None


def open_session(token: Token, *, rw: bool = False) -> Session:
    # No PIN here: the process is already logged in (Module.login), and a session that
    # logs in would log every other session out when it closes.
    try:
        return token.open(rw=rw)
    except PKCS11Error as exc:
        raise SignerError(
            f"cannot open a session on token {token.label!r}: {describe(exc)}",
            reason="signer_unavailable",
        ) from None


def close_quietly(session: Session) -> None:
    try:
        session.close()
    except PKCS11Error:
        pass
