"""A "CA" that does (almost) no work: the floor under any Python gRPC CA on this machine.

``python bench/_null_ca.py --port P --workers N --cert CERT --key KEY [--work none|sign]``
serves ``IstioCertificateService/CreateCertificate`` over TLS with grpcio's asyncio
server, as ``meshca server`` does (same protos, same channel arguments, SO_REUSEPORT
across N processes).

* ``--work none`` answers every request with the same fixed chain: no token check, no
  CSR parsing, no signing, no ledger. Its cost per request is what gRPC, TLS and HTTP/2
  cost in Python before a CA does anything.
* ``--work sign`` does what cfssl does for a sign request and nothing more: parse the CSR,
  verify its signature, build a one-hour leaf for its key and sign it (ECDSA P-256) with
  cryptography. No authentication, no SPIFFE checks, no ledger, no logging.

``bench/issue.py --floor`` measures both with the same load generator as meshca and cfssl.

Prints ``READY <port>`` once every process listens; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def leaf_signer(cert_pem: bytes, key_pem: bytes) -> Callable[[str], str]:
    """A function from a PEM CSR to a PEM leaf: cfssl's work for a sign request."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    issuer = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SystemExit("the null CA signs with an ECDSA key")
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())

    def sign(csr_pem: str) -> str:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        if not csr.is_signature_valid:
            raise ValueError("CSR signature does not verify")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ValueError("not an ECDSA key")
        now = datetime.now(UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(issuer.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(eku, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(aki, critical=False)
            .sign(key, hashes.SHA256())
        )
        return leaf.public_bytes(serialization.Encoding.PEM).decode()

    return sign


async def serve(port: int, cert: bytes, key: bytes, work: str, ready: asyncio.Event | None) -> None:
    import grpc
    from grpc import aio

    from meshca.api._proto import istioca_pb2, istioca_pb2_grpc
    from meshca.api.grpc import server_options

    fixed = istioca_pb2.IstioCertificateResponse(cert_chain=[cert.decode()] * 3)
    sign = leaf_signer(cert, key) if work == "sign" else None

    class NullService(istioca_pb2_grpc.IstioCertificateServiceServicer):  # type: ignore[misc]
        async def CreateCertificate(self, request: Any, context: Any) -> Any:  # noqa: N802
            context.invocation_metadata()  # read what meshca reads, then answer
            if sign is None:
                return fixed
            try:
                leaf = sign(request.csr)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return istioca_pb2.IstioCertificateResponse(cert_chain=[leaf, cert.decode()])

    server = aio.server(
        options=server_options(handshake_timeout=timedelta(seconds=10), reuse_port=True)
    )
    istioca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(NullService(), server)
    if not server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials([(key, cert)])):
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    await server.stop(0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/_null_ca.py")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--work", choices=["none", "sign"], default="none")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(PROJECT_ROOT))
    cert, key = args.cert.read_bytes(), args.key.read_bytes()
    children: list[subprocess.Popen[bytes]] = []
    if not args.child:
        base = [sys.executable, __file__, "--child", "--port", str(args.port)]
        files = ["--cert", str(args.cert), "--key", str(args.key), "--work", args.work]
        for _ in range(args.workers - 1):
            children.append(subprocess.Popen([*base, *files], stdout=subprocess.PIPE))
        for child in children:  # each child says READY once it listens
            assert child.stdout is not None
            if not child.stdout.readline().startswith(b"READY"):
                raise SystemExit("a null-CA worker did not start")

    async def run() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(serve(args.port, cert, key, args.work, ready))
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not ready.is_set():
            task.cancel()
            raise SystemExit("the null CA did not start listening")
        print(f"READY {args.port}", flush=True)
        await task

    try:
        asyncio.run(run())
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
