"""The HSM user PIN: read once, from the environment or an owner-only file, never shown."""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path

from meshca.config import Pkcs11SignerConfig
from meshca.errors import SignerError

MAX_PIN_FILE_BYTES = 4096


class Pin:
    """The user PIN: kept only to log in again, never shown (repr names its source only)."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def same_as(self, other: Pin) -> bool:
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __repr__(self) -> str:
        return f"Pin(from {self.source})"


def read_pin(config: Pkcs11SignerConfig) -> Pin:
    """The user PIN from ``pin_file`` (if set) or the ``pin_env`` environment variable."""
    if config.pin_file is not None:
        return _pin_from_file(Path(config.pin_file))
    name = config.pin_env or "MESHCA_PKCS11_PIN"
    value = os.environ.get(name, "")
    if not value:
        raise SignerError(
            f"environment variable {name} is not set or empty; it must hold the token's "
            "user PIN (or set signer.pin_file)",
            reason="pin_missing",
        )
    return Pin(value, f"environment variable {name}")


def _pin_from_file(path: Path) -> Pin:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SignerError(f"PIN file {path} does not exist", reason="pin_missing") from None
    except OSError as exc:
        raise SignerError(
            f"cannot open PIN file {path}: {exc.strerror or exc}", reason="pin_file_unreadable"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SignerError(
                f"PIN file {path} is not a regular file", reason="pin_file_unreadable"
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise SignerError(
                f"PIN file {path} has mode {mode:04o}, so other users may read or change the "
                f"HSM PIN; it must be 0600 or stricter: run 'chmod 600 {path}'",
                reason="pin_file_permissions",
            )
        data = os.read(fd, MAX_PIN_FILE_BYTES + 1)
    except OSError as exc:
        raise SignerError(
            f"cannot read PIN file {path}: {exc.strerror or exc}", reason="pin_file_unreadable"
        ) from None
    finally:
        os.close(fd)
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        value = ""
    if not value or len(data) > MAX_PIN_FILE_BYTES:
        raise SignerError(
            f"PIN file {path} must hold the PIN as one line of UTF-8 text",
            reason="pin_file_unreadable",
        )
    return Pin(value, f"PIN file {path}")
