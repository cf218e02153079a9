"""Metrics: one call per request from the usage row, bounded labels, scrape-time state sources."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxyd.billing.record import UsageRecord
from proxyd.errors import ErrorType
from proxyd.observability.metric_sources import SOURCES, SourceFn
from proxyd.observability.metrics import Metrics, status_class

CANARY = "canary-7f3b9c1e-never-in-metrics"


def record(**overrides: object) -> UsageRecord:
    """A finished, successful streamed chat request unless overridden."""
    fields: dict[str, object] = {
        "request_id": "req-1",
        "created_at": 1_700_000_000.0,
        "key_id": "key-1",
        "account_id": "acct-1",
        "model": "gpt-4o",
        "endpoint": "/v1/chat/completions",
        "channel_id": "openai-main",
        "stream": True,
        "status_code": 200,
        "prompt_tokens": 100,
        "completion_tokens": 40,
        "cached_tokens": 20,
        "reasoning_tokens": 5,
        "cost_nanos": 1_234_567,
        "latency_ms": 1500,
        "ttft_ms": 300,
        "client_ip": "203.0.113.9",
    }
    fields.update(overrides)
    return UsageRecord(**fields)  # type: ignore[arg-type]


@dataclass
class FakeState:
    """Plain objects the scrape-time sources read, like the lead's writer stats and state."""

    queue: int = 3
    written: int = 10
    channels: dict[str, bool] = field(default_factory=lambda: {"a": True, "b": False})


def exercised_metrics() -> Metrics:
    """A Metrics on which every method and every standard source has been used once."""
    m = Metrics()
    m.observe_request(record())
    m.observe_request(record(status_code=502, error_type=ErrorType.UPSTREAM_TIMEOUT.value))
    m.request_started()
    m.stream_opened()
    m.refused(ErrorType.RATE_LIMITED.value)
    m.failover("openai-main", ErrorType.UPSTREAM_TIMEOUT.value)
    m.upstream_observe("openai-main", "2xx", 0.8)
    m.flush_observe(250, 0.012)
    for spec in SOURCES:
        m.add_source(spec, constant(tuple("x" for _ in spec.labels)))
    return m


def constant(labelvalues: tuple[str, ...]) -> SourceFn:
    """A source that always reports one series with value 1."""
    return lambda: [(labelvalues, 1.0)]


def samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, parsed back with prometheus_client's own parser."""
    body, _ = m.render()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_request_counted_by_endpoint_model_status_class_and_error_type() -> None:
    """A success counts under error_type "none" and 2xx; a failure under its class and type."""
    m = Metrics()
    m.observe_request(record())
    m.observe_request(record())
    m.observe_request(record(status_code=429, error_type="rate_limited", channel_id=None))
    get = m.registry.get_sample_value
    base = {"endpoint": "/v1/chat/completions", "model": "gpt-4o"}
    ok = {**base, "status_class": "2xx", "error_type": "none"}
    limited = {**base, "status_class": "4xx", "error_type": "rate_limited"}
    assert get("proxyd_requests_total", ok) == 2
    assert get("proxyd_requests_total", limited) == 1


def test_status_class_maps_499_to_4xx_and_no_status_to_error() -> None:
    """Client disconnects (499) are 4xx; a request that never got a status is "error"."""
    assert [status_class(c) for c in (200, 301, 404, 499, 503)] == [
        "2xx",
        "3xx",
        "4xx",
        "4xx",
        "5xx",
    ]
    assert status_class(0) == "error"
    assert status_class(600) == "error"


def test_unknown_error_type_is_bounded_to_other() -> None:
    """An error_type outside the closed ErrorType set never becomes a label value."""
    m = Metrics()
    m.observe_request(record(status_code=500, error_type=CANARY))
    body, _ = m.render()
    assert CANARY not in body.decode()
    labels = {"status_class": "5xx", "error_type": "other"}
    labels |= {"endpoint": "/v1/chat/completions", "model": "gpt-4o"}
    assert m.registry.get_sample_value("proxyd_requests_total", labels) == 1


