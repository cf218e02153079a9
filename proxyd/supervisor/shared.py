"""Limits and balances a worker keeps in the supervisor (no Redis, several workers).

Each admission is one round trip over the local channel to the supervisor's hub, which holds
every key's buckets and slots and every account's balance exactly once; releases and
settlements are notifications. Implements admission's `Limits` and `Ledger` protocols.
"""

from __future__ import annotations

from typing import Any

from proxyd.admission.balances import BalanceView, Reservation
from proxyd.admission.limits import LimitGrant
from proxyd.errors import ErrorType, InsufficientQuota, ProxydError, RateLimited
from proxyd.state.store import KeyRecord, VersionConflict
from proxyd.supervisor.frames import Message
from proxyd.supervisor.hub import key_limits
from proxyd.supervisor.link import Link, reply_value


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
