"""Redis that forgets, Redis that flaps: a private `redis-server` restarted EMPTY under proxyd
refuses no customer with a balance, the forgotten balance is put back from proxyd's last
confirmed view (or the control plane's snapshot), and recovery holds (issue 17, item 5)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from proxyd.redis_store import RedisLedger, RedisStore
from tests.conftest import (
    SECRET,
    StartProxy,
    StartServer,
    channel,
    key_hash,
    make_config,
    server_url,
)
from tests.fakes import FakeProvider, Step, chat_body

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {SECRET}"}
CHAT: dict[str, Any] = {
    "model": "gpt-test",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "hi"}],
}
COST = 11_000  # 7 prompt tokens at 1/M and 2 completion tokens at 2/M, in nanos
# enough for ~45,000 answers: a quiet machine serves ~6,000 in the flapping test, and a balance
# that runs out turns the exact settlement it checks into a shortfall (a request reserves
# ~0.1 M nanos at most)
BALANCE = 500_000_000


class PrivateRedis:
    """A `redis-server` of this test alone, on a free loopback port, that keeps nothing on disk:
    `restart()` brings it back empty."""

    def __init__(self, workdir: Path, *, password: str | None = None) -> None:
        self.workdir = workdir
        self.password = password  # `--requirepass`, and the URL's password
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc: asyncio.subprocess.Process | None = None
        login = f":{password}@" if password else ""
        self.url = f"redis://{login}127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server not found: install Debian's package `redis-server`")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = Redis.from_url(self.url)
        try:
            for _ in range(100):
                try:
                    await client.ping()
                    return
                except (OSError, RedisConnectionError):
                    await asyncio.sleep(0.02)
            pytest.fail("private redis-server did not start")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()  # --save "": nothing is written, the next start is empty
            await asyncio.wait_for(self.proc.wait(), 10)
        self.proc = None

    async def restart(self, down: float) -> None:
        await self.stop()
        await asyncio.sleep(down)
        await self.start()


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    """A private Redis for a test that stops it; stopped afterwards whatever happens."""
    server = PrivateRedis(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def balance_in(redis: PrivateRedis, prefix: str) -> int | None:
    client = Redis.from_url(redis.url)
    try:
        raw = await client.hget(f"{prefix}acct:{{acct-1}}:b", "bal")
    finally:
        await client.aclose()
    return None if raw is None else int(raw)


async def start(
    tmp_path: Path,
    start_server: StartServer,
    start_proxy: StartProxy,
    redis: PrivateRedis,
    **control_plane: Any,
) -> tuple[Any, Any, str]:
    fake = FakeProvider(Step(body=chat_body("ok")))
    server = await start_server(fake.app())
    prefix = f"proxyd-test-{uuid.uuid4().hex[:8]}:"
    sections: dict[str, Any] = {
        "redis": {
            "url": redis.url,
            "prefix": prefix,
            "retry_interval_seconds": 0.1,
            "retry_max_interval_seconds": 0.4,
        }
    }
    if control_plane:
        sections["control_plane"] = control_plane
    config = make_config(
        tmp_path, [channel("main", server_url(server))], balance=BALANCE, **sections
    )
    client, parts = await start_proxy(config)
    if control_plane:
        for _ in range(200):
            if parts.store.loaded:
                break
            await asyncio.sleep(0.02)
    return client, parts, prefix


async def settled(parts: Any) -> None:
    """Wait until the store is out of fallback and every background write has ended."""
    redis: RedisStore = parts.redis
    for _ in range(500):
        if not redis.fallback_active:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # the record steps of the last answers
    await redis.drain()


async def test_redis_restarted_empty_between_requests_refuses_no_one(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, private_redis: PrivateRedis
) -> None:
    """Redis restarts empty while proxyd is idle: the next requests are served (not 429), and
    the balance is put back exactly from proxyd's last confirmed view, their charges on top."""
    client, parts, prefix = await start(tmp_path, start_server, start_proxy, private_redis)
    for _ in range(5):
        resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
        assert resp.status == 200
    await settled(parts)
    assert await balance_in(private_redis, prefix) == BALANCE - 5 * COST

    await private_redis.restart(down=0.05)
    assert await balance_in(private_redis, prefix) is None  # Redis forgot it

    for _ in range(5):
        resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
        assert resp.status == 200, await resp.text()
    await settled(parts)
    assert parts.ledger.reseeded == 1
    assert parts.redis.fallbacks <= 1  # its subscriber may notice the restart; once at most
    assert await balance_in(private_redis, prefix) == BALANCE - 10 * COST


