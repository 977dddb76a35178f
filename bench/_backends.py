"""Where meshca's root key lives during a benchmark run: a file, SoftHSM2, or a KMS emulator.

``--signer file`` (the default) is meshca's embedded default: the server makes
``root-key.pem`` in its state directory on first start; nothing to prepare.

``--signer pkcs11``: a SoftHSM2 of the run's own, under the temp dir. A ``softhsm2.conf``
whose token directory is ``<tmp>/softhsm/tokens`` (the system's /var/lib/softhsm is never
touched), one token initialised with ``softhsm2-util --init-token --free --label
meshca-bench`` and a user PIN and SO PIN made at random for the run. Every meshca process
(``admin root create``, ``server`` and its workers) gets ``SOFTHSM2_CONF`` and the user PIN
in ``MESHCA_PKCS11_PIN`` through its environment, never on its command line; the load
generators get neither. softhsm2-util itself only takes PINs as arguments or typed at a
terminal, so they appear on its command line for the instant it runs (hsm/README.md says
the same); the token is thrown away with the temp dir. ``--issuing-key hsm`` adds
``issuing_key: hsm``: each worker's issuing intermediate is then a session key in the same
token, and every workload certificate is signed there.

``--signer gcpkms``: the Cloud KMS emulator of the test suite (``tests/fakes/kms.py``,
``FakeKms``, imported from the repository's ``tests`` package) serving real gRPC on a
loopback port inside the benchmark process. The key ring is made directly; the CryptoKey
and its version by ``meshca admin root create --signer gcpkms``, as an operator would.
The emulator counts every RPC, so the report shows how many ``AsymmetricSign`` calls
meshca made during the window (none are expected: KMS signs intermediates only).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from _procs import BenchError
from _report import kms_calls

SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
"""Where distributions put libsofthsm2 (the list tests/fakes/softhsm.py searches)."""
TOKEN_LABEL = "meshca-bench"
KEY_LABEL = "meshca-bench-root"
PIN_ENV = "MESHCA_PKCS11_PIN"
KMS_KEY_RING = "projects/meshca-bench/locations/global/keyRings/bench"
KMS_CRYPTO_KEY = f"{KMS_KEY_RING}/cryptoKeys/meshca-root"
KEY_TYPE = "ec-p256"
ROOT_CREATE_TIMEOUT = 120.0


class _Kms(Protocol):
    """What the benchmark uses of tests/fakes/kms.py's FakeKms."""

    @property
    def endpoint(self) -> str: ...

    @property
    def calls(self) -> dict[str, int]: ...

    def add_key_ring(self, name: str) -> None: ...

    def stop(self) -> None: ...


@dataclass
class RootBackend:
    """The root-key backend of one run: config for meshca, environment, counters."""

    kind: str
    """``file``, ``pkcs11`` or ``gcpkms``: meshca's ``signer.kind``."""
    issuing_key: str
    description: str
    signer: dict[str, Any] | None = None
    """The config's ``signer`` section (None: meshca's default, the file signer)."""
    env: dict[str, str] = field(default_factory=dict, repr=False)
    """Added to the environment of every meshca process (holds the PKCS#11 PIN)."""
    root_flags: list[str] = field(default_factory=list)
    """``meshca admin root create`` flags beyond --config/--state-dir."""
    kms: _Kms | None = None
    root_ref: str | None = None

    def settings(self) -> dict[str, Any]:
        """Top-level config entries for meshca.yaml."""
        extra: dict[str, Any] = {}
        if self.signer is not None:
            extra["signer"] = self.signer
        if self.issuing_key != "memory":
            extra["issuing_key"] = self.issuing_key
        return extra

    def environ(self) -> dict[str, str]:
        """The benchmark's environment plus this backend's variables, for meshca."""
        return {**os.environ, **self.env}

    def kms_calls(self) -> dict[str, int] | None:
        """RPCs the KMS emulator has answered so far, by method (None: no emulator)."""
        if self.kms is None:
            return None
        return dict(self.kms.calls)

    def notes(self, window_calls: dict[str, int] | None, meshca_log: str) -> list[str]:
        """What the report should say about the root backend after a run."""
        notes = [f"root key: {self.description}"]
        total = self.kms_calls()
        if total is not None:
            notes.append(
                f"KMS emulator calls from root create to server stop: {kms_calls(total)} "
                "(AsymmetricSign: the root's self-signature and one per intermediate)"
            )
        if window_calls and window_calls.get("AsymmetricSign"):
            notes.append(
                f"KMS signed {window_calls['AsymmetricSign']} times during the window: "
                "expected 0 (the root signs intermediates only)"
            )
        if self.issuing_key == "hsm":
            destroyed = meshca_log.count("destroying retired issuing key pkcs11:")
            notes.append(
                f"{destroyed} issuing key(s) in the token destroyed at stop (session objects, "
                "one per worker)"
                if destroyed
                else "no 'destroying retired issuing key pkcs11:' line in meshca's log "
                "(log level above info?): issuing keys in the token not confirmed"
            )
        return notes

    def create_root(
        self, meshca: Sequence[str], config: Path, state: Path, log: Path, cwd: Path
    ) -> list[str] | None:
        """Run ``meshca admin root create`` for backends that need it; return its argv.

        For gcpkms the new key version's name is read from the command's output and
        becomes ``signer.key_version``.
        """
        if self.kind == "file":
            return None
        argv = [
            *meshca,
            "admin",
            "root",
            "create",
            "--config",
            str(config),
            "--state-dir",
            str(state),
            *self.root_flags,
        ]
        try:
            result = subprocess.run(
                argv,
                env=self.environ(),
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=ROOT_CREATE_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"meshca admin root create failed: {exc}") from exc
        log.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise BenchError(
                f"meshca admin root create exited with {result.returncode}:\n"
                + (result.stdout + result.stderr)[-3000:]
            )
        key = re.search(r"^\s*key:\s+(\S+): (\S+)", result.stdout, re.MULTILINE)
        self.root_ref = key[2] if key else None
        if self.kind == "gcpkms":
            if key is None or key[1] != "gcpkms":
                raise BenchError(f"no key version in root create's output:\n{result.stdout}")
            assert self.kms is not None
            self.signer = {
                "kind": "gcpkms",
                "key_version": key[2],
                "endpoint": self.kms.endpoint,
                "insecure_endpoint": True,
            }
        return argv

    def close(self) -> None:
        if self.kms is not None:
            self.kms.stop()
            self.kms = None


