"""``meshca admin root create|list``: CA roots in their key backends.

``create`` makes the key inside the backend (a file, a PKCS#11 token, a Cloud KMS key
version), self-signs the root with it and records it as the active root. Backend options
come from the config file's ``signer`` section, ``MESHCA_SIGNER__*`` variables, or the
flags below; the PKCS#11 PIN only ever from an environment variable or a file.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from meshca.ca.roots import create_root
from meshca.cli.admin_ledger import open_read_only
from meshca.cli.admin_output import echo_json, json_time, output_option
from meshca.cli.common import (
    env_option,
    fail,
    load,
    reports_errors,
    settings_options,
    table,
    utc_text,
)
from meshca.config import FileSignerConfig, GcpKmsSignerConfig, Pkcs11SignerConfig, Settings
from meshca.durations import format_duration, parse_duration
from meshca.errors import ConfigError
from meshca.pki.keys import KeyAlgorithm
from meshca.signers.base import Signer, close_signer
from meshca.store import Store

F = TypeVar("F", bound=Callable[..., Any])


@click.group()
def root() -> None:
    """CA roots: create the first, rotate (prepare, activate, retire), list, status."""


def _signer_section(settings: Settings, kind: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    """The signer config: the file's section (if the same kind), overridden by flags."""
    current = settings.signer.model_dump(mode="json")
    kind = kind or current["kind"]
    section = current if current["kind"] == kind else {"kind": kind}
    section.update({k: v for k, v in flags.items() if v is not None})
    return section


def _create_file_or_pkcs11(settings: Settings, key_type: KeyAlgorithm) -> Signer:
    config = settings.signer
    if isinstance(config, FileSignerConfig):
        from meshca.signers.factory import file_key_path
        from meshca.signers.file import FileSigner

        return FileSigner.create(file_key_path(config, settings.state_dir), key_type)
    assert isinstance(config, Pkcs11SignerConfig)
    from meshca.signers.pkcs11 import Pkcs11Signer

    return Pkcs11Signer.create(config, key_type)


def _create_kms_version(
    settings: Settings,
    key_type: KeyAlgorithm,
    crypto_key: str | None,
    protection_level: str,
    endpoint: str | None,
    insecure: bool | None,
) -> Signer:
    from meshca.signers.gcpkms import GcpKmsSigner

    if not crypto_key:
        raise ConfigError(
            "--kms-crypto-key projects/P/locations/L/keyRings/R/cryptoKeys/K is required: "
            "a new key version is created there"
        )
    configured = settings.signer if isinstance(settings.signer, GcpKmsSignerConfig) else None
    return GcpKmsSigner.create_version(
        crypto_key,
        key_type,
        protection_level="software" if protection_level == "software" else "hsm",
        endpoint=endpoint or (configured.endpoint if configured else None),
        insecure_endpoint=bool(
            insecure if insecure is not None else configured and configured.insecure_endpoint
        ),
        timeout=configured.timeout if configured else timedelta(seconds=10),
    )


_BACKEND_OPTIONS: tuple[Callable[[F], F], ...] = (
    click.option(
        "--signer",
        "kind",
        type=click.Choice(["file", "pkcs11", "gcpkms"]),
        help="Key backend [default: the config file's signer.kind, else file].",
    ),
    click.option(
        "--key-type",
        type=click.Choice([a.value for a in KeyAlgorithm]),
        help="Root key algorithm [default: the signer's key_type, else ec-p256].",
    ),
    click.option("--trust-domain", help="SPIFFE trust domain [default: from config]."),
    click.option("--key-file", type=click.Path(path_type=Path), help="file: where the key goes."),
    env_option(
        "--pkcs11-module",
        env="PKCS11_MODULE",
        type=click.Path(path_type=Path),
        help="pkcs11: the vendor library, e.g. /usr/lib/softhsm/libsofthsm2.so.",
    ),
    env_option("--pkcs11-token-label", env="PKCS11_TOKEN_LABEL", help="pkcs11: token label."),
    env_option("--pkcs11-key-label", env="PKCS11_KEY_LABEL", help="pkcs11: key label."),
    env_option(
        "--pkcs11-pin-file",
        env="PKCS11_PIN_FILE",
        type=click.Path(path_type=Path),
        help="pkcs11: file holding the user PIN [default: $MESHCA_PKCS11_PIN].",
    ),
    env_option(
        "--kms-crypto-key",
        env="KMS_CRYPTO_KEY",
        help="gcpkms: projects/P/locations/L/keyRings/R/cryptoKeys/K.",
    ),
    click.option(
        "--kms-protection-level",
        type=click.Choice(["hsm", "software"]),
        default="hsm",
        show_default=True,
        help="gcpkms: protection level of a new CryptoKey.",
    ),
    env_option("--kms-endpoint", env="KMS_ENDPOINT", help="gcpkms: API endpoint HOST:PORT."),
    click.option(
        "--kms-insecure-endpoint",
        is_flag=True,
        default=None,
        help="gcpkms: plaintext to --kms-endpoint without credentials (emulators only).",
    ),
)


def backend_options(func: F) -> F:
    """--signer, --key-type, --trust-domain and each backend's flags (see ``new_root_key``)."""
    for option in reversed(_BACKEND_OPTIONS):
        func = option(func)
    return func


