"""SoftHSM2 for the test suite: a token directory of the test process's own.

Why one SoftHSM2 per test process, with every token made up front:

* libsofthsm2 reads ``SOFTHSM2_CONF`` (and so finds its token directory) in
  ``C_Initialize``, and python-pkcs11 initialises a module once per process and caches it
  by path (``pkcs11.lib``). The variable must be set before the first signer loads the
  module, and must not change afterwards.
* SoftHSM2 discovers tokens only in ``C_Initialize``: a token made with ``softhsm2-util``
  later stays invisible until the module is finalised, and that would close every session
  of every signer in the process.

So the first call to :func:`softhsm` creates a directory with a ``softhsm2.conf`` and every
token in :data:`TOKENS`, then points ``SOFTHSM2_CONF`` at it for the rest of the process.
The system's /var/lib/softhsm is never touched. Tests keep apart by key label
(:func:`unique_label`); tests that break a token or a login get a token nobody else uses.
When softhsm2-util or libsofthsm2 is missing, :func:`softhsm` skips the calling test with
the reason (``-ra`` shows it). ``MESHCA_TEST_SOFTHSM2_MODULE`` overrides the library path.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from pkcs11.types import Session

from meshca.config import Pkcs11SignerConfig
from meshca.pki.keys import KeyAlgorithm
from meshca.signers._pkcs11_module import Module
from meshca.signers.pkcs11 import Pkcs11Signer

MODULE_ENV = "MESHCA_TEST_SOFTHSM2_MODULE"
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)

USER_PIN = "meshca-user-pin-4711"
SO_PIN = "meshca-so-pin-0815"
PIN_ENV = "MESHCA_TEST_PKCS11_PIN"
"""The environment variable test configs read the user PIN from (set by :func:`softhsm`)."""

MAIN_TOKEN = "meshca-test"
CONFORMANCE_TOKEN = "meshca-conformance"
OUTAGE_TOKEN = "meshca-outage"
"""Unplugged and replugged by the outage tests; nothing else keeps keys there."""
PIN_TOKEN = "meshca-pin"
"""Never logged in by a signer that stays open, so a wrong PIN reaches the token itself."""
TOKENS = (MAIN_TOKEN, CONFORMANCE_TOKEN, OUTAGE_TOKEN, PIN_TOKEN)


def module_path() -> Path | None:
    override = os.environ.get(MODULE_ENV)
    if override:
        return Path(override)
    return next((Path(p) for p in MODULE_CANDIDATES if Path(p).exists()), None)


def unavailable_reason() -> str | None:
    """Why SoftHSM2 tests cannot run here, or None."""
    if shutil.which("softhsm2-util") is None:
        return "SoftHSM2 is not installed (no softhsm2-util on PATH; apt install softhsm2)"
    module = module_path()
    if module is None or not module.exists():
        return f"libsofthsm2.so not found (looked in {', '.join(MODULE_CANDIDATES)})"
    return None


def unique_label(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@dataclass
class SoftHsm:
    """The test process's SoftHSM2: its config file, token directories and module path."""

    directory: Path
    conf: Path
    module: Path
    token_dirs: dict[str, Path]
    _shared: dict[KeyAlgorithm, Pkcs11Signer] = field(default_factory=dict)
    _shared_lock: threading.Lock = field(default_factory=threading.Lock)

    def config(
        self, token: str | None = MAIN_TOKEN, key_label: str = "meshca-root", **changes: Any
    ) -> Pkcs11SignerConfig:
        """A signer config for ``token``, reading the PIN from :data:`PIN_ENV`."""
        values: dict[str, Any] = {
            "module": self.module,
            "token_label": token,
            "key_label": key_label,
            "pin_env": PIN_ENV,
            "pool_size": 4,
        }
        values.update(changes)
        return Pkcs11SignerConfig(**values)

    def shared_signer(self, algorithm: KeyAlgorithm) -> Pkcs11Signer:
        """One persistent key per algorithm for the whole process (RSA-4096 keygen is slow).

        Shared by tests/signers and the conformance suite; nobody may close it.
        """
        with self._shared_lock:
            if algorithm not in self._shared:
                config = self.config(CONFORMANCE_TOKEN, f"shared-{algorithm.value}")
                self._shared[algorithm] = Pkcs11Signer.create(config, algorithm)
            return self._shared[algorithm]

    @contextmanager
    def session(
        self, token: str, *, rw: bool = False, user_pin: str | None = None
    ) -> Iterator[Session]:
        """A raw python-pkcs11 session on ``token``, to look at objects the way an HSM
        admin would. Without ``user_pin`` it does not log in: a signer on the token has
        done that for the process (with it, no signer may be logged in to the token, and
        closing the session logs the process out). meshca's module lock is held
        throughout (SoftHSM2 must not be called from two threads at once; see
        meshca/signers/_pkcs11_module.py)."""
        lock = Module.load(self.module).lock
        with lock:
            lib = pkcs11.lib(os.path.realpath(self.module))
            session = lib.get_token(token_label=token).open(rw=rw, user_pin=user_pin)
            try:
                yield session
            finally:
                session.close()

    @contextmanager
    def unplugged(self, token: str) -> Iterator[None]:
        """The HSM behind ``token`` goes away for the duration of the ``with`` block.

        Two things happen, under meshca's module lock so no call is in flight:
        ``C_Finalize`` invalidates every session handle of the process (what a PKCS#11
        client library does when it loses its device), and the token's directory moves
        out of the token dir, so re-initialising the module finds no such token. Moving
        the directory alone would not do: SoftHSM2 keeps open sessions and loaded keys
        working from memory. On exit the directory comes back; SoftHSM2 sees it again
        after the next ``C_Finalize`` + ``C_Initialize``, which is the signer's own
        recovery to do.
        """
        directory = self.token_dirs[token]
        aside = self.directory / f"unplugged-{directory.name}"  # outside the token dir
        with Module.load(self.module).lock:
            lib = pkcs11.lib(os.path.realpath(self.module))
            lib.finalize()
            directory.rename(aside)
        try:
            yield
        finally:
            aside.rename(directory)


_instance: SoftHsm | None = None
_instance_lock = threading.Lock()


def softhsm(base: Path | None = None) -> SoftHsm:
    """The process's SoftHSM2, created under ``base`` on first use; skips if not installed."""
    global _instance
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with _instance_lock:
        if _instance is None:
            root = base if base is not None else Path(tempfile.mkdtemp(prefix="meshca-"))
            _instance = _create(root / "softhsm")
        return _instance


def _create(directory: Path) -> SoftHsm:
    module = module_path()
    assert module is not None
    real = os.path.realpath(module)
    if real in pkcs11._loaded:
        raise RuntimeError(
            f"{real} was initialised in this process before the test SoftHSM2 was set up; "
            "it would use another token directory (see tests/fakes/softhsm.py)"
        )
    tokendir = directory / "tokens"
    tokendir.mkdir(parents=True, mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokendir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    token_dirs: dict[str, Path] = {}
    for label in TOKENS:
        before = set(tokendir.iterdir())
        init = ["softhsm2-util", "--init-token", "--free", "--label", label]
        subprocess.run(
            [*init, "--pin", USER_PIN, "--so-pin", SO_PIN],
            env=env,
            check=True,
            capture_output=True,
            timeout=30,
        )
        (created,) = set(tokendir.iterdir()) - before
        token_dirs[label] = created
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ[PIN_ENV] = USER_PIN
    return SoftHsm(directory, conf, Path(real), token_dirs)
