"""The file backend: how the key file is created, protected and refused.

What every Signer must do (signatures, certificates, threads) is in tests/conformance.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meshca.errors import SignerError
from meshca.pki.keys import KeyAlgorithm
from meshca.signers.base import Signer
from meshca.signers.file import FileSigner
from meshca.store import Store
from tests.pki.helpers import key

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_key(path: Path, private: object, *, file_mode: int = 0o600, fmt: str = "pkcs8") -> Path:
    private_format = (
        serialization.PrivateFormat.PKCS8
        if fmt == "pkcs8"
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    data = private.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, private_format, serialization.NoEncryption()
    )
    path.write_bytes(data)
    path.chmod(file_mode)
    return path


@pytest.fixture(scope="module")
def created(tmp_path_factory: pytest.TempPathFactory) -> dict[KeyAlgorithm, FileSigner]:
    """One created key file per algorithm (RSA-4096 generation is slow: do it once)."""
    base = tmp_path_factory.mktemp("file-signer")
    return {alg: FileSigner.create(base / alg.value / "root-key.pem", alg) for alg in KeyAlgorithm}


# -- create ----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_create_writes_an_owner_only_pkcs8_key(
    created: dict[KeyAlgorithm, FileSigner], algorithm: KeyAlgorithm
) -> None:
    signer = created[algorithm]
    path = Path(signer.key_id)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700  # created by FileSigner
    text = path.read_bytes()
    assert text.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    assert signer.algorithm is algorithm
    assert signer.backend == "file"
    assert isinstance(signer, Signer)


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_created_key_loads_back_identical(
    created: dict[KeyAlgorithm, FileSigner], algorithm: KeyAlgorithm
) -> None:
    signer = created[algorithm]
    loaded = FileSigner.load(Path(signer.key_id))
    assert loaded.algorithm is algorithm
    assert loaded.public_key() == signer.public_key()
    assert loaded.key_id == signer.key_id


def test_create_is_0600_from_the_first_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is opened with 0600 (no window where a loose umask leaves it readable)."""
    seen: list[int] = []
    real_open = os.open

    def spy(path: object, flags: int, file_mode: int = 0o777, *args: object, **kw: object) -> int:
        if flags & os.O_CREAT:
            seen.append(file_mode)
        return real_open(path, flags, file_mode, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)
    old_umask = os.umask(0)
    try:
        FileSigner.create(tmp_path / "k.pem", KeyAlgorithm.EC_P256)
    finally:
        os.umask(old_umask)
    assert seen == [0o600]
    assert mode(tmp_path / "k.pem") == 0o600


def test_create_leaves_an_existing_parent_directory_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    FileSigner.create(tmp_path / "k.pem", KeyAlgorithm.EC_P256)
    assert mode(tmp_path) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]  # no temporary files left


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    original = FileSigner.create(path, KeyAlgorithm.EC_P256)
    before = path.read_bytes()
    with pytest.raises(SignerError) as info:
        FileSigner.create(path, KeyAlgorithm.EC_P384)
    assert info.value.reason == "key_file_exists"
    assert str(path) in info.value.message
    assert path.read_bytes() == before
    assert FileSigner.load(path).public_key() == original.public_key()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]


def test_create_makes_a_missing_parent_0700_under_a_strict_umask(tmp_path: Path) -> None:
    """umask 0277 once left the key's new directory 0500: not writable, not 0700."""
    old_umask = os.umask(0o277)
    try:
        FileSigner.create(tmp_path / "keys" / "k.pem", KeyAlgorithm.EC_P256)
    finally:
        os.umask(old_umask)
    assert mode(tmp_path / "keys") == 0o700


# -- load ------------------------------------------------------------------------------


@pytest.mark.parametrize("loose", [0o640, 0o644, 0o604, 0o620, 0o602, 0o660, 0o666])
def test_load_refuses_group_or_world_access(tmp_path: Path, loose: int) -> None:
    path = write_key(tmp_path / "k.pem", key(KeyAlgorithm.EC_P256), file_mode=loose)
    with pytest.raises(SignerError) as info:
        FileSigner.load(path)
    assert info.value.reason == "key_file_permissions"
    assert f"mode {loose:04o}" in info.value.message
    assert f"chmod 600 {path}" in info.value.message


@pytest.mark.parametrize("tight", [0o600, 0o400])
def test_load_accepts_owner_only_modes(tmp_path: Path, tight: int) -> None:
    path = write_key(tmp_path / "k.pem", key(KeyAlgorithm.EC_P256), file_mode=tight)
    assert FileSigner.load(path).algorithm is KeyAlgorithm.EC_P256


def test_load_names_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "root-key.pem"
    with pytest.raises(SignerError) as info:
        FileSigner.load(path)
    assert info.value.reason == "key_file_missing"
    assert f"key file {path} does not exist" in info.value.message


def test_load_accepts_a_traditional_openssl_key(tmp_path: Path) -> None:
    path = write_key(tmp_path / "k.pem", key(KeyAlgorithm.EC_P384), fmt="traditional")
    assert path.read_bytes().startswith(b"-----BEGIN EC PRIVATE KEY-----")
    assert FileSigner.load(path).algorithm is KeyAlgorithm.EC_P384


