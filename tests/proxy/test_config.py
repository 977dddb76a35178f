"""Route flags and the ``meshca proxy`` command line: bad input is refused, saying why."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshca.errors import ConfigError
from meshca.proxy.config import Inbound, Outbound, ProxyConfig


def test_routes_parse_with_the_http_flag_and_several_expected_ids() -> None:
    inbound = Inbound.parse("0.0.0.0:8443=127.0.0.1:8080,http")
    assert (inbound.listen, inbound.app, inbound.http) == (
        "0.0.0.0:8443",
        ("127.0.0.1", 8080),
        True,
    )
    out = Outbound.parse("127.0.0.1:9001=[::1]:8443,spiffe://td/ns/a/sa/*,spiffe://td/ns/b/sa/x")
    assert out.remote == ("::1", 8443) and not out.http
    assert [str(p) for p in out.expected] == ["spiffe://td/ns/a/sa/*", "spiffe://td/ns/b/sa/x"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1:8443", "must be LISTEN=APP_ADDR[,http]"),
        ("127.0.0.1:8443=app", "--inbound application address 'app' must be HOST:PORT"),
        ("8443=127.0.0.1:80", "--inbound listen address '8443' must be HOST:PORT"),
        ("127.0.0.1:1=127.0.0.1:2,127.0.0.1:3", "must be LISTEN=APP_ADDR[,http]"),
    ],
)
def test_bad_inbound_routes(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Inbound.parse(text)
    assert message in info.value.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1:9001=10.0.0.7:8443", "EXPECTED_SPIFFE_ID"),
        ("127.0.0.1:9001=10.0.0.7:8443,web", "is not a SPIFFE ID pattern"),
        ("127.0.0.1:9001=10.0.0.7,spiffe://td/a", "remote address '10.0.0.7' must be HOST:PORT"),
    ],
)
def test_bad_outbound_routes(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Outbound.parse(text)
    assert message in info.value.message


def test_a_config_needs_a_route_and_a_known_tls_version() -> None:
    with pytest.raises(ConfigError, match="give at least one --inbound or --outbound"):
        ProxyConfig()
    with pytest.raises(ConfigError, match=r"TLS minimum version is '1.1'; allowed: 1.2, 1.3"):
        ProxyConfig(inbound=(Inbound.parse("127.0.0.1:1=127.0.0.1:2"),), tls_min_version="1.1")


def test_meshca_proxy_refuses_to_start_without_credentials(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshca", "proxy", "--inbound", "127.0.0.1:0=127.0.0.1:8080"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--workload-api-socket is required" in result.stderr


def test_meshca_proxy_names_an_unreadable_policy(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshca",
            "proxy",
            "--workload-api-socket",
            str(tmp_path / "agent.sock"),
            "--inbound",
            "127.0.0.1:0=127.0.0.1:8080",
            "--policy",
            str(tmp_path / "missing.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert f"cannot read the policy {tmp_path / 'missing.yaml'}" in result.stderr


def test_agent_settings_turn_on_the_in_process_proxy(tmp_path: Path) -> None:
    from meshca.agent.config import load_agent_settings

    base = {"ca_address": "ca:15012", "ca_trust_bundle": tmp_path / "root.pem"}
    settings = load_agent_settings(
        **base,
        inbound=("127.0.0.1:8443=127.0.0.1:8080,http",),
        outbound=("127.0.0.1:9001=10.0.0.7:8443,spiffe://cluster.local/ns/a/sa/b",),
        proxy_access_log=str(tmp_path / "access.log"),
    )
    config = settings.proxy_config
    assert config is not None
    assert config.inbound[0].http and config.outbound[0].remote == ("10.0.0.7", 8443)
    assert config.access_log == tmp_path / "access.log"
    assert load_agent_settings(**base).proxy_config is None
    with pytest.raises(ConfigError, match=re.escape("--inbound '127.0.0.1:8443' must be LISTEN=")):
        load_agent_settings(**base, inbound=("127.0.0.1:8443",))


@pytest.mark.parametrize("listen", ["0.0.0.0:9001", "10.0.0.5:9001", "[::]:9001", "app:9001"])
def test_an_outbound_listener_off_loopback_is_refused(listen: str) -> None:
    """Whatever reaches an outbound listener calls out with the workload's identity."""
    with pytest.raises(ConfigError, match="is not a loopback address") as info:
        Outbound.parse(f"{listen}=10.0.0.7:8443,spiffe://td/ns/a/sa/b")
    assert "with this workload's identity" in info.value.message


@pytest.mark.parametrize("listen", ["127.0.0.1:9001", "127.0.0.2:0", "[::1]:9001", "localhost:1"])
def test_an_outbound_listener_on_loopback_is_accepted(listen: str) -> None:
    assert Outbound.parse(f"{listen}=10.0.0.7:8443,spiffe://td/ns/a/sa/b").listen == listen
