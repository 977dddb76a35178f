"""The tables: roots, intermediates, the issuance ledger and its head, used tokens, join
tokens.

These SQLModel classes are the schema as the code sees it; the migrations in
``meshca/store/migrations/versions`` are the schema as the database gets it, and the two
must agree (a test compares them). Every column is declared with an explicit SQLAlchemy
type so both agree on SQLite and PostgreSQL alike.

``ledger.sequence`` is assigned by :class:`meshca.store.Store`, never by the database: it
must be contiguous (1, 2, 3, ...) for the hash chain to be checkable, which an
autoincrement column does not promise.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel

from meshca.store._types import UTCDateTime

HASH_HEX_LENGTH = 64
ROOT_STATES = frozenset({"prepared", "active", "retiring", "retired"})
PUBLISHED_ROOT_STATES = frozenset({"prepared", "active", "retiring"})
"""Roots in these states are in every trust bundle (until their own notAfter)."""
ROOT_BACKENDS = frozenset({"file", "pkcs11", "gcpkms"})


def utc_now() -> datetime:
    return datetime.now(UTC)


def _hex(name: str) -> Column[str]:
    return Column(name, String(HASH_HEX_LENGTH), nullable=False)


def _text(name: str, *, nullable: bool = False, index: bool = False) -> Column[str]:
    return Column(name, Text, nullable=nullable, index=index)


def _when(name: str) -> Column[datetime]:
    return Column(name, UTCDateTime(), nullable=False)


class RootRecord(SQLModel, table=True):
    """A root CA certificate and where its private key lives (``backend`` + ``key_ref``).

    The lifecycle is ``prepared`` -> ``active`` -> ``retiring`` -> ``retired``: a prepared
    root is published in the trust bundle but signs nothing yet; the active root (at most
    one) signs new intermediates; a retiring root was replaced and stays published while
    certificates chained to it are unexpired; a retired root is published no more. At most
    one root is prepared. ``fingerprint`` is the lowercase hex SHA-256 of the certificate's
    DER encoding. ``cross_certificate_pem``, when set, is the new root's subject and key
    certified by the root it replaces, for peers that hold only the old bundle.
    """

    __tablename__ = "roots"
    __table_args__ = (
        UniqueConstraint("fingerprint", name="uq_roots_fingerprint"),
        # A backstop for the rule Store.add_root enforces: two active roots is an error.
        Index(
            "uq_roots_one_active",
            "state",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
        Index(
            "uq_roots_one_prepared",
            "state",
            unique=True,
            sqlite_where=text("state = 'prepared'"),
            postgresql_where=text("state = 'prepared'"),
        ),
    )

    id: int | None = Field(default=None, sa_column=Column("id", Integer, primary_key=True))
    fingerprint: str = Field(sa_column=_hex("fingerprint"))
    subject: str = Field(sa_column=_text("subject"))
    backend: str = Field(sa_column=Column("backend", String(32), nullable=False))
    key_ref: str = Field(sa_column=_text("key_ref"))
    algorithm: str = Field(sa_column=Column("algorithm", String(32), nullable=False))
    certificate_pem: str = Field(sa_column=_text("certificate_pem"))
    not_before: datetime = Field(sa_column=_when("not_before"))
    not_after: datetime = Field(sa_column=_when("not_after"))
    state: str = Field(sa_column=Column("state", String(16), nullable=False))
    created_at: datetime = Field(default_factory=utc_now, sa_column=_when("created_at"))
    activated_at: datetime | None = Field(
        default=None, sa_column=Column("activated_at", UTCDateTime(), nullable=True)
    )
    cross_certificate_pem: str | None = Field(
        default=None, sa_column=_text("cross_certificate_pem", nullable=True)
    )


class IntermediateRecord(SQLModel, table=True):
    """An issuing intermediate, signed by a root, held in memory by one CA process.

    ``owner`` is ``hostname:pid`` of the process that holds the private key, so an
    operator can tell which replica issued with which intermediate. The owner refreshes
    ``last_seen_at`` while it signs with this intermediate and sets ``retired_at`` when it
    replaces it or stops; both stay NULL in rows written before revision 0003.
    """

    __tablename__ = "intermediates"
    __table_args__ = (UniqueConstraint("fingerprint", name="uq_intermediates_fingerprint"),)

    id: int | None = Field(default=None, sa_column=Column("id", Integer, primary_key=True))
    fingerprint: str = Field(sa_column=_hex("fingerprint"))
    serial_hex: str = Field(sa_column=Column("serial_hex", String(64), nullable=False))
    root_fingerprint: str = Field(
        sa_column=Column(
            "root_fingerprint",
            String(HASH_HEX_LENGTH),
            ForeignKey("roots.fingerprint", name="fk_intermediates_root_fingerprint"),
            nullable=False,
        )
    )
    certificate_pem: str = Field(sa_column=_text("certificate_pem"))
    not_before: datetime = Field(sa_column=_when("not_before"))
    not_after: datetime = Field(sa_column=_when("not_after"))
    owner: str = Field(sa_column=_text("owner"))
    created_at: datetime = Field(default_factory=utc_now, sa_column=_when("created_at"))
    last_seen_at: datetime | None = Field(
        default=None, sa_column=Column("last_seen_at", UTCDateTime(), nullable=True)
    )
    retired_at: datetime | None = Field(
        default=None, sa_column=Column("retired_at", UTCDateTime(), nullable=True)
    )


class LedgerEntry(SQLModel, table=True):
    """One issued certificate, chained to the previous row by ``prev_hash``.

    See :mod:`meshca.store.chain` for how ``row_hash`` is computed. ``certificate_pem``
    is the issued leaf, kept so that a retry carrying the same ``request_id`` gets the
    same certificate back. ``agent_spiffe_id`` and ``node_name`` are set when a node
    agent asked on the workload's behalf: who asked, and on which node (revision 0006).
    """

    __tablename__ = "ledger"
    __table_args__ = (
        # A client-chosen request id is unique per identity, not globally, so one
        # caller cannot squat on another's ids.
        Index("uq_ledger_request_id", "request_id", "spiffe_id", unique=True),
        # Renewal by SVID looks the presented certificate up by serial.
        Index("ix_ledger_serial_hex", "serial_hex"),
    )

    sequence: int = Field(
        sa_column=Column("sequence", BigInteger, primary_key=True, autoincrement=False)
    )
    serial_hex: str = Field(sa_column=Column("serial_hex", String(64), nullable=False))
    spiffe_id: str = Field(sa_column=_text("spiffe_id"))
    auth_method: str = Field(sa_column=Column("auth_method", String(64), nullable=False))
    evidence: str = Field(sa_column=_text("evidence"))
    peer_address: str = Field(sa_column=_text("peer_address"))
    not_before: datetime = Field(sa_column=_when("not_before"))
    not_after: datetime = Field(sa_column=_when("not_after"))
    intermediate_fingerprint: str = Field(sa_column=_hex("intermediate_fingerprint"))
    request_id: str | None = Field(default=None, sa_column=_text("request_id", nullable=True))
    csr_sha256: str | None = Field(
        default=None, sa_column=Column("csr_sha256", String(HASH_HEX_LENGTH), nullable=True)
    )
    certificate_pem: str = Field(sa_column=_text("certificate_pem"))
    issued_at: datetime = Field(sa_column=_when("issued_at"))
    prev_hash: str = Field(sa_column=_hex("prev_hash"))
    agent_spiffe_id: str | None = Field(
        default=None, sa_column=_text("agent_spiffe_id", nullable=True)
    )
    node_name: str | None = Field(
        default=None, sa_column=Column("node_name", String(253), nullable=True)
    )
    row_hash: str = Field(sa_column=_hex("row_hash"))


class LedgerHead(SQLModel, table=True):
    """The single row (``id = 1``) naming the ledger's last sequence and row hash.

    It is updated in the same transaction as every append, so deleting rows from the end
    of the ledger (which leaves a valid, shorter chain) still shows up in verification.
    Appends lock this row, which is what serialises writers across processes.
    """

    __tablename__ = "ledger_head"

    id: int = Field(sa_column=Column("id", Integer, primary_key=True, autoincrement=False))
    last_sequence: int = Field(sa_column=Column("last_sequence", BigInteger, nullable=False))
    last_hash: str = Field(sa_column=_hex("last_hash"))


class UsedToken(SQLModel, table=True):
    """A one-time bearer token (a GCE instance identity token) that has been used.

    Only the SHA-256 of the token is kept, never the token, and only until
    ``expires_at`` (after which the token is refused as expired anyway). The primary key
    is what makes a second use fail in every replica sharing the database: recording a
    use is an insert, and a conflicting insert means a replay.
    """

    __tablename__ = "used_tokens"
    __table_args__ = (Index("ix_used_tokens_expires_at", "expires_at"),)

    token_sha256: str = Field(
        sa_column=Column("token_sha256", String(HASH_HEX_LENGTH), primary_key=True)
    )
    method: str = Field(sa_column=Column("method", String(64), nullable=False))
    expires_at: datetime = Field(sa_column=_when("expires_at"))
    used_at: datetime = Field(default_factory=utc_now, sa_column=_when("used_at"))


class JoinToken(SQLModel, table=True):
    """A single-use join token an operator created for one SPIFFE ID (SPIRE's join-token
    attestation, for machines with no platform credential).

    Only the SHA-256 of the token is kept: the token holds at least 128 random bits, so
    the digest cannot be searched back to it, and a lookup by digest needs no
    constant-time comparison. ``created_by`` names who ran ``meshca admin join-token
    create`` (``user@host``); ``used_at``/``used_by`` (the peer address) are set by the
    one request that spends it, ``revoked_at`` by ``meshca admin join-token revoke``.
    """

    __tablename__ = "join_tokens"
    __table_args__ = (Index("ix_join_tokens_expires_at", "expires_at"),)

    token_sha256: str = Field(
        sa_column=Column("token_sha256", String(HASH_HEX_LENGTH), primary_key=True)
    )
    spiffe_id: str = Field(sa_column=_text("spiffe_id"))
    created_at: datetime = Field(default_factory=utc_now, sa_column=_when("created_at"))
    expires_at: datetime = Field(sa_column=_when("expires_at"))
    created_by: str = Field(sa_column=_text("created_by"))
    used_at: datetime | None = Field(
        default=None, sa_column=Column("used_at", UTCDateTime(), nullable=True)
    )
    used_by: str | None = Field(default=None, sa_column=_text("used_by", nullable=True))
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column("revoked_at", UTCDateTime(), nullable=True)
    )
