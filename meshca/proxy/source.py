"""Credentials from the agent over the SPIFFE Workload API socket.

A ``FetchX509SVID`` stream (with the ``workload.spiffe.io: true`` header, SPIFFE Workload
Endpoint 3) is followed in a background thread with gRPC's blocking client; every message
is published into a local :class:`~meshca.agent.credentials.CredentialStore`, the same
store an in-process agent feeds, so the proxy has one way of learning about rotations.
When the stream ends or the agent is not there yet, the client reconnects with capped
exponential backoff (Workload API 4.2). A blocking client in a thread keeps gRPC's own
event loop out of the proxy's (which may be uvloop).

The first SVID of the response is used (the agent serves one per workload). Malformed
messages are logged (without key material) and skipped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshca.agent.credentials import CredentialStore
from meshca.agent.workload_api import HEADER, HEADER_VALUE
from meshca.api._proto import workload_pb2, workload_pb2_grpc
from meshca.errors import SpiffeIdError
from meshca.spiffe import SpiffeId

log = logging.getLogger(__name__)

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0


def split_der(blob: bytes) -> list[bytes]:
    """Split back-to-back DER certificates (each one SEQUENCE; X.690 8.1.3 lengths)."""
    out: list[bytes] = []
    i = 0
    while i < len(blob):
        if blob[i] != 0x30 or i + 2 > len(blob):
            raise ValueError("not a DER SEQUENCE")
        first = blob[i + 1]
        if first < 0x80:
            length, header = first, 2
        else:
            n = first & 0x7F
            if n == 0 or n > 4 or i + 2 + n > len(blob):
                raise ValueError("bad DER length")
            length, header = int.from_bytes(blob[i + 2 : i + 2 + n], "big"), 2 + n
        end = i + header + length
        if end > len(blob):
            raise ValueError("truncated DER")
        out.append(blob[i:end])
        i = end
    return out


def _certs(blob: bytes) -> tuple[x509.Certificate, ...]:
    return tuple(x509.load_der_x509_certificate(d) for d in split_der(blob))


class WorkloadApiSource:
    """Follows the agent's Workload API socket and publishes into ``store``."""

    def __init__(self, socket_path: Path, store: CredentialStore) -> None:
        self.socket_path = socket_path
        self.store = store
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._call: grpc.Future | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="meshca-proxy-wlapi", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)

    def _run(self) -> None:
        delay = BACKOFF_INITIAL
        while not self._stop.is_set():
            try:
                with grpc.insecure_channel(f"unix:{self.socket_path}") as channel:
                    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
                    self._call = stub.FetchX509SVID(
                        workload_pb2.X509SVIDRequest(), metadata=((HEADER, HEADER_VALUE),)
                    )
                    for response in self._call:
                        if self._publish(response):
                            delay = BACKOFF_INITIAL
                            self.last_error = None
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                self.last_error = f"Workload API {self.socket_path}: {exc.code().name}"
                log.warning("%s; retrying in %.1fs", self.last_error, delay)
            self._stop.wait(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX)

    def _publish(self, response: workload_pb2.X509SVIDResponse) -> bool:
        if not response.svids:
            log.warning("Workload API: a response without an SVID; skipped")
            return False
        svid = response.svids[0]
        try:
            spiffe_id = SpiffeId.parse(svid.spiffe_id)
            chain = _certs(svid.x509_svid)
            bundle = _certs(svid.bundle)
            key = serialization.load_der_private_key(svid.x509_svid_key, password=None)
        except (ValueError, SpiffeIdError) as exc:
            log.warning("Workload API: an unusable SVID message (%s); skipped", exc)
            return False
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) or not chain:
            log.warning("Workload API: an SVID without an ECDSA/RSA key or chain; skipped")
            return False
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        future = asyncio.run_coroutine_threadsafe(
            self.store.publish(spiffe_id, key, chain, bundle), loop
        )
        try:
            future.result(timeout=10)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            return False
        log.info(
            "Workload API: X509-SVID %s serial %x, valid until %s",
            spiffe_id,
            chain[0].serial_number,
            chain[0].not_valid_after_utc.isoformat(),
        )
        return True
