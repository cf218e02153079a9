"""The workers' shared table: the local limits' and ledger's rules exactly, across processes.

The table is memory every worker maps; these tests run it against the in-process
implementations it replaces (same operations, same answers), from forked processes at once
(never more than the limit), and through a process killed holding the lock and its slots.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.admission.balances import LocalLedger, Reservation
from proxyd.admission.limits import LimitGrant, LocalLimits
from proxyd.errors import InsufficientQuota, ProxydError, RateLimited
from proxyd.state.store import KeyRecord, VersionConflict
from proxyd.supervisor.shared import TableAdmission, TableWorkerLedger, shared_parts
from proxyd.supervisor.table import MAX_RATE, SharedTable, TableLedger, TableLimits, run_sync


def key(
    kid: str = "k1",
    *,
    rpm: int | None = 6,
    tpm: int | None = 1000,
    burst_r: int | None = None,
    burst_t: int | None = None,
    cap: int | None = 2,
    spend: tuple[tuple[str, int], ...] = (),
    account: str = "a1",
) -> KeyRecord:
    return KeyRecord(
        kid, "h", account, True, None, None, rpm, tpm, burst_r, burst_t, cap, (), False, spend
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table() -> Any:
    t = SharedTable(keys=64, accounts=64, columns=5)
    yield t
    t.close()


def _outcome(call: Any, *args: Any) -> Any:
    try:
        result = call(*args)
    except ProxydError as exc:
        return ("refused", type(exc).__name__, exc.message, exc.headers, exc.retry_after)
    return ("ok", result)


# One step of a random sequence: advance the clock, acquire, release, reserve, settle, re-limit.
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.integers(0, 30_000_000)),  # microseconds
        st.tuples(st.just("acquire"), st.integers(0, 1500) | st.integers(0, 30)),
        st.tuples(st.just("release"), st.integers(0, 40), st.none() | st.integers(0, 1500)),
        st.tuples(st.just("reserve"), st.integers(0, 400)),
        st.tuples(st.just("settle"), st.integers(0, 40), st.integers(0, 600)),
        st.tuples(st.just("relimit"), st.sampled_from([(6, 1000), (3, 1000), (6, 50), (None, 9)])),
        st.tuples(st.just("credit"), st.integers(0, 300)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(steps=STEPS)
def test_the_table_answers_as_the_local_limits_and_ledger_do(steps: list[Any]) -> None:
    """Any sequence of operations gets the same grants, refusals (message, headers, Retry-After),
    views and balances from the table as from LocalLimits and LocalLedger."""
    clock = Clock()
    table = SharedTable(keys=8, accounts=8, columns=3)
    try:
        table.clock = clock
        local_limits, local_ledger = LocalLimits(clock=clock), LocalLedger()
        shared_limits = TableLimits(table, 0, LocalLimits(clock=clock))
        shared_ledger = TableLedger(table, 0, LocalLedger())
        run_sync(local_ledger.set_balance("a1", 1, 1000))
        run_sync(shared_ledger.set_balance("a1", 1, 1000))
        k = key()
        grants: list[tuple[LimitGrant, LimitGrant]] = []
        reservations: list[tuple[Reservation, Reservation]] = []
        credits = 0
        for step in steps:
            op = step[0]
            if op == "wait":
                clock.now += step[1] / 1_000_000
            elif op == "acquire":
                a = _outcome(local_limits.acquire_now, k, step[1])
                b = _outcome(shared_limits.acquire_now, k, step[1])
                assert (a[0], a[1:] if a[0] == "refused" else a[1].headers) == (
                    b[0],
                    b[1:] if b[0] == "refused" else b[1].headers,
                )
                if a[0] == "ok":
                    grants.append((a[1], b[1]))
            elif op == "release" and grants:
                ga, gb = grants.pop(step[1] % len(grants))
                local_limits.release(ga, tokens=step[2])
                shared_limits.release(gb, tokens=step[2])
            elif op == "reserve":
                a = _outcome(local_ledger.reserve_now, "a1", step[1])
                b = _outcome(shared_ledger.reserve_now, "a1", step[1])
                assert a[0] == b[0]
                assert a[0] == "ok" or a[1:] == b[1:]
                if a[0] == "ok":
                    reservations.append((a[1], b[1]))
            elif op == "settle" and reservations:
                ra, rb = reservations.pop(step[1] % len(reservations))
                assert local_ledger.settle(ra, step[2]) == shared_ledger.settle(rb, step[2])
            elif op == "relimit":
                rpm, tpm = step[1]
                k = replace(k, rpm=rpm, tpm=tpm)
            elif op == "credit":
                credits += 1
                cid = f"c{credits}"
                assert run_sync(local_ledger.credit("a1", cid, step[1])) is True
                assert run_sync(shared_ledger.credit("a1", cid, step[1])) is True
            view = local_limits.view_now(k) | {"shared": True}
            assert shared_limits.view_now(k) == view
            assert shared_ledger.view_now("a1") == local_ledger.view_now("a1")
    finally:
        table.close()


def test_a_refusal_takes_nothing_and_headers_count_down(table: SharedTable) -> None:
    """rpm = 3: three grants with remaining 2, 1, 0, then the 429 with its wait; a balance
    refusal in the joint admission leaves the bucket and the slot as they were."""
    clock = Clock()
    table.clock = clock
    limits = TableLimits(table, 0, LocalLimits())
    k = key(rpm=3, tpm=None, cap=None)
    remaining = [limits.acquire_now(k, 0).headers["x-ratelimit-remaining-requests"] for _ in "abc"]
    assert remaining == ["2", "1", "0"]
    with pytest.raises(RateLimited) as refused:
        limits.acquire_now(k, 0)
    assert refused.value.headers["retry-after-ms"] == "20000"
    assert refused.value.retry_after == 20.0
    clock.now += 20
    assert limits.acquire_now(k, 0).headers["x-ratelimit-remaining-requests"] == "0"


def test_a_concurrency_cap_counts_every_column(table: SharedTable) -> None:
    """max_concurrency = 2 held by two columns: the third is refused whoever asks."""
    k = key(rpm=None, tpm=None, cap=2)
    first, second = (TableLimits(table, col, LocalLimits()) for col in (0, 1))
    grant = first.acquire_now(k, 0)
    second.acquire_now(k, 0)
    for limits in (first, second):
        with pytest.raises(RateLimited) as refused:
            limits.acquire_now(k, 0)
        assert refused.value.error_type == "concurrency_limited"
    first.release(grant, tokens=0)
    second.acquire_now(k, 0)


def test_limits_above_64_bits_are_held_at_the_largest_the_table_keeps(table: SharedTable) -> None:
    """A tpm of 2**62 (the schema's maximum) does not overflow: the bucket holds MAX_RATE."""
    table.clock = Clock()
    limits = TableLimits(table, 0, LocalLimits())
    k = key(rpm=2**62, tpm=2**62, cap=None)
    grant = limits.acquire_now(k, 10**9)
    assert grant.headers["x-ratelimit-limit-tokens"] == str(2**62)
    view = limits.view_now(k)
    assert view["tokens"]["capacity"] == MAX_RATE
    assert view["tokens"]["remaining"] == MAX_RATE - 10**9


def test_balance_writes_versions_seeds_and_credits(table: SharedTable) -> None:
    """Sets refuse an older version; a seed applies only over an older one; a credit once."""
    ledger = TableLedger(table, 4, LocalLedger())
    assert run_sync(ledger.seed_balance("a1", 0, 500)) is True
    assert ledger.view_now("a1").version == 0
    assert run_sync(ledger.seed_balance("a1", 0, 900)) is False
    run_sync(ledger.set_balance("a1", 3, 700))
    with pytest.raises(VersionConflict):
        run_sync(ledger.set_balance("a1", 2, 1))
    assert run_sync(ledger.credit("a1", "c1", 50)) is True
    assert run_sync(ledger.credit("a1", "c1", 50)) is False
    assert ledger.view_now("a1").balance_nanos == 750
    assert run_sync(ledger.credit("a2", "c1", 5)) is True  # a credit opens an account
    assert ledger.view_now("a2").version == -1
    with pytest.raises(InsufficientQuota):
        ledger.reserve_now("nobody", 1)


def test_a_full_table_leaves_new_keys_and_accounts_to_the_fallback() -> None:
    """Two key slots: a third key is held by the fallback, exactly, and stays there."""
    table = SharedTable(keys=2, accounts=2, columns=3)
    try:
        fallback = LocalLimits()
        limits = TableLimits(table, 0, fallback)
        for kid in ("k1", "k2"):
            assert limits.acquire_now(key(kid, rpm=1, tpm=None), 0).slot >= 0
        third = limits.acquire_now(key("k3", rpm=1, tpm=None), 0)
        assert third.slot == -1
        assert fallback.in_flight("k3") == 1
        with pytest.raises(RateLimited):
            limits.acquire_now(key("k3", rpm=1, tpm=None), 0)
        limits.release(third, tokens=0)
        assert fallback.in_flight("k3") == 0
        ledger = TableLedger(table, 0, LocalLedger())
        for account in ("a1", "a2", "a3"):
            run_sync(ledger.set_balance(account, 1, 100))
        assert ledger.try_view("a3") is None
        assert ledger.view_now("a3").balance_nanos == 100
        assert ledger.reserve_now("a3", 100).slot == -1
        with pytest.raises(InsufficientQuota):
            ledger.reserve_now("a3", 1)
    finally:
        table.close()


def _child(work: Any) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def test_four_processes_at_once_never_pass_more_than_the_limit(table: SharedTable) -> None:
    """Four forked processes hammer one key and one account: exactly the balance is reserved,
    and no more requests than the bucket held (plus what refilled meanwhile) pass."""
    ledger = TableLedger(table, 4, LocalLedger())
    run_sync(ledger.set_balance("a1", 1, 1000))
    k = key(rpm=60, tpm=None, burst_r=600, cap=None)  # 600 now, then one a second
    parts = [TableLimits(table, col, LocalLimits()) for col in range(4)]
    started = time.monotonic()
    r, w = os.pipe()
    go_r, go_w = os.pipe()  # the start line: every child forked before any hammers

    def hammer(col: int) -> None:
        os.read(go_r, 1)
        limits, own = parts[col], TableLedger(table, col, LocalLedger())
        grants = reserved = 0
        for _ in range(400):
            try:
                limits.acquire_now(k, 0)
                grants += 1
            except RateLimited:
                pass
            try:
                own.reserve_now("a1", 1)
                reserved += 1
            except InsufficientQuota:
                pass
        os.write(w, f"{grants} {reserved}\n".encode())

    pids = [_child(lambda c=col: hammer(c)) for col in range(4)]
    os.write(go_w, b"gggg")
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    os.close(w)
    os.close(go_r)
    os.close(go_w)
    with os.fdopen(r) as f:
        counts = [tuple(map(int, line.split())) for line in f]
    elapsed = time.monotonic() - started
    grants = sum(c[0] for c in counts)
    assert 600 <= grants <= 600 + int(elapsed) + 1
    assert sum(c[1] for c in counts) == 1000
    assert sum(c[0] > 0 for c in counts) >= 2, "processes took from the same bucket"
    view = TableLimits(table, 4, LocalLimits()).view_now(k)
    assert view["in_flight"] == grants
    assert ledger.view_now("a1").reserved_nanos == 1000


def test_a_process_killed_holding_the_lock_and_slots_loses_nothing(table: SharedTable) -> None:
    """A process SIGKILLed while it holds the lock, two slots and a reservation: the lock is
    free at once, and `forget` gives its slots and reservation back, leaving the others'."""
    ledger = TableLedger(table, 4, LocalLedger())
    run_sync(ledger.set_balance("a1", 1, 1000))
    k = key(rpm=None, tpm=None, cap=3)
    mine = TableLimits(table, 0, LocalLimits())
    mine.acquire_now(k, 0)  # column 0 holds one slot of three
    r, w = os.pipe()

    def hold() -> None:
        theirs = TableLimits(table, 1, LocalLimits())
        theirs.acquire_now(k, 0)
        theirs.acquire_now(k, 0)
        TableLedger(table, 1, LocalLedger()).reserve_now("a1", 400)
        table.lock()
        os.write(w, b"x")
        time.sleep(60)

    pid = _child(hold)
    assert os.read(r, 1) == b"x"
    taken = threading.Event()

    def probe() -> None:
        table.lock()
        taken.set()
        table.unlock()

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    assert not taken.wait(0.3), "the lock held by another process was taken"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert taken.wait(5), "the lock of a killed process was not released"
    assert mine.view_now(k)["in_flight"] == 3
    assert table.forget(1) == (2, 400)
    assert mine.view_now(k)["in_flight"] == 1
    assert ledger.view_now("a1").reserved_nanos == 0
    assert table.forget(1) == (0, 0)


class _Link:
    """A worker's channel that records what would reach the supervisor."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def notify(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.sent.append(message)
        return {"headers": {}, "id": message.get("id", 0), "res": 1, "grant": 1}


def test_a_worker_admits_and_finishes_on_its_own_and_asks_the_hub_only_what_it_must(
    table: SharedTable,
) -> None:
    """Direct: nothing sent, the shortfall returned; a spend-capped key, or an account the table
    lacks, goes to the hub in one message."""
    ledger = TableLedger(table, 4, LocalLedger())
    run_sync(ledger.set_balance("a1", 1, 100))
    link = _Link()
    parts = shared_parts(link, table, 0)  # type: ignore[arg-type]
    joint = parts.joint
    assert isinstance(joint, TableAdmission)
    assert isinstance(parts.ledger, TableWorkerLedger)

    async def go() -> None:
        admitted = await joint.admit(key(), 10, 80)
        assert admitted[0].headers["x-ratelimit-remaining-requests"] == "5"
        with pytest.raises(InsufficientQuota):
            await joint.admit(key(), 10, 80)  # 20 left: refused, and the bucket keeps its 5
        assert joint.finish(admitted, tokens=12, cost_nanos=130) == 30  # 100 charged, 30 short
        assert joint.finish(admitted, tokens=12, cost_nanos=130) == 0
        view = await parts.limits.key_view(key())
        assert view["requests"]["remaining"] == 5
        assert view["tokens"]["remaining"] == 988
        assert view["in_flight"] == 0
        assert (await parts.ledger.view("a1")).balance_nanos == 0
        assert link.sent == []
        await joint.admit(key(spend=(("daily", 10**9),)), 1, 0)
        await joint.admit(key(account="elsewhere"), 1, 0)
        assert [m["op"] for m in link.sent] == ["admit", "admit"]

    asyncio.run(go())


def test_without_a_column_the_worker_keeps_everything_in_the_hub(table: SharedTable) -> None:
    """A worker past the table's columns (or with none) uses the channel for all of it."""
    parts = shared_parts(_Link(), table, table.columns)  # type: ignore[arg-type]
    assert not isinstance(parts.joint, TableAdmission)
