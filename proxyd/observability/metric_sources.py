"""The metrics read from plain state at scrape time: their names and the collector reading them.

The dashboard and the alert rules rely on these names. A source is a callable over plain
attributes, run only when Prometheus scrapes; a failing one is counted and skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Literal

from prometheus_client import Counter
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

SourceFn = Callable[[], Iterable[tuple[tuple[str, ...], float]]]


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A scrape-time metric whose values come from a plain object through a callable."""

    kind: Literal["gauge", "counter"]
    name: str
    documentation: str
    labels: tuple[str, ...] = ()


_gauge = partial(SourceSpec, "gauge")
BILLING_QUEUE_DEPTH = _gauge("proxyd_billing_queue_depth", "Usage rows queued for the writer.")
BILLING_ROWS_WRITTEN = SourceSpec(
    "counter", "proxyd_billing_rows_written_total", "Usage rows written to the billing database."
)
BILLING_ROWS_SPOOLED = SourceSpec(
    "counter",
    "proxyd_billing_rows_spooled_total",
    "Usage rows spooled while the database was away.",
)
BILLING_ROWS_REPLAYED = SourceSpec(
    "counter", "proxyd_billing_rows_replayed_total", "Spooled rows replayed into the database."
)
BILLING_SPOOL_PENDING = _gauge(
    "proxyd_billing_spool_pending_rows", "Spooled rows not replayed yet."
)
STATE_VERSION = _gauge("proxyd_state_version", "Pushed state version in force, by kind.", ("kind",))
STATE_KEYS = _gauge("proxyd_state_keys", "API keys loaded in memory.")
CHANNEL_HEALTHY = _gauge(
    "proxyd_channel_healthy", "1 if the channel takes traffic, 0 while cooling down.", ("channel",)
)
CHANNEL_COOLDOWN = _gauge(
    "proxyd_channel_cooldown_remaining_seconds", "Seconds until a channel is retried.", ("channel",)
)
REDIS_FALLBACK = _gauge("proxyd_redis_fallback", "1 while Redis is away and limits are local.")
RESALE_FLAGGED_KEYS = _gauge("proxyd_resale_flagged_keys", "Keys with the resale signal set.")
READY = _gauge("proxyd_ready", "1 when /readyz answers ready, else 0.")
STICKY_SESSIONS = SourceSpec(
    "counter",
    "proxyd_sticky_sessions_total",
    "Served requests by sticky-session result: hit (same channel and credential), miss (new "
    "or expired session), move (the session went elsewhere, e.g. its channel was cooling down).",
    ("result",),
)
STICKY_PINNED = _gauge("proxyd_sticky_sessions_pinned", "Sticky sessions held in this process.")
CLIENT_CONNECTIONS = _gauge("proxyd_client_connections", "Open client connections.")
CLIENT_CONNECTIONS_CUT = SourceSpec(
    "counter",
    "proxyd_client_connections_cut_total",
    "Client connections closed at a deadline, by phase (head, body, idle).",
    ("phase",),
)
CLIENT_CONNECTIONS_REFUSED = SourceSpec(
    "counter",
    "proxyd_client_connections_refused_total",
    "Client connections answered 503 because the process was at server.max_connections.",
)
CLIENT_ERRORS = SourceSpec(
    "counter",
    "proxyd_client_errors_total",
    "Errors the server made before any endpoint (bad HTTP, deadlines, capacity), by status.",
    ("status",),
)
# The state the lead wires with `Metrics.add_source`; the dashboard and alerts rely on them.
SOURCES = (
    BILLING_QUEUE_DEPTH,
    BILLING_ROWS_WRITTEN,
    BILLING_ROWS_SPOOLED,
    BILLING_ROWS_REPLAYED,
    BILLING_SPOOL_PENDING,
    STATE_VERSION,
    STATE_KEYS,
    CHANNEL_HEALTHY,
    CHANNEL_COOLDOWN,
    REDIS_FALLBACK,
    RESALE_FLAGGED_KEYS,
    READY,
    STICKY_SESSIONS,
    STICKY_PINNED,
    CLIENT_CONNECTIONS,
    CLIENT_CONNECTIONS_CUT,
    CLIENT_CONNECTIONS_REFUSED,
    CLIENT_ERRORS,
)


class SourceCollector:
    """Reads a callable at scrape time; a failing source is counted and skipped, not fatal."""

    def __init__(self, spec: SourceSpec, fn: SourceFn, errors: Counter) -> None:
        self._spec = spec
        self._fn = fn
        self._errors = errors.labels(spec.name)

    def _family(self) -> GaugeMetricFamily | CounterMetricFamily:
        s = self._spec
        if s.kind == "counter":
            return CounterMetricFamily(s.name, s.documentation, labels=s.labels)
        return GaugeMetricFamily(s.name, s.documentation, labels=s.labels)

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        try:
            for labelvalues, value in self._fn():
                family.add_metric(labelvalues, value)
        except Exception:  # noqa: BLE001 - one broken source must not blank the whole scrape
            self._errors.inc()
            return
        yield family
