"""Per-key limits in this process: requests and tokens per minute, and streams in flight.

Local implementation (the Redis one in redis_store shares the same interface). Never awaits:
`acquire` is a coroutine only so both implementations look alike to admission.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxyd.admission.buckets import TokenBucket, ceil_seconds, duration_text
from proxyd.errors import ErrorType, RateLimited
from proxyd.state.store import KeyRecord

_PRUNE_FLOOR = 1024


class _Entry:
    """The live limit state of one key."""

    __slots__ = ("in_flight", "key", "rpm", "tpm")

    def __init__(self, key: KeyRecord, now: float) -> None:
        self.key = key
        self.rpm = TokenBucket(key.rpm, key.burst_requests, now) if key.rpm else None
        self.tpm = TokenBucket(key.tpm, key.burst_tokens, now) if key.tpm else None
        self.in_flight = 0

    def refresh(self, key: KeyRecord, now: float) -> None:
        """Follow a pushed change of the key's limits; an unchanged bucket keeps its level."""
        old = self.key
        self.key = key
        if (key.rpm, key.burst_requests) != (old.rpm, old.burst_requests):
            self.rpm = TokenBucket(key.rpm, key.burst_requests, now) if key.rpm else None
        if (key.tpm, key.burst_tokens) != (old.tpm, old.burst_tokens):
            self.tpm = TokenBucket(key.tpm, key.burst_tokens, now) if key.tpm else None


@dataclass(slots=True)
class LimitGrant:
    """What `acquire` took for one request; handed back to `release` exactly once."""

    key_id: str
    tokens: int
    headers: dict[str, str]
    entry: _Entry | None = None  # local grants
    lease: str | None = None  # remote grants: the concurrency lease id
    remote: bool = False
    key: KeyRecord | None = None  # remote grants: the key's limits, to give tokens back
    released: bool = field(default=False)
    slot: int = -1  # grants from the workers' shared table: the key's slot in it


def limit_headers(rpm: TokenBucket | None, tpm: TokenBucket | None, now: float) -> dict[str, str]:
    """OpenAI-style `x-ratelimit-*` headers for the buckets a key has."""
    headers: dict[str, str] = {}
    if rpm is not None:
        remaining, reset = rpm.state(now)
        headers["x-ratelimit-limit-requests"] = rpm.rate_text
        headers["x-ratelimit-remaining-requests"] = str(remaining)
        headers["x-ratelimit-reset-requests"] = duration_text(reset)
    if tpm is not None:
        remaining, reset = tpm.state(now)
        headers["x-ratelimit-limit-tokens"] = tpm.rate_text
        headers["x-ratelimit-remaining-tokens"] = str(remaining)
        headers["x-ratelimit-reset-tokens"] = duration_text(reset)
    return headers


