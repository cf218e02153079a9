"""The SQLite sink of the embedded default, its URLs, schema, retention and outage spooling."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from proxyd.billing.migrate import SCHEMA_VERSION, apply_retention, migrate
from proxyd.billing.opener import open_sink, sqlite_path
from proxyd.billing.postgres import PostgresSink
from proxyd.billing.record import COLUMNS, UsageRecord
from proxyd.billing.spool import Spool
from proxyd.billing.sqlite import SqliteSink
from proxyd.billing.writer import BillingWriter

NOW = 1_763_900_000.0


def record(i: int, **extra: Any) -> UsageRecord:
    """A distinct record."""
    fields: dict[str, Any] = {
        "request_id": f"req-{i}",
        "created_at": NOW + i,
        "key_id": "key-1",
        "account_id": "acct-1",
        "model": "claude-x",
        "endpoint": "/v1/messages",
        "stream": True,
        "status_code": 499 if i % 4 == 0 else 200,
        "error_type": "client_disconnect" if i % 4 == 0 else None,
        "prompt_tokens": 10 * i,
        "completion_tokens": i,
        "cost_nanos": 12_345 * i,
        "latency_ms": 5,
        "usage_source": "estimated" if i % 4 == 0 else "upstream",
    }
    fields.update(extra)
    return UsageRecord(**fields)


def rows(db: Path, query: str = "SELECT * FROM usage_records ORDER BY created_at") -> list[Any]:
    """Read rows straight from the file."""
    with sqlite3.connect(db) as conn:
        return conn.execute(query).fetchall()


def test_urls() -> None:
    """sqlite:///relative and sqlite:////absolute map to paths; other URLs are refused."""
    assert sqlite_path("sqlite:///var/usage.db") == Path("var/usage.db")
    assert sqlite_path("sqlite:////srv/usage.db") == Path("/srv/usage.db")
    with pytest.raises(ValueError, match=r"^database_url:"):
        sqlite_path("sqlite:///")
    with pytest.raises(ValueError, match=r"^database_url:"):
        open_sink("mysql://x/y")
    assert isinstance(open_sink("sqlite:///a.db"), SqliteSink)
    assert isinstance(open_sink("postgresql://u@h/db", schema="s1"), PostgresSink)
    with pytest.raises(ValueError, match=r"^schema:"):
        open_sink("postgresql://u@h/db", schema='x"; DROP TABLE y; --')


async def test_migrate_creates_the_columns_and_is_repeatable(tmp_path: Path) -> None:
    """The SQLite table has exactly COLUMNS, the version is recorded, a rerun changes nothing."""
    db = tmp_path / "sub" / "usage.db"
    assert await migrate(f"sqlite:///{db}", now=NOW) == SCHEMA_VERSION
    assert await migrate(f"sqlite:///{db}", now=NOW) == SCHEMA_VERSION
    cols = [r[1] for r in rows(db, "PRAGMA table_info(usage_records)")]
    assert tuple(cols) == COLUMNS
    assert rows(db, "SELECT version FROM proxyd_schema_version") == [(1,), (SCHEMA_VERSION,)]


async def test_writer_stores_exactly_the_records(tmp_path: Path) -> None:
    """N records (one submitted twice) give N rows with their values."""
    db = tmp_path / "usage.db"
    await migrate(f"sqlite:///{db}")
    flushes: list[int] = []
    writer = BillingWriter(
        open_sink(f"sqlite:///{db}"),
        Spool(tmp_path / "spool"),
        batch_size=64,
        flush_interval=0.02,
        on_flush=lambda n, s: flushes.append(n),
    )
    await writer.start()
    records = [record(i) for i in range(500)]
    for r in records:
        writer.submit(r)
    writer.submit(records[0])
    await writer.close()
    got = rows(db)
    assert len(got) == 500
    for r, row in zip(records, got, strict=True):
        assert row == tuple(
            int(v) if isinstance(v, bool) else v for v in map(r.__getattribute__, COLUMNS)
        )
    assert sum(flushes) == 501
    assert max(flushes) <= 64
    assert (writer.stats.rows_written, writer.stats.rows_duplicate) == (500, 1)


async def test_rows_flush_on_time_without_close(tmp_path: Path) -> None:
    """A lone row is written after about flush_interval, not only at shutdown."""
    db = tmp_path / "usage.db"
    await migrate(f"sqlite:///{db}")
    writer = BillingWriter(
        open_sink(f"sqlite:///{db}"), Spool(tmp_path / "spool"), flush_interval=0.05
    )
    await writer.start()
    writer.submit(record(1))
    async with asyncio.timeout(5):
        while writer.stats.rows_written == 0:  # noqa: ASYNC110 - polling the counter is the point
            await asyncio.sleep(0.01)
    assert len(rows(db)) == 1
    await writer.close()


async def test_retention_deletes_old_rows(tmp_path: Path) -> None:
    """Rows older than the retention days are deleted, newer ones kept."""
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    await migrate(url)
    sink = open_sink(url)
    await sink.write(
        [record(i, created_at=NOW - age * 86_400) for i, age in enumerate((100, 91, 89, 1))]
    )
    assert await apply_retention(sink, days=90, now=NOW) == 2
    await sink.close()
    assert [r[0] for r in rows(tmp_path / "usage.db")] == ["req-2", "req-3"]


async def test_unwritable_database_spools_then_replays(tmp_path: Path) -> None:
    """While the database cannot be opened rows spool; the next run with it replays them."""
    spool_dir = tmp_path / "spool"
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    down = BillingWriter(
        open_sink(f"sqlite:///{blocker}/usage.db"),
        Spool(spool_dir),
        flush_interval=0.02,
        spool_max_rows=50,
    )
    await down.start()
    assert down.ready() == (True, "billing database away, spooling (0 rows)")
    for i in range(80):
        down.submit(record(i))
    await down.close()
    assert down.stats.rows_spooled == 80
    assert down.ready() == (False, "billing spool holds 80 rows, over its bound")

    db = tmp_path / "usage.db"
    await migrate(f"sqlite:///{db}")
    up = BillingWriter(open_sink(f"sqlite:///{db}"), Spool(spool_dir), flush_interval=0.02)
    await up.start()
    async with asyncio.timeout(10):
        while up.stats.spool_rows:  # noqa: ASYNC110 - polling the counter is the point
            await asyncio.sleep(0.02)
    await up.close()
    assert len(rows(db)) == 80
    assert up.stats.rows_replayed == 80
    assert up.ready() == (True, "ok")


async def test_unstorable_row_goes_to_the_rejected_file_alone(tmp_path: Path) -> None:
    """A row the database refuses even cleaned is kept in rejected.jsonl; its batch is stored."""
    db = tmp_path / "usage.db"
    await migrate(f"sqlite:///{db}")
    writer = BillingWriter(open_sink(f"sqlite:///{db}"), Spool(tmp_path / "spool"))
    await writer.start()
    for i in range(9):
        writer.submit(record(i, prompt_tokens=2**70 if i == 3 else i))
    writer.submit(record(9, model="bad\udc80surrogate"))  # cleaned, then stored
    await writer.close()
    assert len(rows(db)) == 9
    assert writer.stats.rows_rejected == 1
    rejected = (tmp_path / "spool" / "rejected.jsonl").read_bytes()
    assert b'"req-3"' in rejected
    assert rows(db, "SELECT model FROM usage_records WHERE request_id = 'req-9'") == [
        ("bad?surrogate",)
    ]
