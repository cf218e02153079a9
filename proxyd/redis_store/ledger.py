"""Account balances shared by every instance through Redis: reserve, settle, set, credit."""

from __future__ import annotations

from typing import Any

from proxyd.admission.balances import BalanceView, LocalLedger, Reservation, insufficient_quota
from proxyd.redis_store.store import FAILURES, RedisStore, RedisUnavailable
from proxyd.state.store import VersionConflict


class RedisLedger:
    """Account balances shared by every instance; the local ledger while Redis is away.

    The local ledger mirrors what Redis last said about each account, so a fallback starts from
    the available balance this instance saw. Work done locally (charges, credits, sets) is
    replayed into Redis on recovery; Redis clamps replayed charges at zero and the shortfall is
    counted, so no interleaving drives a shared balance negative.
    """

    shared = True

    def __init__(
        self,
        store: RedisStore,
        local: LocalLedger | None = None,
        *,
        share: int = 1,
        allowance: int | None = None,
    ) -> None:
        self.store = store
        self.local = local or LocalLedger()
        self.share = share  # the processes that split an account's balance while Redis is away
        self.allowance = allowance  # the most this process may spend per account meanwhile

    def _mirror(self, account_id: str, available: int, version: int) -> None:
        """Keep this process's fallback: its share of what Redis said, within the allowance."""
        if self.share > 1:
            available //= self.share
        if self.allowance is not None and available > self.allowance:
            available = self.allowance
        self.local.mirror(account_id, available, version)

    def _keys(self, account_id: str) -> list[str]:
        base = f"{self.store.prefix}acct:{{{account_id}}}:"
        return [base + "b", base + "l", base + "e", base + "cr"]

    async def reserve(self, account_id: str, amount: int) -> Reservation:
        """Set `amount` aside in Redis, or raise 429 `insufficient_quota` setting nothing aside."""
        if amount < 0:
            raise ValueError("a reservation cannot be negative")
        if self.store.fallback_active:
            return self.local.reserve_now(account_id, amount)
        keys = self._keys(account_id)[:3]
        lease = self.store.new_lease()
        try:
            result = await self.store.call("reserve", keys, [amount, lease, self.store.lease_ms])
        except RedisUnavailable:
            return self.local.reserve_now(account_id, amount)
        except BaseException:  # cancelled mid-call: the reservation may exist; release it
            self.store.submit("settle", keys, [lease, 0])
            raise
        ok, balance, reserved, version = (int(x) for x in result)
        self._mirror(account_id, balance - reserved, version)
        if not ok:
            raise insufficient_quota()
        self.store.leases[lease] = (keys[2], False)
        return Reservation(account_id, amount, lease=lease, remote=True)

    def settle(self, reservation: Reservation, cost_nanos: int) -> int:
        """Release and charge in the background; the shortfall is counted when Redis answers."""
        if reservation.settled:
            return 0
        if not reservation.remote:  # admitted during a fallback: charge Redis too, clamped there
            self.local.settle(reservation, cost_nanos, record=False)
            lease = ""
        else:
            reservation.settled = True
            lease = reservation.lease or ""
            self.store.leases.pop(lease, None)
        account_id = reservation.account_id

        def done(charge: Any) -> None:
            shortfall = cost_nanos - int(charge)
            if shortfall > 0:
                self.local.record_shortfall(account_id, shortfall)

        self.store.submit("settle", self._keys(account_id)[:3], [lease, cost_nanos], done)
        return 0

    async def set_balance(self, account_id: str, version: int, balance_nanos: int) -> None:
        """Replace the balance everywhere; VersionConflict when `version` is below the current."""
        if not await self._set(account_id, version, balance_nanos, strict=False):
            raise VersionConflict("balance", version, self.local.view_now(account_id).version)

    async def seed_balance(self, account_id: str, version: int, balance_nanos: int) -> bool:
        """Set a start-up balance only if Redis holds an older version or none (False if not).

        Every instance seeds from its config at start; an equal version must not undo charges.
        """
        return await self._set(account_id, version, balance_nanos, strict=True)

    async def _set(
        self, account_id: str, version: int, balance_nanos: int, *, strict: bool
    ) -> bool:
        if balance_nanos < 0:
            raise ValueError("a balance cannot be negative")
        keys = self._keys(account_id)[:1]
        args = [version, balance_nanos, int(strict)]
        try:
            result = await self.store.call("set", keys, args)
        except RedisUnavailable:
            fresh = True
            if strict:
                fresh = await self.local.seed_balance(account_id, version, balance_nanos)
            else:
                await self.local.set_balance(account_id, version, balance_nanos)
            self.store.submit("set", keys, args)
            return fresh
        applied, current, balance, reserved = (int(x) for x in result)
        self._mirror(account_id, balance - reserved, current)
        return applied == 1

    async def credit(self, account_id: str, credit_id: str, amount_nanos: int) -> bool:
        """Add `amount_nanos` once per `credit_id` across all instances."""
        if amount_nanos < 0:
            raise ValueError("a credit cannot be negative")
        keys = [self._keys(account_id)[0], self._keys(account_id)[3]]
        try:
            result = await self.store.call("credit", keys, [credit_id, amount_nanos])
        except RedisUnavailable:
            fresh = await self.local.credit(account_id, credit_id, amount_nanos)
            self.store.submit("credit", keys, [credit_id, amount_nanos])
            return fresh
        applied, balance, reserved, version = (int(x) for x in result)
        self._mirror(account_id, balance - reserved, version)
        return applied == 1

    async def view(self, account_id: str) -> BalanceView:
        """The shared balance, reservations and version (the local mirror while Redis is away)."""
        if self.store.fallback_active:
            return self.local.view_now(account_id)
        try:
            raw = await self.store.client.hmget(self._keys(account_id)[0], ["bal", "res", "ver"])
        except FAILURES as exc:
            self.store.mark_down(exc)
            return self.local.view_now(account_id)
        balance, reserved, version = raw
        return BalanceView(
            int(balance or 0), int(reserved or 0), int(version) if version is not None else -1
        )
