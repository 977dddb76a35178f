"""The certificate authority: turns an Attestation and a CSR into a ledgered X509-SVID.

Each process holds its own issuing intermediate, whose private key lives only in memory
(or, later, in an HSM), signed by the active root through the Signer seam and rotated
well before it expires (the SPIRE HA model). Every certificate handed out has a committed
ledger row first.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.authn.base import Attestation, Peer
from meshca.ca.issuing_keys import IssuingKey, IssuingKeySource, MemoryKeys
from meshca.ca.ledger import LedgerWriter
from meshca.ca.policy import IssuancePolicy
from meshca.errors import MeshcaError, PolicyError, SignerError, StoreError
from meshca.pki import csr as csr_checks
from meshca.pki import profile
from meshca.pki.keys import KeyAlgorithm, PublicKey
from meshca.signers.base import Signer, close_signer
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.store import IntermediateRecord, NewIssuance, RootRecord, Store
from meshca.store.models import PUBLISHED_ROOT_STATES

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
RootSigners = Callable[[RootRecord], Signer]
"""Opens the key a root record names (a rotation's new root); raises SignerError."""


EXPIRY_MARGIN = timedelta(minutes=1)
"""An intermediate this close to expiry is replaced before the next certificate."""
ROTATION_RETRY_INITIAL = timedelta(seconds=5)
ROTATION_RETRY_MAX = timedelta(minutes=5)


def utcnow() -> datetime:
    return datetime.now(UTC)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True, slots=True)
class IssuingCA:
    """The in-memory issuing intermediate of this process."""

    key: IssuingKey
    certificate: x509.Certificate
    fingerprint: str
    rotate_at: datetime
    signer: profile.PreparedIssuer
    certificate_pem: str
    chain_tail: tuple[str, ...] = ()
    """What follows a leaf in its chain: this intermediate, a cross-certificate while the
    root it bridges from is published, and the root (last)."""

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc


@dataclass(frozen=True, slots=True)
class IssueRequest:
    """A caller's request, already decoded from the wire."""

    csr: bytes | str
    requested_ttl: timedelta | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A signed leaf with its chain (leaf first, root last) and its ledger sequence."""

    certificate: x509.Certificate
    chain_pem: tuple[str, ...]
    ledger_sequence: int

    @property
    def serial_hex(self) -> str:
        return format(self.certificate.serial_number, "x")


@dataclass(frozen=True, slots=True)
class IntermediateSettings:
    ttl: timedelta = timedelta(hours=48)
    rotate_fraction: float = 0.5
    key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256
    keys: IssuingKeySource = field(default_factory=MemoryKeys)
    retire_grace: timedelta = timedelta(seconds=60)
    """How long a replaced issuing key stays usable for requests already signing with it."""
    name_constraints: bool = False


def process_owner() -> str:
    """Identifies the process that holds an intermediate's key, for the store."""
    return f"{socket.gethostname()}:{os.getpid()}"


_authorities_in_process = itertools.count(1)


def new_owner() -> str:
    """The owner name of a new :class:`Authority`: ``hostname:pid``, and ``#n`` for the
    n-th one in the same process (two CAs in one process, as tests run them, must not
    retire each other's intermediates as their own)."""
    n = next(_authorities_in_process)
    return process_owner() if n == 1 else f"{process_owner()}#{n}"


