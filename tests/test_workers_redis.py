"""Workers and instances sharing the machine's Redis: exact limits, and an outage that degrades."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxyd.mockprovider import create_mock_app
from tests.conftest import StartServer, server_url
from tests.procs import Proxyd, chat, free_ports, sample, state

pytestmark = [pytest.mark.redis, pytest.mark.slow]

REDIS = "redis://127.0.0.1:6379/0"


def _redis(url: str = REDIS) -> dict[str, Any]:
    return {"redis": {"url": url, "prefix": f"t18-{uuid.uuid4().hex[:10]}:"}}


async def _split(proxyd: Proxyd, sessions: list[aiohttp.ClientSession], each: int) -> list[int]:
    url = proxyd.url("/v1/chat/completions")

    async def run(session: aiohttp.ClientSession) -> list[int]:
        return [(await chat(session, url))[0] for _ in range(each)]

    results = await asyncio.gather(*(run(s) for s in sessions))
    return [s for r in results for s in r]


async def test_rpm_admits_exactly_the_limit_across_workers_with_redis(
    tmp_path: Path, start_server: StartServer
) -> None:
    """rpm = 10 in Redis, 30 requests over both workers: exactly 10 pass."""
    mock = await start_server(create_mock_app(instant=True))
    proxyd = Proxyd(tmp_path, state(server_url(mock), rpm=10), **_redis())
    try:
        await proxyd.start()
        pinned = await proxyd.pinned()
        statuses = await _split(proxyd, list(pinned.values()), 15)
        assert statuses.count(200) == 10
        assert statuses.count(429) == 20
    finally:
        await proxyd.kill()


async def test_balance_in_redis_spent_from_both_workers_is_exact(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A small Redis balance drained from both workers: never below 0, charged the rows' cost."""
    mock = await start_server(create_mock_app(instant=True))
    start = 300_000
    proxyd = Proxyd(tmp_path, state(server_url(mock), balance=start), **_redis())
    try:
        await proxyd.start()
        pinned = await proxyd.pinned()
        url = proxyd.url("/v1/chat/completions")

        async def run(session: aiohttp.ClientSession) -> list[int]:
            return [(await chat(session, url, max_tokens=20))[0] for _ in range(12)]

        statuses = [s for r in await asyncio.gather(*(run(s) for s in pinned.values())) for s in r]
        assert set(statuses) == {200, 429}
        for _ in range(100):
            with sqlite3.connect(tmp_path / "usage.sqlite3") as db:
                rows = db.execute("select status_code, cost_nanos from usage_records").fetchall()
            _, body = await proxyd.push("GET", "/keys/k1")
            if len(rows) == 24 and body["balance"]["reserved_nanos"] == 0:
                break
            await asyncio.sleep(0.05)
        charged = sum(cost for code, cost in rows if code == 200)
        assert charged > 0
        assert body["balance"]["balance_nanos"] == start - charged
    finally:
        await proxyd.kill()


async def test_two_instances_sharing_redis_hold_one_keys_limit(
    tmp_path: Path, start_server: StartServer
) -> None:
    """Two separate proxyd processes on one Redis: rpm = 10 admits 10 of 30 between them."""
    mock = await start_server(create_mock_app(instant=True))
    shared = _redis()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a = Proxyd(tmp_path / "a", state(server_url(mock), rpm=10), workers=1, **shared)
    b = Proxyd(tmp_path / "b", state(server_url(mock), rpm=10), workers=1, **shared)
    try:
        await asyncio.gather(a.start(), b.start())
        url_a, url_b = a.url("/v1/chat/completions"), b.url("/v1/chat/completions")
        async with aiohttp.ClientSession() as session:

            async def run(url: str) -> list[int]:
                return [(await chat(session, url))[0] for _ in range(15)]

            ra, rb = await asyncio.gather(run(url_a), run(url_b))
        assert (ra + rb).count(200) == 10
        assert 200 in ra
        assert 200 in rb
    finally:
        await asyncio.gather(a.kill(), b.kill())


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    """A redis-server of this test's own on a free port (the machine's 6379 is never touched)."""
    server = PrivateRedis(tmp_path)
    yield server
    await server.stop()


class PrivateRedis:
    def __init__(self, tmp_path: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.port = free_ports(1)
        self.dir = tmp_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            stdout=asyncio.subprocess.DEVNULL,
        )
        for _ in range(100):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            await asyncio.sleep(0.05)
        raise AssertionError("private redis-server did not start")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


async def test_redis_outage_mid_load_degrades_then_recovers(
    tmp_path: Path, start_server: StartServer, private_redis: PrivateRedis
) -> None:
    """Redis stopped under load: no 5xx, the fallback shows in metrics and /readyz, then clears."""
    mock = await start_server(create_mock_app(instant=True))
    await private_redis.start()
    proxyd = Proxyd(tmp_path, state(server_url(mock), rpm=6000), **_redis(private_redis.url))
    try:
        await proxyd.start()
        url = proxyd.url("/v1/chat/completions")
        statuses: list[int] = []
        done = asyncio.Event()

        async def load() -> None:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                while not done.is_set():
                    statuses.append((await chat(s, url))[0])

        task = asyncio.create_task(load())
        await asyncio.sleep(0.5)
        await private_redis.stop()
        await asyncio.sleep(1.0)
        async with aiohttp.ClientSession() as s:
            async with s.get(proxyd.url("/metrics")) as resp:
                assert sample(await resp.text(), "proxyd_redis_fallback") == 1.0
            pinned = await proxyd.pinned()
            for session in pinned.values():
                async with session.get(proxyd.url("/readyz")) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["redis"] == "fallback"
            during = len(statuses)
            await private_redis.start()
            for _ in range(100):
                async with s.get(proxyd.url("/metrics")) as resp:
                    if sample(await resp.text(), "proxyd_redis_fallback") == 0.0:
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("still on the fallback after Redis came back")
        done.set()
        await task
        assert during > 10
        assert not [s for s in statuses if s >= 500]
        assert statuses[:during].count(200) >= during - 2  # balances mirrored: still served
        log = proxyd.log.read_text()
        assert "redis_fallback" in log
        assert "redis_recovered" in log
    finally:
        await proxyd.kill()


async def test_without_redis_each_worker_takes_a_fair_share_of_the_limit(
    tmp_path: Path, start_server: StartServer, private_redis: PrivateRedis
) -> None:
    """Redis away from the start of traffic: rpm = 10 over 2 workers admits 5 + 5, never 20."""
    mock = await start_server(create_mock_app(instant=True))
    await private_redis.start()
    proxyd = Proxyd(tmp_path, state(server_url(mock), rpm=10), **_redis(private_redis.url))
    try:
        await proxyd.start()
        pinned = await proxyd.pinned()
        await private_redis.stop()
        url = proxyd.url("/v1/chat/completions")

        async def run(session: aiohttp.ClientSession) -> list[int]:
            return [(await chat(session, url))[0] for _ in range(15)]

        results = await asyncio.gather(*(run(s) for s in pinned.values()))
        assert [r.count(200) for r in results] == [5, 5], (results, proxyd.log.read_text()[-4000:])
        assert not [s for r in results for s in r if s >= 500]
    finally:
        await proxyd.kill()
