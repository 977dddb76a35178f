"""Typed settings for ``meshca agent``.

Sources combine as for the CA (:mod:`meshca.config`), later winning: built-in defaults,
the config file (YAML or TOML, ``--config``), ``MESHCA_AGENT_*`` environment variables,
then command-line flags. Durations are written as everywhere in meshca (``90s``, ``1h``).

What the agent trusts (exactly one):

- ``ca_trust_bundle``: a PEM file of CA roots (a ConfigMap in Kubernetes); re-read
  every ``bundle_refresh_interval`` so that a root rotation reaches the agent;
- ``ca_bundle_url`` with ``ca_bundle_sha256``: the CA's HTTP bundle endpoint
  (``GET /v1/bundle``); the document is accepted only when one of its roots has a
  pinned SHA-256 fingerprint, and then whole (several roots during a rotation);
- ``ca_plaintext``: no TLS to the CA at all and nothing to verify responses against but
  the chain the CA sends. Local development only.

How the agent proves who it is (``credential``):

- ``k8s``: the projected service-account token in ``token_file``, re-read on every
  request (the kubelet rotates it). With ``mtls_address`` set, the first certificate is
  requested with the token and each renewal with the SVID the agent holds, on the CA's
  mTLS port (no token leaves the pod while a valid SVID exists); a renewal refused there
  falls back to the token at once.
- ``svid``: only the SVID, on ``mtls_address``; the agent starts from ``svid_cert_file``
  and ``svid_key_file`` (a provisioned bootstrap SVID, or the file sink's output of an
  earlier run), and requests a fresh key and certificate with them at once.
- ``gce``: a GCE VM's instance identity token, fetched fresh from the metadata server
  (``gce_metadata_url``) before every request, for audience ``gce_audience`` (default
  ``spiffe://<trust_domain>``, the CA's default). With ``mtls_address`` set, renewals
  use the SVID as for ``k8s``.
- ``join-token``: a single-use join token (``meshca admin join-token create``) in
  ``token_file``, spent on the first certificate; every renewal uses the SVID on
  ``mtls_address`` (required). With ``output_dir`` set, a restarted agent starts from
  the unexpired SVID it wrote there, as the token is spent.

Whom the sockets serve (``attestation``):

- ``none``: the agent's own identity, to everyone who can open the socket (a sidecar, or
  a VM with one workload); the socket's mode and owner are the access control.
- ``k8s``: one agent per node (a DaemonSet): each calling process gets the identity of
  its pod (cgroup under ``proc_root``, then the kubelet at ``kubelet_url``), which the
  agent obtains from the CA on the pod's behalf with its own token; needs credential
  ``k8s`` and the agent's service account among the CA's ``node_agents``.
- ``unix``: several workloads on one VM: ``unix_workloads`` rules map a process's uid,
  gid and executable to SPIFFE IDs; the CA's ``node_agents.delegations`` must list them
  for the agent.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import signal
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from meshca.agent.credential_sources import DEFAULT_GCE_METADATA_URL
from meshca.config_problems import describe, read_config_file, syntax_error
from meshca.durations import Duration, format_duration
from meshca.errors import ConfigError, SpiffeIdError
from meshca.pki.keys import KeyAlgorithm
from meshca.spiffe import SpiffeId, TrustDomain

if TYPE_CHECKING:
    from meshca.proxy.config import ProxyConfig

DEFAULT_TOKEN_FILE = Path("/var/run/secrets/tokens/istio-token")
"""Where Istio's sidecar injector mounts the projected token (audience ``istio-ca``)."""

ENV_PREFIX = "MESHCA_AGENT_"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

_OFF = ("", "off", "none")


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError naming ``what``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {address!r} must be HOST:PORT, e.g. meshca.example:15012")
    return host.strip("[]"), int(port)


