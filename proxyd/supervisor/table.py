"""Per-key buckets and slots and per-account balances in memory every worker maps (no Redis).

The supervisor creates the table before it forks, so each worker admits a request and gives it
back on its own, under one inter-process lock, with no message to the supervisor: the limits and
balances stay exact across workers (never N times a limit) at about the CPU of one process's
local limits. The rules are those of `proxyd.admission.limits` and `proxyd.admission.balances`,
in the same integer units; `tests/test_table.py` runs both side by side on the same sequences.

Layout: an anonymous shared file (memfd) mapped `MAP_SHARED`, viewed as signed 64-bit integers.
Two open-addressed tables (keys, accounts) indexed by a 128-bit digest of the id; a slot, once
taken, belongs to its id for the life of the table. A table that is full, or an account the
supervisor has not yet written, is the supervisor hub's to answer (`None` from `key_slot` and
`account_slot`): slower, never wrong.

Each process has a column (`col`) of its own in every slot, holding the slots it occupies and
the amount it has reserved, so the supervisor can give back everything a worker that died held
(`forget`). The lock is `flock` on the shared file, through a description each process opens
for itself (after a fork too): the kernel releases it when its holder dies. A holder stopped
(SIGSTOP) while holding it stops every worker's admission; the critical sections are a few dozen
integer reads and writes, with no call that can block. So a process that finds the lock taken
tries again without sleeping (`SPIN_TRIES` non-blocking tries, a few microseconds, about one hold)
before it sleeps on it: a sleeper's wakeup costs tens of microseconds on a virtual machine and a
context switch each way, which with two workers had been most of their voluntary switches.

Never reads a body, never logs a secret; the ids are hashed.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from proxyd.admission.balances import (
    BalanceView,
    LocalLedger,
    Reservation,
    insufficient_quota,
    settle_charge,
)
from proxyd.admission.buckets import UNIT, duration_text, level_state, to_us
from proxyd.admission.limits import LimitGrant, LocalLimits, concurrency_limited, rate_limited
from proxyd.state.store import KeyRecord, VersionConflict

log = structlog.get_logger("proxyd.supervisor.table")

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
# The largest rate or capacity a bucket holds here (tokens per minute): capacity * UNIT must fit
# in 64 bits. A key's limit above it is held at it (1.5e11 tokens a minute is no limit at all).
MAX_RATE = INT64_MAX // UNIT

# Key slot fields (then one in-flight count per column)
K_H0, K_H1, K_RR, K_RC, K_RL, K_RS, K_TR, K_TC, K_TL, K_TS, K_IN = range(11)
K_FIELDS = 11
# Account slot fields (then one reserved amount per column); A_VER holds the version + 1, so a
# slot just taken (all zeros) reads as version -1, never set
A_H0, A_H1, A_BAL, A_RES, A_VER = range(5)
A_FIELDS = 5
HEADER = 8  # int64s before the key table: magic, sizes, columns
# Non-blocking tries on a taken lock before sleeping on it (each one system call, ~0.5 us): with
# two workers, 4-5 % of acquisitions found the lock taken, and 97-99 % of those had it within
# 20 tries (benchmarks/RESULTS.md (9)).
SPIN_TRIES = 32
_EX_NB = fcntl.LOCK_EX | fcntl.LOCK_NB
_TRIES = range(SPIN_TRIES + 1)  # the first try, then the spin


def digest(ident: str) -> tuple[int, int]:
    """Two nonzero-tagged signed 64-bit halves of the id's blake2b-128 (0, 0 marks a free slot)."""
    d = hashlib.blake2b(ident.encode(), digest_size=16).digest()
    return int.from_bytes(d[:8], "little", signed=True), int.from_bytes(d[8:], "little") >> 1 | 1


def _clamp(value: int) -> int:
    return INT64_MIN if value < INT64_MIN else INT64_MAX if value > INT64_MAX else value


# The three `x-ratelimit-*` header names of each bucket (made once, not per answer)
_NAMES = {
    kind: (
        f"x-ratelimit-limit-{kind}",
        f"x-ratelimit-remaining-{kind}",
        f"x-ratelimit-reset-{kind}",
    )
    for kind in ("requests", "tokens")
}


