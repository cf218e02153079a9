"""A token bucket in exact integer arithmetic: a per-minute rate, a capacity, continuous refill.

Pure module: the caller passes the clock reading (`now`, float seconds). Never sleeps, never logs.
"""

from __future__ import annotations

US_PER_MINUTE = 60_000_000
# One token is US_PER_MINUTE units; a bucket refilling `rate` tokens per minute gains exactly
# `rate` units per microsecond, so levels, refills and waits are integers with no rounding drift.
UNIT = US_PER_MINUTE


def to_us(now: float) -> int:
    """A clock reading in whole microseconds (rounded, so `now + k` stays exact for whole k)."""
    return round(now * 1_000_000)


def ceil_seconds(us: int) -> int:
    """Microseconds rounded up to whole seconds: a Retry-After never early, < 1 s late."""
    return -(-us // 1_000_000)


class TokenBucket:
    """`rate` tokens per minute, holding at most `capacity` (one minute's worth unless a burst).

    A request of `amount` passes when the bucket holds it. An amount above the capacity could
    never pass, so it passes once the bucket is full and drives the level below zero: the debt
    delays the next requests exactly as if the bucket had been bigger (the per-minute rate holds).
    Corrections after the fact (`adjust`) may also leave a debt; refill pays it off.
    """

    __slots__ = ("_cap", "_level", "_stamp", "capacity", "rate", "rate_text")

    def __init__(self, rate: int, capacity: int | None, now: float) -> None:
        if rate < 1:
            raise ValueError("rate must be at least 1 per minute")
        self.rate = rate
        self.rate_text = str(rate)  # for the x-ratelimit-limit-* header of every answer
        self.capacity = capacity if capacity is not None else rate
        if self.capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._cap = self.capacity * UNIT
        self._level = self._cap
        self._stamp = to_us(now)

    def _refill(self, now_us: int) -> int:
        elapsed = now_us - self._stamp
        if elapsed > 0:  # a clock that steps back refills nothing and is otherwise ignored
            level = self._level + elapsed * self.rate
            self._level = level if level < self._cap else self._cap
            self._stamp = now_us
        return self._level

    def wait_us(self, amount: int, now: float) -> int:
        """Microseconds until `amount` would pass (0: it passes now). Takes nothing."""
        need = (amount if amount < self.capacity else self.capacity) * UNIT
        deficit = need - self._refill(to_us(now))
        if deficit <= 0:
            return 0
        return -(-deficit // self.rate)

    def take(self, amount: int, now: float) -> int:
        """Take `amount` and return 0, or take nothing and return the microseconds to wait."""
        wait = self.wait_us(amount, now)
        if wait == 0:
            self._level -= amount * UNIT
        return wait

    def take_unchecked(self, amount: int) -> None:
        """Take `amount` right after `wait_us` said it passes (same `now`)."""
        self._level -= amount * UNIT

    def adjust(self, tokens: int, now: float) -> None:
        """Give back `tokens` (positive) or charge more (negative); never above the capacity."""
        level = self._refill(to_us(now)) + tokens * UNIT
        self._level = level if level < self._cap else self._cap

    def remaining(self, now: float) -> int:
        """Whole tokens available now (0 while in debt)."""
        return self.state(now)[0]

    def reset_us(self, now: float) -> int:
        """Microseconds until the bucket is full again."""
        return self.state(now)[1]

    def state(self, now: float) -> tuple[int, int]:
        """`remaining(now)` and `reset_us(now)` with one refill (for the answer's headers)."""
        return level_state(self._refill(to_us(now)), self._cap, self.rate)

    def is_full(self, now: float) -> bool:
        """Whether the bucket is indistinguishable from a new one."""
        return self._refill(to_us(now)) >= self._cap


def level_state(level: int, cap_units: int, rate: int) -> tuple[int, int]:
    """(whole tokens available, microseconds until full) of a bucket at `level` units, holding
    at most `cap_units`, refilling `rate` units a microsecond (shared with the workers' table)."""
    deficit = cap_units - level
    return (level // UNIT if level > 0 else 0, -(-deficit // rate) if deficit > 0 else 0)


def duration_text(us: int) -> str:
    """OpenAI's reset format: `0s`, `250ms`, `1.5s`, `6m0s`, `1h2m3s`."""
    if us <= 0:
        return "0s"
    if us < 1_000_000:
        return f"{-(-us // 1000)}ms"
    ms = -(-us // 1000)
    seconds, millis = divmod(ms, 1000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    tail = f"{seconds}.{millis:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{tail}"
    if minutes:
        return f"{minutes}m{tail}"
    return tail
