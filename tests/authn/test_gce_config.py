"""GCE settings: flags and config keys, defaults, and rules checked at start with errors
that name the bad rule; Hypothesis properties of the template and token parsers."""

from __future__ import annotations

import asyncio
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshca.authn._gce_rules import PLACEHOLDERS, IdentityTemplate
from meshca.authn.base import Credential, Peer
from meshca.authn.gce import GceAuthenticator, _instance, is_google_token
from meshca.cli.main import main
from meshca.config import GOOGLE_CERTS_URL, GceConfig, GceRule, load_settings
from meshca.errors import AuthenticationError, ConfigError
from meshca.spiffe import SpiffeId, TrustDomain
from tests.conftest import TRUST_DOMAIN

WEB_RULE = {"project": "meshca-vms", "instance_name": "web-*", "spiffe_id": "/ns/vms/sa/web"}


def _load(**overrides: Any) -> Any:
    return load_settings(state_dir=Path("/nonexistent"), **overrides)


def test_gce_is_off_without_projects_and_defaults_fill_in_when_on() -> None:
    assert _load().gce is None
    gce = _load(gce_projects=["meshca-vms"], gce_rules=[WEB_RULE]).gce
    assert gce is not None
    assert gce.audience == "spiffe://cluster.local"
    assert gce.certs_url == GOOGLE_CERTS_URL == "https://www.googleapis.com/oauth2/v3/certs"
    assert gce.leeway.total_seconds() == 30
    other = _load(
        trust_domain="example.org",
        gce_projects=["meshca-vms"],
        gce_rules=[WEB_RULE],
        gce_audience="meshca",
    ).gce
    assert other is not None and other.audience == "meshca"
    assert _load(
        trust_domain="example.org", gce_projects=["meshca-vms"], gce_rules=[WEB_RULE]
    ).gce == GceConfig(
        projects=["meshca-vms"], audience="spiffe://example.org", rules=[GceRule(**WEB_RULE)]
    )


def test_projects_from_the_environment_and_rules_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "meshca.yaml"
    config.write_text(
        "gce_rules:\n"
        "  - project: meshca-vms\n    instance_name: 'web-*'\n    spiffe_id: /ns/vms/sa/web\n"
        "  - project: meshca-ops\n    zone: 'us-*'\n"
        "    service_account: Ops@Meshca-Ops.iam.gserviceaccount.com\n"
        "    spiffe_id: 'spiffe://{trust_domain}/ops/{instance_name}'\n"
    )
    monkeypatch.setenv("MESHCA_GCE_PROJECTS", "meshca-vms, meshca-ops")
    gce = load_settings(config).gce
    assert gce is not None
    assert gce.projects == ["meshca-vms", "meshca-ops"]
    assert gce.rules[1].service_account == "ops@meshca-ops.iam.gserviceaccount.com"
    assert gce.rules[1].zone == "us-*" and gce.rules[0].zone == "*"


