"""Scrape-time metrics: reads the live parts (billing, state, Redis, resale) when Prometheus asks.

Nothing here runs on the request path; each source is a small function over plain attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from proxyd.billing.writer import BillingWriter
from proxyd.observability import metric_sources as m
from proxyd.observability.metrics import Metrics
from proxyd.state.store import StateStore

Sample = tuple[tuple[str, ...], float]


def _one(fn: Callable[[], float]) -> Callable[[], Iterable[Sample]]:
    return lambda: [((), float(fn()))]


def wire_sources(
    metrics: Metrics,
    *,
    writer: BillingWriter,
    store: StateStore,
    ready: Callable[[], bool],
    redis_fallback: Callable[[], bool],
    resale_flagged: Callable[[], int],
    channel_health: Callable[[], list[dict[str, object]]],
) -> None:
    """Register every scrape-time source the dashboard and the alert rules rely on."""
    stats = writer.stats
    metrics.add_source(m.BILLING_QUEUE_DEPTH, _one(lambda: stats.queue_depth))
    metrics.add_source(m.BILLING_ROWS_WRITTEN, _one(lambda: stats.rows_written))
    metrics.add_source(m.BILLING_ROWS_SPOOLED, _one(lambda: stats.rows_spooled))
    metrics.add_source(m.BILLING_ROWS_REPLAYED, _one(lambda: stats.rows_replayed))
    metrics.add_source(m.BILLING_SPOOL_PENDING, _one(lambda: stats.spool_rows))

    def versions() -> Iterable[Sample]:
        cur = store.current
        return [
            (("keys",), float(cur.keys_version)),
            (("prices",), float(cur.prices_version)),
            (("channels",), float(cur.channels_version)),
        ]

    metrics.add_source(m.STATE_VERSION, versions)
    metrics.add_source(m.STATE_KEYS, _one(lambda: len(store.current.keys_by_id)))
    metrics.add_source(m.READY, _one(lambda: ready()))
    metrics.add_source(m.REDIS_FALLBACK, _one(lambda: redis_fallback()))
    metrics.add_source(m.RESALE_FLAGGED_KEYS, _one(resale_flagged))

    def healthy() -> Iterable[Sample]:
        return [((str(c["id"]),), 1.0 if c.get("healthy") else 0.0) for c in channel_health()]

    def cooldown() -> Iterable[Sample]:
        return [
            ((str(c["id"]),), float(c.get("cooldown_remaining_seconds") or 0.0))  # type: ignore[arg-type]
            for c in channel_health()
        ]

    metrics.add_source(m.CHANNEL_HEALTHY, healthy)
    metrics.add_source(m.CHANNEL_COOLDOWN, cooldown)
