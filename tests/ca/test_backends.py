"""The CA on each key backend, chosen by config alone: roots created with
``meshca admin root create``, the server refusing to start without one, HSM-held issuing
keys, FIPS mode, and Cloud KMS never called per workload certificate."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from click.testing import CliRunner

from meshca.authn.base import Attestation, AuthMethod, Peer
from meshca.ca.authority import IssueRequest
from meshca.cli.main import main
from meshca.config import load_settings
from meshca.errors import ConfigError, SignerError
from meshca.pki.keys import KeyAlgorithm
from meshca.server import start_server
from meshca.signers.pkcs11 import Pkcs11Signer
from meshca.spiffe import TrustDomain
from tests.fakes.kms import FakeKms
from tests.fakes.softhsm import MAIN_TOKEN, PIN_ENV, SoftHsm, softhsm, unique_label
from tests.support import make_csr, verify_with_cryptography, verify_with_openssl

WEB = TrustDomain("cluster.local").workload("default", "web")
KEY_RING = "projects/meshca-test/locations/global/keyRings/ca"


@pytest.fixture
def hsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    return softhsm(tmp_path_factory.getbasetemp())


def _server_settings(tmp_path: Path, **overrides: Any) -> Any:
    return load_settings(
        state_dir=tmp_path / "state",
        grpc_listen="127.0.0.1:0",
        grpc_mtls_listen="off",
        http_listen="127.0.0.1:0",
        **overrides,
    )


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


async def _issue(server: Any, n: int = 1) -> list[tuple[str, ...]]:
    attestation = Attestation(spiffe_id=WEB, method=AuthMethod.K8S_JWT)
    chains = []
    for _ in range(n):
        issued = await server.authority.issue(
            IssueRequest(csr=make_csr(str(WEB))[1]), attestation, Peer("127.0.0.1:1")
        )
        chains.append(issued.chain_pem)
    return chains


def _pkcs11_flags(hsm: SoftHsm, label: str) -> list[str]:
    return [
        "--signer",
        "pkcs11",
        "--pkcs11-module",
        str(hsm.module),
        "--pkcs11-token-label",
        MAIN_TOKEN,
        "--pkcs11-key-label",
        label,
    ]


def _pkcs11_signer(hsm: SoftHsm, label: str) -> dict[str, Any]:
    return {
        "kind": "pkcs11",
        "module": str(hsm.module),
        "token_label": MAIN_TOKEN,
        "key_label": label,
        "pin_env": PIN_ENV,
    }


async def test_pkcs11_root_from_admin_cli_then_server(
    hsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    label = unique_label("root")
    state = str(tmp_path / "state")
    monkeypatch.setenv("MESHCA_PKCS11_PIN", os.environ[PIN_ENV])
    code, out = _cli(
        "admin",
        "root",
        "create",
        "--state-dir",
        state,
        *_pkcs11_flags(hsm, label),
        "--key-type",
        "ec-p384",
        "--ttl",
        "5y",
    )
    assert code == 0, out
    assert "created" in out and f"pkcs11:token={MAIN_TOKEN}" in out
    code, out = _cli("admin", "root", "list", "--state-dir", state)
    assert code == 0 and "pkcs11" in out and "ec-p384" in out and "active" in out

    server = await start_server(_server_settings(tmp_path, signer=_pkcs11_signer(hsm, label)))
    try:
        assert server.signer.backend == "pkcs11"
        (chain,) = await _issue(server)
        verify_with_cryptography(chain)
        assert "OK" in verify_with_openssl(chain, tmp_path)
    finally:
        await server.stop(grace=0)

    # A second root on top of an active one is a rotation: refused, saying why.
    code, out = _cli(
        "admin", "root", "create", "--state-dir", state, *_pkcs11_flags(hsm, unique_label("again"))
    )
    assert code == 1 and "an active root exists" in out


async def test_pkcs11_server_without_key_or_root_names_the_command(
    hsm: SoftHsm, tmp_path: Path
) -> None:
    with pytest.raises(SignerError, match="meshca admin root create --signer pkcs11"):
        await start_server(
            _server_settings(tmp_path, signer=_pkcs11_signer(hsm, unique_label("absent")))
        )
    label = unique_label("orphan")
    Pkcs11Signer.create(hsm.config(key_label=label), KeyAlgorithm.EC_P256).close()
    with pytest.raises(ConfigError, match="meshca admin root create --signer pkcs11"):
        await start_server(_server_settings(tmp_path, signer=_pkcs11_signer(hsm, label)))


async def test_issuing_key_in_the_hsm(
    hsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    label = unique_label("root")
    monkeypatch.setenv("MESHCA_PKCS11_PIN", os.environ[PIN_ENV])
    code, out = _cli(
        "admin",
        "root",
        "create",
        "--state-dir",
        str(tmp_path / "state"),
        *_pkcs11_flags(hsm, label),
    )
    assert code == 0, out
    server = await start_server(
        _server_settings(tmp_path, signer=_pkcs11_signer(hsm, label), issuing_key="hsm")
    )
    try:
        issuing = server.authority.current_issuing_ca
        assert issuing is not None and isinstance(issuing.key, Pkcs11Signer)
        assert _issuing_keys(hsm), "the issuing key should be a token object while serving"
        chains = await asyncio.gather(*(_issue(server) for _ in range(10)))
        for (chain,) in chains:
            verify_with_cryptography(chain)
    finally:
        await server.stop(grace=0)
    assert _issuing_keys(hsm) == [], "the issuing key outlived the server"


def _issuing_keys(hsm: SoftHsm) -> list[str]:
    """Labels of this process's issuing keys in the token (session objects included)."""
    prefix = f"meshca-issuing-{socket.gethostname()}-{os.getpid()}-"
    with hsm.session(MAIN_TOKEN) as session:
        labels = [
            str(o[pkcs11.Attribute.LABEL])
            for o in session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY})
        ]
    return [label for label in labels if label.startswith(prefix)]


