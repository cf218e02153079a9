"""The billing sink contract: what stores usage rows, and the two ways it fails.

A sink stores metadata rows only; it never logs row contents. `billing.opener` picks one by URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

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