class UnixWorkload(BaseModel):
    """Processes matching every condition given get ``spiffe_id`` (``attestation: unix``).

    Written in a config file as a mapping, or (a flag, an environment variable) as one
    line: ``SPIFFE_ID uid=33 gid=33 path=/usr/sbin/nginx``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    spiffe_id: str
    """A full SPIFFE ID, or a path (``/vm/web``) in the agent's trust domain."""
    uid: int | None = None
    gid: int | None = None
    path: Path | None = None
    """The executable, as ``/proc/<pid>/exe`` names it (absolute, symlinks resolved)."""

    @model_validator(mode="before")
    @classmethod
    def _line(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        words = value.split()
        if not words:
            raise ValueError("a unix workload line is 'SPIFFE_ID uid=N gid=N path=/exe'")
        fields: dict[str, object] = {"spiffe_id": words[0]}
        for word in words[1:]:
            key, sep, text = word.partition("=")
            if not sep or key not in ("uid", "gid", "path") or key in fields:
                raise ValueError(
                    f"unix workload {value!r}: {word!r} is not one of uid=, gid=, path= "
                    "(each at most once)"
                )
            fields[key] = text
        return fields

    @field_validator("uid", "gid", mode="before")
    @classmethod
    def _id(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str) or value.isdigit():
            return value
        try:
            if info.field_name == "uid":
                return pwd.getpwnam(value).pw_uid
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise ValueError(f"{info.field_name} {value!r} is not a known name") from None

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"path {value} must be absolute, as /proc/<pid>/exe names it")
        return value

    @model_validator(mode="after")
    def _some_condition(self) -> UnixWorkload:
        if self.uid is None and self.gid is None and self.path is None:
            raise ValueError(
                f"unix workload {self.spiffe_id}: give at least one of uid, gid, path "
                "(a rule without one would match every process)"
            )
        return self


