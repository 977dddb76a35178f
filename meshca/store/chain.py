"""The ledger's hash chain: what a row commits to, and how it is encoded.

Compatibility contract (ledger row format v1)
---------------------------------------------
Changing anything below breaks verification of existing ledgers; a new format needs a
new magic string and a way to tell rows apart.

``row_hash`` is the lowercase hex SHA-256 of this byte string::

    b"meshca-ledger-v1\\n"
    field(sequence) field(serial_hex) field(spiffe_id) field(auth_method)
    field(evidence) field(peer_address) field(not_before) field(not_after)
    field(intermediate_fingerprint) field(request_id) field(csr_sha256)
    field(certificate_pem) field(issued_at) field(prev_hash)

i.e. every ledger column except ``row_hash`` itself, in that fixed order, where
``field(v)`` is one type byte, the value's length in bytes as an 8-byte big-endian
unsigned integer, then the value's bytes:

- ``b"I"`` integer: decimal ASCII digits, ``-`` first if negative (``sequence``);
- ``b"S"`` string: UTF-8 bytes, exactly as stored;
- ``b"T"`` timestamp: UTC as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in ASCII (always six
  fractional digits; the database keeps microseconds, so nothing is lost);
- ``b"N"`` null: length 0, no value bytes (``request_id``, ``csr_sha256`` when absent).

Length prefixes make the encoding unambiguous without escaping (no value can be read
as part of its neighbour), and it is easy to reimplement outside Python. The first row
has ``prev_hash`` = 64 ``0`` characters (:data:`GENESIS_HASH`); every later row's
``prev_hash`` is the previous row's ``row_hash``. Because ``sequence`` and ``prev_hash``
are hashed, an edited, deleted, inserted or reordered row breaks the chain at a
sequence number that verification names.

What the chain does not defend against: someone with write access who rewrites every
row from the tampered one to the end and the ``ledger_head`` row as well. Publishing
``ledger_head.last_hash`` somewhere the database's writers cannot change (logs shipped
off the host, a transparency log) is what makes that visible too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from meshca.store._types import to_utc
from meshca.store.models import LedgerEntry

GENESIS_HASH = "0" * 64
FORMAT_MAGIC = b"meshca-ledger-v1\n"

_HashedValue = int | str | datetime | None


@dataclass(frozen=True, slots=True)
class NewIssuance:
    """An issued certificate as the CA hands it over; the store assigns sequence and hashes.

    Datetimes must be timezone-aware; they are stored and hashed in UTC.
    """

    serial_hex: str
    spiffe_id: str
    auth_method: str
    evidence: str
    peer_address: str
    not_before: datetime
    not_after: datetime
    intermediate_fingerprint: str
    certificate_pem: str
    issued_at: datetime
    request_id: str | None = None
    csr_sha256: str | None = None

    def __post_init__(self) -> None:
        for name in ("not_before", "not_after", "issued_at"):
            to_utc(getattr(self, name), field=name)

    def to_row(self, sequence: int, prev_hash: str) -> LedgerRow:
        """The ledger row for this issuance at ``sequence``, hashed and ready to insert."""
        row = LedgerRow(
            sequence=sequence,
            serial_hex=self.serial_hex,
            spiffe_id=self.spiffe_id,
            auth_method=self.auth_method,
            evidence=self.evidence,
            peer_address=self.peer_address,
            not_before=to_utc(self.not_before),
            not_after=to_utc(self.not_after),
            intermediate_fingerprint=self.intermediate_fingerprint,
            request_id=self.request_id,
            csr_sha256=self.csr_sha256,
            certificate_pem=self.certificate_pem,
            issued_at=to_utc(self.issued_at),
            prev_hash=prev_hash,
            row_hash="",
        )
        return replace(row, row_hash=row_hash(row))

    def to_entry(self, sequence: int, prev_hash: str) -> LedgerEntry:
        """The same row as an ORM object (for tests and tools that want one)."""
        return LedgerEntry(**self.to_row(sequence, prev_hash).columns())


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """A ledger row as written: every column, plain values (cheaper than an ORM object)."""

    sequence: int
    serial_hex: str
    spiffe_id: str
    auth_method: str
    evidence: str
    peer_address: str
    not_before: datetime
    not_after: datetime
    intermediate_fingerprint: str
    request_id: str | None
    csr_sha256: str | None
    certificate_pem: str
    issued_at: datetime
    prev_hash: str
    row_hash: str

    def columns(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*HASHED_COLUMNS, "row_hash")}


def _field(value: _HashedValue) -> bytes:
    if value is None:
        tag, data = b"N", b""
    elif isinstance(value, bool):
        raise TypeError("booleans are not part of the ledger row format")
    elif isinstance(value, int):
        tag, data = b"I", str(value).encode("ascii")
    elif isinstance(value, datetime):
        utc = to_utc(value).replace(tzinfo=None)
        tag, data = b"T", (utc.isoformat(timespec="microseconds") + "Z").encode("ascii")
    else:
        tag, data = b"S", value.encode("utf-8")
    return tag + len(data).to_bytes(8, "big") + data


HASHED_COLUMNS = (
    "sequence",
    "serial_hex",
    "spiffe_id",
    "auth_method",
    "evidence",
    "peer_address",
    "not_before",
    "not_after",
    "intermediate_fingerprint",
    "request_id",
    "csr_sha256",
    "certificate_pem",
    "issued_at",
    "prev_hash",
)
"""Every ledger column but ``row_hash``, in the order the v1 encoding hashes them."""


def canonical_bytes(entry: LedgerEntry | LedgerRow) -> bytes:
    """The v1 encoding of ``entry`` (every column but ``row_hash``), as documented above."""
    return FORMAT_MAGIC + b"".join(_field(getattr(entry, name)) for name in HASHED_COLUMNS)


def row_hash(entry: LedgerEntry | LedgerRow) -> str:
    """The ``row_hash`` that ``entry``'s contents commit to (lowercase hex SHA-256)."""
    return hashlib.sha256(canonical_bytes(entry)).hexdigest()
