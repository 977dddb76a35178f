"""Which credentials a Workload API or SDS call is served: the agent's own, or (node
mode) those of the workload that called.

:class:`FixedStore` serves the agent's one identity to every caller (a sidecar, a VM
with one workload). :class:`CallerStores` serves each caller its own: the caller is the
process on the other end of the connection (:mod:`meshca.agent._caller_socket`), its
identity comes from a :class:`~meshca.agent.attestation.WorkloadAttestor`, and its
credentials from the :class:`IdentityPool`.

The pool keeps one key and certificate per identity, shared by every process (every
pod) with that identity, each renewed by a rotation engine of its own on the usual
schedule, asking the CA on the workload's behalf (``ImpersonatedIdentity``). An identity
is dropped (its engine stopped, its key forgotten) once no connection uses it, it has
been idle for ``idle_grace``, and no workload still has it (no pod of the node, as the
kubelet lists them, runs with it; outside Kubernetes nothing is known, so only the
connections count).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NoReturn, Protocol, TypeAlias

import grpc
from grpc import aio

from meshca.agent._caller_socket import CallerRegistry
from meshca.agent.attestation import AttestationError, WorkloadAttestor
from meshca.agent.credentials import CredentialStore
from meshca.agent.rotation import RotationEngine
from meshca.spiffe import SpiffeId

log = logging.getLogger(__name__)

Context: TypeAlias = "aio.ServicerContext[object, object]"
EngineFactory = Callable[[SpiffeId, CredentialStore], RotationEngine]


class StoreProvider(Protocol):
    """The credentials one call is served (raises AttestationError when none)."""

    def store_for(self, context: Context) -> AbstractAsyncContextManager[CredentialStore]: ...


class FixedStore:
    """Every caller gets the agent's own credentials."""

    def __init__(self, store: CredentialStore) -> None:
        self.store = store

    @contextlib.asynccontextmanager
    async def store_for(self, context: Context) -> AsyncIterator[CredentialStore]:
        yield self.store


@dataclass(eq=False, slots=True)
class _Identity:
    spiffe_id: SpiffeId
    store: CredentialStore
    engine: RotationEngine
    task: asyncio.Task[None]
    users: int = 0
    idle_since: float = field(default_factory=time.monotonic)


class IdentityPool:
    """One store and rotation engine per identity in use; see the module docstring."""

    def __init__(
        self,
        make_engine: EngineFactory,
        *,
        idle_grace: timedelta,
        in_use: Callable[[], frozenset[SpiffeId] | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make_engine = make_engine
        self._idle_grace = idle_grace.total_seconds()
        self._in_use = in_use
        self._clock = clock
        self._identities: dict[SpiffeId, _Identity] = {}

    def __contains__(self, spiffe_id: SpiffeId) -> bool:
        return spiffe_id in self._identities

    def __len__(self) -> int:
        return len(self._identities)

    def identities(self) -> list[SpiffeId]:
        return list(self._identities)

    def stores(self) -> list[CredentialStore]:
        return [identity.store for identity in self._identities.values()]

    def engine(self, spiffe_id: SpiffeId) -> RotationEngine | None:
        identity = self._identities.get(spiffe_id)
        return identity.engine if identity is not None else None

    @contextlib.asynccontextmanager
    async def using(self, spiffe_id: SpiffeId) -> AsyncIterator[_Identity]:
        """The identity's store and engine (started on first use), held while inside."""
        identity = self._identities.get(spiffe_id)
        if identity is None:
            store = CredentialStore()
            engine = self._make_engine(spiffe_id, store)
            task = asyncio.create_task(_run(engine), name=f"meshca-agent-{spiffe_id}")
            identity = _Identity(spiffe_id, store, engine, task)
            self._identities[spiffe_id] = identity
            log.info("serving %s on this node: a key and certificate of its own", spiffe_id)
        identity.users += 1
        try:
            yield identity
        finally:
            identity.users -= 1
            if identity.users == 0:
                identity.idle_since = self._clock()

    def sweep(self) -> list[SpiffeId]:
        """Drop the identities nobody uses any more; returns them."""
        in_use = self._in_use()
        now = self._clock()
        dropped = [
            identity
            for identity in self._identities.values()
            if identity.users == 0
            and now - identity.idle_since >= self._idle_grace
            and (in_use is None or identity.spiffe_id not in in_use)
        ]
        for identity in dropped:
            del self._identities[identity.spiffe_id]
            identity.task.cancel()
            log.info("dropped %s: no workload on this node uses it any more", identity.spiffe_id)
        return [identity.spiffe_id for identity in dropped]

    async def close(self) -> None:
        identities, self._identities = list(self._identities.values()), {}
        for identity in identities:
            identity.task.cancel()
        await asyncio.gather(*(i.task for i in identities), return_exceptions=True)


async def _run(engine: RotationEngine) -> None:
    try:
        await engine.run()
    finally:
        await engine.client.close()


class CallerStores:
    """Each caller gets the credentials of its own identity; see the module docstring."""

    def __init__(
        self,
        registry: CallerRegistry,
        attestor: WorkloadAttestor,
        pool: IdentityPool,
        *,
        retry_after: timedelta,
        refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.registry = registry
        self._attestor = attestor
        self.pool = pool
        self._retry_after = retry_after.total_seconds()
        self._refused = refused

    @contextlib.asynccontextmanager
    async def store_for(self, context: Context) -> AsyncIterator[CredentialStore]:
        caller = self.registry.lookup(context.peer())
        try:
            if caller is None:
                raise AttestationError(
                    "the connection did not come through the agent's socket, so the caller "
                    "cannot be told",
                    reason="caller_unknown",
                )
            spiffe_id = await self._attestor.attest(caller)
        except AttestationError as exc:
            self._refused(exc.reason)
            raise
        async with self.pool.using(spiffe_id) as identity:
            try:
                await self._first_credentials(identity.store, identity.engine)
            except AttestationError as exc:
                self._refused(exc.reason)
                raise
            yield identity.store

    async def _first_credentials(self, store: CredentialStore, engine: RotationEngine) -> None:
        """Return once ``store`` has credentials; raise AttestationError when the CA
        refused the identity (the caller is told why, and reconnects)."""
        while store.current() is None:
            error = engine.last_error
            if error is not None and not error.retryable:
                failed_at = engine.last_failure_at or 0.0
                if time.monotonic() - failed_at >= self._retry_after:
                    engine.renew_now()  # a caller is back: try again, at most this often
                else:
                    raise AttestationError(
                        f"the CA did not issue {engine.impersonate}: {error}",
                        reason="identity_refused",
                    )
            engine.attempted.clear()
            waiter = asyncio.ensure_future(store.wait_newer(0))
            attempt = asyncio.ensure_future(engine.attempted.wait())
            try:
                await asyncio.wait({waiter, attempt}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                attempt.cancel()


async def refuse_caller(
    context: aio.ServicerContext[object, object], error: AttestationError, what: str
) -> NoReturn:
    """End a call whose caller gets no identity: PERMISSION_DENIED (UNAVAILABLE when
    asking again later may help), with the reason."""
    log.info("%s: refused a caller: %s (%s)", what, error.message, error.reason)
    code = grpc.StatusCode.UNAVAILABLE if error.unavailable else grpc.StatusCode.PERMISSION_DENIED
    await context.abort(code, error.message)
    raise AssertionError("unreachable: abort raises")
