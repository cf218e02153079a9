"""The supervisor's shared limits and ledger: what every worker asks when there is no Redis.

Runs on the supervisor's one thread, one message at a time, so a key's bucket and an account's
balance are exact across workers (never N times the limit). Uses the local implementations of
proxyd.admission as they are; never awaits, never reads a body.
"""

from __future__ import annotations

import itertools
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, cast

from proxyd.admission.balances import LocalLedger, Reservation
from proxyd.admission.limits import LimitGrant, LocalLimits
from proxyd.errors import ProxydError
from proxyd.state.store import KeyRecord, VersionConflict
from proxyd.supervisor.frames import Message

# What a worker sends of a key: only the fields the limits read.
KeyLimits = tuple[str, str, int | None, int | None, int | None, int | None, int | None]


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


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never awaits (the local ledger's async face) to its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("run_sync: the coroutine awaited")


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


class Hub:
    """Grants and reservations of every worker, held by id until released or settled."""

    def __init__(self) -> None:
        self.limits = LocalLimits()
        self.ledger = LocalLedger()
        self._keys: dict[str, KeyRecord] = {}  # LimitKeys, typed as what LocalLimits takes
        self._grants: dict[int, tuple[int, LimitGrant]] = {}  # id -> (owner pid, grant)
        self._reservations: dict[int, tuple[int, Reservation]] = {}
        self._ids = itertools.count(1)

    def _key(self, wire: list[Any]) -> KeyRecord:
        kid, account, rpm, tpm, burst_r, burst_t, cap = wire
        known = cast(LimitKey | None, self._keys.get(kid))
        if known is not None and (
            known.account_id,
            known.rpm,
            known.tpm,
            known.burst_requests,
            known.burst_tokens,
            known.max_concurrency,
        ) == (account, rpm, tpm, burst_r, burst_t, cap):
            return cast(KeyRecord, known)
        # LocalLimits reads only these fields of a key; the rest of a KeyRecord stays with the
        # workers (authentication and policy are theirs).
        record = cast(KeyRecord, LimitKey(kid, account, rpm, tpm, burst_r, burst_t, cap))
        self._keys[kid] = record
        return record

    def handle(self, pid: int, message: Message) -> Message | None:
        """Answer one worker request (None for a notification that needs no answer)."""
        op = message["op"]
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
            return self._request(pid, op, message)
        except ProxydError as exc:
            return refusal(exc)
        except VersionConflict as exc:
            return {"conflict": [exc.kind, exc.pushed, exc.current]}

    def _request(self, pid: int, op: str, m: Message) -> Message:
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
        grants = [g for g, (owner, _) in self._grants.items() if owner == pid]
        for gid in grants:
            _, grant = self._grants.pop(gid)
            self.limits.release(grant, tokens=grant.tokens)  # it ran: keep what it used
        held = [r for r, (owner, _) in self._reservations.items() if owner == pid]
        for rid in held:
            _, reservation = self._reservations.pop(rid)
            self.ledger.settle(reservation, 0)
        return len(grants), len(held)
