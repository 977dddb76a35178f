"""Typed settings for the CA server and admin commands.

Sources combine in the usual order, later winning: built-in defaults, the config file
(YAML or TOML, ``--config``), ``MESHCA_*`` environment variables (nested fields with
``__``, e.g. ``MESHCA_SIGNER__KEY_TYPE``), then command-line flags. Every backend kind is
a tagged union (``mode`` for Kubernetes clusters, ``kind`` for signers), validated here
once, so the rest of meshca reads a checked, defaulted config.
"""

from __future__ import annotations

import os
import re
import tomllib
from datetime import timedelta
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from meshca.config_problems import describe, not_utf8, settings_mapping, syntax_error
from meshca.durations import Duration, format_duration
from meshca.errors import ConfigError, SpiffeIdError
from meshca.pki.keys import KeyAlgorithm
from meshca.spiffe import SpiffeId, TrustDomain


def _api_server_url(value: str) -> str:
    if not value.startswith(("https://", "http://")):
        raise ValueError(f"api_server {value!r} must be an http(s) URL")
    return value.rstrip("/")


ApiServerUrl = Annotated[str, AfterValidator(_api_server_url)]
"""A Kubernetes API server's URL, without a trailing slash."""

DEFAULT_AUDIENCE = "istio-ca"
DEFAULT_CLUSTER_ID = "Kubernetes"
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v3/certs"
"""Google's OAuth2 signing keys as a JWK Set (the v1 endpoint serves the same keys as
PEM certificates, which PyJWT's key classes do not read)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenReviewCluster(_Strict):
    """Validate tokens by asking the cluster's API server (TokenReview v1)."""

    mode: Literal["tokenreview"] = "tokenreview"
    cluster_id: str = DEFAULT_CLUSTER_ID
    api_server: str
    ca_file: Path | None = None
    """PEM bundle to verify the API server's TLS certificate (default: system roots)."""
    credentials_file: Path | None = None
    """File holding the bearer token meshca presents to the API server (re-read per call)."""
    audiences: list[str] = Field(default_factory=lambda: [DEFAULT_AUDIENCE])
    cache_ttl: Duration = timedelta(seconds=60)
    timeout: Duration = timedelta(seconds=5)

    @field_validator("api_server")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"api_server {value!r} must be an http(s) URL")
        return value.rstrip("/")


class JwtCluster(_Strict):
    """Validate tokens locally against the issuer's JWKS (OIDC discovery, a URL or a file)."""

    mode: Literal["jwt"] = "jwt"
    cluster_id: str = DEFAULT_CLUSTER_ID
    issuer: str
    jwks_url: str | None = None
    jwks_file: Path | None = None
    ca_file: Path | None = None
    """PEM bundle to verify the issuer's TLS certificate (default: system roots)."""
    audiences: list[str] = Field(default_factory=lambda: [DEFAULT_AUDIENCE])
    leeway: Duration = timedelta(seconds=30)
    jwks_refresh_interval: Duration = timedelta(seconds=30)
    """Minimum time between two JWKS fetches triggered by an unknown ``kid``."""
    cache_ttl: Duration = timedelta(seconds=60)
    """How long a verified token is trusted without re-checking (never past its exp)."""
    timeout: Duration = timedelta(seconds=5)

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtCluster:
        if self.jwks_url and self.jwks_file:
            raise ValueError("set at most one of jwks_url and jwks_file")
        return self


ClusterConfig = Annotated[TokenReviewCluster | JwtCluster, Field(discriminator="mode")]


class GceRule(_Strict):
    """Maps GCE VMs to a SPIFFE ID; see :mod:`meshca.authn._gce_rules` (first match wins)."""

    project: str
    """Project id, exactly; must be in ``gce_projects``."""
    zone: str = "*"
    """Glob, e.g. ``europe-west1-*``."""
    instance_name: str = "*"
    """Glob, e.g. ``web-*``."""
    service_account: str | None = None
    """The VM's service-account email; None matches any (or none)."""
    spiffe_id: str
    """A path (``/ns/vms/sa/web``) or a template (``spiffe://{trust_domain}/vm/{instance_name}``)."""

    @field_validator("zone", "instance_name")
    @classmethod
    def _glob(cls, value: str, info: ValidationInfo) -> str:
        from meshca.authn._gce_rules import check_glob

        return check_glob(str(info.field_name), value)

    @field_validator("service_account")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        from meshca.authn._gce_rules import check_email

        return check_email(value) if value is not None else None

    @field_validator("spiffe_id")
    @classmethod
    def _template(cls, value: str) -> str:
        from meshca.authn._gce_rules import IdentityTemplate

        IdentityTemplate.parse(value)
        return value