@root.command()
@settings_options
@backend_options
@click.option("--ttl", default="10y", show_default=True, help="Root certificate lifetime.")
@reports_errors
def create(
    config_file: Path | None,
    state_dir: Path | None,
    database_url: str | None,
    ttl: str,
    **backend: Any,
) -> None:
    """Create a root key in the backend, self-sign the root, record it as active."""
    settings = settings_for_new_key(config_file, state_dir, database_url, backend)
    lifetime = root_lifetime(ttl)
    store = Store.open(settings.effective_database_url)
    try:
        active = store.active_root()
        if active is not None:
            fail(
                f"an active root exists ({active.fingerprint[:16]}, {active.backend}: "
                f"{active.key_ref}); a second root is a rotation: "
                "`meshca admin root prepare`, then `activate` and `retire`",
                1,
            )
        signer = new_root_key(settings, backend)
        try:
            record = create_root(
                store, signer, settings.trust_domain_value, ttl=lifetime, now=datetime.now(UTC)
            )
        finally:
            close_signer(signer)
    finally:
        store.close()
    click.echo(
        f"root {record.fingerprint} created, valid until {utc_text(record.not_after)} "
        f"({format_duration(lifetime)})"
    )
    click.echo(f"  subject: {record.subject}")
    click.echo(f"  key:     {record.backend}: {record.key_ref}")
    if record.backend == "gcpkms":
        click.echo(
            f"configure the server with signer.kind=gcpkms, signer.key_version={record.key_ref}"
        )
    elif record.backend == "pkcs11":
        click.echo(
            "configure the server with the same signer section (kind=pkcs11, module, "
            "token_label, key_label; PIN from the environment or pin_file)"
        )


def settings_for_new_key(
    config_file: Path | None,
    state_dir: Path | None,
    database_url: str | None,
    backend: dict[str, Any],
    defaults: dict[str, Any] | None = None,
) -> Settings:
    """Settings whose signer section is the file's, overridden by the backend flags
    (``defaults`` fill flags the operator left out: where a rotation's new key goes)."""
    trust_domain = backend["trust_domain"]
    settings = load(
        config_file, state_dir=state_dir, database_url=database_url, trust_domain=trust_domain
    )
    chosen = backend["kind"] or settings.signer.kind
    if chosen == "gcpkms":
        return settings
    flags: dict[str, Any] = {"key_type": backend["key_type"]}
    if chosen == "file":
        flags["key_file"] = str(backend["key_file"]) if backend["key_file"] else None
    else:
        flags.update(
            module=str(backend["pkcs11_module"]) if backend["pkcs11_module"] else None,
            token_label=backend["pkcs11_token_label"],
            key_label=backend["pkcs11_key_label"],
            pin_file=str(backend["pkcs11_pin_file"]) if backend["pkcs11_pin_file"] else None,
        )
    section = _signer_section(settings, chosen, flags)
    for name, value in (defaults or {}).items():
        if flags.get(name) is None:
            section[name] = value
    return load(
        config_file,
        state_dir=state_dir,
        database_url=database_url,
        trust_domain=trust_domain,
        signer=section,
    )


def root_lifetime(ttl: str) -> timedelta:
    try:
        lifetime = parse_duration(ttl)
    except ValueError as exc:
        fail(f"--ttl: {exc}", 2)
    if lifetime < timedelta(days=1):
        fail(f"--ttl {ttl} is too short for a root; use days or years", 2)
    return lifetime


def new_root_key(settings: Settings, backend: dict[str, Any]) -> Signer:
    """Make a new key in the chosen backend (the settings' signer section, or --signer)."""
    chosen = backend["kind"] or settings.signer.kind
    key_type = backend["key_type"]
    algorithm = KeyAlgorithm(key_type or str(getattr(settings.signer, "key_type", "ec-p256")))
    click.echo(f"creating a {algorithm} key in the {chosen} backend ...")
    if chosen == "gcpkms":
        return _create_kms_version(
            settings,
            algorithm,
            backend["kms_crypto_key"],
            backend["kms_protection_level"],
            backend["kms_endpoint"],
            backend["kms_insecure_endpoint"],
        )
    return _create_file_or_pkcs11(settings, algorithm)


@root.command(name="list")
@settings_options
@output_option
@reports_errors
def list_roots(
    config_file: Path | None, state_dir: Path | None, database_url: str | None, output: str
) -> None:
    """Every root: backend, key reference, algorithm, fingerprint, notAfter, state."""
    store = open_read_only(config_file, state_dir, database_url)
    try:
        roots = store.list_roots()
    finally:
        store.close()
    if output == "json":
        echo_json(
            [
                {
                    "fingerprint": r.fingerprint,
                    "state": r.state,
                    "backend": r.backend,
                    "key_ref": r.key_ref,
                    "algorithm": r.algorithm,
                    "subject": r.subject,
                    "not_before": json_time(r.not_before),
                    "not_after": json_time(r.not_after),
                }
                for r in roots
            ]
        )
        return
    if not roots:
        click.echo("no roots recorded; `meshca admin root create` makes one")
        return
    click.echo(
        table(
            ["fingerprint", "state", "backend", "key", "algorithm", "not after"],
            [
                [r.fingerprint, r.state, r.backend, r.key_ref, r.algorithm, utc_text(r.not_after)]
                for r in roots
            ],
        )
    )
