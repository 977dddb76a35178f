"""/readyz and the start-up log when the token issuers cannot be reached."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.api.conftest import CA, StartCA
from tests.fakes.kube import FakeKubeApi


async def _status_within(ca: CA, status: int, seconds: float) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        got, body = await ca.get("/readyz")
        if got == status:
            return body
        assert loop.time() < deadline, f"/readyz still {got} after {seconds}s: {body}"
        await asyncio.sleep(0.1)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture
async def tls_kube(tmp_path: Path) -> AsyncIterator[FakeKubeApi]:
    async with FakeKubeApi(tls_dir=tmp_path / "kube-tls") as api:
        yield api


async def test_an_issuer_whose_certificate_is_not_trusted_keeps_the_ca_unready(
    start_ca: StartCA, tls_kube: FakeKubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    """The issuer's CA file was left out: every token would be refused. The CA says so
    at WARNING at start-up, naming the issuer and the TLS failure, and is not ready."""
    caplog.set_level(logging.INFO)
    ca = await start_ca(k8s_oidc_issuer=tls_kube.issuer)
    body = await _status_within(ca, 503, 5)
    assert "issuers: no token issuer has answered yet" in body
    assert f"JWKS of {tls_kube.issuer}" in body and "CERTIFICATE_VERIFY_FAILED" in body
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not any("CERTIFICATE_VERIFY_FAILED" in w for w in _warnings(caplog)):
        assert loop.time() < deadline, f"no WARNING about the issuer: {_warnings(caplog)}"
        await asyncio.sleep(0.05)
    (warning,) = [w for w in _warnings(caplog) if "token issuer" in w]
    assert warning.startswith(
        f"token issuer cluster 'Kubernetes' (JWKS of {tls_kube.issuer}) is unreachable: "
    )


async def test_the_ca_file_makes_the_same_issuer_answer(
    start_ca: StartCA, tls_kube: FakeKubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    assert tls_kube.ca_file is not None
    ca = await start_ca(k8s_oidc_issuer=tls_kube.issuer, k8s_ca_file=tls_kube.ca_file)
    await _status_within(ca, 200, 5)
    assert not [w for w in _warnings(caplog) if "token issuer" in w]


async def test_ready_once_the_issuer_answers(
    start_ca: StartCA, kube: FakeKubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    kube.fail_jwks = 503
    ca = await start_ca()
    body = await _status_within(ca, 503, 5)
    assert "answered HTTP 503" in body
    kube.fail_jwks = None
    assert await _status_within(ca, 200, 10) == "ready\n"
    assert any(
        r.getMessage() == f"token issuer cluster 'Kubernetes' (JWKS of {kube.issuer}) answered"
        for r in caplog.records
    )


async def test_one_answering_issuer_is_enough_and_the_other_is_named(
    start_ca: StartCA, kube: FakeKubeApi, tls_kube: FakeKubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    ca = await start_ca(
        clusters=[
            {"mode": "jwt", "cluster_id": "east", "issuer": kube.issuer},
            {"mode": "tokenreview", "cluster_id": "west", "api_server": tls_kube.url},
        ]
    )
    await _status_within(ca, 200, 5)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not [w for w in _warnings(caplog) if "'west'" in w]:
        assert loop.time() < deadline, f"no WARNING about west: {_warnings(caplog)}"
        await asyncio.sleep(0.05)
    (warning,) = [w for w in _warnings(caplog) if "token issuer" in w]
    assert f"cluster 'west' (TokenReview at {tls_kube.url}) is unreachable" in warning
    assert "CERTIFICATE_VERIFY_FAILED" in warning


async def test_a_tokenreview_issuer_that_answers_makes_the_ca_ready(
    start_ca: StartCA, kube: FakeKubeApi, tmp_path: Path
) -> None:
    credentials = tmp_path / "reviewer-token"
    credentials.write_text("meshca-reviewer-token\n")
    ca = await start_ca(k8s_api_server=kube.url, k8s_credentials_file=credentials)
    await _status_within(ca, 200, 5)
    assert kube.tokenreview_calls >= 1  # the probe: a placeholder token, refused


async def test_refused_credentials_are_named(
    start_ca: StartCA, kube: FakeKubeApi, tmp_path: Path
) -> None:
    credentials = tmp_path / "reviewer-token"
    credentials.write_text("not-the-reviewer-token\n")
    ca = await start_ca(k8s_api_server=kube.url, k8s_credentials_file=credentials)
    body = await _status_within(ca, 503, 5)
    assert "HTTP 401: the API server refused meshca's own credentials" in body
