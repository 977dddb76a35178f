"""``meshca agent`` on the command line: help, bad input, settings precedence, and the
agent as a real subprocess against a CA running in the test."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from click.testing import CliRunner

from meshca.agent.config import load_agent_settings
from meshca.agent.run import start_agent
from meshca.cli.main import main
from tests.agent.conftest import StartCA, settings_for, write_token

FLAGS = (
    "config",
    "ca-address",
    "ca-trust-bundle",
    "ca-bundle-url",
    "ca-bundle-sha256",
    "ca-plaintext",
    "ca-server-name",
    "mtls-address",
    "cluster-id",
    "trust-domain",
    "credential",
    "token-file",
    "svid-cert-file",
    "svid-key-file",
    "ttl",
    "renew-ratio",
    "renew-jitter",
    "key-type",
    "request-timeout",
    "backoff-initial",
    "backoff-max",
    "bundle-refresh-interval",
    "workload-api-socket",
    "sds-socket",
    "output-dir",
    "reload-command",
    "reload-signal",
    "reload-pid-file",
    "socket-mode",
    "socket-owner",
    "socket-group",
    "http-listen",
    "log-level",
)


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner(env={k: None for k in os.environ if k.startswith("MESHCA_")}).invoke(
        main, ["agent", *args], terminal_width=200
    )
    return result.exit_code, result.stdout, result.stderr


def test_help_lists_every_flag_with_its_environment_variable() -> None:
    code, out, _ = _run("--help")
    assert code == 0
    for flag in FLAGS:
        assert f"--{flag} " in out, flag
        assert f"MESHCA_AGENT_{flag.upper().replace('-', '_')}" in out, flag
    assert "90s" in out and "SIGHUP" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--bogus"], "No such option '--bogus'"),
        (["--ttl", "5parsecs"], "invalid duration '5parsecs'"),
        (["--renew-ratio", "2"], "'--renew-ratio'"),
        (["--credential", "aws"], "'aws' is not one of"),
        (["--ca-address", "ca:15012"], "set exactly one of ca_trust_bundle"),
        (["--ca-address", "ca", "--ca-plaintext"], "ca_address 'ca' must be HOST:PORT"),
        (
            ["--ca-address", "ca:1", "--ca-plaintext", "--mtls-address", "ca:2"],
            "mtls_address needs TLS",
        ),
        (
            ["--ca-address", "ca:1", "--ca-bundle-url", "http://ca:15014/v1/bundle"],
            "ca_bundle_url needs ca_bundle_sha256",
        ),
        (["--ca-address", "ca:1", "--ca-plaintext", "--socket-mode", "999"], "octal mode"),
        (
            ["--ca-address", "ca:1", "--ca-plaintext", "--reload-command", "nginx -s reload"],
            "set output_dir",
        ),
        (["--ca-plaintext"], "ca_address: required (set --ca-address or MESHCA_AGENT_CA_ADDRESS)"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args: list[str], expected: str) -> None:
    code, out, err = _run(*args)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("meshca: error: ") and expected in lines[0], lines[0]


async def test_gce_credential_starts_with_the_metadata_server_source() -> None:
    settings = load_agent_settings(
        ca_address="ca:1",
        ca_plaintext=True,
        credential="gce",
        gce_metadata_url="http://127.0.0.1:9",  # nothing there: the first fetch fails fast
    )
    agent = await start_agent(settings)
    try:
        assert agent.client.credential.description == (
            "GCE identity token (audience spiffe://cluster.local)"
        )
    finally:
        await agent.stop()


def test_flags_override_environment_override_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        "ca_address: file:1\nca_plaintext: true\nttl: 2h\nrenew_ratio: 0.6\n"
        "socket_mode: 0640\nworkload_api_socket: /run/wl.sock\n"
    )
    monkeypatch.setenv("MESHCA_AGENT_TTL", "30m")
    monkeypatch.setenv("MESHCA_AGENT_RENEW_RATIO", "0.7")
    settings = load_agent_settings(config, renew_ratio=0.4)
    assert settings.ca_address == "file:1"  # from the file
    assert settings.ttl.total_seconds() == 1800  # the environment beats the file
    assert settings.renew_ratio == 0.4  # a flag beats both
    assert settings.socket_mode == 0o640

    toml = tmp_path / "agent.toml"
    toml.write_text('ca_address = "t:1"\nca_plaintext = true\nsocket_mode = "0600"\n')
    assert load_agent_settings(toml).socket_mode == 0o600


# -- the agent as a subprocess ----------------------------------------------------------

READY = re.compile(r"meshca agent ready: (?P<id>\S+) valid until .* HTTP on [^ ]+:(?P<port>\d+)")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="agent-"))  # short: sun_path holds 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _metrics(port: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        return await resp.text()


@pytest.mark.e2e
async def test_agent_process_becomes_ready_serves_metrics_and_stops_on_sigterm(
    start_ca: StartCA, tmp_path: Path, sock_dir: Path
) -> None:
    ca = await start_ca()
    settings_for(ca, tmp_path)  # writes the root and the token
    token = write_token(tmp_path / "token", ca.kube)
    config = tmp_path / "agent.yaml"
    config.write_text(f"ca_address: {ca.address}\nttl: 10m\n")
    socket_path = sock_dir / "workload.sock"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")},
        "MESHCA_AGENT_CA_SERVER_NAME": "localhost",
        "MESHCA_AGENT_TOKEN_FILE": str(token),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshca",
        "agent",
        "--config",
        str(config),
        "--ca-trust-bundle",
        str(tmp_path / "ca-root.pem"),
        "--workload-api-socket",
        str(socket_path),
        "--http-listen",
        "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        async with asyncio.timeout(30):
            line = (await process.stdout.readline()).decode()
        match = READY.search(line)
        if match is None:
            process.kill()
            err = (await process.stderr.read()).decode()
            raise AssertionError(f"agent did not become ready: {line!r}\n{err}")
        assert match["id"] == "spiffe://cluster.local/ns/default/sa/web"
        assert "Workload API" in line and str(socket_path) in line
        port = int(match["port"])
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/readyz") as resp,
        ):
            assert resp.status == 200
        text = await _metrics(port)
        assert 'meshca_agent_renewals_total{via="token"} 1.0' in text
        assert "meshca_agent_certificate_expiry_seconds 5" in text  # ~600 s left
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600

        process.send_signal(signal.SIGHUP)  # renew now
        async with asyncio.timeout(10):
            while 'meshca_agent_renewals_total{via="token"} 2.0' not in text:
                await asyncio.sleep(0.1)
                text = await _metrics(port)

        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            code = await process.wait()
        assert code == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_the_sidecar_example_is_a_valid_agent_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sidecar example's manifest stays in step with the settings it sets."""
    example = Path(__file__).parents[2] / "deploy" / "kubernetes" / "overlays" / "sidecar-example"
    manifest = example / "agent-sidecar.yaml"
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    pod = next(d for d in docs if d["kind"] == "Pod")
    agent = next(c for c in pod["spec"]["containers"] if c["name"] == "meshca-agent")
    for item in agent["env"]:
        monkeypatch.setenv(item["name"], item["value"])
    settings = load_agent_settings()
    assert settings.sds_socket is not None and settings.workload_api_socket is not None
    assert settings.mtls_address and settings.socket_mode == 0o600
    token = next(v for v in pod["spec"]["volumes"] if v["name"] == "istio-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "istio-ca"
    hardened = agent["securityContext"]
    assert hardened["readOnlyRootFilesystem"] and hardened["capabilities"]["drop"] == ["ALL"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"]
