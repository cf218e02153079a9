"""A real `proxyd serve` process for black-box tests: a config file, random ports, a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SECRET, key_hash


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mock_state(upstream: str) -> dict[str, Any]:
    """One key (SECRET), one OpenAI-style and one Anthropic-style model on the mock provider."""
    return {
        "keys": {
            "version": 1,
            "keys": [{"id": "k1", "hash": key_hash(SECRET), "account_id": "a1"}],
        },
        "prices": {
            "version": 1,
            "prices": {
                "mock-gpt": {"input": "1", "output": "2"},
                "mock-claude": {"input": "1", "output": "2"},
            },
        },
        "channels": {
            "version": 1,
            "channels": [
                {
                    "id": "mock",
                    "type": "openai",
                    "base_url": upstream + "/v1",
                    "api_key": "mock-upstream",
                    "models": ["mock-gpt"],
                },
                {
                    "id": "mock-anthropic",
                    "type": "anthropic",
                    "base_url": upstream,
                    "api_key": "mock-upstream",
                    "models": ["mock-claude"],
                },
            ],
        },
        "balances": {"a1": {"version": 1, "balance_nanos": 10**15}},
    }


@dataclass
class Served:
    """A running proxyd: its client port and base URL, its own metrics listener, the process."""

    proc: asyncio.subprocess.Process
    port: int
    url: str
    metrics_url: str

    async def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of this process's /metrics."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.metrics_url + "/metrics") as resp,
        ):
            text = await resp.text()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    async def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 when the series does not exist yet)."""
        return (await self.scrape()).get((name, frozenset(labels.items())), 0.0)


async def _wait_ready(url: str, proc: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if proc.returncode is not None:
                _, err = await proc.communicate()
                raise AssertionError(f"proxyd exited during start-up: {err.decode()[-2000:]}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("proxyd did not become ready")


@contextlib.asynccontextmanager
async def serve(
    tmp_path: Path,
    upstream: str,
    server: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Served]:
    """Run `proxyd serve` with `server.*` settings in front of the provider at `upstream`."""
    port, metrics = free_port(), free_port()
    config = tmp_path / "proxyd.json"
    data = {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "metrics_listen": f"127.0.0.1:{metrics}",
            **(server or {}),
        },
        "billing": {"database_url": f"sqlite:///{tmp_path}/usage.sqlite3"},
        "state": mock_state(upstream),
        "logging": {"level": "warning"},
    }
    config.write_bytes(orjson.dumps(data))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxyd",
        "serve",
        "--config",
        str(config),
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    metrics_url = f"http://127.0.0.1:{metrics}"
    tls = (server or {}).get("tls_cert") or (env or {}).get("PROXYD_TLS_CERT")
    scheme = "https" if tls else "http"
    try:
        await _wait_ready(metrics_url + "/readyz", proc)
        yield Served(proc, port, f"{scheme}://127.0.0.1:{port}", metrics_url)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
