"""Builds the configured Signer. The CA core never names a backend; config picks it."""

from __future__ import annotations

from pathlib import Path

from meshca.config import FileSignerConfig, GcpKmsSignerConfig, Pkcs11SignerConfig, SignerConfig
from meshca.signers.base import Signer


def open_signer(config: SignerConfig, *, state_dir: Path, create: bool) -> tuple[Signer, bool]:
    """Open the signer ``config`` names; return (signer, created).

    ``create`` lets the file backend make its key on first start. Hardware and cloud
    backends never create keys here: ``meshca admin root create`` does that deliberately,
    and a missing key is a SignerError that names that command.
    """
    if isinstance(config, FileSignerConfig):
        from meshca.signers.file import FileSigner

        path = config.key_file or state_dir / "root-key.pem"
        if create:
            return FileSigner.load_or_create(path, config.key_type)
        return FileSigner.load(path), False
    if isinstance(config, Pkcs11SignerConfig):
        from meshca.signers.pkcs11 import Pkcs11Signer

        return Pkcs11Signer.open(config), False
    if isinstance(config, GcpKmsSignerConfig):
        from meshca.signers.gcpkms import GcpKmsSigner

        return GcpKmsSigner.open(config), False
    raise AssertionError(f"unhandled signer config {type(config).__name__}")