class GceConfig(_Strict):
    """GCE instance identity validation, defaults filled in (``Settings.gce``)."""

    projects: list[str]
    audience: str
    rules: list[GceRule]
    certs_url: str = GOOGLE_CERTS_URL
    leeway: Duration = timedelta(seconds=30)
    """Clock skew allowed on ``exp`` and ``iat``."""
    keys_refresh_interval: Duration = timedelta(seconds=30)
    """Minimum time between two key fetches triggered by an unknown ``kid``."""
    timeout: Duration = timedelta(seconds=5)


_GCE_PROJECT = re.compile(r"(?:[a-z0-9][a-z0-9.-]*:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
"""A project id (6-30 characters), optionally domain-scoped (``example.com:proj``)."""


class FileSignerConfig(_Strict):
    """Root key in a PEM file (mode 0600) under the state directory. Development only."""

    kind: Literal["file"] = "file"
    key_file: Path | None = None
    """Default: ``<state_dir>/root-key.pem``."""
    key_type: KeyAlgorithm = KeyAlgorithm.EC_P256


class Pkcs11SignerConfig(_Strict):
    """Root key in a PKCS#11 token (an HSM, or SoftHSM2 for development).

    The user PIN comes from the environment variable ``pin_env`` or from ``pin_file``;
    never from the command line, never logged.
    """

    kind: Literal["pkcs11"] = "pkcs11"
    module: Path
    """The vendor's PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so."""
    token_label: str | None = None
    token_serial: str | None = None
    key_label: str = "meshca-root"
    key_id: str | None = None
    """Hex CKA_ID of the key; when set it must match as well as the label."""
    pin_env: str | None = "MESHCA_PKCS11_PIN"
    pin_file: Path | None = None
    key_type: KeyAlgorithm = KeyAlgorithm.EC_P256
    pool_size: int = Field(default=4, ge=1, le=64)
    """Sessions kept open for concurrent signing."""

    @model_validator(mode="after")
    def _token_and_pin(self) -> Pkcs11SignerConfig:
        if not self.token_label and not self.token_serial:
            raise ValueError("set token_label or token_serial to pick the PKCS#11 token")
        if self.pin_file is None and not self.pin_env:
            raise ValueError("set pin_env or pin_file: the user PIN is never a plain setting")
        return self


class GcpKmsSignerConfig(_Strict):
    """Root key in Google Cloud KMS; credentials from Application Default Credentials."""

    kind: Literal["gcpkms"] = "gcpkms"
    key_version: str
    """``projects/P/locations/L/keyRings/R/cryptoKeys/K/cryptoKeyVersions/N``."""
    endpoint: str | None = None
    """Override the API endpoint (private endpoints, emulators): HOST:PORT."""
    insecure_endpoint: bool = False
    """Talk plaintext gRPC to ``endpoint`` without credentials. Emulators only."""
    timeout: Duration = timedelta(seconds=10)
    """Per-call deadline; retries on UNAVAILABLE/DEADLINE_EXCEEDED stay within 3x this."""

    @field_validator("key_version")
    @classmethod
    def _resource_name(cls, value: str) -> str:
        parts = value.split("/")
        if len(parts) != 10 or parts[0::2] != [
            "projects",
            "locations",
            "keyRings",
            "cryptoKeys",
            "cryptoKeyVersions",
        ]:
            raise ValueError(
                f"key_version {value!r} must be projects/P/locations/L/keyRings/R/"
                "cryptoKeys/K/cryptoKeyVersions/N"
            )
        return value


SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
"""Where Kubernetes mounts a pod's service-account token, CA certificate and namespace."""


class BundleConfigMapConfig(_Strict):
    """Write the trust bundle to a ConfigMap in every namespace of the cluster meshca runs
    in (Istio's convention: ``istio-ca-root-cert``, key ``root-cert.pem``), keep it
    current through root rotation and new namespaces. One CA process writes at a time,
    the holder of a coordination.k8s.io Lease; the others wait to take over."""

    enabled: bool = False
    name: str = "istio-ca-root-cert"
    key: str = "root-cert.pem"
    api_server: ApiServerUrl | None = None
    """The API server's URL; default: in-cluster (KUBERNETES_SERVICE_HOST and _PORT)."""
    ca_file: Path = SERVICE_ACCOUNT_DIR / "ca.crt"
    """PEM bundle that verifies the API server's TLS certificate."""
    credentials_file: Path = SERVICE_ACCOUNT_DIR / "token"
    """The bearer token meshca presents (re-read every minute: the kubelet rotates it)."""
    lease_namespace: str | None = None
    """Namespace of the Lease; default: the pod's own (SERVICE_ACCOUNT_DIR/namespace)."""
    lease_name: str = "meshca-bundle-writer"
    lease_duration: Duration = timedelta(seconds=15)
    """How long the others wait after the writer's last renewal before taking over."""
    renew_deadline: Duration = timedelta(seconds=10)
    """The writer stops writing when it could not renew for this long."""
    retry_period: Duration = timedelta(seconds=2)
    """How often the writer renews and the others look at the Lease."""
    resync_interval: Duration = timedelta(minutes=5)
    """How often every namespace's ConfigMap is checked again (repairs edits, deletions)."""
    timeout: Duration = timedelta(seconds=10)
    """Per API call."""

    @model_validator(mode="after")
    def _timing(self) -> BundleConfigMapConfig:
        if not self.lease_duration > self.renew_deadline > self.retry_period > timedelta(0):
            raise ValueError(
                "bundle_configmap needs lease_duration > renew_deadline > retry_period > 0 "
                "(the writer must give up before another may take over)"
            )
        return self


_NAME_SEGMENT = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
"""A Kubernetes namespace or service-account name (an RFC 1123 subdomain)."""


class Delegation(_Strict):
    """An agent outside Kubernetes (one per VM, serving several workloads) that may obtain
    the listed identities: nothing can be looked up about a VM, so the list is the rule."""

    agent: str
    """The agent's own SPIFFE ID, exactly (what its credential proves: a join token, a
    GCE rule, its SVID)."""
    spiffe_ids: list[str] = Field(min_length=1)
    """The SPIFFE IDs it may ask for, exactly."""

    @field_validator("agent")
    @classmethod
    def _agent(cls, value: str) -> str:
        return _spiffe_id_text("agent", value)

    @field_validator("spiffe_ids")
    @classmethod
    def _ids(cls, value: list[str]) -> list[str]:
        return [_spiffe_id_text("spiffe_ids", v) for v in value]


def _spiffe_id_text(what: str, value: str) -> str:
    try:
        sid = SpiffeId.parse(value)
    except SpiffeIdError as exc:
        raise ValueError(f"{what} {value!r}: {exc}") from None
    if sid.is_trust_domain_id:
        raise ValueError(f"{what} {value!r} names a trust domain, not a workload")
    return str(sid)


class NodeAgentsConfig(_Strict):
    """Node agents: the service accounts whose agents (one per Kubernetes node) may obtain
    the identities of the pods on their own node, and agents outside Kubernetes with a
    fixed list of identities (``delegations``). Empty (the default): nobody may ask for
    an identity other than its own."""

    service_accounts: list[str] = Field(default_factory=list)
    """``namespace/name`` of each node agent's service account, e.g.
    ``meshca-system/meshca-agent``."""
    cluster_id: str | None = None
    """The cluster whose tokens those service accounts present (and whose API server is
    asked about pods); default: ``default_cluster``, or the only cluster."""
    api_server: ApiServerUrl | None = None
    """The API server asked about pods; default: in-cluster (KUBERNETES_SERVICE_HOST)."""
    ca_file: Path = SERVICE_ACCOUNT_DIR / "ca.crt"
    """PEM bundle that verifies the API server's TLS certificate."""
    credentials_file: Path = SERVICE_ACCOUNT_DIR / "token"
    """The bearer token meshca presents to read pods (re-read every minute)."""
    pod_cache_ttl: Duration = timedelta(seconds=5)
    """How long the list of a node's pods answers before it is fetched again; a pod
    deleted meanwhile is refused once this has passed."""
    min_refresh_interval: Duration = timedelta(seconds=1)
    """A pod missing from a node's list fetches it again at most this often (a pod just
    scheduled is found without waiting for the TTL; a flood of misses costs one call)."""
    timeout: Duration = timedelta(seconds=5)
    """Per API call."""
    delegations: list[Delegation] = Field(default_factory=list)

    @field_validator("service_accounts")
    @classmethod
    def _accounts(cls, value: list[str]) -> list[str]:
        for account in value:
            namespace, sep, name = account.partition("/")
            if (
                not sep
                or not _NAME_SEGMENT.fullmatch(namespace)
                or not _NAME_SEGMENT.fullmatch(name)
            ):
                raise ValueError(
                    f"node agent service account {account!r} must be NAMESPACE/NAME, e.g. "
                    "meshca-system/meshca-agent"
                )
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _timing(self) -> NodeAgentsConfig:
        for name in ("pod_cache_ttl", "min_refresh_interval", "timeout"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"node_agents.{name} must be positive")
        if self.min_refresh_interval > self.pod_cache_ttl:
            raise ValueError("node_agents.min_refresh_interval cannot exceed pod_cache_ttl")
        agents = [d.agent for d in self.delegations]
        if len(agents) != len(set(agents)):
            raise ValueError("node_agents.delegations names an agent twice; list it once")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.service_accounts or self.delegations)