class Authority:
    """Issues X509-SVIDs under one trust domain. Safe to share across coroutines."""

    def __init__(
        self,
        *,
        trust_domain: TrustDomain,
        root_signer: Signer,
        root: RootRecord,
        store: Store,
        policy: IssuancePolicy,
        intermediate: IntermediateSettings | None = None,
        clock: Clock = utcnow,
        root_signers: RootSigners | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self.policy = policy
        self.owner = new_owner()
        """Names this CA's intermediates in the store (``hostname:pid``)."""
        self._root_signer = root_signer
        self._root = root
        self._root_cert = x509.load_pem_x509_certificate(root.certificate_pem.encode())
        self._root_pem = pem(self._root_cert)
        self._store = store
        self._ledger = LedgerWriter(store)
        self._settings = intermediate or IntermediateSettings()
        self._clock = clock
        self._issuing: IssuingCA | None = None
        self._rotation_lock = asyncio.Lock()
        self._rotation_task: asyncio.Task[None] | None = None
        self._rotation_failures = 0
        self._next_rotation_attempt = datetime.min.replace(tzinfo=UTC)
        self._retirements: dict[asyncio.TimerHandle, IssuingKey] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._bundle: tuple[x509.Certificate, ...] = (self._root_cert,)
        self._cross: tuple[x509.Certificate, ...] = ()
        self._root_signers = root_signers
        self._opened_signers: list[Signer] = []

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._root_cert

    @property
    def root(self) -> RootRecord:
        """The root this process signs intermediates with (the store's active root)."""
        return self._root

    @property
    def root_signer(self) -> Signer:
        return self._root_signer

    def cross_certificates(self) -> tuple[x509.Certificate, ...]:
        """Cross-certificates of published roots (old root certifying the new key)."""
        return self._cross

    @property
    def current_issuing_ca(self) -> IssuingCA | None:
        return self._issuing

    def trust_bundle(self) -> tuple[x509.Certificate, ...]:
        """The CA certificates relying parties should trust (every unexpired known root)."""
        return self._bundle

    async def refresh_trust_bundle(self) -> bool:
        """Reload roots from the store; follow a root activated by any replica's operator.

        The bundle is every unexpired root that is prepared, active or retiring. When the
        store's active root is not the one this process signs with, the new root's key is
        opened and a new intermediate signed by it replaces the current one at once.
        Returns True when this process switched roots. Raises SignerError when the new
        root's key cannot be opened (the old root keeps signing meanwhile).
        """
        roots = await asyncio.to_thread(self._store.list_roots)
        now = self._clock()
        published = [r for r in roots if r.state in PUBLISHED_ROOT_STATES and r.not_after > now]
        active = next((r for r in roots if r.state == "active"), None)
        certs = [x509.load_pem_x509_certificate(r.certificate_pem.encode()) for r in published]
        # The bundle first: it must follow the store even if the switch below fails.
        if self._root_cert not in certs:
            certs.insert(0, self._root_cert)
        self._bundle = tuple(certs)
        self._cross = tuple(
            x509.load_pem_x509_certificate(r.cross_certificate_pem.encode())
            for r in published
            if r.cross_certificate_pem
        )
        if active is None or active.fingerprint == self._root.fingerprint:
            return False
        await self._switch_root(active)
        return True

    async def _switch_root(self, active: RootRecord) -> None:
        if self._root_signers is None:
            raise SignerError(
                f"root {active.fingerprint[:16]} is now active but this process cannot open "
                "root keys other than its configured one; restart it",
                reason="root_switch_unsupported",
            )
        signer = await asyncio.to_thread(self._root_signers, active)
        self._opened_signers.append(signer)
        async with self._rotation_lock:
            old = self._root
            self._root_signer = signer
            self._root = active
            self._root_cert = x509.load_pem_x509_certificate(active.certificate_pem.encode())
            self._root_pem = pem(self._root_cert)
            log.warning(
                "root %s is now active (was %s): signing a new issuing intermediate with it",
                active.fingerprint[:16],
                old.fingerprint[:16],
            )
            await self._rotate()

    async def issuing_ca(self) -> IssuingCA:
        """The issuing intermediate to sign with now.

        Past its rotation point, a replacement is minted in the background (one attempt
        at a time, backing off after a failure) while the current intermediate keeps
        signing: a root signer (HSM, KMS) that is down at rotation time costs nothing
        until the current intermediate nears expiry. Requests wait only when there is no
        usable intermediate: at start-up, or once the current one is about to expire.
        """
        current = self._issuing
        now = self._clock()
        if current is not None and now < current.not_after - EXPIRY_MARGIN:
            if now >= current.rotate_at:
                self._rotate_in_background(now)
            return current
        async with self._rotation_lock:
            current = self._issuing
            if current is not None and self._clock() < current.not_after - EXPIRY_MARGIN:
                return current
            return await self._rotate()

    async def rotate_if_due(self) -> None:
        """Rotate now if the rotation point has passed (the maintenance loop calls this).

        Raises what minting raises; the current intermediate stays in use meanwhile.
        """
        async with self._rotation_lock:
            current = self._issuing
            if current is None or self._clock() >= current.rotate_at:
                await self._rotate()

    def _rotate_in_background(self, now: datetime) -> None:
        if self._rotation_task is not None and not self._rotation_task.done():
            return
        if now < self._next_rotation_attempt:
            return
        self._rotation_task = asyncio.create_task(self._background_rotation())

    async def _background_rotation(self) -> None:
        try:
            await self.rotate_if_due()
        except MeshcaError as exc:
            self._rotation_failures += 1
            delay = min(
                ROTATION_RETRY_MAX, ROTATION_RETRY_INITIAL * 2 ** (self._rotation_failures - 1)
            )
            self._next_rotation_attempt = self._clock() + delay
            current = self._issuing
            log.warning(
                "could not rotate the issuing intermediate (%s); the current one keeps "
                "signing until %s; next attempt in %ds",
                exc,
                current.not_after.isoformat() if current else "-",
                delay.total_seconds(),
            )
        else:
            self._rotation_failures = 0

    async def _rotate(self) -> IssuingCA:
        fresh = await self._mint_intermediate()
        old, self._issuing = self._issuing, fresh
        if old is not None:
            log.info(
                "rotated issuing intermediate %s -> %s (old one expires %s)",
                old.fingerprint[:16],
                fresh.fingerprint[:16],
                old.not_after.isoformat(),
            )
            # Requests that picked up the old intermediate may still be signing with it.
            handle = asyncio.get_running_loop().call_later(
                self._settings.retire_grace.total_seconds(), self._retire_soon, old.key
            )
            self._retirements[handle] = old.key
        return fresh

    def _retire_soon(self, key: IssuingKey) -> None:
        self._retirements = {h: k for h, k in self._retirements.items() if k is not key}
        task = asyncio.create_task(asyncio.to_thread(self._retire, key))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _retire(self, key: IssuingKey) -> None:
        try:
            self._settings.keys.retire(key)
        except MeshcaError as exc:
            log.warning("could not dispose of a retired issuing key: %s", exc)

    async def close(self) -> None:
        """Stop background work and dispose of every issuing key still held."""
        if self._rotation_task is not None:
            self._rotation_task.cancel()
        pending, self._retirements = self._retirements, {}
        for handle in pending:
            handle.cancel()
        for task in list(self._background):
            await task
        current, self._issuing = self._issuing, None
        for key in pending.values():
            await asyncio.to_thread(self._retire, key)
        if current is not None:
            await asyncio.to_thread(self._retire, current.key)
        opened, self._opened_signers = self._opened_signers, []
        for signer in opened:
            await asyncio.to_thread(close_signer, signer)
        await self._ledger.close()

    async def _mint_intermediate(self) -> IssuingCA:
        settings = self._settings
        key = await asyncio.to_thread(settings.keys.new_key, settings.key_algorithm)
        try:
            return await self._certify(key)
        except BaseException:
            await asyncio.to_thread(self._retire, key)
            raise

    async def _certify(self, key: IssuingKey) -> IssuingCA:
        """Have the root sign ``key``'s intermediate, record it, prepare it for signing."""
        settings = self._settings
        now = self._clock()
        cert = await asyncio.to_thread(
            profile.build_intermediate,
            self._root_signer,
            self._root_cert,
            key.public_key(),
            self.trust_domain,
            ttl=settings.ttl,
            now=now,
            name_constraints=settings.name_constraints,
        )
        fingerprint = profile.fingerprint(cert)
        record = IntermediateRecord(
            fingerprint=fingerprint,
            serial_hex=format(cert.serial_number, "x"),
            root_fingerprint=self._root.fingerprint,
            certificate_pem=pem(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            owner=self.owner,
            created_at=now,
        )
        await asyncio.to_thread(self._store.add_intermediate, record)
        life = cert.not_valid_after_utc - now
        rotate_at = now + life * settings.rotate_fraction
        log.info(
            "issuing intermediate %s ready, valid until %s, rotates at %s",
            fingerprint[:16],
            cert.not_valid_after_utc.isoformat(),
            rotate_at.isoformat(),
        )
        return IssuingCA(
            key=key,
            certificate=cert,
            fingerprint=fingerprint,
            rotate_at=rotate_at,
            signer=profile.PreparedIssuer.prepare(key, cert),
            certificate_pem=pem(cert),
            chain_tail=(pem(cert), *self._bridging_cross(), self._root_pem),
        )

    def _bridging_cross(self) -> tuple[str, ...]:
        """The active root's cross-certificate while its issuer (the old root) is published."""
        if not self._root.cross_certificate_pem:
            return ()
        cross = x509.load_pem_x509_certificate(self._root.cross_certificate_pem.encode())
        if not any(c.subject == cross.issuer for c in self._bundle):
            return ()
        return (pem(cross),)

    async def issue(
        self, request: IssueRequest, attestation: Attestation, peer: Peer
    ) -> IssuedCertificate:
        """Check the CSR against the attested identity, sign, ledger, return the chain.

        A request carrying a ``request_id`` this identity already used with the same CSR
        gets the recorded certificate back (an idempotent retry); with another CSR it is
        refused. Raises CSRError, PolicyError, SignerError or StoreError; a refusal
        writes nothing.
        """
        csr = csr_checks.load_csr(request.csr)
        self.policy.check_identity(attestation)
        public_key = csr_checks.check_csr(csr, attestation.spiffe_id)
        digest = csr_checks.csr_sha256(csr)
        if request.request_id is not None:
            prior = await self._prior_answer(request.request_id, attestation.spiffe_id, digest)
            if prior is not None:
                return prior
        try:
            return await self._sign_and_record(
                public_key=public_key,
                spiffe_id=attestation.spiffe_id,
                lifetime=self.policy.lifetime(request.requested_ttl),
                auth_method=str(attestation.method),
                evidence=attestation.evidence_summary(),
                peer_address=peer.address,
                request_id=request.request_id,
                csr_digest=digest,
                agent_spiffe_id=attestation.delegated_by,
                node_name=attestation.node,
            )
        except StoreError as exc:
            # Two concurrent retries of one request: the loser answers with the winner's row.
            if request.request_id is None or exc.reason != "integrity_error":
                raise
            prior = await self._prior_answer(request.request_id, attestation.spiffe_id, digest)
            if prior is None:
                log.error("ledger write failed; certificate withheld: %s", exc.message)
                raise
            log.info(
                "request_id %s of %s: a concurrent retry was recorded first (ledger #%d); "
                "answering with its certificate",
                request.request_id,
                attestation.spiffe_id,
                prior.ledger_sequence,
            )
            return prior

    async def _prior_answer(
        self, request_id: str, spiffe_id: SpiffeId, csr_digest: str
    ) -> IssuedCertificate | None:
        """The recorded answer to an earlier request with this id, or None if there is none."""
        row = await asyncio.to_thread(self._store.find_by_request_id, request_id, str(spiffe_id))
        if row is None:
            return None
        if row.csr_sha256 != csr_digest:
            raise PolicyError(
                f"request_id {request_id} was already used by {spiffe_id} with a different "
                "CSR; a new CSR needs a new request_id",
                reason="request_id_reused",
            )
        leaf = x509.load_pem_x509_certificate(row.certificate_pem.encode())
        if leaf.not_valid_after_utc <= self._clock():
            raise PolicyError(
                f"request_id {request_id} was answered with a certificate that has expired; "
                "send a new request_id",
                reason="request_id_reused",
            )
        inter = await asyncio.to_thread(self._store.get_intermediate, row.intermediate_fingerprint)
        root = None
        if inter is not None:
            root = await asyncio.to_thread(self._store.get_root, inter.root_fingerprint)
        if inter is None or root is None:
            raise StoreError(
                f"ledger row {row.sequence} names an issuer the store does not hold",
                reason="ledger_corrupt",
            )
        chain = (row.certificate_pem, inter.certificate_pem, root.certificate_pem)
        return IssuedCertificate(certificate=leaf, chain_pem=chain, ledger_sequence=row.sequence)

    async def issue_server_certificate(
        self, spiffe_id: SpiffeId, dns_names: Sequence[str], lifetime: timedelta
    ) -> tuple[bytes, tuple[str, ...]]:
        """A TLS certificate for this CA's own endpoints; returns (key PEM, chain PEM).

        The key is generated here and kept in memory by the caller; the issuance is
        ledgered like any other, with auth method ``ca-internal``.
        """
        key = KeyAlgorithm.EC_P256.generate()
        issued = await self._sign_and_record(
            public_key=key.public_key(),
            spiffe_id=spiffe_id,
            lifetime=lifetime,
            auth_method="ca-internal",
            evidence=f"process:{self.owner}",
            peer_address="local",
            request_id=None,
            csr_digest=None,
            dns_names=dns_names,
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem, issued.chain_pem

    async def _sign_and_record(
        self,
        *,
        public_key: PublicKey,
        spiffe_id: SpiffeId,
        lifetime: timedelta,
        auth_method: str,
        evidence: str,
        peer_address: str,
        request_id: str | None,
        csr_digest: str | None,
        dns_names: Sequence[str] = (),
        agent_spiffe_id: SpiffeId | None = None,
        node_name: str | None = None,
    ) -> IssuedCertificate:
        ca = await self.issuing_ca()
        now = self._clock()
        not_after = min(now + lifetime, ca.not_after)
        if not_after <= now:
            raise SignerError(
                "the issuing intermediate has expired and no new one could be made",
                reason="issuer_expired",
            )
        build = functools.partial(
            profile.build_svid,
            ca.signer,
            ca.certificate,
            public_key,
            spiffe_id,
            not_after=not_after,
            now=now,
            dns_names=dns_names,
        )
        # An HSM-held issuing key costs a round trip per certificate: keep it off the loop.
        cert = await asyncio.to_thread(build) if self._settings.keys.in_hardware else build()
        leaf_pem = pem(cert)
        entry = NewIssuance(
            serial_hex=format(cert.serial_number, "x"),
            spiffe_id=str(spiffe_id),
            auth_method=auth_method,
            evidence=evidence,
            peer_address=peer_address,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            intermediate_fingerprint=ca.fingerprint,
            certificate_pem=leaf_pem,
            issued_at=now,
            request_id=request_id,
            csr_sha256=csr_digest,
            agent_spiffe_id=str(agent_spiffe_id) if agent_spiffe_id is not None else None,
            node_name=node_name,
        )
        row = await self._ledger.append(entry)  # a failed write is logged there, once
        chain = (leaf_pem, *ca.chain_tail)
        return IssuedCertificate(certificate=cert, chain_pem=chain, ledger_sequence=row.sequence)
