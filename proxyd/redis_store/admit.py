"""One request's limits, spend windows and balance reservation in Redis: one script, one round trip.

Checks everything, then applies everything (`scripts.ADMIT`), so a refusal takes nothing. All the
keys of a call carry the account's hash tag: one Redis Cluster slot. Never waits for Redis while
it is away (the caller then admits locally, part by part).
"""

from __future__ import annotations

from typing import Any

from proxyd.admission.admit import Admitted
from proxyd.redis_store.ledger import RedisLedger
from proxyd.redis_store.limits import RedisLimits
from proxyd.redis_store.scripts import MISSING, admit_args
from proxyd.redis_store.spend import RedisSpend
from proxyd.redis_store.store import RIDE, RedisUnavailable
from proxyd.state.store import KeyRecord


class RedisAdmission:
    """The shared limits, spend windows and ledger of an instance, asked together."""

    def __init__(self, limits: RedisLimits, spend: RedisSpend, ledger: RedisLedger) -> None:
        self.limits = limits
        self.spend = spend
        self.ledger = ledger
        self.store = ledger.store

    async def admit(self, key: KeyRecord, tokens: int, amount: int) -> Admitted | None:
        """Take the request, tokens, a slot, room under every spend cap and `amount` of the
        balance, or raise the first refusal (the order of proxyd.admission.admit) taking nothing.

        None while Redis is away: the caller admits locally, part by part. More than one round
        trip only in rare cases: a balance Redis forgot is put back and the call made again, and
        a key's first admission in this process reads its windows of the old key layout once
        (RedisSpend.carry_over).
        """
        if amount < 0:
            raise ValueError("a reservation cannot be negative")
        store = self.store
        if store.fallback_active:
            return None
        limits, spend, ledger = self.limits, self.spend, self.ledger
        lease = limits.lease_for(key)
        balance_lease = store.new_lease()
        now = 0
        window_keys: list[str] = []
        windows: list[Any] = []
        resets: list[float] = []
        if key.spend_limits:
            now = int(spend.clock())
            if key.id not in spend.carried:
                await spend.carry_over(key, now)
            window_keys, windows, resets = spend.plan(key, now)
        keys = [*ledger.keys(key.account_id), *limits.keys(key), *window_keys]
        args = admit_args(
            limits.rates(key),
            tokens,
            key.max_concurrency or 0,
            lease,
            store.lease_ms,
            amount,
            balance_lease,
            amount,
            now,
            windows,
        )
        try:  # a pending read of this request (its sticky pin) rides along
            result = await store.call("admit", keys, args, read=RIDE.get())
            if int(result[0]) == MISSING and await ledger.reseed(key.account_id):
                result = await store.call("admit", keys, args)
        except RedisUnavailable:
            return None
        except BaseException:  # the caller left mid-call: give back whatever the call took
            store.submit("admit_undo", keys, args)
            raise
        status = int(result[0])
        if status == 4 or status == MISSING:
            ledger.reserved(key.account_id, amount, balance_lease, result)  # raises
        if status == 3:
            spend.reserved(key, amount, now, resets, result)  # raises
        grant = limits.granted(key, tokens, lease, result)  # raises for 1 and 2
        spent = spend.reserved(key, amount, now, resets, result) if key.spend_limits else None
        return grant, spent, ledger.reserved(key.account_id, amount, balance_lease, result)

    def finish(self, admitted: Admitted, *, tokens: int | None, cost_nanos: int) -> int:
        """Free the slot, correct the tokens, settle the spend windows and the balance: one
        script (FINISH) in the background, queued while Redis is away; a balance Redis forgot
        is put back and charged after it (see RedisLedger.settle_op)."""
        grant, spent, reservation = admitted
        store, ledger = self.store, self.ledger
        released = self.limits.give_back(grant, tokens=tokens)
        settled = self.spend.settling(spent, cost_nanos) if spent is not None else None
        lease = ledger.settling(reservation, cost_nanos)
        if lease is None:  # not the ledger's to settle again: send the rest on its own
            if released is not None:
                store.submit("release", *released)
            if settled is not None and spent is not None:
                store.submit("spend_settle", settled[0], [spent.amount, cost_nanos, *settled[1]])
            return 0
        account_id = reservation.account_id
        keys = ledger.keys(account_id)
        keys += released[0] if released is not None else keys[:1] * 3  # stand-ins: one slot
        args: list[Any] = released[1] if released is not None else [0, 0, 0, 0, 0, 0, ""]
        args += [lease, cost_nanos, spent.amount if spent is not None else 0]
        if settled is not None:
            keys += settled[0]
            args += settled[1]
        finish = store.evalsha
        store.run(ledger.settle_op(account_id, cost_nanos, lambda: finish("finish", keys, args)))
        return 0
