"""`proxyd serve --workers 2` as real processes: one port, one scrape, limits never multiplied."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxyd.mockprovider import create_mock_app
from tests.conftest import SECRET, StartServer, pg_url, server_url
from tests.fakes import FakeProvider, Step, chat_body
from tests.procs import CHAT, Proxyd, chat, sample, state

pytestmark = pytest.mark.slow


async def _proxyd(tmp_path: Path, st: dict[str, Any], **kw: Any) -> Proxyd:
    proxyd = Proxyd(tmp_path, st, **kw)
    await proxyd.start()
    return proxyd


def _rows(tmp_path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp_path / "usage.sqlite3") as db:
        return db.execute(
            "select request_id, status_code, cost_nanos from usage_records"
        ).fetchall()


async def _wait_rows(tmp_path: Path, count: int) -> list[tuple[Any, ...]]:
    for _ in range(100):
        rows = _rows(tmp_path)
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(_rows(tmp_path))} billing rows, expected {count}")


async def test_two_workers_serve_and_one_scrape_counts_every_worker(
    tmp_path: Path, start_server: StartServer
) -> None:
    """Both workers serve one port; /metrics there sums both; each worker's own shows its part."""
    mock = await start_server(create_mock_app(instant=True))
    proxyd = await _proxyd(tmp_path, state(server_url(mock)))
    try:
        pinned = await proxyd.pinned()
        for worker, session in pinned.items():
            for _ in range(3 + worker * 2):  # 3 on worker 0, 5 on worker 1
                status, _ = await chat(session, proxyd.url("/v1/chat/completions"))
                assert status == 200
        async with aiohttp.ClientSession() as session:
            own = []
            for worker in (0, 1):
                async with session.get(proxyd.metrics_url(worker)) as resp:
                    own.append(sample(await resp.text(), "proxyd_requests_total"))
            async with session.get(proxyd.url("/metrics")) as resp:
                assert resp.status == 200
                text = await resp.text()
        assert own == [3.0, 5.0]
        assert sample(text, "proxyd_requests_total", status_class="2xx") == 8.0
        assert sample(text, "proxyd_request_duration_seconds_count") == 8.0
        assert sample(text, "proxyd_workers") == 2.0
        for name in ("0", "1", "supervisor"):  # process series: one per process, labelled
            assert sample(text, "proxyd_process_resident_memory_bytes", worker=name) > 0
        assert text.count("# TYPE proxyd_requests_total counter") == 1
        assert await proxyd.stop() == 0
    finally:
        await proxyd.kill()


async def test_rpm_admits_exactly_the_limit_across_workers_without_redis(
    tmp_path: Path, start_server: StartServer
) -> None:
    """rpm = 10, 30 requests split over both workers, no Redis: exactly 10 pass (never 2 x 10)."""
    mock = await start_server(create_mock_app(instant=True))
    proxyd = await _proxyd(tmp_path, state(server_url(mock), rpm=10))
    try:
        pinned = await proxyd.pinned()

        async def run(session: aiohttp.ClientSession) -> list[int]:
            url = proxyd.url("/v1/chat/completions")
            return [(await chat(session, url))[0] for _ in range(15)]

        results = await asyncio.gather(*(run(s) for s in pinned.values()))
        statuses = [s for r in results for s in r]
        assert statuses.count(200) == 10
        assert statuses.count(429) == 20
        assert all(200 in r for r in results), "each worker admitted some"
    finally:
        await proxyd.kill()


