"""Micro-benchmark: what the client connection guard costs per request (deadlines, cap, errors).

Two in-process servers with the same tiny handler, aiohttp's plain AppRunner and proxyd's
ClientRunner (proxyd/server/connection.py), each driven over loopback by one keep-alive client
sending requests one after another; CPU time of this process per request, best of `--rounds`.
A few seconds of one core:

    .venv/bin/python -m benchmarks.bench_connection --requests 5000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop
from aiohttp import web

from proxyd.server.connection import ClientRunner, ConnectionSettings, ConnectionStats

REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nContent-Length: 2\r\n\r\n{}"


async def _serve(guarded: bool) -> web.AppRunner:
    app = web.Application()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"ok")

    app.router.add_post("/v1/chat/completions", handle)
    runner: web.AppRunner
    if guarded:
        runner = ClientRunner(app, ConnectionSettings(), ConnectionStats(), access_log=None)
    else:
        runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def _drive(port: int, count: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.process_time()
    for _ in range(count):
        writer.write(REQUEST)
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
    spent = time.process_time() - start
    writer.close()
    return spent / count


async def _run(requests: int, rounds: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for name, guarded in (("aiohttp", False), ("guarded", True)) * rounds:
        runner = await _serve(guarded)
        try:
            await _drive(runner.addresses[0][1], 200)  # warm-up
            per = await _drive(runner.addresses[0][1], requests)
        finally:
            await runner.cleanup()
        best[name] = min(best.get(name, per), per)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    best = uvloop.run(_run(args.requests, args.rounds))
    plain, guarded = best["aiohttp"], best["guarded"]
    print(f"CPU per request (client and server, best of {args.rounds}):")
    print(f"  aiohttp AppRunner  {plain * 1e6:7.1f} us")
    print(f"  proxyd ClientRunner {guarded * 1e6:6.1f} us  ({(guarded / plain - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
