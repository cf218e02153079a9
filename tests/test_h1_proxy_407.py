"""Whose 407 it is: an HTTP proxy forwarding a plain-http call answers about its own login (a
ConnectError), while a 407 through a tunnel (CONNECT or SOCKS5) is the upstream's answer."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from proxyd.upstream.h1 import ConnectError, H1Pool
from tests.test_h1 import LOOPS, run_on
from tests.test_h1_proxy import (
    HttpProxy,
    Socks5,
    _listen,
    _shutdown,
    call,
    throwaway_tls,
)

ANSWER_407 = b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 4\r\n\r\nmine"


async def _start_upstream_407(context: ssl.SSLContext | None) -> int:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await r.readexactly(length)
                w.write(ANSWER_407)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()

    _, port = await _listen(serve, context)
    return port


@pytest.mark.parametrize("loop", LOOPS)
def test_a_407_through_a_tunnel_is_the_upstreams_answer(loop: str) -> None:
    async def main() -> None:
        certs = throwaway_tls()
        plain = await _start_upstream_407(None)
        tls = await _start_upstream_407(certs.server)
        socks = Socks5()
        await socks.start()
        http = HttpProxy()
        await http.start()
        pool = H1Pool(limit=10)
        tunnelled = [
            (f"http://127.0.0.1:{plain}/v1", socks.url(), None),
            (f"https://localhost:{tls}/v1", socks.url(), certs.client),
            (f"https://localhost:{tls}/v1", http.url(), certs.client),
        ]
        for url, proxy, context in tunnelled:
            assert await call(pool, url, proxy, context) == (407, b"mine")
        with pytest.raises(ConnectError):  # forwarded by the HTTP proxy: about its login
            await call(pool, f"http://127.0.0.1:{plain}/v1", http.url())
        await _shutdown(pool)

    run_on(loop, main)