def _bucket_headers(
    headers: dict[str, str], kind: str, rate_text: str, level: int, cap: int, rate: int
) -> None:
    remaining, reset = level_state(level, cap * UNIT, rate)
    limit_name, remaining_name, reset_name = _NAMES[kind]
    headers[limit_name] = rate_text
    headers[remaining_name] = str(remaining)
    headers[reset_name] = duration_text(reset)


def _limits_of(key: KeyRecord) -> tuple[int, int, int, int]:
    """(rpm rate, rpm capacity, tpm rate, tpm capacity) as the table holds them (0: none)."""
    rr = min(key.rpm, MAX_RATE) if key.rpm else 0
    rc = min(key.burst_requests or key.rpm, MAX_RATE) if key.rpm else 0
    tr = min(key.tpm, MAX_RATE) if key.tpm else 0
    tc = min(key.burst_tokens or key.tpm, MAX_RATE) if key.tpm else 0
    return rr, rc, tr, tc


class SharedTable:
    """The shared keys and accounts, and their lock (each process's own, taken again after a
    fork). Columns 0 .. `hub_column - 1` are the workers'; `hub_column` is the supervisor's."""

    def __init__(self, *, keys: int, accounts: int, columns: int) -> None:
        if keys & (keys - 1) or accounts & (accounts - 1) or keys < 2 or accounts < 2:
            raise ValueError("table sizes must be powers of two")
        self.keys = keys
        self.accounts = accounts
        self.columns = columns
        self.hub_column = columns - 1
        self.key_width = K_FIELDS + columns
        self.account_width = A_FIELDS + columns
        self.account_base = HEADER + keys * self.key_width
        words = self.account_base + accounts * self.account_width
        self.fd = os.memfd_create("proxyd-table", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, words * 8)
        self._map = mmap.mmap(self.fd, words * 8, mmap.MAP_SHARED)
        self.m = memoryview(self._map).cast("q")
        self.m[0], self.m[1], self.m[2], self.m[3] = 0x70726F787964, keys, accounts, columns
        self._key_slots: dict[str, int] = {}  # this process's cache: key id -> slot offset
        self._account_slots: dict[str, int] = {}
        # slot offset -> the key object this process last synced the slot's limits with
        self._synced: dict[int, KeyRecord] = {}
        self.clock: Callable[[], float] = time.monotonic
        self._lock_fd = -1
        self._attach()
        ref = weakref.ref(self)

        def reattach() -> None:  # in a forked child
            table = ref()
            if table is not None and table._lock_fd >= 0:
                table._attach()

        os.register_at_fork(after_in_child=reattach)

    # -- the lock ------------------------------------------------------------------------------

    def _attach(self) -> None:
        """Open this process's own description of the shared file: `flock` excludes between
        descriptions, and one a process inherited is its parent's (run again in every child)."""
        old = getattr(self, "_lock_fd", -1)
        self._lock_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        if old >= 0:
            os.close(old)  # the parent's description: its lock stays the parent's

    def lock(self) -> None:
        """Take the table's lock: at once if free, else after up to `SPIN_TRIES` quick tries,
        else blocking until its holder lets it go (or dies)."""
        fd = self._lock_fd
        for _ in _TRIES:
            try:
                fcntl.flock(fd, _EX_NB)
            except BlockingIOError:
                continue
            return
        fcntl.flock(fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        """Release it."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- finding slots -------------------------------------------------------------------------

    def _find(self, ident: str, base: int, size: int, width: int, *, insert: bool) -> int | None:
        """The offset of `ident`'s slot, or None (absent and not inserted, or the table full).
        Caller holds the lock when `insert` is true."""
        h0, h1 = digest(ident)
        m = self.m
        index = h0 & (size - 1)
        for _ in range(size):
            at = base + index * width
            s0, s1 = m[at], m[at + 1]
            if s0 == h0 and s1 == h1:
                return at
            if s0 == 0 and s1 == 0:
                if not insert:
                    return None
                m[at], m[at + 1] = h0, h1
                return at
            index = (index + 1) & (size - 1)
        return None

    def key_slot(self, key_id: str) -> int | None:
        """The key's slot, taken now if it has none; None when the key table is full."""
        at = self._key_slots.get(key_id)
        if at is not None:
            return at
        self.lock()
        try:
            at = self._find(key_id, HEADER, self.keys, self.key_width, insert=True)
        finally:
            self.unlock()
        if at is not None:
            self._key_slots[key_id] = at
        return at

    def account_slot(self, account_id: str, *, insert: bool = False) -> int | None:
        """The account's slot; None when it has none (only the hub inserts, and only while the
        table has room: a new account reads balance 0, version -1). Caller holds the lock when
        `insert` is true."""
        at = self._account_slots.get(account_id)
        if at is not None:
            return at
        if insert:
            at = self._find(
                account_id, self.account_base, self.accounts, self.account_width, insert=True
            )
        else:
            self.lock()
            try:
                at = self._find(
                    account_id, self.account_base, self.accounts, self.account_width, insert=False
                )
            finally:
                self.unlock()
        if at is not None:
            self._account_slots[account_id] = at
        return at

    # -- limits (caller holds the lock) --------------------------------------------------------

    def _sync_limits(self, at: int, key: KeyRecord, now_us: int) -> None:
        """Follow a key whose limits changed: a changed bucket starts full (as a new one).
        Once per key object in a process: a worker still holding the key before a push does not
        set the limits back after another worker has applied it."""
        if self._synced.get(at) is key:
            return
        self._synced[at] = key
        m = self.m
        rr, rc, tr, tc = _limits_of(key)
        if m[at + K_RR] != rr or m[at + K_RC] != rc:
            m[at + K_RR], m[at + K_RC], m[at + K_RL], m[at + K_RS] = rr, rc, rc * UNIT, now_us
        if m[at + K_TR] != tr or m[at + K_TC] != tc:
            m[at + K_TR], m[at + K_TC], m[at + K_TL], m[at + K_TS] = tr, tc, tc * UNIT, now_us

    def _level(self, at: int, now_us: int) -> int:
        """A bucket's level refilled to `now_us` (written back), at its field offset `at`."""
        m = self.m
        level, stamp = m[at + 2], m[at + 3]
        elapsed = now_us - stamp
        if elapsed > 0:
            level += elapsed * m[at]
            cap = m[at + 1] * UNIT
            if level > cap:
                level = cap
            m[at + 2], m[at + 3] = level, now_us
        return level

    def _adjust(self, at: int, tokens: int, now_us: int) -> None:
        level = self._level(at, now_us) + tokens * UNIT
        cap = self.m[at + 1] * UNIT
        self.m[at + 2] = _clamp(level if level < cap else cap)

    def check_limits(self, at: int, key: KeyRecord, tokens: int, now_us: int) -> tuple[int, int]:
        """Refuse (raise the 429) unless one request, `tokens` and a slot are free; takes
        nothing. Returns the two bucket levels."""
        m = self.m
        self._sync_limits(at, key, now_us)
        wait_r = wait_t = 0
        level_r = level_t = 0
        rr, tr = m[at + K_RR], m[at + K_TR]
        if rr:
            level_r = self._level(at + K_RR, now_us)
            deficit = UNIT - level_r  # one request (a capacity is at least 1)
            if deficit > 0:
                wait_r = -(-deficit // rr)
        if tr:
            level_t = self._level(at + K_TR, now_us)
            tc = m[at + K_TC]
            deficit = (tokens if tokens < tc else tc) * UNIT - level_t
            if deficit > 0:
                wait_t = -(-deficit // tr)
        if wait_r or wait_t:
            raise rate_limited(wait_r, wait_t, self.headers(at, key, level_r, level_t))
        cap = key.max_concurrency
        if cap is not None and m[at + K_IN] >= cap:
            raise concurrency_limited(cap)
        return level_r, level_t

    def take_limits(
        self, at: int, tokens: int, col: int, level_r: int, level_t: int
    ) -> tuple[int, int]:
        """Take what `check_limits` found free (same lock hold); the levels after."""
        m = self.m
        if m[at + K_RR]:
            level_r -= UNIT
            m[at + K_RL] = level_r
        if m[at + K_TR]:
            level_t = _clamp(level_t - tokens * UNIT)
            m[at + K_TL] = level_t
        m[at + K_IN] += 1
        m[at + K_FIELDS + col] += 1
        return level_r, level_t

    def give_back(self, at: int, granted: int, tokens: int | None, col: int, now_us: int) -> None:
        """Free a slot; `tokens` None: the request never ran (its request and tokens return),
        else the tokens are corrected from `granted` to `tokens`."""
        m = self.m
        m[at + K_IN] -= 1
        m[at + K_FIELDS + col] -= 1
        if tokens is None:
            if m[at + K_RR]:
                self._adjust(at + K_RR, 1, now_us)
            if m[at + K_TR]:
                self._adjust(at + K_TR, granted, now_us)
        elif m[at + K_TR] and tokens != granted:
            self._adjust(at + K_TR, granted - tokens, now_us)

    def headers(self, at: int, key: KeyRecord, level_r: int, level_t: int) -> dict[str, str]:
        """The `x-ratelimit-*` headers for the levels a check or take left (as LocalLimits)."""
        m = self.m
        headers: dict[str, str] = {}
        rr, tr = m[at + K_RR], m[at + K_TR]
        if rr:
            _bucket_headers(headers, "requests", str(key.rpm), level_r, m[at + K_RC], rr)
        if tr:
            _bucket_headers(headers, "tokens", str(key.tpm), level_t, m[at + K_TC], tr)
        return headers

    def key_view(self, key: KeyRecord) -> dict[str, Any]:
        """The live limit state of a key, as the control API shows it."""
        now_us = to_us(self.clock())
        at = self.key_slot(key.id)
        if at is None:
            raise LookupError("key table full")
        m = self.m
        self.lock()
        try:
            self._sync_limits(at, key, now_us)
            views: list[dict[str, Any] | None] = []
            for f in (at + K_RR, at + K_TR):
                rate = m[f]
                if not rate:
                    views.append(None)
                    continue
                cap = m[f + 1]
                remaining, reset = level_state(self._level(f, now_us), cap * UNIT, rate)
                views.append(
                    {
                        "limit": rate,
                        "capacity": cap,
                        "remaining": remaining,
                        "reset_seconds": reset / 1_000_000,
                    }
                )
            in_flight = m[at + K_IN]
        finally:
            self.unlock()
        return {
            "requests": views[0],
            "tokens": views[1],
            "in_flight": in_flight,
            "max_concurrency": key.max_concurrency,
            "shared": True,
        }

    # -- balances (caller holds the lock) ------------------------------------------------------

    def check_balance(self, at: int, amount: int) -> None:
        """Refuse (raise the 429 insufficient_quota) unless `amount` fits what is available."""
        m = self.m
        available = m[at + A_BAL] - m[at + A_RES]
        if available <= 0 or amount > available:
            raise insufficient_quota()

    def reserve(self, at: int, amount: int, col: int) -> None:
        """Set `amount` aside (after `check_balance`, same lock hold)."""
        m = self.m
        m[at + A_RES] += amount
        m[at + A_FIELDS + col] += amount

    def settle(self, at: int, amount: int, cost: int, col: int) -> int:
        """Release a reservation and charge the cost (balances.settle_charge); the shortfall."""
        m = self.m
        reserved = m[at + A_RES] - amount
        m[at + A_RES] = reserved
        m[at + A_FIELDS + col] -= amount
        balance = m[at + A_BAL]
        charge = settle_charge(balance, reserved, cost)
        m[at + A_BAL] = balance - charge
        shortfall = cost - charge
        return shortfall if shortfall > 0 else 0

    def balance_of(self, at: int) -> tuple[int, int, int]:
        """(balance, reserved, version) of an account slot."""
        m = self.m
        return m[at + A_BAL], m[at + A_RES], m[at + A_VER] - 1

    def write_balance(self, at: int, balance: int, version: int) -> None:
        """Replace balance and version (the hub checks versions first)."""
        self.m[at + A_BAL], self.m[at + A_VER] = _clamp(balance), version + 1

    # -- a process that died -------------------------------------------------------------------

    def forget(self, col: int) -> tuple[int, int]:
        """Give back every slot and reservation column `col` holds; (slots, nanos) freed."""
        m = self.m
        slots = nanos = 0
        self.lock()
        try:
            for i in range(self.keys):
                at = HEADER + i * self.key_width
                held = m[at + K_FIELDS + col]
                if held:
                    m[at + K_IN] -= held
                    m[at + K_FIELDS + col] = 0
                    slots += held
            for i in range(self.accounts):
                at = self.account_base + i * self.account_width
                held = m[at + A_FIELDS + col]
                if held:
                    m[at + A_RES] -= held
                    m[at + A_FIELDS + col] = 0
                    nanos += held
        finally:
            self.unlock()
        return slots, nanos

    def close(self) -> None:
        """Unmap and close (tests; the processes otherwise keep it for their life)."""
        self.m.release()
        self._map.close()
        os.close(self._lock_fd)
        self._lock_fd = -1
        os.close(self.fd)


class TableLimits:
    """`LocalLimits`' face over the shared table, for the supervisor's hub (column `col`); a key
    the full table has no slot for is kept in `fallback`, in the hub only."""

    shared = True

    def __init__(self, table: SharedTable, col: int, fallback: LocalLimits) -> None:
        self.table = table
        self.col = col
        self.fallback = fallback

    def try_acquire(self, key: KeyRecord, tokens: int) -> LimitGrant | None:
        """Take one request, the tokens and a slot, or take nothing and raise the 429; None
        when the table has no slot for the key."""
        table = self.table
        at = table.key_slot(key.id)
        if at is None:
            return None
        now_us = to_us(table.clock())
        table.lock()
        try:
            level_r, level_t = table.check_limits(at, key, tokens, now_us)
            level_r, level_t = table.take_limits(at, tokens, self.col, level_r, level_t)
        finally:
            table.unlock()
        return LimitGrant(key.id, tokens, table.headers(at, key, level_r, level_t), slot=at)

    def acquire_now(self, key: KeyRecord, tokens: int) -> LimitGrant:
        """`try_acquire`, or the fallback's grant for a key the table has no slot for."""
        grant = self.try_acquire(key, tokens)
        return grant if grant is not None else self.fallback.acquire_now(key, tokens)

    def release(self, grant: LimitGrant, *, tokens: int | None) -> None:
        """End a grant once (see LocalLimits.release)."""
        if grant.slot < 0:
            self.fallback.release(grant, tokens=tokens)
            return
        if grant.released:
            return
        grant.released = True
        table = self.table
        now_us = to_us(table.clock())
        table.lock()
        try:
            table.give_back(grant.slot, grant.tokens, tokens, self.col, now_us)
        finally:
            table.unlock()

    def view_now(self, key: KeyRecord) -> dict[str, Any]:
        """The live limit state of a key across every worker."""
        try:
            return self.table.key_view(key)
        except LookupError:
            return self.fallback.view_now(key) | {"shared": True}


class TableLedger:
    """`LocalLedger`'s face over the shared table, for the supervisor's hub (column `col`): the
    hub writes balances (sets, seeds, credits: the credit ids stay here), workers reserve and
    settle on their own. An account the full table has no slot for is kept in `fallback`."""

    shared = True

    def __init__(self, table: SharedTable, col: int, fallback: LocalLedger) -> None:
        self.table = table
        self.col = col
        self.fallback = fallback
        self._credits: dict[str, set[str]] = {}

    def try_reserve(self, account_id: str, amount: int) -> Reservation | None:
        """Set `amount` aside, or raise the 429 `insufficient_quota` setting nothing aside; None
        when the table has no slot for the account."""
        if amount < 0:
            raise ValueError("a reservation cannot be negative")
        table = self.table
        at = table.account_slot(account_id)
        if at is None:
            return None
        table.lock()
        try:
            table.check_balance(at, amount)
            table.reserve(at, amount, self.col)
        finally:
            table.unlock()
        return Reservation(account_id, amount, slot=at)

    def reserve_now(self, account_id: str, amount: int) -> Reservation:
        """`try_reserve`, or the fallback's reservation for an account the table lacks."""
        reservation = self.try_reserve(account_id, amount)
        if reservation is None:
            return self.fallback.reserve_now(account_id, amount)
        return reservation

    def settle(self, reservation: Reservation, cost_nanos: int) -> int:
        """Release and charge the real cost; the shortfall (counted and logged)."""
        if reservation.slot < 0:
            return self.fallback.settle(reservation, cost_nanos)
        if reservation.settled:
            return 0
        reservation.settled = True
        table = self.table
        table.lock()
        try:
            shortfall = table.settle(reservation.slot, reservation.amount, cost_nanos, self.col)
        finally:
            table.unlock()
        return logged(reservation, shortfall)

    def _write(self, account_id: str, write: Callable[[int | None], Any]) -> Any:
        table = self.table
        table.lock()
        try:
            return write(table.account_slot(account_id, insert=True))
        finally:
            table.unlock()

    async def set_balance(self, account_id: str, version: int, balance_nanos: int) -> None:
        """Replace the balance; VersionConflict when `version` is below the one in force."""
        if balance_nanos < 0:
            raise ValueError("a balance cannot be negative")

        def write(at: int | None) -> None:
            if at is None:
                run_sync(self.fallback.set_balance(account_id, version, balance_nanos))
                return
            current = self.table.balance_of(at)[2]
            if version < current:
                raise VersionConflict("balance", version, current)
            self.table.write_balance(at, balance_nanos, version)

        self._write(account_id, write)

    async def seed_balance(self, account_id: str, version: int, balance_nanos: int) -> bool:
        """Set a start-up balance only over an older version or none; False if not applied."""

        def write(at: int | None) -> bool:
            if at is None:
                seeded = run_sync(self.fallback.seed_balance(account_id, version, balance_nanos))
                return bool(seeded)
            if version <= self.table.balance_of(at)[2]:
                return False
            self.table.write_balance(at, balance_nanos, version)
            return True

        return bool(self._write(account_id, write))

    async def credit(self, account_id: str, credit_id: str, amount_nanos: int) -> bool:
        """Add `amount_nanos` once per `credit_id` (the ids are kept in the hub)."""
        if amount_nanos < 0:
            raise ValueError("a credit cannot be negative")
        seen = self._credits.setdefault(account_id, set())
        if credit_id in seen:
            return False

        def write(at: int | None) -> bool:
            if at is None:
                return bool(run_sync(self.fallback.credit(account_id, credit_id, amount_nanos)))
            balance, _, version = self.table.balance_of(at)
            if balance + amount_nanos > INT64_MAX:
                log.warning("balance_saturated", account_id=account_id)
            self.table.write_balance(at, balance + amount_nanos, version)
            return True

        applied = bool(self._write(account_id, write))
        if applied:
            seen.add(credit_id)
        return applied

    def view_now(self, account_id: str) -> BalanceView:
        """Balance, reserved amount and version (version -1: never set)."""
        view = self.try_view(account_id)
        return view if view is not None else self.fallback.view_now(account_id)

    def try_view(self, account_id: str) -> BalanceView | None:
        """The account's ledger in the table, or None when the table has no slot for it."""
        table = self.table
        at = table.account_slot(account_id)
        if at is None:
            return None
        table.lock()
        try:
            return BalanceView(*table.balance_of(at))
        finally:
            table.unlock()


def logged(reservation: Reservation, shortfall: int) -> int:
    """`shortfall` (a cost the balance could not hold), logged when there is one."""
    if shortfall:
        log.warning(
            "balance_shortfall", account_id=reservation.account_id, shortfall_nanos=shortfall
        )
    return shortfall


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never awaits (the local ledger's async face) to its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("run_sync: the coroutine awaited")