def test_server_help_lists_the_gce_flags() -> None:
    env = {k: None for k in os.environ if k.startswith("MESHCA_")}
    result = CliRunner(env=env).invoke(main, ["server", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag, variable in (
        ("--gce-project", "MESHCA_GCE_PROJECTS"),
        ("--gce-audience", "MESHCA_GCE_AUDIENCE"),
        ("--gce-certs-url", "MESHCA_GCE_CERTS_URL"),
    ):
        assert f"{flag} " in result.stdout and variable in result.stdout
    assert "spiffe://<trust-domain>" in result.stdout


def test_a_bad_configuration_is_one_line_naming_the_rule(tmp_path: Path) -> None:
    config = tmp_path / "meshca.yaml"
    config.write_text(
        "gce_rules:\n  - {project: meshca-vms, spiffe_id: /a}\n"
        "  - {project: meshca-ops, spiffe_id: /b}\n"
    )
    env = {k: None for k in os.environ if k.startswith("MESHCA_")}
    result = CliRunner(env=env).invoke(
        main, ["server", "--config", str(config), "--gce-project", "meshca-vms"]
    )
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "gce_rules[1] (project 'meshca-ops'" in result.stderr
    assert "not in gce_projects" in result.stderr


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"gce_rules": [{**WEB_RULE, "spiffe_id": "/ns/{ns}/sa/{sa}"}]},
            "gce_rules.0.spiffe_id: spiffe_id '/ns/{ns}/sa/{sa}' has the "
            "placeholder {ns}; allowed: {trust_domain}, {project_id}",
        ),
        (
            {"gce_rules": [{**WEB_RULE, "spiffe_id": "/x/{project_id.__class__}"}]},
            "placeholder {project_id.__class__}",
        ),
        ({"gce_rules": [{**WEB_RULE, "spiffe_id": "/x/{zone!r}"}]}, "placeholder {zone!r}"),
        ({"gce_rules": [{**WEB_RULE, "spiffe_id": "/x/{zone:>9}"}]}, "placeholder {zone:>9}"),
        ({"gce_rules": [{**WEB_RULE, "spiffe_id": "/x/{"}]}, "is not a valid template"),
        ({"gce_rules": [{**WEB_RULE, "spiffe_id": "web"}]}, "must be a path in the trust"),
        (
            {"gce_rules": [WEB_RULE, {**WEB_RULE, "spiffe_id": "spiffe://evil.example/x"}]},
            "gce_rules[1] (project 'meshca-vms', zone '*', instance_name 'web-*'): spiffe_id "
            "'spiffe://evil.example/x' is outside trust domain cluster.local",
        ),
        (
            {"gce_rules": [{**WEB_RULE, "spiffe_id": "spiffe://{trust_domain}"}]},
            "has no path",
        ),
        (
            {"gce_rules": [{**WEB_RULE, "spiffe_id": "/a//b"}]},
            "does not make a SPIFFE ID: path '/a//b' has an empty segment",
        ),
        (
            {"gce_rules": [{**WEB_RULE, "spiffe_id": "/a/{zone}x y"}]},
            "does not make a SPIFFE ID",
        ),
        ({"gce_rules": [{**WEB_RULE, "zone": "us central"}]}, "gce_rules.0.zone: zone"),
        ({"gce_rules": [{**WEB_RULE, "instance_name": ""}]}, "instance_name '' must be a glob"),
        (
            {"gce_rules": [{**WEB_RULE, "service_account": "web"}]},
            "service_account 'web' must be an email",
        ),
        ({"gce_rules": [{**WEB_RULE, "colour": "blue"}]}, "gce_rules.0.colour: unknown setting"),
        ({"gce_rules": [{"project": "meshca-vms"}]}, "gce_rules.0.spiffe_id: Field required"),
        ({"gce_projects": ["My_Project"]}, "'My_Project' is not a GCE project id"),
        ({"gce_projects": []}, "gce_rules are set but gce_projects is empty"),
        ({"gce_rules": []}, "gce_projects is set but there are no gce_rules"),
        ({"gce_certs_url": "ftp://x"}, "gce_certs_url 'ftp://x' must be an http(s) URL"),
    ],
)
def test_bad_gce_settings_are_refused_at_start(overrides: dict[str, Any], expected: str) -> None:
    options: dict[str, Any] = {"gce_projects": ["meshca-vms"], "gce_rules": [WEB_RULE]}
    options.update(overrides)
    with pytest.raises(ConfigError) as info:
        _load(**options)
    assert expected in info.value.message


def test_the_authenticator_checks_its_rules_too() -> None:
    config = GceConfig(
        projects=["meshca-vms"],
        audience="spiffe://cluster.local",
        rules=[GceRule(project="meshca-ops", spiffe_id="/x")],
    )

    class NoLedger:
        def record_token_use(self, token_sha256: str, method: str, expires_at: datetime) -> bool:
            raise AssertionError("not reached")

        def purge_used_tokens(self, now: datetime) -> int:
            raise AssertionError("not reached")

    with pytest.raises(ConfigError, match=r"gce_rules\[0\] \(project 'meshca-ops'"):
        GceAuthenticator(TRUST_DOMAIN, config, NoLedger())


