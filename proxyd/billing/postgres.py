"""The PostgreSQL billing sink: COPY into a staging table, then an insert idempotent on the key.

The only module that imports asyncpg; its errors are translated here, at one boundary, into
SinkUnavailable (retry later) or SinkRejected (bad rows). Error texts carry no row values.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Awaitable, Callable, Sequence
from datetime import date
from typing import TypeVar

import asyncpg

from proxyd.billing import schema as ddl
from proxyd.billing.record import COLUMNS, UsageRecord
from proxyd.billing.sink import SinkRejected, SinkUnavailable

T = TypeVar("T")
_LIST_PARTITIONS = """
SELECT c.relname FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_class p ON p.oid = i.inhparent
JOIN pg_namespace n ON n.oid = p.relnamespace
WHERE n.nspname = $1 AND p.relname = 'usage_records'
"""


def _translate(exc: BaseException) -> SinkUnavailable | SinkRejected:
    """Class 22 (data) and 23 (integrity) and client-side encoding errors mean bad rows;
    everything else (connection, timeout, server state, missing table) means try again later."""
    name = type(exc).__name__
    if isinstance(exc, asyncpg.PostgresError):
        state = str(exc.sqlstate or "")
        if state[:2] in ("22", "23"):
            return SinkRejected(f"PostgreSQL refused the rows ({name} {state})")
        return SinkUnavailable(f"PostgreSQL cannot take rows now ({name} {state})")
    if isinstance(exc, ValueError | TypeError | OverflowError):
        return SinkRejected(f"rows cannot be encoded for PostgreSQL ({name})")
    return SinkUnavailable(f"PostgreSQL is unreachable ({name})")


class PostgresSink:
    """One connection, used by one operation at a time, reconnected on demand."""

    def __init__(self, dsn: str, *, schema: str = "public", timeout: float = 10.0) -> None:
        self._dsn = dsn
        self.schema = ddl.check_schema_name(schema)
        self._timeout = timeout
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._days: set[date] = set()
        self._insert = ddl.pg_insert_from_stage(schema, skip_known=False)
        self._insert_skipping = ddl.pg_insert_from_stage(schema)
        self._row = operator.attrgetter(*COLUMNS)

    async def open(self) -> None:
        """Connect now rather than on the first write."""
        async with self._lock:
            await self._guarded(self._connection)

    async def _connection(self) -> asyncpg.Connection:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        self._conn = None
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self._timeout,
            command_timeout=self._timeout,
            server_settings={"application_name": "proxyd-billing"},
        )
        try:
            await conn.execute(ddl.pg_stage_table())
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        return conn

    def _terminate(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _guarded(self, op: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run `op(*args)`, translating driver errors; drop the connection unless rows were bad."""
        try:
            return await op(*args)
        except asyncio.CancelledError:
            self._terminate()  # a half-done COPY leaves the connection unusable
            raise
        except Exception as exc:
            err = _translate(exc)
            if not isinstance(err, SinkRejected):
                self._terminate()
            raise err from exc

    async def write(self, records: Sequence[UsageRecord]) -> int:
        """COPY the rows to the staging table and insert the new ones; return how many."""
        if not records:
            return 0
        async with self._lock:
            try:
                return await self._guarded(self._write, records)
            except SinkRejected as exc:
                if not isinstance(exc.__cause__, asyncpg.CheckViolationError):
                    raise
                # no partition for a day this process thought existed (retention elsewhere)
                self._days.clear()
                return await self._guarded(self._write, records)

    async def _write(self, records: Sequence[UsageRecord]) -> int:
        conn = await self._connection()
        rows = list(map(self._row, records))
        await self._ensure_days(conn, ddl.days_of(r.created_at for r in records))
        async with conn.transaction():
            await conn.copy_records_to_table(
                "proxyd_stage", records=rows, columns=COLUMNS, timeout=self._timeout
            )
            try:
                # A plain insert skips ON CONFLICT's per-row speculative insertion; a batch with
                # a row already stored (a replay) fails it as a whole and takes the slow path.
                async with conn.transaction():
                    status = await conn.execute(self._insert, timeout=self._timeout)
            except asyncpg.UniqueViolationError:
                status = await conn.execute(self._insert_skipping, timeout=self._timeout)
        return int(status.rsplit(" ", 1)[-1])

    async def _ensure_days(self, conn: asyncpg.Connection, days: list[date]) -> None:
        missing = [d for d in days if d not in self._days]
        if not missing:
            return
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"proxyd_partitions_{self.schema}"
            )
            for day in missing:
                await conn.execute(ddl.pg_partition_ddl(self.schema, day))
        self._days.update(missing)

    async def migrate(self, now: float, days_ahead: int) -> int:
        """Apply the missing schema versions under an advisory lock; create coming partitions."""
        async with self._lock:
            return await self._guarded(self._migrate, now, days_ahead)

    async def _migrate(self, now: float, days_ahead: int) -> int:
        conn = await self._connection()
        s = self.schema
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"proxyd_migrate_{s}")
            for stmt in ddl.pg_preamble(s):
                await conn.execute(stmt)
            current = await conn.fetchval(
                f'SELECT coalesce(max(version), 0) FROM "{s}".proxyd_schema_version'  # noqa: S608 - checked name
            )
            for version, stmts in ddl.pg_steps(s):
                if version > current:
                    for stmt in stmts:
                        await conn.execute(stmt)
                    await conn.execute(
                        f'INSERT INTO "{s}".proxyd_schema_version (version) VALUES ($1)',  # noqa: S608 - checked name
                        version,
                    )
                    current = version
        self._days.clear()
        await self._ensure_days(conn, ddl.days_between(now, now + days_ahead * ddl.DAY))
        return int(current)

    async def drop_older_than(self, cutoff: float) -> int:
        """Drop every daily partition that ends at or before `cutoff`; return how many."""
        async with self._lock:
            return await self._guarded(self._drop_older_than, cutoff)

    async def _drop_older_than(self, cutoff: float) -> int:
        conn = await self._connection()
        names = [r["relname"] for r in await conn.fetch(_LIST_PARTITIONS, self.schema)]
        expired = ddl.expired_partitions(names, cutoff)
        for name in expired:
            async with conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '5s'")
                await conn.execute(f'DROP TABLE IF EXISTS "{self.schema}".{name}')
        self._days.clear()
        return len(expired)

    async def close(self) -> None:
        """Close the connection gracefully, or terminate it if that fails."""
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                await conn.close(timeout=self._timeout)
            except Exception:  # noqa: BLE001 - closing a dead connection may fail any way
                conn.terminate()
