"""Shared limits, ledger and broadcast against the real Redis at 127.0.0.1:6379, with fallback."""

from __future__ import annotations

import asyncio
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import hiredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.crc import key_slot
from structlog.testing import capture_logs

from proxyd.admission.admit import Admission, AdmissionSettings, Ticket
from proxyd.admission.balances import BalanceView
from proxyd.admission.spend import calendar_period
from proxyd.errors import ErrorType, InsufficientQuota, ProxydError, RateLimited
from proxyd.redis_store import Broadcast, RedisLedger, RedisLimits, RedisStore
from proxyd.redis_store.admit import RedisAdmission
from proxyd.redis_store.spend import RedisSpend
from proxyd.redis_store.store import RIDE, Ride
from proxyd.state.store import KeyRecord, VersionConflict
from tests.test_limits import make_key

pytestmark = pytest.mark.redis

REDIS = "redis://127.0.0.1:6379/0"


def new_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:10]}:"


async def wipe(prefix: str) -> None:
    client: Redis = Redis.from_url(REDIS)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


Open = Callable[..., Awaitable[RedisStore]]


@pytest.fixture
async def open_store() -> AsyncIterator[Open]:
    """Start RedisStores sharing one unique prefix, as instances of one deployment would."""
    prefix = new_prefix()
    stores: list[RedisStore] = []

    async def open_(url: str = REDIS, **kw: float) -> RedisStore:
        store = RedisStore(url, prefix=prefix, **kw)  # type: ignore[arg-type]
        await store.start()
        stores.append(store)
        return store

    yield open_
    for store in stores:
        await store.close()
    await wipe(prefix)


class TcpProxy:
    """A loopback TCP forwarder to Redis that can be cut and restored, like a network fault;
    `stalled` stops passing bytes on (a Redis stuck in a long command, a network that drops
    packets without a reset); `cut_first` aborts the first connection at its first byte (a
    restart cutting a connection with a call on it)."""

    def __init__(self, *, cut_first: bool = False) -> None:
        self.port = 0
        self.connections = 0
        self.stalled = False
        self.cut_first = cut_first
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.cut_first and self.connections == 1:
            await reader.read(1)
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 6379)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if not self.stalled:
                        dst.write(data)
                        await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        self._writers.clear()
        await self._server.wait_closed()
        await asyncio.sleep(0.05)


def shared_admission(store: RedisStore) -> Admission:
    """Admission as the app wires it with Redis: limits, spend and balance in one call."""
    limits, ledger, spend = RedisLimits(store), RedisLedger(store), RedisSpend(store)
    return Admission(
        limits=limits,
        ledger=ledger,
        spend=spend,
        joint=RedisAdmission(limits, spend, ledger),
        settings=AdmissionSettings(),
    )


async def admit(admission: Admission, key: KeyRecord, cost: int, tokens: int = 10) -> Ticket:
    return await admission.admit(
        key, model="m", client_ip="", user_agent="", est_tokens=tokens, max_cost_nanos=cost
    )


async def count_commands(store: RedisStore) -> list[tuple[object, ...]]:
    """Record every round trip the store makes from now on, on redis-py's client and on its
    script channel, as the round trip's first command, with every script loaded first (a
    script's first run anywhere costs a SCRIPT LOAD)."""
    for script in store.scripts.values():
        await store.client.script_load(script.script)
    sent: list[tuple[object, ...]] = []
    send: Callable[..., Awaitable[object]] = store.client.execute_command

    async def counting(*args: object, **options: object) -> object:
        sent.append(args)
        return await send(*args, **options)

    store.client.execute_command = counting  # type: ignore[method-assign]
    channel = store.channel
    if channel is not None:
        request = channel.request

        async def on_the_wire(payload: bytes, count: int = 1) -> object:
            reader = hiredis.Reader()  # a command is a RESP array: read it back as one
            reader.feed(payload)
            first = cast(list[bytes], reader.gets())
            sent.append(tuple(part.decode() for part in first))
            return await request(payload, count)

        channel.request = on_the_wire  # type: ignore[method-assign]
    return sent


