"""A mixed soak of a real `proxyd serve` process on loopback: does it hold memory, file
descriptors and billing rows flat over time?

`make soak` runs it for ten minutes; `python -m benchmarks.soak --seconds 30` is the short form
(`tests/test_soak.py` runs it in `make test`). Traffic, from a fixed number of client tasks:
80 % streams, half OpenAI chat and half Anthropic messages; one request in ten from a key over
its rate limit (429); one in a hundred aborted by the client after its first chunk; the provider
fails one request in fifty (503). It prints RSS and file descriptors every sample, RSS growth per
minute, and billing rows against the requests proxyd admitted (every authenticated request
yields one row, refusals and aborts included). Loopback only, bounded in time and concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from benchmarks.procstat import rss_bytes
from proxyd.mockprovider import create_mock_app

GOOD = "sk-soak-good-0123456789"
LIMITED = "sk-soak-limited-0123456789"
MiB = 1024 * 1024


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Sample:
    """One reading of the proxyd process."""

    at: float  # seconds since the load started
    rss: int
    fds: int
    requests: int


@dataclass
class SoakResult:
    """What the soak measured."""

    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)
    aborted: int = 0
    client_errors: int = 0  # requests that never got a status (connection refused or reset)
    samples: list[Sample] = field(default_factory=list)
    rows: int = 0
    rows_by_status: dict[int, int] = field(default_factory=dict)
    exit_code: int | None = None

    @property
    def admitted(self) -> int:
        """Requests proxyd answered or saw aborted: each must have one row."""
        return sum(self.statuses.values()) + self.aborted

    def rss_growth_per_minute(self) -> float:
        """Least-squares slope of RSS over time after the first fifth (the warm-up), MiB/min."""
        points = self.samples[len(self.samples) // 5 :]
        if len(points) < 2:
            return 0.0
        n = len(points)
        mx = sum(p.at for p in points) / n
        my = sum(p.rss for p in points) / n
        var = sum((p.at - mx) ** 2 for p in points)
        if var == 0:
            return 0.0
        slope = sum((p.at - mx) * (p.rss - my) for p in points) / var
        return slope * 60 / MiB

    def lines(self) -> list[str]:
        """The report, one line each."""
        out = [
            f"{s.at:7.1f}s  rss {s.rss / MiB:7.1f} MiB  fds {s.fds:4d}  requests {s.requests}"
            for s in self.samples
        ]
        first, last = self.samples[len(self.samples) // 5], self.samples[-1]
        out.append(f"statuses {dict(sorted(self.statuses.items()))}  aborted {self.aborted}")
        out.append(f"rows by status {dict(sorted(self.rows_by_status.items()))}")
        out.append(
            f"RSS growth per minute after warm-up: {self.rss_growth_per_minute():+.2f} MiB/min"
            f" ({first.rss / MiB:.1f} -> {last.rss / MiB:.1f} MiB)"
        )
        out.append(f"file descriptors: {first.fds} after warm-up, {last.fds} at the end")
        out.append(
            f"rows = admitted: {self.rows} = {self.admitted}"
            f" ({'ok' if self.rows == self.admitted else 'MISMATCH'}); exit code {self.exit_code}"
        )
        return out


def provider(fail_every: int) -> web.Application:
    """The mock provider, failing one request in `fail_every` with a 503."""
    app = create_mock_app(chunk_interval=0.01, chunks=12)
    seen = 0

    @web.middleware
    async def failing(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        nonlocal seen
        seen += 1
        if seen % fail_every == 0:
            await request.read()
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        return await handler(request)

    app.middlewares.append(failing)
    return app


def _state(mock_url: str) -> dict[str, Any]:
    key = {"account_id": "soak", "models": ["*"]}
    return {
        "keys": {
            "version": 1,
            "keys": [
                {"id": "good", "hash": _hash(GOOD), **key},
                {"id": "limited", "hash": _hash(LIMITED), "rpm": 6, **key},
            ],
        },
        "prices": {
            "version": 1,
            "prices": {m: {"input": "1", "output": "2"} for m in ("mock-gpt", "mock-claude")},
        },
        "channels": {
            "version": 1,
            "channels": [
                {
                    "id": "mock-openai",
                    "type": "openai",
                    "base_url": mock_url + "/v1",
                    "api_key": "mock-upstream",
                    "models": ["mock-gpt"],
                },
                {
                    "id": "mock-anthropic",
                    "type": "anthropic",
                    "base_url": mock_url,
                    "api_key": "mock-upstream",
                    "models": ["mock-claude"],
                },
            ],
        },
        "balances": {"soak": {"version": 1, "balance_nanos": 10**15}},
    }


async def _wait_ready(session: aiohttp.ClientSession, url: str, proc: Any) -> None:
    for _ in range(400):
        if proc.returncode is not None:
            raise RuntimeError("proxyd exited during start-up")
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("proxyd did not become ready")


class Load:
    """The client side: `clients` tasks sending the mixed traffic until `deadline`."""

    def __init__(self, base: str, result: SoakResult) -> None:
        self.base = base
        self.result = result
        self.sent = 0

    def _request(self, n: int) -> tuple[str, dict[str, str], dict[str, Any], bool]:
        stream = n % 5 != 0  # 80 %
        secret = LIMITED if n % 10 == 3 else GOOD
        text = [{"role": "user", "content": f"soak request {n}"}]
        if n % 2:
            body: dict[str, Any] = {"model": "mock-gpt", "messages": text, "stream": stream}
            return "/v1/chat/completions", {"Authorization": f"Bearer {secret}"}, body, stream
        body = {"model": "mock-claude", "max_tokens": 64, "messages": text, "stream": stream}
        return "/v1/messages", {"x-api-key": secret}, body, stream

    async def client(self, session: aiohttp.ClientSession, deadline: float) -> None:
        result = self.result
        while time.monotonic() < deadline:
            n = self.sent
            self.sent += 1
            path, headers, body, stream = self._request(n)
            abort = stream and n % 100 == 7  # 1 %
            try:
                async with session.post(self.base + path, headers=headers, json=body) as resp:
                    if abort and resp.status == 200:
                        await resp.content.readany()
                        resp.connection.close() if resp.connection else None
                        result.aborted += 1
                        continue
                    await resp.read()
                    result.statuses[resp.status] += 1
            except (aiohttp.ClientError, OSError):
                result.client_errors += 1


async def soak(seconds: float, *, clients: int = 16, sample_every: float = 5.0) -> SoakResult:
    """Run the soak and return its figures (proxyd is started and stopped here)."""
    result = SoakResult(seconds)
    work = Path(tempfile.mkdtemp(prefix="proxyd-soak-"))
    runner = web.AppRunner(provider(fail_every=50))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    mock_port = runner.addresses[0][1]
    config = work / "proxyd.json"
    config.write_bytes(
        orjson.dumps(
            {"state": _state(f"http://127.0.0.1:{mock_port}"), "logging": {"level": "error"}}
        )
    )
    listen, control = _port(), _port()
    env = {
        **os.environ,
        "PROXYD_CONFIG": str(config),
        "PROXYD_LISTEN": f"127.0.0.1:{listen}",
        "PROXYD_CONTROL_LISTEN": f"127.0.0.1:{control}",
        "PROXYD_DATABASE_URL": f"sqlite:///{work}/usage.sqlite3",
    }
    env.pop("PROXYD_ADMIN_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxyd",
        "serve",
        cwd=work,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{listen}"
    load = Load(base, result)
    try:
        connector = aiohttp.TCPConnector(limit=clients * 2)
        async with aiohttp.ClientSession(connector=connector) as session:
            await _wait_ready(session, base + "/readyz", proc)
            started = time.monotonic()
            deadline = started + seconds

            async def sampler() -> None:
                while True:
                    now = time.monotonic()
                    result.samples.append(
                        Sample(now - started, rss_bytes(proc.pid), _fds(proc.pid), load.sent)
                    )
                    if now >= deadline:
                        return
                    await asyncio.sleep(min(sample_every, max(0.0, deadline - now)))

            await asyncio.gather(
                sampler(), *(load.client(session, deadline) for _ in range(clients))
            )
        proc.send_signal(signal.SIGTERM)
        result.exit_code = await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await runner.cleanup()
    with sqlite3.connect(work / "usage.sqlite3") as db:
        grouped = db.execute(
            "select status_code, count(*) from usage_records group by status_code"
        ).fetchall()
    result.rows_by_status = {int(s): int(c) for s, c in grouped}
    result.rows = sum(result.rows_by_status.values())
    return result


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.soak [--seconds 600] [--clients 16]`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sample-every", type=float, default=10.0)
    args = parser.parse_args(argv)
    result = asyncio.run(soak(args.seconds, clients=args.clients, sample_every=args.sample_every))
    for line in result.lines():
        print(line, flush=True)
    if result.rows != result.admitted or result.exit_code != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
