"""The token bucket under a fake clock: capacity, refill, exact waits, no over-admission."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.admission.buckets import UNIT, TokenBucket, ceil_seconds, duration_text


def test_capacity_is_one_minute_of_the_rate() -> None:
    """Without a burst a new bucket holds exactly `rate` tokens and refuses the next one."""
    bucket = TokenBucket(60, None, 100.0)
    for _ in range(60):
        assert bucket.take(1, 100.0) == 0
    assert bucket.take(1, 100.0) == 1_000_000  # one token per second at 60 rpm


def test_burst_sets_capacity_not_rate() -> None:
    """A burst of 5 at 60 rpm holds 5 tokens and still refills one per second."""
    bucket = TokenBucket(60, 5, 0.0)
    assert [bucket.take(1, 0.0) for _ in range(6)] == [0, 0, 0, 0, 0, 1_000_000]
    assert bucket.take(1, 1.0) == 0
    assert bucket.take(1, 1.0) > 0


def test_refill_is_continuous() -> None:
    """Half the interval refills half a token: not enough for one, enough after the other half."""
    bucket = TokenBucket(60, 1, 0.0)
    assert bucket.take(1, 0.0) == 0
    assert bucket.wait_us(1, 0.5) == 500_000
    assert bucket.take(1, 1.0) == 0


def test_wait_is_exact_for_awkward_rates() -> None:
    """At 7 rpm a token takes 60/7 s: the wait is that, rounded up to the microsecond."""
    bucket = TokenBucket(7, 1, 0.0)
    bucket.take(1, 0.0)
    assert bucket.wait_us(1, 0.0) == 8_571_429
    assert ceil_seconds(bucket.wait_us(1, 0.0)) == 9
    assert bucket.wait_us(1, 8.571428) > 0
    assert bucket.wait_us(1, 8.571429) == 0


def test_oversized_amount_passes_when_full_and_leaves_debt() -> None:
    """An amount above capacity waits for a full bucket, then the debt delays what follows."""
    bucket = TokenBucket(60, None, 0.0)
    assert bucket.take(30, 0.0) == 0
    assert bucket.wait_us(100, 0.0) == 30_000_000  # until full again
    assert bucket.take(100, 30.0) == 0
    assert bucket.remaining(30.0) == 0
    assert bucket.wait_us(1, 30.0) == 41_000_000  # 40 tokens of debt, then one more


def test_adjust_gives_back_up_to_capacity_and_charges_below_zero() -> None:
    """Corrections return unused tokens (never above capacity) or add a debt."""
    bucket = TokenBucket(100, None, 0.0)
    bucket.take(50, 0.0)
    bucket.adjust(80, 0.0)
    assert bucket.remaining(0.0) == 100
    bucket.adjust(-150, 0.0)
    assert bucket.remaining(0.0) == 0
    assert bucket.wait_us(1, 0.0) == 51 * 600_000


def test_clock_stepping_back_refills_nothing() -> None:
    """A clock reading earlier than the last one neither refills nor breaks the level."""
    bucket = TokenBucket(60, 1, 10.0)
    bucket.take(1, 10.0)
    assert bucket.wait_us(1, 5.0) == 1_000_000
    assert bucket.take(1, 11.0) == 0


def test_reset_and_remaining() -> None:
    """`reset_us` is the time to full and `remaining` the whole tokens now."""
    bucket = TokenBucket(120, None, 0.0)
    bucket.take(30, 0.0)
    assert bucket.remaining(0.0) == 90
    assert bucket.reset_us(0.0) == 15_000_000
    assert bucket.is_full(15.0)


@pytest.mark.parametrize(
    ("us", "text"),
    [
        (0, "0s"),
        (1, "1ms"),
        (250_000, "250ms"),
        (1_000_000, "1s"),
        (1_500_000, "1.5s"),
        (1_000_001, "1.001s"),
        (60_000_000, "1m0s"),
        (360_000_000, "6m0s"),
        (3_723_000_000, "1h2m3s"),
    ],
)
def test_duration_text(us: int, text: str) -> None:
    """Reset durations are written the way OpenAI writes them, never rounded down."""
    assert duration_text(us) == text


@pytest.mark.parametrize("bad", [(0, None), (10, 0)])
def test_rejects_empty_buckets(bad: tuple[int, int | None]) -> None:
    """A rate or capacity below one is a configuration error, not a bucket that never passes."""
    with pytest.raises(ValueError, match="at least 1"):
        TokenBucket(bad[0], bad[1], 0.0)


rates = st.integers(min_value=1, max_value=100_000)
steps = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=3_000_000), st.integers(min_value=1, max_value=50)
    ),
    min_size=1,
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=st.none() | st.integers(min_value=1, max_value=500), plan=steps)
def test_no_window_admits_more_than_rate_plus_burst(
    rate: int, burst: int | None, plan: list[tuple[int, int]]
) -> None:
    """Over any interval [a, b] the admitted amount is at most capacity + rate * (b - a)."""
    bucket = TokenBucket(rate, burst, 0.0)
    cap = bucket.capacity
    now_us = 0
    admitted: list[tuple[int, int]] = []
    for dt, amount in plan:
        now_us += dt
        amount = min(amount, cap)
        if bucket.take(amount, now_us / 1e6) == 0:
            admitted.append((now_us, amount))
    for i in range(len(admitted)):
        total = 0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            span_us = admitted[j][0] - admitted[i][0]
            assert total * UNIT <= cap * UNIT + rate * span_us


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=st.none() | st.integers(min_value=1, max_value=500), plan=steps)
def test_retry_after_is_never_early_and_at_most_a_second_late(
    rate: int, burst: int | None, plan: list[tuple[int, int]]
) -> None:
    """At every refusal the request passes after Retry-After, and not one µs before the wait."""
    bucket = TokenBucket(rate, burst, 0.0)
    now_us = 0
    for dt, amount in plan:
        now_us += dt
        now = now_us / 1e6
        wait = bucket.wait_us(amount, now)
        if wait:
            retry_after = ceil_seconds(wait)
            assert 0 <= retry_after * 1_000_000 - wait < 1_000_000
            probe = copy.copy(bucket)
            assert probe.wait_us(amount, (now_us + retry_after * 1_000_000) / 1e6) == 0
            probe = copy.copy(bucket)
            assert probe.wait_us(amount, (now_us + wait - 1) / 1e6) > 0
            assert probe.wait_us(amount, (now_us + wait) / 1e6) == 0
        else:
            bucket.take(amount, now)