class AgentSettings(BaseModel):
    """Everything ``meshca agent`` reads. See the module docstring for the trust rules;
    :func:`load_agent_settings` gathers the values."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    ca_address: str
    """The CA's token port (TLS), HOST:PORT."""
    ca_trust_bundle: Path | None = None
    ca_bundle_url: str | None = None
    ca_bundle_sha256: list[str] = Field(default_factory=list)
    """SHA-256 fingerprints (hex, colons allowed) of roots; one must be in the bundle."""
    ca_plaintext: bool = False
    ca_server_name: str | None = None
    """The name the CA's TLS certificate must carry (default: the host of ca_address)."""
    mtls_address: str | None = None
    """The CA's SVID-renewal port (mTLS, e.g. 15013), HOST:PORT; None = renew by token."""
    cluster_id: str | None = None
    """Sent as the ``clusterid`` header: picks the CA's token validator for this cluster."""
    trust_domain: str = "cluster.local"
    credential: Literal["k8s", "gce", "join-token", "svid"] = "k8s"
    token_file: Path = DEFAULT_TOKEN_FILE
    svid_cert_file: Path | None = None
    svid_key_file: Path | None = None
    gce_metadata_url: str = DEFAULT_GCE_METADATA_URL
    """Base URL of the GCE metadata server (credential ``gce``)."""
    gce_audience: str | None = None
    """Audience of the GCE identity token; default ``spiffe://<trust_domain>``."""
    ttl: Duration = timedelta(hours=1)
    """Requested certificate lifetime; the CA may grant less."""
    renew_ratio: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Renew once this fraction of the certificate's life has passed..."""
    renew_jitter: float = Field(default=0.1, ge=0.0, lt=1.0)
    """...give or take half of this fraction of the life, at random (spreads a fleet)."""
    key_type: KeyAlgorithm = KeyAlgorithm.EC_P256
    request_timeout: Duration = timedelta(seconds=10)
    """Deadline of each call to the CA and of each bundle fetch."""
    backoff_initial: Duration = timedelta(seconds=1)
    backoff_max: Duration = timedelta(seconds=60)
    """Cap of the retry delay; errors that retrying cannot fix wait this long."""
    bundle_refresh_interval: Duration = timedelta(minutes=5)
    workload_api_socket: Path | None = None
    sds_socket: Path | None = None
    output_dir: Path | None = None
    reload_command: str | None = None
    """Run (no shell; split like a shell would) after the file sink writes, e.g.
    ``nginx -s reload``."""
    reload_signal: str | None = None
    """Instead of a command: send this signal (``HUP``) to the pid in reload_pid_file."""
    reload_pid_file: Path | None = None
    socket_mode: int = 0o600
    socket_owner: str | None = None
    socket_group: str | None = None
    http_listen: str | None = None
    """Health (``/healthz``, ``/readyz``) and Prometheus ``/metrics``; None = off."""
    attestation: Literal["none", "k8s", "unix"] = "none"
    """Whom the sockets serve: the agent's own identity (``none``), each calling pod's
    (``k8s``, one agent per node) or each process's by ``unix_workloads`` (``unix``)."""
    proc_root: Path = Path("/proc")
    """Where processes are looked up (``<proc_root>/<pid>/cgroup``, ``.../exe``)."""
    kubelet_url: str | None = None
    """The kubelet's authenticated port, e.g. ``https://<node IP>:10250``."""
    kubelet_ca_file: Path = SERVICE_ACCOUNT_DIR / "ca.crt"
    """PEM bundle that verifies the kubelet's serving certificate."""
    kubelet_token_file: Path = SERVICE_ACCOUNT_DIR / "token"
    """The bearer token the agent presents to the kubelet (re-read for every request)."""
    attestation_timeout: Duration = timedelta(seconds=10)
    """How long a caller the agent cannot place yet (a pod the kubelet does not list
    yet) waits before it is refused."""
    identity_idle_grace: Duration = timedelta(minutes=1)
    """An identity no connection has used this long, and no pod on the node has, is
    dropped."""
    unix_workloads: list[UnixWorkload] = Field(default_factory=list)
    """``attestation: unix`` rules; see :class:`UnixWorkload`."""
    inbound: list[str] = Field(default_factory=list)
    """The mTLS proxy in this process (meshca.proxy): ``LISTEN=APP_ADDR[,http]``."""
    outbound: list[str] = Field(default_factory=list)
    """``LISTEN=REMOTE_ADDR,EXPECTED_SPIFFE_ID[,...][,http]`` (see ``meshca proxy``)."""
    proxy_policy: Path | None = None
    proxy_access_log: str = "-"
    """Where the in-process proxy writes its JSON access log; ``-`` = standard output."""
    log_level: str = "INFO"

    @field_validator("unix_workloads", mode="before")
    @classmethod
    def _workload_lines(cls, value: object) -> object:
        if isinstance(value, str):  # an environment variable: one per line, or ';' apart
            return [line.strip() for line in re.split(r"[\n;]", value) if line.strip()]
        return list(value) if isinstance(value, tuple) else value

    @field_validator("kubelet_url")
    @classmethod
    def _kubelet_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("https://"):
            raise ValueError(
                f"kubelet_url {value!r} must be https:// (the kubelet's authenticated port, "
                "10250; the read-only port is not used)"
            )
        return value.rstrip("/") if value is not None else None

    @field_validator("inbound", "outbound", mode="before")
    @classmethod
    def _split_routes(cls, value: object) -> object:
        if isinstance(value, str):  # an environment variable: entries apart by spaces
            return value.split()
        return list(value) if isinstance(value, tuple) else value

    @property
    def proxy_config(self) -> ProxyConfig | None:
        """The in-process proxy's settings, or None when no route is set."""
        if not self.inbound and not self.outbound:
            return None
        from meshca.proxy.config import Inbound, Outbound, ProxyConfig

        return ProxyConfig(
            inbound=tuple(Inbound.parse(i) for i in self.inbound),
            outbound=tuple(Outbound.parse(o) for o in self.outbound),
            policy_file=self.proxy_policy,
            access_log=None if self.proxy_access_log == "-" else Path(self.proxy_access_log),
        )

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, value: str) -> str:
        try:
            return TrustDomain.parse(value).name
        except SpiffeIdError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("ca_address")
    @classmethod
    def _ca_address(cls, value: str) -> str:
        split_host_port(value, "ca_address")
        return value

    @field_validator("mtls_address", "http_listen", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in _OFF:
            return None
        return value

    @field_validator("mtls_address")
    @classmethod
    def _mtls_address(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value, "mtls_address")
        return value

    @field_validator("http_listen")
    @classmethod
    def _http_listen(cls, value: str | None) -> str | None:
        if value is not None:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"http_listen {value!r} must be HOST:PORT, e.g. 0.0.0.0:15021")
        return value

    @field_validator("gce_metadata_url")
    @classmethod
    def _metadata_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"gce_metadata_url {value!r} must be an http(s) URL")
        return value.rstrip("/")

    @field_validator("ca_bundle_url")
    @classmethod
    def _bundle_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError(f"ca_bundle_url {value!r} must be an http(s) URL")
        return value

    @field_validator("ca_bundle_sha256", mode="before")
    @classmethod
    def _split_pins(cls, value: object) -> object:
        if isinstance(value, str):
            return [p for p in (part.strip() for part in value.split(",")) if p]
        return value

    @field_validator("ca_bundle_sha256")
    @classmethod
    def _pins(cls, value: list[str]) -> list[str]:
        pins = []
        for pin in value:
            hexed = pin.lower().removeprefix("sha256:").replace(":", "")
            if len(hexed) != 64 or any(c not in "0123456789abcdef" for c in hexed):
                raise ValueError(
                    f"ca_bundle_sha256 {pin!r} is not a SHA-256 fingerprint: write 64 hex "
                    "digits (colons allowed), e.g. the output of "
                    "'openssl x509 -noout -fingerprint -sha256'"
                )
            pins.append(hexed)
        return pins

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, value: object) -> object:
        """Strings are octal (``0600``, ``0o600``, ``600``); numbers are taken as they are."""
        if isinstance(value, str):
            text = value.strip().lower().removeprefix("0o")
            try:
                return int(text, 8)
            except ValueError:
                raise ValueError(
                    f"socket_mode {value!r} must be an octal mode such as 0600"
                ) from None
        return value

    @field_validator("socket_mode")
    @classmethod
    def _mode(cls, value: int) -> int:
        if not 0 <= value <= 0o777:
            raise ValueError(f"socket_mode {value:#o} is not a permission mode (0 to 0777)")
        return value

    @field_validator("reload_signal")
    @classmethod
    def _signal(cls, value: str | None) -> str | None:
        if value is None:
            return None
        text = value.strip().upper()
        if text.isdigit():
            try:
                return signal.Signals(int(text)).name
            except ValueError:
                pass
        else:
            name = text if text.startswith("SIG") else f"SIG{text}"
            if name in signal.Signals.__members__:
                return name
        raise ValueError(f"reload_signal {value!r} is not a signal; write e.g. HUP or SIGUSR1")

    @field_validator("reload_command")
    @classmethod
    def _command(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                argv = shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"reload_command cannot be split into words: {exc}") from None
            if not argv:
                raise ValueError("reload_command is empty")
        return value

    @model_validator(mode="after")
    def _check(self) -> AgentSettings:
        self._check_trust()
        self._check_credential()
        self._check_delivery()
        self._check_timing()
        self._check_attestation()
        return self

    def _check_attestation(self) -> None:
        for rule in self.unix_workloads:
            self.workload_id(rule)  # raises for an ID outside the trust domain
        if self.attestation == "none":
            if self.unix_workloads:
                raise ValueError("unix_workloads need attestation 'unix'")
            return
        if self.sds_socket is None and self.workload_api_socket is None:
            raise ValueError(
                f"attestation {self.attestation!r} serves workloads over sds_socket or "
                "workload_api_socket: set at least one"
            )
        if self.output_dir is not None or self.inbound or self.outbound:
            raise ValueError(
                "output_dir and the in-process proxy (inbound, outbound) carry the agent's "
                f"own identity; with attestation {self.attestation!r} the agent serves each "
                "workload its own over the sockets"
            )
        if self.attestation == "k8s":
            if self.credential != "k8s":
                raise ValueError(
                    "attestation 'k8s' asks for pods' identities with the agent's own "
                    "projected token (the CA learns the agent's node from it): set "
                    "credential 'k8s'"
                )
            if self.kubelet_url is None:
                raise ValueError(
                    "attestation 'k8s' needs kubelet_url, e.g. https://$(NODE_IP):10250"
                )
            if self.unix_workloads:
                raise ValueError("unix_workloads need attestation 'unix', not 'k8s'")
        elif not self.unix_workloads:
            raise ValueError("attestation 'unix' needs at least one unix_workloads rule")
        if self.attestation_timeout <= timedelta(0) or self.identity_idle_grace < timedelta(0):
            raise ValueError(
                "attestation_timeout must be positive, identity_idle_grace not negative"
            )

    def workload_id(self, rule: UnixWorkload) -> SpiffeId:
        """The SPIFFE ID a unix workload rule gives (a path is in the trust domain)."""
        td = self.trust_domain_value
        try:
            sid = (
                SpiffeId(td, rule.spiffe_id)
                if rule.spiffe_id.startswith("/")
                else SpiffeId.parse(rule.spiffe_id)
            )
        except SpiffeIdError as exc:
            raise ValueError(f"unix workload {rule.spiffe_id!r}: {exc}") from None
        if not sid.member_of(td) or sid.is_trust_domain_id:
            raise ValueError(
                f"unix workload {rule.spiffe_id!r} is not a workload in trust domain {td}"
            )
        return sid

    def _check_trust(self) -> None:
        anchors = [
            name
            for name, given in (
                ("ca_trust_bundle", self.ca_trust_bundle is not None),
                ("ca_bundle_url", self.ca_bundle_url is not None),
                ("ca_plaintext", self.ca_plaintext),
            )
            if given
        ]
        if len(anchors) != 1:
            raise ValueError(
                "set exactly one of ca_trust_bundle (a PEM file), ca_bundle_url with "
                "ca_bundle_sha256, or ca_plaintext (local development only); "
                f"got {', '.join(anchors) or 'none'}"
            )
        if self.ca_bundle_url is not None and not self.ca_bundle_sha256:
            raise ValueError(
                "ca_bundle_url needs ca_bundle_sha256: the bundle is trusted only when it "
                "holds a root with a pinned fingerprint"
            )
        if self.ca_bundle_sha256 and self.ca_bundle_url is None:
            raise ValueError("ca_bundle_sha256 pins a root of ca_bundle_url; set the URL too")
        if self.ca_plaintext:
            for name, value in (
                ("ca_server_name", self.ca_server_name),
                ("mtls_address", self.mtls_address),
            ):
                if value is not None:
                    raise ValueError(f"{name} needs TLS; it cannot be used with ca_plaintext")

    def _check_credential(self) -> None:
        svid_files = self.svid_cert_file is not None, self.svid_key_file is not None
        if self.credential == "svid":
            if self.mtls_address is None:
                raise ValueError("credential 'svid' renews on the CA's mTLS port: set mtls_address")
            if not all(svid_files):
                raise ValueError(
                    "credential 'svid' starts from an SVID the agent already holds: set "
                    "svid_cert_file (chain PEM) and svid_key_file"
                )
        elif any(svid_files):
            raise ValueError("svid_cert_file and svid_key_file are for credential 'svid' only")
        if self.credential == "join-token":
            if self.mtls_address is None:
                raise ValueError(
                    "credential 'join-token' spends the token on the first certificate and "
                    "renews with the SVID on the CA's mTLS port: set mtls_address"
                )
            if self.token_file == DEFAULT_TOKEN_FILE:
                raise ValueError(
                    "credential 'join-token' reads the token from token_file: set it to the "
                    "file holding the output of `meshca admin join-token create`"
                )

    def _check_delivery(self) -> None:
        try:
            self.proxy_config  # noqa: B018 (parsed for its errors)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        if (
            self.sds_socket is not None
            and self.workload_api_socket is not None
            and self.sds_socket == self.workload_api_socket
        ):
            raise ValueError("sds_socket and workload_api_socket must be different paths")
        if self.reload_command is not None and self.reload_signal is not None:
            raise ValueError("set reload_command or reload_signal, not both")
        if (self.reload_signal is None) != (self.reload_pid_file is None):
            raise ValueError("reload_signal and reload_pid_file go together")
        reloads = self.reload_command is not None or self.reload_signal is not None
        if reloads and self.output_dir is None:
            raise ValueError("reload_command/reload_signal act after file writes: set output_dir")
        sockets = self.sds_socket is not None or self.workload_api_socket is not None
        if (self.socket_owner or self.socket_group) and not sockets:
            raise ValueError(
                "socket_owner/socket_group apply to sds_socket and workload_api_socket; "
                "neither is set"
            )

    def _check_timing(self) -> None:
        if self.ttl <= timedelta(0):
            raise ValueError("ttl must be positive")
        low = self.renew_ratio - self.renew_jitter / 2
        high = self.renew_ratio + self.renew_jitter / 2
        if low <= 0 or high >= 1:
            raise ValueError(
                f"renew_ratio {self.renew_ratio:g} +/- renew_jitter/2 ({self.renew_jitter / 2:g}) "
                "must stay strictly between 0 and 1 of the certificate's life"
            )
        for name in (
            "request_timeout",
            "backoff_initial",
            "backoff_max",
            "bundle_refresh_interval",
        ):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be positive")
        if self.backoff_initial > self.backoff_max:
            raise ValueError(
                f"backoff_initial {format_duration(self.backoff_initial)} exceeds "
                f"backoff_max {format_duration(self.backoff_max)}"
            )

    # -- derived values, filled in one place ---------------------------------------------

    @property
    def trust_domain_value(self) -> TrustDomain:
        return TrustDomain(self.trust_domain)

    @property
    def effective_gce_audience(self) -> str:
        """The audience the agent asks GCE identity tokens for (the CA's default)."""
        return self.gce_audience or str(self.trust_domain_value.id)

    @property
    def server_name(self) -> str | None:
        """The TLS name checked on the CA's certificate; None in plaintext mode."""
        if self.ca_plaintext:
            return None
        return self.ca_server_name or split_host_port(self.ca_address, "ca_address")[0]

    @property
    def reload_argv(self) -> list[str] | None:
        return shlex.split(self.reload_command) if self.reload_command is not None else None

    @property
    def reload_signal_number(self) -> int | None:
        return int(signal.Signals[self.reload_signal]) if self.reload_signal else None

    @property
    def delivery_paths(self) -> list[str]:
        """The delivery paths turned on, as shown in the status line."""
        paths = []
        if self.sds_socket is not None:
            paths.append(f"SDS {self.sds_socket}")
        if self.workload_api_socket is not None:
            paths.append(f"Workload API {self.workload_api_socket}")
        if self.output_dir is not None:
            paths.append(f"files {self.output_dir}")
        return paths


