"""The agent's GCE credential: a fresh identity token from the metadata server for every
request, errors that say what the metadata server answered, and the settings and flags
that turn it on."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner

from meshca.agent.config import load_agent_settings
from meshca.agent.credential_sources import (
    CredentialError,
    GceIdentityToken,
    GceMetadataServer,
    credential_source,
)
from meshca.agent.run import build_client
from meshca.cli.main import main
from meshca.errors import ConfigError
from tests.fakes.gce import _FORBIDDEN_HTML, FakeGoogleCerts, FakeMetadataServer, GceVm

AUDIENCE = "spiffe://cluster.local"


@pytest.fixture
async def metadata() -> AsyncIterator[FakeMetadataServer]:
    async with FakeGoogleCerts() as google, FakeMetadataServer(google, GceVm()) as server:
        yield server


async def _refused(fetcher: GceMetadataServer, audience: str = AUDIENCE) -> CredentialError:
    with pytest.raises(CredentialError) as info:
        await fetcher.identity_token(audience)
    return info.value


async def test_each_call_asks_the_metadata_server_for_a_fresh_full_token(
    metadata: FakeMetadataServer,
) -> None:
    source = credential_source(
        "gce", Path("/unused"), gce_metadata_url=metadata.url, gce_audience=AUDIENCE
    )
    assert isinstance(source, GceIdentityToken)
    assert source.description == f"GCE identity token (audience {AUDIENCE})"
    first, second = await source.token(), await source.token()
    assert first != second
    assert metadata.identity_requests == 2 and metadata.tokens == [first, second]
    assert metadata.last_query == {"audience": AUDIENCE, "format": "full"}
    claims = jwt.decode(second, options={"verify_signature": False})
    assert claims["aud"] == AUDIENCE
    assert claims["google"]["compute_engine"]["instance_name"] == "web-1"


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, "backend broke\nsecond line", "HTTP 500: backend broke"),
        (403, _FORBIDDEN_HTML.format(path="/x"), "HTTP 403: Error 403 (Forbidden)!!1"),
        (400, "non-empty audience parameter required\n", "check --gce-audience"),
        (503, "", "HTTP 503: (empty body)"),
    ],
)
async def test_a_refusal_names_the_status_and_the_first_line(
    metadata: FakeMetadataServer, status: int, body: str, expected: str
) -> None:
    metadata.switches.fail_status = status
    metadata.switches.fail_body = body
    error = await _refused(GceMetadataServer(metadata.url))
    assert error.reason == "gce_metadata_refused"
    assert "the GCE metadata server refused the identity token request" in error.message
    assert expected in error.message
    assert "second line" not in error.message


async def test_a_vm_without_a_service_account_is_told_so(metadata: FakeMetadataServer) -> None:
    metadata.vm = metadata.vm.but(service_account=None)
    error = await _refused(GceMetadataServer(metadata.url))
    assert "HTTP 404" in error.message and "does the VM have a service account?" in error.message


async def test_a_slow_metadata_server_times_out(metadata: FakeMetadataServer) -> None:
    metadata.switches.delay = 2.0
    fetcher = GceMetadataServer(metadata.url, timeout=timedelta(milliseconds=200))
    error = await _refused(fetcher)
    assert error.reason == "gce_metadata_unavailable"
    assert f"the GCE metadata server at {metadata.url} did not answer within 0.2s" in error.message


async def test_no_metadata_server_at_all() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = await _refused(GceMetadataServer(f"http://127.0.0.1:{port}/"))
    assert error.reason == "gce_metadata_unavailable"
    assert (
        f"cannot reach the GCE metadata server at http://127.0.0.1:{port} (is this a GCE VM?)"
        in error.message
    )


async def test_an_answer_without_metadata_flavor_is_not_trusted(
    metadata: FakeMetadataServer,
) -> None:
    metadata.switches.omit_flavor = True
    error = await _refused(GceMetadataServer(metadata.url))
    assert error.reason == "gce_metadata_invalid"
    assert "without the 'Metadata-Flavor: Google' header" in error.message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("<html>captive portal</html>\n", "answered 200 without a JWT: captive portal"),
        ("x" * 70_000, "more than 65536 bytes"),
    ],
)
async def test_an_answer_that_is_not_a_token_is_refused(
    metadata: FakeMetadataServer, body: str, expected: str
) -> None:
    metadata.switches.body = body
    error = await _refused(GceMetadataServer(metadata.url))
    assert error.reason == "gce_metadata_invalid"
    assert expected in error.message


# -- settings and flags -------------------------------------------------------------------


def _settings(**overrides: Any) -> Any:
    return load_agent_settings(ca_address="ca:1", ca_plaintext=True, credential="gce", **overrides)


def test_the_audience_defaults_to_the_trust_domain_as_the_ca_does() -> None:
    assert _settings().effective_gce_audience == "spiffe://cluster.local"
    assert _settings(trust_domain="example.org").effective_gce_audience == "spiffe://example.org"
    assert _settings(gce_audience="meshca").effective_gce_audience == "meshca"
    assert _settings().gce_metadata_url == "http://metadata.google.internal"
    assert _settings(gce_metadata_url="http://169.254.169.254/").gce_metadata_url == (
        "http://169.254.169.254"
    )


def test_the_client_is_built_with_the_gce_source() -> None:
    client = build_client(_settings(gce_metadata_url="http://127.0.0.1:9", gce_audience="aud"))
    assert client.credential.description == "GCE identity token (audience aud)"


def test_a_bad_metadata_url_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="gce_metadata_url 'metadata' must be an http"):
        _settings(gce_metadata_url="metadata")
    with pytest.raises(ConfigError, match="credential 'gce' needs an audience"):
        credential_source("gce", Path("/unused"), gce_audience="")


def test_agent_help_lists_the_gce_flags() -> None:
    env = {k: None for k in os.environ if k.startswith("MESHCA_")}
    result = CliRunner(env=env).invoke(main, ["agent", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag in ("gce-metadata-url", "gce-audience"):
        assert f"--{flag} " in result.stdout
        assert f"MESHCA_AGENT_{flag.upper().replace('-', '_')}" in result.stdout
    assert "not in this build" not in result.stdout
