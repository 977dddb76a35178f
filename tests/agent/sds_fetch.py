"""An Envoy-like SDS client in a process of its own: prints the certificate it is sent.

    python -m tests.agent.sds_fetch SOCKET TIMEOUT

Subscribes to ``default`` and ``ROOTCA`` (tests/agent/sds_client.py), waits for the
first response and prints one JSON object: the leaf's SPIFFE ID and serial, whether the
key matches the leaf, the number of roots; or ``{"error": ...}`` (exit 2) when the stream
ended without one (with the gRPC status and details).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.agent.sds_client import EnvoySdsClient


async def fetch(socket: Path, timeout: float) -> dict[str, object]:
    async with EnvoySdsClient(socket) as client:
        try:
            await client.wait_for(lambda c: bool(c.received) or c.ended is not None, timeout)
        except TimeoutError:
            return {"error": f"nothing within {timeout}s"}
        if not client.received:
            assert client.ended is not None
            return {"error": client.ended.name, "details": client.ended_details}
        first = client.received[0]
    leaf = first.chain()[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "spiffe_id": san.get_values_for_type(x509.UniformResourceIdentifier)[0],
        "serial": format(leaf.serial_number, "x"),
        "key_matches_leaf": first.public_key_der() == spki,
        "roots": len(first.trusted_ca()),
    }


def main(argv: list[str]) -> int:
    result = asyncio.run(fetch(Path(argv[1]), float(argv[2])))
    print(json.dumps(result), flush=True)
    return 2 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
