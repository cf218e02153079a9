"""`proxyd serve` as a real process for the scale-out tests: ports, workers, pinned connections.

A pinned session holds one keep-alive connection, so every request on it reaches the same
worker; `/readyz` says which worker that is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.conftest import SECRET, key_hash

ADMIN = "workers-test-admin-token"
MODEL = "mock-gpt"
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}


def free_ports(count: int) -> int:
    """The first of `count` consecutive free loopback ports."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = int(s.getsockname()[1])
        if first + count > 65535:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no run of free ports")


def state(mock_url: str, *, balance: int = 10**15, **key_fields: Any) -> dict[str, Any]:
    """Keys, prices, channels and balances for one key `k1` of account `a1`."""
    return {
        "keys": {
            "version": 1,
            "keys": [{"id": "k1", "hash": key_hash(SECRET), "account_id": "a1", **key_fields}],
        },
        "prices": {"version": 1, "prices": {MODEL: {"input": "1", "output": "2"}}},
        "channels": {
            "version": 1,
            "channels": [
                {
                    "id": "mock",
                    "type": "openai",
                    "base_url": mock_url + "/v1",
                    "api_key": "mock-upstream",
                    "models": [MODEL],
                }
            ],
        },
        "balances": {"a1": {"version": 1, "balance_nanos": balance}},
    }


class Proxyd:
    """One `proxyd serve` process (a supervisor with `workers` workers, or a single process)."""

    def __init__(
        self, tmp_path: Path, state: dict[str, Any], *, workers: int = 2, **sections: Any
    ) -> None:
        self.dir = tmp_path
        self.workers = workers
        self.listen, self.control = free_ports(1), free_ports(1)
        self.metrics = free_ports(max(workers, 1))
        data: dict[str, Any] = {
            "state": state,
            "logging": {"level": "info"},
            "billing": {
                "database_url": f"sqlite:///{tmp_path}/usage.sqlite3",
                "spool_dir": str(tmp_path / "spool"),
                "flush_interval_seconds": 0.05,
            },
            "server": {"shutdown_grace_seconds": 20},
        }
        for name, value in sections.items():
            data.setdefault(name, {}).update(value)
        self.tls = bool(data["server"].get("tls_cert"))  # the client port speaks TLS
        self.config = tmp_path / f"proxyd-{self.listen}.json"
        self.config.write_bytes(orjson.dumps(data))
        self.proc: asyncio.subprocess.Process | None = None
        self.sessions: list[aiohttp.ClientSession] = []
        self.log = tmp_path / f"proxyd-{self.listen}.log"

    def url(self, path: str) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.listen}{path}"

    def control_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.control}/control/v1{path}"

    def metrics_url(self, worker: int) -> str:
        """The own `/metrics` of one worker (server.metrics_listen plus its slot)."""
        return f"http://127.0.0.1:{self.metrics + worker}/metrics"

    async def start(self) -> None:
        env = {
            **os.environ,
            "PROXYD_LISTEN": f"127.0.0.1:{self.listen}",
            "PROXYD_CONTROL_LISTEN": f"127.0.0.1:{self.control}",
            "PROXYD_METRICS_LISTEN": f"127.0.0.1:{self.metrics}",
            "PROXYD_ADMIN_TOKEN": ADMIN,
        }
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxyd",
                "serve",
                "--config",
                str(self.config),
                "--workers",
                str(self.workers),
                cwd=self.dir,
                env=env,
                stdout=out,
                stderr=out,
            )
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Until every worker answers its own /metrics and the client port is ready."""
        urls = [self.metrics_url(w) for w in range(self.workers)] + [self.url("/readyz")]
        async with aiohttp.ClientSession() as session:
            for url in urls:
                for _ in range(600):
                    assert self.proc is not None
                    assert self.proc.returncode is None, self.log.read_text()[-3000:]
                    try:
                        async with session.get(url, ssl=False) as resp:  # no certificate check
                            if resp.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"{url} not ready:\n{self.log.read_text()[-3000:]}")

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 40)

    async def kill(self) -> None:
        for session in self.sessions:
            await session.close()
        if self.proc is not None and self.proc.returncode is None:
            for pid in self.worker_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            await self.proc.wait()

    def worker_pids(self) -> list[int]:
        """The supervisor's children now."""
        assert self.proc is not None
        pid = self.proc.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    async def pinned(self) -> dict[int, aiohttp.ClientSession]:
        """One session per worker, each holding one keep-alive connection to that worker."""
        found: dict[int, aiohttp.ClientSession] = {}
        spare: list[aiohttp.ClientSession] = []
        try:
            for _ in range(30):
                batch = [
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(4)
                ]

                async def which(session: aiohttp.ClientSession) -> int:
                    async with session.get(self.url("/readyz")) as resp:
                        return int((await resp.json())["worker"])

                workers = await asyncio.gather(*(which(s) for s in batch))
                for session, worker in zip(batch, workers, strict=True):
                    if worker in found:
                        spare.append(session)
                    else:
                        found[worker] = session
                if len(found) == self.workers:
                    self.sessions += found.values()
                    return found
            raise AssertionError(f"connections reached only workers {sorted(found)}")
        finally:
            if len(found) < self.workers:
                spare += found.values()
            for session in spare:
                await session.close()

    async def push(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.control_url(path), json=body, headers=headers) as resp,
        ):
            return resp.status, await resp.json()


async def chat(session: aiohttp.ClientSession, url: str, **extra: Any) -> tuple[int, bytes]:
    """One chat completion; its status and body."""
    async with session.post(
        url, json={**CHAT, **extra}, headers={"Authorization": f"Bearer {SECRET}"}
    ) as resp:
        return resp.status, await resp.read()


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of one metric's samples whose labels include `labels` in an exposition."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total
