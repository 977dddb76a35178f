"""deploy/vm stays in step with the agent: the sample config is a valid GCE agent
configuration whose paths are the ones the systemd unit makes writable, and the unit
is hardened and accepted by systemd-analyze."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from meshca.agent.config import load_agent_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "vm"
README = Path(__file__).resolve().parents[2] / "README.md"


def _unit() -> dict[str, list[str]]:
    """The [Service] section, every value of every key (systemd keys may repeat)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in (DEPLOY / "meshca-agent.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_the_sample_config_is_a_gce_agent_using_the_units_directories() -> None:
    settings = load_agent_settings(DEPLOY / "agent.yaml")
    unit = _unit()
    assert settings.credential == "gce"
    assert settings.effective_gce_audience == "spiffe://cluster.local"
    assert settings.mtls_address is not None and settings.ca_trust_bundle is not None
    runtime = Path("/run") / unit["RuntimeDirectory"][0]
    state = [Path("/var/lib") / d for d in unit["StateDirectory"][0].split()]
    assert settings.workload_api_socket is not None
    assert settings.workload_api_socket.parent == runtime
    assert settings.output_dir in state
    writable = unit["ReadWritePaths"][0].split()
    assert str(runtime) in writable and str(state[0]) in writable
    assert settings.socket_group in unit["SupplementaryGroups"]
    assert settings.socket_mode == 0o660
    assert settings.http_listen is not None and settings.http_listen.startswith("127.0.0.1:")
    assert unit["ExecStart"] == ["/opt/meshca/bin/meshca agent --config /etc/meshca/agent.yaml"]
    assert unit["ConfigurationDirectory"] == ["meshca"]


def test_the_unit_is_hardened() -> None:
    unit = _unit()
    assert unit["User"] == ["meshca-agent"] and unit["Group"] == ["meshca-agent"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
        "SystemCallFilter": "@system-service",
    }.items():
        assert unit[key] == [value], key
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    # ExecStart must exist for verify: point it at a binary that does, nothing else changes.
    text = (DEPLOY / "meshca-agent.service").read_text()
    unit = tmp_path / "meshca-agent.service"
    unit.write_text(text.replace("/opt/meshca/bin/meshca", shutil.which("true") or "/bin/true"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_walks_through_the_vm_set_up() -> None:
    text = README.read_text()
    section = text[text.index("## Run the agent on a VM") :]
    section = section[: section.index("\n## ", 3)]
    for step in (
        "useradd --system",
        "groupadd --system meshca-workload",
        "python3 -m venv /opt/meshca",
        "deploy/vm/agent.yaml /etc/meshca/agent.yaml",
        "deploy/vm/meshca-agent.service /etc/systemd/system/",
        "systemctl enable --now meshca-agent",
        "/etc/meshca/ca-root.pem",
    ):
        assert step in section, step
    config = configparser.ConfigParser()
    block = section[section.index("```ini") + 6 : section.index("```", section.index("```ini") + 6)]
    config.read_string(block)
    assert config["Path"]["PathChanged"] == "/var/lib/meshca-agent/certs"
