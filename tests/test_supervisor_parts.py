"""The supervisor's pure parts: frames, the shared hub's exact limits, and merged metrics."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxyd.admission.balances import BalanceView
from proxyd.errors import RateLimited
from proxyd.observability import merge
from proxyd.supervisor.frames import FrameBuffer, FrameError, encode
from proxyd.supervisor.hub import Hub


def test_frames_split_anywhere_come_back_whole_and_in_order() -> None:
    """Messages cut at every byte boundary are returned whole, in order, once each."""
    messages = [
        {"op": "acquire", "id": i, "key": ["k", "a", 10, None, None, None, 2, []]} for i in range(5)
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


def _key(rpm: int | None = 3, cap: int | None = None, spend: int | None = None) -> list[object]:
    return ["k1", "a1", rpm, None, None, None, cap, [["daily", spend]] if spend else []]


def ask(hub: Hub, pid: int, message: dict[str, Any]) -> dict[str, Any] | None:
    """One message to the hub as a worker sends it (with an id); the answer without it."""
    reply = hub.handle(pid, {**message, "id": 7})
    if reply is None:
        return None
    assert reply.pop("id") == 7
    return reply


def test_hub_admits_exactly_rpm_for_every_worker_together() -> None:
    """Two workers asking for one key: the bucket is one, so rpm = 3 admits 3 in total."""
    hub = Hub()
    answers = [ask(hub, pid, {"op": "acquire", "key": _key(), "tokens": 0}) for pid in (1, 2) * 3]
    granted = [a for a in answers if a is not None and "grant" in a]
    refused = [a for a in answers if a is not None and "refused" in a]
    assert len(granted) == 3
    assert len(refused) == 3
    assert refused[0]["refused"]["status"] == 429
    assert refused[0]["refused"]["headers"]["x-ratelimit-limit-requests"] == "3"


def test_hub_frees_a_dead_workers_slots_and_reservations() -> None:
    """A worker that dies holding a slot and a reservation: both come back; others keep theirs."""
    hub = Hub()
    ask(hub, 9, {"op": "set_balance", "account": "a1", "version": 1, "balance": 100})
    held = ask(hub, 1, {"op": "acquire", "key": _key(None, cap=1), "tokens": 0})
    assert held is not None
    assert "grant" in held
    assert ask(hub, 1, {"op": "reserve", "account": "a1", "amount": 100}) == {"res": 2}
    blocked = ask(hub, 2, {"op": "acquire", "key": _key(None, cap=1), "tokens": 0})
    assert blocked is not None
    assert "refused" in blocked
    assert hub.forget(1) == (1, 1)
    again = ask(hub, 2, {"op": "acquire", "key": _key(None, cap=1), "tokens": 0})
    assert again is not None
    assert "grant" in again
    assert ask(hub, 2, {"op": "view_balance", "account": "a1"}) == {"view": [100, 0, 1]}


def test_hub_settles_and_reports_conflicts() -> None:
    """Settling charges the cost once; an older balance version comes back as a conflict."""
    hub = Hub()
    ask(hub, 1, {"op": "set_balance", "account": "a1", "version": 2, "balance": 1000})
    res = ask(hub, 1, {"op": "reserve", "account": "a1", "amount": 600})
    assert res is not None
    assert "refused" in (ask(hub, 2, {"op": "reserve", "account": "a1", "amount": 600}) or {})
    ask(hub, 1, {"op": "settle", "res": res["res"], "cost": 250})
    ask(hub, 1, {"op": "settle", "res": res["res"], "cost": 250})  # a second settle is ignored
    assert ask(hub, 1, {"op": "view_balance", "account": "a1"}) == {"view": [750, 0, 2]}
    conflict = ask(hub, 1, {"op": "set_balance", "account": "a1", "version": 1, "balance": 5})
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
    ask(hub, 1, {"op": "acquire", "key": _key(rpm=1), "tokens": 0})
    reply = ask(hub, 1, {"op": "acquire", "key": _key(rpm=1), "tokens": 0})
    assert reply is not None
    with pytest.raises(RateLimited) as caught:
        _raise_refusal(reply)
    assert caught.value.status == 429
    assert caught.value.retry_after is not None
    assert caught.value.retry_after > 0
    assert "retry-after-ms" in caught.value.headers


def test_hub_admits_all_or_nothing_and_one_finish_gives_everything_back() -> None:
    """One `admit`: a refused balance leaves the bucket, slot and spend window untouched; one
    `finish` frees the slot, settles spend and balance; a dead worker's tickets are freed."""
    hub = Hub()
    ask(hub, 9, {"op": "set_balance", "account": "a1", "version": 1, "balance": 500})
    key = _key(rpm=3, cap=3, spend=700)

    def admit(pid: int, ticket: int, amount: int) -> dict[str, Any]:
        reply = ask(
            hub, pid, {"op": "admit", "key": key, "tokens": 10, "amount": amount, "t": ticket}
        )
        assert reply is not None
        return reply

    assert admit(1, 1, 300)["headers"]["x-ratelimit-remaining-requests"] == "2"
    refused = admit(2, 1, 300)  # spend 600 <= 700 would fit; balance 500 - 300 does not
    assert refused["refused"]["error_type"] == "insufficient_quota"
    assert (
        admit(2, 2, 200)["headers"]["x-ratelimit-remaining-requests"] == "1"
    )  # the refused took none
    view = ask(hub, 1, {"op": "key_view", "key": key})
    assert view is not None
    assert view["view"]["in_flight"] == 2
    spend = admit(1, 3, 300)  # the window: 500 reserved + 300 > 700
    assert "daily spend limit" in spend["refused"]["message"]
    hub.handle(1, {"op": "finish", "t": 1, "tokens": 10, "cost": 250})
    hub.handle(1, {"op": "finish", "t": 1, "tokens": 10, "cost": 250})  # once only
    assert ask(hub, 1, {"op": "view_balance", "account": "a1"}) == {"view": [250, 200, 1]}
    spend_view = ask(hub, 1, {"op": "spend_view", "key": key})
    assert spend_view is not None
    assert spend_view["view"]["daily"]["spent_nanos"] == 250
    assert hub.forget(2) == (1, 1)  # worker 2 died holding ticket 2
    assert ask(hub, 1, {"op": "view_balance", "account": "a1"}) == {"view": [250, 0, 1]}
    view = ask(hub, 1, {"op": "key_view", "key": key})
    assert view is not None
    assert view["view"]["in_flight"] == 0


