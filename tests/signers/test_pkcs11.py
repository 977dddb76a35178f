"""The pkcs11 backend against SoftHSM2: keys made in the token, PINs, errors, outages.

What every Signer must do (signatures, certificates, threads) is also run against this
backend by tests/conformance. SoftHSM2 setup and why it is shared per process:
tests/fakes/softhsm.py. Skipped, with the reason, when SoftHSM2 is not installed.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass
from pkcs11.exceptions import AttributeSensitive, PKCS11Error
from pkcs11.util.ec import decode_ec_public_key

from meshca.errors import SignerError
from meshca.pki import profile
from meshca.pki.keys import KeyAlgorithm, PublicKey
from meshca.signers.base import Signer, as_private_key
from meshca.signers.pkcs11 import Pkcs11Signer, ReconnectPolicy
from tests.fakes.softhsm import (
    MAIN_TOKEN,
    OUTAGE_TOKEN,
    PIN_TOKEN,
    TOKENS,
    USER_PIN,
    SoftHsm,
    softhsm,
    unique_label,
)
from tests.pki.helpers import key, needs_openssl, openssl_verify

FAST_RECONNECT = ReconnectPolicy(initial_delay=0.02, max_delay=0.2)


@pytest.fixture
def hsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    return softhsm(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def main_signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pkcs11Signer]:
    """A signer kept open on MAIN_TOKEN: it keeps the process logged in to that token,
    which raw sessions opened by tests (SoftHsm.session) rely on to see private objects."""
    hsm = softhsm(tmp_path_factory.getbasetemp())
    with Pkcs11Signer.create(hsm.config(key_label=unique_label("main")), KeyAlgorithm.EC_P256) as s:
        yield s


def verify(public: PublicKey, algorithm: KeyAlgorithm, signature: bytes, data: bytes) -> None:
    digest = algorithm.hash_algorithm()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, data, ec.ECDSA(digest))
    else:
        public.verify(signature, data, padding.PKCS1v15(), digest)


def objects_labelled(hsm: SoftHsm, token: str, label: str) -> dict[ObjectClass, dict[str, object]]:
    """What an HSM admin would see: each object's class and its interesting attributes."""
    wanted = (
        Attribute.TOKEN,
        Attribute.PRIVATE,
        Attribute.SENSITIVE,
        Attribute.EXTRACTABLE,
        Attribute.ALWAYS_SENSITIVE,
        Attribute.NEVER_EXTRACTABLE,
        Attribute.SIGN,
        Attribute.DECRYPT,
        Attribute.UNWRAP,
        Attribute.DERIVE,
        Attribute.LOCAL,
        Attribute.VERIFY,
        Attribute.ENCRYPT,
        Attribute.ID,
    )
    found: dict[ObjectClass, dict[str, object]] = {}
    with hsm.session(token) as session:
        for obj in session.get_objects({Attribute.LABEL: label}):
            attrs: dict[str, object] = {}
            for attribute in wanted:
                try:
                    attrs[attribute.name] = obj[attribute]
                except PKCS11Error:  # not every attribute exists for every class
                    continue
            found[obj[Attribute.CLASS]] = attrs
    return found


# -- create and open -------------------------------------------------------------------


def test_create_then_open_by_label_finds_the_same_key(hsm: SoftHsm) -> None:
    config = hsm.config(key_label=unique_label("root"))
    with Pkcs11Signer.create(config, KeyAlgorithm.EC_P384) as created:
        with Pkcs11Signer.open(config) as opened:
            assert opened.key_id == created.key_id
            assert opened.algorithm is KeyAlgorithm.EC_P384
            assert opened.public_key() == created.public_key()
            assert opened.backend == "pkcs11"
            assert isinstance(opened, Signer)
            verify(created.public_key(), KeyAlgorithm.EC_P384, opened.sign(b"hello"), b"hello")