async def dump(prefix: str) -> dict[bytes, object]:
    """Every key under `prefix` with its value (hashes and sorted sets), to compare states."""
    client: Redis = Redis.from_url(REDIS)
    out: dict[bytes, object] = {}
    try:
        async for k in client.scan_iter(match=prefix + "*"):
            kind = await client.type(k)
            if kind == b"hash":
                out[k] = await client.hgetall(k)
            elif kind == b"zset":
                out[k] = await client.zrange(k, 0, -1)
            else:
                out[k] = kind
    finally:
        await client.aclose()
    return out


SPEND = (("window_5h", 10**6), ("daily", 10**6), ("weekly", 10**6), ("monthly", 10**6))


async def test_admission_is_one_round_trip_in_one_cluster_slot(open_store: Open) -> None:
    """Limits, four spend windows and the balance: one EVALSHA, its keys all in one slot."""
    store = await open_store()
    admission = shared_admission(store)
    await admission.ledger.set_balance("a1", 1, 10**9)
    key = make_key(rpm=100, tpm=10**6, max_concurrency=5, spend_limits=SPEND)
    (await admit(admission, key, 100)).finish(tokens=10, cost_nanos=60)  # loads the script
    await store.drain()
    sent = await count_commands(store)
    ticket = await admit(admission, key, 100)
    assert len(sent) == 1
    assert sent[0][0] == "EVALSHA"
    numkeys = int(str(sent[0][2]))
    keys = [str(k).encode() for k in sent[0][3 : 3 + numkeys]]
    assert numkeys == 3 + 3 + 4  # balance, limits, four windows
    assert len({key_slot(k) for k in keys}) == 1
    assert all(b"{a1}" in k for k in keys)
    assert ticket.headers["x-ratelimit-remaining-requests"] == "98"
    assert (await admission.limits.key_view(key))["in_flight"] == 1
    assert (await admission.ledger.view("a1")).reserved_nanos == 100
    del sent[:]
    ticket.finish(tokens=10, cost_nanos=40)
    await store.drain()
    assert len(sent) == 1  # its end: one more (in the background)
    assert sent[0][:2] == ("EVALSHA", store.scripts["finish"].sha)
    stored = await dump(store.prefix)
    assert {key_slot(k) for k in stored if b"{a1}" in k} == {key_slot(keys[0])}
    assert (await admission.ledger.view("a1")).balance_nanos == 10**9 - 100
    assert all(v["spent_nanos"] == 100 for v in (await admission.spend.view(key)).values())


async def test_a_balance_redis_forgot_is_put_back_and_the_call_made_again(
    open_store: Open,
) -> None:
    """A missing balance: the first call takes nothing, the balance is re-seeded from this
    instance's view, the second call admits (three round trips, the rare case)."""
    store = await open_store()
    admission = shared_admission(store)
    await admission.ledger.set_balance("a1", 1, 1000)
    key = make_key(rpm=60, max_concurrency=3, spend_limits=(("daily", 10**6),))
    (await admit(admission, key, 100)).finish(tokens=10, cost_nanos=100)
    await store.drain()
    client: Redis = Redis.from_url(REDIS)
    try:
        await client.delete(f"{store.prefix}acct:{{a1}}:b")  # this test's own key
    finally:
        await client.aclose()
    sent = await count_commands(store)
    ticket = await admit(admission, key, 100)
    assert [c[0] for c in sent] == ["EVALSHA"] * 3  # admit (missing), seed_missing, admit
    assert ticket.headers["x-ratelimit-remaining-requests"] == "58"  # one request each
    assert (await admission.limits.key_view(key))["in_flight"] == 1
    assert (await admission.spend.view(key))["daily"]["spent_nanos"] == 100
    ticket.finish(tokens=10, cost_nanos=100)
    await store.drain()
    assert await admission.ledger.view("a1") == BalanceView(800, 0, 1)
    assert (await admission.spend.view(key))["daily"]["spent_nanos"] == 200