async def test_a_worker_admits_in_one_message_and_finishes_in_one() -> None:
    """Through a real channel: an admission is one request answered once, its end one
    notification; a caller that leaves mid-admission gives everything back."""
    import asyncio
    import socket

    from proxyd.admission.admit import Admission, AdmissionSettings
    from proxyd.supervisor.link import Link
    from proxyd.supervisor.shared import shared_parts
    from tests.test_limits import make_key

    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    hub, frames, seen = Hub(), FrameBuffer(), []
    release = asyncio.Event()

    async def supervisor() -> None:  # the supervisor's side: the hub, answering in order
        loop = asyncio.get_running_loop()
        while data := await loop.sock_recv(theirs, 65536):
            for message in frames.feed(data):
                seen.append(message["op"])
                if message["op"] == "admit" and message["t"] == 2:
                    await release.wait()  # hold the answer: the worker gives up meanwhile
                reply = hub.handle(1, message)
                if reply is not None:
                    await loop.sock_sendall(theirs, encode(reply))

    serving = asyncio.create_task(supervisor())
    link = Link(ours, slot=0, workers=2)
    await link.start()
    try:
        parts = shared_parts(link)
        admission = Admission(
            limits=parts.limits,
            ledger=parts.ledger,
            spend=parts.spend,
            joint=parts.joint,
            settings=AdmissionSettings(),
        )
        await parts.ledger.set_balance("a1", 1, 1000)
        key = make_key(rpm=10, max_concurrency=1, spend_limits=(("daily", 10_000),))
        seen.clear()
        ticket = await admission.admit(
            key, model="m", client_ip="", user_agent="", est_tokens=5, max_cost_nanos=100
        )
        assert seen == ["admit"]
        ticket.finish(tokens=5, cost_nanos=60)
        cancelled = asyncio.create_task(
            admission.admit(
                key, model="m", client_ip="", user_agent="", est_tokens=5, max_cost_nanos=100
            )
        )
        for _ in range(100):
            if seen == ["admit", "finish", "admit"]:
                break
            await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        release.set()
        assert (await asyncio.gather(cancelled, return_exceptions=True))[0].__class__ is (
            asyncio.CancelledError
        )
        for _ in range(100):
            if len(seen) == 4:
                break
            await asyncio.sleep(0.01)
        assert seen == ["admit", "finish", "admit", "finish"]
        assert await parts.ledger.view("a1") == BalanceView(940, 0, 1)
        assert (await parts.limits.key_view(key))["in_flight"] == 0
        assert (await parts.spend.view(key))["daily"]["spent_nanos"] == 60
    finally:
        link.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        theirs.close()