def test_open_by_token_serial_and_key_id(hsm: SoftHsm, main_signer: Pkcs11Signer) -> None:
    label = unique_label("by-serial")
    with Pkcs11Signer.create(hsm.config(key_label=label), KeyAlgorithm.EC_P256) as created:
        key_id = objects_labelled(hsm, MAIN_TOKEN, label)[ObjectClass.PRIVATE_KEY]["ID"]
        assert isinstance(key_id, bytes) and len(key_id) == 16  # random CKA_ID
        with hsm.session(MAIN_TOKEN) as session:
            serial = session.token.serial.decode()
        config = hsm.config(token=None, token_serial=serial, key_label=label, key_id=key_id.hex())
        with Pkcs11Signer.open(config) as opened:
            assert opened.public_key() == created.public_key()
        wrong = hsm.config(key_label=label, key_id="00" * 16)
        with pytest.raises(SignerError) as info:
            Pkcs11Signer.open(wrong)
        assert info.value.reason == "key_not_found"
        assert f"id {'00' * 16}" in info.value.message


def test_created_private_key_is_sensitive_and_never_extractable(
    hsm: SoftHsm, main_signer: Pkcs11Signer
) -> None:
    label = unique_label("attrs")
    with Pkcs11Signer.create(hsm.config(key_label=label), KeyAlgorithm.EC_P256):
        objects = objects_labelled(hsm, MAIN_TOKEN, label)
        private, public = objects[ObjectClass.PRIVATE_KEY], objects[ObjectClass.PUBLIC_KEY]
        assert private["SENSITIVE"] is True and private["ALWAYS_SENSITIVE"] is True
        assert private["EXTRACTABLE"] is False and private["NEVER_EXTRACTABLE"] is True
        assert private["PRIVATE"] is True and private["TOKEN"] is True
        assert private["LOCAL"] is True  # generated inside the token, never imported
        assert private["SIGN"] is True
        assert not private["DECRYPT"] and not private["UNWRAP"] and not private["DERIVE"]
        assert public["VERIFY"] is True and not public["ENCRYPT"]
        assert public["ID"] == private["ID"]
        with hsm.session(MAIN_TOKEN) as session:
            obj = session.get_key(ObjectClass.PRIVATE_KEY, label=label)
            with pytest.raises(AttributeSensitive):
                obj[Attribute.VALUE]


def test_create_refuses_a_label_in_use_and_keeps_the_old_key(hsm: SoftHsm) -> None:
    config = hsm.config(key_label=unique_label("taken"))
    with Pkcs11Signer.create(config, KeyAlgorithm.EC_P256) as first:
        with pytest.raises(SignerError) as info:
            Pkcs11Signer.create(config, KeyAlgorithm.RSA_2048)
        assert info.value.reason == "key_exists"
        assert config.key_label in info.value.message and "never replaces" in info.value.message
        with Pkcs11Signer.open(config) as again:
            assert again.public_key() == first.public_key()


def test_missing_key_names_the_admin_command(hsm: SoftHsm) -> None:
    with pytest.raises(SignerError) as info:
        Pkcs11Signer.open(hsm.config(key_label="no-such-key"))
    assert info.value.reason == "key_not_found"
    assert "'no-such-key'" in info.value.message and MAIN_TOKEN in info.value.message
    assert "meshca admin root create --signer pkcs11" in info.value.message


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm), ids=[a.value for a in KeyAlgorithm])
def test_every_algorithm_is_generated_in_the_token_and_signs(
    hsm: SoftHsm, algorithm: KeyAlgorithm
) -> None:
    signer = hsm.shared_signer(algorithm)
    assert signer.algorithm is algorithm
    assert KeyAlgorithm.of(signer.public_key()) is algorithm
    if algorithm.is_ec:
        assert isinstance(signer.public_key(), ec.EllipticCurvePublicKey)
    else:
        public = signer.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.public_numbers().e == 65537
    for data in (b"", b"x" * 1000, os.urandom(64)):
        verify(signer.public_key(), algorithm, signer.sign(data), data)


@needs_openssl
@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048])
def test_certificate_signed_in_the_hsm_verifies_with_openssl(
    hsm: SoftHsm, algorithm: KeyAlgorithm, tmp_path: Path
) -> None:
    signer = hsm.shared_signer(algorithm)
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshca hsm root {algorithm}")])
    ski = x509.SubjectKeyIdentifier.from_public_key(signer.public_key())
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(profile.new_serial())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(as_private_key(signer), signer.algorithm.hash_algorithm())
    )
    result = openssl_verify(tmp_path, root, root, purpose=None, extra=["-check_ss_sig"])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048])
