"""The billing sink contract and `open_sink(url)`: where usage rows are stored.

Knows URLs, not drivers: the PostgreSQL sink (the only module importing asyncpg) is imported
only for postgresql:// URLs. A sink stores metadata rows only; it never logs row contents.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from proxyd.billing.record import UsageRecord
from proxyd.errors import ErrorType, ProxydError


class SinkUnavailable(ProxydError):
    """The database cannot take rows now (down, unreachable, timed out): spool and retry."""

    status = 503
    error_type = ErrorType.INTERNAL


class SinkRejected(ProxydError):
    """The database refused these rows for what they contain; the same rows would fail again."""

    status = 500
    error_type = ErrorType.INTERNAL


class Sink(Protocol):
    """Stores usage rows idempotently: a request_id already stored is skipped, never doubled."""

    async def open(self) -> None:
        """Connect; raises SinkUnavailable when the database is away."""

    async def write(self, records: Sequence[UsageRecord]) -> int:
        """Store the rows in one transaction; return how many were new.

        Raises SinkUnavailable (nothing or everything may have been stored; the caller retries)
        or SinkRejected (nothing was stored; some row is unacceptable).
        """

    async def migrate(self, now: float, days_ahead: int) -> int:
        """Create or upgrade the schema (and partitions ahead); return the schema version."""

    async def drop_older_than(self, cutoff: float) -> int:
        """Retention: remove rows created before `cutoff` (whole partitions in PostgreSQL)."""

    async def close(self) -> None:
        """Close gracefully."""


def sqlite_path(url: str) -> Path:
    """`sqlite:///relative/path` -> relative/path, `sqlite:////absolute/path` -> /absolute/path."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError("database_url: a SQLite URL is sqlite:///relative or sqlite:////absolute")
    return Path(url[len(prefix) :])


def open_sink(url: str, *, schema: str = "public", timeout: float = 10.0) -> Sink:
    """The sink for a database URL (not yet connected).

    `schema` is the PostgreSQL schema holding the tables (tests use a unique one per run);
    `timeout` bounds every database operation in seconds.
    """
    scheme = urlsplit(url).scheme
    if scheme in ("postgresql", "postgres"):
        from proxyd.billing.postgres import PostgresSink  # asyncpg only when used

        return PostgresSink(url, schema=schema, timeout=timeout)
    if scheme == "sqlite":
        from proxyd.billing.sqlite import SqliteSink

        return SqliteSink(sqlite_path(url), timeout=timeout)
    raise ValueError("database_url: use postgresql://..., sqlite:///relative or sqlite:////abs")
