"""``meshca agent``: the node agent (one per pod as a sidecar, or one per VM)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from meshca.cli.common import DURATION, env_option, fail, reports_errors, setup_logging
from meshca.pki.keys import KeyAlgorithm

F = TypeVar("F", bound=Callable[..., Any])

PATH = click.Path(path_type=Path)
FILE = click.Path(path_type=Path, dir_okay=False)
DIR = click.Path(path_type=Path, file_okay=False)


class _Lines(click.ParamType[str]):
    """Text whose environment variable holds one value per line (or ``;``-separated)."""

    name = "text"

    def split_envvar_value(self, rv: str) -> list[str]:
        return [part.strip() for part in re.split(r"[\n;]", rv) if part.strip()]


class _UsageError(click.ClickException):
    """A bad flag: one line on stderr, exit code 2 (as for a bad configuration)."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"meshca: error: {self.format_message()} (see 'meshca agent --help')", err=True)


class _AgentCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _UsageError(exc.format_message()) from None


def agent_option(*decls: str, env: str, **kwargs: Any) -> Callable[[F], F]:
    """An option that also reads ``MESHCA_AGENT_<env>`` and shows it in --help."""
    return env_option(*decls, env=f"AGENT_{env}", **kwargs)


@click.command(cls=_AgentCommand)
@agent_option(
    "--config",
    "config_file",
    env="CONFIG",
    type=FILE,
    help="YAML or TOML config file; flags and MESHCA_AGENT_* variables override it.",
)
@agent_option(
    "--ca-address", env="CA_ADDRESS", metavar="HOST:PORT", help="The CA's gRPC port (required)."
)
@agent_option(
    "--ca-trust-bundle",
    env="CA_TRUST_BUNDLE",
    type=FILE,
    help="PEM file of the CA's roots, re-read periodically (e.g. from a ConfigMap).",
)
@agent_option(
    "--ca-bundle-url",
    env="CA_BUNDLE_URL",
    metavar="URL",
    help="Instead of a file: the CA's bundle endpoint, e.g. http://meshca:15014/v1/bundle; "
    "needs --ca-bundle-sha256.",
)
@agent_option(
    "--ca-bundle-sha256",
    env="CA_BUNDLE_SHA256",
    metavar="HEX[,HEX]",
    help="SHA-256 fingerprint(s) of a root; the bundle from --ca-bundle-url is accepted, "
    "whole, only if it holds one of them.",
)
@agent_option(
    "--ca-plaintext",
    env="CA_PLAINTEXT",
    is_flag=True,
    default=None,
    help="Talk to the CA without TLS and verify nothing. For local development only.",
)
@agent_option(
    "--ca-server-name",
    env="CA_SERVER_NAME",
    help="Name the CA's TLS certificate must carry [default: the host of --ca-address].",
)
@agent_option(
    "--mtls-address",
    env="MTLS_ADDRESS",
    metavar="HOST:PORT|off",
    help="The CA's SVID-renewal port (e.g. :15013). With it, the first certificate is "
    "requested with the token and renewals with the SVID held (falling back to the token "
    "if refused); required with --credential svid.",
)
@agent_option(
    "--cluster-id",
    env="CLUSTER_ID",
    help="Sent as the 'clusterid' header: which of the CA's clusters validates the token.",
)
@agent_option(
    "--trust-domain", env="TRUST_DOMAIN", help="SPIFFE trust domain [default: cluster.local]."
)
@agent_option(
    "--credential",
    env="CREDENTIAL",
    type=click.Choice(["k8s", "gce", "join-token", "svid"]),
    help="What the agent proves its identity with: a projected service-account token "
    "(k8s), the VM's GCE instance identity token (gce), a single-use join token for its "
    "first certificate (join-token; from meshca admin join-token create) or its SVID on "
    "the mTLS port (svid) [default: k8s].",
)
@agent_option(
    "--token-file",
    env="TOKEN_FILE",
    type=PATH,
    help="Projected service-account token (audience istio-ca), re-read for every request; "
    "with --credential join-token, the file holding the join token "
    "[default: /var/run/secrets/tokens/istio-token].",
)
@agent_option(
    "--gce-metadata-url",
    env="GCE_METADATA_URL",
    metavar="URL",
    help="With --credential gce: the metadata server, asked for a fresh identity token "
    "before every request [default: http://metadata.google.internal].",
)
@agent_option(
    "--gce-audience",
    env="GCE_AUDIENCE",
    help="With --credential gce: the token's audience, as the CA expects it "
    "[default: spiffe://<trust-domain>].",
)
@agent_option(
    "--svid-cert-file",
    env="SVID_CERT_FILE",
    type=FILE,
    help="With --credential svid: the SVID chain (PEM) to start from.",
)
@agent_option(
    "--svid-key-file",
    env="SVID_KEY_FILE",
    type=FILE,
    help="With --credential svid: the key of --svid-cert-file.",
)
@agent_option(
    "--ttl",
    env="TTL",
    type=DURATION,
    help="Certificate lifetime to request; the CA may grant less [default: 1h].",
)
@agent_option(
    "--renew-ratio",
    env="RENEW_RATIO",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Renew after this fraction of the certificate's life [default: 0.5].",
)
@agent_option(
    "--renew-jitter",
    env="RENEW_JITTER",
    type=click.FloatRange(0, 1, max_open=True),
    help="Random spread of the renewal time, as a fraction of the life (+/- half of it) "
    "[default: 0.1].",
)
@agent_option(
    "--key-type",
    env="KEY_TYPE",
    type=click.Choice([k.value for k in KeyAlgorithm]),
    help="Key made for every certificate [default: ec-p256].",
)
@agent_option(
    "--request-timeout",
    env="REQUEST_TIMEOUT",
    type=DURATION,
    help="Deadline of each call to the CA and each bundle fetch [default: 10s].",
)
@agent_option(
    "--backoff-initial",
    env="BACKOFF_INITIAL",
    type=DURATION,
    help="First retry delay after a failure (doubling, with full jitter) [default: 1s].",
)
@agent_option(
    "--backoff-max",
    env="BACKOFF_MAX",
    type=DURATION,
    help="Longest retry delay; refusals that retrying cannot fix wait this long [default: 60s].",
)
@agent_option(
    "--bundle-refresh-interval",
    env="BUNDLE_REFRESH_INTERVAL",
    type=DURATION,
    help="How often the trust bundle is re-read from its file or URL [default: 5m].",
)
@agent_option(
    "--workload-api-socket",
    env="WORKLOAD_API_SOCKET",
    type=PATH,
    help="Serve the SPIFFE Workload API on this Unix socket.",
)
@agent_option(
    "--sds-socket", env="SDS_SOCKET", type=PATH, help="Serve Envoy SDS on this Unix socket."
)
@agent_option(
    "--output-dir",
    env="OUTPUT_DIR",
    type=DIR,
    help="Write cert-chain.pem, key.pem (0600) and root-cert.pem here on every rotation.",
)
@agent_option(
    "--reload-command",
    env="RELOAD_COMMAND",
    metavar="CMD",
    help="Run after each file write, e.g. 'nginx -s reload' (split into words, no shell).",
)
@agent_option(
    "--reload-signal",
    env="RELOAD_SIGNAL",
    metavar="SIGNAL",
    help="Instead of a command: send this signal (e.g. HUP) to the pid in --reload-pid-file.",
)
@agent_option(
    "--reload-pid-file",
    env="RELOAD_PID_FILE",
    type=FILE,
    help="File holding the pid to signal, e.g. /run/nginx.pid.",
)
@agent_option(
    "--socket-mode",
    env="SOCKET_MODE",
    metavar="OCTAL",
    help="Mode of the SDS and Workload API sockets [default: 0600].",
)
@agent_option("--socket-owner", env="SOCKET_OWNER", help="Owner (name or uid) of the sockets.")
@agent_option("--socket-group", env="SOCKET_GROUP", help="Group (name or gid) of the sockets.")
@agent_option(
    "--http-listen",
    env="HTTP_LISTEN",
    metavar="HOST:PORT",
    help="Serve /healthz, /readyz and Prometheus /metrics here [default: off].",
)
@agent_option(
    "--inbound",
    env="INBOUND",
    multiple=True,
    metavar="LISTEN=APP_ADDR[,http]",
    help="Run the mTLS proxy in this process (as 'meshca proxy --inbound'; repeatable).",
)
@agent_option(
    "--outbound",
    env="OUTBOUND",
    multiple=True,
    metavar="LISTEN=REMOTE_ADDR,SPIFFE_ID[,...][,http]",
    help="The in-process proxy's outbound routes (as 'meshca proxy --outbound').",
)
@agent_option(
    "--proxy-policy",
    env="PROXY_POLICY",
    type=FILE,
    help="The in-process proxy's policy file (as 'meshca proxy --policy').",
)
@agent_option(
    "--proxy-access-log",
    env="PROXY_ACCESS_LOG",
    metavar="PATH|-",
    help="The in-process proxy's access log [default: - (standard output)].",
)
@agent_option(
    "--attestation",
    env="ATTESTATION",
    type=click.Choice(["none", "k8s", "unix"]),
    help="Whom the sockets serve: the agent's own identity to everyone who can connect "
    "(none), each calling pod its own (k8s: one agent per node, with --kubelet-url), or "
    "each process by --unix-workload rules (unix) [default: none].",
)
@agent_option(
    "--kubelet-url",
    env="KUBELET_URL",
    metavar="URL",
    help="With --attestation k8s: the kubelet's authenticated port, e.g. https://$(NODE_IP):10250.",
)
@agent_option(
    "--kubelet-ca-file",
    env="KUBELET_CA_FILE",
    type=FILE,
    help="PEM bundle that verifies the kubelet's certificate "
    "[default: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt].",
)
@agent_option(
    "--kubelet-token-file",
    env="KUBELET_TOKEN_FILE",
    type=FILE,
    help="Bearer token for the kubelet, re-read for every request "
    "[default: /var/run/secrets/kubernetes.io/serviceaccount/token].",
)
@agent_option(
    "--proc-root",
    env="PROC_ROOT",
    type=DIR,
    help="Where calling processes are looked up (<dir>/<pid>/cgroup) [default: /proc].",
)
@agent_option(
    "--attestation-timeout",
    env="ATTESTATION_TIMEOUT",
    type=DURATION,
    help="How long a caller the agent cannot place yet (its pod not listed yet) waits "
    "before it is refused [default: 10s].",
)
@agent_option(
    "--identity-idle-grace",
    env="IDENTITY_IDLE_GRACE",
    type=DURATION,
    help="An identity unused this long (and held by no pod of the node) is dropped [default: 1m].",
)
@agent_option(
    "--unix-workload",
    "unix_workloads",
    env="UNIX_WORKLOADS",
    type=_Lines(),
    multiple=True,
    metavar="'SPIFFE_ID uid=N gid=N path=/exe'",
    help="With --attestation unix: processes matching every condition given get the ID "
    "(repeatable; a path is in --trust-domain; in the variable, one rule per line or ';').",
)
@agent_option(
    "--log-level",
    env="LOG_LEVEL",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="[default: INFO]",
)
@reports_errors
def agent(config_file: Path | None, **flags: object) -> None:
    """Run the node agent: keys made here, certificates from the CA, renewed before
    expiry and delivered to the data plane.

    \b
    Exactly one trust anchor: --ca-trust-bundle, --ca-bundle-url with
    --ca-bundle-sha256, or --ca-plaintext (development only). Delivery paths, each on
    its own or together: --sds-socket (Envoy), --workload-api-socket (SPIFFE clients),
    --output-dir (files, with --reload-command or --reload-signal/--reload-pid-file).

    One agent per node: --attestation k8s serves each pod calling the sockets its own
    identity (obtained from the CA on its behalf); --attestation unix, each process
    matching a --unix-workload rule.

    At start the agent always requests a fresh certificate with a new key. It renews at
    --renew-ratio of the certificate's life and, while the CA is unreachable, keeps
    serving the last valid certificate. SIGHUP renews at once (after fixing what made
    the CA refuse); SIGTERM stops. Durations: 90s, 30m, 1h.
    """
    from meshca.agent.config import load_agent_settings
    from meshca.errors import ConfigError

    for name in ("inbound", "outbound", "unix_workloads"):  # not given: the file's value
        flags[name] = flags[name] or None
    try:
        settings = load_agent_settings(config_file, **flags)
    except ConfigError as exc:
        fail(exc.message, 2)
    setup_logging(settings.log_level)
    from meshca.agent.run import run_agent

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_agent(settings))
