"""``meshca proxy``: the mTLS sidecar proxy (see meshca.proxy)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from meshca.cli.common import DURATION, env_option, fail, reports_errors, setup_logging

FILE = click.Path(path_type=Path, dir_okay=False)


@click.command()
@env_option(
    "--workload-api-socket",
    env="PROXY_WORKLOAD_API_SOCKET",
    type=click.Path(path_type=Path),
    help="The agent's SPIFFE Workload API socket (meshca agent --workload-api-socket).",
)
@env_option(
    "--inbound",
    env="PROXY_INBOUND",
    multiple=True,
    metavar="LISTEN=APP_ADDR[,http]",
    help="Terminate mTLS on LISTEN and forward to the local application (repeatable); "
    "',http' adds one access-log line per HTTP/1.1 request.",
)
@env_option(
    "--outbound",
    env="PROXY_OUTBOUND",
    multiple=True,
    metavar="LISTEN=REMOTE_ADDR,SPIFFE_ID[,...][,http]",
    help="Accept plain TCP on LISTEN (a loopback address) and open mTLS to REMOTE_ADDR, "
    "whose SPIFFE ID must be one of those given ('*' = one path segment) (repeatable).",
)
@env_option(
    "--policy",
    env="PROXY_POLICY",
    type=FILE,
    help="Allow/deny lists of SPIFFE IDs per inbound listener (YAML), reloaded on change; "
    "with it, whatever it does not allow is refused [default: any ID of the trust domain].",
)
@env_option(
    "--access-log",
    env="PROXY_ACCESS_LOG",
    default="-",
    show_default=True,
    metavar="PATH|-",
    help="JSON lines, one per connection (and per HTTP request); reopened on SIGHUP or "
    "when the file is moved away.",
)
@env_option(
    "--access-log-refusal-rate",
    env="PROXY_ACCESS_LOG_REFUSAL_RATE",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="At most this many lines a second (per worker) for refused connections; the "
    "rest are counted in one line a second (0: no limit).",
)
@env_option(
    "--http-listen",
    env="PROXY_HTTP_LISTEN",
    metavar="HOST:PORT",
    help="Serve /healthz, /readyz and Prometheus /metrics here [default: off].",
)
@env_option(
    "--workers",
    env="PROXY_WORKERS",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes sharing the ports (SO_REUSEPORT); about one per CPU core.",
)
@env_option(
    "--tls-min-version",
    env="PROXY_TLS_MIN_VERSION",
    type=click.Choice(["1.3", "1.2"]),
    default="1.3",
    show_default=True,
    help="1.2 only for peers that cannot do 1.3 (ECDHE with AES-GCM or ChaCha20 then).",
)
@env_option(
    "--handshake-timeout",
    env="PROXY_HANDSHAKE_TIMEOUT",
    type=DURATION,
    default="10s",
    show_default=True,
    help="Longest TLS handshake.",
)
@env_option(
    "--idle-timeout",
    env="PROXY_IDLE_TIMEOUT",
    type=DURATION,
    default="5m",
    show_default=True,
    help="Close a connection silent both ways this long (0: never).",
)
@env_option(
    "--connect-timeout",
    env="PROXY_CONNECT_TIMEOUT",
    type=DURATION,
    default="5s",
    show_default=True,
    help="Longest wait for the application or the remote to accept.",
)
@env_option(
    "--max-connections",
    env="PROXY_MAX_CONNECTIONS",
    type=click.IntRange(min=1),
    default=10000,
    show_default=True,
    help="Open connections per worker; more are closed.",
)
@env_option(
    "--max-handshakes-per-peer",
    env="PROXY_MAX_HANDSHAKES_PER_PEER",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="TLS handshakes one client address (an IPv6 /64) may have in progress at once, "
    "per worker; more are closed, so one host cannot hold every connection.",
)
@env_option(
    "--log-level",
    env="PROXY_LOG_LEVEL",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@reports_errors
def proxy(
    workload_api_socket: Path | None,
    inbound: tuple[str, ...],
    outbound: tuple[str, ...],
    policy: Path | None,
    access_log: str,
    access_log_refusal_rate: int,
    http_listen: str | None,
    workers: int,
    tls_min_version: str,
    handshake_timeout: object,
    idle_timeout: object,
    connect_timeout: object,
    max_connections: int,
    max_handshakes_per_peer: int,
    log_level: str,
) -> None:
    """Run the mTLS sidecar proxy with the agent's X509-SVID.

    \b
    Inbound: mutual TLS in (TLS 1.3, a client SVID of the trust domain required), the
    policy applied, plain TCP to the application. Outbound: plain TCP in from the
    application, mutual TLS out, the server's SPIFFE ID checked before a byte is sent.
    Every connection is logged as one JSON line naming the peer's SPIFFE ID and address.

    Until the agent hands over a certificate, connections are refused and /readyz says
    "not ready". SIGHUP reopens the access log and re-reads the policy; SIGTERM stops.
    """
    from meshca.durations import parse_duration
    from meshca.errors import ConfigError
    from meshca.proxy.config import Inbound, Limits, Outbound, ProxyConfig

    def seconds(value: object) -> float:
        assert isinstance(value, str)  # DURATION checked the syntax
        return parse_duration(value).total_seconds()

    try:
        config = ProxyConfig(
            inbound=tuple(Inbound.parse(i) for i in inbound),
            outbound=tuple(Outbound.parse(o) for o in outbound),
            workload_api_socket=workload_api_socket,
            policy_file=policy,
            access_log=None if access_log == "-" else Path(access_log),
            access_log_refusal_rate=access_log_refusal_rate,
            http_listen=http_listen,
            workers=workers,
            tls_min_version=tls_min_version,
            limits=Limits(
                handshake_timeout=seconds(handshake_timeout),
                idle_timeout=seconds(idle_timeout),
                connect_timeout=seconds(connect_timeout),
                max_connections=max_connections,
                max_handshakes_per_peer=max_handshakes_per_peer,
            ),
        )
        if workload_api_socket is None:
            raise ConfigError(
                "--workload-api-socket is required: the agent's Workload API socket "
                "(or run the proxy inside the agent: meshca agent --inbound/--outbound)"
            )
    except ConfigError as exc:
        fail(exc.message, 2)
    setup_logging(log_level)
    if config.workers > 1:
        from meshca.proxy.workers import run_workers

        run_workers(config, log_level)
        return
    import asyncio

    from meshca.proxy.run import event_loop_factory, run_proxy

    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=event_loop_factory()) as runner,
    ):
        runner.run(run_proxy(config))
