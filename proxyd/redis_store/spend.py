"""Spend windows shared by every instance through Redis; the local windows while it is away.

One script reserves under every cap of a key at once (`ADMIT`, with the key's limits and its
account's balance when admission asks), so two instances never both take the last room under a
cap. The local windows mirror each Redis answer, so a fallback starts from what Redis last said,
and a window Redis no longer holds (it restarted empty) is put back from that mirror, never read
as zero.
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
from proxyd.redis_store.scripts import admit_args
from proxyd.redis_store.store import FAILURES, RedisStore, RedisUnavailable
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
        self.carried: set[str] = set()  # keys whose windows of the old key layout were read

    async def carry_over(self, key: KeyRecord, now: int) -> None:
        """Once per key and process: adopt the spend the windows of the previous key layout
        (`spend:{<key id>}:<window>[:<period>]`, before the account hash tag) hold, so a rolling
        upgrade keeps every cap; a window Redis holds under the new layout is left as it is.

        One round trip on a key's first admission only. Drop once no instance older than the
        account-tagged layout can run.
        """
        self.carried.add(key.id)
        base = f"{self.store.prefix}spend:{{{key.id}}}:"
        names = []
        for window, _ in key.spend_limits:
            if window == "window_5h":
                names.append(base + window)
            else:
                names.append(f"{base}{window}:{calendar_period(window, now)[0]}")
        try:
            async with self.store.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hmget(name, ["s", "t"])
                rows = await pipe.execute()
        except FAILURES:  # not worth a fallback: the windows start from this process's view
            return
        for (window, _), (spent, start) in zip(key.spend_limits, rows, strict=True):
            if spent is None:
                continue
            if window == "window_5h":
                if start is None or now >= int(start) + FIVE_HOURS:
                    continue
                period, reset = str(int(start)), float(int(start) + FIVE_HOURS)
            else:
                period, reset = calendar_period(window, now)
            self.local.seed(key.id, window, period, reset, int(spent))

    def _key(self, account_id: str, key_id: str, window: str, period: str | None) -> str:
        base = f"{self.store.prefix}spend:{{{account_id}}}:{key_id}:{window}"
        return base if period is None else f"{base}:{period}"

    def plan(self, key: KeyRecord, now: int) -> tuple[list[str], list[Any], list[float]]:
        """Redis keys, ADMIT arguments (four per window) and (calendar) reset times of the key's
        windows; keys tagged with the key's account, like its limits and balance."""
        keys: list[str] = []
        args: list[Any] = []
        resets: list[float] = []
        for window, limit in key.spend_limits:
            if window == "window_5h":
                known = self.local.open_window(key.id, window, now)
                keys.append(self._key(key.account_id, key.id, window, None))
                args += [limit, "5h", int(known[0]) if known else 0, known[1] if known else 0]
                resets.append(0.0)
            else:
                period, reset = calendar_period(window, now)
                keys.append(self._key(key.account_id, key.id, window, period))
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
        if key.id not in self.carried:
            await self.carry_over(key, now)
        keys, windows, resets = self.plan(key, now)
        args = admit_args([0, 0, 0, 0], 0, 0, "", 0, None, "", amount, now, windows)
        try:  # no limits nor balance part: stand-ins of the same slot for their keys
            result = await self.store.call("admit", keys[:1] * 6 + keys, args)
        except RedisUnavailable:
            return self.local.reserve_now(key, amount)
        return self.reserved(key, amount, now, resets, result)

    def reserved(
        self, key: KeyRecord, amount: int, now: int, resets: list[float], result: list[Any]
    ) -> SpendReservation:
        """The reservation an ADMIT answer gives (the windows' part), or the 429 naming the
        window that is full (status 3); the local windows adopt what Redis said."""
        if int(result[0]) == 3:
            i = int(result[10]) - 1
            window, limit = key.spend_limits[i]
            reset = int(result[11]) + FIVE_HOURS if window == "window_5h" else resets[i]
            raise over_window(window, limit, reset, now)
        r = [int(x) for x in result[11:]]
        periods = []
        for i, (window, _) in enumerate(key.spend_limits):
            start, spent = r[2 * i], r[2 * i + 1]
            if window == "window_5h":
                period, reset = str(start), float(start + FIVE_HOURS)
            else:
                period, reset = calendar_period(window, now)
            self.local.seed(key.id, window, period, reset, spent)
            periods.append((window, period))
        return SpendReservation(
            key.id, amount, tuple(periods), remote=True, account_id=key.account_id
        )

    def settle(self, reservation: SpendReservation, cost_nanos: int) -> None:
        """Swap the reservation for the real cost in Redis (in the background)."""
        settled = self.settling(reservation, cost_nanos)
        if settled is not None:
            keys, starts = settled
            self.store.submit("spend_settle", keys, [reservation.amount, cost_nanos, *starts])

    def settling(
        self, reservation: SpendReservation, cost_nanos: int
    ) -> tuple[list[str], list[str]] | None:
        """Settle once: a local reservation at once; for a shared one, count the cost in the
        mirror and return the window keys and their 5-hour starts ('0': calendar) that Redis must
        still settle (SPEND_SETTLE), or None."""
        if reservation.settled:
            return None
        if not reservation.remote:
            self.local.settle(reservation, cost_nanos)
            return None
        reservation.settled = True
        cost = max(cost_nanos, 0)
        keys, starts = [], []
        for window, period in reservation.periods:
            five = window == "window_5h"
            keys.append(
                self._key(
                    reservation.account_id, reservation.key_id, window, None if five else period
                )
            )
            starts.append(period if five else "0")
            # the mirror, for a re-seed should Redis lose the window
            self.local.add_spent(reservation.key_id, window, period, cost)
        return keys, starts

    async def view(self, key: KeyRecord) -> dict[str, Any]:
        """Each capped window's limit, settled spend and reset time, as Redis holds them."""
        if not key.spend_limits or self.store.fallback_active:
            return self.local.view_now(key)
        now = int(self.clock())
        keys, _, resets = self.plan(key, now)
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