async def test_spend_of_the_old_key_layout_is_carried_over(open_store: Open) -> None:
    """Windows an instance of the key-tagged layout left (`spend:{<key id>}:...`) are adopted,
    once per key: a rolling upgrade does not reset a cap."""
    store = await open_store()
    admission = shared_admission(store)
    await admission.ledger.set_balance("a1", 1, 10**6)
    now = int(time.time())
    client: Redis = Redis.from_url(REDIS)
    try:  # what the previous release wrote (this test's own prefix)
        day = calendar_period("daily", now)[0]
        await client.hset(f"{store.prefix}spend:{{k1}}:daily:{day}", mapping={"s": 900, "r": 0})
        five = f"{store.prefix}spend:{{k1}}:window_5h"
        await client.hset(five, mapping={"s": 500, "r": 0, "t": now - 100})
    finally:
        await client.aclose()
    key = make_key(spend_limits=(("window_5h", 10**6), ("daily", 1000)))
    with pytest.raises(InsufficientQuota, match="daily spend limit"):
        await admit(admission, key, 101)
    sent = await count_commands(store)
    ticket = await admit(admission, key, 100)
    assert len(sent) == 1  # carried over once: later admissions are one round trip again
    ticket.finish(tokens=10, cost_nanos=100)
    await store.drain()
    view = await admission.spend.view(key)
    assert view["daily"]["spent_nanos"] == 1000
    assert view["window_5h"]["spent_nanos"] == 600


async def test_a_balance_forgotten_mid_request_is_put_back_at_its_end(open_store: Open) -> None:
    """Redis forgets the balance while a request runs: its end frees the slot and settles the
    window once, then puts the balance back and charges it (never read as zero)."""
    store = await open_store()
    admission = shared_admission(store)
    await admission.ledger.set_balance("a1", 1, 1000)
    key = make_key(rpm=60, max_concurrency=1, spend_limits=(("daily", 10**6),))
    ticket = await admit(admission, key, 300)
    client: Redis = Redis.from_url(REDIS)
    try:
        await client.delete(f"{store.prefix}acct:{{a1}}:b")  # this test's own key
    finally:
        await client.aclose()
    ticket.finish(tokens=10, cost_nanos=100)
    await store.drain()
    assert await admission.ledger.view("a1") == BalanceView(900, 0, 1)
    assert (await admission.spend.view(key))["daily"]["spent_nanos"] == 100
    view = await admission.limits.key_view(key)
    assert view["in_flight"] == 0
    assert view["requests"]["remaining"] == 59
    (await admit(admission, key, 800)).finish(tokens=10, cost_nanos=0)  # the slot is free


@pytest.mark.parametrize("refused", ["balance", "spend", "rate", "concurrency"])
async def test_a_refusal_takes_nothing_from_any_part(open_store: Open, refused: str) -> None:
    """Whichever part refuses, buckets, slots, spend windows and balance stay as they were."""
    store = await open_store()
    admission = shared_admission(store)
    await admission.ledger.set_balance("a1", 1, 1000)
    key = make_key(rpm=3, tpm=10**6, max_concurrency=2, spend_limits=(("daily", 700),))
    held = await admit(admission, key, 300)  # one in flight: a slot, a reservation, 300 spent
    other = await admit(admission, key, 100)
    other.finish(tokens=10, cost_nanos=100)
    await store.drain()
    if refused == "rate":  # the third request of the minute takes the last one
        (await admit(admission, key, 1)).finish(tokens=10, cost_nanos=0)
        await store.drain()
    elif refused == "concurrency":
        key = make_key(rpm=3, tpm=10**6, max_concurrency=1, spend_limits=(("daily", 700),))
    before = await dump(store.prefix)
    sent = await count_commands(store)
    cost = {"balance": 601, "spend": 301}.get(refused, 1)  # 1000 - 300 - 100; 700 - 400
    with pytest.raises(ProxydError) as refusal:
        await admit(admission, key, cost)
    assert len(sent) == 1
    expected = {
        "balance": ErrorType.INSUFFICIENT_QUOTA,
        "spend": ErrorType.INSUFFICIENT_QUOTA,
        "rate": ErrorType.RATE_LIMITED,
        "concurrency": ErrorType.CONCURRENCY_LIMITED,
    }[refused]
    assert refusal.value.error_type == expected
    if refused == "spend":
        assert "daily spend limit" in refusal.value.message
    after = await dump(store.prefix)
    balance = f"{store.prefix}acct:{{a1}}:b".encode()
    for state in (before, after):  # the balance's change counter counts refusals too
        state[balance].pop(b"n", None)  # type: ignore[attr-defined]
    assert after == before
    held.finish(tokens=10, cost_nanos=300)
    await store.drain()
    assert await admission.ledger.view("a1") == BalanceView(600, 0, 1)


