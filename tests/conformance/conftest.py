"""The Signer conformance suite's one seam: ``signer_factory``.

Each param of the fixture is a backend. A backend's entry builds a Signer for a given
KeyAlgorithm; test_signer.py runs every conformance test against every backend and
algorithm. To add a backend (``pkcs11`` against SoftHSM2, ``gcpkms`` against the KMS
emulator), add its name to ``BACKENDS`` and a ``_make_<name>`` function; skip inside it,
with a reason, when the backend's real part is not available.

Signers are cached per (backend, algorithm) for the session: RSA-4096 generation is
slow, and a backend must cope with one key signing many times anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from meshca.pki.keys import KeyAlgorithm
from meshca.signers.base import Signer, close_signer
from meshca.signers.file import FileSigner
from tests.conformance import _gcpkms, _pkcs11
from tests.pki.helpers import key

SignerFactory = Callable[[KeyAlgorithm], Signer]

BACKENDS = ["file", "gcpkms", "pkcs11"]


def _make_file(base: Path, algorithm: KeyAlgorithm) -> Signer:
    # Reuse the session's test key rather than generate another RSA-4096 key; how the
    # file backend creates keys is tested in tests/signers/test_file.py.
    path = base / f"{algorithm.value}.pem"
    path.write_bytes(
        key(algorithm).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return FileSigner.load(path)


_MAKERS: dict[str, Callable[[Path, KeyAlgorithm], Signer]] = {
    "file": _make_file,
    "gcpkms": _gcpkms.make,
    "pkcs11": _pkcs11.make,
}


@pytest.fixture(scope="session", params=BACKENDS)
def signer_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> SignerFactory:
    backend: str = request.param
    base = tmp_path_factory.mktemp(f"signer-{backend}")
    cache: dict[KeyAlgorithm, Signer] = {}

    def make(algorithm: KeyAlgorithm) -> Signer:
        if algorithm not in cache:
            cache[algorithm] = _MAKERS[backend](base, algorithm)
        return cache[algorithm]

    return make


Outage = tuple[Signer, Callable[[], AbstractContextManager[None]]]


def _file_outage(base: Path) -> Outage:
    pytest.skip("the file backend holds its key in memory once loaded: there is no backend to lose")


_OUTAGES: dict[str, Callable[[Path], Outage]] = {
    "file": _file_outage,
    "gcpkms": _gcpkms.outage,
    "pkcs11": _pkcs11.outage,
}


@pytest.fixture(params=BACKENDS)
def outage(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Outage]:
    """A signer of the backend, and a context manager during which its backend is gone."""
    signer, unplugged = _OUTAGES[request.param](tmp_path_factory.getbasetemp())
    yield signer, unplugged
    close_signer(signer)
