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

Format v2 (rows of certificates a node agent obtained for a workload)
---------------------------------------------------------------------
A row whose ``agent_spiffe_id`` or ``node_name`` is set (the identity of the agent that
asked, and the Kubernetes node it runs on) is hashed as v2: the magic
``b"meshca-ledger-v2\n"``, the fourteen v1 fields in the same order, then
``field(agent_spiffe_id) field(node_name)``. A row with both null is hashed exactly as v1,
so rows written before these columns existed verify unchanged. Clearing both columns of
a v2 row makes the verifier hash it as v1, which cannot give the stored ``row_hash``:
the edit shows like any other.

What the chain does not defend against: someone with write access who rewrites every
row from the tampered one to the end and the ``ledger_head`` row as well. Publishing
``ledger_head.last_hash`` somewhere the database's writers cannot change (logs shipped
off the host, a transparency log) is what makes that visible too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from meshca.errors import StoreError
from meshca.store._types import to_utc
from meshca.store.models import LedgerEntry

GENESIS_HASH = "0" * 64
_ZERO_LENGTH = bytes(8)
FORMAT_MAGIC = b"meshca-ledger-v1\n"
FORMAT_MAGIC_V2 = b"meshca-ledger-v2\n"

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
    agent_spiffe_id: str | None = None
    """The node agent that asked for this certificate on the workload's behalf."""
    node_name: str | None = None
    """The Kubernetes node that agent (and the workload) runs on."""

    def __post_init__(self) -> None:
        for name in ("not_before", "not_after", "issued_at"):
            to_utc(getattr(self, name), field=name)

    def to_row(self, sequence: int, prev_hash: str) -> LedgerRow:
        """The ledger row for this issuance at ``sequence``, hashed and ready to insert."""
        values = (  # HASHED_COLUMNS order
            sequence,
            self.serial_hex,
            self.spiffe_id,
            self.auth_method,
            self.evidence,
            self.peer_address,
            to_utc(self.not_before),
            to_utc(self.not_after),
            self.intermediate_fingerprint,
            self.request_id,
            self.csr_sha256,
            self.certificate_pem,
            to_utc(self.issued_at),
            prev_hash,
        )
        delegated = (self.agent_spiffe_id, self.node_name)
        if delegated == (None, None):
            digest = hashlib.sha256(FORMAT_MAGIC + b"".join(map(_field, values))).hexdigest()
        else:
            encoded = b"".join(map(_field, (*values, *delegated)))
            digest = hashlib.sha256(FORMAT_MAGIC_V2 + encoded).hexdigest()
        return LedgerRow(*values, *delegated, row_hash=digest)

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
    agent_spiffe_id: str | None
    node_name: str | None
    row_hash: str

    def columns(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*V2_COLUMNS, "row_hash")}


def _field(value: _HashedValue) -> bytes:
    # Exact type checks first: this runs 14 times per ledger row on the issuance path.
    kind = type(value)
    if kind is str:
        data = value.encode("utf-8")  # type: ignore[union-attr]
        return b"S" + len(data).to_bytes(8, "big") + data
    if value is None:
        return b"N" + _ZERO_LENGTH
    if kind is bool:
        raise TypeError("booleans are not part of the ledger row format")
    if isinstance(value, datetime):
        utc = value if value.tzinfo is UTC else to_utc(value)
        data = (utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z").encode()
        return b"T" + len(data).to_bytes(8, "big") + data
    if isinstance(value, int):
        data = str(value).encode("ascii")
        return b"I" + len(data).to_bytes(8, "big") + data
    if isinstance(value, str):
        data = value.encode("utf-8")
        return b"S" + len(data).to_bytes(8, "big") + data
    raise TypeError(f"{kind.__name__} is not part of the ledger row format")


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
"""The columns the v1 encoding hashes, in its order."""

DELEGATION_COLUMNS = ("agent_spiffe_id", "node_name")
V2_COLUMNS = (*HASHED_COLUMNS, *DELEGATION_COLUMNS)
"""Every ledger column but ``row_hash``, in the order the v2 encoding hashes them."""


def canonical_bytes(entry: LedgerEntry | LedgerRow) -> bytes:
    """The encoding of ``entry`` (v1, or v2 when a delegation column is set), as
    documented above."""
    if all(getattr(entry, name) is None for name in DELEGATION_COLUMNS):
        return FORMAT_MAGIC + b"".join(_field(getattr(entry, name)) for name in HASHED_COLUMNS)
    return FORMAT_MAGIC_V2 + b"".join(_field(getattr(entry, name)) for name in V2_COLUMNS)


def row_hash(entry: LedgerEntry | LedgerRow) -> str:
    """The ``row_hash`` that ``entry``'s contents commit to (lowercase hex SHA-256)."""
    return hashlib.sha256(canonical_bytes(entry)).hexdigest()


def extend_chain(
    head: Sequence[Any] | None, entries: Sequence[NewIssuance], where: str
) -> list[LedgerRow]:
    """The rows that extend a ledger whose head row reads ``(sequence, hash)`` by ``entries``,
    in order, each chained to the one before; ``where`` names the database in the error."""
    if head is None:
        raise StoreError(
            f"the ledger_head row is missing in {where}; the ledger cannot be extended "
            "(run the ledger verification)",
            reason="ledger_corrupt",
        )
    sequence, prev_hash = int(head[0]), str(head[1])
    rows: list[LedgerRow] = []
    for new in entries:
        sequence += 1
        row = new.to_row(sequence, prev_hash)
        prev_hash = row.row_hash
        rows.append(row)
    return rows