def in_fallback(store: RedisStore) -> bool:
    return store.fallback_active


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_rate_limit_is_shared_between_instances(open_store: Open) -> None:
    """Two instances share one bucket: 3 rpm means 3 in total, with an exact Retry-After."""
    a, b = RedisLimits(await open_store()), RedisLimits(await open_store())
    key = make_key(rpm=3, tpm=10_000)
    await a.acquire(key, 10)
    await b.acquire(key, 10)
    grant = await a.acquire(key, 10)
    assert grant.remote
    assert grant.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited) as info:
        await b.acquire(key, 10)
    assert info.value.retry_after == 20.0  # one request per 20 s, just taken
    assert 19_900 <= int(info.value.headers["retry-after-ms"]) <= 20_000
    assert info.value.headers["x-ratelimit-remaining-tokens"] == "9970"


async def test_recovers_after_the_advertised_wait(open_store: Open) -> None:
    """Waiting exactly retry-after-ms after a refusal is enough for the next request."""
    limits = RedisLimits(await open_store())
    key = make_key(rpm=600, burst_requests=1)  # one request per 100 ms
    await limits.acquire(key, 1)
    for _ in range(3):
        with pytest.raises(RateLimited) as info:
            await limits.acquire(key, 1)
        await asyncio.sleep(int(info.value.headers["retry-after-ms"]) / 1000)
        await limits.acquire(key, 1)


async def test_tokens_corrected_and_returned(open_store: Open) -> None:
    """finish corrects the shared tpm bucket; a cancelled grant returns its request and tokens."""
    store = await open_store()
    limits = RedisLimits(store)
    key = make_key(rpm=10, tpm=60_000)  # 1000 tokens per second
    grant = await limits.acquire(key, 30_000)
    limits.release(grant, tokens=1_000)
    await store.drain()
    view = await limits.key_view(key)
    assert 59_000 <= view["tokens"]["remaining"] <= 60_000
    limits.release(await limits.acquire(key, 5_000), tokens=None)
    await store.drain()
    view = await limits.key_view(key)
    assert view["requests"]["remaining"] == 9
    assert view["shared"] is True


async def test_concurrency_is_shared_and_leases_expire(open_store: Open) -> None:
    """A cap of 2 holds across instances; a dead instance's slot frees itself after its lease."""
    a = RedisLimits(await open_store(lease_seconds=0.6))
    b = RedisLimits(await open_store(lease_seconds=0.6))
    key = make_key(max_concurrency=2)
    held = await a.acquire(key, 1)
    await b.acquire(key, 1)
    with pytest.raises(RateLimited) as info:
        await a.acquire(key, 1)
    assert info.value.error_type is ErrorType.CONCURRENCY_LIMITED
    await asyncio.sleep(0.9)  # b's lease is refreshed by b; a's too
    with pytest.raises(RateLimited):
        await a.acquire(key, 1)
    a.release(held, tokens=1)
    await a.store.drain()
    await a.acquire(key, 1)
    b.store.leases.clear()  # b "dies": nobody refreshes its lease any more
    await asyncio.sleep(0.8)
    await a.acquire(key, 1)
    assert (await a.key_view(key))["in_flight"] == 2


async def test_ledger_rules_in_redis(open_store: Open) -> None:
    """Reserve, settle with shortfall, versioned set and once-only credit behave as locally."""
    store = await open_store()
    ledger = RedisLedger(store)
    with pytest.raises(InsufficientQuota):
        await ledger.reserve("acct", 1)
    await ledger.set_balance("acct", 3, 1000)
    with pytest.raises(VersionConflict):
        await ledger.set_balance("acct", 2, 5)
    first = await ledger.reserve("acct", 100)
    other = await ledger.reserve("acct", 700)
    with pytest.raises(InsufficientQuota):
        await ledger.reserve("acct", 201)
    ledger.settle(first, 450)
    await store.drain()
    assert await ledger.view("acct") == BalanceView(700, 700, 3)
    assert ledger.local.shortfall_nanos_total == 150
    ledger.settle(other, 700)
    await store.drain()
    assert await ledger.view("acct") == BalanceView(0, 0, 3)
    assert await ledger.credit("acct", "c1", 50)
    assert not await ledger.credit("acct", "c1", 50)
    assert await ledger.view("acct") == BalanceView(50, 0, 3)


