"""Are the token issuers reachable? Checked at start-up, reported in the log and /readyz.

A CA whose token issuers (the clusters' OIDC issuers or API servers, Google's key
endpoint for GCE) cannot be reached refuses every token-authenticated request, so it is
not ready. :class:`IssuerWatch` asks each issuer once as the server starts, logs a
WARNING naming each one that did not answer and why (an unknown CA certificate, a
refused connection, an HTTP error), and keeps asking the silent ones with backoff until
they answer, logging again only when the reason changes. Readiness fails while no
issuer has ever answered (one that answered once keeps the CA ready: an outage after
that is served from the keys held, and is logged where it bites).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Protocol

from meshca.errors import AuthenticationError, MeshcaError

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 60.0


class Issuer(Protocol):
    """A source of token-verification answers: a JWKS, a TokenReview API, Google's keys."""

    @property
    def issuer(self) -> str:
        """What it is, for a human: ``cluster 'Kubernetes' (JWKS of https://...)``."""
        ...

    @property
    def answered(self) -> bool:
        """Whether it has ever given a usable answer (to a probe or to real traffic)."""
        ...

    async def probe(self) -> None:
        """Ask it now; raise AuthenticationError saying why it gave no usable answer."""
        ...


class IssuerWatch:
    """Probes ``issuers`` from :meth:`start` until each has answered; see the module."""

    def __init__(self, issuers: Sequence[Issuer]) -> None:
        self._issuers = tuple(issuers)
        self._problems: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._issuers and self._task is None:
            self._task = asyncio.create_task(self._run(), name="meshca-issuer-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check(self) -> None:
        """Readiness: fine once any issuer has answered (or when none is configured)."""
        if not self._issuers or any(issuer.answered for issuer in self._issuers):
            return
        details = "; ".join(
            f"{issuer.issuer}: {self._problems.get(issuer.issuer, 'not asked yet')}"
            for issuer in self._issuers
        )
        raise AuthenticationError(
            f"no token issuer has answered yet, so every token would be refused: {details}",
            reason="no_issuer_answered",
        )

    async def _run(self) -> None:
        delay = FIRST_RETRY_SECONDS
        while True:
            silent = [issuer for issuer in self._issuers if not issuer.answered]
            if not silent:
                return
            await asyncio.gather(*(self._ask(issuer) for issuer in silent))
            if all(issuer.answered for issuer in self._issuers):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_SECONDS)

    async def _ask(self, issuer: Issuer) -> None:
        name = issuer.issuer
        try:
            await issuer.probe()
        except MeshcaError as exc:
            if self._problems.get(name) != exc.message:
                log.warning(
                    "token issuer %s is unreachable: %s; tokens it vouches for are refused "
                    "until it answers (retrying with backoff)",
                    name,
                    exc.message,
                )
            self._problems[name] = exc.message
            return
        if name in self._problems:
            log.info("token issuer %s answered", name)
            del self._problems[name]
