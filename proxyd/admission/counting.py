"""The per-key bucket of token-count calls, apart from the key's rpm and tpm.

Count calls (`/v1/messages/count_tokens`, `/v1/responses/input_tokens`) are never billed, so
they draw from a bucket of their own: generous enough for an agent's bursts (Claude Code sends a
dozen for one `/context`), small enough that counting cannot become a free upstream. Per process,
in memory; never awaits.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from proxyd.admission.buckets import TokenBucket, ceil_seconds
from proxyd.errors import ErrorType, RateLimited

MAX_KEYS = 100_000


class CountLimiter:
    """`per_minute` count calls per key id (a bucket of that many), least recently used dropped."""

    def __init__(
        self,
        per_minute: int,
        *,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key_id: str) -> None:
        """Take one call from the key's bucket, or raise a 429 with the exact Retry-After."""
        now = self._clock()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = TokenBucket(self.per_minute, None, now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key_id)
        wait = bucket.take(1, now)
        if wait:
            seconds = ceil_seconds(wait)
            raise RateLimited(
                f"Token counting is limited to {self.per_minute} calls per minute on this API "
                f"key. Please try again in {seconds} seconds.",
                error_type=ErrorType.RATE_LIMITED,
                retry_after=float(seconds),
            )
