"""Limits, spend windows and balances a worker shares with the others (no Redis, several workers).

With the shared table (`TableAdmission`), a worker takes a request's limits and balance there
on its own and gives them back there: no message. What the table does not hold goes to the
supervisor's hub in one round trip over the local channel (one `admit` message: limits, spend
windows and balance, all or nothing; one `finish` notification): a key with spend caps, a key or
an account the full table has no slot for, and every balance write. Implements admission's
`Joint`, `Limits`, `Ledger` and `SpendWindows` protocols.
"""

from __future__ import annotations

import itertools
from typing import Any

from proxyd.admission.admit import Admitted, SharedParts
from proxyd.admission.balances import BalanceView, LocalLedger, Reservation
from proxyd.admission.buckets import to_us
from proxyd.admission.limits import LimitGrant, LocalLimits
from proxyd.admission.spend import SpendReservation
from proxyd.errors import ErrorType, InsufficientQuota, ProxydError, RateLimited
from proxyd.state.store import KeyRecord, VersionConflict
from proxyd.supervisor.frames import Message
from proxyd.supervisor.hub import key_limits
from proxyd.supervisor.link import Link, SupervisorGone, reply_value
from proxyd.supervisor.table import SharedTable, TableLedger, TableLimits, logged


def _raise_refusal(reply: Message) -> None:
    refused = reply.get("refused")
    if refused is not None:
        cls: type[ProxydError] = (
            InsufficientQuota
            if refused["error_type"] == ErrorType.INSUFFICIENT_QUOTA
            else RateLimited
        )
        raise cls(
            refused["message"],
            status=refused["status"],
            error_type=ErrorType(refused["error_type"]),
            retry_after=refused["retry_after"],
            headers=refused["headers"],
        )
    conflict = reply.get("conflict")
    if conflict is not None:
        raise VersionConflict(*conflict)
    reply_value(reply)


class SupervisorAdmission:
    """A request's limits, spend windows and balance, taken and given back in the supervisor."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self._tickets = itertools.count(1)  # this worker's ids of its admitted requests

    async def admit(self, key: KeyRecord, tokens: int, amount: int) -> Admitted:
        """Take everything in one request, or raise the first refusal having taken nothing."""
        if amount < 0:
            raise ValueError("a reservation cannot be negative")
        ticket = next(self._tickets)
        wire = key_limits(key)
        message = {"op": "admit", "key": wire, "tokens": tokens, "amount": amount, "t": ticket}
        try:
            reply = await self.link.request(message)
        except BaseException:  # the caller left: give back whatever the admission took
            self.link.notify({"op": "finish", "t": ticket, "tokens": None, "cost": 0})
            raise
        _raise_refusal(reply)
        lease = str(ticket)
        grant = LimitGrant(key.id, tokens, reply["headers"], lease=lease, remote=True)
        spent = SpendReservation(key.id, amount, (), remote=True) if key.spend_limits else None
        return grant, spent, Reservation(key.account_id, amount, lease=lease, remote=True)

    def finish(self, admitted: Admitted, *, tokens: int | None, cost_nanos: int) -> int:
        """Give back all of it in one notification; a shortfall is counted in the supervisor."""
        grant = admitted[0]
        if grant.released:
            return 0
        grant.released = True
        ticket = int(grant.lease or 0)
        self.link.notify({"op": "finish", "t": ticket, "tokens": tokens, "cost": cost_nanos})
        return 0


class SupervisorSpend:
    """Spend windows held by the supervisor for every worker (a cap is never N times itself)."""

    def __init__(self, link: Link) -> None:
        self.link = link

    async def reserve(self, key: KeyRecord, amount: int) -> SpendReservation | None:
        """Set `amount` aside under every cap, or raise the 429 naming the full window."""
        if not key.spend_limits:
            return None
        msg = {"op": "spend_reserve", "key": key_limits(key), "amount": amount}
        reply = await self.link.request(msg)
        _raise_refusal(reply)
        if reply["spend"] is None:
            return None
        return SpendReservation(key.id, amount, (), remote=True, lease=str(reply["spend"]))

    def settle(self, reservation: SpendReservation, cost_nanos: int) -> None:
        """Swap the reservation for the real cost (a notification)."""
        if reservation.settled:
            return
        reservation.settled = True
        if reservation.lease is not None:
            msg = {"op": "spend_settle", "spend": int(reservation.lease), "cost": cost_nanos}
            self.link.notify(msg)

    async def view(self, key: KeyRecord) -> dict[str, Any]:
        """Each capped window as the supervisor holds it."""
        reply = await self.link.request({"op": "spend_view", "key": key_limits(key)})
        view: dict[str, Any] = reply_value(reply)["view"]
        return view


class SupervisorSessions:
    """Sticky-session pins kept by the supervisor for every worker (no Redis, several workers).

    A worker with no pin of its own for a session asks once (`get`, one round trip). A placement
    or a move is a request too (`place`), answered before the client sees the answer, so the
    next turn finds it whichever worker it reaches; of two first placements at once the first
    stays and both workers follow it. Renewals are notifications. So the turns of one
    conversation stay on one channel and credential whichever worker a connection reaches.
    """

    def __init__(self, link: Link) -> None:
        self.link = link

    def prefetch(self, scoped: str) -> None:
        """Nothing: the supervisor is asked in `get` (a socketpair round trip, no network)."""

    async def get(self, scoped: str) -> tuple[str, int] | None:
        """The supervisor's pin of a session, or None."""
        pin = reply_value(await self.link.request({"op": "pin_get", "key": scoped}))["pin"]
        return None if pin is None else (pin[0], int(pin[1]))

    async def place(
        self, scoped: str, channel_id: str, credential: int, first: bool
    ) -> tuple[str, int] | None:
        """Tell the supervisor where a session was placed (`first`: only if it holds no live
        pin) or moved; the pin it holds after, or None if it could not be asked."""
        message = {"op": "pin_place", "key": scoped, "ch": channel_id, "cred": credential}
        try:
            reply = await self.link.request({**message, "first": first})
        except SupervisorGone:
            return None
        pin = reply.get("pin")
        return None if pin is None else (pin[0], int(pin[1]))

    def renew(self, scoped: str) -> None:
        """Slide the supervisor's TTL of a session's pin."""
        self.link.notify({"op": "pin_renew", "key": scoped})

    async def drain(self) -> None:
        """Nothing to wait for: notifications are written with the loop's next turn."""


