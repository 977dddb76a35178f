"""py-spiffe, unchanged, as a Workload API client: run as a subprocess by the tests.

py-spiffe's generated protobuf code defines the same top-level message names as meshca's
(the Workload API contract has no proto package), and one Python process cannot load
both; so the tests run this script with the virtualenv's interpreter and read JSON lines
from its stdout. It imports ``spiffe`` and ``cryptography`` only, never ``meshca``.

    wlapi_client.py fetch SOCKET TIMEOUT
        WorkloadApiClient.fetch_x509_svid, fetch_x509_bundles and fetch_x509_context;
        prints one JSON object.
    wlapi_client.py watch SOCKET UPDATES TIMEOUT
        X509Source; prints {"event": "ready", ...} once the first SVID is in, then one
        {"event": "update", ...} per rotation (with time.monotonic(), comparable across
        processes on Linux), and exits after UPDATES rotations.

On failure prints {"error": ...} and exits with status 2 (3 on timeout).
"""

from __future__ import annotations

import hashlib
import json
import queue
import sys
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from spiffe import WorkloadApiClient, X509Source
from spiffe.bundle.x509_bundle.x509_bundle_set import X509BundleSet
from spiffe.svid.x509_svid import X509Svid


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def bundles_json(bundle_set: X509BundleSet) -> dict[str, list[str]]:
    return {
        bundle.trust_domain.name: sorted(fingerprint(c) for c in bundle.x509_authorities)
        for bundle in bundle_set.bundles
    }


def svid_json(svid: X509Svid, bundle_set: X509BundleSet | None = None) -> dict[str, Any]:
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    out: dict[str, Any] = {
        "spiffe_id": str(svid.spiffe_id),
        "serial": format(svid.leaf.serial_number, "x"),
        "chain": [fingerprint(c) for c in svid.cert_chain],
        "key_matches_leaf": svid.private_key.public_key().public_bytes(der, public)
        == svid.leaf.public_key().public_bytes(der, public),
    }
    if bundle_set is not None:
        bundle = bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        roots = list(bundle.x509_authorities) if bundle else []
        verifier = (
            verification.PolicyBuilder().store(verification.Store(roots)).build_client_verifier()
        )
        try:
            verifier.verify(svid.leaf, svid.cert_chain[1:])
            out["chain_verifies"] = True
        except verification.VerificationError as exc:
            out["chain_verifies"] = str(exc)
    return out


def fetch(socket: str, timeout: float) -> dict[str, Any]:
    with WorkloadApiClient(socket_path=socket, default_timeout=timeout) as client:
        svid = client.fetch_x509_svid()
        bundles = client.fetch_x509_bundles()
        context = client.fetch_x509_context()
    return {
        "svid": svid_json(svid),
        "bundles": bundles_json(bundles),
        "context": svid_json(context.default_svid, context.x509_bundle_set),
        "context_bundles": bundles_json(context.x509_bundle_set),
    }


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def watch(socket: str, updates: int, timeout: float) -> int:
    seen: queue.Queue[tuple[float, X509Svid]] = queue.Queue()
    source = X509Source(socket_path=socket, timeout_in_seconds=timeout)
    try:
        source.subscribe_for_updates(
            lambda: seen.put((time.monotonic(), source.get_x509_context().default_svid))
        )
        context = source.get_x509_context()
        emit({"event": "ready", **svid_json(context.default_svid, context.x509_bundle_set)})
        deadline = time.monotonic() + timeout
        for _ in range(updates):
            try:
                at, svid = seen.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                emit({"error": f"no rotation within {timeout}s"})
                return 3
            emit({"event": "update", "at": at, **svid_json(svid)})
    finally:
        source.close()
    return 0


def main(argv: list[str]) -> int:
    mode, socket = argv[1], f"unix://{argv[2]}"
    try:
        if mode == "fetch":
            emit(fetch(socket, float(argv[3])))
            return 0
        if mode == "watch":
            return watch(socket, int(argv[3]), float(argv[4]))
    except Exception as exc:  # the test reads the error from stdout
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 2
    emit({"error": f"unknown mode {mode!r}"})
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
