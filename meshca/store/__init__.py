"""meshca's database: roots, intermediates and the hash-chained issuance ledger.

SQLModel tables (:mod:`.models`), Alembic migrations (``migrations/``, applied by
:meth:`Store.open`), and :class:`Store`, the one repository the rest of meshca uses.
SQLite is the embedded default; PostgreSQL (psycopg 3) is what several replicas share.
The ledger's row-hash encoding is a compatibility contract documented in :mod:`.chain`.
"""

from __future__ import annotations

from meshca.store.chain import GENESIS_HASH, LedgerRow, NewIssuance, row_hash
from meshca.store.models import (
    IntermediateRecord,
    JoinToken,
    LedgerEntry,
    LedgerHead,
    RootRecord,
)
from meshca.store.store import Store, StoreCounts
from meshca.store.verify import LedgerProblem, LedgerReport, ProblemKind

__all__ = [
    "GENESIS_HASH",
    "IntermediateRecord",
    "JoinToken",
    "LedgerEntry",
    "LedgerHead",
    "LedgerProblem",
    "LedgerReport",
    "LedgerRow",
    "NewIssuance",
    "ProblemKind",
    "RootRecord",
    "Store",
    "StoreCounts",
    "row_hash",
]