def rate_limited(
    wait_requests_us: int, wait_tokens_us: int, headers: dict[str, str]
) -> RateLimited:
    """The 429 for a bucket refusal; Retry-After is the exact wait rounded up to seconds."""
    wait = max(wait_requests_us, wait_tokens_us)
    seconds = ceil_seconds(wait)
    what = "requests" if wait_requests_us >= wait_tokens_us else "tokens"
    headers["retry-after-ms"] = str(-(-wait // 1000))
    return RateLimited(
        f"Rate limit reached for {what} per minute on this API key. "
        f"Please try again in {seconds} seconds.",
        retry_after=float(seconds),
        headers=headers,
    )


def concurrency_limited(limit: int) -> RateLimited:
    """The 429 for a key already running its maximum of concurrent requests."""
    return RateLimited(
        f"This API key already has {limit} requests in progress, its concurrency limit. "
        "Please wait for one to finish.",
        error_type=ErrorType.CONCURRENCY_LIMITED,
    )


class LocalLimits:
    """Token buckets and in-flight counts per key id, in this process only."""

    shared = False

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._prune_at = _PRUNE_FLOOR

    def _entry(self, key: KeyRecord, now: float) -> _Entry:
        entry = self._entries.get(key.id)
        if entry is None:
            if len(self._entries) >= self._prune_at:
                self.prune()
            entry = self._entries[key.id] = _Entry(key, now)
        elif entry.key is not key:
            entry.refresh(key, now)
        return entry

    def acquire_now(self, key: KeyRecord, tokens: int) -> LimitGrant:
        """Take one request, `tokens` tokens and a slot, or take nothing and raise a 429."""
        now = self._clock()
        entry = self._entry(key, now)
        rpm, tpm = entry.rpm, entry.tpm
        wait_r = rpm.wait_us(1, now) if rpm is not None else 0
        wait_t = tpm.wait_us(tokens, now) if tpm is not None else 0
        if wait_r or wait_t:
            raise rate_limited(wait_r, wait_t, limit_headers(rpm, tpm, now))
        cap = key.max_concurrency
        if cap is not None and entry.in_flight >= cap:
            raise concurrency_limited(cap)
        if rpm is not None:
            rpm.take_unchecked(1)
        if tpm is not None:
            tpm.take_unchecked(tokens)
        entry.in_flight += 1
        headers = limit_headers(rpm, tpm, now) if rpm is not None or tpm is not None else {}
        return LimitGrant(key.id, tokens, headers, entry)

    async def acquire(self, key: KeyRecord, tokens: int) -> LimitGrant:
        """`acquire_now`, for callers that treat local and shared limits alike."""
        return self.acquire_now(key, tokens)

    def release(self, grant: LimitGrant, *, tokens: int | None) -> None:
        """End a grant once: free its slot, and correct the tokens to the real count.

        `tokens=None` means the request never ran (refused later in admission): the request and
        every reserved token go back.
        """
        if grant.released:
            return
        grant.released = True
        entry = grant.entry
        if entry is None:
            return
        entry.in_flight -= 1
        now = self._clock()
        if tokens is None:
            if entry.rpm is not None:
                entry.rpm.adjust(1, now)
            if entry.tpm is not None:
                entry.tpm.adjust(grant.tokens, now)
        elif entry.tpm is not None and tokens != grant.tokens:
            entry.tpm.adjust(grant.tokens - tokens, now)

    def view_now(self, key: KeyRecord) -> dict[str, Any]:
        """The live limit state of a key, as the control API shows it."""
        now = self._clock()
        entry = self._entries.get(key.id)
        if entry is None:
            entry = _Entry(key, now)
        elif entry.key is not key:
            entry.refresh(key, now)
        return {
            "requests": _bucket_view(entry.rpm, now),
            "tokens": _bucket_view(entry.tpm, now),
            "in_flight": entry.in_flight,
            "max_concurrency": key.max_concurrency,
            "shared": False,
        }

    async def key_view(self, key: KeyRecord) -> dict[str, Any]:
        """`view_now` for the control API."""
        return self.view_now(key)

    def in_flight(self, key_id: str) -> int:
        """Requests of this key holding a slot now."""
        entry = self._entries.get(key_id)
        return entry.in_flight if entry is not None else 0

    def prune(self) -> int:
        """Forget keys whose state equals a fresh one (full buckets, nothing in flight)."""
        now = self._clock()
        idle = [
            k
            for k, e in self._entries.items()
            if e.in_flight == 0
            and (e.rpm is None or e.rpm.is_full(now))
            and (e.tpm is None or e.tpm.is_full(now))
        ]
        for k in idle:
            del self._entries[k]
        self._prune_at = max(_PRUNE_FLOOR, 2 * len(self._entries))
        return len(idle)


def _bucket_view(bucket: TokenBucket | None, now: float) -> dict[str, Any] | None:
    if bucket is None:
        return None
    return {
        "limit": bucket.rate,
        "capacity": bucket.capacity,
        "remaining": bucket.remaining(now),
        "reset_seconds": bucket.reset_us(now) / 1_000_000,
    }
