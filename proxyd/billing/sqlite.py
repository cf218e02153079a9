"""The SQLite billing sink of the embedded default: INSERT OR IGNORE in one worker thread.

Every statement runs in one dedicated thread so the event loop never blocks on the file.
Errors are translated to SinkUnavailable / SinkRejected without row values.
"""

from __future__ import annotations

import asyncio
import operator
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from proxyd.billing import schema as ddl
from proxyd.billing.record import COLUMNS, UsageRecord
from proxyd.billing.sink import SinkRejected, SinkUnavailable

T = TypeVar("T")
_INSERT = (
    f"INSERT OR IGNORE INTO usage_records ({', '.join(COLUMNS)}) "  # noqa: S608 - fixed columns
    f"VALUES ({', '.join('?' for _ in COLUMNS)})"
)


def _translate(exc: Exception) -> SinkUnavailable | SinkRejected:
    name = type(exc).__name__
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError | ValueError | OverflowError):
        return SinkRejected(f"SQLite refused the rows ({name})")
    return SinkUnavailable(f"SQLite cannot take rows now ({name})")


class SqliteSink:
    """A WAL-mode SQLite file; created with its parent directory when missing."""

    def __init__(self, path: Path, *, timeout: float = 10.0) -> None:
        self.path = path
        self._timeout = timeout
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proxyd-sqlite")
        self._row = operator.attrgetter(*COLUMNS)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except (sqlite3.Error, OSError, ValueError, OverflowError) as exc:
            raise _translate(exc) from exc

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._db = db
        return self._db

    async def open(self) -> None:
        """Open (and create) the file."""
        await self._run(self._connect)

    def _write(self, rows: list[tuple[object, ...]]) -> int:
        db = self._connect()
        before = db.total_changes
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_INSERT, rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return db.total_changes - before

    async def write(self, records: Sequence[UsageRecord]) -> int:
        """Insert the rows in one transaction, skipping known request ids; return how many new."""
        if not records:
            return 0
        return await self._run(self._write, list(map(self._row, records)))

    def _migrate(self, now: float, days_ahead: int) -> int:
        del days_ahead  # SQLite is not partitioned
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(ddl.SQLITE_PREAMBLE)
            (current,) = db.execute(
                "SELECT coalesce(max(version), 0) FROM proxyd_schema_version"
            ).fetchone()
            for version, stmts in ddl.sqlite_steps():
                if version > current:
                    for stmt in stmts:
                        db.execute(stmt)
                    db.execute(
                        "INSERT INTO proxyd_schema_version (version, applied_at) VALUES (?, ?)",
                        (version, now),
                    )
                    current = version
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return int(current)

    async def migrate(self, now: float, days_ahead: int) -> int:
        """Create or upgrade the tables; return the schema version."""
        return await self._run(self._migrate, now, days_ahead)

    def _delete_before(self, cutoff: float) -> int:
        return (
            self._connect()
            .execute("DELETE FROM usage_records WHERE created_at < ?", (cutoff,))
            .rowcount
        )

    async def drop_older_than(self, cutoff: float) -> int:
        """Delete rows created before `cutoff`; return how many."""
        return await self._run(self._delete_before, cutoff)

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    async def close(self) -> None:
        """Close the file and stop the worker thread."""
        try:
            await self._run(self._close)
        finally:
            self._pool.shutdown(wait=True)
