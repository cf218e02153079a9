"""The billing pipeline against the real PostgreSQL: exact rows, outages, replay, retention."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxyd.billing.migrate import SCHEMA_VERSION, apply_retention, migrate
from proxyd.billing.opener import open_sink
from proxyd.billing.record import COLUMNS, UsageRecord
from proxyd.billing.spool import Spool
from proxyd.billing.writer import BillingWriter
from tests.pg_proxy import PgProxy

pytestmark = pytest.mark.postgres

PG = "postgresql://postgres@127.0.0.1:5432/test"
DAY = 86_400
CANARY = "canary-7f3a9c-never-stored"


def record(i: int, *, created_at: float | None = None, **extra: Any) -> UsageRecord:
    """A distinct, fully populated record."""
    fields: dict[str, Any] = {
        "request_id": f"req-{i:07d}",
        "created_at": created_at if created_at is not None else 1_763_900_000.0 + i / 1000,
        "key_id": f"key-{i % 7}",
        "account_id": f"acct-{i % 3}",
        "model": "gpt-4o",
        "endpoint": "/v1/chat/completions",
        "upstream_model": "gpt-4o-2024-08-06",
        "channel_id": "chan-a",
        "stream": i % 2 == 0,
        "status_code": 200,
        "prompt_tokens": i,
        "completion_tokens": 2 * i,
        "cached_tokens": i // 2,
        "reasoning_tokens": i // 3,
        "cost_nanos": 1_000_003 * i,
        "latency_ms": 100 + i,
        "ttft_ms": 10 + i if i % 2 == 0 else None,
        "client_ip": "203.0.113.9",
        "usage_source": "upstream" if i % 5 else "estimated",
    }
    fields.update(extra)
    return UsageRecord(**fields)


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """A fresh schema with the billing tables, dropped afterwards."""
    name = f"t_billing_{uuid.uuid4().hex[:10]}"
    await migrate(PG, schema=name, now=1_763_900_000.0)
    yield name
    conn = await asyncpg.connect(PG)
    try:
        await conn.execute(f'DROP SCHEMA "{name}" CASCADE')
    finally:
        await conn.close()


async def fetch(schema: str, query: str) -> list[asyncpg.Record]:
    """Run a query against the test schema."""
    conn = await asyncpg.connect(PG, server_settings={"search_path": schema})
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


async def count(schema: str) -> tuple[int, int]:
    """(rows, distinct request ids) in usage_records."""
    rows = await fetch(schema, "SELECT count(*), count(DISTINCT request_id) FROM usage_records")
    return rows[0][0], rows[0][1]


async def wait_for(predicate: Any) -> None:
    """Poll an async predicate until true, for at most 20 s."""
    async with asyncio.timeout(20):
        while not await predicate():  # noqa: ASYNC110 - polling the writer's counters is the point
            await asyncio.sleep(0.05)


def writer_for(sink_url: str, schema: str, spool_dir: Path, **kw: Any) -> BillingWriter:
    """A writer with short timeouts for tests."""
    kw.setdefault("flush_interval", 0.05)
    kw.setdefault("retry_min", 0.1)
    kw.setdefault("retry_max", 0.3)
    kw.setdefault("write_timeout", 3.0)
    return BillingWriter(open_sink(sink_url, schema=schema, timeout=2.0), Spool(spool_dir), **kw)


async def test_migrate_creates_partitioned_table_with_the_record_columns(schema: str) -> None:
    """usage_records has exactly COLUMNS, is range-partitioned, has day partitions ahead."""
    cols = await fetch(
        schema,
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = 'usage_records' ORDER BY ordinal_position",
    )
    assert tuple(r[0] for r in cols) == COLUMNS
    parts = await fetch(
        schema,
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'usage_records' "
        "AND p.relnamespace = current_schema()::regnamespace ORDER BY 1",
    )
    assert [r[0] for r in parts] == [f"usage_records_p202511{d}" for d in (23, 24, 25, 26)]
    version = await fetch(schema, "SELECT max(version) FROM proxyd_schema_version")
    assert version[0][0] == SCHEMA_VERSION
    # running it again is a no-op
    assert await migrate(PG, schema=schema, now=1_763_900_000.0) == SCHEMA_VERSION


async def test_n_records_give_exactly_n_rows_with_their_values(schema: str, tmp_path: Path) -> None:
    """Every submitted record becomes one row holding exactly its values."""
    writer = writer_for(PG, schema, tmp_path / "spool", batch_size=500)
    await writer.start()
    records = [record(i) for i in range(3000)]
    for r in records:
        writer.submit(r)
    writer.submit(records[5])  # a duplicate submit is stored once
    await writer.close()
    assert await count(schema) == (3000, 3000)
    rows = await fetch(schema, f"SELECT {', '.join(COLUMNS)} FROM usage_records ORDER BY 1")  # noqa: S608
    for r, row in zip(records, rows, strict=True):
        expected = [getattr(r, c) for c in COLUMNS]
        expected[1] = datetime.fromtimestamp(r.created_at, UTC)
        assert list(row.values()) == expected
    assert writer.stats.rows_written == 3000
    assert writer.stats.rows_duplicate == 1
    assert writer.stats.rows_spooled == 0


async def test_connection_cut_mid_load_loses_and_doubles_nothing(
    schema: str, tmp_path: Path
) -> None:
    """Cutting and restoring the database connection during a load still gives exactly N rows."""
    proxy = PgProxy()
    await proxy.start()
    writer = writer_for(proxy.dsn(), schema, tmp_path / "spool", batch_size=200)
    await writer.start()
    n = 6000
    try:
        for i in range(n):
            writer.submit(record(i))
            if i % 100 == 0:
                await asyncio.sleep(0.02)  # 100 rows every 20 ms: cuts last ~200 ms
            if i in (1500, 4000):
                proxy.cut()
            if i in (2500, 5000):
                proxy.restore()
        await wait_for(lambda: _settled(writer))
        await writer.close()
    finally:
        await proxy.close()
    assert await count(schema) == (n, n)
    assert writer.stats.rows_spooled > 0  # the cut really hit the writer
    assert proxy.connections >= 3  # and it reconnected after each restore
    assert writer.stats.rows_replayed >= writer.stats.rows_spooled - writer.stats.rows_written
    assert writer.stats.spool_rows == 0


async def _settled(writer: BillingWriter) -> bool:
    s = writer.stats
    return s.queue_depth == 0 and s.spool_rows == 0 and s.sink_up


async def test_blackholed_database_times_out_to_the_spool(schema: str, tmp_path: Path) -> None:
    """A hung network (no reset) costs one write timeout, then rows spool and later replay."""
    proxy = PgProxy()
    await proxy.start()
    writer = writer_for(proxy.dsn(), schema, tmp_path / "spool", batch_size=50, write_timeout=0.5)
    await writer.start()
    try:
        proxy.cut(blackhole=True)
        for i in range(200):
            writer.submit(record(i))
        await wait_for(lambda: _spooled(writer, 200))
        assert writer.ready() == (True, "billing database away, spooling (200 rows)")
        proxy.restore()
        await wait_for(lambda: _settled(writer))
        await writer.close()
    finally:
        await proxy.close()
    assert await count(schema) == (200, 200)


async def _spooled(writer: BillingWriter, n: int) -> bool:
    return writer.stats.rows_spooled >= n


async def test_restart_with_a_spool_replays_it_once(schema: str, tmp_path: Path) -> None:
    """Rows spooled by a run whose database was away are written by the next run, once."""
    spool_dir = tmp_path / "spool"
    down = writer_for("postgresql://postgres@127.0.0.1:1/test", schema, spool_dir)
    await down.start()
    for i in range(700):
        down.submit(record(i))
    await down.close()
    assert down.stats.rows_spooled == 700
    assert list(spool_dir.glob("spool-*.jsonl"))
    # a crash mid-replay is simulated by pre-storing part of the spool: those are skipped
    pre = writer_for(PG, schema, tmp_path / "other")
    await pre.start()
    for i in range(0, 700, 2):
        pre.submit(record(i))
    await pre.close()

    up = writer_for(PG, schema, spool_dir)
    await up.start()
    assert up.stats.spool_rows == 700
    await wait_for(lambda: _settled(up))
    await up.close()
    assert await count(schema) == (700, 700)
    assert up.stats.rows_replayed == 700
    assert up.stats.rows_written == 350
    assert up.stats.rows_duplicate == 350
    assert not list(spool_dir.glob("spool-*.jsonl"))

    again = writer_for(PG, schema, spool_dir)  # a third start has nothing to replay
    await again.start()
    await again.close()
    assert again.stats.rows_replayed == 0


async def test_queue_full_spools_instead_of_dropping(schema: str, tmp_path: Path) -> None:
    """Rows submitted past queue_max go to the spool and still reach the database."""
    writer = writer_for(PG, schema, tmp_path / "spool", queue_max=100, batch_size=50)
    await writer.start()
    for i in range(1000):
        writer.submit(record(i))
    assert writer.stats.queue_depth == 1000
    await wait_for(lambda: _settled(writer))
    await writer.close()
    assert writer.stats.rows_spooled == 900
    assert await count(schema) == (1000, 1000)


async def test_retention_drops_old_partitions(schema: str, tmp_path: Path) -> None:
    """Partitions older than the retention days are dropped with their rows; newer ones stay."""
    now = 1_763_900_000.0
    writer = writer_for(PG, schema, tmp_path / "spool")
    await writer.start()
    for i, age_days in enumerate((120, 95, 91, 89, 10, 0)):
        writer.submit(record(i, created_at=now - age_days * DAY))
    await writer.close()
    sink = open_sink(PG, schema=schema)
    try:
        assert await apply_retention(sink, days=90, now=now) == 3
        assert await apply_retention(sink, days=90, now=now) == 0
    finally:
        await sink.close()
    left = await fetch(schema, "SELECT request_id FROM usage_records ORDER BY 1")
    assert [r[0] for r in left] == ["req-0000003", "req-0000004", "req-0000005"]


async def test_bad_text_is_cleaned_not_lost(schema: str, tmp_path: Path) -> None:
    """A NUL byte PostgreSQL refuses is stripped from that row alone; the batch is stored."""
    writer = writer_for(PG, schema, tmp_path / "spool", batch_size=10)
    await writer.start()
    for i in range(10):
        writer.submit(record(i, model="evil\x00model" if i == 4 else "gpt-4o"))
    await writer.close()
    assert await count(schema) == (10, 10)
    rows = await fetch(schema, "SELECT model FROM usage_records WHERE request_id = 'req-0000004'")
    assert rows[0][0] == "evilmodel"
    assert writer.stats.rows_rejected == 0


async def test_privacy_canary_never_reaches_rows_or_spool(schema: str, tmp_path: Path) -> None:
    """A prompt's canary string has no way into a row or the spool: records carry no text."""
    from proxyd.protocol.usage import StreamUsage

    scanner = StreamUsage()
    scanner.feed(b'data: {"choices":[{"delta":{"content":"' + CANARY.encode() + b'"}}]}\n\n')
    usage = scanner.usage()
    assert usage is None
    spool_dir = tmp_path / "spool"
    down = writer_for("postgresql://postgres@127.0.0.1:1/test", schema, spool_dir)
    await down.start()
    for i in range(20):
        down.submit(record(i))
    await down.close()
    blob = b"".join(p.read_bytes() for p in spool_dir.iterdir() if p.is_file())
    assert blob
    assert CANARY.encode() not in blob
    up = writer_for(PG, schema, spool_dir)
    await up.start()
    await wait_for(lambda: _settled(up))
    await up.close()
    dump = await fetch(schema, "SELECT usage_records::text FROM usage_records")
    assert len(dump) == 20
    assert all(CANARY not in r[0] for r in dump)


async def test_partition_dropped_under_a_running_writer_is_recreated(
    schema: str, tmp_path: Path
) -> None:
    """A day partition removed elsewhere (retention in another process) is created again."""
    day = 1_763_900_000.0 - 200 * DAY
    writer = writer_for(PG, schema, tmp_path / "spool", batch_size=1)
    await writer.start()
    writer.submit(record(1, created_at=day))
    await wait_for(lambda: _written(writer, 1))
    other = open_sink(PG, schema=schema)
    try:
        assert await apply_retention(other, days=90, now=1_763_900_000.0) == 1
    finally:
        await other.close()
    writer.submit(record(2, created_at=day + 1))
    await writer.close()
    assert await count(schema) == (1, 1)
    assert writer.stats.rows_written == 2
    assert writer.stats.rows_rejected == 0


async def _written(writer: BillingWriter, n: int) -> bool:
    return writer.stats.rows_written >= n
