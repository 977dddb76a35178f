"""The proxy's settings: listeners from ``--inbound`` / ``--outbound``, limits, outputs.

    --inbound  LISTEN=APP_ADDR[,http]
    --outbound LISTEN=REMOTE_ADDR,EXPECTED_SPIFFE_ID[,EXPECTED_SPIFFE_ID...][,http]

Addresses are HOST:PORT (IPv6 in brackets). ``http`` declares the traffic HTTP/1.1, which
adds one access-log line per request. An expected SPIFFE ID may use ``*`` for one path
segment, like the policy file. An outbound LISTEN must be a loopback address: whatever
reaches it calls out, unauthenticated, with the workload's identity.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from meshca.errors import ConfigError
from meshca.proxy.policy import IdPattern
from meshca.proxy.tls import TLS_VERSIONS

HTTP_FLAG = "http"


def split_host_port(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) -> (host, port); ConfigError with an example."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} {text!r} must be HOST:PORT, e.g. 127.0.0.1:8443")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class Inbound:
    """mTLS in on ``listen``, plain TCP to the application at ``app``."""

    listen: str
    app: tuple[str, int]
    http: bool = False

    @classmethod
    def parse(cls, text: str) -> Inbound:
        listen, sep, rest = text.partition("=")
        parts = [p.strip() for p in rest.split(",")]
        http = parts[-1] == HTTP_FLAG
        if http:
            parts.pop()
        if not sep or len(parts) != 1:
            raise ConfigError(
                f"--inbound {text!r} must be LISTEN=APP_ADDR[,http], "
                "e.g. 0.0.0.0:8443=127.0.0.1:8080"
            )
        split_host_port(listen, "--inbound listen address")
        return cls(listen.strip(), split_host_port(parts[0], "--inbound application address"), http)


@dataclass(frozen=True, slots=True)
class Outbound:
    """Plain TCP in on ``listen`` (loopback), mTLS out to ``remote`` whose SPIFFE ID must
    match one of ``expected``."""

    listen: str
    remote: tuple[str, int]
    expected: tuple[IdPattern, ...]
    http: bool = False

    @classmethod
    def parse(cls, text: str) -> Outbound:
        listen, sep, rest = text.partition("=")
        parts = [p.strip() for p in rest.split(",")]
        http = parts[-1] == HTTP_FLAG
        if http:
            parts.pop()
        if not sep or len(parts) < 2:
            raise ConfigError(
                f"--outbound {text!r} must be LISTEN=REMOTE_ADDR,EXPECTED_SPIFFE_ID[,...][,http], "
                "e.g. 127.0.0.1:9001=10.0.0.7:8443,spiffe://cluster.local/ns/default/sa/api"
            )
        host, _ = split_host_port(listen, "--outbound listen address")
        if not _is_loopback(host):
            raise ConfigError(
                f"--outbound listen address {listen.strip()!r} is not a loopback address: "
                "anything that reaches it could make calls with this workload's identity; "
                "listen on 127.0.0.1 or [::1] (the application connects there)"
            )
        remote = split_host_port(parts[0], "--outbound remote address")
        try:
            expected = tuple(IdPattern.parse(p) for p in parts[1:])
        except ConfigError as exc:
            raise ConfigError(f"--outbound {text!r}: {exc.message}") from None
        return cls(listen.strip(), remote, expected, http)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


@dataclass(frozen=True, slots=True)
class Limits:
    """Timeouts in seconds; ``max_connections`` per worker process.

    ``max_handshakes_per_peer``: inbound connections one peer address (an IPv6 /64) may
    have in the TLS handshake at once, per worker; before the handshake a peer has
    proved nothing, and without this one host could hold every connection slot with
    connections that never finish a handshake.
    """

    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    connect_timeout: float = 5.0
    max_connections: int = 10_000
    max_handshakes_per_peer: int = 128


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything one proxy process needs; picklable, for worker processes."""

    inbound: tuple[Inbound, ...] = ()
    outbound: tuple[Outbound, ...] = ()
    workload_api_socket: Path | None = None
    policy_file: Path | None = None
    access_log: Path | None = None  # None: standard output
    access_log_refusal_rate: int = 100  # refused-connection lines a second, per process
    http_listen: str | None = None
    workers: int = 1
    tls_min_version: str = "1.3"
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.tls_min_version not in TLS_VERSIONS:
            raise ConfigError(
                f"TLS minimum version is {self.tls_min_version!r}; allowed: "
                f"{', '.join(TLS_VERSIONS)}"
            )
        if not self.inbound and not self.outbound:
            raise ConfigError("nothing to proxy: give at least one --inbound or --outbound")
        if self.access_log_refusal_rate < 0:
            raise ConfigError(
                f"--access-log-refusal-rate is {self.access_log_refusal_rate}; "
                "allowed: 0 (no limit) or more"
            )
        if self.workers < 1:
            raise ConfigError(f"--workers is {self.workers}; allowed: 1 or more")
        listens = [i.listen for i in self.inbound] + [o.listen for o in self.outbound]
        if len(set(listens)) != len(listens):
            raise ConfigError(f"a LISTEN address is used twice: {', '.join(listens)}")
        if self.http_listen is not None:
            split_host_port(self.http_listen, "--http-listen")
