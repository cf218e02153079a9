"""Spend caps per key: a 5-hour window, the UTC day, ISO week and month; reserve, then settle.

Same rule as the balance: a request is admitted only when its reservation fits under every cap
(spent + reserved + reservation <= limit), and settling swaps the reservation for the real cost.
The 5-hour window starts with the first request after the previous window ended; the calendar
windows are UTC periods. This module keeps them in memory (one process, or while Redis is away);
`proxyd.redis_store.spend` shares them through Redis. Never raises from `settle`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from proxyd.errors import InsufficientQuota
from proxyd.state.store import KeyRecord

FIVE_HOURS = 5 * 3600
WINDOW_NAMES = {
    "window_5h": "5-hour",
    "daily": "daily",
    "weekly": "weekly",
    "monthly": "monthly",
}


def calendar_period(window: str, now: float) -> tuple[str, float]:
    """(period id, reset time) of a calendar window (`daily`, `weekly`, `monthly`) at `now`."""
    t = datetime.fromtimestamp(now, UTC)
    day = datetime(t.year, t.month, t.day, tzinfo=UTC)
    if window == "daily":
        return f"{day:%Y%m%d}", (day + timedelta(days=1)).timestamp()
    if window == "weekly":
        monday = day - timedelta(days=day.weekday())
        year, week, _ = monday.isocalendar()
        return f"{year}W{week:02d}", (monday + timedelta(days=7)).timestamp()
    nxt = datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)
    return f"{t:%Y%m}", nxt.timestamp()


def over_window(window: str, limit: int, resets_at: float, now: float) -> InsufficientQuota:
    """The 429 for a request that does not fit under `window`'s cap; Retry-After to its reset."""
    name = WINDOW_NAMES.get(window, window)
    return InsufficientQuota(
        f"This API key has reached its {name} spend limit ({limit} nanos); "
        f"it resets at {datetime.fromtimestamp(resets_at, UTC):%Y-%m-%dT%H:%M:%SZ}.",
        retry_after=max(1.0, resets_at - now),
    )


@dataclass(slots=True)
class SpendReservation:
    """What one request set aside under each of its key's caps; settled exactly once."""

    key_id: str
    amount: int
    periods: tuple[tuple[str, str], ...]  # (window, period id) charged at settle
    remote: bool = False
    settled: bool = False
    account_id: str = ""  # shared reservations: the account whose hash tag the windows carry
    lease: str | None = None  # reservations a supervisor holds: its id there


@dataclass(slots=True)
class _Window:
    period: str
    resets_at: float
    spent: int = 0
    reserved: int = 0


class SpendWindows(Protocol):
    """Spend caps (LocalSpend, redis_store.RedisSpend)."""

    async def reserve(self, key: KeyRecord, amount: int) -> SpendReservation | None: ...
    def settle(self, reservation: SpendReservation, cost_nanos: int) -> None: ...
    async def view(self, key: KeyRecord) -> dict[str, Any]: ...


@dataclass
class LocalSpend:
    """Spend windows in this process's memory."""

    clock: Callable[[], float] = time.time
    _windows: dict[tuple[str, str], _Window] = field(default_factory=dict)

    def _current(self, key_id: str, window: str, now: float, *, opening: bool) -> _Window | None:
        w = self._windows.get((key_id, window))
        if window == "window_5h":
            if w is None or now >= w.resets_at:
                if not opening:
                    return None
                w = self._windows[(key_id, window)] = _Window(str(int(now)), now + FIVE_HOURS)
            return w
        period, resets_at = calendar_period(window, now)
        if w is None or w.period != period:
            if not opening:
                return None
            w = self._windows[(key_id, window)] = _Window(period, resets_at)
        return w

    def reserve_now(self, key: KeyRecord, amount: int) -> SpendReservation | None:
        """Set `amount` aside under every cap of `key`, or raise 429 setting nothing aside."""
        if not key.spend_limits:
            return None
        now = self.clock()
        opened = [
            (w, limit, self._current(key.id, w, now, opening=True)) for w, limit in key.spend_limits
        ]
        for window, limit, w in opened:
            assert w is not None
            if w.spent + w.reserved + amount > limit:
                raise over_window(window, limit, w.resets_at, now)
        periods = []
        for window, _, w in opened:
            assert w is not None
            w.reserved += amount
            periods.append((window, w.period))
        return SpendReservation(key.id, amount, tuple(periods))

    async def reserve(self, key: KeyRecord, amount: int) -> SpendReservation | None:
        """`reserve_now`, for callers that treat local and shared windows alike."""
        return self.reserve_now(key, amount)

    def settle(self, reservation: SpendReservation, cost_nanos: int) -> None:
        """Release the reservation and add the real cost to the windows it was made in."""
        if reservation.settled:
            return
        reservation.settled = True
        for window, period in reservation.periods:
            w = self._windows.get((reservation.key_id, window))
            if w is None or w.period != period:
                continue  # that period is over; a new one starts from zero
            w.reserved = max(0, w.reserved - reservation.amount)
            w.spent += max(cost_nanos, 0)

    def seed(self, key_id: str, window: str, period: str, resets_at: float, spent: int) -> None:
        """Adopt what the shared store last said about a window (the fallback starts there)."""
        w = self._windows.get((key_id, window))
        if w is None or w.period != period:
            self._windows[(key_id, window)] = _Window(period, resets_at, spent)
        else:
            w.spent = max(w.spent, spent)

    def open_window(self, key_id: str, window: str, now: float) -> tuple[str, int] | None:
        """(period, spent) of a window this process knows to be open at `now`, else None."""
        w = self._windows.get((key_id, window))
        if w is None or now >= w.resets_at:
            return None
        return w.period, w.spent

    def add_spent(self, key_id: str, window: str, period: str, cost: int) -> None:
        """Count a cost settled elsewhere (in Redis) in this process's view of the window."""
        w = self._windows.get((key_id, window))
        if w is not None and w.period == period:
            w.spent += cost

    def spent_in(self, key_id: str, window: str, period: str) -> int:
        """What this process knows was spent in a period (0 for another period)."""
        w = self._windows.get((key_id, window))
        return w.spent if w is not None and w.period == period else 0

    def view_now(self, key: KeyRecord) -> dict[str, Any]:
        """Each capped window as {"limit_nanos", "spent_nanos", "resets_at"} (RFC 3339, UTC)."""
        now = self.clock()
        out: dict[str, Any] = {}
        for window, limit in key.spend_limits:
            w = self._current(key.id, window, now, opening=False)
            out[window] = spend_view(limit, w.spent if w else 0, w.resets_at if w else None)
        return out

    async def view(self, key: KeyRecord) -> dict[str, Any]:
        """`view_now`, for callers that treat local and shared windows alike."""
        return self.view_now(key)


def spend_view(limit: int, spent: int, resets_at: float | None) -> dict[str, Any]:
    """One window as the control API shows it; `resets_at` null for a 5-hour window not open."""
    return {
        "limit_nanos": limit,
        "spent_nanos": spent,
        "resets_at": None
        if resets_at is None
        else datetime.fromtimestamp(resets_at, UTC).isoformat().replace("+00:00", "Z"),
    }