async def test_seed_is_shared_and_never_undoes_charges(open_store: Open) -> None:
    """A second instance seeding the same config version leaves the charged balance alone."""
    first, second = RedisLedger(await open_store()), RedisLedger(await open_store())
    assert await first.seed_balance("acct", 1, 1000)
    first.settle(await first.reserve("acct", 300), 250)
    await first.store.drain()
    assert not await second.seed_balance("acct", 1, 1000)
    assert await second.view("acct") == BalanceView(750, 0, 1)
    assert await second.seed_balance("acct", 2, 10)
    assert await first.view("acct") == BalanceView(10, 0, 2)


async def test_ledger_is_exact_near_2_to_62(open_store: Open) -> None:
    """Balances far beyond a double's 2^53 are reserved and charged to the nanosecond."""
    store = await open_store()
    ledger = RedisLedger(store)
    big = 2**62 - 7
    await ledger.set_balance("rich", 1, big)
    res = await ledger.reserve("rich", big - 1)
    with pytest.raises(InsufficientQuota):
        await ledger.reserve("rich", 2)
    ledger.settle(res, big - 3)
    await store.drain()
    assert await ledger.view("rich") == BalanceView(3, 0, 1)


async def test_expired_reservation_is_swept(open_store: Open) -> None:
    """A reservation whose instance died returns to the account once its lease expires."""
    store = await open_store(lease_seconds=0.3)
    ledger = RedisLedger(store)
    await ledger.set_balance("acct", 1, 100)
    await ledger.reserve("acct", 100)
    store.leases.clear()
    with pytest.raises(InsufficientQuota):
        await ledger.reserve("acct", 1)
    await asyncio.sleep(0.4)
    await ledger.reserve("acct", 100)


ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "admit", "admit", "credit", "cancel"]),
        st.integers(0, 3),  # which instance
        st.integers(0, 2500),  # cost, or credit amount
        st.integers(0, 2000),  # reservation
    ),
    min_size=5,
    max_size=40,
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=ops, balance=st.integers(0, 10_000), seed=st.integers(0, 2**16))
async def test_balance_never_negative_with_real_redis(
    plan: list[tuple[str, int, int, int]], balance: int, seed: int
) -> None:
    """Concurrent admit/finish/credit/cancel on 4 instances keep the balance >= 0 and exact."""
    prefix = new_prefix()
    stores = [RedisStore(REDIS, prefix=prefix) for _ in range(4)]
    for s in stores:
        await s.start()
    admissions = [shared_admission(s) for s in stores]
    ledgers = [cast(RedisLedger, a.ledger) for a in admissions]
    await admissions[0].ledger.set_balance("a1", 1, balance)
    key = make_key(max_concurrency=5, rpm=100_000, tpm=10**8)
    rng = random.Random(seed)
    costs: list[int] = []
    credited: list[int] = []
    seen: list[int] = []
    probe: Redis = Redis.from_url(REDIS)
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            raw = await probe.hget(f"{prefix}acct:{{a1}}:b", "bal")
            seen.append(int(raw or 0))
            await asyncio.sleep(0)

    async def one(kind: str, idx: int, amount: int, reserve: int) -> None:
        admission = admissions[idx]
        if kind == "credit":
            if await admission.ledger.credit("a1", f"c{rng.random()}", amount):
                credited.append(amount)
            return
        ticket = await admission.admit(
            key,
            model="m",
            client_ip="1.1.1.1",
            user_agent="t",
            est_tokens=10,
            max_cost_nanos=reserve,
        )
        try:
            await asyncio.sleep(rng.random() / 100)
        finally:  # as the handler does: finish on every exit path, cancellation included
            costs.append(amount)
            ticket.finish(tokens=10, cost_nanos=amount)

    watcher = asyncio.create_task(watch())
    try:
        tasks = [asyncio.create_task(one(*step)) for step in plan]
        for task, step in zip(tasks, plan, strict=True):
            if step[0] == "cancel":
                asyncio.get_running_loop().call_later(rng.random() / 200, task.cancel)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for s in stores:
            await s.drain()
        stop.set()
        await watcher
        assert all(
            r is None or isinstance(r, ProxydError | asyncio.CancelledError) for r in results
        ), results
        view = await admissions[0].ledger.view("a1")
        assert view.reserved_nanos == 0
        assert view.balance_nanos >= 0
        assert min(seen) >= 0
        shortfall = sum(ledger.local.shortfall_nanos_total for ledger in ledgers)
        assert balance + sum(credited) - view.balance_nanos == sum(costs) - shortfall
        assert (await admissions[0].limits.key_view(key))["in_flight"] == 0
    finally:
        for s in stores:
            await s.close()
        await probe.aclose()
        await wipe(prefix)


