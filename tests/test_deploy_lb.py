"""The compose topology run without Docker: deploy/compose/nginx.conf in front of two `proxyd
serve` processes on deploy/compose/proxyd.toml, sharing the real PostgreSQL and Redis, with the
mock provider. Streams pass through unbuffered to both instances, and one instance stopped
with SIGTERM (a rollout) finishes its streams while the other takes the new requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import tomllib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from proxyd.mockprovider import create_mock_app
from tests.conftest import StartServer, pg_url, server_url
from tests.deploy_facts import DEPLOY, tool

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

COMPOSE = DEPLOY / "compose"
DEMO_KEY = "sk-proxyd-demo"  # the published demo key of compose/proxyd.toml
BODY = {"model": "mock-gpt", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(log: Path) -> str:
    """The end of the stack's log, for a failure message."""
    return log.read_text()[-3000:]


async def _until_ok(url: str, procs: list[asyncio.subprocess.Process], log: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            for proc in procs:
                assert proc.returncode is None, _tail(log)
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered 200:\n{_tail(log)}")


class Stack:
    """Two proxyd processes and nginx, configured from deploy/compose/ with loopback addresses."""

    def __init__(self, tmp_path: Path, mock_url: str, database: str) -> None:
        self.dir = tmp_path
        self.ports = {"proxyd-1": _port(), "proxyd-2": _port()}
        self.lb = _port()
        self.database = database
        config: dict[str, Any] = tomllib.loads((COMPOSE / "proxyd.toml").read_text())
        for channel in config["state"]["channels"]["channels"]:
            channel["base_url"] = channel["base_url"].replace("http://mock:9100", mock_url)
        config["redis"]["prefix"] = f"t18b-{uuid.uuid4().hex[:10]}:"
        config["billing"]["flush_interval_seconds"] = 0.05
        self.config = config
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.nginx: asyncio.subprocess.Process | None = None
        self.log = tmp_path / "stack.log"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.lb}{path}"

    async def start(self) -> None:
        with self.log.open("ab") as out:
            for name, port in self.ports.items():
                data = dict(self.config)
                data["billing"] = {**self.config["billing"], "spool_dir": f"{self.dir}/{name}"}
                path = self.dir / f"{name}.json"
                path.write_bytes(orjson.dumps(data))
                env = {
                    **os.environ,
                    "PROXYD_LISTEN": f"127.0.0.1:{port}",
                    "PROXYD_CONTROL_LISTEN": f"127.0.0.1:{_port()}",
                    "PROXYD_DATABASE_URL": pg_url(self.database),
                    "PROXYD_REDIS_URL": "redis://127.0.0.1:6379/0",
                }
                env.pop("PROXYD_ADMIN_TOKEN", None)
                self.procs[name] = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "proxyd", "serve", "--config", str(path),
                    cwd=self.dir, env=env, stdout=out, stderr=out,
                )  # fmt: skip
            for port in self.ports.values():
                await _until_ok(f"http://127.0.0.1:{port}/readyz", [*self.procs.values()], self.log)
            self.nginx = await asyncio.create_subprocess_exec(
                tool("nginx", "install Debian's nginx-light (scripts/test-tools.sh does)"),
                "-p", str(self.dir), "-c", str(self.nginx_conf()), "-e", "stderr",
                "-g", "daemon off;", stdout=out, stderr=out,
            )  # fmt: skip
        await _until_ok(self.url("/healthz"), [self.nginx], self.log)

    def nginx_conf(self) -> Path:
        """compose/nginx.conf with the instances and the listener on loopback ports."""
        conf = (COMPOSE / "nginx.conf").read_text()
        for name, port in self.ports.items():
            conf = conf.replace(f"server {name}:8080", f"server 127.0.0.1:{port}")
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{self.lb};")
        conf = conf.replace("pid /tmp/nginx.pid;", f"pid {self.dir}/nginx.pid;")
        temp = "".join(
            f"    {kind}_temp_path {self.dir}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = conf.replace("http {\n", "http {\n" + temp, 1)
        assert str(self.lb) in conf
        assert all(str(port) in conf for port in self.ports.values())
        path = self.dir / "nginx.conf"
        path.write_text(conf)
        return path

    async def metric(self, name: str, metric: str) -> float:
        """The sum of one metric's series on one instance (its own /metrics)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.ports[name]}/metrics") as resp,
        ):
            text = await resp.text()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith((metric + "{", metric + " "))
        )

    async def stop(self) -> None:
        for proc in [*self.procs.values(), self.nginx]:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.fixture
async def stack(tmp_path: Path, start_server: StartServer, database: str) -> AsyncIterator[Stack]:
    """The compose stack on loopback, stopped (only its own processes) after the test."""
    mock = await start_server(create_mock_app(chunk_interval=0.05, chunks=20))
    running = Stack(tmp_path, server_url(mock), database)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


async def stream(session: aiohttp.ClientSession, url: str) -> tuple[float, bytes]:
    """One streamed completion: seconds to the first chunk, and the whole body."""
    start = time.monotonic()
    headers = {"Authorization": f"Bearer {DEMO_KEY}"}
    async with session.post(url, json=BODY, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["x-request-id"]
        first = await resp.content.readany()
        ttfb = time.monotonic() - start
        return ttfb, first + await resp.read()


async def rows(database: str) -> int:
    """Billing rows in the instances' shared PostgreSQL."""
    conn = await asyncpg.connect(pg_url(database))
    try:
        return int(await conn.fetchval("select count(*) from usage_records"))
    finally:
        await conn.close()


async def test_nginx_streams_unbuffered_to_both_instances(stack: Stack) -> None:
    """Through the shipped nginx.conf: whole streams, first chunk at once, both instances used."""
    url = stack.url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(stream(session, url) for _ in range(6)))
        async with session.get(stack.url("/metrics")) as resp:
            assert resp.status == 404  # per-instance metrics are not exposed through the LB
    for ttfb, body in results:
        assert body.endswith(b"data: [DONE]\n\n")
        assert body.count(b'"content"') >= 20
        assert ttfb < 0.5, "the first chunk waited for the stream (about 1 s) to end: buffered"
    assert await stack.metric("proxyd-1", "proxyd_requests_total") > 0
    assert await stack.metric("proxyd-2", "proxyd_requests_total") > 0
    for _ in range(100):
        if await rows(stack.database) == 6:
            break
        await asyncio.sleep(0.05)
    assert await rows(stack.database) == 6


async def test_rollout_of_one_instance_drops_no_stream(stack: Stack) -> None:
    """SIGTERM to proxyd-1 mid-stream: open streams end whole, new ones go to proxyd-2, exit 0."""
    url = stack.url("/v1/chat/completions")
    async with aiohttp.ClientSession() as session:
        opened = [asyncio.create_task(stream(session, url)) for _ in range(4)]
        await asyncio.sleep(0.3)
        assert await stack.metric("proxyd-1", "proxyd_streams_open") > 0
        stack.procs["proxyd-1"].send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        later = await asyncio.gather(*(stream(session, url) for _ in range(4)))
        during = await asyncio.gather(*opened)
    for _, body in [*during, *later]:
        assert body.endswith(b"data: [DONE]\n\n")
    assert await asyncio.wait_for(stack.procs["proxyd-1"].wait(), 30) == 0
    for _ in range(100):
        if await rows(stack.database) == 8:
            break
        await asyncio.sleep(0.05)
    assert await rows(stack.database) == 8
