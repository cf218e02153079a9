"""`proxyd migrate` upgrades a billing database of the version-1 schema, keeping every row."""
# ruff: noqa: S608 - SQL text built from this file's own fixed column lists

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest

from proxyd.billing.migrate import SCHEMA_VERSION, migrate
from proxyd.billing.record import COLUMNS
from tests.conftest import pg_url

# The version-1 schema exactly as `git show main:proxyd/billing/migrate.py` built it before
# issue 15 (20 columns; PostgreSQL partitioned by day).
V1_COLS = """request_id text NOT NULL, created_at timestamptz NOT NULL, key_id text NOT NULL,
  account_id text NOT NULL, model text NOT NULL, upstream_model text, channel_id text,
  endpoint text NOT NULL, stream boolean NOT NULL, status_code integer NOT NULL, error_type text,
  prompt_tokens bigint NOT NULL, completion_tokens bigint NOT NULL, cached_tokens bigint NOT NULL,
  reasoning_tokens bigint NOT NULL, cost_nanos bigint NOT NULL, latency_ms bigint NOT NULL,
  ttft_ms bigint, client_ip text, usage_source text NOT NULL"""
V1_NAMES = [c.split()[0] for c in V1_COLS.replace("\n", " ").split(",")]
NEW = ["cache_write_tokens", "cache_write_1h_tokens", "service_tier", "tool_calls"]
NEW += ["shortfall_nanos"]
DAYS = ("2025-11-20", "2025-11-21", "2025-11-22")
NOW = 1_763_900_000.0  # 2025-11-23


def _row(i: int) -> tuple[object, ...]:
    return (
        f"req-{i:05d}",
        f"{DAYS[i % 3]} 10:00:{i % 60:02d}+00",
        f"key-{i % 4}",
        "acct",
        "m",
        None,
        "chan",
        "chat",
        i % 2 == 0,
        200,
        None,
        100 + i,
        10 + i,
        i,
        0,
        1_000 * i,
        5,
        None,
        "203.0.113.1",
        "upstream",
    )


@pytest.mark.postgres
async def test_postgres_v1_with_partitions_upgrades_keeping_every_row(database: str) -> None:
    """Rows in three daily partitions of a v1 table survive `migrate` unchanged; new columns 0."""
    url = pg_url(database)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE proxyd_schema_version (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(
            f"CREATE TABLE usage_records ({V1_COLS}, PRIMARY KEY (request_id, created_at)) "
            "PARTITION BY RANGE (created_at)"
        )
        await conn.execute(
            "CREATE INDEX usage_records_account_created ON usage_records (account_id, created_at)"
        )
        for day, nxt in zip(DAYS, (*DAYS[1:], "2025-11-23"), strict=True):
            await conn.execute(
                f"CREATE TABLE usage_records_p{day.replace('-', '')} PARTITION OF usage_records "
                f"FOR VALUES FROM ('{day} 00:00:00+00') TO ('{nxt} 00:00:00+00')"
            )
        await conn.execute("INSERT INTO proxyd_schema_version (version) VALUES (1)")
        rows = [_row(i) for i in range(300)]
        await conn.executemany(
            f"INSERT INTO usage_records ({', '.join(V1_NAMES)}) VALUES "
            f"($1, $2::text::timestamptz, {', '.join(f'${n}' for n in range(3, 21))})",
            rows,
        )
        before = await conn.fetch(
            f"SELECT {', '.join(V1_NAMES)} FROM usage_records ORDER BY request_id"
        )
    finally:
        await conn.close()

    assert await migrate(url, schema="public", now=NOW) == SCHEMA_VERSION == 2
    assert await migrate(url, schema="public", now=NOW) == 2  # a rerun changes nothing

    conn = await asyncpg.connect(url)
    try:
        after = await conn.fetch(
            f"SELECT {', '.join(V1_NAMES)} FROM usage_records ORDER BY request_id"
        )
        assert [tuple(r) for r in after] == [tuple(r) for r in before]
        assert len(after) == 300
        new = await conn.fetch(f"SELECT {', '.join(NEW)} FROM usage_records")
        assert {tuple(r) for r in new} == {(0, 0, None, 0, 0)}
        for day in DAYS:  # each partition kept its rows and has the new columns
            n = await conn.fetchval(
                f"SELECT count(shortfall_nanos) FROM usage_records_p{day.replace('-', '')}"
            )
            assert n == 100
        cols = await conn.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'usage_records' ORDER BY ordinal_position"
        )
        assert tuple(r[0] for r in cols) == COLUMNS
    finally:
        await conn.close()


async def test_sqlite_v1_upgrades_keeping_every_row(tmp_path: Path) -> None:
    """A v1 SQLite billing file keeps every row through `migrate`; the new columns read 0."""
    db = tmp_path / "usage.db"
    con = sqlite3.connect(db)
    sqlite_cols = (
        V1_COLS.replace("timestamptz", "REAL")
        .replace("text", "TEXT")
        .replace("boolean", "INTEGER")
        .replace("bigint", "INTEGER")
        .replace("integer", "INTEGER")
        .replace("request_id TEXT NOT NULL", "request_id TEXT NOT NULL PRIMARY KEY")
    )
    con.execute(f"CREATE TABLE usage_records ({sqlite_cols})")
    con.execute(
        "CREATE TABLE proxyd_schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    con.execute("INSERT INTO proxyd_schema_version VALUES (1, 0)")
    rows = [(r[0], 1_763_600_000.0 + i, *r[2:]) for i, r in enumerate(_row(i) for i in range(50))]
    con.executemany(f"INSERT INTO usage_records VALUES ({', '.join('?' * 20)})", rows)
    con.commit()
    before = con.execute("SELECT * FROM usage_records ORDER BY request_id").fetchall()
    con.close()

    assert await migrate(f"sqlite:///{db}", now=NOW) == 2

    con = sqlite3.connect(db)
    after = con.execute(
        f"SELECT {', '.join(V1_NAMES)} FROM usage_records ORDER BY request_id"
    ).fetchall()
    assert after == before
    assert set(con.execute(f"SELECT {', '.join(NEW)} FROM usage_records")) == {(0, 0, None, 0, 0)}
    assert tuple(r[1] for r in con.execute("PRAGMA table_info(usage_records)")) == COLUMNS
    con.close()