async def test_unreachable_redis_falls_back_at_start(open_store: Open) -> None:
    """Pointed at a closed port, the store starts in fallback, says so, and admits locally."""
    with capture_logs() as logs:
        store = await open_store(f"redis://127.0.0.1:{closed_port()}/0", retry_interval=0.05)
    assert store.fallback_active
    assert [e["event"] for e in logs] == ["redis_fallback"]
    assert logs[0]["log_level"] == "warning"
    limits, ledger = RedisLimits(store), RedisLedger(store)
    grant = await limits.acquire(make_key(rpm=1), 1)
    assert not grant.remote
    with pytest.raises(RateLimited):
        await limits.acquire(make_key(rpm=1), 1)
    await ledger.set_balance("acct", 1, 10)
    assert not (await ledger.reserve("acct", 10)).remote


async def test_fallback_and_recovery_through_a_cut_connection(open_store: Open) -> None:
    """Cut Redis: instances fall back and queue charges; restore it: they recover and replay."""
    proxy = TcpProxy()
    await proxy.start()
    store = await open_store(f"redis://127.0.0.1:{proxy.port}/0", retry_interval=0.05)
    direct = RedisLedger(await open_store())
    ledger, limits = RedisLedger(store), RedisLimits(store)
    await ledger.set_balance("acct", 1, 1000)
    res = await ledger.reserve("acct", 100)
    assert res.remote
    assert not in_fallback(store)
    await proxy.stop()
    with capture_logs() as logs:
        ledger.settle(res, 40)  # the write fails in the background and is queued
        await store.drain()
        assert in_fallback(store)
        local = await ledger.reserve("acct", 200)  # admitted from the mirrored balance
        assert not local.remote
        ledger.settle(local, 60)
        assert not (await limits.acquire(make_key(rpm=5), 1)).remote
        assert await direct.view("acct") == BalanceView(1000, 100, 1)
        await proxy.start()
        for _ in range(100):
            if not in_fallback(store):
                break
            await asyncio.sleep(0.02)
    assert not in_fallback(store)
    assert [e["event"] for e in logs] == ["redis_fallback", "redis_recovered"]
    assert logs[1]["replayed"] == 2
    assert await direct.view("acct") == BalanceView(900, 0, 1)
    assert (await ledger.reserve("acct", 10)).remote
    await proxy.stop()


async def test_cancelled_remote_admissions_leave_nothing(open_store: Open) -> None:
    """Requests cancelled at any point of a shared admission leave no slot, request, token,
    spend or balance reservation behind."""
    store = await open_store()
    admission = shared_admission(store)
    await admission.ledger.set_balance("a1", 1, 10**9)
    key = make_key(max_concurrency=50, rpm=60, spend_limits=SPEND)
    admitted = 0
    for i in range(40):
        task = asyncio.create_task(
            admission.admit(
                key, model="m", client_ip="", user_agent="", est_tokens=1, max_cost_nanos=5
            )
        )
        await asyncio.sleep(i * 0.0001)
        task.cancel()
        result = await asyncio.gather(task, return_exceptions=True)
        if not isinstance(result[0], BaseException):
            admitted += 1
            result[0].finish(tokens=1, cost_nanos=0)
    await store.drain()
    view = await admission.limits.key_view(key)
    assert view["in_flight"] == 0
    # each admitted request keeps its request; the cancelled ones gave theirs back (1 a second
    # refills meanwhile)
    assert 60 - admitted <= view["requests"]["remaining"] <= 61 - admitted
    assert (await admission.ledger.view("a1")).reserved_nanos == 0
    assert not store.leases
    windows = [v for k, v in (await dump(store.prefix)).items() if b":spend:" in k]
    assert windows
    assert all(int(w[b"r"]) == 0 for w in windows)  # type: ignore[index]


