"""Statements compiled once per engine, for the ledger append on the issuance path.

SQLAlchemy looks up (by a cache key it rebuilds each time) the compiled form of a
statement on every ``execute``; for the small batches of the issuance path that cost
more CPU than SQLite's own work: a one-row append took about 1.1 ms of CPU, 0.6 ms with
the statements below (``bench/ops.py`` prints the latter). A :class:`PreparedStatement`
is compiled once for the engine's dialect and run with ``exec_driver_sql``; its
parameters still pass through each column type's own bind processor (``UTCDateTime``
included), so what reaches the database is exactly what the ORM would have written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

_Processor = Callable[[Any], Any] | None


class PreparedStatement:
    """One statement compiled for one dialect, with its parameters' bind processors."""

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if not isinstance(compiled, SQLCompiler):
            raise TypeError(f"not a SQL statement: {statement!r}")
        self.sql = str(compiled)
        # qmark/numeric drivers (sqlite3) take a tuple in this order; named ones a dict.
        self._positional = tuple(compiled.positiontup or ()) if compiled.positional else None
        self._processors: dict[str, _Processor] = {
            name: bind.type.bind_processor(dialect) for name, bind in compiled.binds.items()
        }

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """The driver's parameters for ``values`` (bind name -> Python value; every bind
        must be given)."""
        processed = {}
        for name, processor in self._processors.items():
            value = values[name]
            processed[name] = processor(value) if processor is not None else value
        if self._positional is None:
            return processed
        return tuple(processed[name] for name in self._positional)

    def execute(self, conn: Connection, values: Mapping[str, Any]) -> Any:
        return conn.exec_driver_sql(self.sql, self.parameters(values))

    def execute_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        conn.exec_driver_sql(self.sql, [self.parameters(row) for row in rows])


class LedgerAppend:
    """The three statements of a ledger append: lock and read the head, insert the rows,
    move the head."""

    def __init__(self, ledger: Table, head: Table, dialect: Dialect) -> None:
        head_id = bindparam("head_id", type_=head.c.id.type)
        self.read_head = PreparedStatement(
            select(head.c.last_sequence, head.c.last_hash)
            .where(head.c.id == head_id)
            .with_for_update(),
            dialect,
        )
        self.insert_rows = PreparedStatement(insert(ledger), dialect)
        self.move_head = PreparedStatement(
            update(head)
            .where(head.c.id == head_id)
            .values(
                last_sequence=bindparam("new_sequence", type_=head.c.last_sequence.type),
                last_hash=bindparam("new_hash", type_=head.c.last_hash.type),
            ),
            dialect,
        )
