"""Where each process's issuing-intermediate key lives.

``memory`` (the default): generated in the CA process at every rotation and never written
anywhere; the root (HSM/KMS) only signs the intermediate. ``hsm``: generated inside the
PKCS#11 token as a session object (sensitive, non-extractable, gone when the process
ends), so every workload certificate is signed in the hardware module, at the cost of
an HSM round trip per certificate.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from typing import Protocol

from meshca.config import Pkcs11SignerConfig
from meshca.pki.keys import KeyAlgorithm, PrivateKey
from meshca.signers.base import Signer

log = logging.getLogger(__name__)

IssuingKey = PrivateKey | Signer


class IssuingKeySource(Protocol):
    """Makes the key of a new issuing intermediate, and disposes of a retired one."""

    @property
    def in_hardware(self) -> bool: ...

    def new_key(self, algorithm: KeyAlgorithm) -> IssuingKey: ...

    def retire(self, key: IssuingKey) -> None: ...


class MemoryKeys:
    """Issuing keys in process memory."""

    in_hardware = False

    def new_key(self, algorithm: KeyAlgorithm) -> IssuingKey:
        return algorithm.generate()

    def retire(self, key: IssuingKey) -> None:
        """Nothing to do: the key object is dropped with the old intermediate."""


class HsmKeys:
    """Issuing keys created in a PKCS#11 token as session objects."""

    in_hardware = True

    def __init__(self, config: Pkcs11SignerConfig) -> None:
        self._config = config
        self._counter = itertools.count(1)

    def new_key(self, algorithm: KeyAlgorithm) -> IssuingKey:
        from meshca.signers.pkcs11 import Pkcs11Signer

        label = f"meshca-issuing-{socket.gethostname()}-{os.getpid()}-{next(self._counter)}"
        return Pkcs11Signer.create(self._config, algorithm, label=label, persistent=False)

    def retire(self, key: IssuingKey) -> None:
        from meshca.signers.pkcs11 import Pkcs11Signer

        if isinstance(key, Pkcs11Signer):
            log.info("destroying retired issuing key %s", key.key_id)
            key.destroy()
            key.close()