async def test_broadcast_reaches_other_instances_only(open_store: Open) -> None:
    """A published invalidation reaches the other instance's callback, not the sender's own."""
    a, b = await open_store(), await open_store()
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    cast_a, cast_b = Broadcast(a), Broadcast(b)
    cast_a.subscribe("keys", got_a.append)
    cast_b.subscribe("keys", got_b.append)
    await cast_a.start()
    await cast_b.start()
    await asyncio.wait_for(cast_a.subscribed.wait(), 2)
    await asyncio.wait_for(cast_b.subscribed.wait(), 2)
    await cast_a.publish("keys", b"revoke:k1|x")
    for _ in range(100):
        if got_b:
            break
        await asyncio.sleep(0.01)
    assert got_b == [b"revoke:k1|x"]
    assert got_a == []
    await cast_a.close()
    await cast_b.close()


async def _until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)


async def test_latest_state_is_kept_and_never_replaced_by_an_older_one(open_store: Open) -> None:
    """The kept state follows the highest version, compared exactly up to 2**62."""
    store = await open_store()
    cast = Broadcast(store)
    key = f"{store.prefix}latest:keys"
    steps = [(5, b"v5", b"v5"), (3, b"v3", b"v5"), (5, b"v5b", b"v5b"), (12, b"v12", b"v12")]
    steps += [(2**62 - 1, b"big", b"big"), (2**62, b"bigger", b"bigger"), (99, b"x", b"bigger")]
    for version, body, kept in steps:
        await cast.publish("keys", body, version=version)
        assert await store.client.hget(key, "b") == kept
    await cast.publish("keys", b"unversioned")  # a bare invalidation keeps nothing
    assert await store.client.hget(key, "b") == b"bigger"


async def test_state_pushed_while_cut_off_arrives_on_reconnection(open_store: Open) -> None:
    """What another instance published while this one had no Redis is delivered on recovery."""
    proxy = TcpProxy()
    await proxy.start()
    cut = await open_store(f"redis://127.0.0.1:{proxy.port}/0", retry_interval=0.05)
    other = await open_store()
    got: list[bytes] = []
    listening, sending = Broadcast(cut), Broadcast(other)
    listening.subscribe("keys", got.append)
    await sending.publish("keys", b"state-1", version=1)
    await listening.start()
    await asyncio.wait_for(listening.subscribed.wait(), 2)
    assert got == [b"state-1"]  # the state kept before this instance started
    await proxy.stop()
    await _until(lambda: not listening.subscribed.is_set())
    await sending.publish("keys", b"state-2", version=2)  # nobody listening hears this one
    await proxy.start()
    await asyncio.wait_for(listening.subscribed.wait(), 5)
    assert got == [b"state-1", b"state-2"]
    await listening.close()
    await proxy.stop()


async def test_a_read_rides_on_admission_even_after_redis_lost_its_scripts(
    open_store: Open,
) -> None:
    """A request's pending read (a sticky pin) is answered by its admission's round trip, also
    when Redis forgot the scripts (a restart): the admission still reserves, the read is done."""
    store = await open_store()
    admission = shared_admission(store)
    await admission.ledger.set_balance("a1", 1, 10**9)
    await store.client.set(store.prefix + "pin", "c1\x1f2")
    await store.client.script_flush()
    ride = Ride("k1\x00s", store.prefix + "pin")
    RIDE.set(ride)
    try:
        ticket = await admit(admission, make_key(rpm=100), 100)
    finally:
        RIDE.set(None)
    assert ride.done
    assert ride.reply == b"c1\x1f2"
    assert not store.fallback_active  # admitted in Redis, not by the local fallback
    assert (await admission.ledger.view("a1")).reserved_nanos == 100
    ticket.finish(tokens=10, cost_nanos=40)
    await store.drain()
    view = await admission.ledger.view("a1")
    assert (view.balance_nanos, view.reserved_nanos) == (10**9 - 40, 0)