def test_fips_mode_refuses_software_keys(hsm: SoftHsm) -> None:
    with pytest.raises(ConfigError, match="fips mode refuses the 'file' signer"):
        load_settings(fips=True)
    signer = _pkcs11_signer(hsm, "x")
    with pytest.raises(ConfigError, match="fips mode needs issuing_key 'hsm'"):
        load_settings(fips=True, signer=signer)
    assert load_settings(fips=True, signer=signer, issuing_key="hsm").fips
    with pytest.raises(ConfigError, match="issuing_key 'hsm' needs a pkcs11 signer"):
        load_settings(issuing_key="hsm")


async def test_kms_root_is_called_only_for_intermediates(tmp_path: Path) -> None:
    with FakeKms() as kms:
        kms.add_key_ring(KEY_RING)
        state = str(tmp_path / "state")
        code, out = _cli(
            "admin",
            "root",
            "create",
            "--state-dir",
            state,
            "--signer",
            "gcpkms",
            "--kms-crypto-key",
            f"{KEY_RING}/cryptoKeys/root",
            "--kms-endpoint",
            kms.endpoint,
            "--kms-insecure-endpoint",
            "--kms-protection-level",
            "software",
        )
        assert code == 0, out
        version = f"{KEY_RING}/cryptoKeys/root/cryptoKeyVersions/1"
        assert f"signer.key_version={version}" in out
        signs_for_root = kms.calls["AsymmetricSign"]

        server = await start_server(
            _server_settings(
                tmp_path,
                signer={
                    "kind": "gcpkms",
                    "key_version": version,
                    "endpoint": kms.endpoint,
                    "insecure_endpoint": True,
                },
            )
        )
        try:
            chains = await _issue(server, 1000)
            verify_with_cryptography(chains[0])
            verify_with_cryptography(chains[-1])
        finally:
            await server.stop(grace=0)
        # One signature for this process's intermediate; none per workload certificate
        # (nor for the server's own TLS certificate, which the intermediate signs).
        assert kms.calls["AsymmetricSign"] - signs_for_root == 1
