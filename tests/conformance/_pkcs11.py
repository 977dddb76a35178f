"""The conformance suite's ``pkcs11`` backend: keys generated in SoftHSM2.

Skips, with the reason, when SoftHSM2 is not installed. The keys are the process-wide
shared ones (tests/fakes/softhsm.py), so RSA-4096 is generated once per test run.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from meshca.pki.keys import KeyAlgorithm
from meshca.signers.base import Signer
from tests.fakes.softhsm import softhsm


def make(base: Path, algorithm: KeyAlgorithm) -> Signer:
    return softhsm(base).shared_signer(algorithm)


def outage(base: Path) -> tuple[Signer, Callable[[], AbstractContextManager[None]]]:
    """A signer on the outage token, and the HSM going away (SoftHsm.unplugged)."""
    from meshca.signers.pkcs11 import Pkcs11Signer, ReconnectPolicy
    from tests.fakes.softhsm import OUTAGE_TOKEN, unique_label

    hsm = softhsm(base)
    signer = Pkcs11Signer.create(
        hsm.config(token=OUTAGE_TOKEN, key_label=unique_label("conformance-outage")),
        KeyAlgorithm.EC_P256,
        reconnect=ReconnectPolicy(initial_delay=0.02, max_delay=0.2),
    )
    return signer, lambda: hsm.unplugged(OUTAGE_TOKEN)