def load_agent_settings(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Build AgentSettings from the file, the environment and ``overrides`` (flags;
    None = unset), later winning. Raises ConfigError with every problem listed, each
    naming its field.

    The sources are gathered here, as pydantic-settings' would be for the CA's settings
    (:func:`meshca.config.load_from_sources`), with the same messages; importing
    pydantic-settings (its providers, argparse, importlib.metadata) would add 5 MiB to
    every agent. Every setting is one flat value, so a later source replaces a key; the
    list settings split a string (a variable, a flag) in their own validators.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_file_values(config_file))
    values.update(environment_values(os.environ))
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AgentSettings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(describe(err, AgentSettings, ENV_PREFIX) for err in exc.errors())
        raise ConfigError(f"invalid agent configuration: {problems}") from exc


def environment_values(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings given as ``MESHCA_AGENT_<NAME>`` variables; names are matched without
    regard to case (as pydantic-settings does), other variables are ignored."""
    wanted = {f"{ENV_PREFIX}{name}".lower(): name for name in AgentSettings.model_fields}
    return {wanted[key.lower()]: value for key, value in environ.items() if key.lower() in wanted}


def _file_values(config_file: Path) -> dict[str, Any]:
    if not config_file.is_file():
        raise ConfigError(f"config file {config_file} does not exist or is not a file")
    if config_file.suffix.lower() not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"config file {config_file} must end in .yaml, .yml or .toml")
    syntax_errors: tuple[type[Exception], ...] = (tomllib.TOMLDecodeError,)
    if config_file.suffix.lower() != ".toml":
        import yaml  # only a YAML config file needs the parser (the agent runs in every pod)

        syntax_errors = (yaml.YAMLError, tomllib.TOMLDecodeError)
    try:
        return read_config_file(config_file)
    except syntax_errors as exc:
        raise syntax_error(config_file, exc) from None
    except OSError as exc:
        raise ConfigError(f"cannot read agent configuration: {exc}") from exc
