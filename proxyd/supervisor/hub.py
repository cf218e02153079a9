"""The supervisor's shared limits, spend windows and ledger: what a worker asks without Redis.

Runs on the supervisor's one thread, one message at a time, so a key's spend windows are exact
across workers (never N times the cap). With the shared table (`proxyd.supervisor.table`) the
workers admit most requests on their own; the hub admits a key with spend caps (limits in the
table, windows here, balance in the table: all or nothing, one `admit` message, one `finish`)
and anything the full table has no slot for, and writes balances (pushes, seeds, credits). Uses
the local implementations of proxyd.admission, or their table faces; never awaits, never reads a
body.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from proxyd.admission.balances import LocalLedger, Reservation
from proxyd.admission.limits import LimitGrant, LocalLimits
from proxyd.admission.spend import LocalSpend, SpendReservation
from proxyd.errors import ProxydError
from proxyd.routing.sticky import StickyTable
from proxyd.state.store import KeyRecord, VersionConflict
from proxyd.supervisor.frames import Message
from proxyd.supervisor.table import SharedTable, TableLedger, TableLimits, run_sync

# What a worker sends of a key: only the fields the limits and spend windows read.
KeyLimits = tuple[
    str,
    str,
    int | None,
    int | None,
    int | None,
    int | None,
    int | None,
    tuple[tuple[str, int], ...],
]


def key_limits(key: KeyRecord) -> KeyLimits:
    """The part of a key the shared limits need, as the worker sends it."""
    return (
        key.id,
        key.account_id,
        key.rpm,
        key.tpm,
        key.burst_requests,
        key.burst_tokens,
        key.max_concurrency,
        key.spend_limits,
    )


def refusal(exc: ProxydError) -> Message:
    """A limit or balance refusal as a message (the worker raises it again)."""
    return {
        "refused": {
            "message": exc.message,
            "status": exc.status,
            "error_type": str(exc.error_type),
            "retry_after": exc.retry_after,
            "headers": exc.headers,
        }
    }


@dataclass(frozen=True, slots=True)
class LimitKey:
    """What the shared limits know of a key."""

    id: str
    account_id: str
    rpm: int | None
    tpm: int | None
    burst_requests: int | None
    burst_tokens: int | None
    max_concurrency: int | None
    spend_limits: tuple[tuple[str, int], ...]


# One admitted request: its grant, spend reservation (None: the key has no cap), reservation.
Held = tuple[LimitGrant, SpendReservation | None, Reservation]


class Hub:
    """Admitted requests, grants and reservations of every worker, held until given back."""

    def __init__(
        self,
        *,
        sticky_ttl: float | None = None,
        sticky_max: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        table: SharedTable | None = None,
        column: int = 0,
    ) -> None:
        # With a shared table (several workers), the workers admit on their own against it and
        # the hub only answers what they cannot: keys with spend caps, a key or an account the
        # full table has no slot for, balance writes.
        self.limits: LocalLimits | TableLimits = (
            LocalLimits() if table is None else TableLimits(table, column, LocalLimits())
        )
        # Sticky-session pins of every worker (None: sticky sessions off): a worker without a
        # pin of its own asks once; placements, moves and renewals arrive as notifications.
        self.pins = StickyTable(ttl=sticky_ttl, max_sessions=sticky_max) if sticky_ttl else None
        self._clock = clock
        self.ledger: LocalLedger | TableLedger = (
            LocalLedger() if table is None else TableLedger(table, column, LocalLedger())
        )
        self.spend = LocalSpend()
        # key id -> (the wire form last seen, the LimitKey made of it, typed as what the local
        # limits take): an unchanged key costs one list comparison a message
        self._keys: dict[str, tuple[list[Any], KeyRecord]] = {}
        self._held: dict[tuple[int, int], Held] = {}  # (owner pid, ticket) -> what it holds
        self._grants: dict[int, tuple[int, LimitGrant]] = {}  # id -> (owner pid, grant)
        self._reservations: dict[int, tuple[int, Reservation]] = {}
        self._spends: dict[int, tuple[int, SpendReservation]] = {}
        self._ids = itertools.count(1)

    def _place(
        self, key: str, channel_id: str, credential: int, *, first: bool
    ) -> list[Any] | None:
        """A worker placed (`first`) or moved a session: the pin held after. A first placement
        leaves a live pin another worker made in place (the session follows that one)."""
        pins = self.pins
        if pins is None:
            return None
        now = self._clock()
        held = pins.pin_of(key, now) if first else None
        if held is not None:
            return [held.channel_id, held.credential]
        pins.put(key, channel_id, credential, now + pins.ttl, now)
        return [channel_id, credential]

    def _key(self, wire: list[Any]) -> KeyRecord:
        known = self._keys.get(wire[0])
        if known is not None and known[0] == wire:
            return known[1]
        kid, account, rpm, tpm, burst_r, burst_t, cap, spend = wire
        windows = tuple((str(w), int(limit)) for w, limit in spend)
        # The local limits and spend windows read only these fields of a key; the rest of a
        # KeyRecord stays with the workers (authentication and policy are theirs).
        record = cast(KeyRecord, LimitKey(kid, account, rpm, tpm, burst_r, burst_t, cap, windows))
        self._keys[kid] = (wire, record)
        return record

    def admit(self, pid: int, m: Message) -> Message:
        """Limits, spend windows and balance of one request: all taken, or none and the first
        refusal raised (the order of proxyd.admission.admit)."""
        key = self._key(m["key"])
        amount = m["amount"]
        grant = self.limits.acquire_now(key, m["tokens"])
        spent = None
        try:
            if key.spend_limits:
                spent = self.spend.reserve_now(key, amount)
            reservation = self.ledger.reserve_now(key.account_id, amount)
        except ProxydError:
            self.limits.release(grant, tokens=None)
            if spent is not None:
                self.spend.settle(spent, 0)
            raise
        self._held[(pid, m["t"])] = (grant, spent, reservation)
        return {"headers": grant.headers, "id": m["id"]}

    def finish(self, pid: int, m: Message) -> None:
        """Give back what an admitted request holds: its slot, its tokens corrected to the real
        count (None: it never ran), its spend and balance reservations for the real cost."""
        held = self._held.pop((pid, m["t"]), None)
        if held is None:  # refused, or finished already
            return
        grant, spent, reservation = held
        cost = m["cost"]
        self.limits.release(grant, tokens=m["tokens"])
        if spent is not None:
            self.spend.settle(spent, cost)
        self.ledger.settle(reservation, cost)

    def handle(self, pid: int, message: Message) -> Message | None:
        """Answer one worker request, with its `id` (None for a notification)."""
        op = message["op"]
        if op == "finish":
            self.finish(pid, message)
            return None
        if op == "admit":
            try:
                return self.admit(pid, message)
            except ProxydError as exc:
                return {**refusal(exc), "id": message["id"]}
        if op == "pin_renew":
            if self.pins is not None:
                self.pins.renew(message["key"], self._clock())
            return None
        if op == "spend_settle":
            spending = self._spends.pop(message["spend"], None)
            if spending is not None:
                self.spend.settle(spending[1], message["cost"])
            return None
        if op == "release":
            found = self._grants.pop(message["grant"], None)
            if found is not None:
                self.limits.release(found[1], tokens=message["tokens"])
            return None
        if op == "settle":
            held = self._reservations.pop(message["res"], None)
            if held is not None:
                self.ledger.settle(held[1], message["cost"])
            return None
        try:
            reply = self._request(pid, op, message)
        except ProxydError as exc:
            reply = refusal(exc)
        except VersionConflict as exc:
            reply = {"conflict": [exc.kind, exc.pushed, exc.current]}
        reply["id"] = message["id"]
        return reply

    def _request(self, pid: int, op: str, m: Message) -> Message:
        if op == "pin_get":
            pin = None if self.pins is None else self.pins.pin_of(m["key"], self._clock())
            return {"pin": None if pin is None else [pin.channel_id, pin.credential]}
        if op == "pin_place":
            return {"pin": self._place(m["key"], m["ch"], m["cred"], first=m["first"])}
        if op == "acquire":
            grant = self.limits.acquire_now(self._key(m["key"]), m["tokens"])
            gid = next(self._ids)
            self._grants[gid] = (pid, grant)
            return {"grant": gid, "headers": grant.headers}
        if op == "reserve":
            reservation = self.ledger.reserve_now(m["account"], m["amount"])
            rid = next(self._ids)
            self._reservations[rid] = (pid, reservation)
            return {"res": rid}
        if op == "spend_reserve":
            spending = self.spend.reserve_now(self._key(m["key"]), m["amount"])
            if spending is None:
                return {"spend": None}
            sid = next(self._ids)
            self._spends[sid] = (pid, spending)
            return {"spend": sid}
        if op == "spend_view":
            return {"view": self.spend.view_now(self._key(m["key"]))}
        if op == "key_view":
            return {"view": self.limits.view_now(self._key(m["key"])) | {"shared": True}}
        if op == "set_balance":
            run_sync(self.ledger.set_balance(m["account"], m["version"], m["balance"]))
            return {}
        if op == "seed_balance":
            return {
                "applied": run_sync(
                    self.ledger.seed_balance(m["account"], m["version"], m["balance"])
                )
            }
        if op == "credit":
            return {"applied": run_sync(self.ledger.credit(m["account"], m["credit"], m["amount"]))}
        if op == "view_balance":
            view = self.ledger.view_now(m["account"])
            return {"view": [view.balance_nanos, view.reserved_nanos, view.version]}
        return {"error": f"unknown operation {op!r}"}

    def forget(self, pid: int) -> tuple[int, int]:
        """A worker died: free its slots and reservations; returns how many of each."""
        tickets = [t for t in self._held if t[0] == pid]
        for ticket in tickets:
            grant, spent, reservation = self._held.pop(ticket)
            self.limits.release(grant, tokens=grant.tokens)  # it ran: keep what it used
            if spent is not None:
                self.spend.settle(spent, 0)
            self.ledger.settle(reservation, 0)
        for sid in [s for s, (owner, _) in self._spends.items() if owner == pid]:
            self.spend.settle(self._spends.pop(sid)[1], 0)
        grants = [g for g, (owner, _) in self._grants.items() if owner == pid]
        for gid in grants:
            _, grant = self._grants.pop(gid)
            self.limits.release(grant, tokens=grant.tokens)  # it ran: keep what it used
        held = [r for r, (owner, _) in self._reservations.items() if owner == pid]
        for rid in held:
            _, reservation = self._reservations.pop(rid)
            self.ledger.settle(reservation, 0)
        return len(tickets) + len(grants), len(tickets) + len(held)