def shared_parts(link: Link, table: SharedTable | None = None, column: int = -1) -> SharedParts:
    """Everything a worker keeps in its supervisor: in the table the supervisor maps into every
    worker when there is one (and a column of it for this worker), else behind the channel."""
    limits, joint = SupervisorLimits(link), SupervisorAdmission(link)
    if table is None or not 0 <= column < table.hub_column:
        return SharedParts(limits, SupervisorLedger(link), SupervisorSpend(link), joint)
    return SharedParts(
        TableWorkerLimits(TableLimits(table, column, LocalLimits()), limits),
        TableWorkerLedger(TableLedger(table, column, LocalLedger()), link),
        SupervisorSpend(link),
        TableAdmission(table, column, joint),
    )


class SupervisorLimits:
    """Per-key buckets and concurrency slots held by the supervisor for every worker."""

    shared = True

    def __init__(self, link: Link) -> None:
        self.link = link

    async def acquire(self, key: KeyRecord, tokens: int) -> LimitGrant:
        """Take one request, the tokens and a slot, or raise the 429; never partial."""
        if not (key.rpm or key.tpm or key.max_concurrency):
            return LimitGrant(key.id, tokens, {})
        reply = await self.link.request({"op": "acquire", "key": key_limits(key), "tokens": tokens})
        _raise_refusal(reply)
        return LimitGrant(key.id, tokens, reply["headers"], lease=str(reply["grant"]), remote=True)

    def release(self, grant: LimitGrant, *, tokens: int | None) -> None:
        """End a grant once (a notification; the supervisor corrects the tokens)."""
        if grant.released:
            return
        grant.released = True
        if grant.lease is not None:
            self.link.notify({"op": "release", "grant": int(grant.lease), "tokens": tokens})

    async def key_view(self, key: KeyRecord) -> dict[str, Any]:
        """The live limit state of a key across every worker."""
        reply = await self.link.request({"op": "key_view", "key": key_limits(key)})
        view: dict[str, Any] = reply_value(reply)["view"]
        return view


class SupervisorLedger:
    """Account balances held by the supervisor for every worker; never below zero."""

    shared = True

    def __init__(self, link: Link) -> None:
        self.link = link

    async def reserve(self, account_id: str, amount: int) -> Reservation:
        """Set `amount` aside, or raise the 429 `insufficient_quota` setting nothing aside."""
        if amount < 0:
            raise ValueError("a reservation cannot be negative")
        reply = await self.link.request({"op": "reserve", "account": account_id, "amount": amount})
        _raise_refusal(reply)
        return Reservation(account_id, amount, lease=str(reply["res"]), remote=True)

    def settle(self, reservation: Reservation, cost_nanos: int) -> int:
        """Release and charge in the supervisor; a shortfall is counted and logged there."""
        if reservation.settled:
            return 0
        reservation.settled = True
        if reservation.lease is not None:
            self.link.notify({"op": "settle", "res": int(reservation.lease), "cost": cost_nanos})
        return 0

    async def set_balance(self, account_id: str, version: int, balance_nanos: int) -> None:
        """Replace the balance; VersionConflict when `version` is below the one in force."""
        if balance_nanos < 0:
            raise ValueError("a balance cannot be negative")
        msg = {"op": "set_balance", "account": account_id, "version": version}
        _raise_refusal(await self.link.request({**msg, "balance": balance_nanos}))

    async def seed_balance(self, account_id: str, version: int, balance_nanos: int) -> bool:
        """Set a start-up balance only over an older version or none; False if not applied."""
        msg = {"op": "seed_balance", "account": account_id, "version": version}
        reply = await self.link.request({**msg, "balance": balance_nanos})
        _raise_refusal(reply)
        return bool(reply["applied"])

    async def credit(self, account_id: str, credit_id: str, amount_nanos: int) -> bool:
        """Add `amount_nanos` once per `credit_id`."""
        if amount_nanos < 0:
            raise ValueError("a credit cannot be negative")
        msg = {"op": "credit", "account": account_id, "credit": credit_id}
        reply = await self.link.request({**msg, "amount": amount_nanos})
        _raise_refusal(reply)
        return bool(reply["applied"])

    async def view(self, account_id: str) -> BalanceView:
        """Balance, reserved amount and version as the supervisor holds them."""
        reply = reply_value(await self.link.request({"op": "view_balance", "account": account_id}))
        balance, reserved, version = reply["view"]
        return BalanceView(balance, reserved, version)