# -- properties ---------------------------------------------------------------------------

_PLACEHOLDER = st.sampled_from(PLACEHOLDERS).map(lambda p: "{" + p + "}")
_LITERAL = st.text(alphabet="abc-_./{}", max_size=6)
_TEMPLATES = st.lists(st.one_of(_PLACEHOLDER, _LITERAL), max_size=6).map(
    lambda parts: "/" + "".join(parts)
)


@given(text=st.one_of(st.text(max_size=60), _TEMPLATES))
def test_a_template_either_parses_or_says_why(text: str) -> None:
    try:
        IdentityTemplate.parse(text)
    except ValueError as exc:
        assert str(exc)


@given(
    template=_TEMPLATES,
    values=st.fixed_dictionaries({p: st.text(max_size=12) for p in PLACEHOLDERS[1:]}),
)
def test_a_claim_value_never_adds_a_path_segment(template: str, values: dict[str, str]) -> None:
    try:
        parsed = IdentityTemplate.parse(template)
        sample = parsed.render(TRUST_DOMAIN, dict.fromkeys(PLACEHOLDERS[1:], "v"))
    except ValueError:
        return
    try:
        rendered = parsed.render(TRUST_DOMAIN, values)
    except ValueError:
        return
    assert isinstance(rendered, SpiffeId) and rendered.member_of(TRUST_DOMAIN)
    assert rendered.path.count("/") == sample.path.count("/")


_B64 = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/.", max_size=80
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(token=st.one_of(st.text(max_size=200), _B64, st.binary(max_size=100).map(bytes.hex)))
def test_any_bearer_text_is_refused_with_a_reason(token: str) -> None:
    assert isinstance(is_google_token(token), bool)
    config = GceConfig(
        projects=["meshca-vms"],
        audience="spiffe://cluster.local",
        rules=[GceRule(project="meshca-vms", spiffe_id="/x")],
        certs_url="http://127.0.0.1:9/certs",  # nothing listens: keys are never had
        timeout="1s",
    )

    class Ledger:
        def record_token_use(self, token_sha256: str, method: str, expires_at: datetime) -> bool:
            raise AssertionError("no token may get this far")

        def purge_used_tokens(self, now: datetime) -> int:
            return 0

    async def attempt() -> None:
        auth = GceAuthenticator(TrustDomain("cluster.local"), config, Ledger())
        try:
            with pytest.raises(AuthenticationError) as info:
                await auth.authenticate(Credential(bearer_token=token), Peer("10.0.0.1:1"))
            assert info.value.reason and info.value.message
        finally:
            await auth.close()

    asyncio.run(attempt())


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=6)
    ),
    max_leaves=20,
)
_ENGINE_KEYS = st.sampled_from(
    [
        "project_id",
        "project_number",
        "zone",
        "instance_id",
        "instance_name",
        "instance_creation_timestamp",
    ]
)


@given(
    engine=st.dictionaries(_ENGINE_KEYS, _JSON, max_size=6),
    email=_JSON,
    verified=_JSON,
)
def test_any_google_claim_gives_an_instance_or_a_reason(
    engine: dict[str, Any], email: Any, verified: Any
) -> None:
    claims = {"google": {"compute_engine": engine}, "email": email, "email_verified": verified}
    try:
        vm = _instance(claims)
    except AuthenticationError as exc:
        assert exc.reason in ("missing_google_claims", "invalid_google_claims")
        return
    assert vm.project_id == engine["project_id"]
    assert vm.service_account is None or verified is True


@pytest.mark.parametrize(
    "given",
    [("meshca-vms,meshca-ops",), ("meshca-vms meshca-ops",), ("meshca-vms", "meshca-ops")],
)
def test_projects_as_the_server_command_passes_them(given: tuple[str, ...]) -> None:
    """Click hands over MESHCA_GCE_PROJECTS (or repeated flags) as a tuple of strings."""
    settings = _load(gce_projects=given, gce_rules=[WEB_RULE])
    assert settings.gce_projects == ["meshca-vms", "meshca-ops"]