def _signer_kind(value: object) -> str:
    """The signer's ``kind`` tag; a signer section without one means ``file``."""
    if isinstance(value, dict):
        return str(value.get("kind", "file"))
    return str(getattr(value, "kind", "file"))


SignerConfig = Annotated[
    Annotated[FileSignerConfig, Tag("file")]
    | Annotated[Pkcs11SignerConfig, Tag("pkcs11")]
    | Annotated[GcpKmsSignerConfig, Tag("gcpkms")],
    Discriminator(_signer_kind),
]


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meshca"


_CONFIG_FILE: dict[str, Path | None] = {}


class YamlSource(YamlConfigSettingsSource):
    """pydantic-settings' YAML source, refusing in plain words a file that is not UTF-8
    or whose top level is not a mapping of settings (a list, a bare string)."""

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        try:
            data: object = super()._read_file(file_path)
        except UnicodeDecodeError as exc:
            raise not_utf8(file_path, exc) from None
        return settings_mapping(data, file_path)


class FileSettings(BaseSettings):
    """Base of meshca's settings: flags (init values) win over ``MESHCA_*`` variables,
    which win over the config file (YAML or TOML) being loaded by
    :func:`load_from_sources`."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get("path")
        if path is not None:
            if path.suffix.lower() == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            else:
                sources.append(YamlSource(settings_cls, yaml_file=path))
        return tuple(sources)


SettingsT = TypeVar("SettingsT", bound=FileSettings)


def load_from_sources(
    cls: type[SettingsT],
    config_file: Path | None,
    overrides: dict[str, Any],
    *,
    what: str = "configuration",
) -> SettingsT:
    """Build ``cls`` from the config file, the environment and ``overrides`` (flags;
    None = unset). Raises ConfigError listing every problem, each naming its field
    (and, for a missing one, the flag and variable that set it)."""
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist or is not a file")
        if config_file.suffix.lower() not in (".yaml", ".yml", ".toml"):
            raise ConfigError(f"config file {config_file} must end in .yaml, .yml or .toml")
    file_errors: tuple[type[Exception], ...] = (tomllib.TOMLDecodeError,)
    if config_file is not None and config_file.suffix.lower() != ".toml":
        import yaml  # only a YAML config file needs the parser (the agent runs in every pod)

        file_errors = (yaml.YAMLError, tomllib.TOMLDecodeError)
    given = {k: v for k, v in overrides.items() if v is not None}
    _CONFIG_FILE["path"] = config_file
    try:
        return cls(**given)
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        problems = "; ".join(describe(err, cls, prefix) for err in exc.errors())
        raise ConfigError(f"invalid {what}: {problems}") from exc
    except file_errors as exc:
        assert config_file is not None  # only a config file is parsed as YAML or TOML
        raise syntax_error(config_file, exc) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {what}: {exc}") from exc
    finally:
        _CONFIG_FILE.pop("path", None)


class Settings(FileSettings):
    """Everything ``meshca server`` and ``meshca admin`` read."""

    model_config = SettingsConfigDict(
        env_prefix="MESHCA_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    trust_domain: str = "cluster.local"
    state_dir: Path = Field(default_factory=default_state_dir)
    database_url: str | None = Field(default=None, repr=False)
    """SQLAlchemy URL; default ``sqlite:///<state_dir>/meshca.db``."""
    grpc_listen: str = "0.0.0.0:15012"
    grpc_mtls_listen: str | None = "0.0.0.0:15013"
    """Port requiring a client X509-SVID, for renewal without a token; None or "" = off."""
    http_listen: str = "0.0.0.0:15014"
    plaintext: bool = False
    server_dns_names: list[str] = Field(default_factory=lambda: ["localhost"])
    max_ttl: Duration = timedelta(hours=24)
    default_ttl: Duration = timedelta(hours=1)
    intermediate_ttl: Duration = timedelta(hours=48)
    intermediate_rotate_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Rotate the issuing intermediate once this fraction of its life has passed."""
    intermediate_name_constraints: bool = False
    root_ttl: Duration = timedelta(days=3650)
    root_propagation: Duration | None = None
    """How long a prepared root must be published before `meshca admin root activate`
    accepts it (time for every agent and proxy to fetch the two-root bundle); None means
    max_ttl (every certificate in use was renewed, and its holder refreshed, since)."""
    root_expiry_warning: Duration = timedelta(days=90)
    """Warn (log and ``meshca_root_expiry_warning``) once the active root is this close to
    its notAfter."""
    maintenance_interval: Duration = timedelta(seconds=30)
    """How often each CA process rotates its intermediate, re-reads the roots (and follows
    a root activated elsewhere) and renews its TLS certificate."""
    signer: SignerConfig = Field(default_factory=FileSignerConfig)
    issuing_key: Literal["memory", "hsm"] = "memory"
    """Where issuing-intermediate keys live: process memory, or the PKCS#11 token of
    ``signer`` (every workload certificate then signed in the HSM)."""
    fips: bool = False
    """Allow only FIPS-approved algorithms and modules: refuses the ``file`` signer and
    requires ``issuing_key: hsm`` (see SECURITY.md for what is and is not validated)."""
    clusters: list[ClusterConfig] = Field(default_factory=list)
    default_cluster: str | None = None
    """Cluster used when a caller sends no ``clusterid`` header (default: the first)."""
    k8s_oidc_issuer: str | None = None
    """Shorthand for one cluster in ``jwt`` mode: the token issuer (OIDC discovery)."""
    k8s_jwks_url: str | None = None
    """Shorthand for ``jwt`` mode: fetch keys here instead of by OIDC discovery."""
    k8s_api_server: str | None = None
    """Shorthand for one cluster in ``tokenreview`` mode: the API server URL."""
    k8s_ca_file: Path | None = None
    k8s_credentials_file: Path | None = None
    token_audience: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_AUDIENCE]
    )
    gce_projects: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """GCE projects whose VMs may authenticate with instance identity tokens; empty = off."""
    gce_audience: str | None = None
    """The ``aud`` GCE tokens must carry; default ``spiffe://<trust_domain>``."""
    gce_certs_url: str = GOOGLE_CERTS_URL
    """Google's signing keys (JWK Set), cached per the answer's Cache-Control/Expires."""
    gce_rules: list[GceRule] = Field(default_factory=list)
    """Identity mapping rules for GCE VMs, first match wins."""
    bundle_configmap: BundleConfigMapConfig = Field(default_factory=BundleConfigMapConfig)
    """Trust bundle ConfigMap in every namespace (off unless ``enabled``)."""
    node_agents: NodeAgentsConfig = Field(default_factory=NodeAgentsConfig)
    """Agents that may obtain other workloads' identities (node mode); none by default."""
    grpc_handshake_timeout: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(seconds=10)
    """A connection that has not completed its TLS handshake by then is closed."""
    grpc_max_connection_age: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(minutes=30)
    """Clients are asked (GOAWAY) to reconnect after this long, so long-lived connections
    spread again over workers and replicas; RPCs in flight get a minute to finish."""
    http_max_connections: int | None = Field(default=None, ge=1)
    """HTTP connections one process holds at once (one peer address: a quarter of them);
    more are answered 503 and closed. Default: a quarter of the open-file limit, at
    most 256, so the HTTP port never takes the descriptors issuance needs."""
    http_idle_timeout: Annotated[Duration, Field(gt=timedelta(0))] = timedelta(seconds=10)
    """An HTTP connection that sends no complete request header this long after it
    connects, or after its last response, is closed."""
    max_in_flight: int = Field(default=512, ge=1)
    """Certificate requests one process works on at once; more get RESOURCE_EXHAUSTED."""
    rate_limit_per_peer: str | None = "500/second"
    """Requests per peer IP address (``limits`` notation), checked before authentication."""
    rate_limit_per_identity: str | None = "100/second"
    """Requests per SPIFFE ID, checked after authentication."""
    workers: int | None = Field(default=None, ge=1, le=256)
    """Serving processes sharing the ports (SO_REUSEPORT); default: the number of CPUs."""
    log_level: str = "INFO"

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, value: str) -> str:
        try:
            return TrustDomain.parse(value).name
        except SpiffeIdError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("rate_limit_per_peer", "rate_limit_per_identity")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        from meshca.api.admission import parse_rate

        try:
            return value if parse_rate(value) is not None else None
        except ConfigError as exc:
            raise ValueError(exc.message) from None

    @field_validator("grpc_mtls_listen", mode="before")
    @classmethod
    def _mtls_off(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("", "off", "none"):
            return None
        return value

    @field_validator("token_audience", mode="before")
    @classmethod
    def _split_audiences(cls, value: object) -> object:
        if isinstance(value, str):
            return [a.strip() for a in value.split(",") if a.strip()]
        return value

    @field_validator("gce_projects", mode="before")
    @classmethod
    def _split_projects(cls, value: object) -> object:
        """``a,b`` or ``a b`` (an environment variable, or one repeated flag) is two."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return [p for v in value for p in re.split(r"[\s,]+", v) if p]
        return value

    @field_validator("gce_projects")
    @classmethod
    def _projects(cls, value: list[str]) -> list[str]:
        for project in value:
            if not _GCE_PROJECT.fullmatch(project):
                raise ValueError(
                    f"gce project {project!r} is not a GCE project id (6-30 lowercase "
                    "letters, digits and '-', starting with a letter)"
                )
        return list(dict.fromkeys(value))

    @field_validator("gce_certs_url")
    @classmethod
    def _certs_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"gce_certs_url {value!r} must be an http(s) URL")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_ttl > self.max_ttl:
            raise ValueError(
                f"default_ttl {format_duration(self.default_ttl)} exceeds "
                f"max_ttl {format_duration(self.max_ttl)}"
            )
        remaining_at_rotation = self.intermediate_ttl * (1 - self.intermediate_rotate_fraction)
        if self.max_ttl > remaining_at_rotation:
            raise ValueError(
                f"max_ttl {format_duration(self.max_ttl)} exceeds the life an intermediate has "
                f"left when it rotates ({format_duration(remaining_at_rotation)}: intermediate_ttl "
                "x (1 - intermediate_rotate_fraction)); certificates would be cut short"
            )
        if self.intermediate_name_constraints and self.grpc_mtls_listen and not self.plaintext:
            raise ValueError(
                "intermediate_name_constraints cannot be combined with SVID renewal "
                "(grpc_mtls_listen): the renewal check cannot verify URI name constraints; "
                "set grpc_mtls_listen to off or leave name constraints off"
            )
        if self.issuing_key == "hsm" and not isinstance(self.signer, Pkcs11SignerConfig):
            raise ValueError(
                f"issuing_key 'hsm' needs a pkcs11 signer (the token that holds the root); "
                f"the signer is {self.signer.kind!r}"
            )
        if self.fips:
            if isinstance(self.signer, FileSignerConfig):
                raise ValueError(
                    "fips mode refuses the 'file' signer: keep the root in a FIPS 140-3 "
                    "validated HSM (pkcs11) or Cloud KMS with protection level HSM"
                )
            if self.issuing_key != "hsm":
                raise ValueError(
                    "fips mode needs issuing_key 'hsm': with 'memory', workload certificates "
                    "are signed outside a validated module"
                )
        if self.k8s_api_server and (self.k8s_oidc_issuer or self.k8s_jwks_url):
            raise ValueError(
                "k8s_api_server (TokenReview) and k8s_oidc_issuer/k8s_jwks_url (local JWT "
                "validation) are two modes of one cluster; choose one, or list clusters"
            )
        if self.k8s_jwks_url and not self.k8s_oidc_issuer:
            raise ValueError("k8s_jwks_url needs k8s_oidc_issuer (the expected 'iss' claim)")
        if not self.token_audience:
            raise ValueError("token_audience must name at least one audience")
        ids = [c.cluster_id for c in self.effective_clusters]
        if len(ids) != len(set(ids)):
            raise ValueError(f"cluster ids must be unique, got {ids}")
        if self.default_cluster is not None and self.default_cluster not in ids:
            raise ValueError(f"default_cluster {self.default_cluster!r} is not among {ids}")
        self._check_gce()
        self._check_node_agents(ids)
        return self

    def _check_node_agents(self, cluster_ids: list[str]) -> None:
        agents = self.node_agents
        for delegation in agents.delegations:
            for text in (delegation.agent, *delegation.spiffe_ids):
                if not text.startswith(f"spiffe://{self.trust_domain}/"):
                    raise ValueError(
                        f"node_agents.delegations: {text} is not in trust domain "
                        f"{self.trust_domain}"
                    )
        if not agents.service_accounts:
            return
        cluster = self.node_agents_cluster
        if cluster is None:
            raise ValueError(
                "node_agents.service_accounts needs a Kubernetes cluster whose tokens the "
                "agents present: configure one (clusters, or --k8s-* flags)"
                if not cluster_ids
                else "node_agents.cluster_id must name the agents' cluster: several clusters "
                f"are configured ({', '.join(cluster_ids)}) and no default_cluster"
            )
        if cluster not in cluster_ids:
            raise ValueError(
                f"node_agents.cluster_id {cluster!r} is not among the clusters "
                f"({', '.join(cluster_ids) or 'none'})"
            )

    def _check_gce(self) -> None:
        if not self.gce_projects:
            if self.gce_rules:
                raise ValueError(
                    "gce_rules are set but gce_projects is empty: list the projects whose "
                    "VMs may authenticate (--gce-project), or GCE authentication stays off"
                )
            return
        if not self.gce_rules:
            raise ValueError(
                "gce_projects is set but there are no gce_rules: every VM would be refused; "
                "add rules mapping VMs to SPIFFE IDs in the config file"
            )
        from meshca.authn._gce_rules import compile_rules

        try:
            compile_rules(self.gce_rules, self.trust_domain_value, self.gce_projects)
        except ConfigError as exc:
            raise ValueError(exc.message) from None

    @property
    def gce(self) -> GceConfig | None:
        """GCE instance identity validation as configured; None when it is off."""
        if not self.gce_projects:
            return None
        return GceConfig(
            projects=self.gce_projects,
            audience=self.gce_audience or str(self.trust_domain_value.id),
            rules=self.gce_rules,
            certs_url=self.gce_certs_url,
        )

    @property
    def effective_clusters(self) -> list[TokenReviewCluster | JwtCluster]:
        """The clusters from the file, plus the one the ``k8s_*`` shorthands describe."""
        clusters: list[TokenReviewCluster | JwtCluster] = list(self.clusters)
        taken = {c.cluster_id for c in clusters}
        cluster_id = DEFAULT_CLUSTER_ID if DEFAULT_CLUSTER_ID not in taken else "default"
        if self.k8s_api_server:
            clusters.append(
                TokenReviewCluster(
                    cluster_id=cluster_id,
                    api_server=self.k8s_api_server,
                    ca_file=self.k8s_ca_file,
                    credentials_file=self.k8s_credentials_file,
                    audiences=self.token_audience,
                )
            )
        elif self.k8s_oidc_issuer:
            clusters.append(
                JwtCluster(
                    cluster_id=cluster_id,
                    issuer=self.k8s_oidc_issuer,
                    jwks_url=self.k8s_jwks_url,
                    ca_file=self.k8s_ca_file,
                    audiences=self.token_audience,
                )
            )
        return clusters

    @property
    def node_agents_cluster(self) -> str | None:
        """The cluster the node agents' tokens come from: configured, the default
        cluster, or the only one; None when that cannot be told."""
        if self.node_agents.cluster_id is not None:
            return self.node_agents.cluster_id
        if self.default_cluster is not None:
            return self.default_cluster
        clusters = self.effective_clusters
        return clusters[0].cluster_id if len(clusters) == 1 else None

    @property
    def trust_domain_value(self) -> TrustDomain:
        return TrustDomain(self.trust_domain)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'meshca.db'}"

    @property
    def effective_root_propagation(self) -> timedelta:
        return self.max_ttl if self.root_propagation is None else self.root_propagation


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from the file, the environment and ``overrides`` (flags; None = unset).

    Raises ConfigError with every problem listed, each naming its field.
    """
    return load_from_sources(Settings, config_file, overrides)
