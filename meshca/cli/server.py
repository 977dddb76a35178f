"""``meshca server``: run the CA."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import click

from meshca.cli.common import (
    DURATION,
    EXIT_CODES,
    env_option,
    load,
    reports_errors,
    settings_options,
    setup_logging,
)
from meshca.config import Settings

SIGNER_HELP = """\b
Root key (signer), chosen in the config file's signer: section or by MESHCA_SIGNER__*
variables (no flags: the choice belongs with the key's other settings):
  kind: file     root key in <state-dir>/root-key.pem, created on first start
                 (development only)
  kind: pkcs11   an HSM: module, token_label, key_label; the user PIN from
                 MESHCA_PKCS11_PIN (or pin_env / pin_file), never a flag
  kind: gcpkms   Cloud KMS: key_version projects/P/locations/L/keyRings/R/
                 cryptoKeys/K/cryptoKeyVersions/N
  e.g. MESHCA_SIGNER__KIND=pkcs11 MESHCA_SIGNER__MODULE=/usr/lib/softhsm/libsofthsm2.so
       MESHCA_SIGNER__TOKEN_LABEL=meshca
With pkcs11 or gcpkms, create the root first: meshca admin root create --help.
issuing_key: memory (default) keeps intermediate keys in process memory; hsm keeps
them in the PKCS#11 token too (MESHCA_ISSUING_KEY=hsm)."""


@click.command(epilog=SIGNER_HELP + "\n\n" + EXIT_CODES)
@settings_options
@env_option(
    "--trust-domain", env="TRUST_DOMAIN", help="SPIFFE trust domain [default: cluster.local]."
)
@env_option(
    "--grpc-listen",
    env="GRPC_LISTEN",
    metavar="HOST:PORT",
    help="Address of the certificate API [default: 0.0.0.0:15012].",
)
@env_option(
    "--grpc-mtls-listen",
    env="GRPC_MTLS_LISTEN",
    metavar="HOST:PORT|off",
    help="Address where callers renew with their X509-SVID (client certificate required) "
    "[default: 0.0.0.0:15013].",
)
@env_option(
    "--http-listen",
    env="HTTP_LISTEN",
    metavar="HOST:PORT",
    help="Address of the bundle, health and metrics endpoints [default: 0.0.0.0:15014].",
)
@env_option(
    "--plaintext",
    env="PLAINTEXT",
    is_flag=True,
    default=None,
    help="Serve gRPC without TLS. For local development only.",
)
@env_option(
    "--server-dns-name",
    "server_dns_names",
    env="SERVER_DNS_NAMES",
    multiple=True,
    help="DNS name in the CA's own TLS certificate (repeatable) [default: localhost].",
)
@env_option(
    "--k8s-oidc-issuer",
    env="K8S_OIDC_ISSUER",
    metavar="URL",
    help="Validate service-account tokens locally: the issuer ('iss'), whose JWKS is "
    "found by OIDC discovery.",
)
@env_option(
    "--k8s-jwks-url",
    env="K8S_JWKS_URL",
    metavar="URL",
    help="With --k8s-oidc-issuer: fetch the keys from this URL instead of discovery.",
)
@env_option(
    "--k8s-api-server",
    env="K8S_API_SERVER",
    metavar="URL",
    help="Validate service-account tokens with TokenReview on this API server.",
)
@env_option(
    "--k8s-ca-file",
    env="K8S_CA_FILE",
    type=click.Path(path_type=Path, dir_okay=False),
    help="PEM bundle that verifies the API server's or issuer's TLS certificate.",
)
@env_option(
    "--k8s-credentials-file",
    env="K8S_CREDENTIALS_FILE",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File with the bearer token meshca presents for TokenReview (re-read per call).",
)
@env_option(
    "--token-audience",
    env="TOKEN_AUDIENCE",
    multiple=True,
    help="Audience a service-account token must carry (repeatable) [default: istio-ca].",
)
@env_option(
    "--gce-project",
    "gce_projects",
    env="GCE_PROJECTS",
    multiple=True,
    metavar="PROJECT_ID",
    help="Accept GCE instance identity tokens from VMs of this project (repeatable; none: "
    "GCE authentication off). Map VMs to SPIFFE IDs with gce_rules in the config file.",
)
@env_option(
    "--gce-audience",
    env="GCE_AUDIENCE",
    help="Audience GCE identity tokens must carry [default: spiffe://<trust-domain>].",
)
@env_option(
    "--gce-certs-url",
    env="GCE_CERTS_URL",
    metavar="URL",
    help="Google's token-signing keys, a JWK Set "
    "[default: https://www.googleapis.com/oauth2/v3/certs].",
)
@env_option(
    "--max-ttl",
    env="MAX_TTL",
    type=DURATION,
    help="Longest certificate lifetime granted; longer requests are clamped [default: 24h].",
)
@env_option(
    "--default-ttl",
    env="DEFAULT_TTL",
    type=DURATION,
    help="Lifetime when the request names none [default: 1h].",
)
@env_option(
    "--workers",
    env="WORKERS",
    type=click.IntRange(1, 256),
    help="Serving processes sharing the ports, each with its own issuing intermediate "
    "[default: the number of CPUs].",
)
@env_option(
    "--grpc-max-connection-age",
    env="GRPC_MAX_CONNECTION_AGE",
    type=DURATION,
    help="Ask clients to reconnect after this long (GOAWAY; RPCs in flight get 1m to "
    "finish), so connections spread again over workers and replicas [default: 30m].",
)
@env_option(
    "--http-max-connections",
    env="HTTP_MAX_CONNECTIONS",
    type=click.IntRange(1),
    help="HTTP connections one process holds at once (one peer: a quarter of them); more "
    "are answered 503 [default: a quarter of the open-file limit, at most 256].",
)
@env_option(
    "--http-idle-timeout",
    env="HTTP_IDLE_TIMEOUT",
    type=DURATION,
    help="Close an HTTP connection that sends no complete request header this long after "
    "connecting or after its last response [default: 10s].",
)
@env_option(
    "--max-in-flight",
    env="MAX_IN_FLIGHT",
    type=click.IntRange(1),
    help="Requests one process works on at once; more are refused with RESOURCE_EXHAUSTED "
    "[default: 512].",
)
@env_option(
    "--rate-limit-per-peer",
    env="RATE_LIMIT_PER_PEER",
    metavar="RATE|off",
    help="Requests per peer IP address and process, e.g. 500/second [default: 500/second].",
)
@env_option(
    "--rate-limit-per-identity",
    env="RATE_LIMIT_PER_IDENTITY",
    metavar="RATE|off",
    help="Requests per SPIFFE ID and process [default: 100/second].",
)
@env_option(
    "--log-level",
    env="LOG_LEVEL",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="[default: INFO]",
)
@reports_errors
def server(config_file: Path | None, **flags: object) -> None:
    """Run the certificate authority.

    On first start with the default file signer it creates a root key (mode 0600) and a
    self-signed root under the state directory, and a SQLite ledger beside them; later
    starts reuse both.
    """
    try:
        for name in ("server_dns_names", "token_audience", "gce_projects"):
            if flags.get(name) == ():
                flags[name] = None
        settings = load(config_file, **flags)
        setup_logging(settings.log_level, background=True)
        workers = settings.workers or os.cpu_count() or 1
        if workers > 1:
            from meshca.supervisor import Supervisor

            sys.exit(Supervisor(settings, workers).run())
        _serve_alone(settings)
    except Exception as exc:
        if not _caused_by_interrupt(exc):
            raise
        _interrupted_during_start_up()
    except KeyboardInterrupt:
        # Once serving, SIGINT stops the server gracefully (exit 0); a KeyboardInterrupt
        # that gets here came before.
        _interrupted_during_start_up()


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` wraps a KeyboardInterrupt (pydantic, for one, turns an interrupt
    that lands while it builds a validator into a SchemaError)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _interrupted_during_start_up() -> NoReturn:
    """Leave at once, with the code a shell gives SIGINT and no traceback. What could be
    undone already was, on the way here; an interrupt that landed in an import makes the
    interpreter's own exit kill itself with SIGINT instead of returning 130, and that exit
    would also wait for start-up threads still busy."""
    click.echo("meshca: interrupted during start-up", err=True)
    logging.shutdown()
    os._exit(130)


def _serve_alone(settings: Settings) -> None:
    """One process: claim the ports like a supervisor (refused before any state is touched,
    naming the holder), then bind them without SO_REUSEPORT, keeping only the lock."""
    from meshca.server import serve
    from meshca.supervisor import claim_listeners

    settings, claims = claim_listeners(settings)
    try:
        for held in claims:
            held.unreserve()
        asyncio.run(serve(settings))
    finally:
        for held in claims:
            held.release()
