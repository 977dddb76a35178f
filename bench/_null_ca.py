"""A "CA" that does no work: the floor under any Python gRPC server on this machine.

``python bench/_null_ca.py --port P --workers N --cert CERT --key KEY`` serves
``IstioCertificateService/CreateCertificate`` over TLS with grpcio's asyncio server, as
``meshca server`` does (same protos, same channel arguments, SO_REUSEPORT across N
processes), but answers every request with the same fixed chain: no token check, no CSR
parsing, no signing, no ledger. What it costs per request is what gRPC, TLS and HTTP/2
cost in Python before meshca does anything; ``bench/issue.py --floor`` measures it with
the same load generator as meshca and cfssl.

Prints ``READY <port>`` once every process listens; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent


async def serve(port: int, cert: bytes, key: bytes, ready: asyncio.Event | None) -> None:
    import grpc
    from grpc import aio

    from meshca.api._proto import istioca_pb2, istioca_pb2_grpc
    from meshca.api.grpc import server_options

    answer = istioca_pb2.IstioCertificateResponse(cert_chain=[cert.decode()] * 3)

    class NullService(istioca_pb2_grpc.IstioCertificateServiceServicer):  # type: ignore[misc]
        async def CreateCertificate(self, request: Any, context: Any) -> Any:  # noqa: N802
            context.invocation_metadata()  # read what meshca reads, then answer
            return answer

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
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(PROJECT_ROOT))
    cert, key = args.cert.read_bytes(), args.key.read_bytes()
    children: list[subprocess.Popen[bytes]] = []
    if not args.child:
        base = [sys.executable, __file__, "--child", "--port", str(args.port)]
        files = ["--cert", str(args.cert), "--key", str(args.key)]
        for _ in range(args.workers - 1):
            children.append(subprocess.Popen([*base, *files], stdout=subprocess.PIPE))
        for child in children:  # each child says READY once it listens
            assert child.stdout is not None
            if not child.stdout.readline().startswith(b"READY"):
                raise SystemExit("a null-CA worker did not start")

    async def run() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(serve(args.port, cert, key, ready))
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