def test_duration_and_ttft_are_seconds_in_llm_buckets() -> None:
    """1500 ms lands in the 2.5 s bucket and not the 1 s one; TTFT 300 ms in the 0.5 s bucket."""
    m = Metrics()
    m.observe_request(record())
    get = m.registry.get_sample_value
    lab = {"model": "gpt-4o", "stream": "true"}
    dur = "proxyd_request_duration_seconds"
    assert get(f"{dur}_bucket", {**lab, "le": "1.0"}) == 0
    assert get(f"{dur}_bucket", {**lab, "le": "2.5"}) == 1
    assert get(f"{dur}_sum", lab) == pytest.approx(1.5)
    assert get(f"{dur}_bucket", {**lab, "le": "0.005"}) == 0
    assert get(f"{dur}_bucket", {**lab, "le": "600.0"}) == 1
    ttft = "proxyd_time_to_first_byte_seconds"
    assert get(f"{ttft}_bucket", {**lab, "le": "0.25"}) == 0
    assert get(f"{ttft}_bucket", {**lab, "le": "0.5"}) == 1


def test_refusals_without_channel_stay_out_of_latency() -> None:
    """A request refused before routing is counted but does not drag latency percentiles down."""
    m = Metrics()
    m.observe_request(record(channel_id=None, status_code=429, error_type="rate_limited"))
    m.observe_request(record(ttft_ms=None))
    get = m.registry.get_sample_value
    lab = {"model": "gpt-4o", "stream": "true"}
    assert get("proxyd_request_duration_seconds_count", lab) == 1
    assert get("proxyd_time_to_first_byte_seconds_count", lab) == 0


def test_tokens_by_kind_and_cost_by_model() -> None:
    """Token kinds and cost in nanos accumulate per model."""
    m = Metrics()
    m.observe_request(record())
    m.observe_request(record(model="claude-sonnet", cost_nanos=5, prompt_tokens=1))
    get = m.registry.get_sample_value
    expected = {"prompt": 100, "completion": 40, "cached": 20, "reasoning": 5}
    for kind, value in expected.items():
        assert get("proxyd_tokens_total", {"model": "gpt-4o", "kind": kind}) == value
    assert get("proxyd_cost_nanos_total", {"model": "gpt-4o"}) == 1_234_567
    assert get("proxyd_cost_nanos_total", {"model": "claude-sonnet"}) == 5
    assert get("proxyd_tokens_total", {"model": "claude-sonnet", "kind": "prompt"}) == 1


def test_model_label_is_capped_and_unvalidated_names_are_unknown() -> None:
    """Past max_models distinct names new ones count as "other"; 404-model names never label."""
    m = Metrics(max_models=2)
    for name in ("m1", "m2", "m3", "m4"):
        m.observe_request(record(model=name))
    m.observe_request(record(model=CANARY, status_code=404, error_type="model_not_found"))
    models = {dict(lab)["model"] for (name, lab) in samples(m) if name == "proxyd_requests_total"}
    assert models == {"m1", "m2", "other", "unknown"}


def test_no_label_grows_with_keys_accounts_ips_or_request_ids() -> None:
    """1,000 distinct keys, accounts, IPs and request ids leave the series count unchanged."""
    m = Metrics()
    m.observe_request(record())
    before = len(samples(m))
    for i in range(1000):
        m.observe_request(
            record(
                request_id=f"req-{CANARY}-{i}",
                key_id=f"key-{CANARY}-{i}",
                account_id=f"acct-{CANARY}-{i}",
                client_ip=f"10.0.{i // 250}.{i % 250}",
            )
        )
    after = samples(m)
    assert len(after) == before
    assert CANARY not in m.render()[0].decode()
    ok = {"endpoint": "/v1/chat/completions", "model": "gpt-4o", "status_class": "2xx"}
    assert (
        m.registry.get_sample_value("proxyd_requests_total", {**ok, "error_type": "none"}) == 1001
    )


