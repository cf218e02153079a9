"""Spend windows shared by every instance through Redis; the local windows while it is away.

One script reserves under every cap of a key at once (`SPEND_RESERVE`), so two instances never
both take the last room under a cap. The local windows mirror each Redis answer, so a fallback
starts from what Redis last said, and a window Redis no longer holds (it restarted empty) is put
back from that mirror, never read as zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from proxyd.admission.spend import (
    FIVE_HOURS,
    LocalSpend,
    SpendReservation,
    calendar_period,
    over_window,
    spend_view,
)
from proxyd.redis_store.store import RedisStore, RedisUnavailable
from proxyd.state.store import KeyRecord


class RedisSpend:
    """Spend caps in Redis, shared by all instances."""

    def __init__(
        self,
        store: RedisStore,
        local: LocalSpend | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.local = local or LocalSpend(clock=clock)
        self.clock = clock

    def _key(self, key_id: str, window: str, period: str | None) -> str:
        base = f"{self.store.prefix}spend:{{{key_id}}}:{window}"
        return base if period is None else f"{base}:{period}"

    def _plan(self, key: KeyRecord, now: int) -> tuple[list[str], list[Any], list[float]]:
        """Redis keys, script arguments and (calendar) reset times of the key's windows."""
        keys: list[str] = []
        args: list[Any] = []
        resets: list[float] = []
        for window, limit in key.spend_limits:
            if window == "window_5h":
                known = self.local.open_window(key.id, window, now)
                keys.append(self._key(key.id, window, None))
                args += [limit, "5h", int(known[0]) if known else 0, known[1] if known else 0]
                resets.append(0.0)
            else:
                period, reset = calendar_period(window, now)
                keys.append(self._key(key.id, window, period))
                args += [
                    limit,
                    "cal",
                    int(reset - now) + 86_400,
                    self.local.spent_in(key.id, window, period),
                ]
                resets.append(reset)
        return keys, args, resets

    async def reserve(self, key: KeyRecord, amount: int) -> SpendReservation | None:
        """Reserve under every cap in Redis, or raise 429 naming the window that is full."""
        if not key.spend_limits:
            return None
        if self.store.fallback_active:
            return self.local.reserve_now(key, amount)
        now = int(self.clock())
        keys, args, resets = self._plan(key, now)
        try:
            result = await self.store.call("spend_reserve", keys, [amount, now, *args])
        except RedisUnavailable:
            return self.local.reserve_now(key, amount)
        r = [int(x) for x in result]
        if r[0] != 0:
            i = r[0] - 1
            window, limit = key.spend_limits[i]
            reset = r[1] + FIVE_HOURS if window == "window_5h" else resets[i]
            raise over_window(window, limit, reset, now)
        periods = []
        for i, (window, _) in enumerate(key.spend_limits):
            start, spent = r[1 + 2 * i], r[2 + 2 * i]
            if window == "window_5h":
                period, reset = str(start), float(start + FIVE_HOURS)
            else:
                period, reset = calendar_period(window, now)
            self.local.seed(key.id, window, period, reset, spent)
            periods.append((window, period))
        return SpendReservation(key.id, amount, tuple(periods), remote=True)

    def settle(self, reservation: SpendReservation, cost_nanos: int) -> None:
        """Swap the reservation for the real cost in Redis (in the background)."""
        if reservation.settled:
            return
        if not reservation.remote:
            self.local.settle(reservation, cost_nanos)
            return
        reservation.settled = True
        cost = max(cost_nanos, 0)
        keys, args = [], []
        for window, period in reservation.periods:
            five = window == "window_5h"
            keys.append(self._key(reservation.key_id, window, None if five else period))
            args.append(period if five else "0")
            # the mirror, for a re-seed should Redis lose the window
            self.local.add_spent(reservation.key_id, window, period, cost)
        self.store.submit("spend_settle", keys, [reservation.amount, cost, *args])

    async def view(self, key: KeyRecord) -> dict[str, Any]:
        """Each capped window's limit, settled spend and reset time, as Redis holds them."""
        if not key.spend_limits or self.store.fallback_active:
            return self.local.view_now(key)
        now = int(self.clock())
        keys, _, resets = self._plan(key, now)
        try:
            r = [int(x) for x in await self.store.call("spend_view", keys, [])]
        except RedisUnavailable:
            return self.local.view_now(key)
        out: dict[str, Any] = {}
        for i, (window, limit) in enumerate(key.spend_limits):
            spent, start = r[2 * i], r[2 * i + 1]
            if window == "window_5h":
                live = spent >= 0 and now < start + FIVE_HOURS
                out[window] = spend_view(
                    limit, spent if live else 0, start + FIVE_HOURS if live else None
                )
            else:
                out[window] = spend_view(limit, max(spent, 0), resets[i])
        return out
