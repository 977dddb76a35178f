"""Start-up failures of the same kind end the same way: one line saying what to do, and
the exit code ``meshca server --help`` documents (2: fix something first)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import run_meshca
from tests.fakes.softhsm import PIN_ENV, PIN_TOKEN, USER_PIN, softhsm

pytestmark = pytest.mark.e2e


def _pkcs11_env(pin: str) -> dict[str, str]:
    hsm = softhsm()
    return {
        "MESHCA_SIGNER__KIND": "pkcs11",
        "MESHCA_SIGNER__MODULE": str(hsm.module),
        "MESHCA_SIGNER__TOKEN_LABEL": PIN_TOKEN,
        "MESHCA_SIGNER__PIN_ENV": PIN_ENV,
        PIN_ENV: pin,
    }


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_wrong_pin_and_no_root_both_exit_2_naming_the_next_step(
    tmp_path: Path, workers: str
) -> None:
    args = [
        "server",
        "--workers",
        workers,
        "--state-dir",
        str(tmp_path),
        "--grpc-listen",
        "127.0.0.1:0",
        "--grpc-mtls-listen",
        "off",
        "--http-listen",
        "127.0.0.1:0",
    ]
    env = _pkcs11_env("not-the-pin")
    code, _, err = await run_meshca(*args, env=env)
    assert code == 2, err
    assert f"the user PIN from environment variable {PIN_ENV} was refused" in err
    assert f"put the token's user PIN in environment variable {PIN_ENV}" in err
    assert "Traceback" not in err

    env = _pkcs11_env(USER_PIN)
    code, _, err = await run_meshca(*args, env=env)
    assert code == 2, err
    assert "meshca admin root create" in err
    assert "Traceback" not in err


async def test_help_says_how_to_choose_the_signer_and_what_exit_codes_mean() -> None:
    code, out, _ = await run_meshca("server", "--help")
    assert code == 0
    for text in (
        "signer:",
        "MESHCA_SIGNER__KIND",
        "kind: pkcs11",
        "kind: gcpkms",
        "MESHCA_PKCS11_PIN",
        "issuing_key",
        "Exit codes:",
        "130",
    ):
        assert text in out, text
