"""Settings: file + environment + flags, durations, and refusals that name the field."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from meshca.cli.main import main
from meshca.config import JwtCluster, Settings, TokenReviewCluster, load_settings
from meshca.durations import format_duration, parse_duration
from meshca.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("24h", 86400),
        ("10y", 3650 * 86400),
        ("1h30m", 5400),
        ("250ms", 0.25),
        ("3600", 3600),
    ],
)
def test_durations_are_written_the_same_way_everywhere(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "h", "1x", "-5s", "1h 2m", "ten minutes"])
def test_bad_durations_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="such as '90s'"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**12))
def test_format_then_parse_is_identity_to_the_millisecond(millis: int) -> None:
    value = timedelta(milliseconds=millis)
    assert parse_duration(format_duration(value)) == value


def test_settings_survive_the_trip_to_a_worker_process() -> None:
    """Workers get the settings as JSON; nothing may be rounded on the way."""
    settings = load_settings(grpc_handshake_timeout="500ms", max_ttl="90s", default_ttl="1s500ms")
    again = type(settings).model_validate_json(settings.model_dump_json())
    assert again == settings
    assert again.grpc_handshake_timeout == timedelta(milliseconds=500)


def test_defaults_are_secure_and_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.plaintext is False
    assert settings.max_ttl == timedelta(hours=24)
    assert settings.default_ttl == timedelta(hours=1)
    assert settings.intermediate_ttl == timedelta(hours=48)
    assert settings.token_audience == ["istio-ca"]
    assert settings.effective_database_url.startswith("sqlite:///")


def test_file_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "meshca.yaml"
    config.write_text(
        "trust_domain: from-file.example\nmax_ttl: 12h\ndefault_ttl: 30m\n"
        "clusters:\n  - mode: tokenreview\n    cluster_id: east\n"
        "    api_server: https://kube.example:6443\n"
    )
    monkeypatch.setenv("MESHCA_MAX_TTL", "6h")
    settings = load_settings(config, default_ttl="10m")
    assert settings.trust_domain == "from-file.example"
    assert settings.max_ttl == timedelta(hours=6)
    assert settings.default_ttl == timedelta(minutes=10)
    (cluster,) = settings.effective_clusters
    assert isinstance(cluster, TokenReviewCluster)
    assert cluster.cluster_id == "east"
    assert cluster.audiences == ["istio-ca"]


def test_toml_config(tmp_path: Path) -> None:
    config = tmp_path / "meshca.toml"
    config.write_text('trust_domain = "toml.example"\n[signer]\nkey_type = "ec-p384"\n')
    settings = load_settings(config)
    assert settings.trust_domain == "toml.example"
    assert settings.signer.key_type == "ec-p384"


def test_shorthand_flags_make_one_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHCA_TOKEN_AUDIENCE", "istio-ca,meshca")
    settings = load_settings(k8s_oidc_issuer="https://issuer.example")
    (cluster,) = settings.effective_clusters
    assert isinstance(cluster, JwtCluster)
    assert cluster.issuer == "https://issuer.example"
    assert cluster.audiences == ["istio-ca", "meshca"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"trust_domain": "Bad_Domain"}, "trust_domain"),
        ({"max_ttl": "forever"}, "max_ttl"),
        ({"max_ttl": "1h", "default_ttl": "2h"}, "default_ttl 2h exceeds max_ttl 1h"),
        ({"max_ttl": "30h"}, "certificates would be cut short"),
        ({"k8s_api_server": "https://a", "k8s_oidc_issuer": "https://b"}, "choose one"),
        ({"k8s_jwks_url": "https://a/jwks"}, "needs k8s_oidc_issuer"),
        ({"default_cluster": "nope"}, "default_cluster 'nope'"),
        ({"unknown_option": 1}, "unknown_option"),
        ({"grpc_handshake_timeout": "0s"}, "grpc_handshake_timeout"),
        ({"grpc_max_connection_age": "0s"}, "grpc_max_connection_age"),
        ({"intermediate_name_constraints": True}, "cannot be combined with SVID renewal"),
    ],
)
def test_invalid_settings_are_refused_naming_the_field(
    overrides: dict[str, object], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    assert needle in info.value.message


def test_missing_or_unknown_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.yaml")
    odd = tmp_path / "meshca.ini"
    odd.write_text("x")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.toml"):
        load_settings(odd)


def _config_problem(tmp_path: Path, text: str, name: str = "meshca.yaml") -> str:
    config = tmp_path / name
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, state_dir=tmp_path / "state")
    return info.value.message


def test_mistyped_keys_get_a_did_you_mean_at_every_level(tmp_path: Path) -> None:
    message = _config_problem(
        tmp_path,
        "trust_domian: example.org\n"
        "signer:\n  kind: pkcs11\n  modul: /usr/lib/softhsm/libsofthsm2.so\n  token_label: t\n"
        "clusters:\n  - mode: jwt\n    issuer: https://issuer.example\n    audiance: [a]\n"
        "gce_projects: [meshca-vms]\n"
        "gce_rules:\n  - project: meshca-vms\n    spiffe_id: /vm/web\n    zon: europe-west1-b\n",
    )
    assert "Extra inputs are not permitted" not in message
    for problem in (
        "trust_domian: unknown setting; did you mean 'trust_domain'?",
        "signer.pkcs11.modul: unknown setting; did you mean 'module'?",
        "clusters.0.jwt.audiance: unknown setting; did you mean 'audiences'?",
        "gce_rules.0.zon: unknown setting; did you mean 'zone'?",
    ):
        assert problem in message


def test_unknown_key_with_no_close_match_lists_what_is_allowed(tmp_path: Path) -> None:
    message = _config_problem(tmp_path, "signer:\n  kind: file\n  colour: blue\n")
    assert message == (
        "invalid configuration: signer.file.colour: unknown setting; "
        "allowed: kind, key_file, key_type"
    )


def test_unknown_key_in_toml_gets_a_did_you_mean(tmp_path: Path) -> None:
    message = _config_problem(tmp_path, '[signer]\nkey_typ = "ec-p384"\n', "meshca.toml")
    assert "signer.file.key_typ: unknown setting; did you mean 'key_type'?" in message


def test_yaml_syntax_error_is_one_line_with_its_place(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("trust_domain: example.org\nclusters: [\n  - mode: : jwt\n")
    result = CliRunner(env={k: None for k in os.environ if k.startswith("MESHCA_")}).invoke(
        main, ["server", "--config", str(config), "--state-dir", str(tmp_path / "state")]
    )
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"meshca: error: config file {config}: YAML syntax error at line 3, column 3: "
        "expected the node content, but found '-'"
    ]
    assert "Traceback" not in result.output


def test_toml_syntax_error_names_the_file_and_place(tmp_path: Path) -> None:
    message = _config_problem(tmp_path, 'trust_domain = "a\n', "meshca.toml")
    assert message.startswith(f"config file {tmp_path / 'meshca.toml'}: TOML syntax error: ")
    assert "line 1" in message


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"- trust_domain: a\n", "the top level is a list; it must be a mapping of settings"),
        (b"trust_domain\n", "the top level is a string; it must be a mapping of settings"),
        (b"trust_domain: caf\xe9.example\n", "not UTF-8 text (byte 0xe9 at offset 17)"),
    ],
)
def test_yaml_that_is_not_a_mapping_of_settings_says_so(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    config = tmp_path / "meshca.yaml"
    config.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_settings(config, state_dir=tmp_path / "state")
    assert info.value.message.startswith(f"config file {config}: {problem}")


@pytest.mark.parametrize("section", ["bundle_configmap", "node_agents"])
def test_an_api_server_must_be_an_http_url(section: str) -> None:
    def settings_with(url: str) -> Settings:
        if section == "bundle_configmap":
            return load_settings(bundle_configmap={"api_server": url})
        return load_settings(node_agents={"api_server": url})

    with pytest.raises(ConfigError, match=r"api_server 'ftp://k8s' must be an http\(s\) URL"):
        settings_with("ftp://k8s")
    settings = settings_with("https://k8s:6443/")
    assert getattr(settings, section).api_server == "https://k8s:6443"
