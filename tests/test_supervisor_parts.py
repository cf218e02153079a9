"""The supervisor's pure parts: frames, the shared hub's exact limits, and merged metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxyd.errors import RateLimited
from proxyd.observability import merge
from proxyd.supervisor.frames import FrameBuffer, FrameError, encode
from proxyd.supervisor.hub import Hub


def test_frames_split_anywhere_come_back_whole_and_in_order() -> None:
    """Messages cut at every byte boundary are returned whole, in order, once each."""
    messages = [
        {"op": "acquire", "id": i, "key": ["k", "a", 10, None, None, None, 2]} for i in range(5)
    ]
    data = b"".join(encode(m) for m in messages)
    for cut in range(1, len(data)):
        buf = FrameBuffer()
        assert buf.feed(data[:cut]) + buf.feed(data[cut:]) == messages


def test_a_frame_that_is_not_an_object_is_refused() -> None:
    """A frame holding a JSON list (not ours) raises FrameError."""
    raw = encode({"x": 1})
    body = b"[1]"
    with pytest.raises(FrameError):
        FrameBuffer().feed(raw[:0] + len(body).to_bytes(4, "big") + body)


def _key(rpm: int | None = 3, cap: int | None = None) -> list[object]:
    return ["k1", "a1", rpm, None, None, None, cap]


def test_hub_admits_exactly_rpm_for_every_worker_together() -> None:
    """Two workers asking for one key: the bucket is one, so rpm = 3 admits 3 in total."""
    hub = Hub()
    answers = [hub.handle(pid, {"op": "acquire", "key": _key(), "tokens": 0}) for pid in (1, 2) * 3]
    granted = [a for a in answers if a is not None and "grant" in a]
    refused = [a for a in answers if a is not None and "refused" in a]
    assert len(granted) == 3
    assert len(refused) == 3
    assert refused[0]["refused"]["status"] == 429
    assert refused[0]["refused"]["headers"]["x-ratelimit-limit-requests"] == "3"


def test_hub_frees_a_dead_workers_slots_and_reservations() -> None:
    """A worker that dies holding a slot and a reservation: both come back; others keep theirs."""
    hub = Hub()
    hub.handle(9, {"op": "set_balance", "account": "a1", "version": 1, "balance": 100})
    held = hub.handle(1, {"op": "acquire", "key": _key(None, cap=1), "tokens": 0})
    assert held is not None
    assert "grant" in held
    assert hub.handle(1, {"op": "reserve", "account": "a1", "amount": 100}) == {"res": 2}
    blocked = hub.handle(2, {"op": "acquire", "key": _key(None, cap=1), "tokens": 0})
    assert blocked is not None
    assert "refused" in blocked
    assert hub.forget(1) == (1, 1)
    again = hub.handle(2, {"op": "acquire", "key": _key(None, cap=1), "tokens": 0})
    assert again is not None
    assert "grant" in again
    assert hub.handle(2, {"op": "view_balance", "account": "a1"}) == {"view": [100, 0, 1]}


def test_hub_settles_and_reports_conflicts() -> None:
    """Settling charges the cost once; an older balance version comes back as a conflict."""
    hub = Hub()
    hub.handle(1, {"op": "set_balance", "account": "a1", "version": 2, "balance": 1000})
    res = hub.handle(1, {"op": "reserve", "account": "a1", "amount": 600})
    assert res is not None
    assert "refused" in (hub.handle(2, {"op": "reserve", "account": "a1", "amount": 600}) or {})
    hub.handle(1, {"op": "settle", "res": res["res"], "cost": 250})
    hub.handle(1, {"op": "settle", "res": res["res"], "cost": 250})  # a second settle is ignored
    assert hub.handle(1, {"op": "view_balance", "account": "a1"}) == {"view": [750, 0, 2]}
    conflict = hub.handle(1, {"op": "set_balance", "account": "a1", "version": 1, "balance": 5})
    assert conflict == {"conflict": ["balance", 1, 2]}


def _worker_registry(requests: float, in_flight: float, ready: float) -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("proxyd_requests_total", "Requests.", ("status",), registry=reg).labels("2xx").inc(
        requests
    )
    h = Histogram("proxyd_latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=reg)
    h.observe(0.05)
    Gauge("proxyd_requests_in_flight", "In flight.", registry=reg).set(in_flight)
    Gauge("proxyd_ready", "Ready.", registry=reg).set(ready)
    Gauge("proxyd_process_open_fds", "Fds.", registry=reg).set(in_flight * 10)
    return reg


def test_merge_sums_counters_and_histograms_and_aggregates_gauges_as_documented() -> None:
    """Counters and histograms add up; in-flight sums; ready is the minimum; process per worker."""
    parts = [
        ("0", merge.snapshot(_worker_registry(3, 1, 1))),
        ("1", merge.snapshot(_worker_registry(5, 2, 0))),
    ]
    text = merge.render(merge.merge(parts)).decode()
    assert 'proxyd_requests_total{status="2xx"} 8.0' in text
    assert 'proxyd_latency_seconds_bucket{le="0.1"} 2.0' in text
    assert "proxyd_latency_seconds_count 2.0" in text
    assert "proxyd_requests_in_flight 3.0" in text
    assert "proxyd_ready 0.0" in text
    assert 'proxyd_process_open_fds{worker="0"} 10.0' in text
    assert 'proxyd_process_open_fds{worker="1"} 20.0' in text
    assert text.count("# TYPE proxyd_requests_total counter") == 1


def test_rate_limited_refusal_survives_the_channel() -> None:
    """The shared limits' refusal carries status, type, Retry-After and headers to the worker."""
    from proxyd.supervisor.shared import _raise_refusal

    hub = Hub()
    hub.handle(1, {"op": "acquire", "key": _key(rpm=1), "tokens": 0})
    reply = hub.handle(1, {"op": "acquire", "key": _key(rpm=1), "tokens": 0})
    assert reply is not None
    with pytest.raises(RateLimited) as caught:
        _raise_refusal(reply)
    assert caught.value.status == 429
    assert caught.value.retry_after is not None
    assert caught.value.retry_after > 0
    assert "retry-after-ms" in caught.value.headers
