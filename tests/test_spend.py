"""Spend caps per key: calendar and 5-hour windows, 429 naming the window, shared through Redis."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.crc import key_slot

from proxyd.admission.spend import LocalSpend, calendar_period
from proxyd.errors import InsufficientQuota
from proxyd.state.schemas import KeySpec
from proxyd.state.store import compile_key
from tests.conftest import SECRET, StartProxy, StartServer, channel, key, make_config, server_url
from tests.fakes import FakeProvider, Step, chat_body
from tests.test_control_api import TOKEN

OAI = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
# Price 1 unit per million tokens in and out = 1000 nanos per token. A body of B bytes with
# max_tokens 10 reserves (B + 10) x 1000 nanos.
BODY = orjson.dumps(
    {"model": "gpt-test", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
)
RESERVE = (len(BODY) + 10) * 1000
COST = (7 + 2) * 1000  # chat_body's usage: 7 prompt + 2 completion tokens


def ts(text: str) -> float:
    """Unix seconds of an ISO time in UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def record(**limits: int) -> Any:
    """A compiled key with these spend limits."""
    spec = KeySpec.model_validate(key(spend_limits=limits))
    return compile_key(spec)


def test_calendar_periods_are_utc_day_iso_week_and_month() -> None:
    """Day resets at UTC midnight, week on ISO Monday, month on the 1st (year wraps)."""
    now = ts("2026-12-31T23:30:00")  # a Thursday
    assert calendar_period("daily", now) == ("20261231", ts("2027-01-01T00:00:00"))
    assert calendar_period("weekly", now) == ("2026W53", ts("2027-01-04T00:00:00"))
    assert calendar_period("monthly", now) == ("202612", ts("2027-01-01T00:00:00"))


def test_five_hour_window_opens_with_the_first_request_after_the_last_ended() -> None:
    """A 5-hour window starts at the first request, refuses past its cap, reopens after 5 h."""
    clock = [ts("2026-12-02T10:00:00")]
    spend = LocalSpend(clock=lambda: clock[0])
    k = record(window_5h_nanos=100)
    assert spend.view_now(k)["window_5h"]["resets_at"] is None  # not open yet
    r = spend.reserve_now(k, 60)
    assert r is not None
    spend.settle(r, 60)
    clock[0] += 3600
    with pytest.raises(InsufficientQuota) as exc:
        spend.reserve_now(k, 50)
    assert "5-hour" in exc.value.message
    assert exc.value.retry_after == pytest.approx(4 * 3600)
    assert spend.view_now(k)["window_5h"] == {
        "limit_nanos": 100, "spent_nanos": 60, "resets_at": "2026-12-02T15:00:00Z"
    }  # fmt: skip
    clock[0] = ts("2026-12-02T16:10:00")  # after the window ended: the next request opens one
    r = spend.reserve_now(k, 100)
    assert r is not None
    assert spend.view_now(k)["window_5h"]["resets_at"] == "2026-12-02T21:10:00Z"


def test_every_cap_must_hold_and_a_refusal_sets_nothing_aside() -> None:
    """The tightest window refuses; the others keep nothing of the refused request."""
    clock = [ts("2026-12-02T10:00:00")]
    spend = LocalSpend(clock=lambda: clock[0])
    k = record(daily_nanos=1_000, monthly_nanos=150)
    r = spend.reserve_now(k, 100)
    assert r is not None
    with pytest.raises(InsufficientQuota, match="monthly"):
        spend.reserve_now(k, 100)
    spend.settle(r, 40)
    assert spend.reserve_now(k, 110) is not None  # 40 spent + 110 fits 150
    clock[0] = ts("2026-12-03T00:00:01")  # a new day; the month is the same
    view = spend.view_now(k)
    assert view["daily"]["spent_nanos"] == 0
    assert view["monthly"]["spent_nanos"] == 40


async def spent_at_least(parts: Any, k: Any, nanos: int) -> dict[str, Any]:
    """The key's spend view once its 5-hour window holds `nanos` (settles run in background)."""
    async with asyncio.timeout(5):
        while True:
            view: dict[str, Any] = await parts.admission.spend.view(k)
            if view["window_5h"]["spent_nanos"] >= nanos:
                return view
            await asyncio.sleep(0.02)


def spend_config(tmp_path: Path, url: str, limits: dict[str, int], **extra: Any) -> Any:
    """One channel, key k1 with `limits`, prices 1/1, control API on."""
    return make_config(
        tmp_path,
        [channel("a", url)],
        keys=[key(spend_limits=limits)],
        prices={"gpt-test": {"input": "1", "output": "1"}},
        server={"admin_token": TOKEN},
        **extra,
    )


