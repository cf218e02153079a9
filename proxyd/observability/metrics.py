"""Prometheus metrics of one proxyd app, in its own registry, fed once per request from the row.

Never takes a label that grows with keys, accounts, IPs or request ids, never sees a body, and
is never called per streamed chunk. With `enabled=False` every method returns at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.process_collector import ProcessCollector

from proxyd import __version__
from proxyd.billing.record import UsageRecord
from proxyd.errors import ErrorType
from proxyd.observability.metric_sources import SourceCollector, SourceFn, SourceSpec
from proxyd.observability.tally import BucketCell, Cell, CounterTally, HistogramTally

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# LLM traffic: a cached refusal takes milliseconds, a long reasoning stream takes minutes.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
FLUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
MAX_MODELS = 256  # distinct model label values before new names are counted as "other"
TOKEN_KINDS = ("prompt", "completion", "cached", "reasoning")

ERROR_TYPES = frozenset(e.value for e in ErrorType)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Requests refused before the model was validated carry a client-chosen name: never a label.
_UNVALIDATED_MODEL = frozenset(
    (ErrorType.MODEL_NOT_FOUND, ErrorType.INVALID_REQUEST, ErrorType.BODY_TOO_LARGE)
)


_RATE_FIELDS = frozenset(
    {"cached_input", "cache_write", "cache_write_1h", "audio_input", "audio_output", "image_output"}
)


def status_class(code: int) -> str:
    """`"2xx"` … `"5xx"` for an HTTP status (499 is `"4xx"`), `"error"` when there was none."""
    if 100 <= code <= 599:
        return STATUS_CLASSES[code // 100 - 1]
    return "error"


def _bounded(value: str | None, allowed: frozenset[str], none: str = "none") -> str:
    if value is None:
        return none
    return str(value) if value in allowed else "other"


@dataclass(slots=True)
class _RequestChildren:
    """Every series one request touches, resolved once per distinct label tuple."""

    requests: Cell
    duration: BucketCell
    ttft: BucketCell
    prompt: Cell
    completion: Cell
    cached: Cell
    reasoning: Cell
    cost: Cell


class Metrics:
    """All of proxyd's metrics for one app; `render()` is the body of GET /metrics."""

    def __init__(self, enabled: bool = True, *, max_models: int = MAX_MODELS) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry()
        self._max_models = max_models
        self._models: dict[str, str] = {}
        self._requests: dict[tuple[str, str, bool, int, str], _RequestChildren] = {}
        if not enabled:
            return
        counter = partial(Counter, registry=self.registry)
        gauge = partial(Gauge, registry=self.registry)

        # Bumped on every request: plain numbers rendered at scrape time (observability.tally).
        def tally(name: str, documentation: str, labels: tuple[str, ...]) -> CounterTally:
            family = CounterTally(name, documentation, labels)
            self.registry.register(family)
            return family

        def latency(name: str, documentation: str, labels: tuple[str, ...]) -> HistogramTally:
            family = HistogramTally(name, documentation, labels, LATENCY_BUCKETS)
            self.registry.register(family)
            return family

        self._requests_total = tally(
            "proxyd_requests_total",
            "Requests that passed authentication, by endpoint, model, status class and error type.",
            ("endpoint", "model", "status_class", "error_type"),
        )
        self._duration = latency(
            "proxyd_request_duration_seconds",
            "Time from request arrival to the last byte, for requests sent to a channel.",
            ("model", "stream"),
        )
        self._ttft = latency(
            "proxyd_time_to_first_byte_seconds",
            "Time from request arrival to the first response byte relayed to the client.",
            ("model", "stream"),
        )
        self._tokens = tally(
            "proxyd_tokens_total",
            "Tokens billed, by model and kind (prompt, completion, cached, reasoning).",
            ("model", "kind"),
        )
        self._cost = tally(
            "proxyd_cost_nanos_total", "Amount billed, in nanos (1e-9 currency units).", ("model",)
        )
        self._fallback_priced = tally(
            "proxyd_fallback_priced_tokens_total",
            "Tokens billed through a fallback rate because the model's price lacks the category's "
            "own rate (cached_input, cache_write, cache_write_1h, audio_input, audio_output, "
            "image_output): an incomplete price table.",
            ("category",),
        )
        self._shortfall = tally(
            "proxyd_billing_shortfall_nanos_total",
            "Cost above what a request's reservation covered (recorded as shortfall_nanos).",
            (),
        )
        # Plain ints bumped per request, read by the gauges at scrape time (no lock per request).
        self.in_flight = 0
        self.streams_open = 0
        gauge("proxyd_requests_in_flight", "Requests being served.").set_function(
            lambda: self.in_flight
        )
        gauge("proxyd_streams_open", "Streaming responses being relayed.").set_function(
            lambda: self.streams_open
        )
        self._refusals_total = tally(
            "proxyd_refusals_total",
            "Requests refused by a limit, the balance or a key policy, by reason (an error_type).",
            ("reason",),
        )
        self._failovers_total = tally(
            "proxyd_failovers_total",
            "Attempts moved off a channel before the first byte, by that channel and why.",
            ("channel", "reason"),
        )
        self._upstream_duration = latency(
            "proxyd_upstream_duration_seconds",
            "Duration of each upstream attempt, by channel and status class.",
            ("channel", "status_class"),
        )
        self._flush_duration = Histogram(
            "proxyd_billing_flush_duration_seconds",
            "Time to write one batch of usage rows.",
            buckets=FLUSH_BUCKETS,
            registry=self.registry,
        )
        self._flush_rows = Histogram(
            "proxyd_billing_flush_rows",
            "Usage rows per written batch.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._source_errors = counter(
            "proxyd_metric_source_errors_total", "Scrapes where a state source raised.", ("metric",)
        )
        build = gauge("proxyd_build_info", "Always 1; the version label.", ("version",))
        build.labels(__version__).set(1)
        ProcessCollector(namespace="proxyd", registry=self.registry)

    # -- per request, once, at the end ----------------------------------------------------------

    def _model_label(self, model: str, error_type: str | None) -> str:
        label = self._models.get(model)
        if label is not None:
            return label
        if not model or error_type in _UNVALIDATED_MODEL:
            return "unknown"
        if len(self._models) >= self._max_models:
            return "other"
        self._models[model] = model
        return model

    def _resolve(self, key: tuple[str, str, bool, int, str]) -> _RequestChildren:
        endpoint, model, stream, code, error = key
        s = "true" if stream else "false"
        tok = self._tokens
        children = _RequestChildren(
            self._requests_total.cell(endpoint, model, status_class(code), error),
            self._duration.cell(model, s),
            self._ttft.cell(model, s),
            tok.cell(model, "prompt"),
            tok.cell(model, "completion"),
            tok.cell(model, "cached"),
            tok.cell(model, "reasoning"),
            self._cost.cell(model),
        )
        self._requests[key] = children
        return children

    def observe_request(self, record: UsageRecord) -> None:
        """Count one finished request from its billing row: traffic, latency, tokens, spend."""
        if not self.enabled:
            return
        r = record
        error = _bounded(r.error_type, ERROR_TYPES)
        key = (r.endpoint, self._model_label(r.model, r.error_type), r.stream, r.status_code, error)
        c = self._requests.get(key) or self._resolve(key)
        c.requests.value += 1
        if r.channel_id is not None:
            c.duration.observe(r.latency_ms / 1000)
            if r.ttft_ms is not None:
                c.ttft.observe(r.ttft_ms / 1000)
        if r.prompt_tokens > 0:
            c.prompt.value += r.prompt_tokens
        if r.completion_tokens > 0:
            c.completion.value += r.completion_tokens
        if r.cached_tokens > 0:
            c.cached.value += r.cached_tokens
        if r.reasoning_tokens > 0:
            c.reasoning.value += r.reasoning_tokens
        if r.cost_nanos > 0:
            c.cost.value += r.cost_nanos

    def request_started(self) -> None:
        """One more request in flight."""
        if self.enabled:
            self.in_flight += 1

    def request_finished(self) -> None:
        """One request fewer in flight."""
        if self.enabled:
            self.in_flight -= 1

    def stream_opened(self) -> None:
        """A streamed response started relaying."""
        if self.enabled:
            self.streams_open += 1

    def stream_closed(self) -> None:
        """A streamed response ended, however it ended."""
        if self.enabled:
            self.streams_open -= 1

    def fallback_priced(self, category: str, tokens: int) -> None:
        """Count tokens billed through a fallback rate; `category` is a pricing rate field."""
        if self.enabled:
            self._fallback_priced.cell(_bounded(category, _RATE_FIELDS)).value += tokens

    def shortfall(self, nanos: int) -> None:
        """Count cost above the reservation."""
        if self.enabled:
            self._shortfall.cell().value += nanos

    def refused(self, reason: str) -> None:
        """Count a refusal; `reason` is an ErrorType value (anything else counts as "other")."""
        if not self.enabled:
            return
        self._refusals_total.cell(_bounded(reason, ERROR_TYPES)).value += 1

    def failover(self, from_channel: str, reason: str) -> None:
        """Count a move away from `from_channel`; `reason` is an ErrorType value or status class."""
        if not self.enabled:
            return
        self._failovers_total.cell(from_channel, _bounded(reason, _FAILOVER_REASONS)).value += 1

    def upstream_observe(self, channel_id: str, status_class: str, seconds: float) -> None:
        """Record one upstream attempt; `status_class` is "1xx"…"5xx" or "error" (no response)."""
        if not self.enabled:
            return
        label = _bounded(status_class, _UPSTREAM_CLASSES)
        self._upstream_duration.cell(channel_id, label).observe(seconds)

    def flush_observe(self, rows: int, seconds: float) -> None:
        """Record one billing batch write: its size and how long it took."""
        if self.enabled:
            self._flush_rows.observe(rows)
            self._flush_duration.observe(seconds)

    # -- scrape-time state ----------------------------------------------------------------------

    def add_source(self, spec: SourceSpec, fn: SourceFn) -> None:
        """Expose `fn()`'s `(labelvalues, value)` pairs under `spec` at every scrape."""
        if not self.enabled:
            return
        if not spec.name.startswith("proxyd_"):
            raise ValueError(f"metric name {spec.name!r} must start with 'proxyd_'")
        if spec.kind == "counter" and not spec.name.endswith("_total"):
            raise ValueError(f"counter name {spec.name!r} must end with '_total'")
        self.registry.register(SourceCollector(spec, fn, self._source_errors))

    def add_gauge_source(
        self, name: str, documentation: str, labels: tuple[str, ...], fn: SourceFn
    ) -> None:
        """A gauge read from plain state at scrape time."""
        self.add_source(SourceSpec("gauge", name, documentation, labels), fn)

    def add_counter_source(
        self, name: str, documentation: str, labels: tuple[str, ...], fn: SourceFn
    ) -> None:
        """A counter (name ending in `_total`) read from plain state at scrape time."""
        self.add_source(SourceSpec("counter", name, documentation, labels), fn)

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its Content-Type for GET /metrics."""
        if not self.enabled:
            return b"", CONTENT_TYPE
        return generate_latest(self.registry), CONTENT_TYPE


_FAILOVER_REASONS = ERROR_TYPES | frozenset(STATUS_CLASSES)
_UPSTREAM_CLASSES = frozenset((*STATUS_CLASSES, "error"))
