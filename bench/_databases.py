"""The databases of a benchmark run: PostgreSQL databases of the run's own (created on the
server ``--postgres-url`` names, dropped at the end) and cfssl's certdb schema.

cfssl 1.2.0 (Debian's golang-cfssl) stores what it signs when ``cfssl serve`` gets
``-db-config``: a JSON file naming a ``database/sql`` driver (``sqlite3`` or ``postgres``)
and its data source. It does not create its tables: its repository ships goose
migrations (``certdb/sqlite/migrations``, ``certdb/pg/migrations``), whose first and, in
1.2.0, only migration creates ``certificates`` and ``ocsp_responses``. The statements
below are that migration's, per driver.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from _procs import children, cpu_seconds, parent_pid, reaped_cpu_seconds
from psycopg import sql
from sqlalchemy.engine import URL, make_url

CERTDB_SQLITE = (
    """CREATE TABLE certificates (
  serial_number            blob NOT NULL,
  authority_key_identifier blob NOT NULL,
  ca_label                 blob,
  status                   blob NOT NULL,
  reason                   int,
  expiry                   timestamp,
  revoked_at               timestamp,
  pem                      blob NOT NULL,
  PRIMARY KEY(serial_number, authority_key_identifier)
)""",
    """CREATE TABLE ocsp_responses (
  serial_number            blob NOT NULL,
  authority_key_identifier blob NOT NULL,
  body                     blob NOT NULL,
  expiry                   timestamp,
  PRIMARY KEY(serial_number, authority_key_identifier),
  FOREIGN KEY(serial_number, authority_key_identifier)
    REFERENCES certificates(serial_number, authority_key_identifier)
)""",
)

CERTDB_POSTGRES = (
    """CREATE TABLE certificates (
  serial_number            bytea NOT NULL,
  authority_key_identifier bytea NOT NULL,
  ca_label                 bytea,
  status                   bytea NOT NULL,
  reason                   int,
  expiry                   timestamptz,
  revoked_at               timestamptz,
  pem                      bytea NOT NULL,
  PRIMARY KEY(serial_number, authority_key_identifier)
)""",
    """CREATE TABLE ocsp_responses (
  serial_number            bytea NOT NULL,
  authority_key_identifier bytea NOT NULL,
  body                     bytea NOT NULL,
  expiry                   timestamptz,
  PRIMARY KEY(serial_number, authority_key_identifier),
  FOREIGN KEY(serial_number, authority_key_identifier)
    REFERENCES certificates(serial_number, authority_key_identifier)
)""",
)

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _connect(url: URL, *, autocommit: bool = True) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password or None,
        dbname=url.database or "postgres",
        autocommit=autocommit,
        connect_timeout=5,
    )


@dataclass
class PostgresDatabases:
    """Databases made for this run on one server; ``drop_all`` removes them."""

    admin: URL
    created: list[str] = field(default_factory=list)
    postmaster: int | None = None

    @classmethod
    def reach(cls, url: str) -> tuple[PostgresDatabases | None, str]:
        """The server at ``url``, or None and why it cannot be used."""
        admin = make_url(url)
        try:
            with _connect(admin) as conn:
                fsync = conn.execute("SHOW fsync").fetchone()
                commit = conn.execute("SHOW synchronous_commit").fetchone()
        except psycopg.Error as exc:
            text = str(exc).strip().splitlines()
            return None, f"PostgreSQL at {admin.host}:{admin.port or 5432} not reachable: " + (
                text[0] if text else type(exc).__name__
            )
        settings = f"fsync {fsync[0] if fsync else '?'}, synchronous_commit "
        settings += f"{commit[0] if commit else '?'}"
        return cls(admin), settings

    def create(self, prefix: str) -> URL:
        """A new empty database; its URL (same server and user)."""
        name = f"{prefix}_{secrets.token_hex(4)}"
        with _connect(self.admin) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.created.append(name)
        return self.admin.set(database=name)

    def drop_all(self) -> None:
        with _connect(self.admin) as conn:
            for name in self.created:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self.created.clear()

    def server_cpu(self) -> float | None:
        """CPU seconds so far of the whole PostgreSQL server on this machine: the
        postmaster, every live process it started (backends, WAL writer, checkpointer)
        and those that have ended (the kernel adds their time to the postmaster's
        children's time when it reaps them). None if the server is not local."""
        postmaster = self.postmaster
        if postmaster is None:
            try:
                with _connect(self.admin) as conn:
                    row = conn.execute("SELECT pg_backend_pid()").fetchone()
                    # Asked while the backend lives: its parent is the postmaster.
                    postmaster = parent_pid(int(row[0])) if row else None
            except psycopg.Error:
                return None
            if postmaster is None:
                return None
            self.postmaster = postmaster
        return cpu_seconds([postmaster, *children(postmaster)]) + reaped_cpu_seconds(postmaster)

    def count(self, url: URL, table: str) -> int | None:
        try:
            with _connect(url) as conn:
                row = conn.execute(
                    sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
                ).fetchone()
        except psycopg.Error:
            return None
        return int(row[0]) if row else None


def sqlalchemy_url(url: URL) -> str:
    """``url`` as meshca's --database-url (psycopg 3), password included."""
    return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def libpq_url(url: URL) -> str:
    """``url`` as lib/pq (cfssl's Go driver) reads it: no TLS on loopback."""
    plain = url.set(drivername="postgres", query={"sslmode": "disable"})
    return plain.render_as_string(hide_password=False)


def certdb_config(directory: Path, driver: str, data_source: str) -> Path:
    """cfssl's ``-db-config`` file."""
    path = directory / f"certdb-{driver}.json"
    path.write_text(json.dumps({"driver": driver, "data_source": data_source}) + "\n")
    return path


def certdb_sqlite(path: Path) -> None:
    """An empty certdb in a SQLite file (cfssl's default settings: rollback journal,
    synchronous FULL)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        for statement in CERTDB_SQLITE:
            conn.execute(statement)


def certdb_postgres(url: URL) -> None:
    with _connect(url) as conn:
        for statement in CERTDB_POSTGRES:
            conn.execute(statement)


def certdb_sqlite_rows(path: Path) -> int | None:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            (count,) = conn.execute("SELECT count(*) FROM certificates").fetchone()
            return int(count)
    except sqlite3.Error:
        return None
