"""Builds the configured Signer. The CA core never names a backend; config picks it."""

from __future__ import annotations

from pathlib import Path

from meshca.config import SignerConfig
from meshca.signers.base import Signer


def open_signer(config: SignerConfig, *, state_dir: Path, create: bool) -> tuple[Signer, bool]:
    """Open the signer ``config`` names; return (signer, created).

    ``create`` allows the file backend to make its key on first start. Hardware backends
    never create keys here: ``meshca admin root create`` does that deliberately.
    """
    from meshca.signers.file import FileSigner

    path = config.key_file or state_dir / "root-key.pem"
    if create:
        return FileSigner.load_or_create(path, config.key_type)
    return FileSigner.load(path), False
