"""The script channel (proxyd/redis_store/channel.py) against the machine's real Redis, and
private `redis-server`s where a test needs a password or a server of its own: replies reach
their callers in order whoever leaves, a turn's calls share a write, a stall fails fast, a lost
connection is retried on a new one, AUTH and SELECT are sent, TLS stays on redis-py."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxyd.redis_store import RedisStore
from proxyd.redis_store.channel import ScriptChannel
from tests.test_limits import make_key
from tests.test_redis_restart import PrivateRedis
from tests.test_redis_store import (
    TcpProxy,
    admit,
    in_fallback,
    new_prefix,
    shared_admission,
    wipe,
)

REDIS = "redis://127.0.0.1:6379/0"
ECHO = "return ARGV[1]"


async def loaded(lua: str) -> str:
    """Load `lua` on the machine's Redis (as the store does at its first call) and answer its
    digest."""
    client: Redis = Redis.from_url(REDIS)
    try:
        return str(await client.script_load(lua))
    finally:
        await client.aclose()


@pytest.fixture
async def channel() -> AsyncIterator[ScriptChannel]:
    chan = ScriptChannel(host="127.0.0.1", port=6379, timeout=1.0)
    yield chan
    await chan.aclose()


async def test_replies_reach_their_callers_whoever_leaves(channel: ScriptChannel) -> None:
    """Forty calls in flight on one connection, every other one cancelled before its reply:
    each remaining caller gets its own answer, and the connection serves on."""
    sha = await loaded(ECHO)
    calls = [asyncio.ensure_future(channel.evalsha(sha, ECHO, [], [f"v{i}"])) for i in range(40)]
    await asyncio.sleep(0)  # written, not yet answered
    for call in calls[::2]:
        call.cancel()
    results = await asyncio.gather(*calls, return_exceptions=True)
    for i, result in enumerate(results):
        if i % 2:
            assert result == f"v{i}".encode()
        else:
            assert isinstance(result, asyncio.CancelledError)
    assert await channel.evalsha(sha, ECHO, [], ["after"]) == b"after"
    assert channel.connection is not None
    assert not channel.connection.waiting


async def test_a_closed_channel_opens_no_connection(channel: ScriptChannel) -> None:
    """A call after `aclose` (a request ending during shutdown) fails at once, as if Redis were
    away, and leaves no socket behind."""
    sha = await loaded(ECHO)
    assert await channel.evalsha(sha, ECHO, [], ["open"]) == b"open"
    await channel.aclose()
    started = time.monotonic()
    with pytest.raises(RedisConnectionError, match="closed"):
        await channel.evalsha(sha, ECHO, [], ["late"])
    assert time.monotonic() - started < 0.005  # no back-off, no retry
    assert channel.connection is None


async def test_the_calls_of_one_turn_leave_in_one_write(channel: ScriptChannel) -> None:
    sha = await loaded(ECHO)
    assert await channel.evalsha(sha, ECHO, [], ["open"]) == b"open"
    conn = channel.connection
    assert conn is not None
    assert conn.transport is not None
    writes: list[bytes] = []
    write = conn.transport.write

    def counting(data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        write(data)

    conn.transport.write = counting  # type: ignore[method-assign]
    results = await asyncio.gather(*(channel.evalsha(sha, ECHO, [], [str(i)]) for i in range(8)))
    assert results == [str(i).encode() for i in range(8)]
    assert len(writes) == 1
    assert writes[0].count(b"EVALSHA") == 8


async def test_a_read_rides_in_the_scripts_write(channel: ScriptChannel) -> None:
    key = f"{new_prefix()}pin"
    client: Redis = Redis.from_url(REDIS)
    try:
        await client.set(key, "c1")
        sha = await loaded(ECHO)
        assert await channel.evalsha(sha, ECHO, [], ["x"], get=key) == (b"x", b"c1")
        assert await channel.evalsha(sha, ECHO, [], ["y"], get=key + "-none") == (b"y", None)
        await client.rpush(key + "-list", "a")  # GET of a list: an error reply, read as None
        assert await channel.evalsha(sha, ECHO, [], ["z"], get=key + "-list") == (b"z", None)
    finally:
        await client.delete(key, key + "-list")
        await client.aclose()


async def test_a_script_redis_does_not_hold_is_loaded_and_the_call_made_again(
    channel: ScriptChannel,
) -> None:
    """A script of this test alone (a fresh comment: a digest no one loaded): NOSCRIPT, then
    SCRIPT LOAD and the call again, on the same connection."""
    lua = f"-- {uuid.uuid4().hex}\nreturn ARGV[1] .. '!'"
    client: Redis = Redis.from_url(REDIS)
    try:
        sha = str(await client.script_load(lua))
        await client.script_flush()  # as a restart would (other stores load theirs again)
    finally:
        await client.aclose()
    assert await channel.evalsha(sha, lua, [], ["a"]) == b"a!"
    assert await channel.evalsha(sha, lua, [], ["b"], get="none") == (b"b!", None)
    bad = "return redis.error_reply('boom')"
    bad_sha = await loaded(bad)
    with pytest.raises(ResponseError, match="boom"):
        await channel.evalsha(bad_sha, bad, [], [])


class Silent:
    """A TCP server that accepts and reads but never answers: a stalled Redis."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def start(self) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            while await reader.read(65536):
                pass
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_stalled_redis_fails_every_waiting_call_once_within_the_timeout() -> None:
    """No reply within `timeout`: every call on the connection fails with redis-py's
    TimeoutError after one timeout (not retried), and the connection is dropped."""
    silent = Silent()
    await silent.start()
    chan = ScriptChannel(host="127.0.0.1", port=silent.port, timeout=0.2, retries=2)
    try:
        started = time.monotonic()
        results = await asyncio.gather(
            *(chan.evalsha("0" * 40, ECHO, [], [i]) for i in range(3)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(r, RedisTimeoutError) for r in results)
        assert 0.2 <= elapsed < 0.35
        assert silent.connections == 1
        assert chan.connection is not None
        assert chan.connection.closed
    finally:
        await chan.aclose()
        await silent.stop()


async def test_a_connection_lost_under_a_call_is_retried_on_a_new_one() -> None:
    sha = await loaded(ECHO)
    forwarder = TcpProxy(cut_first=True)
    await forwarder.start()
    chan = ScriptChannel(host="127.0.0.1", port=forwarder.port, timeout=1.0, retries=2)
    try:
        assert await chan.evalsha(sha, ECHO, [], ["again"]) == b"again"
        assert forwarder.connections == 2
    finally:
        await chan.aclose()
        await forwarder.stop()


async def test_nothing_listening_raises_a_connection_error_after_the_retries() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    chan = ScriptChannel(host="127.0.0.1", port=port, timeout=0.5, retries=2)
    started = time.monotonic()
    with pytest.raises(RedisConnectionError):
        await chan.evalsha("0" * 40, ECHO, [], [1])
    assert time.monotonic() - started < 0.5  # refused at once: 2 short back-offs, no timeout


@pytest.fixture
async def guarded_redis(tmp_path: Path) -> AsyncIterator[int]:
    """A private `redis-server` with a password; answers its port."""
    server = PrivateRedis(tmp_path, password="s3cret")
    await server.start()
    try:
        yield server.port
    finally:
        await server.stop()


async def test_password_and_database_of_the_url_are_used(guarded_redis: int) -> None:
    """The channel authenticates and selects the URL's database, as redis-py's client does;
    a wrong password is a connection error (the store falls back), not a crash."""
    lua = "redis.call('SET', KEYS[1], ARGV[1]) return 1"
    store = RedisStore(f"redis://:s3cret@127.0.0.1:{guarded_redis}/3", prefix=new_prefix())
    await store.start()
    check: Redis = Redis(port=guarded_redis, password="s3cret", db=3)
    try:
        assert store.channel is not None
        sha = str(await store.client.script_load(lua))
        assert await store.channel.evalsha(sha, lua, ["written"], ["here"]) == 1
        assert await check.get("written") == b"here"
        wrong = ScriptChannel(host="127.0.0.1", port=guarded_redis, password="nope", retries=0)
        with pytest.raises(RedisConnectionError, match="AUTH"):
            await wrong.evalsha(sha, lua, ["x"], ["y"])
        await wrong.aclose()
    finally:
        await check.aclose()
        await store.close()


async def test_a_stalled_redis_sends_admission_to_the_fallback_after_one_timeout() -> None:
    """Redis stops answering mid-service: the next admission waits one timeout (not three),
    the store falls back, and the request is admitted locally."""
    stalling = TcpProxy()
    await stalling.start()
    prefix = new_prefix()
    store = RedisStore(f"redis://127.0.0.1:{stalling.port}/0", prefix=prefix, timeout=0.25)
    await store.start()
    try:
        admission = shared_admission(store)
        await admission.ledger.set_balance("a1", 1, 1000)
        key = make_key(rpm=10)
        (await admit(admission, key, 100)).finish(tokens=10, cost_nanos=10)
        await store.drain()
        assert not in_fallback(store)
        stalling.stalled = True
        started = time.monotonic()
        ticket = await admit(admission, key, 100)
        elapsed = time.monotonic() - started
        assert in_fallback(store)
        assert 0.25 <= elapsed < 0.5
        assert ticket.headers["x-ratelimit-remaining-requests"]  # the local fallback's answer
    finally:
        stalling.stalled = False
        await store.close()
        await stalling.stop()
        await wipe(prefix)


def test_tls_urls_stay_on_redis_py() -> None:
    assert (
        ScriptChannel.for_client(Redis.from_url("rediss://127.0.0.1:6380/0"), timeout=1, retries=0)
        is None
    )
    plain = ScriptChannel.for_client(
        Redis.from_url("redis://127.0.0.1:6379/2"), timeout=1, retries=0
    )
    assert plain is not None
    assert (plain.port, plain.db) == (6379, 2)
    unix = ScriptChannel.for_client(
        Redis.from_url("unix:///run/redis.sock?db=1"), timeout=1, retries=0
    )
    assert unix is not None
    assert (unix.path, unix.db) == ("/run/redis.sock", 1)


async def test_a_store_without_the_channel_admits_and_settles_the_same() -> None:
    """Where the channel does not apply (TLS), redis-py carries the same calls."""
    prefix = new_prefix()
    store = RedisStore(REDIS, prefix=prefix)
    store.channel = None
    await store.start()
    try:
        admission = shared_admission(store)
        await admission.ledger.set_balance("a1", 1, 1000)
        ticket = await admit(admission, make_key(rpm=10, max_concurrency=2), 300)
        assert (await admission.ledger.view("a1")).reserved_nanos == 300
        ticket.finish(tokens=10, cost_nanos=120)
        await store.drain()
        view = await admission.ledger.view("a1")
        assert (view.balance_nanos, view.reserved_nanos) == (880, 0)
    finally:
        await store.close()
        await wipe(prefix)