@pytest.mark.parametrize(
    "content",
    [b"", b"hello\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
    ids=["empty", "text", "bad-pem"],
)
def test_load_refuses_a_file_that_is_not_a_key(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(SignerError) as info:
        FileSigner.load(path)
    assert info.value.reason == "key_file_invalid"
    assert "does not hold a PEM private key" in info.value.message


def test_load_refuses_a_public_key_and_never_quotes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    public = (
        key(KeyAlgorithm.EC_P256)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    path.write_bytes(public)
    path.chmod(0o600)
    with pytest.raises(SignerError) as info:
        FileSigner.load(path)
    assert info.value.reason == "key_file_invalid"
    assert "BEGIN" not in info.value.message


def test_load_refuses_an_encrypted_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(
        key(KeyAlgorithm.EC_P256).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    path.chmod(0o600)
    with pytest.raises(SignerError, match="is encrypted") as info:
        FileSigner.load(path)
    assert info.value.reason == "key_file_invalid"


def test_load_refuses_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(SignerError) as info:
        FileSigner.load(tmp_path / "dir")
    assert info.value.reason in ("key_file_invalid", "key_file_unreadable")


def test_load_refuses_a_fifo_without_hanging(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    os.mkfifo(path, 0o600)
    with pytest.raises(SignerError, match="not a regular file") as info:
        FileSigner.load(path)
    assert info.value.reason == "key_file_invalid"


@pytest.mark.parametrize(
    ("private", "described"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), "RSA-1024"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1"),
        (lambda: ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
    ],
    ids=["rsa-1024", "p521", "ed25519"],
)
def test_load_refuses_key_types_not_allowed(
    tmp_path: Path, private: object, described: str
) -> None:
    path = write_key(tmp_path / "k.pem", private())  # type: ignore[operator]
    with pytest.raises(SignerError) as info:
        FileSigner.load(path)
    assert info.value.reason == "key_not_allowed"
    assert described in info.value.message
    assert "allowed: ECDSA P-256" in info.value.message


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a file to nobody (chown) needs root")
def test_load_refuses_a_key_owned_by_another_user(tmp_path: Path) -> None:
    path = write_key(tmp_path / "k.pem", key(KeyAlgorithm.EC_P256), file_mode=0o600)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(SignerError) as info:
        FileSigner.load(path)
    assert info.value.reason == "key_file_owner"
    assert f"key file {path} is owned by uid {NOBODY} (nobody), not by uid 0 (root)" in (
        info.value.message
    )
    assert f"run 'chown root {path}' as root; otherwise remove it" in info.value.message


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a file to nobody (chown) needs root")
def test_a_start_refuses_a_root_key_planted_by_another_user(tmp_path: Path) -> None:
    """A root-key.pem owned by nobody in the state directory was adopted as the root."""
    from meshca.config import load_settings
    from meshca.server import prepare_state

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    planted = write_key(state / "root-key.pem", key(KeyAlgorithm.EC_P256), file_mode=0o600)
    os.chown(planted, NOBODY, NOBODY)
    settings = load_settings(state_dir=state)
    with pytest.raises(SignerError) as info:
        prepare_state(settings)
    assert info.value.reason == "key_file_owner"
    assert f"key file {planted} is owned by uid {NOBODY} (nobody)" in info.value.message
    store = Store(settings.effective_database_url)
    try:
        assert store.list_roots() == []  # no root was made from the planted key
    finally:
        store.close()


# -- load_or_create --------------------------------------------------------------------


def test_load_or_create_creates_once_then_loads(tmp_path: Path) -> None:
    path = tmp_path / "state" / "root-key.pem"
    first, created = FileSigner.load_or_create(path, KeyAlgorithm.EC_P256)
    assert created
    second, created_again = FileSigner.load_or_create(path, KeyAlgorithm.EC_P256)
    assert not created_again
    assert second.public_key() == first.public_key()


def test_load_or_create_refuses_a_key_of_another_algorithm(tmp_path: Path) -> None:
    path = tmp_path / "root-key.pem"
    FileSigner.create(path, KeyAlgorithm.EC_P384)
    with pytest.raises(SignerError) as info:
        FileSigner.load_or_create(path, KeyAlgorithm.EC_P256)
    assert info.value.reason == "key_algorithm_mismatch"
    assert "ec-p384" in info.value.message


def test_load_or_create_still_refuses_loose_permissions(tmp_path: Path) -> None:
    path = write_key(tmp_path / "k.pem", key(KeyAlgorithm.EC_P256), file_mode=0o644)
    with pytest.raises(SignerError, match="chmod 600"):
        FileSigner.load_or_create(path, KeyAlgorithm.EC_P256)


def test_concurrent_first_start_creates_exactly_one_key(tmp_path: Path) -> None:
    """Several worker processes starting at once: one creates, the rest load that key."""
    path = tmp_path / "root-key.pem"
    barrier = threading.Barrier(8)
    results: list[tuple[FileSigner, bool]] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            results.append(FileSigner.load_or_create(path, KeyAlgorithm.EC_P256))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert sum(created for _, created in results) == 1
    assert (
        len(
            {
                s.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                for s, _ in results
            }
        )
        == 1
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root-key.pem"]


# -- secrecy ---------------------------------------------------------------------------


def test_repr_names_the_file_and_never_the_key(created: dict[KeyAlgorithm, FileSigner]) -> None:
    signer = created[KeyAlgorithm.EC_P256]
    text = repr(signer) + str(signer)
    assert signer.key_id in text
    assert "ec-p256" in text
    body = Path(signer.key_id).read_text().splitlines()[1]
    assert body not in text
    assert "PRIVATE" not in text
    assert not hasattr(signer, "__dict__")  # slotted: no vars() dump of the key
