"""The ``file`` signer backend: a CA key in a PEM file. For development roots only.

The key is an unencrypted PKCS#8 PEM file readable by its owner alone. It is created
with mode 0600 from the first byte (never written and then chmod-ed), published
atomically under its final name, and never overwritten. Loading refuses a file that the
group or others may read or write, or that another user owns (a ``root-key.pem`` planted
by ``nobody`` would make nobody the CA), and names the ``chmod`` or ``chown`` that fixes
it. Production roots belong in an HSM (``pkcs11``) or Cloud KMS (``gcpkms``), where the
key never reaches the CA's memory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from meshca.errors import SignerError
from meshca.pki.keys import KeyAlgorithm, PrivateKey, PublicKey, UnsupportedKeyError
from meshca.statedir import check_owner, make_private_dirs

if TYPE_CHECKING:
    from meshca.signers.base import Signer

MAX_KEY_FILE_BYTES = 64 * 1024
"""A PEM RSA-4096 key is about 3.3 KiB; anything far larger is not a key file."""


class FileSigner:
    """A :class:`~meshca.signers.base.Signer` whose key lives in a local PEM file."""

    backend: ClassVar[str] = "file"
    __slots__ = ("_algorithm", "_key", "_path", "_public")

    def __init__(self, path: Path, key: PrivateKey) -> None:
        """Wrap an already-loaded key; use :meth:`create`, :meth:`load` or
        :meth:`load_or_create` rather than calling this directly."""
        try:
            self._algorithm = KeyAlgorithm.of(key)
        except UnsupportedKeyError as exc:
            raise SignerError(f"key file {path}: {exc}", reason="key_not_allowed") from None
        self._path = path
        self._key = key
        self._public: PublicKey = key.public_key()

    def __repr__(self) -> str:
        return f"FileSigner(path={str(self._path)!r}, algorithm={self._algorithm.value!r})"

    @property
    def key_id(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def algorithm(self) -> KeyAlgorithm:
        return self._algorithm

    def public_key(self) -> PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        """DER ECDSA with the algorithm's digest, or RSASSA-PKCS1-v1_5 with SHA-256."""
        digest = self._algorithm.hash_algorithm()
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            return self._key.sign(data, ec.ECDSA(digest))
        return self._key.sign(data, padding.PKCS1v15(), digest)

    @classmethod
    def create(cls, path: Path, algorithm: KeyAlgorithm) -> FileSigner:
        """Generate a key and write it to ``path`` (mode 0600); refuse if ``path`` exists.

        The parent directory is created with mode 0700 (whatever the umask) if missing;
        an existing one is left as it is. The key is written to a temporary file in the
        same directory, flushed to disk, then hard-linked to ``path``: a concurrent
        creator or a crash never leaves a half-written key under the final name, and an
        existing key is never replaced.
        """
        path = Path(path)
        if os.path.lexists(path):
            raise _exists(path)
        key = algorithm.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            _write_new(path, pem)
        except FileExistsError:
            raise _exists(path) from None
        except OSError as exc:
            raise SignerError(
                f"cannot create key file {path}: {exc.strerror or exc}",
                reason="key_file_unwritable",
            ) from None
        return cls(path, key)

    @classmethod
    def load(cls, path: Path) -> FileSigner:
        """Load the key at ``path``, refusing loose permissions, non-keys and weak keys."""
        path = Path(path)
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang start-up; fstat refuses it.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise SignerError(
                f"key file {path} does not exist; check the signer's key_file setting",
                reason="key_file_missing",
            ) from None
        except OSError as exc:
            raise SignerError(
                f"cannot open key file {path}: {exc.strerror or exc}", reason="key_file_unreadable"
            ) from None
        try:
            data = _read_private_file(path, fd)
        except OSError as exc:
            raise SignerError(
                f"cannot read key file {path}: {exc.strerror or exc}", reason="key_file_unreadable"
            ) from None
        finally:
            os.close(fd)
        if len(data) > MAX_KEY_FILE_BYTES:
            raise SignerError(
                f"key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes; it is not a key",
                reason="key_file_invalid",
            )
        return cls(path, _parse_key(path, data))

    @classmethod
    def load_or_create(cls, path: Path, algorithm: KeyAlgorithm) -> tuple[FileSigner, bool]:
        """Load the key at ``path``, or create it; return ``(signer, created)``.

        Safe when several processes start at once: exactly one creates the key and the
        others load it. An existing key of another algorithm is refused rather than used
        against the configuration.
        """
        path = Path(path)
        if not path.exists():
            try:
                return cls.create(path, algorithm), True
            except SignerError as exc:
                if exc.reason != "key_file_exists":
                    raise
        signer = cls.load(path)
        if signer.algorithm is not algorithm:
            raise SignerError(
                f"key file {path} holds a {signer.algorithm} key but the configured key type "
                f"is {algorithm}; set signer.key_type to {signer.algorithm} or use another file",
                reason="key_algorithm_mismatch",
            )
        return signer, False


def _exists(path: Path) -> SignerError:
    return SignerError(
        f"key file {path} already exists; meshca never overwrites a key "
        "(move it away first if you really mean to replace it)",
        reason="key_file_exists",
    )


def _read_private_file(path: Path, fd: int) -> bytes:
    """Check the open file is a regular file that meshca's user owns and only it can
    access, then read it.

    The checks use ``fstat`` on the descriptor that is read, so the file cannot be
    swapped between the check and the read.
    """
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise SignerError(f"key file {path} is not a regular file", reason="key_file_invalid")
    check_owner(path, info, error=SignerError, what="key file", reason="key_file_owner")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise SignerError(
            f"key file {path} has mode {mode:04o}, so other users may read or change "
            f"the CA key; it must be 0600 or stricter: run 'chmod 600 {path}'",
            reason="key_file_permissions",
        )
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_KEY_FILE_BYTES:
        chunk = os.read(fd, MAX_KEY_FILE_BYTES + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _parse_key(path: Path, data: bytes) -> PrivateKey:
    # Messages never quote the file's content: it may be a key of some other kind.
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SignerError(
            f"key file {path} is encrypted; the file backend needs an unencrypted PKCS#8 "
            "PEM key (protect it with file permissions, or use an HSM or KMS backend)",
            reason="key_file_invalid",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise SignerError(
            f"key file {path} does not hold a PEM private key", reason="key_file_invalid"
        ) from None
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return key  # the curve or size is checked by FileSigner.__init__
    try:
        KeyAlgorithm.of(key)
        detail = f"key type {type(key).__name__} is not supported"
    except UnsupportedKeyError as exc:
        detail = str(exc)
    raise SignerError(f"key file {path}: {detail}", reason="key_not_allowed")


def _write_new(path: Path, content: bytes) -> None:
    """Create ``path`` with ``content`` and mode 0600, atomically; FileExistsError if it exists."""
    parent = path.parent
    make_private_dirs(parent)
    temp = parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temp, path)  # fails with FileExistsError rather than replacing a key
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    _fsync_dir(parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


if TYPE_CHECKING:
    _satisfies_protocol: type[Signer] = FileSigner