async def test_redis_restarted_empty_mid_load_refuses_no_one(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, private_redis: PrivateRedis
) -> None:
    """Eight clients send requests while Redis goes away for 0.5 s and comes back empty: every
    request is answered 200 (none refused for want of its balance, no 5xx), proxyd falls back
    once and recovers once, and Redis holds the balance again, less what was spent."""
    client, parts, prefix = await start(tmp_path, start_server, start_proxy, private_redis)
    statuses: Counter[int] = Counter()
    stop_at = time.monotonic() + 3.0

    async def load() -> None:
        while time.monotonic() < stop_at:
            resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
            await resp.read()
            statuses[resp.status] += 1

    async def restart() -> None:
        await asyncio.sleep(0.8)
        await private_redis.restart(down=0.5)

    await asyncio.gather(*(load() for _ in range(8)), restart())
    await settled(parts)
    served = statuses[200]
    assert dict(statuses) == {200: served}
    assert served > 50
    assert parts.redis.fallbacks <= 1  # never a second fallback right after the recovery
    assert not parts.redis.fallback_active
    assert parts.ledger.reseeded >= 1
    left = await balance_in(private_redis, prefix)
    assert left is not None
    # Put back from the last confirmed view, then charged every answer, those served while
    # Redis was away included (replayed): exact, but for the record steps of the last eight
    # answers, which may still be running when the clients have read them.
    expected = BALANCE - served * COST
    print(f"empty restart mid-load: {served} served, 0 refused, balance {left} (exact {expected})")
    assert expected <= left <= expected + 8 * COST, (served, left, expected)
    metrics = await (await client.get("/metrics")).text()
    assert "proxyd_redis_fallback 0.0" in metrics


async def test_an_account_this_instance_never_saw_comes_from_the_snapshot_url(
    tmp_path: Path,
    start_server: StartServer,
    start_proxy: StartProxy,
    private_redis: PrivateRedis,
) -> None:
    """With a control-plane snapshot URL, a balance Redis forgot for an account proxyd holds no
    view of (it was pushed to another instance) is fetched from the snapshot, not read as 0."""
    provider = await start_server(FakeProvider(Step(body=chat_body("ok"))).app())
    snapshot = {
        "channels": {"version": 1, "channels": [channel("main", server_url(provider))]},
        "keys": {
            "version": 1,
            "keys": [
                {
                    "id": "k1",
                    "hash": key_hash(SECRET),
                    "account_id": "acct-1",
                }
            ],
        },
        "prices": {
            "version": 1,
            "discount": "1",
            "prices": {"gpt-test": {"input": "1", "output": "2"}},
        },
        "balances": {"acct-1": {"version": 3, "balance_nanos": BALANCE}},
    }
    fetched: list[float] = []

    async def serve(request: web.Request) -> web.Response:
        fetched.append(time.monotonic())
        return web.Response(body=orjson.dumps(snapshot), content_type="application/json")

    cp = web.Application()
    cp.router.add_get("/snapshot", serve)
    cp_server = await start_server(cp)
    client, parts, prefix = await start(
        tmp_path,
        start_server,
        start_proxy,
        private_redis,
        snapshot_url=server_url(cp_server) + "/snapshot",
    )
    ledger: RedisLedger = parts.ledger  # as if this instance had never seen acct-1:
    ledger.local = type(ledger.local)()
    ledger._confirmed.clear()
    await private_redis.restart(down=0.05)
    await asyncio.sleep(0.5)  # proxyd's subscriber may notice the restart and fall back
    await settled(parts)  # back from any fallback: the next request reaches the empty Redis
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert resp.status == 200, await resp.text()
    await settled(parts)
    assert len(fetched) == 2  # the start-up load, then once for the forgotten balance
    assert await balance_in(private_redis, prefix) == BALANCE - COST


async def test_redis_flapping_mid_load_refuses_no_one_and_settles_exactly(
    tmp_path: Path, start_server: StartServer, start_proxy: StartProxy, private_redis: PrivateRedis
) -> None:
    """Redis goes away three times for 0.3 s (coming back empty each time) under eight clients:
    every request is answered 200, proxyd ends back on Redis with one fallback per outage at
    most, and the balance in Redis is exact once the last charges landed."""
    client, parts, prefix = await start(tmp_path, start_server, start_proxy, private_redis)
    statuses: Counter[int] = Counter()
    stop_at = time.monotonic() + 4.0

    async def load() -> None:
        while time.monotonic() < stop_at:
            resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
            await resp.read()
            statuses[resp.status] += 1

    async def flap() -> None:
        for _ in range(3):
            await asyncio.sleep(0.7)
            await private_redis.restart(down=0.3)

    await asyncio.gather(*(load() for _ in range(8)), flap())
    await settled(parts)
    served = statuses[200]
    assert dict(statuses) == {200: served}
    assert not parts.redis.fallback_active
    assert 1 <= parts.redis.fallbacks <= 3
    left = await balance_in(private_redis, prefix)
    expected = BALANCE - served * COST
    print(
        f"flapping x3: {served} served, 0 refused, {parts.redis.fallbacks} fallbacks,"
        f" balance {left} (exact {expected})"
    )
    assert left is not None
    assert expected <= left <= expected + 8 * COST, (served, left, expected)


async def test_control_api_shows_the_put_back_balance_not_zero(
    tmp_path: Path,
    start_server: StartServer,
    start_proxy: StartProxy,
    private_redis: PrivateRedis,
) -> None:
    """After an empty restart the balance view (what `GET /control/v1/keys/{id}` shows) is the
    re-seeded balance, not 0: an operator looking would otherwise top up an account with money."""
    client, parts, prefix = await start(tmp_path, start_server, start_proxy, private_redis)
    resp = await client.post("/v1/chat/completions", headers=AUTH, json=CHAT)
    assert resp.status == 200
    await settled(parts)
    await private_redis.restart(down=0.05)
    await asyncio.sleep(0.5)
    await settled(parts)
    view = await parts.ledger.view("acct-1")
    assert view.balance_nanos == BALANCE - COST
    assert await balance_in(private_redis, prefix) == BALANCE - COST
