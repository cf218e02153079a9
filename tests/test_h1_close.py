"""H1Pool.close(grace) and the requests it cuts: they learn PoolClosed, never a clean end."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest
import trustme

from proxyd.upstream.h1 import H1Error, H1Pool, PoolClosed
from tests.test_h1 import LOOPS, SSE_HEAD, Wire, _chunk, _open, post, run_on

UNTIL_CLOSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"


async def _holds(r: asyncio.StreamReader, w: asyncio.StreamWriter, first: bytes) -> None:
    await r.readuntil(b"\r\n\r\n")
    await r.readexactly(2)
    w.write(first)
    await w.drain()
    await r.read()  # then nothing more, until the client goes


@pytest.mark.parametrize("loop", LOOPS)
def test_a_body_that_ends_at_close_cut_by_close_is_not_an_answer(loop: str) -> None:
    """An answer without length is read until the upstream closes; the pool closing it is no such
    end: the request fails with PoolClosed (the head's status on it), not a truncated 200."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await _holds(r, w, UNTIL_CLOSE_HEAD + b"the first half")

    async def main() -> None:
        async with Wire(script) as wire:
            pool = H1Pool(limit=2)
            task = asyncio.ensure_future(post(pool, wire.url, read_timeout=30.0))
            await asyncio.sleep(0.1)
            await pool.close(grace=0.1)
            with pytest.raises(PoolClosed) as caught:
                await task
            assert caught.value.status == 200
            assert pool.open_connections == 0

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("framing", ["chunked", "until-close"])
def test_a_stream_cut_by_close_ends_with_pool_closed(loop: str, framing: str) -> None:
    """A stream's sink learns PoolClosed when close() cuts it: not the upstream's fault (a
    ProtocolError), and never a clean end (None) however the body is framed."""
    first = (
        SSE_HEAD + _chunk(b"data: 1\n\n")
        if framing == "chunked"
        else UNTIL_CLOSE_HEAD + b"data: 1\n\n"
    )

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await _holds(r, w, first)

    async def main() -> None:
        async with Wire(script) as wire:
            pool = H1Pool(limit=2)
            stream = await _open(pool, wire.url)
            got: list[bytes] = []
            ended: asyncio.Future[H1Error | None] = asyncio.get_running_loop().create_future()
            stream.attach(got.append, ended.set_result)
            await asyncio.sleep(0.05)
            await pool.close()
            error = await asyncio.wait_for(ended, 2)
            assert type(error) is PoolClosed
            assert error.status == 200
            assert b"".join(got) == b"data: 1\n\n"
            stream.release()
            assert pool.open_connections == 0

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_made_after_close_is_not_handed_out(loop: str) -> None:
    """A request still connecting (here: through a CONNECT proxy slow to open its tunnel) when
    the pool closes gets PoolClosed once its connection is up: close() waits for it within the
    grace, nothing is sent on it and nothing stays open."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    requests: list[bytes] = []
    held: list[asyncio.StreamWriter] = []

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            requests.append(await r.read())  # b"" unless a request came

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await r.read(65536):
                w.write(data)
        w.close()

    async def slow_proxy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)
        line = (await r.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[0]
        await asyncio.sleep(0.3)
        host, port = line.split()[1].rsplit(b":", 1)
        ur, uw = await asyncio.open_connection(host.decode(), int(port))
        held.append(uw)
        w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    async def main() -> None:
        up = await asyncio.start_server(upstream, "127.0.0.1", 0, ssl=server_ctx)
        proxy = await asyncio.start_server(slow_proxy, "127.0.0.1", 0)
        up_port = up.sockets[0].getsockname()[1]
        proxy_port = proxy.sockets[0].getsockname()[1]
        pool = H1Pool(limit=2)
        task = asyncio.ensure_future(
            pool.post(
                f"https://localhost:{up_port}/v1",
                {},
                b"{}",
                ssl_context=trusting,
                connect_timeout=5.0,
                read_timeout=5.0,
                proxy=f"http://127.0.0.1:{proxy_port}",
            )
        )
        await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        await pool.close(grace=2.0)  # it waits for the connecting one, then turns it away
        assert asyncio.get_running_loop().time() - started < 1.5
        with pytest.raises(PoolClosed):
            await asyncio.wait_for(task, 2)
        assert pool.open_connections == 0
        await asyncio.sleep(0.1)
        assert requests in ([], [b""])  # the upstream saw no request
        for w in held:
            w.transport.abort()
        for server in (up, proxy):
            server.close()
        await asyncio.sleep(0)

    run_on(loop, main)
