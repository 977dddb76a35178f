"""Shared fixtures for every test area.

PostgreSQL: ``postgres_server`` and ``postgres_url`` give each test a database of its own
on the server at ``MESHCA_TEST_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``: trust auth, an existing ``test``
database used only to CREATE and DROP the per-test databases). When the server is
unreachable, PostgreSQL tests are skipped with the reason shown by ``-ra``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import freezegun
import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import URL, make_url

from meshca.spiffe import TrustDomain

TRUST_DOMAIN = TrustDomain("cluster.local")


def _prime_cryptography_datetime() -> None:
    """Make cryptography resolve ``datetime.datetime`` before any test freezes time.

    cryptography's Rust core looks the datetime class up once and caches it; if the first
    certificate of the session is built under freezegun, it caches freezegun's class and
    every later certificate with a real datetime fails. Building one certificate at import
    time pins the real class.
    """
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import verification

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "prime")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(1))
        .sign(key, hashes.SHA256())
    )
    assert cert.not_valid_after_utc > now
    store = verification.Store([cert])
    verification.PolicyBuilder().store(store).build_client_verifier()


_prime_cryptography_datetime()

# freezegun looks at every attribute of every loaded module when it starts; the
# Kubernetes client's lazy ``__getattr__`` would then import its pydantic models with
# datetime frozen, which pydantic refuses. Its modules never read the clock in tests.
freezegun.configure(extend_ignore_list=["kubernetes"])

POSTGRES_URL_ENV = "MESHCA_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class PostgresServer:
    """A reachable PostgreSQL server on which tests may create and drop databases."""

    admin_url: URL

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        url = self.admin_url
        return psycopg.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username or "postgres",
            password=url.password or None,
            dbname=url.database or "postgres",
            autocommit=True,
            connect_timeout=3,
        )

    def create_database(self) -> str:
        """Create an empty database with a random name; return its SQLAlchemy URL."""
        name = f"meshca_test_{secrets.token_hex(6)}"
        with self._connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = self.admin_url.set(drivername="postgresql+psycopg", database=name)
        return url.render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        name = make_url(url).database
        assert name, f"no database name in {url}"
        with self._connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """The test PostgreSQL server, checked once per session; skips when unreachable."""
    server = PostgresServer(make_url(os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL)))
    where = f"{server.admin_url.host}:{server.admin_url.port or 5432}"
    try:
        with server._connect() as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        pytest.skip(f"PostgreSQL not reachable at {where}: {first_line}")
    return server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url)