async def test_over_a_window_is_429_naming_it_with_no_upstream_call(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, aiohttp_client: Any
) -> None:
    """Past the daily cap: 429 insufficient_quota naming the window, Retry-After, no upstream."""
    from proxyd.app import create_control

    fake = FakeProvider(Step(body=chat_body("ok")))
    url = server_url(await start_server(fake.app()))
    client, parts = await start_proxy(
        spend_config(tmp_path, url, {"daily_nanos": RESERVE + COST - 1})
    )
    assert (await client.post("/v1/chat/completions", data=BODY, headers=OAI)).status == 200
    resp = await client.post("/v1/chat/completions", data=BODY, headers=OAI)
    err = await resp.json()
    assert resp.status == 429
    assert err["error"]["code"] == "insufficient_quota"
    assert "daily spend limit" in err["error"]["message"]
    assert 0 < int(resp.headers["Retry-After"]) <= 86_400
    assert resp.headers["x-should-retry"] == "false"
    assert len(fake.seen) == 1

    control = await aiohttp_client(create_control(parts))
    got = await control.get("/control/v1/keys/k1", headers={"Authorization": f"Bearer {TOKEN}"})
    view = (await got.json())["spend"]["daily"]
    assert view["limit_nanos"] == RESERVE + COST - 1
    assert view["spent_nanos"] == COST
    assert view["resets_at"].endswith("T00:00:00Z")


@pytest.mark.redis
async def test_two_instances_sharing_redis_admit_exactly_up_to_the_cap(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """Twelve concurrent requests over two instances, a cap of five reservations: five pass."""
    fake = FakeProvider(Step(body=chat_body("ok"), stall_before_headers=0.5))
    url = server_url(await start_server(fake.app()))
    prefix = f"proxyd-test-{uuid.uuid4().hex[:8]}:"
    redis = {"redis": {"url": "redis://127.0.0.1:6379/0", "prefix": prefix}}
    limits = {"window_5h_nanos": 5 * RESERVE, "weekly_nanos": 100 * RESERVE}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = await start_proxy(spend_config(tmp_path / "a", url, limits, **redis))
    b, parts_b = await start_proxy(spend_config(tmp_path / "b", url, limits, **redis))
    resps = await asyncio.gather(
        *(c.post("/v1/chat/completions", data=BODY, headers=OAI) for c in [a, b] * 6)
    )
    statuses = sorted(r.status for r in resps)
    assert statuses == [200] * 5 + [429] * 7
    assert len(fake.seen) == 5
    # settled in the background: both instances see the five costs in Redis
    k1 = parts_b.store.current.keys_by_id["k1"]
    view = await spent_at_least(parts_b, k1, 5 * COST)
    assert view["window_5h"]["spent_nanos"] == 5 * COST
    assert view["weekly"]["spent_nanos"] == 5 * COST


@pytest.mark.redis
async def test_windows_redis_forgot_are_reseeded_not_read_as_zero(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy
) -> None:
    """Redis losing the windows (restart, eviction) resumes from the instance's view, not 0."""
    import redis.asyncio as aioredis

    fake = FakeProvider(Step(body=chat_body("ok")))
    url = server_url(await start_server(fake.app()))
    prefix = f"proxyd-test-{uuid.uuid4().hex[:8]}:"
    limits = {"window_5h_nanos": 100 * RESERVE, "weekly_nanos": 100 * RESERVE}
    config = spend_config(
        tmp_path, url, limits, redis={"url": "redis://127.0.0.1:6379/0", "prefix": prefix}
    )
    client, parts = await start_proxy(config)
    k1 = parts.store.current.keys_by_id["k1"]
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", data=BODY, headers=OAI)).status == 200
    await spent_at_least(parts, k1, 3 * COST)
    r = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}spend:*")]
        assert len(keys) == 2
        # tagged with the account, like its balance: one cluster slot for the whole admission
        assert all(k.startswith(f"{prefix}spend:{{acct-1}}:k1:".encode()) for k in keys)
        balance = f"{prefix}acct:{{acct-1}}:b".encode()
        assert {key_slot(k) for k in keys} == {key_slot(balance)}
        await r.delete(*keys)  # this test's own keys only
    finally:
        await r.aclose()
    assert (await client.post("/v1/chat/completions", data=BODY, headers=OAI)).status == 200
    view = await spent_at_least(parts, k1, 4 * COST)
    assert view["window_5h"]["spent_nanos"] == 4 * COST
    assert view["weekly"]["spent_nanos"] == 4 * COST
