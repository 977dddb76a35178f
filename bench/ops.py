"""What one certificate costs meshca before any gRPC: its per-request operations, timed
one by one in this process.

    .venv/bin/python bench/ops.py [--count 2000]

Each line is CPU time per operation (``time.process_time``, median of 5 rounds of
``--count``), using meshca's own functions on a P-256 CSR like the ones istio-agent sends,
an RS256 service-account token already in the verified-token cache, and a ledger row
hashed as the store hashes it. The ledger lines are the SQLite transaction (write lock,
statements, COMMIT with fsync) for one row and for a batch of 16, per row, on the held
connection the CA's ledger writer uses and, for comparison, through a SQLAlchemy session
as before; the leaf is built from the issuer's DER template and, for comparison, with
cryptography's CertificateBuilder (lines marked "not summed"). The last
lines compare the sum with cfssl's whole per-certificate server CPU (bench/issue.py
measures it) and with ``openssl speed ecdsap256`` when openssl is installed.

Nothing here measures throughput; bench/issue.py does.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _fixtures import CLUSTER_ID, TokenIssuer, make_csr, make_pool
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.authn._cache import VerifiedTokenCache
from meshca.authn._jwks import ServiceAccountIdentity, unverified_claims
from meshca.pki import csr as csr_checks
from meshca.pki import profile
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.store import NewIssuance, Store

TRUST_DOMAIN = TrustDomain.parse("cluster.local")
ROUNDS = 5


def per_op(fn: Callable[[], object], count: int) -> float:
    """Median CPU seconds per call over ROUNDS rounds of ``count`` calls."""
    fn()
    rounds = []
    for _ in range(ROUNDS):
        started = time.process_time()
        for _ in range(count):
            fn()
        rounds.append((time.process_time() - started) / count)
    return statistics.median(rounds)


def openssl_speed() -> str | None:
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    try:
        out = subprocess.run(
            [openssl, "speed", "-seconds", "2", "ecdsap256"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if "nistp256" in line:
            fields = line.split()
            sign_per_s, verify_per_s = float(fields[-2]), float(fields[-1])
            return f"sign {1e6 / sign_per_s:.0f} us, verify {1e6 / verify_per_s:.0f} us"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/ops.py", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="calls per round (2000)")
    args = parser.parse_args(argv)
    count = max(10, args.count)

    now = datetime.now(UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = profile.build_root(root_key, TRUST_DOMAIN, ttl=timedelta(days=365), now=now)
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    issuing = profile.build_intermediate(
        root_key, root, issuing_key.public_key(), TRUST_DOMAIN, ttl=timedelta(days=2), now=now
    )
    prepared = profile.PreparedIssuer.prepare(issuing_key, issuing)
    spiffe_id = SpiffeId.parse("spiffe://cluster.local/ns/bench-0/sa/svc-0")
    csr_pem = make_csr(str(spiffe_id))
    csr = csr_checks.load_csr(csr_pem)
    public_key = csr_checks.check_csr(csr, spiffe_id)
    with tempfile.TemporaryDirectory(prefix="meshca-ops-") as tmp:
        issuer = TokenIssuer.create(Path(tmp))
        token = make_pool(issuer, 1, now=int(time.time()), token_ttl=3600)[0].token
        cache = VerifiedTokenCache()
        cache.put(token, ServiceAccountIdentity("bench-0", "svc-0"), time.time() + 3600)

        builder_only = profile.PreparedIssuer.prepare(issuing_key, issuing, template=False)

        def leaf(issuer: profile.PreparedIssuer = prepared) -> x509.Certificate:
            return profile.build_svid(
                issuer,
                issuing,
                public_key,
                spiffe_id,
                not_after=now + timedelta(hours=1),
                now=now,
            )

        leaf_pem = leaf().public_bytes(serialization.Encoding.PEM).decode()

        def entry(serial: int) -> NewIssuance:
            return NewIssuance(
                serial_hex=f"{serial:x}",
                spiffe_id=str(spiffe_id),
                auth_method="k8s-jwt",
                evidence=f"k8s:cluster:{CLUSTER_ID},k8s:ns:bench-0,k8s:sa:svc-0",
                peer_address="127.0.0.1:40000",
                not_before=now,
                not_after=now + timedelta(hours=1),
                intermediate_fingerprint="ab" * 32,
                certificate_pem=leaf_pem,
                issued_at=now,
            )

        store = Store.open(f"sqlite:///{tmp}/ops.db")
        serials = iter(range(1, 10**9))
        rows = [
            ("token: routing peek (unverified claims)", lambda: unverified_claims(token)),
            ("token: verified-token cache lookup", lambda: cache.get(token, time.time())),
            ("CSR: parse PEM", lambda: csr_checks.load_csr(csr_pem)),
            ("CSR: checks incl. signature (PoP)", lambda: csr_checks.check_csr(csr, spiffe_id)),
            ("CSR: SHA-256 for the ledger", lambda: csr_checks.csr_sha256(csr)),
            ("leaf: DER template + ECDSA P-256 sign (what issues)", leaf),
            ("leaf: CertificateBuilder + sign (before; not summed)", lambda: leaf(builder_only)),
            ("ledger: row + hash chain", lambda: entry(1).to_row(1, "00" * 32)),
        ]
        results = [(label, per_op(fn, count)) for label, fn in rows]
        ledger_count = max(10, count // 20)
        held = store.ledger_appender()
        for label, append in (
            ("held connection (what issues)", held.append),
            ("session path (before; not summed)", store.append_issuances),
        ):
            one = per_op(lambda a=append: a([entry(next(serials))]), ledger_count)
            batch = per_op(
                lambda a=append: a([entry(next(serials)) for _ in range(16)]),
                max(5, ledger_count // 4),
            )
            results.append((f"ledger: SQLite commit, 1 row, {label}", one))
            results.append((f"ledger: SQLite commit, per row of 16, {label}", batch / 16))
        store.close()

    width = max(len(label) for label, _ in results)
    print(f"per-certificate operations, CPU time per call (median of {ROUNDS} x {count})")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    for label, seconds in results:
        print(f"  {label:<{width}}  {seconds * 1e6:8.1f} us")
    work = sum(s for label, s in results if "1 row," not in label and "not summed" not in label)
    print(f"  {'sum (batched ledger)':<{width}}  {work * 1e6:8.1f} us")
    speed = openssl_speed()
    if speed:
        print(f"openssl speed ecdsap256 on this machine: {speed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
