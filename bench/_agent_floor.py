"""The memory floor of an agent built on grpcio and cryptography (bench/agent.py --floor).

Not meshca's agent: the least a process does to be one. It imports grpcio (aio),
cryptography and the protobuf modules the agent's sinks use (Istio CA, Workload API,
Envoy SDS), makes a P-256 key and CSR, asks the CA for a certificate over TLS with the
token (one ``CreateCertificate``), parses the chain, then serves a gRPC aio server on a
Unix socket and a plain asyncio HTTP listener on 127.0.0.1, and waits. No settings
model, no metrics library, no CLI framework, no logging set-up. Its VmRSS bounds from
below what any agent on this stack can reach.

    python bench/_agent_floor.py CA_ADDRESS BUNDLE_PEM TOKEN_FILE SOCKET_PATH

Prints one line, ``ready <chain length>``, once everything is up; runs until killed.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc import aio

from meshca.api._proto import istioca_pb2, istioca_pb2_grpc

SPIFFE_ID = "spiffe://cluster.local/ns/default/sa/web"
SINK_PROTOS = (
    "meshca.api._proto.workload_pb2_grpc",
    "envoy.service.secret.v3.sds_pb2_grpc",
    "envoy.extensions.transport_sockets.tls.v3.secret_pb2",
)
"""Loaded, as the agent loads them with both sockets on, though nothing here serves them."""


async def main(address: str, bundle: Path, token_file: Path, socket_path: Path) -> None:
    for name in SINK_PROTOS:
        importlib.import_module(name)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SPIFFE_ID)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=bundle.read_bytes())
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with aio.secure_channel(address, credentials, options=options) as channel:
        stub = istioca_pb2_grpc.IstioCertificateServiceStub(channel)
        request = istioca_pb2.IstioCertificateRequest(
            csr=csr.public_bytes(serialization.Encoding.PEM).decode(), validity_duration=3600
        )
        token = token_file.read_text().strip()
        response = await stub.CreateCertificate(
            request, metadata=[("authorization", f"Bearer {token}")], timeout=10
        )
        chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in response.cert_chain]
        server = aio.server()
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()

        async def health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
            await writer.drain()
            writer.close()

        http = await asyncio.start_server(health, "127.0.0.1", 0)
        print(f"ready {len(chain)}", flush=True)
        async with http:
            await asyncio.Event().wait()


if __name__ == "__main__":
    address, bundle, token, sock = sys.argv[1:5]
    asyncio.run(main(address, Path(bundle), Path(token), Path(sock)))
