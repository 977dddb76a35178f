"""Builds the configured Signer. The CA core never names a backend; config picks it."""

from __future__ import annotations

from pathlib import Path

from meshca.config import FileSignerConfig, GcpKmsSignerConfig, Pkcs11SignerConfig, SignerConfig
from meshca.errors import SignerError
from meshca.signers.base import Signer
from meshca.statedir import ensure_private_dir

DEFAULT_KEY_FILE = "root-key.pem"


def file_key_path(config: FileSignerConfig, state_dir: Path) -> Path:
    """The file signer's key: ``key_file``, or ``root-key.pem`` in the state directory,
    which is then created (0700) or checked first (owner, mode; see meshca.statedir)."""
    if config.key_file is not None:
        return config.key_file
    ensure_private_dir(state_dir, error=SignerError)
    return state_dir / DEFAULT_KEY_FILE


def open_signer(config: SignerConfig, *, state_dir: Path, create: bool) -> tuple[Signer, bool]:
    """Open the signer ``config`` names; return (signer, created).

    ``create`` lets the file backend make its key on first start. Hardware and cloud
    backends never create keys here: ``meshca admin root create`` does that deliberately,
    and a missing key is a SignerError that names that command.
    """
    if isinstance(config, FileSignerConfig):
        from meshca.signers.file import FileSigner

        path = file_key_path(config, state_dir)
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