class TableAdmission:
    """A request's limits and balance taken in the shared table by this worker alone (one lock
    hold, no message); a key with spend caps, or a key or an account the table has no slot
    for, is admitted by the supervisor's hub (`hub`)."""

    def __init__(self, table: SharedTable, col: int, hub: SupervisorAdmission) -> None:
        self.table = table
        self.col = col
        self.hub = hub

    async def admit(self, key: KeyRecord, tokens: int, amount: int) -> Admitted:
        """Take everything, or raise the first refusal having taken nothing."""
        if amount < 0:
            raise ValueError("a reservation cannot be negative")
        table = self.table
        if not key.spend_limits:
            at = table.key_slot(key.id)
            account = table.account_slot(key.account_id)
            if at is not None and account is not None:
                now_us = to_us(table.clock())
                table.lock()
                try:  # the order of proxyd.admission.admit: requests, tokens, slot, balance
                    level_r, level_t = table.check_limits(at, key, tokens, now_us)
                    table.check_balance(account, amount)
                    level_r, level_t = table.take_limits(at, tokens, self.col, level_r, level_t)
                    table.reserve(account, amount, self.col)
                finally:
                    table.unlock()
                headers = table.headers(at, key, level_r, level_t)
                grant = LimitGrant(key.id, tokens, headers, slot=at)
                return grant, None, Reservation(key.account_id, amount, slot=account)
        return await self.hub.admit(key, tokens, amount)

    def finish(self, admitted: Admitted, *, tokens: int | None, cost_nanos: int) -> int:
        """Give back all of it; the shortfall (a cost the balance could not hold)."""
        grant, _, reservation = admitted
        if grant.slot < 0:
            return self.hub.finish(admitted, tokens=tokens, cost_nanos=cost_nanos)
        if grant.released:
            return 0
        grant.released = reservation.settled = True
        table = self.table
        now_us = to_us(table.clock())
        table.lock()
        try:
            table.give_back(grant.slot, grant.tokens, tokens, self.col, now_us)
            shortfall = table.settle(reservation.slot, reservation.amount, cost_nanos, self.col)
        finally:
            table.unlock()
        return logged(reservation, shortfall)


class TableWorkerLimits:
    """A worker's limits in the shared table; the hub's for a key the table has no slot for."""

    shared = True

    def __init__(self, table: TableLimits, hub: SupervisorLimits) -> None:
        self.table = table
        self.hub = hub

    async def acquire(self, key: KeyRecord, tokens: int) -> LimitGrant:
        """Take one request, the tokens and a slot, or raise the 429; never partial."""
        grant = self.table.try_acquire(key, tokens)
        return grant if grant is not None else await self.hub.acquire(key, tokens)

    def release(self, grant: LimitGrant, *, tokens: int | None) -> None:
        """End a grant once."""
        if grant.slot < 0:
            self.hub.release(grant, tokens=tokens)
        else:
            self.table.release(grant, tokens=tokens)

    async def key_view(self, key: KeyRecord) -> dict[str, Any]:
        """The live limit state of a key across every worker."""
        try:
            return self.table.table.key_view(key)
        except LookupError:
            return await self.hub.key_view(key)


class TableWorkerLedger(SupervisorLedger):
    """A worker's balances in the shared table: reserved, settled and read here; written (sets,
    seeds, credits) by the hub, which keeps the credit ids."""

    def __init__(self, table: TableLedger, link: Link) -> None:
        super().__init__(link)
        self.table = table

    async def reserve(self, account_id: str, amount: int) -> Reservation:
        """Set `amount` aside, or raise the 429 `insufficient_quota` setting nothing aside."""
        reservation = self.table.try_reserve(account_id, amount)
        return reservation if reservation is not None else await super().reserve(account_id, amount)

    def settle(self, reservation: Reservation, cost_nanos: int) -> int:
        """Release and charge the real cost; the shortfall."""
        if reservation.slot < 0:
            return super().settle(reservation, cost_nanos)
        return self.table.settle(reservation, cost_nanos)

    async def view(self, account_id: str) -> BalanceView:
        """Balance, reserved amount and version, from the table (else from the hub)."""
        view = self.table.try_view(account_id)
        return view if view is not None else await super().view(account_id)
