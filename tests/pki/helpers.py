"""Test helpers shared by the pki, signers and conformance suites.

Keys are generated once per session and reused (RSA-4096 generation is slow); ``slot``
tells apart keys that must differ within one chain (0 root, 1 intermediate, 2 leaf).
Suites share slot 0 wherever any key of the algorithm will do.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from meshca.pki.keys import KeyAlgorithm, PrivateKey, PublicKey

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"

needs_openssl = pytest.mark.skipif(
    not Path(OPENSSL).exists(), reason="the openssl command is not installed"
)


@functools.cache
def key(algorithm: KeyAlgorithm, slot: int = 0) -> PrivateKey:
    """A private key of ``algorithm``, the same one for the same (algorithm, slot)."""
    return algorithm.generate()


@dataclass(frozen=True)
class MemorySigner:
    """The smallest honest Signer: a key in memory. Lets pki tests use the Signer path."""

    private: PrivateKey = field(repr=False)
    backend: str = "memory"

    @property
    def key_id(self) -> str:
        return "memory"

    @property
    def algorithm(self) -> KeyAlgorithm:
        return KeyAlgorithm.of(self.private)

    def public_key(self) -> PublicKey:
        return self.private.public_key()

    def sign(self, data: bytes) -> bytes:
        digest = self.algorithm.hash_algorithm()
        if isinstance(self.private, ec.EllipticCurvePrivateKey):
            return self.private.sign(data, ec.ECDSA(digest))
        return self.private.sign(data, padding.PKCS1v15(), digest)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def openssl_verify(
    tmp_path: Path,
    root: x509.Certificate,
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate] = (),
    *,
    at: datetime | None = None,
    purpose: str | None = "sslclient",
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``openssl verify -x509_strict`` on ``leaf`` against ``root`` as the only anchor."""
    root_file = tmp_path / "root.pem"
    root_file.write_bytes(pem(root))
    leaf_file = tmp_path / "leaf.pem"
    leaf_file.write_bytes(pem(leaf))
    args = [OPENSSL, "verify", "-x509_strict", "-CAfile", str(root_file)]
    if intermediates:
        untrusted = tmp_path / "untrusted.pem"
        untrusted.write_bytes(b"".join(pem(c) for c in intermediates))
        args += ["-untrusted", str(untrusted)]
    if at is not None:
        args += ["-attime", str(int(at.timestamp()))]
    if purpose is not None:
        args += ["-purpose", purpose]
    args += [*extra, str(leaf_file)]
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
