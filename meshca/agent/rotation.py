"""The rotation engine: a fresh key and certificate at start, renewal before expiry.

Rules (issue 5, "Node agent"):

- A new private key for every certificate, made here and never sent anywhere; the CSR
  names the SPIFFE ID once the agent knows it (none on the first token issuance: the CA
  decides the identity). At start the agent always requests a new certificate; it
  never reuses a key from an earlier run.
- Renewal at ``ratio`` of the certificate's life, give or take ``jitter / 2`` of it at
  random, so a fleet issued together does not renew together. The life is counted from
  when the agent asked (the CA backdates notBefore for clock skew), to notAfter.
- On failure, exponential backoff with full jitter (delay drawn uniformly from zero to
  ``initial * 2^(n-1)``, capped at ``maximum``: the "full jitter" of the AWS
  Architecture Blog's "Exponential Backoff and Jitter"), never sooner than the server's
  ``RetryInfo`` hint. Failures that retrying cannot fix (PERMISSION_DENIED,
  UNAUTHENTICATED, INVALID_ARGUMENT, a refused answer, an unreadable token file) wait
  the maximum every time: logged with their reason, never hammered.
- While the CA is unreachable the last certificate stays published and served; the log
  and the metrics say how long it has left.
- A node agent runs one engine per workload identity it serves (``impersonate``): the
  CSR names that identity and the request carries it as ``ImpersonatedIdentity``; the
  agent authenticates with its own token (``k8s``, ``gce``) or, when that cannot be
  presented again (``join-token``, ``svid``), with its own SVID on the mTLS port.
- The trust bundle published with each certificate is the agent's anchors, which
  always hold the root the answer ends at; it is also refreshed every
  ``bundle_refresh`` from its source (file or URL), and every root is passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.agent.client import CAClient, CAError, Issued
from meshca.agent.credential_sources import CredentialError
from meshca.agent.credentials import CredentialStore, X509Credentials
from meshca.agent.metrics import AgentMetrics
from meshca.agent.trust import TrustError
from meshca.durations import format_duration
from meshca.pki.keys import KeyAlgorithm, PrivateKey
from meshca.spiffe import SpiffeId

log = logging.getLogger(__name__)

SVID_ONLY_RENEWAL = frozenset({"svid", "join-token"})
"""Credentials that cannot be presented again once the agent holds an SVID."""

AgentFailure = CAError | CredentialError | TrustError
"""What one attempt to get a certificate may raise (anything else is a bug)."""


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RenewalSchedule:
    """When to renew a certificate: ``ratio`` of its life, +/- ``jitter / 2`` at random."""

    ratio: float = 0.5
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.ratio - self.jitter / 2 <= self.ratio + self.jitter / 2 < 1:
            raise ValueError(f"renewal at {self.ratio} +/- {self.jitter / 2} leaves (0, 1)")

    def renew_at(self, start: datetime, not_after: datetime, rng: random.Random) -> datetime:
        """The renewal time of a certificate valid from ``start`` to ``not_after``."""
        life = not_after - start
        if life <= timedelta(0):
            return start
        fraction = self.ratio + rng.uniform(-self.jitter / 2, self.jitter / 2)
        return start + life * fraction

    def for_leaf(self, leaf: x509.Certificate, asked_at: datetime, rng: random.Random) -> datetime:
        """The renewal time of ``leaf``, requested at ``asked_at``: its life counts from
        then, not from notBefore, which the CA backdates for clock skew."""
        start = max(leaf.not_valid_before_utc, asked_at)
        return self.renew_at(start, leaf.not_valid_after_utc, rng)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between failed attempts (see the module docstring)."""

    initial: timedelta = timedelta(seconds=1)
    maximum: timedelta = timedelta(seconds=60)

    def delay(
        self,
        failures: int,
        rng: random.Random,
        *,
        retryable: bool = True,
        hint: float | None = None,
    ) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (counting from 1)."""
        top = self.maximum.total_seconds()
        cap = min(top, self.initial.total_seconds() * 2.0 ** min(max(failures, 1) - 1, 64))
        if not retryable:
            # Long, with a little spread so a fleet refused together does not return together.
            wait = top * rng.uniform(0.8, 1.0)
            return max(wait, hint) if hint is not None else wait
        wait = rng.uniform(0.0, cap)
        if hint is not None:
            # Never before the server's hint; spread above it, as the hint is the same
            # for every caller the server turned away at that moment.
            wait = min(hint + wait, max(top, hint))
        return wait


def new_key_and_csr(key_type: KeyAlgorithm, spiffe_id: SpiffeId | None) -> tuple[PrivateKey, str]:
    """A fresh private key and a PEM CSR for it, with ``spiffe_id`` as URI SAN if given.

    The subject is empty and the SAN critical, as in the X509-SVID the CA will build
    (RFC 5280 4.2.1.6). CPU-bound (RSA keys take a while): call off the event loop.
    """
    key = key_type.generate()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=True,
        )
    csr = builder.sign(key, key_type.hash_algorithm())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


class RotationEngine:
    """Keeps the store holding a valid certificate; run :meth:`run` as a task.

    ``credential`` is ``k8s``/``gce`` (a token source in the client; renewals use the
    SVID on the mTLS port when the client has one, falling back to the token when the
    CA refuses it), ``join-token`` (the token for the first certificate only, unless
    ``bootstrap`` holds an SVID from an earlier run; then only the SVID, as the token is
    spent) or ``svid`` (the SVID only, starting from ``bootstrap``).
    """

    def __init__(
        self,
        *,
        client: CAClient,
        store: CredentialStore,
        key_type: KeyAlgorithm = KeyAlgorithm.EC_P256,
        ttl: timedelta = timedelta(hours=1),
        schedule: RenewalSchedule | None = None,
        backoff: Backoff | None = None,
        metrics: AgentMetrics | None = None,
        credential: str = "k8s",
        bootstrap: X509Credentials | None = None,
        bundle_refresh: timedelta | None = None,
        rng: random.Random | None = None,
        impersonate: SpiffeId | None = None,
        agent_svid: Callable[[], X509Credentials | None] | None = None,
        track_expiry: bool = True,
    ) -> None:
        if credential == "svid" and bootstrap is None and impersonate is None:
            raise ValueError("credential 'svid' needs a bootstrap SVID")
        self.client = client
        self.store = store
        self.key_type = key_type
        self.ttl = ttl
        self.schedule = schedule or RenewalSchedule()
        self.backoff = backoff or Backoff()
        self.metrics = metrics or AgentMetrics()
        self.credential = credential
        self.bundle_refresh = bundle_refresh
        self._bootstrap = bootstrap
        self._rng = rng or random.SystemRandom()
        self.impersonate = impersonate
        self._agent_svid = agent_svid
        self.spiffe_id: SpiffeId | None = (
            impersonate if impersonate is not None else bootstrap.spiffe_id if bootstrap else None
        )
        self.next_renewal: datetime | None = None
        self.next_attempt: datetime | None = None
        self.failures = 0
        self.attempts = 0
        self.last_error: AgentFailure | None = None
        self.last_failure_at: float | None = None
        """``time.monotonic()`` of the last failed attempt."""
        self.attempted = asyncio.Event()
        """Set after every attempt, whatever its outcome (callers waiting for the first
        certificate learn of a refusal at once)."""
        self._wake = asyncio.Event()
        if track_expiry:
            self.metrics.track(store)

    # -- the loops ------------------------------------------------------------------------

    async def run(self) -> None:
        """Issue at once, then renew forever; cancel to stop (nothing is left running)."""
        async with asyncio.TaskGroup() as tasks:
            if self.bundle_refresh is not None and self.client.anchors.source is not None:
                tasks.create_task(self._refresh_bundle(self.bundle_refresh))
            await self._rotate()

    async def _rotate(self) -> None:
        while True:
            self._wake.clear()  # a renew_now() from here on cuts the next wait short
            try:
                await self.renew_once()
            except (CAError, CredentialError, TrustError) as exc:
                delay = self._failed(exc)
            else:
                assert self.next_renewal is not None
                delay = (self.next_renewal - _now()).total_seconds()
            finally:
                self.attempted.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, delay)):
                    await self._wake.wait()

    def renew_now(self) -> None:
        """Cut the current wait short (SIGHUP): renew at once, e.g. after an operator
        fixed what made the CA refuse."""
        log.info("renewal requested")
        self._wake.set()

    async def _refresh_bundle(self, interval: timedelta) -> None:
        anchors = self.client.anchors
        while True:
            await asyncio.sleep(interval.total_seconds())
            try:
                changed = await anchors.refresh()
            except TrustError as exc:
                self.metrics.bundle_failures.labels(exc.reason).inc()
                log.warning(
                    "trust bundle refresh failed, keeping the %d root(s) in force: %s",
                    len(anchors.current),
                    exc,
                )
                continue
            if changed:
                self.metrics.bundle_roots.set(len(anchors.current))
                await self.store.publish_bundle(anchors.current)

    # -- one attempt ----------------------------------------------------------------------

    async def renew_once(self) -> X509Credentials:
        """One request for a new key's certificate; publish it. Raises AgentFailure."""
        self.attempts += 1
        started = time.perf_counter()
        asked_at = _now()
        key, csr = await asyncio.to_thread(new_key_and_csr, self.key_type, self.spiffe_id)
        issued = await self._request(csr, key)
        anchors = self.client.anchors.current
        bundle = anchors if issued.root in anchors else (*anchors, issued.root)
        creds = await self.store.publish(issued.spiffe_id, key, issued.chain, bundle)
        leaf = issued.leaf
        self.spiffe_id = issued.spiffe_id
        self.next_renewal = self.schedule.for_leaf(leaf, asked_at, self._rng)
        self.next_attempt = None
        self.failures = 0
        self.last_error = None
        self.metrics.renewals.labels(issued.via).inc()
        self.metrics.last_success.set(time.time())
        self.metrics.consecutive_failures.set(0)
        self.metrics.bundle_roots.set(len(bundle))
        self.metrics.latency.observe(time.perf_counter() - started)
        log.info(
            "certificate for %s (serial %x, version %d) valid until %s, obtained with the %s; "
            "renewal at %s",
            issued.spiffe_id,
            leaf.serial_number,
            creds.version,
            leaf.not_valid_after_utc.isoformat(),
            issued.via,
            self.next_renewal.isoformat(timespec="seconds"),
        )
        return creds

    async def _request(self, csr: str, key: PrivateKey) -> Issued:
        if self.impersonate is not None:
            return await self.client.create_certificate(
                csr,
                key.public_key(),
                ttl=self.ttl,
                expected=self.impersonate,
                svid=self._svid_for_impersonation(),
                impersonate=self.impersonate,
            )
        svid = self._renewal_svid()
        try:
            return await self.client.create_certificate(
                csr, key.public_key(), ttl=self.ttl, expected=self.spiffe_id, svid=svid
            )
        except CAError as exc:
            if svid is None or exc.retryable or self.credential in SVID_ONLY_RENEWAL:
                raise
            log.warning("renewal with the SVID was refused, asking with the token: %s", exc)
            self.metrics.failures.labels(exc.reason).inc()
        return await self.client.create_certificate(
            csr, key.public_key(), ttl=self.ttl, expected=self.spiffe_id, svid=None
        )

    def _svid_for_impersonation(self) -> X509Credentials | None:
        """A node agent asks with its token (``k8s``, ``gce``: the CA learns its pod and
        node from it), or with its own SVID when it has nothing else (``join-token``,
        ``svid``)."""
        if self.credential not in SVID_ONLY_RENEWAL:
            return None
        own = self._agent_svid() if self._agent_svid is not None else None
        if own is None or own.not_after <= _now():
            raise CAError(
                "the agent has no valid SVID of its own yet to ask for workload identities "
                "with; waiting for it",
                reason="agent_svid_unavailable",
                retryable=True,
            )
        return own

    def _renewal_svid(self) -> X509Credentials | None:
        """The SVID to authenticate with, or None to use the token."""
        if self.client.mtls_address is None:
            return None
        current = self.store.current() or self._bootstrap
        now = _now()
        if current is not None and current.not_after > now:
            return current
        if self.credential not in SVID_ONLY_RENEWAL or current is None:
            return None
        if self.credential == "join-token":
            raise CAError(
                f"the agent's SVID expired at {current.not_after.isoformat()} and its join "
                "token was spent on the first certificate: create a new one (`meshca admin "
                "join-token create`), write it to token_file and restart the agent",
                reason="svid_expired",
                retryable=False,
            )
        raise CAError(
            f"the agent's SVID expired at {current.not_after.isoformat()} and credential "
            "'svid' has nothing else to renew with: provide a new SVID (svid_cert_file, "
            "svid_key_file) and restart the agent",
            reason="svid_expired",
            retryable=False,
        )

    def _failed(self, exc: AgentFailure) -> float:
        """Record a failure; the seconds to wait before the next attempt."""
        self.failures += 1
        self.last_error = exc
        self.last_failure_at = time.monotonic()
        retryable = exc.retryable
        hint = exc.retry_after if isinstance(exc, CAError) else None
        delay = self.backoff.delay(self.failures, self._rng, retryable=retryable, hint=hint)
        self.next_attempt = _now() + timedelta(seconds=delay)
        self.metrics.failures.labels(exc.reason).inc()
        self.metrics.consecutive_failures.set(self.failures)
        current = self.store.current()
        if current is None:
            state = "no certificate yet"
        else:
            left = current.not_after - _now()
            state = (
                f"still serving {current.spiffe_id} until {current.not_after.isoformat()} "
                f"({format_duration(left)} left)"
                if left > timedelta(0)
                else f"the certificate served expired at {current.not_after.isoformat()}"
            )
        if retryable:
            log.warning(
                "certificate request failed (%s, %d in a row): %s; %s; retrying in %.1fs",
                exc.reason,
                self.failures,
                exc,
                state,
                delay,
            )
        else:
            log.error(
                "certificate request refused (%s, %d in a row): %s; %s; retrying will not "
                "help until this is fixed; next attempt in %.0fs",
                exc.reason,
                self.failures,
                exc,
                state,
                delay,
            )
        return delay
