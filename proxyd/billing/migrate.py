"""Billing schema maintenance: `migrate` a database URL, apply retention, keep partitions ahead.

Runs the sinks' own migrate/drop steps; never builds SQL itself (that is `billing.schema`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from proxyd.billing.opener import open_sink
from proxyd.billing.schema import DAY, DEFAULT_DAYS_AHEAD, DEFAULT_RETENTION_DAYS, SCHEMA_VERSION
from proxyd.billing.sink import Sink

__all__ = ["SCHEMA_VERSION", "apply_retention", "migrate", "retention_task"]


async def migrate(
    url: str,
    *,
    schema: str = "public",
    now: float | None = None,
    days_ahead: int = DEFAULT_DAYS_AHEAD,
) -> int:
    """Create or upgrade the billing schema at `url`; return the version now in force."""
    sink = open_sink(url, schema=schema)
    await sink.open()
    try:
        return await sink.migrate(time.time() if now is None else now, days_ahead)
    finally:
        await sink.close()


async def apply_retention(sink: Sink, *, days: int = DEFAULT_RETENTION_DAYS, now: float) -> int:
    """Drop what is older than `days` days; return partitions dropped (PG) or rows deleted."""
    if days < 1:
        raise ValueError("retention_days: must be at least 1")
    return await sink.drop_older_than(now - days * DAY)


async def retention_task(
    sink: Sink,
    *,
    days: int = DEFAULT_RETENTION_DAYS,
    clock: Callable[[], float] = time.time,
    interval: float = 3600.0,
    days_ahead: int = DEFAULT_DAYS_AHEAD,
) -> None:
    """Forever: create the coming days' partitions and apply retention, every `interval` s.

    Failures (database away) are logged and retried next round; cancel the task to stop it.
    """
    log = structlog.get_logger("proxyd.billing")
    while True:
        try:
            await sink.migrate(clock(), days_ahead)
            dropped = await apply_retention(sink, days=days, now=clock())
            if dropped:
                log.info("billing_retention", dropped=dropped, days=days)
        except Exception as exc:  # noqa: BLE001 - a retention round must never kill the task
            log.warning("billing_retention_failed", error=type(exc).__name__)
        await asyncio.sleep(interval)