def test_the_hub_keeps_every_workers_sticky_pins_with_a_sliding_ttl() -> None:
    """A pin put by one worker is what another gets; renewals slide it; it expires; off: none."""
    now = [100.0]
    hub = Hub(sticky_ttl=60.0, clock=lambda: now[0])

    def get(key: str) -> Any:
        return hub.handle(2, {"op": "pin_get", "key": key, "id": 7})

    def place(key: str, ch: str, cred: int, *, first: bool, pid: int = 1) -> Any:
        msg = {"op": "pin_place", "key": key, "ch": ch, "cred": cred, "first": first, "id": 3}
        return hub.handle(pid, msg)

    assert get("k1\x00h:s") == {"pin": None, "id": 7}
    assert place("k1\x00h:s", "c2", 1, first=True) == {"pin": ["c2", 1], "id": 3}
    assert get("k1\x00h:s") == {"pin": ["c2", 1], "id": 7}
    now[0] = 150.0
    hub.handle(1, {"op": "pin_renew", "key": "k1\x00h:s"})
    now[0] = 200.0  # 100 s after the put, 50 after the renewal
    assert get("k1\x00h:s")["pin"] == ["c2", 1]
    now[0] = 260.0
    assert get("k1\x00h:s")["pin"] is None
    off = Hub()
    msg = {"op": "pin_place", "key": "k", "ch": "c", "cred": 0, "first": True, "id": 1}
    assert off.handle(1, msg) == {"pin": None, "id": 1}
    assert off.handle(2, {"op": "pin_get", "key": "k", "id": 1}) == {"pin": None, "id": 1}


def test_of_two_first_placements_the_first_stays_and_a_move_replaces_it() -> None:
    """Two workers place one new session at once (two parallel first turns): the second is told
    the first's pin, which both then follow; a move (failover) replaces the pin."""
    hub = Hub(sticky_ttl=60.0, clock=lambda: 100.0)

    def place(pid: int, ch: str, cred: int, *, first: bool) -> Any:
        msg = {"op": "pin_place", "key": "k\x00h:s", "ch": ch, "cred": cred, "first": first}
        reply = hub.handle(pid, {**msg, "id": pid})
        assert reply is not None
        return reply["pin"]

    assert place(1, "c0", 0, first=True) == ["c0", 0]
    assert place(2, "c1", 2, first=True) == ["c0", 0]
    assert place(2, "c1", 2, first=False) == ["c1", 2]
    assert hub.handle(1, {"op": "pin_get", "key": "k\x00h:s", "id": 9}) == {
        "pin": ["c1", 2],
        "id": 9,
    }