def test_label_children_are_resolved_once_per_label_tuple(monkeypatch: pytest.MonkeyPatch) -> None:
    """Repeated requests with the same labels reuse the cached series instead of looking up."""
    m = Metrics()
    calls = 0
    original = m._requests_total.cell

    def counting(*values: str) -> object:
        nonlocal calls
        calls += 1
        return original(*values)

    monkeypatch.setattr(m._requests_total, "cell", counting)
    for i in range(50):
        m.observe_request(record(key_id=f"k{i}"))
    m.observe_request(record(status_code=500, error_type="internal_error"))
    assert calls == 2


def test_in_flight_and_open_streams_gauges() -> None:
    """request_started/finished and stream_opened/closed move their gauges up and down."""
    m = Metrics()
    get = m.registry.get_sample_value
    for _ in range(3):
        m.request_started()
    m.request_finished()
    m.stream_opened()
    m.stream_opened()
    m.stream_closed()
    assert get("proxyd_requests_in_flight") == 2
    assert get("proxyd_streams_open") == 1


def test_refusals_failovers_upstream_and_flush() -> None:
    """Each event hook feeds its own series with bounded labels."""
    m = Metrics()
    get = m.registry.get_sample_value
    m.refused("rate_limited")
    m.refused("rate_limited")
    m.refused(CANARY)
    m.failover("ch-a", "upstream_timeout")
    m.failover("ch-a", "5xx")
    m.failover("ch-a", CANARY)
    m.upstream_observe("ch-a", "2xx", 0.2)
    m.upstream_observe("ch-a", CANARY, 0.2)
    m.flush_observe(500, 0.02)
    assert get("proxyd_refusals_total", {"reason": "rate_limited"}) == 2
    assert get("proxyd_refusals_total", {"reason": "other"}) == 1
    assert get("proxyd_failovers_total", {"channel": "ch-a", "reason": "upstream_timeout"}) == 1
    assert get("proxyd_failovers_total", {"channel": "ch-a", "reason": "5xx"}) == 1
    assert get("proxyd_failovers_total", {"channel": "ch-a", "reason": "other"}) == 1
    up = "proxyd_upstream_duration_seconds_count"
    assert get(up, {"channel": "ch-a", "status_class": "2xx"}) == 1
    assert get(up, {"channel": "ch-a", "status_class": "other"}) == 1
    assert get("proxyd_billing_flush_rows_sum") == 500
    assert get("proxyd_billing_flush_duration_seconds_bucket", {"le": "0.025"}) == 1
    assert CANARY not in m.render()[0].decode()


def test_sources_are_read_at_scrape_time_from_plain_objects() -> None:
    """A gauge or counter source reflects the object's current value at each render."""
    m = Metrics()
    state = FakeState()
    m.add_gauge_source("proxyd_test_queue", "Queue.", (), lambda: [((), state.queue)])
    m.add_counter_source("proxyd_test_rows_total", "Rows.", (), lambda: [((), state.written)])
    m.add_gauge_source(
        "proxyd_test_healthy",
        "Health.",
        ("channel",),
        lambda: [((cid,), 1.0 if ok else 0.0) for cid, ok in state.channels.items()],
    )
    get = m.registry.get_sample_value
    assert get("proxyd_test_queue") == 3
    state.queue, state.written = 7, 12
    state.channels["a"] = False
    assert get("proxyd_test_queue") == 7
    assert get("proxyd_test_rows_total") == 12
    assert get("proxyd_test_healthy", {"channel": "a"}) == 0
    assert get("proxyd_test_healthy", {"channel": "b"}) == 0


