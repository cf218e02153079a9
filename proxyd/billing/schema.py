"""Schema of `usage_records`: DDL, versions and daily partitions, as SQL text.

Pure: builds SQL and decides which partitions expire; the sinks execute it (only the PostgreSQL
sink imports asyncpg). Imports nothing of proxyd but the record's columns.

Idempotency in PostgreSQL: a unique constraint on a partitioned table must include the partition
key, so the primary key is (request_id, created_at). That is unique per request_id because
created_at is fixed when the request arrives and travels with the record, through the spool
file too, so a retry or a replay of the same row carries the same pair and is skipped by
`ON CONFLICT DO NOTHING`. A second table of request ids would double every insert and need its
own retention; this keeps COPY speed. SQLite has a plain unique request_id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

from proxyd.billing.record import COLUMNS

SCHEMA_VERSION = 2
DAY = 86_400
DEFAULT_RETENTION_DAYS = 90
DEFAULT_DAYS_AHEAD = 3
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,47}")
_PARTITION = re.compile(r"usage_records_p(\d{8})")

PG_TYPES: dict[str, str] = {
    "request_id": "text NOT NULL",
    "created_at": "timestamptz NOT NULL",
    "key_id": "text NOT NULL",
    "account_id": "text NOT NULL",
    "model": "text NOT NULL",
    "upstream_model": "text",
    "channel_id": "text",
    "endpoint": "text NOT NULL",
    "stream": "boolean NOT NULL",
    "status_code": "integer NOT NULL",
    "error_type": "text",
    "prompt_tokens": "bigint NOT NULL",
    "completion_tokens": "bigint NOT NULL",
    "cached_tokens": "bigint NOT NULL",
    "reasoning_tokens": "bigint NOT NULL",
    "cost_nanos": "bigint NOT NULL",
    "latency_ms": "bigint NOT NULL",
    "ttft_ms": "bigint",
    "client_ip": "text",
    "usage_source": "text NOT NULL",
    # version 2 (issue 15): every token category, the tier, paid tool calls, the shortfall
    "cache_write_tokens": "bigint NOT NULL DEFAULT 0",
    "cache_write_1h_tokens": "bigint NOT NULL DEFAULT 0",
    "service_tier": "text",
    "tool_calls": "bigint NOT NULL DEFAULT 0",
    "shortfall_nanos": "bigint NOT NULL DEFAULT 0",
}
# The columns version 1 created; later versions add the rest with ALTER TABLE ... ADD COLUMN
# (a constant default: no row is rewritten, partitions follow their parent).
V1_COLUMNS = tuple(PG_TYPES)[:20]
V2_COLUMNS = tuple(PG_TYPES)[20:]
SQLITE_TYPES: dict[str, str] = {
    c: t.replace("timestamptz", "REAL")  # unix seconds, UTC
    .replace("text", "TEXT")
    .replace("boolean", "INTEGER")
    .replace("bigint", "INTEGER")
    .replace("integer", "INTEGER")
    for c, t in PG_TYPES.items()
}


def check_schema_name(schema: str) -> str:
    """A PostgreSQL schema name safe to quote into DDL; ValueError otherwise."""
    if not _IDENT.fullmatch(schema):
        raise ValueError("schema: lowercase letters, digits and _ (at most 48), not a digit first")
    return schema


def pg_steps(schema: str) -> list[tuple[int, list[str]]]:
    """Each schema version and the statements that reach it from the one before."""
    s = check_schema_name(schema)
    cols = ",\n  ".join(f"{c} {PG_TYPES[c]}" for c in V1_COLUMNS)
    return [
        (
            1,
            [
                f"""CREATE TABLE "{s}".usage_records (
  {cols},
  PRIMARY KEY (request_id, created_at)
) PARTITION BY RANGE (created_at)""",
                f'CREATE INDEX usage_records_account_created ON "{s}".usage_records '
                "(account_id, created_at)",
            ],
        ),
        (
            2,
            [
                f'ALTER TABLE "{s}".usage_records '
                + ", ".join(f"ADD COLUMN IF NOT EXISTS {c} {PG_TYPES[c]}" for c in V2_COLUMNS)
            ],
        ),
    ]


def pg_preamble(schema: str) -> list[str]:
    """Statements run before any step: the schema and the version table."""
    s = check_schema_name(schema)
    return [
        f'CREATE SCHEMA IF NOT EXISTS "{s}"',
        f'CREATE TABLE IF NOT EXISTS "{s}".proxyd_schema_version '
        "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    ]


def pg_stage_table() -> str:
    """Per-connection staging table for COPY; created_at arrives as unix seconds."""
    cols = ", ".join(
        f"{c} {'double precision' if c == 'created_at' else t.replace(' NOT NULL', '')}"
        for c, t in PG_TYPES.items()
    )
    return f"CREATE TEMP TABLE IF NOT EXISTS proxyd_stage ({cols}) ON COMMIT DELETE ROWS"


def pg_insert_from_stage(schema: str, *, skip_known: bool = True) -> str:
    """Move the staged rows into usage_records.

    With `skip_known`, rows whose (request_id, created_at) is stored are skipped; without it
    the statement fails on the first such row (the cheaper path, tried first).
    """
    s = check_schema_name(schema)
    cols = ", ".join(COLUMNS)
    select = ", ".join("to_timestamp(created_at)" if c == "created_at" else c for c in COLUMNS)
    tail = " ON CONFLICT DO NOTHING" if skip_known else ""
    return f'INSERT INTO "{s}".usage_records ({cols}) SELECT {select} FROM proxyd_stage{tail}'  # noqa: S608 - checked schema name, fixed columns


def partition_name(day: date) -> str:
    """usage_records_pYYYYMMDD."""
    return f"usage_records_p{day:%Y%m%d}"


def day_of(ts: float) -> date:
    """The UTC day of a unix time."""
    return datetime.fromtimestamp(ts // DAY * DAY, UTC).date()


def pg_partition_ddl(schema: str, day: date) -> str:
    """Create the partition holding one UTC day, if missing."""
    s = check_schema_name(schema)
    nxt = day + timedelta(days=1)
    return (
        f'CREATE TABLE IF NOT EXISTS "{s}".{partition_name(day)} PARTITION OF '
        f"\"{s}\".usage_records FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') "
        f"TO ('{nxt.isoformat()} 00:00:00+00')"
    )


def days_between(first: float, last: float) -> list[date]:
    """Every UTC day from the one of `first` to the one of `last`."""
    a, b = day_of(first), day_of(last)
    return [a + timedelta(days=i) for i in range((b - a).days + 1)]


def days_of(stamps: Iterable[float]) -> list[date]:
    """The distinct UTC days of some unix times, in order."""
    return [day_of(d * DAY) for d in sorted({int(ts // DAY) for ts in stamps})]


def expired_partitions(names: Iterable[str], cutoff: float) -> list[str]:
    """The partitions whose whole day ends at or before `cutoff`."""
    out = []
    for name in names:
        m = _PARTITION.fullmatch(name)
        if m is None:
            continue
        day = datetime.strptime(m.group(1), "%Y%m%d").replace(tzinfo=UTC)
        if (day + timedelta(days=1)).timestamp() <= cutoff:
            out.append(name)
    return sorted(out)


def sqlite_steps() -> list[tuple[int, list[str]]]:
    """SQLite schema versions; the same columns, request_id unique."""
    cols = ",\n  ".join(
        f"{c} {SQLITE_TYPES[c]}{' PRIMARY KEY' if c == 'request_id' else ''}" for c in V1_COLUMNS
    )
    return [
        (
            1,
            [
                f"CREATE TABLE usage_records (\n  {cols}\n)",
                "CREATE INDEX usage_records_created ON usage_records (created_at)",
                "CREATE INDEX usage_records_account_created ON usage_records "
                "(account_id, created_at)",
            ],
        ),
        (2, [f"ALTER TABLE usage_records ADD COLUMN {c} {SQLITE_TYPES[c]}" for c in V2_COLUMNS]),
    ]


SQLITE_PREAMBLE = (
    "CREATE TABLE IF NOT EXISTS proxyd_schema_version "
    "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
)
