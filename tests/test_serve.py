"""`proxyd serve` as a process: env overrides, listeners, and SIGTERM draining a live stream."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from proxyd.mockprovider import create_mock_app
from tests.conftest import SECRET, StartServer, key_hash, server_url


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_ready(url: str, proc: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            assert proc.returncode is None, "proxyd exited during start-up"
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("proxyd did not become ready")


async def test_sigterm_lets_the_stream_finish_then_flushes(
    tmp_path: Path, start_server: StartServer
) -> None:
    """SIGTERM during a stream: the stream ends whole, the row is written, exit status 0."""
    mock = await start_server(create_mock_app(chunk_interval=0.05, chunks=30))
    state = {
        "keys": {
            "version": 1,
            "keys": [{"id": "k1", "hash": key_hash(SECRET), "account_id": "a1"}],
        },
        "prices": {"version": 1, "prices": {"mock-gpt": {"input": "1", "output": "2"}}},
        "channels": {
            "version": 1,
            "channels": [
                {
                    "id": "mock",
                    "type": "openai",
                    "base_url": server_url(mock) + "/v1",
                    "api_key_env": "PROXYD_TEST_UPSTREAM_KEY",
                    "models": ["mock-gpt"],
                }
            ],
        },
        "balances": {"a1": {"version": 1, "balance_nanos": 10**12}},
    }
    config = tmp_path / "proxyd.json"
    config.write_bytes(orjson.dumps({"state": state, "logging": {"level": "warning"}}))
    listen, control, metrics = _port(), _port(), _port()
    env = {
        **os.environ,
        "PROXYD_CONFIG": str(config),
        "PROXYD_LISTEN": f"127.0.0.1:{listen}",
        "PROXYD_CONTROL_LISTEN": f"127.0.0.1:{control}",
        "PROXYD_METRICS_LISTEN": f"127.0.0.1:{metrics}",
        "PROXYD_ADMIN_TOKEN": "serve-test-admin-token",
        "PROXYD_DATABASE_URL": f"sqlite:///{tmp_path}/usage.sqlite3",
        "PROXYD_TEST_UPSTREAM_KEY": "mock-upstream",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxyd",
        "serve",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await _wait_ready(f"http://127.0.0.1:{metrics}/readyz", proc)
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"http://127.0.0.1:{control}/control/v1/state",
                headers={"Authorization": "Bearer serve-test-admin-token"},
            ) as resp:
                assert resp.status == 200
            body: dict[str, Any] = {
                "model": "mock-gpt",
                "stream": True,
                "messages": [{"role": "user", "content": "hello"}],
            }
            async with session.post(
                f"http://127.0.0.1:{listen}/v1/chat/completions",
                headers={"Authorization": f"Bearer {SECRET}"},
                json=body,
            ) as resp:
                assert resp.status == 200
                request_id = resp.headers["x-request-id"]
                first = await resp.content.readany()
                assert first
                proc.send_signal(signal.SIGTERM)
                rest = await resp.read()
            stream = first + rest
        assert stream.endswith(b"data: [DONE]\n\n")
        assert stream.count(b'"content"') >= 30
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    with sqlite3.connect(tmp_path / "usage.sqlite3") as db:
        rows = db.execute(
            "select request_id, status_code, completion_tokens, usage_source from usage_records"
        ).fetchall()
    assert rows == [(request_id, 200, 30, "upstream")]


async def test_bad_config_exits_non_zero(tmp_path: Path) -> None:
    """A configuration mistake stops `proxyd serve` at once, naming the field."""
    config = tmp_path / "bad.toml"
    config.write_text("[billing]\nbatch_size = 0\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxyd",
        "serve",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"billing.batch_size" in err


async def test_missing_channel_secret_exits_non_zero(tmp_path: Path) -> None:
    """A channel whose credential variable is unset stops start-up, naming that field."""
    config = tmp_path / "c.json"
    channels = [
        {
            "id": "c",
            "type": "openai",
            "base_url": "http://127.0.0.1:1/v1",
            "api_key_env": "PROXYD_TEST_SURELY_UNSET",
            "models": ["m"],
        }
    ]
    config.write_bytes(orjson.dumps({"state": {"channels": {"version": 1, "channels": channels}}}))
    env = {
        **os.environ,
        "PROXYD_LISTEN": f"127.0.0.1:{_port()}",
        "PROXYD_DATABASE_URL": f"sqlite:///{tmp_path}/u.sqlite3",
    }
    env.pop("PROXYD_TEST_SURELY_UNSET", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxyd",
        "serve",
        "--config",
        str(config),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"channels[0].api_key_env" in err