def test_a_failing_source_is_counted_and_the_rest_still_renders() -> None:
    """One raising source drops only its own family and bumps the source-error counter."""
    m = Metrics()

    def broken() -> list[tuple[tuple[str, ...], float]]:
        raise RuntimeError("state not ready")

    m.add_gauge_source("proxyd_test_broken", "Broken.", (), broken)
    m.request_started()
    found = samples(m)
    assert ("proxyd_requests_in_flight", frozenset()) in found
    assert not any(name == "proxyd_test_broken" for name, _ in found)
    errors = m.registry.get_sample_value(
        "proxyd_metric_source_errors_total", {"metric": "proxyd_test_broken"}
    )
    assert errors == 1


def test_source_names_are_validated_and_unique() -> None:
    """Sources need the proxyd_ prefix, counters the _total suffix, and no name twice."""
    m = Metrics()
    with pytest.raises(ValueError, match="proxyd_"):
        m.add_gauge_source("queue_depth", "x", (), list)
    with pytest.raises(ValueError, match="_total"):
        m.add_counter_source("proxyd_rows", "x", (), list)
    m.add_gauge_source("proxyd_test_once", "x", (), list)
    with pytest.raises(ValueError, match="Duplicated"):
        m.add_gauge_source("proxyd_test_once", "x", (), list)
    with pytest.raises(ValueError, match="Duplicated"):
        m.add_gauge_source("proxyd_requests_in_flight", "x", (), list)


def test_each_app_has_its_own_registry() -> None:
    """Two Metrics never share a series, so tests and workers can build many apps."""
    a, b = Metrics(), Metrics()
    a.request_started()
    assert a.registry.get_sample_value("proxyd_requests_in_flight") == 1
    assert b.registry.get_sample_value("proxyd_requests_in_flight") == 0


def test_disabled_metrics_do_nothing_and_render_empty() -> None:
    """With enabled=False every method is a no-op and /metrics has an empty body."""
    m = Metrics(enabled=False)
    m.observe_request(record())
    m.request_started()
    m.request_finished()
    m.stream_opened()
    m.stream_closed()
    m.refused("rate_limited")
    m.failover("a", "5xx")
    m.upstream_observe("a", "2xx", 1.0)
    m.flush_observe(1, 0.1)
    m.add_gauge_source("bad name is not even checked", "x", (), list)
    body, content_type = m.render()
    assert body == b""
    assert content_type.startswith("text/plain; version=0.0.4")
    assert list(m.registry.collect()) == []


def test_exposition_parses_and_every_name_is_prefixed() -> None:
    """The full exposition parses with prometheus_client's parser; every family is proxyd_*."""
    m = exercised_metrics()
    body, content_type = m.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    families = list(text_string_to_metric_families(body.decode()))
    names = {f.name for f in families}
    assert all(n.startswith("proxyd_") for n in names)
    expected = {"proxyd_requests", "proxyd_request_duration_seconds", "proxyd_build_info"}
    expected |= {spec.name.removesuffix("_total") for spec in SOURCES}
    assert expected <= names


def test_no_record_field_but_the_allowed_ones_reaches_the_exposition() -> None:
    """Ids, IPs and request ids from the row never appear in the metric text."""
    m = Metrics()
    m.observe_request(
        record(
            request_id=CANARY + "-req",
            key_id=CANARY + "-key",
            account_id=CANARY + "-acct",
            client_ip=CANARY + "-ip",
            upstream_model=CANARY + "-upstream",
        )
    )
    assert CANARY not in m.render()[0].decode()


def test_fallback_priced_tokens_by_category_and_shortfall() -> None:
    """Tokens billed through a fallback rate are counted per category, unknown ones as other."""
    m = Metrics()
    m.fallback_priced("cache_write_1h", 500)
    m.fallback_priced("cache_write_1h", 20)
    m.fallback_priced("not-a-rate", 7)
    m.shortfall(1234)
    text = m.render()[0].decode()
    assert 'proxyd_fallback_priced_tokens_total{category="cache_write_1h"} 520.0' in text
    assert 'proxyd_fallback_priced_tokens_total{category="other"} 7.0' in text
    assert "proxyd_billing_shortfall_nanos_total 1234.0" in text
