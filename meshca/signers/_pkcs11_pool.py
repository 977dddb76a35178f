"""The pkcs11 signer's session pool, and how it reconnects after the HSM goes away.

python-pkcs11 raises an exception per CKR_* code; none of them says whether the device
is gone for good, so the pool treats any failure of an established session as "this
connection is broken": it drops its sessions, reopens once at once, and then only after
an exponential, jittered delay (:class:`ReconnectPolicy`). Failures that retrying cannot
cure (a refused PIN, a session key that died with its session) stop the reconnecting.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pkcs11.exceptions import PKCS11Error
from pkcs11.types import Session, SignMixin

from meshca.errors import SignerError
from meshca.signers._pkcs11_module import Module, describe, handles_gone

R = TypeVar("R")

SESSION_WAIT_SECONDS = 30.0
"""How long a caller waits for a free pooled session before the signer reports itself busy."""


_JITTER = random.Random()


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """When a broken PKCS#11 connection is retried: exponential backoff with jitter.

    After the ``n``-th failed reopen the next attempt waits between half and all of
    ``min(max_delay, initial_delay * 2**(n-1))`` seconds; calls in between fail at once
    with ``signer_unavailable`` instead of queueing behind a dead device.
    """

    initial_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        step = min(self.max_delay, self.initial_delay * 2.0 ** max(0, failures - 1))
        return step / 2 + (rng or _JITTER).uniform(0.0, step / 2)


@dataclass(eq=False, slots=True)
class _Pooled:
    session: Session
    key: SignMixin
    epoch: int
    generation: int


_FINAL = {
    "pin_incorrect": "fix the PIN and restart (retrying a wrong PIN can lock the token)",
    "pin_locked": "the token's security officer must unlock the PIN; then restart",
    "key_lost": "the key cannot come back; replace it with a new one",
}
"""Reconnect failures that retrying cannot cure; the pool stops trying after one."""


Opener = Callable[[bool], tuple[Session, SignMixin]]
"""Open one session and find the key in it (called under the module lock); the flag is
True while recovering from a failure, when the opener may :meth:`Module.reset`."""


class SessionPool:
    """Up to ``size`` logged-in sessions for one key, borrowed one call at a time.

    Sessions open on demand. When a call on a session fails, every session of the pool
    is dropped (the usual cause, a lost device or connection, breaks them all), the
    call is retried once on a fresh session, and further reopen attempts are spaced by
    the :class:`ReconnectPolicy`.
    """

    def __init__(
        self,
        module: Module,
        opener: Opener,
        *,
        size: int,
        name: str,
        policy: ReconnectPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._module = module
        self._opener = opener
        self._name = name
        self._policy = policy
        self._clock = clock
        self._idle: queue.LifoQueue[_Pooled] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._state = threading.Lock()
        self._reopen = threading.Lock()
        self._generation = 0
        self._failures = 0
        self._retry_at = 0.0
        self._last_error = ""
        self._recovering = False
        self._closed = False
        self._final: SignerError | None = None

    def prime(self, session: Session, key: SignMixin) -> None:
        """Add a session opened (and checked) by the signer itself."""
        self._idle.put(_Pooled(session, key, self._module.epoch, self._generation))

    def run(self, operation: Callable[[SignMixin], R]) -> R:
        """Run ``operation`` on the key in a pooled session, under the module lock.

        A PKCS#11 failure drops the pool and retries once on a fresh session; a second
        failure, or a reopen that fails, raises SignerError ``signer_unavailable``.
        """
        failure: PKCS11Error | None = None
        for _ in range(4):  # one retried failure, plus sessions found stale after a reset
            pooled = self._borrow()
            try:
                with self._module.lock:
                    stale = pooled.epoch != self._module.epoch
                    if not stale:
                        result = operation(pooled.key)
            except PKCS11Error as exc:
                self._fail(pooled, exc)
                retried, failure = failure is not None, exc
                if retried:
                    break
                continue
            except BaseException:
                self._give_back(pooled)
                raise
            self._give_back(pooled)
            if not stale:
                return result
        detail = describe(failure) if failure is not None else "its sessions kept going stale"
        raise SignerError(
            f"{self._name} failed: {detail}; its sessions will be reopened",
            reason="signer_unavailable",
        )

    def close(self) -> None:
        """Close idle sessions now and borrowed ones when they come back."""
        with self._state:
            self._closed = True
        self._drain(close=True)

    # -- internals ---------------------------------------------------------------------

    def _borrow(self) -> _Pooled:
        if self._closed:
            raise SignerError(f"{self._name} is closed", reason="signer_closed")
        if not self._slots.acquire(timeout=SESSION_WAIT_SECONDS):
            raise SignerError(
                f"{self._name}: every pooled session stayed busy for {SESSION_WAIT_SECONDS:.0f} s",
                reason="signer_unavailable",
            )
        try:
            while True:
                try:
                    pooled = self._idle.get_nowait()
                except queue.Empty:
                    return self._open()
                if pooled.generation == self._generation and pooled.epoch == self._module.epoch:
                    return pooled
                self._discard(pooled, close=pooled.epoch == self._module.epoch)
        except BaseException:
            self._slots.release()
            raise

    def _open(self) -> _Pooled:
        with self._reopen:
            if self._final is not None:
                raise SignerError(self._final.message, reason=self._final.reason)
            wait = self._retry_at - self._clock()
            if wait > 0:
                raise SignerError(
                    f"{self._name} is unavailable: {self._last_error}; "
                    f"next reconnect attempt in {wait:.1f} s",
                    reason="signer_unavailable",
                )
            generation = self._generation
            try:
                with self._module.lock:
                    session, key = self._opener(self._recovering)
                    epoch = self._module.epoch
            except SignerError as exc:
                raise self._note_failure(exc.message, exc.reason) from None
            except PKCS11Error as exc:
                raise self._note_failure(describe(exc), "signer_unavailable") from None
            self._failures, self._retry_at, self._recovering = 0, 0.0, False
            return _Pooled(session, key, epoch, generation)

    def _note_failure(self, message: str, reason: str) -> SignerError:
        if reason in _FINAL:
            self._final = SignerError(
                f"{self._name} stopped reconnecting: {message}; {_FINAL[reason]}", reason=reason
            )
            return self._final
        self._failures += 1
        self._recovering = True
        self._last_error = message
        delay = self._policy.delay(self._failures)
        self._retry_at = self._clock() + delay
        return SignerError(  # e.g. token_not_found while the HSM is away
            f"{self._name} is unavailable: {message}; next reconnect attempt in {delay:.1f} s",
            reason="signer_unavailable",
        )

    def _fail(self, pooled: _Pooled, exc: PKCS11Error) -> None:
        close = not handles_gone(exc)
        with self._state:
            self._generation += 1
            self._recovering = True
        self._discard(pooled, close=close)
        self._slots.release()
        self._drain(close=close)

    def _give_back(self, pooled: _Pooled) -> None:
        with self._state:
            keep = (
                not self._closed
                and pooled.generation == self._generation
                and pooled.epoch == self._module.epoch
            )
            if keep:
                self._idle.put(pooled)
        if not keep:
            self._discard(pooled, close=pooled.epoch == self._module.epoch)
        self._slots.release()

    def _drain(self, *, close: bool) -> None:
        while True:
            try:
                pooled = self._idle.get_nowait()
            except queue.Empty:
                return
            self._discard(pooled, close=close)

    def _discard(self, pooled: _Pooled, *, close: bool) -> None:
        if not close:
            return
        with self._module.lock:
            if pooled.epoch != self._module.epoch:
                return  # the handle number may belong to a newer session by now
            try:
                pooled.session.close()
            except PKCS11Error:
                pass  # a broken session: the module may have closed it already
