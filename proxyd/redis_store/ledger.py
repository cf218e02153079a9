"""Account balances shared by every instance through Redis: reserve, settle, set, credit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from proxyd.admission.balances import BalanceView, LocalLedger, Reservation, insufficient_quota
from proxyd.redis_store.scripts import MISSING, admit_args
from proxyd.redis_store.store import FAILURES, RedisStore, RedisUnavailable
from proxyd.state.store import VersionConflict

log = structlog.get_logger("proxyd.redis")

# Where a forgotten balance comes from when this instance never saw the account: the control
# plane's snapshot, as (version, balance_nanos), or None when it does not know the account.
BalanceSource = Callable[[str], Awaitable[tuple[int, int] | None]]
Call = Callable[[], Awaitable[Any]]  # one script call, made when the background work runs


class RedisLedger:
    """Account balances shared by every instance; the local ledger while Redis is away.

    The local ledger mirrors what Redis last said about each account, so a fallback starts from
    the available balance this instance saw. Work done locally (charges, credits, sets) is
    replayed into Redis on recovery; Redis clamps replayed charges at zero and the shortfall is
    counted, so no interleaving drives a shared balance negative.

    A balance Redis no longer holds (it restarted empty) is never read as zero: it is put back
    from this instance's last confirmed view (the balance in the latest Redis answer, ordered by
    Redis's change counter; the charges that had not landed are replayed on top), or, for an
    account this instance never saw, from `snapshot_balance` (the control plane's snapshot URL)
    when one is wired in.
    """

    shared = True

    def __init__(
        self,
        store: RedisStore,
        local: LocalLedger | None = None,
        *,
        share: int = 1,
        allowance: int | None = None,
        snapshot_balance: BalanceSource | None = None,
    ) -> None:
        self.store = store
        self.local = local or LocalLedger()
        self.share = share  # the processes that split an account's balance while Redis is away
        self.allowance = allowance  # the most this process may spend per account meanwhile
        self.snapshot_balance = snapshot_balance
        self.reseeded = 0  # balances put back after Redis forgot them
        self._seq: dict[str, int] = {}  # account -> the latest Redis change counter adopted
        # account -> (version, balance) in the latest Redis answer adopted: the balance before
        # reservations, which a fresh Redis does not have; charges still to land are replayed
        self._confirmed: dict[str, tuple[int, int]] = {}

    def _keys(self, account_id: str) -> list[str]:
        base = f"{self.store.prefix}acct:{{{account_id}}}:"
        return [base + "b", base + "l", base + "e", base + "cr"]

    def keys(self, account_id: str) -> list[str]:
        """The balance hash, its lease amounts and lease expiries (KEYS 1-3 of ADMIT)."""
        return self._keys(account_id)[:3]

    async def reserve(self, account_id: str, amount: int) -> Reservation:
        """Set `amount` aside in Redis, or raise 429 `insufficient_quota` setting nothing aside."""
        if amount < 0:
            raise ValueError("a reservation cannot be negative")
        if self.store.fallback_active:
            return self.local.reserve_now(account_id, amount)
        keys = self.keys(account_id)
        lease = self.store.new_lease()
        args = admit_args([0, 0, 0, 0], 0, 0, "", self.store.lease_ms, amount, lease, 0, 0, [])
        keys = [*keys, keys[0], keys[0], keys[0]]  # no limits part: stand-ins of the same slot
        try:
            result = await self.store.call("admit", keys, args)
            if int(result[0]) == MISSING and await self.reseed(account_id):
                result = await self.store.call("admit", keys, args)
        except RedisUnavailable:
            return self.local.reserve_now(account_id, amount)
        except BaseException:  # cancelled mid-call: the reservation may exist; release it
            self.undo(account_id, lease)
            raise
        return self.reserved(account_id, amount, lease, result)

    def undo(self, account_id: str, lease: str) -> None:
        """Release a reservation a call the caller left may have made (in the background)."""
        self.store.submit("settle", self.keys(account_id), [lease, 0])

    def reserved(self, account_id: str, amount: int, lease: str, result: list[Any]) -> Reservation:
        """The reservation an ADMIT answer gives (the balance's part; statuses 1-3 are not the
        ledger's to answer), or the 429 `insufficient_quota` (status 4, or MISSING)."""
        status = int(result[0])
        if status == MISSING:  # known nowhere: no balance to spend
            raise insufficient_quota()
        balance, reserved, version, seq = (int(x) for x in result[6:10])
        self._mirror(account_id, balance, reserved, version, seq)
        if status != 0:
            raise insufficient_quota()
        self.store.leases[lease] = (self.keys(account_id)[2], False)
        return Reservation(account_id, amount, lease=lease, remote=True)

    def _mirror(self, account_id: str, balance: int, reserved: int, version: int, seq: int) -> None:
        """Adopt a Redis answer as the confirmed view, unless a later one was adopted already.

        Answers come back over several connections, not in the order Redis ran them; `seq`
        (the balance's change counter in Redis) keeps an older one from undoing a newer one.
        """
        if seq <= self._seq.get(account_id, -1):
            return
        self._seq[account_id] = seq
        self._confirmed[account_id] = (version, balance)
        self._fallback(account_id, balance - reserved, version)

    def _fallback(self, account_id: str, available: int, version: int) -> None:
        """Keep this process's fallback: its share of what Redis said, within the allowance."""
        if self.share > 1:
            available //= self.share
        if self.allowance is not None and available > self.allowance:
            available = self.allowance
        self.local.mirror(account_id, available, version)

    def _seed_view(self, account_id: str) -> tuple[int, int]:
        """(version, balance) Redis should hold again: the balance in its latest answer adopted
        (charges that had not landed yet are replayed on top; reservations of the Redis that
        forgot are gone with it), else the local ledger's (seeded at start, or pushed)."""
        confirmed = self._confirmed.get(account_id)
        if confirmed is not None:
            return confirmed
        view = self.local.view_now(account_id)
        return view.version, view.balance_nanos

    async def _seed(self, account_id: str) -> tuple[int, int] | None:
        """The balance to put back, or None when neither this instance nor the control plane's
        snapshot knows the account."""
        version, balance = self._seed_view(account_id)
        if version < 0:
            found = await self.snapshot_balance(account_id) if self.snapshot_balance else None
            if found is None:
                return None
            version, balance = found
        return version, max(0, balance)

    async def reseed(self, account_id: str) -> bool:
        """Put back a balance Redis forgot (RedisUnavailable if it is away); False if unknown."""
        seed = await self._seed(account_id)
        if seed is None:
            return False
        self._reseeded(
            account_id,
            await self.store.call("seed_missing", self._keys(account_id)[:1], list(seed)),
            seed,
        )
        return True

    def _reseeded(self, account_id: str, applied: Any, seed: tuple[int, int]) -> None:
        self._seq.pop(account_id, None)  # the new Redis counts changes from zero again
        if int(applied):
            self.reseeded += 1
            log.warning(
                "redis_balance_reseeded",
                account_id=account_id,
                version=seed[0],
            )

    def settle(self, reservation: Reservation, cost_nanos: int) -> int:
        """Release and charge in the background; the shortfall is counted when Redis answers."""
        lease = self.settling(reservation, cost_nanos)
        if lease is not None:
            keys, store = self.keys(reservation.account_id), self.store
            self.store.run(
                self.settle_op(
                    reservation.account_id,
                    cost_nanos,
                    lambda: store.evalsha("settle", keys, [lease, cost_nanos]),
                )
            )
        return 0

    def settling(self, reservation: Reservation, cost_nanos: int) -> str | None:
        """Settle once: the balance lease Redis must release ('' for a reservation made in a
        fallback, which is charged in Redis too, clamped there), or None if settled already."""
        if reservation.settled:
            return None
        if not reservation.remote:  # admitted during a fallback: charge Redis too, clamped there
            self.local.settle(reservation, cost_nanos, record=False)
            return ""
        reservation.settled = True
        lease = reservation.lease or ""
        self.store.leases.pop(lease, None)
        return lease

    def settle_op(self, account_id: str, cost_nanos: int, first: Call) -> Call:
        """The background work of a settlement whose first call is `first` (SETTLE, or FINISH
        with a request's limits and windows): a balance Redis forgot is put back and charged
        with SETTLE; the answer is mirrored and a shortfall counted."""
        keys = self.keys(account_id)
        store = self.store

        async def op() -> None:
            result = await first()
            if int(result[0]) == MISSING:  # Redis forgot the balance: put it back, then charge
                seed = await self._seed(account_id)
                if seed is None:
                    self.local.record_shortfall(account_id, cost_nanos)
                    return
                applied = await store.evalsha("seed_missing", keys[:1], list(seed))
                self._reseeded(account_id, applied, seed)
                result = await store.evalsha("settle", keys, ["", cost_nanos])
            charge, balance, reserved, version, seq = (int(x) for x in result)
            self._mirror(account_id, balance, reserved, version, seq)
            if cost_nanos > charge:
                self.local.record_shortfall(account_id, cost_nanos - charge)

        return op

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
        self._confirmed[account_id] = (current, balance)
        self._fallback(account_id, balance - reserved, current)
        return applied == 1

    async def credit(self, account_id: str, credit_id: str, amount_nanos: int) -> bool:
        """Add `amount_nanos` once per `credit_id` across all instances."""
        if amount_nanos < 0:
            raise ValueError("a credit cannot be negative")
        keys = [self._keys(account_id)[0], self._keys(account_id)[3]]
        try:
            result = await self.store.call("credit", keys, [credit_id, amount_nanos])
            if int(result[0]) == MISSING:  # unknown anywhere: the credit starts the balance
                await self.reseed(account_id) or await self.store.call(
                    "seed_missing", keys[:1], [self.local.view_now(account_id).version, 0]
                )
                result = await self.store.call("credit", keys, [credit_id, amount_nanos])
        except RedisUnavailable:
            fresh = await self.local.credit(account_id, credit_id, amount_nanos)
            self.store.submit("credit", keys, [credit_id, amount_nanos])
            return fresh
        applied, balance, reserved, version = (int(x) for x in result)
        self._confirmed[account_id] = (version, balance)
        self._fallback(account_id, balance - reserved, version)
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
        if balance is None:  # Redis forgot it (or never had it): put back what this side knows
            try:
                if await self.reseed(account_id):
                    raw = await self.store.client.hmget(
                        self._keys(account_id)[0], ["bal", "res", "ver"]
                    )
                    balance, reserved, version = raw
            except (RedisUnavailable, *FAILURES):
                return self.local.view_now(account_id)
        return BalanceView(
            int(balance or 0), int(reserved or 0), int(version) if version is not None else -1
        )
