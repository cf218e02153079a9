"""Local per-key limits: 429 with exact Retry-After and x-ratelimit headers, slots, corrections."""

from __future__ import annotations

import dataclasses

import pytest

from proxyd.admission.limits import LocalLimits
from proxyd.errors import ErrorType, RateLimited
from proxyd.state.store import KeyRecord


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_key(**extra: object) -> KeyRecord:
    base: dict[str, object] = {
        "id": "k1",
        "hash": "0" * 64,
        "account_id": "a1",
        "active": True,
        "expires_at": None,
        "models": None,
        "rpm": None,
        "tpm": None,
        "burst_requests": None,
        "burst_tokens": None,
        "max_concurrency": None,
        "allowed_networks": (),
        "block_on_resale": False,
    }
    base.update(extra)
    return KeyRecord(**base)  # type: ignore[arg-type]


def test_rpm_refusal_carries_exact_retry_after_and_headers() -> None:
    """The 61st request in a minute at 60 rpm gets 429, Retry-After 1 and OpenAI headers."""
    clock = FakeClock()
    limits = LocalLimits(clock)
    key = make_key(rpm=60, tpm=1000)
    for _ in range(60):
        limits.release(limits.acquire_now(key, 1), tokens=1)
    with pytest.raises(RateLimited) as info:
        limits.acquire_now(key, 1)
    err = info.value
    assert err.status == 429
    assert err.error_type is ErrorType.RATE_LIMITED
    assert err.retry_after == 1.0
    assert err.headers["x-ratelimit-limit-requests"] == "60"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert err.headers["x-ratelimit-limit-tokens"] == "1000"
    assert err.headers["x-ratelimit-remaining-tokens"] == "940"
    assert err.headers["retry-after-ms"] == "1000"
    clock.t += 1.0
    limits.acquire_now(key, 1)


def test_tpm_refusal_waits_for_the_tokens() -> None:
    """A request needing more tokens than left waits exactly until they have refilled."""
    clock = FakeClock()
    limits = LocalLimits(clock)
    key = make_key(tpm=600)  # 10 tokens per second
    limits.acquire_now(key, 580)
    with pytest.raises(RateLimited) as info:
        limits.acquire_now(key, 45)  # 20 left, 25 missing: 2.5 s
    assert info.value.retry_after == 3.0
    assert info.value.headers["retry-after-ms"] == "2500"
    assert "tokens" in info.value.message
    clock.t += 2.5
    limits.acquire_now(key, 45)


def test_refusal_takes_nothing() -> None:
    """A tpm refusal does not consume the request's rpm token."""
    clock = FakeClock()
    limits = LocalLimits(clock)
    key = make_key(rpm=2, tpm=100)
    limits.acquire_now(key, 100)
    with pytest.raises(RateLimited):
        limits.acquire_now(key, 10)
    assert limits.view_now(key)["requests"]["remaining"] == 1


def test_concurrency_cap_and_release() -> None:
    """The third concurrent request of a key capped at 2 gets 429 concurrency_limited."""
    limits = LocalLimits(FakeClock())
    key = make_key(max_concurrency=2)
    a = limits.acquire_now(key, 1)
    limits.acquire_now(key, 1)
    with pytest.raises(RateLimited) as info:
        limits.acquire_now(key, 1)
    assert info.value.error_type is ErrorType.CONCURRENCY_LIMITED
    assert info.value.retry_after is None
    limits.release(a, tokens=1)
    limits.release(a, tokens=1)  # idempotent: must not free a second slot
    assert limits.in_flight("k1") == 1
    limits.acquire_now(key, 1)
    with pytest.raises(RateLimited):
        limits.acquire_now(key, 1)


def test_finish_corrects_tokens_to_the_real_count() -> None:
    """Reserving 500 and using 100 gives 400 back; using 700 charges 200 more."""
    limits = LocalLimits(FakeClock())
    key = make_key(tpm=1000)
    limits.release(limits.acquire_now(key, 500), tokens=100)
    assert limits.view_now(key)["tokens"]["remaining"] == 900
    limits.release(limits.acquire_now(key, 500), tokens=700)
    assert limits.view_now(key)["tokens"]["remaining"] == 200


def test_cancel_returns_request_and_tokens() -> None:
    """Releasing with tokens=None (refused later) returns the request and all its tokens."""
    limits = LocalLimits(FakeClock())
    key = make_key(rpm=5, tpm=1000)
    limits.release(limits.acquire_now(key, 300), tokens=None)
    view = limits.view_now(key)
    assert view["requests"]["remaining"] == 5
    assert view["tokens"]["remaining"] == 1000
    assert view["in_flight"] == 0


def test_success_headers_show_what_is_left() -> None:
    """An admitted request's headers show the remaining requests and tokens after it."""
    limits = LocalLimits(FakeClock())
    grant = limits.acquire_now(make_key(rpm=10, tpm=1000), 250)
    assert grant.headers["x-ratelimit-remaining-requests"] == "9"
    assert grant.headers["x-ratelimit-remaining-tokens"] == "750"
    assert grant.headers["x-ratelimit-reset-tokens"] == "15s"
    assert limits.acquire_now(make_key(id="free"), 10).headers == {}


def test_pushed_rate_change_takes_effect() -> None:
    """A key pushed with a new rpm gets a new bucket; an unchanged tpm keeps its level."""
    clock = FakeClock()
    limits = LocalLimits(clock)
    key = make_key(rpm=1, tpm=100)
    limits.acquire_now(key, 60)
    with pytest.raises(RateLimited):
        limits.acquire_now(key, 1)
    faster = dataclasses.replace(key, rpm=100)
    grant = limits.acquire_now(faster, 1)
    assert grant.headers["x-ratelimit-remaining-tokens"] == "39"


def test_prune_keeps_busy_keys() -> None:
    """Pruning forgets idle full keys, never one in flight or with a partly empty bucket."""
    clock = FakeClock()
    limits = LocalLimits(clock)
    limits.release(limits.acquire_now(make_key(id="idle-a", rpm=60), 1), tokens=1)
    limits.acquire_now(make_key(id="busy"), 1)
    limits.release(limits.acquire_now(make_key(id="idle-b", rpm=60), 1), tokens=1)
    clock.t += 0.5
    assert limits.prune() == 0
    clock.t += 1.0
    assert limits.prune() == 2
    assert limits.in_flight("busy") == 1


async def test_key_view_reports_live_state() -> None:
    """The control API view has limit, remaining, reset and in-flight numbers."""
    limits = LocalLimits(FakeClock())
    key = make_key(rpm=60, tpm=6000, max_concurrency=3)
    await limits.acquire(key, 600)
    view = await limits.key_view(key)
    assert view["requests"] == {"limit": 60, "capacity": 60, "remaining": 59, "reset_seconds": 1.0}
    assert view["tokens"]["remaining"] == 5400
    assert view["tokens"]["reset_seconds"] == 6.0
    assert view["in_flight"] == 1
    assert view["max_concurrency"] == 3