async def test_balance_spent_from_both_workers_is_exact_and_never_negative(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A small balance drained from both workers at once: never below 0, charged the rows' cost."""
    mock = await start_server(create_mock_app(instant=True))
    start = 300_000
    proxyd = await _proxyd(tmp_path, state(server_url(mock), balance=start))
    try:
        pinned = await proxyd.pinned()
        url = proxyd.url("/v1/chat/completions")

        async def run(session: aiohttp.ClientSession) -> list[int]:
            return [(await chat(session, url, max_tokens=20))[0] for _ in range(12)]

        results = await asyncio.gather(*(run(s) for s in pinned.values()))
        statuses = [s for r in results for s in r]
        assert 0 < statuses.count(200) < 24
        assert set(statuses) == {200, 429}
        rows = await _wait_rows(tmp_path, 24)
        charged = sum(cost for _, status, cost in rows if status == 200)
        assert charged > 0
        status, body = await proxyd.push("GET", "/keys/k1")
        assert status == 200
        balance = body["balance"]
        assert balance["reserved_nanos"] == 0
        assert balance["balance_nanos"] == start - charged
        assert balance["balance_nanos"] >= 0
    finally:
        await proxyd.kill()


async def test_a_spend_cap_is_one_window_for_every_worker_without_redis(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A daily cap spent from both workers, no Redis: one window in the supervisor, so the
    charges stay under the cap (two windows would let each worker spend nearly all of it) and
    the control API shows every worker's spend."""
    mock = await start_server(create_mock_app(instant=True))
    cap = 1_000_000  # about ten reservations of ~90,000 nanos; a request costs ~20,000
    st = state(server_url(mock), spend_limits={"daily_nanos": cap})
    proxyd = await _proxyd(tmp_path, st)
    try:
        pinned = await proxyd.pinned()
        url = proxyd.url("/v1/chat/completions")

        async def run(session: aiohttp.ClientSession) -> list[int]:
            statuses = []
            for _ in range(80):
                status, body = await chat(session, url, max_tokens=20)
                statuses.append(status)
                if status == 429:
                    assert b"daily spend limit" in body
                    break
            return statuses

        results = await asyncio.gather(*(run(s) for s in pinned.values()))
        assert all(r[-1] == 429 and 200 in r for r in results), results
        rows = await _wait_rows(tmp_path, sum(len(r) for r in results))
        charged = sum(cost for _, status, cost in rows if status == 200)
        assert 0.5 * cap < charged <= cap
        status, body = await proxyd.push("GET", "/keys/k1")
        assert status == 200
        assert body["spend"]["daily"]["spent_nanos"] == charged
        assert body["balance"]["reserved_nanos"] == 0
    finally:
        await proxyd.kill()


async def test_a_revocation_pushed_once_is_refused_by_every_worker(
    tmp_path: Path, start_server: StartServer
) -> None:
    """DELETE /keys/k1 once: the very next request on each worker's connection gets 401."""
    mock = await start_server(create_mock_app(instant=True))
    proxyd = await _proxyd(tmp_path, state(server_url(mock)))
    try:
        pinned = await proxyd.pinned()
        url = proxyd.url("/v1/chat/completions")
        for session in pinned.values():
            assert (await chat(session, url))[0] == 200
        status, _ = await proxyd.push("DELETE", "/keys/k1")
        assert status == 200
        for session in pinned.values():
            assert (await chat(session, url))[0] == 401
    finally:
        await proxyd.kill()


async def test_a_killed_worker_is_replaced_and_traffic_continues(
    tmp_path: Path, start_server: StartServer
) -> None:
    """SIGKILL one worker: the supervisor forks a new one; requests keep succeeding meanwhile."""
    mock = await start_server(create_mock_app(instant=True))
    proxyd = await _proxyd(tmp_path, state(server_url(mock)))
    try:
        before = proxyd.worker_pids()
        assert len(before) == 2
        os.kill(before[1], signal.SIGKILL)
        url = proxyd.url("/v1/chat/completions")
        statuses = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for _ in range(20):
                statuses.append((await chat(s, url))[0])
                await asyncio.sleep(0.05)
        assert statuses == [200] * 20
        after = proxyd.worker_pids()
        assert len(after) == 2
        assert before[0] in after
        assert before[1] not in after
        await proxyd.wait_ready()
        async with aiohttp.ClientSession() as s, s.get(proxyd.url("/metrics")) as resp:
            text = await resp.text()
        assert sample(text, "proxyd_worker_restarts_total") == 1.0
        assert "worker_exited" in proxyd.log.read_text()
        assert await proxyd.stop() == 0
    finally:
        await proxyd.kill()


async def test_a_worker_killed_mid_stream_gives_back_its_slot_and_reservation(
    tmp_path: Path, start_server: StartServer
) -> None:
    """max_concurrency = 1, a stream open on worker 1: worker 0 refuses a second request; worker 1
    SIGKILLed, the supervisor gives its slot and reservation back and worker 0 admits at once."""
    mock = await start_server(create_mock_app(chunk_interval=0.05, chunks=200))
    proxyd = await _proxyd(tmp_path, state(server_url(mock), max_concurrency=1))
    try:
        pinned = await proxyd.pinned()
        url = proxyd.url("/v1/chat/completions")
        headers = {"Authorization": f"Bearer {SECRET}"}
        stream = await pinned[1].post(url, json={**CHAT, "stream": True}, headers=headers)
        assert await stream.content.readany()
        status, body = await proxyd.push("GET", "/keys/k1")
        assert body["limits"]["in_flight"] == 1
        assert body["balance"]["reserved_nanos"] > 0
        assert (await chat(pinned[0], url))[0] == 429
        os.kill(proxyd.worker_pids()[1], signal.SIGKILL)  # forked second: slot 1
        for _ in range(100):
            status, body = await proxyd.push("GET", "/keys/k1")
            if status == 200 and body["limits"]["in_flight"] == 0:
                break
            await asyncio.sleep(0.05)
        assert body["limits"]["in_flight"] == 0
        assert body["balance"]["reserved_nanos"] == 0
        assert (await chat(pinned[0], url))[0] == 200
        assert "released_nanos" in proxyd.log.read_text()
    finally:
        await proxyd.kill()


@pytest.mark.postgres
async def test_sigterm_lets_streams_on_both_workers_finish_and_flushes(
    tmp_path: Path, start_server: StartServer, database: str
) -> None:
    """SIGTERM with a stream open on each worker: both end whole, rows in PostgreSQL, exit 0."""
    mock = await start_server(create_mock_app(chunk_interval=0.05, chunks=30))
    billing = {"database_url": pg_url(database)}
    proxyd = await _proxyd(tmp_path, state(server_url(mock)), billing=billing)
    try:
        pinned = await proxyd.pinned()
        url = proxyd.url("/v1/chat/completions")
        body = {**CHAT, "stream": True}
        headers = {"Authorization": f"Bearer {SECRET}"}
        responses = [await s.post(url, json=body, headers=headers) for s in pinned.values()]
        firsts = [await r.content.readany() for r in responses]
        assert all(firsts)
        assert proxyd.proc is not None
        proxyd.proc.send_signal(signal.SIGTERM)
        streams = [first + await r.read() for first, r in zip(firsts, responses, strict=True)]
        ids = {r.headers["x-request-id"] for r in responses}
        for stream in streams:
            assert stream.endswith(b"data: [DONE]\n\n")
            assert stream.count(b'"content"') >= 30
        assert await proxyd.stop() == 0
        conn = await asyncpg.connect(pg_url(database))
        try:
            rows = await conn.fetch(
                "select request_id, status_code from usage_records where request_id = any($1)",
                list(ids),
            )
        finally:
            await conn.close()
        assert {r["request_id"] for r in rows} == ids
        assert {r["status_code"] for r in rows} == {200}
    finally:
        await proxyd.kill()


async def test_a_session_stays_on_one_credential_whichever_worker_serves_it(
    tmp_path: Path, start_server: StartServer
) -> None:
    """No Redis, two workers, one channel with three credentials: the turns of a conversation
    alternate between the workers and every turn reaches the provider with the credential its
    first turn got (the supervisor keeps the pins). Each worker's own round-robin would differ:
    worker 1 serves another conversation first."""
    fake = FakeProvider(Step(body=chat_body("ok")))
    provider = await start_server(fake.app())
    st = state(server_url(provider))
    chan = st["channels"]["channels"][0]
    del chan["api_key"]
    chan["api_keys"] = ["cred-0", "cred-1", "cred-2"]
    proxyd = await _proxyd(tmp_path, st)
    try:
        pinned = await proxyd.pinned()
        url = proxyd.url("/v1/chat/completions")
        other = [{"role": "user", "content": "another conversation"}]
        assert (await chat(pinned[1], url, messages=other))[0] == 200
        turns: list[dict[str, str]] = [{"role": "user", "content": "hello"}]
        seen_before = len(fake.seen)
        for turn in range(6):
            status, _ = await chat(pinned[turn % 2], url, messages=turns)
            assert status == 200
            turns = [*turns, {"role": "assistant", "content": "ok"}]
            turns.append({"role": "user", "content": f"and {turn}?"})
        used = [seen.headers["Authorization"] for seen in fake.seen[seen_before:]]
        assert len(used) == 6
        assert len(set(used)) == 1, used
        assert await proxyd.stop() == 0
    finally:
        await proxyd.kill()


async def test_sighup_replaces_workers_without_dropping_a_request(
    tmp_path: Path, start_server: StartServer
) -> None:
    """SIGHUP under steady traffic: new workers with the reloaded file, every request answered."""
    mock = await start_server(create_mock_app(instant=True))
    proxyd = await _proxyd(tmp_path, state(server_url(mock)))
    try:
        before = set(proxyd.worker_pids())
        url = proxyd.url("/v1/chat/completions")
        statuses: list[int] = []
        done = asyncio.Event()

        async def load() -> None:
            # a connection per request: an idle keep-alive connection to a retiring worker is
            # closed by it (as nginx does on reload); what must never happen is a refused connect
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                while not done.is_set():
                    statuses.append((await chat(s, url))[0])

        task = asyncio.create_task(load())
        await asyncio.sleep(0.3)
        assert proxyd.proc is not None
        proxyd.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if '"reloaded"' in proxyd.log.read_text():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        done.set()
        await task
        for _ in range(100):  # the retiring workers drain and exit, on a busy machine too
            after = set(proxyd.worker_pids())
            if len(after) == 2 and not before & after:
                break
            await asyncio.sleep(0.05)
        assert len(after) == 2
        assert not before & after
        assert len(statuses) > 10
        assert set(statuses) == {200}
        assert await proxyd.stop() == 0
    finally:
        await proxyd.kill()


async def test_workers_from_the_environment_and_a_clear_error(tmp_path: Path) -> None:
    """PROXYD_WORKERS=0 is refused with a message naming the field; `auto` is accepted."""
    from proxyd.config import ConfigError, load_config, with_workers, worker_count

    with pytest.raises(ConfigError, match=r"server\.workers"):
        load_config(None, {"PROXYD_WORKERS": "0"})
    config = load_config(None, {"PROXYD_WORKERS": "auto"})
    assert worker_count(config.server.workers) == len(os.sched_getaffinity(0))
    assert with_workers(config, "3").server.workers == 3
    with pytest.raises(ConfigError, match="--workers"):
        with_workers(config, "many")