def open_backend(kind: str, issuing_key: str, tmp: Path, project_root: Path) -> RootBackend:
    """Prepare ``kind``'s key store under ``tmp`` (a SoftHSM2 token, a KMS emulator)."""
    if kind == "file":
        return RootBackend("file", issuing_key, "file (root-key.pem in the state dir)")
    if kind == "pkcs11":
        return _softhsm(tmp / "softhsm", issuing_key)
    if kind == "gcpkms":
        return _kms_emulator(project_root, issuing_key)
    raise ValueError(f"unknown signer {kind!r}")


def softhsm_module() -> Path | None:
    override = os.environ.get("MESHCA_BENCH_SOFTHSM2_MODULE")
    if override:
        return Path(override)
    return next((Path(p) for p in SOFTHSM_MODULES if Path(p).exists()), None)


def _softhsm(directory: Path, issuing_key: str) -> RootBackend:
    util = shutil.which("softhsm2-util")
    module = softhsm_module()
    if util is None or module is None or not module.exists():
        raise BenchError(
            "--signer pkcs11 needs SoftHSM2 (apt install softhsm2): "
            + ("no softhsm2-util on PATH" if util is None else "libsofthsm2.so not found")
            + f" (looked in {', '.join(SOFTHSM_MODULES)}; MESHCA_BENCH_SOFTHSM2_MODULE "
            "overrides)"
        )
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    pin, so_pin = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    env = {"SOFTHSM2_CONF": str(conf)}
    init = [util, "--init-token", "--free", "--label", TOKEN_LABEL]
    try:
        result = subprocess.run(
            [*init, "--pin", pin, "--so-pin", so_pin],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{' '.join(init)} failed: {exc}") from exc
    if result.returncode != 0:
        # softhsm2-util does not echo PINs; the output is safe to show.
        raise BenchError(f"{' '.join(init)} failed:\n{result.stdout}{result.stderr}")
    signer = {
        "kind": "pkcs11",
        "module": str(module),
        "token_label": TOKEN_LABEL,
        "key_label": KEY_LABEL,
        "key_type": KEY_TYPE,
        "pin_env": PIN_ENV,
    }
    where = (
        "SoftHSM2 token; issuing keys in the token too"
        if issuing_key == "hsm"
        else ("SoftHSM2 token; issuing keys in memory")
    )
    return RootBackend(
        "pkcs11",
        issuing_key,
        f"pkcs11 ({where}; {module})",
        signer=signer,
        env={**env, PIN_ENV: pin},
        root_flags=["--signer", "pkcs11", "--key-type", KEY_TYPE],
    )


def _kms_emulator(project_root: Path, issuing_key: str) -> RootBackend:
    if str(project_root) not in sys.path:
        sys.path.insert(0, str(project_root))
    try:
        from tests.fakes.kms import FakeKms
    except ImportError as exc:
        raise BenchError(
            f"--signer gcpkms needs tests/fakes/kms.py and google-cloud-kms: {exc}"
        ) from exc
    kms = FakeKms().start()
    kms.add_key_ring(KMS_KEY_RING)
    return RootBackend(
        "gcpkms",
        issuing_key,
        f"gcpkms (Cloud KMS emulator tests/fakes/kms.py on {kms.endpoint}, plaintext gRPC)",
        env={},
        root_flags=[
            "--signer",
            "gcpkms",
            "--key-type",
            KEY_TYPE,
            "--kms-crypto-key",
            KMS_CRYPTO_KEY,
            "--kms-endpoint",
            kms.endpoint,
            "--kms-insecure-endpoint",
            "--kms-protection-level",
            "software",
        ],
        kms=kms,
    )
