"""Which H1Error subclass each failure raises, on real loopback sockets (asyncio and uvloop)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

import pytest
import trustme

from proxyd.upstream.h1 import (
    Abandoned,
    ConnectError,
    ConnectTimeout,
    H1Error,
    H1Pool,
    PoolClosed,
    PoolTimeout,
    ProtocolError,
    ReadTimeout,
)
from tests.test_h1 import LOOPS, OK, Wire, _open, post, run_on


def test_the_tree() -> None:
    """`timeout` follows the class; `head_arrived` follows the status."""
    timeouts: list[type[H1Error]] = [ConnectTimeout, ReadTimeout, PoolTimeout]
    others: list[type[H1Error]] = [ConnectError, ProtocolError, PoolClosed, Abandoned, H1Error]
    for kind in timeouts:
        assert kind("x").timeout
    for kind in others:
        assert not kind("x").timeout
    assert ReadTimeout("x", status=200).head_arrived
    assert not ProtocolError("cut").head_arrived


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("loop", LOOPS)
def test_connect_errors_and_timeouts(loop: str) -> None:
    """Refused, an unknown name and a failed TLS handshake are ConnectErrors; a listener that
    never finishes the TLS handshake is a ConnectTimeout."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)

    async def main() -> None:
        pool = H1Pool(limit=10)
        with pytest.raises(ConnectError) as caught:
            await post(pool, f"http://127.0.0.1:{_free_port()}/v1")
        assert (caught.value.timeout, caught.value.head_arrived) == (False, False)
        with pytest.raises(ConnectError):
            await post(pool, "http://no-such-host.invalid/v1")

        async def tls_script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.close()

        server = await asyncio.start_server(tls_script, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ConnectError):  # the system's CAs do not know trustme's
            await pool.post(
                f"https://localhost:{port}/v1",
                {},
                b"{}",
                ssl_context=ssl.create_default_context(),
                connect_timeout=2,
                read_timeout=2,
            )
        server.close()

        held: list[asyncio.StreamWriter] = []

        async def mute(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            held.append(w)  # a plain TCP listener: a TLS client hello gets no answer

        server = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ConnectTimeout) as timed_out:
            await pool.post(
                f"https://localhost:{port}/v1",
                {},
                b"{}",
                ssl_context=ssl.create_default_context(),
                connect_timeout=0.2,
                read_timeout=2,
            )
        assert timed_out.value.timeout
        assert not timed_out.value.head_arrived
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
        assert pool.open_connections == 0
        await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_read_timeouts_and_protocol_errors(loop: str) -> None:
    """No head in time, or a body that stalls: ReadTimeout. Garbage, or a cut before the answer
    is complete (before or after its head): ProtocolError, with the status when the head came."""

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.read()

    async def stalls(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        await r.read()

    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"NOT HTTP AT ALL\r\n\r\n")
        await r.read()

    async def cut_head(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Le")

    async def cut_body(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 50\r\n\r\nshort")

    cases: list[tuple[Any, type[H1Error], int]] = [
        (silent, ReadTimeout, 0),
        (stalls, ReadTimeout, 200),
        (garbage, ProtocolError, 0),
        (cut_head, ProtocolError, 0),
        (cut_body, ProtocolError, 502),
    ]

    async def main() -> None:
        pool = H1Pool(limit=10)
        for script, kind, status in cases:
            async with Wire(script) as wire:
                with pytest.raises(H1Error) as caught:
                    await post(pool, wire.url, read_timeout=0.2)
                assert type(caught.value) is kind, script.__name__
                assert caught.value.status == status
                assert caught.value.head_arrived == bool(status)
        async with Wire(silent) as wire:  # a stream's head wait
            with pytest.raises(ReadTimeout):
                await _open(pool, wire.url, head_timeout=0.2)
        async with Wire(cut_body) as wire:  # a stream's body cut: its sink learns why
            stream = await _open(pool, wire.url)
            ended: asyncio.Future[H1Error | None] = asyncio.get_running_loop().create_future()
            stream.attach(lambda data: None, ended.set_result)
            error = await asyncio.wait_for(ended, 2)
            assert type(error) is ProtocolError
            assert error.status == 502
            stream.release()
        assert pool.open_connections == 0
        await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_pool_timeout_and_pool_closed(loop: str) -> None:
    """At the cap a request waits acquire_timeout, then PoolTimeout; closing the pool ends the
    waiters, the requests in flight and later requests with PoolClosed."""

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.read()

    async def main() -> None:
        async with Wire(silent) as wire:
            pool = H1Pool(limit=1, acquire_timeout=0.1)
            busy = asyncio.ensure_future(post(pool, wire.url, read_timeout=5.0))
            await asyncio.sleep(0.02)
            with pytest.raises(PoolTimeout) as caught:
                await post(pool, wire.url)
            assert caught.value.timeout
            assert not caught.value.head_arrived
            pool.acquire_timeout = None
            waiting = asyncio.ensure_future(post(pool, wire.url))
            await asyncio.sleep(0.02)
            await pool.close()
            with pytest.raises(PoolClosed):
                await waiting
            with pytest.raises(PoolClosed):
                await post(pool, wire.url)
            with pytest.raises(PoolClosed):  # in use, and cut by close() (no grace)
                await busy

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_plain_answer_still_works(loop: str) -> None:
    """The happy path is untouched by the error classes."""

    async def once(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        await r.readexactly(2)
        w.write(OK)
        await r.read()

    async def main() -> None:
        async with Wire(once) as wire:
            pool = H1Pool(limit=10)
            assert (await post(pool, wire.url)).status == 200
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_head_that_never_ends_is_a_protocol_error(loop: str) -> None:
    """An answer head still incomplete after MAX_HEAD bytes (one endless header, or endless
    headers) fails at once as a ProtocolError instead of growing until the read timeout; a head
    just under the limit, and a big body in the head's read, are fine."""
    from proxyd.upstream.h1.wire import MAX_HEAD

    async def endless(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nX-Long: ")
        for _ in range(200):
            w.write(b"a" * 1024)
            await w.drain()
            await asyncio.sleep(0.001)
        await r.read()

    async def many(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 20000)
        await r.read()

    big_body = b"x" * (4 * MAX_HEAD)
    near = b"X-N: " + b"n" * (MAX_HEAD - 1024) + b"\r\n"

    async def fine(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        for _ in range(2):
            await r.readuntil(b"\r\n\r\n")
            await r.readexactly(2)
            extra = near if n == 1 else b""
            w.write(
                b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s"
                % (extra, len(big_body), big_body)
            )
            await w.drain()
        await r.read()

    async def main() -> None:
        pool = H1Pool(limit=10)
        for script in (endless, many):
            async with Wire(script) as wire:
                started = asyncio.get_running_loop().time()
                with pytest.raises(ProtocolError) as caught:
                    await post(pool, wire.url, read_timeout=5.0)
                assert asyncio.get_running_loop().time() - started < 2.0
                assert not caught.value.head_arrived
        async with Wire(fine) as wire:
            for _ in range(2):
                got = await post(pool, wire.url)
                assert (got.status, len(got.body)) == (200, len(big_body))
        assert pool.open_connections == 1
        await pool.close()

    run_on(loop, main)