def test_eight_threads_sign_fifty_times_each(hsm: SoftHsm, algorithm: KeyAlgorithm) -> None:
    signer = hsm.shared_signer(algorithm)
    messages = [os.urandom(32) for _ in range(8 * 50)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        signatures = list(pool.map(signer.sign, messages))
    for data, signature in zip(messages, signatures, strict=True):
        verify(signer.public_key(), algorithm, signature, data)


def test_key_id_is_an_rfc7512_uri(hsm: SoftHsm, main_signer: Pkcs11Signer) -> None:
    label = unique_label("CA root; v1/é")
    with Pkcs11Signer.create(hsm.config(key_label=label), KeyAlgorithm.EC_P256) as signer:
        uri = signer.key_id
        assert uri.startswith("pkcs11:")
        attributes = dict(part.split("=", 1) for part in uri.removeprefix("pkcs11:").split(";"))
        assert set(attributes) == {"token", "object", "id"}
        assert " " not in uri and "/" not in attributes["object"] and "é" not in uri
        assert unquote(attributes["token"]) == MAIN_TOKEN
        assert unquote(attributes["object"]) == label
        key_id = objects_labelled(hsm, MAIN_TOKEN, label)[ObjectClass.PRIVATE_KEY]["ID"]
        assert unquote(attributes["id"], encoding="latin-1").encode("latin-1") == key_id


# -- refusals --------------------------------------------------------------------------


def test_wrong_pin_is_refused_by_the_token(hsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHCA_TEST_WRONG_PIN", "not-the-pin-1234")
    config = hsm.config(token=PIN_TOKEN, pin_env="MESHCA_TEST_WRONG_PIN")
    with pytest.raises(SignerError) as info:
        Pkcs11Signer.open(config)
    assert info.value.reason == "pin_incorrect"
    assert "environment variable MESHCA_TEST_WRONG_PIN" in info.value.message
    assert "PinIncorrect" in info.value.message  # the token's own verdict
    assert "not-the-pin-1234" not in info.value.message


def test_a_second_signer_with_another_pin_is_refused(
    hsm: SoftHsm, main_signer: Pkcs11Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process is already logged in to the token; a wrong PIN must still not pass."""
    monkeypatch.setenv("MESHCA_TEST_WRONG_PIN", "another-pin-5678")
    with pytest.raises(SignerError) as info:
        Pkcs11Signer.open(hsm.config(pin_env="MESHCA_TEST_WRONG_PIN"))
    assert info.value.reason == "pin_incorrect"
    assert "another-pin-5678" not in info.value.message


def test_pin_from_an_owner_only_file(hsm: SoftHsm, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    label = unique_label("pinfile")
    config = hsm.config(token=PIN_TOKEN, key_label=label, pin_file=pin_file)
    with Pkcs11Signer.create(config, KeyAlgorithm.EC_P256) as signer:
        verify(signer.public_key(), signer.algorithm, signer.sign(b"x"), b"x")


@pytest.mark.parametrize("loose", [0o640, 0o644, 0o604])
def test_pin_file_readable_by_others_is_refused(hsm: SoftHsm, tmp_path: Path, loose: int) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN)
    pin_file.chmod(loose)
    with pytest.raises(SignerError) as info:
        Pkcs11Signer.open(hsm.config(pin_file=pin_file))
    assert info.value.reason == "pin_file_permissions"
    assert f"mode {loose:04o}" in info.value.message
    assert f"chmod 600 {pin_file}" in info.value.message
    assert USER_PIN not in info.value.message


def test_unset_pin_variable_is_named(hsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHCA_TEST_NO_PIN", raising=False)
    with pytest.raises(SignerError) as info:
        Pkcs11Signer.open(hsm.config(pin_env="MESHCA_TEST_NO_PIN"))
    assert info.value.reason == "pin_missing"
    assert "MESHCA_TEST_NO_PIN" in info.value.message


def test_missing_module_is_named(hsm: SoftHsm, tmp_path: Path) -> None:
    path = tmp_path / "vendor" / "libcryptoki.so"
    with pytest.raises(SignerError) as info:
        Pkcs11Signer.open(hsm.config(module=path))
    assert info.value.reason == "module_not_found"
    assert f"PKCS#11 module {path} does not exist" in info.value.message


def test_a_file_that_is_not_a_pkcs11_module_is_named(hsm: SoftHsm, tmp_path: Path) -> None:
    path = tmp_path / "not-a-library.so"
    path.write_bytes(b"\x7fELF but not really")
    with pytest.raises(SignerError) as info:
        Pkcs11Signer.open(hsm.config(module=path))
    assert info.value.reason == "module_load_failed"
    assert f"cannot load PKCS#11 module {path}" in info.value.message


def test_unknown_token_lists_the_tokens_present(hsm: SoftHsm) -> None:
    with pytest.raises(SignerError) as info:
        Pkcs11Signer.open(hsm.config(token="no-such-token"))
    assert info.value.reason == "token_not_found"
    assert "'no-such-token'" in info.value.message
    for label in TOKENS:
        assert f"'{label}'" in info.value.message


def test_a_key_type_meshca_does_not_accept_is_refused(
    hsm: SoftHsm, main_signer: Pkcs11Signer
) -> None:
    label = unique_label("rsa1024")
    with hsm.session(MAIN_TOKEN, rw=True) as session:
        session.generate_keypair(
            KeyType.RSA,
            1024,
            label=label,
            id=b"\x01\x02",
            store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
        )
    with pytest.raises(SignerError) as info:
        Pkcs11Signer.open(hsm.config(key_label=label))
    assert info.value.reason == "key_not_allowed"
    assert "RSA-1024" in info.value.message and "allowed: ECDSA P-256" in info.value.message


def test_a_public_key_object_of_another_key_is_refused(
    hsm: SoftHsm, main_signer: Pkcs11Signer
) -> None:
    """open() test-signs and verifies, so a mismatched pair never signs for the CA."""
    label = unique_label("mismatch")
    with Pkcs11Signer.create(hsm.config(key_label=label), KeyAlgorithm.EC_P256):
        pass
    other = (
        key(KeyAlgorithm.EC_P256, 1)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with hsm.session(MAIN_TOKEN, rw=True) as session:
        public = session.get_key(ObjectClass.PUBLIC_KEY, label=label)
        key_id = public[Attribute.ID]
        public.destroy()
        template = decode_ec_public_key(other)
        template.update({Attribute.LABEL: label, Attribute.ID: key_id, Attribute.TOKEN: True})
        session.create_object(template)
    with pytest.raises(SignerError) as info:
        Pkcs11Signer.open(hsm.config(key_label=label))
    assert info.value.reason == "key_mismatch"


# -- lifecycle -------------------------------------------------------------------------


def test_destroy_deletes_the_key_pair(hsm: SoftHsm, main_signer: Pkcs11Signer) -> None:
    config = hsm.config(key_label=unique_label("doomed"))
    signer = Pkcs11Signer.create(config, KeyAlgorithm.EC_P256)
    assert set(objects_labelled(hsm, MAIN_TOKEN, config.key_label)) == {
        ObjectClass.PRIVATE_KEY,
        ObjectClass.PUBLIC_KEY,
    }
    signer.destroy()
    assert objects_labelled(hsm, MAIN_TOKEN, config.key_label) == {}
    with pytest.raises(SignerError) as info:
        signer.sign(b"x")
    assert info.value.reason == "signer_closed"
    with pytest.raises(SignerError) as info:
        Pkcs11Signer.open(config)
    assert info.value.reason == "key_not_found"


def test_a_non_persistent_key_lives_only_as_long_as_its_signer(
    hsm: SoftHsm, main_signer: Pkcs11Signer
) -> None:
    label = unique_label("intermediate")
    signer = Pkcs11Signer.create(hsm.config(), KeyAlgorithm.EC_P256, label=label, persistent=False)
    assert objects_labelled(hsm, MAIN_TOKEN, label)[ObjectClass.PRIVATE_KEY]["TOKEN"] is False
    verify(signer.public_key(), signer.algorithm, signer.sign(b"x"), b"x")
    signer.destroy()
    assert objects_labelled(hsm, MAIN_TOKEN, label) == {}

    kept = Pkcs11Signer.create(hsm.config(), KeyAlgorithm.EC_P256, label=label, persistent=False)
    kept.close()
    assert objects_labelled(hsm, MAIN_TOKEN, label) == {}  # session objects end with it


def test_closing_one_signer_leaves_the_others_on_the_token_signing(
    hsm: SoftHsm, main_signer: Pkcs11Signer
) -> None:
    """Login is per process and token; the last signer out logs out, not the first."""
    with Pkcs11Signer.create(hsm.config(key_label=unique_label("short")), KeyAlgorithm.EC_P256):
        pass
    data = b"still logged in"
    verify(main_signer.public_key(), main_signer.algorithm, main_signer.sign(data), data)


def test_pin_never_appears_in_repr_errors_or_logs(
    hsm: SoftHsm, caplog: pytest.LogCaptureFixture, main_signer: Pkcs11Signer
) -> None:
    caplog.set_level(logging.DEBUG)
    messages = [repr(main_signer), str(main_signer), main_signer.key_id]
    with Pkcs11Signer.create(
        hsm.config(key_label=unique_label("quiet")), KeyAlgorithm.RSA_2048
    ) as s:
        messages += [repr(s), str(s)]
        s.sign(b"x")
    for bad in (hsm.config(token="nope"), hsm.config(key_label="nope")):
        with pytest.raises(SignerError) as info:
            Pkcs11Signer.open(bad)
        messages += [info.value.message, repr(info.value)]
    for text in [*messages, caplog.text]:
        assert USER_PIN not in text
    assert "PRIVATE KEY" not in repr(main_signer)


def test_reconnect_delays_grow_exponentially_with_jitter_up_to_the_cap() -> None:
    policy = ReconnectPolicy(initial_delay=0.5, max_delay=30.0)
    rng = random.Random(7)
    for failures, step in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (7, 30.0), (50, 30.0)]:
        delays = [policy.delay(failures, rng) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays)
        assert max(delays) - min(delays) > step / 4  # jittered, not all the same


# -- outages ---------------------------------------------------------------------------


def test_sign_fails_cleanly_while_the_hsm_is_gone_and_recovers_when_it_returns(
    hsm: SoftHsm,
) -> None:
    """The HSM goes away under a working signer, stays away, and comes back.

    Simulated with SoftHSM2 (SoftHsm.unplugged): ``C_Finalize`` invalidates every
    session handle, as when a network HSM's client library loses its connection, and the
    token's directory leaves the token dir, so re-initialising the module does not find
    the token. The signer must raise ``signer_unavailable`` (never crash, never return a
    bad signature), drop its sessions, retry with backoff, and once the directory is
    back, re-initialise the module, log in again, find the same key and sign.
    """
    label = unique_label("outage")
    config = hsm.config(token=OUTAGE_TOKEN, key_label=label)
    signer = Pkcs11Signer.create(config, KeyAlgorithm.EC_P256, reconnect=FAST_RECONNECT)
    public = signer.public_key()
    verify(public, signer.algorithm, signer.sign(b"before"), b"before")
    try:
        with hsm.unplugged(OUTAGE_TOKEN):
            for _ in range(3):
                with pytest.raises(SignerError) as info:
                    signer.sign(b"during")
                assert info.value.reason == "signer_unavailable"
                assert OUTAGE_TOKEN in info.value.message
                assert "reconnect attempt" in info.value.message
                time.sleep(0.05)
        signature = _sign_within(signer, b"after", seconds=10)
        verify(public, signer.algorithm, signature, b"after")
        assert signer.public_key() == public
        # Signers on other tokens came through the module being re-initialised.
        other = hsm.shared_signer(KeyAlgorithm.EC_P256)
        verify(other.public_key(), other.algorithm, other.sign(b"other"), b"other")
    finally:
        signer.close()


def test_signing_threads_ride_through_an_outage(hsm: SoftHsm) -> None:
    """Eight threads sign while the HSM goes away and comes back (as in the test above):
    each call returns a valid signature or raises signer_unavailable, and every thread
    signs again after the HSM is back."""
    config = hsm.config(token=OUTAGE_TOKEN, key_label=unique_label("busy"))
    signer = Pkcs11Signer.create(config, KeyAlgorithm.RSA_2048, reconnect=FAST_RECONNECT)
    stop = threading.Event()
    back = threading.Event()
    signed: list[tuple[bytes, bytes]] = []
    errors: list[str] = []
    recovered: set[int] = set()

    def worker(n: int) -> None:
        while not stop.is_set():
            data = os.urandom(16)
            try:
                signed.append((data, signer.sign(data)))
                if back.is_set():
                    recovered.add(n)
            except SignerError as exc:
                errors.append(exc.reason)
                time.sleep(0.005)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.1)
        with hsm.unplugged(OUTAGE_TOKEN):
            time.sleep(0.3)
        back.set()
        deadline = time.monotonic() + 10
        while len(recovered) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        signer.close()
    assert errors and set(errors) == {"signer_unavailable"}
    assert recovered == set(range(8))
    for data, signature in signed:
        verify(signer.public_key(), signer.algorithm, signature, data)


def test_a_module_reset_underneath_is_absorbed_without_an_error(hsm: SoftHsm) -> None:
    """C_Finalize with the token still there (a client library reconnecting at once):
    the failed call is retried on a fresh session and the caller never notices."""
    config = hsm.config(token=OUTAGE_TOKEN, key_label=unique_label("blip"))
    with Pkcs11Signer.create(config, KeyAlgorithm.EC_P256) as signer:
        with hsm.unplugged(OUTAGE_TOKEN):
            pass  # finalised, and the token is back before the next call
        verify(signer.public_key(), signer.algorithm, signer.sign(b"x"), b"x")


def test_a_non_persistent_key_lost_with_the_connection_is_reported_once_and_for_all(
    hsm: SoftHsm,
) -> None:
    """Session objects die with the module's sessions; such a key cannot come back, so the
    signer says ``key_lost`` (the CA replaces the intermediate) and stops reconnecting."""
    signer = Pkcs11Signer.create(
        hsm.config(token=OUTAGE_TOKEN),
        KeyAlgorithm.EC_P256,
        label=unique_label("ephemeral"),
        persistent=False,
        reconnect=FAST_RECONNECT,
    )
    try:
        with hsm.unplugged(OUTAGE_TOKEN):
            pass
        with pytest.raises(SignerError) as first:
            signer.sign(b"x")
        time.sleep(0.25)
        with pytest.raises(SignerError) as again:
            signer.sign(b"x")
    finally:
        signer.close()
    assert first.value.reason == again.value.reason == "key_lost"
    assert "stopped reconnecting" in again.value.message


def test_a_pin_changed_while_the_hsm_was_away_is_tried_once_not_at_every_backoff(
    hsm: SoftHsm,
) -> None:
    """A real HSM locks the user PIN after a few wrong tries, so a reconnect that meets
    CKR_PIN_INCORRECT stops reconnecting and keeps saying so, instead of trying the stale
    PIN at every backoff step."""
    new_pin = "changed-pin-2024"
    signer = Pkcs11Signer.create(
        hsm.config(token=PIN_TOKEN, key_label=unique_label("pinchange")),
        KeyAlgorithm.EC_P256,
        reconnect=FAST_RECONNECT,
    )
    try:
        with hsm.session(PIN_TOKEN, rw=True) as session:
            session.set_pin(USER_PIN, new_pin)
        with hsm.unplugged(PIN_TOKEN):
            pass  # the module is re-initialised: every login ends, the signer must log in
        with pytest.raises(SignerError) as first:
            signer.sign(b"x")
        time.sleep(0.25)  # longer than any reconnect delay of FAST_RECONNECT
        with pytest.raises(SignerError) as again:
            signer.sign(b"x")
    finally:
        signer.close()
        with hsm.session(PIN_TOKEN, rw=True, user_pin=new_pin) as session:
            session.set_pin(new_pin, USER_PIN)
    assert first.value.reason == again.value.reason == "pin_incorrect"
    assert "stopped reconnecting" in again.value.message
    assert "restart" in again.value.message
    for text in (first.value.message, again.value.message):
        assert new_pin not in text and USER_PIN not in text


def _sign_within(signer: Pkcs11Signer, data: bytes, *, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return signer.sign(data)
        except SignerError as exc:
            assert exc.reason == "signer_unavailable"
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
