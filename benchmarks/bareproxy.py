"""The smallest Python proxy: an aiohttp server whose one route POSTs the body upstream with an
aiohttp client and answers what came back. Forked into N processes sharing one listening socket
(as proxyd's workers share the supervisor's), on uvloop.

It does none of proxyd's work (no key, no limits, no usage, no billing row): in the same rounds
as proxyd it shows what going from one Python process to two costs on these cores by itself,
the floor under proxyd's own growth (`bench_workers --with-aiohttp`).

    python -m benchmarks.bareproxy --workers 2 --port 8080 --upstream 9090

Prints the workers' pids on one line once they are forked; SIGTERM stops them all.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

PATH = "/v1/chat/completions"


def _app(upstream: int) -> web.Application:
    url = f"http://127.0.0.1:{upstream}{PATH}"

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        session: aiohttp.ClientSession = request.app["session"]
        headers = {
            "Content-Type": "application/json",
            "Authorization": request.headers.get("Authorization", ""),
        }
        async with session.post(url, data=body, headers=headers) as resp:
            data = await resp.read()
            status = resp.status
        return web.Response(body=data, status=status, content_type="application/json")

    async def client(app: web.Application) -> Any:
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["session"].close()

    app = web.Application()
    app.router.add_post(PATH, handle)
    app.cleanup_ctx.append(client)
    return app


def _serve(sock: socket.socket, upstream: int) -> None:
    uvloop.install()
    web.run_app(_app(upstream), sock=sock, print=None, access_log=None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", type=int, required=True)
    args = parser.parse_args(argv)
    sock = socket.create_server(("127.0.0.1", args.port), backlog=4096)
    pids = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                _serve(sock, args.upstream)
            finally:
                os._exit(0)
        pids.append(pid)
    sys.stdout.write(" ".join(map(str, pids)) + "\n")
    sys.stdout.flush()

    def stop(signum: int, _frame: object) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    for pid in pids:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
