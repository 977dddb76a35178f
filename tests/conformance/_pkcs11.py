"""The conformance suite's ``pkcs11`` backend: keys generated in SoftHSM2.

Skips, with the reason, when SoftHSM2 is not installed. The keys are the process-wide
shared ones (tests/fakes/softhsm.py), so RSA-4096 is generated once per test run.
"""

from __future__ import annotations

from pathlib import Path

from meshca.pki.keys import KeyAlgorithm
from meshca.signers.base import Signer
from tests.fakes.softhsm import softhsm


def make(base: Path, algorithm: KeyAlgorithm) -> Signer:
    return softhsm(base).shared_signer(algorithm)
