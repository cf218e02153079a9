"""The h1 client on the wire: scripted raw TCP servers, on both the asyncio and the uvloop loop."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.upstream.h1 import (
    Answer,
    BadTarget,
    H1Error,
    H1Pool,
    PoolClosed,
    ReadTimeout,
    request_head,
    target_of,
)
from proxyd.upstream.h1.wire import Connection, State

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{"a":1}'


class Wire:
    """A raw TCP server that runs `script` per connection and records what it received."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Wire:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request: its head and its Content-Length body."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body


def answer_each(*responses: bytes, keep: bool = True) -> Callable[[Wire], Script]:
    """A script answering successive requests on a connection with `responses` in turn."""

    def make(wire: Wire) -> Script:
        async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            for resp in responses:
                await wire.read_request(r)
                w.write(resp)
                await w.drain()
            if keep:
                await r.read()  # hold the connection until the client closes it

        return script

    return make


def serve(make: Callable[[Wire], Script]) -> Wire:
    wire = Wire(lambda r, w, n: asyncio.sleep(0))
    wire.script = make(wire)
    return wire


LOOPS = ["asyncio", "uvloop"]


def run_on(kind: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `main` on a fresh loop of `kind` (proxyd serves on uvloop; tests default to asyncio)."""
    if kind == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


async def post(pool: H1Pool, url: str, body: bytes = b"{}", **kw: Any) -> Answer:
    return await pool.post(
        url,
        {"Content-Type": "application/json", "Authorization": "Bearer up"},
        body,
        ssl_context=None,
        connect_timeout=kw.pop("connect_timeout", 2.0),
        read_timeout=kw.pop("read_timeout", 2.0),
    )


@pytest.mark.parametrize("loop", LOOPS)
def test_keep_alive_reuses_one_connection(loop: str) -> None:
    """Three sequential requests ride one connection, and the request is well formed."""

    async def main() -> None:
        async with serve(answer_each(OK, OK, OK)) as wire:
            pool = H1Pool(limit=10)
            for _ in range(3):
                got = await post(pool, wire.url, b'{"model":"m"}')
                assert (got.status, got.body) == (200, b'{"a":1}')
                assert ("Content-Type", "application/json") in got.headers
            assert wire.connections == 1
            assert (pool.open_connections, pool.idle_connections()) == (1, 1)
            head, _, body = wire.requests[0].partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
            assert f"Host: 127.0.0.1:{wire.port}".encode() in lines
            assert b"Content-Length: 13" in lines
            assert b"Authorization: Bearer up" in lines
            assert body == b'{"model":"m"}'
            await pool.close()
            assert pool.open_connections == 0

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_chunked_and_read_until_close_bodies(loop: str) -> None:
    """A chunked body is joined; a body without length ends at close and is not reused."""
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )
    until_close = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it"

    async def main() -> None:
        async with serve(answer_each(chunked, OK)) as wire:
            pool = H1Pool(limit=10)
            assert (await post(pool, wire.url)).body == b"abcdefg"
            assert (await post(pool, wire.url)).body == b'{"a":1}'
            assert wire.connections == 1
            await pool.close()
        async with serve(answer_each(until_close, keep=False)) as wire:
            pool = H1Pool(limit=10)
            got = await post(pool, wire.url)
            assert (got.status, got.body) == (200, b"all of it")
            assert pool.open_connections == 0
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_connection_close_and_extra_bytes_are_not_reused(loop: str) -> None:
    """`Connection: close`, or bytes after the answer, mean a fresh connection next time."""
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    extra = OK + b"HTTP/1.1 200 OK\r\n"

    async def main() -> None:
        for first in (close, extra):
            async with serve(answer_each(first, OK)) as wire:
                pool = H1Pool(limit=10)
                await post(pool, wire.url)
                await asyncio.sleep(0.05)
                wire.script = answer_each(OK)(wire)
                assert (await post(pool, wire.url)).body == b'{"a":1}'
                assert wire.connections == 2
                await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_idle_connection_closed_by_upstream_leaves_the_pool(loop: str) -> None:
    """An upstream that closes an idle connection: counted out at once, the next request works."""

    async def main() -> None:
        async def once(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            await wire.read_request(r)
            w.write(OK)
            await w.drain()  # then the script ends and the server closes the connection

        async with Wire(once) as wire:
            pool = H1Pool(limit=10)
            await post(pool, wire.url)
            for _ in range(100):
                if pool.open_connections == 0:
                    break
                await asyncio.sleep(0.01)
            assert (pool.open_connections, pool.idle_connections()) == (0, 0)
            assert (await post(pool, wire.url)).status == 200
            assert wire.connections == 2
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_timeouts_say_whether_the_head_had_arrived(loop: str) -> None:
    """A silent upstream times out with no status; one that stalls mid-body with its status."""

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.read()

    async def stalls(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        await r.read()

    async def main() -> None:
        for script, status in ((silent, 0), (stalls, 200)):
            async with Wire(script) as wire:
                pool = H1Pool(limit=10)
                with pytest.raises(H1Error) as caught:
                    await post(pool, wire.url, read_timeout=0.2)
                assert (caught.value.timeout, caught.value.status) == (True, status)
                assert pool.open_connections == 0
                await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_slow_but_steady_answer_is_not_a_timeout(loop: str) -> None:
    """The read timeout bounds each wait for bytes, not the whole answer."""

    async def drip(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for b in (b"ab", b"cd", b"ef"):
            await asyncio.sleep(0.1)
            w.write(b)
        await r.read()

    async def main() -> None:
        async with Wire(drip) as wire:
            pool = H1Pool(limit=10)
            got = await post(pool, wire.url, read_timeout=0.25)
            assert got.body == b"abcdef"
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_refused_cut_and_malformed(loop: str) -> None:
    """Nothing listening, a cut mid-body and garbage are H1Errors that leave nothing open."""

    async def cut(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 50\r\n\r\nshort")

    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"NOT HTTP AT ALL\r\n\r\n")
        await r.read()

    async def main() -> None:
        pool = H1Pool(limit=10)
        async with Wire(garbage) as wire:
            port = wire.port
            with pytest.raises(H1Error) as caught:
                await post(pool, wire.url)
            assert caught.value.status == 0
        with pytest.raises(H1Error) as caught:  # the server is gone: connection refused
            await post(pool, f"http://127.0.0.1:{port}/v1")
        assert (caught.value.timeout, caught.value.status) == (False, 0)
        async with Wire(cut) as wire:
            with pytest.raises(H1Error) as caught:
                await post(pool, wire.url)
            assert caught.value.status == 502
        assert pool.open_connections == 0
        await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_interim_100_is_skipped(loop: str) -> None:
    """A 100 Continue before the answer is not the answer."""

    async def main() -> None:
        async with serve(answer_each(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as wire:
            pool = H1Pool(limit=10)
            got = await post(pool, wire.url)
            assert (got.status, got.body) == (200, b'{"a":1}')
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_per_host_cap_queues_and_total_cap_evicts_idle(loop: str) -> None:
    """Over the per-host cap requests wait their turn; at the total cap an idle one is closed."""

    async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await r.readuntil(b"\r\n\r\n")
            await r.readexactly(2)  # every request here has the body b"{}"
            await asyncio.sleep(0.05)
            w.write(OK)

    async def main() -> None:
        async with Wire(slow) as wire_a, serve(answer_each(OK, OK)) as wire_b:
            pool = H1Pool(limit=1, limit_per_host=1)
            got = await asyncio.gather(*(post(pool, wire_a.url) for _ in range(4)))
            assert [g.status for g in got] == [200] * 4
            assert wire_a.connections == 1  # the four took turns on one connection
            assert (await post(pool, wire_b.url)).status == 200  # A's idle one made room
            assert wire_b.connections == 1
            assert pool.open_connections == 1
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_cancelled_request_closes_its_connection(loop: str) -> None:
    """A caller cancelled mid-request (client gone) leaves no connection and no count behind."""

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.read()

    async def main() -> None:
        async with Wire(silent) as wire:
            pool = H1Pool(limit=10)
            task = asyncio.ensure_future(post(pool, wire.url))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (pool.open_connections, pool.idle_connections()) == (0, 0)
            await pool.close()

    run_on(loop, main)


def test_targets_and_heads() -> None:
    """URLs become pool keys and Host headers; what cannot be sent is refused, not sent."""
    t = target_of("https://api.example.com/v1/chat/completions?x=1")
    assert (t.host, t.port, t.tls, t.path, t.host_header) == (
        "api.example.com",
        443,
        True,
        b"/v1/chat/completions?x=1",
        b"api.example.com",
    )
    assert target_of("http://[::1]:8080/v1").host_header == b"[::1]:8080"
    with pytest.raises(BadTarget):
        target_of("ftp://example.com/x")
    for bad in ({"x-a": "v\r\nInjected: 1"}, {"x\nb": "v"}):
        with pytest.raises(BadTarget):
            request_head(t, bad, 0)
    head = request_head(t, {"A": "b", "content-type": "x", "Content-Type": "y", "Host": "z"}, 12)
    assert head.endswith(b"\r\nA: b\r\nContent-Type: y\r\nContent-Length: 12\r\n\r\n")
    assert head.count(b"Host:") == 1


class _Transport:
    """Just enough transport for feeding a protocol by hand."""

    def __init__(self) -> None:
        self.closed = False

    def writelines(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=300),
    sizes=st.lists(st.integers(min_value=1, max_value=50), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=10),
    chunked=st.booleans(),
)
def test_any_split_of_any_framing_gives_the_same_body(
    body: bytes, sizes: list[int], cuts: list[int], chunked: bool
) -> None:
    """However the bytes arrive and however the body is chunked, the answer is the same."""
    if chunked:
        pieces, rest = [], body
        for n in sizes:
            if rest:
                pieces.append(rest[:n])
                rest = rest[n:]
        if rest:
            pieces.append(rest)
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        wire = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
    else:
        wire = b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool = H1Pool(limit=1)
        conn = Connection(loop, ("h", 1, None, None), pool.lost_idle)
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        waiter = conn.send(b"", b"", None)
        points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
        for a, b in itertools.pairwise(points):
            conn.data_received(wire[a:b])
        got = await waiter
        assert (got.status, got.body) == (201, body)
        assert conn.reusable()

    asyncio.run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_verifies_unless_told_not_to(loop: str) -> None:
    """HTTPS: a trusted certificate works, an unknown one is refused, an insecure context too."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE

    async def main() -> None:
        async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await r.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    await r.readexactly(length)
                    w.write(OK)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        server = await asyncio.start_server(script, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        url = f"https://localhost:{port}/v1/chat/completions"
        pool = H1Pool(limit=10)
        for ctx in (trusting, insecure):
            got = await pool.post(
                url, {}, b"{}", ssl_context=ctx, connect_timeout=2, read_timeout=2
            )
            assert (got.status, got.body) == (200, b'{"a":1}')
        with pytest.raises(H1Error) as caught:  # the system's CAs do not know this one
            await pool.post(
                url,
                {},
                b"{}",
                ssl_context=ssl.create_default_context(),
                connect_timeout=2,
                read_timeout=2,
            )
        assert (caught.value.timeout, caught.value.status) == (False, 0)
        await pool.close()
        server.close()

    run_on(loop, main)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


async def _open(pool: H1Pool, url: str, head_timeout: float = 2.0) -> Any:
    return await pool.open(
        url, {}, b"{}", ssl_context=None, connect_timeout=2.0, read_timeout=head_timeout
    )


def _sink() -> tuple[list[bytes], asyncio.Future[Any], Any, Any]:
    got: list[bytes] = []
    ended: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def on_end(error: H1Error | None) -> None:
        assert not ended.done(), "on_end ran twice"
        ended.set_result(error)

    return got, ended, got.append, on_end


@pytest.mark.parametrize("loop", LOOPS)
def test_stream_reads_arrive_as_sent_and_the_connection_is_kept(loop: str) -> None:
    """Each read reaches the sink when it arrives (what came with the head first); a stream read
    to its end returns its connection to the pool for the next request."""

    async def main() -> None:
        go = asyncio.Event()

        async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            await r.readuntil(b"\r\n\r\n")
            await r.readexactly(2)
            w.write(SSE_HEAD + _chunk(b"data: 1\n\n"))
            await go.wait()
            w.write(_chunk(b"data: 2\n\n") + b"0\r\n\r\n")
            await r.readuntil(b"\r\n\r\n")  # the next request, on the same connection
            await r.readexactly(2)
            w.write(OK)
            await r.read()

        async with Wire(script) as wire:
            pool = H1Pool(limit=10)
            stream = await _open(pool, wire.url)
            assert stream.status == 200
            assert ("Content-Type", "text/event-stream") in stream.headers
            await asyncio.sleep(0.05)  # the first event is in before anyone listens
            got, ended, on_data, on_end = _sink()
            stream.attach(on_data, on_end)
            assert got == [b"data: 1\n\n"]
            go.set()
            assert await asyncio.wait_for(ended, 2) is None
            assert got == [b"data: 1\n\n", b"data: 2\n\n"]
            stream.release()
            assert pool.idle_connections() == 1
            assert (await post(pool, wire.url)).body == b'{"a":1}'
            assert wire.connections == 1
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_stream_cut_abort_and_head_timeout(loop: str) -> None:
    """A cut stream ends with an error carrying its status; an aborted one closes; a head that
    never comes times out. None of them leaves a connection counted."""

    async def cut(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(SSE_HEAD + _chunk(b"data: 1\n\n"))
        await w.drain()

    async def endless(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(SSE_HEAD)
        while True:
            w.write(_chunk(b"data: x\n\n"))
            await asyncio.sleep(0.01)

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.read()

    async def main() -> None:
        pool = H1Pool(limit=10)
        async with Wire(cut) as wire:
            stream = await _open(pool, wire.url)
            got, ended, on_data, on_end = _sink()
            stream.attach(on_data, on_end)
            error = await asyncio.wait_for(ended, 2)
            assert isinstance(error, H1Error)
            assert (error.status, error.timeout, got) == (200, False, [b"data: 1\n\n"])
            stream.release()
        async with Wire(endless) as wire:
            stream = await _open(pool, wire.url)
            got, ended, on_data, on_end = _sink()
            stream.attach(on_data, on_end)
            await asyncio.sleep(0.05)
            stream.abort(ReadTimeout("gone"))
            error = await ended
            assert isinstance(error, H1Error)
            assert error.timeout
            stream.release()
        async with Wire(silent) as wire:
            with pytest.raises(H1Error) as caught:
                await _open(pool, wire.url, head_timeout=0.2)
            assert caught.value.timeout
        for _ in range(50):
            if pool.open_connections == 0:
                break
            await asyncio.sleep(0.01)
        assert pool.open_connections == 0
        await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_stream_pause_holds_reads_back(loop: str) -> None:
    """While paused nothing more reaches the sink; resumed, the rest arrives in order."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(SSE_HEAD)
        for i in range(5):
            w.write(_chunk(b"data: %d\n\n" % i))
            await w.drain()
            await asyncio.sleep(0.03)
        w.write(b"0\r\n\r\n")
        await r.read()

    async def main() -> None:
        async with Wire(script) as wire:
            pool = H1Pool(limit=10)
            stream = await _open(pool, wire.url)
            got, ended, on_data, on_end = _sink()

            def first_then_pause(data: bytes) -> None:
                on_data(data)
                if len(got) == 1:
                    stream.pause_reading()

            stream.attach(first_then_pause, on_end)
            await asyncio.sleep(0.25)
            assert len(got) == 1
            stream.resume_reading()
            assert await asyncio.wait_for(ended, 2) is None
            assert b"".join(got) == b"".join(b"data: %d\n\n" % i for i in range(5))
            stream.release()
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_read_all_with_a_limit_stops_there(loop: str) -> None:
    """read_all returns the whole body, or its first `limit` bytes and drops the connection."""
    big = b"x" * 5000

    async def main() -> None:
        answer = b"HTTP/1.1 503 Busy\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
        async with serve(answer_each(answer, answer)) as wire:
            pool = H1Pool(limit=10)
            stream = await _open(pool, wire.url)
            assert stream.status == 503
            assert await stream.read_all() == big
            stream.release()
            assert pool.idle_connections() == 1
            stream = await _open(pool, wire.url)
            assert await stream.read_all(100) == big[:100]
            stream.release()
            assert pool.open_connections == 0
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stream_paused_in_its_last_read_leaves_a_reading_connection(loop: str) -> None:
    """Paused by the read that also ended it, the stream's connection still serves the next
    request once back in the pool."""
    last = SSE_HEAD + _chunk(b"data: 1\n\n") + b"0\r\n\r\n"

    async def main() -> None:
        async with serve(answer_each(last, OK)) as wire:
            pool = H1Pool(limit=10)
            stream = await _open(pool, wire.url)
            got, ended, on_data, on_end = _sink()

            def pause(data: bytes) -> None:
                on_data(data)
                stream.pause_reading()

            stream.attach(pause, on_end)
            assert await asyncio.wait_for(ended, 2) is None
            assert got == [b"data: 1\n\n"]
            stream.release()
            assert pool.idle_connections() == 1
            got_ok = await post(pool, wire.url, read_timeout=1.0)
            assert got_ok.body == b'{"a":1}'
            assert wire.connections == 1
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_idle_connections_close_after_the_keep_alive_time(loop: str) -> None:
    """With no more traffic, an idle connection is closed once its keep-alive time is up."""

    async def main() -> None:
        closed = asyncio.Event()

        async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            await r.readuntil(b"\r\n\r\n")
            await r.readexactly(2)
            w.write(OK)
            await r.read()  # until proxyd closes it
            closed.set()

        async with Wire(script) as wire:
            pool = H1Pool(limit=10, keepalive_seconds=0.2)
            await post(pool, wire.url)
            assert pool.idle_connections() == 1
            await asyncio.sleep(0.1)
            assert pool.idle_connections() == 1  # not yet
            await asyncio.wait_for(closed.wait(), 2)
            assert (pool.open_connections, pool.idle_connections()) == (0, 0)
            await pool.close()

    run_on(loop, main)


def test_upstream_tls_contexts_are_ready_at_start_and_verify_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The contexts proxyd hands the h1 client: the CA store is loaded once, at start, never on
    a call; `verify_tls = false` reaches an unknown certificate, the default context refuses."""
    import ssl

    import trustme

    from proxyd.config import UpstreamSettings
    from proxyd.upstream.attempt import Upstream
    from tests.fakes import make_channel

    def channel(verify: bool) -> Any:
        return make_channel(f"tls-{verify}", base_url="https://localhost:1/v1", verify_tls=verify)

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)

    loads: list[ssl.SSLContext] = []
    real_default = ssl.create_default_context

    def counted(*args: Any, **kw: Any) -> ssl.SSLContext:
        loads.append(ctx := real_default(*args, **kw))
        return ctx

    monkeypatch.setattr(ssl, "create_default_context", counted)

    async def main() -> None:
        upstream = Upstream(UpstreamSettings())
        await upstream.start()
        assert len(loads) == 1  # the verifying context, built in start()
        verifying = upstream.ssl_context_for(channel(True))
        insecure = upstream.ssl_context_for(channel(False))
        assert loads == [verifying]  # the calls loaded nothing
        assert verifying.verify_mode is ssl.CERT_REQUIRED
        assert verifying.check_hostname
        assert insecure.verify_mode is ssl.CERT_NONE
        assert not insecure.check_hostname

        async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                head = await r.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await r.readexactly(length)
                w.write(OK)
                await w.drain()
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            finally:
                w.close()

        server = await asyncio.start_server(script, "127.0.0.1", 0, ssl=server_ctx)
        url = f"https://localhost:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
        pool = H1Pool(limit=10)
        got = await pool.post(
            url, {}, b"{}", ssl_context=insecure, connect_timeout=2, read_timeout=2
        )
        assert (got.status, got.body) == (200, b'{"a":1}')
        with pytest.raises(H1Error):  # the system's CAs do not know trustme's
            await pool.post(
                url, {}, b"{}", ssl_context=verifying, connect_timeout=2, read_timeout=2
            )
        await pool.close()
        await upstream.close()
        server.close()
        await server.wait_closed()

    run_on("uvloop", main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_woken_then_cancelled_waiter_hands_its_turn_on(loop: str) -> None:
    """A waiter cancelled after it was woken passes its turn on: the next waiter is served."""

    async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await r.readuntil(b"\r\n\r\n")
            await r.readexactly(2)
            await asyncio.sleep(0.05)
            w.write(OK)

    async def main() -> None:
        async with Wire(slow) as wire:
            pool = H1Pool(limit=1)
            first = asyncio.ensure_future(post(pool, wire.url))
            await asyncio.sleep(0.01)
            second = asyncio.ensure_future(post(pool, wire.url))
            third = asyncio.ensure_future(post(pool, wire.url))
            await asyncio.sleep(0.01)
            woken = pool._wake

            def wake_then_cancel() -> None:  # the second is woken, then cancelled before it runs
                woken()
                if not second.done():
                    second.cancel()

            pool._wake = wake_then_cancel  # type: ignore[method-assign]
            assert (await first).status == 200
            with pytest.raises(asyncio.CancelledError):
                await second
            pool._wake = woken  # type: ignore[method-assign]
            assert (await asyncio.wait_for(third, 2.0)).status == 200
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_pool_acquire_times_out_as_an_upstream_timeout(loop: str) -> None:
    """At the pool's cap a request waits at most acquire_timeout, then fails as a timeout."""

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.read()

    async def main() -> None:
        async with Wire(silent) as wire:
            pool = H1Pool(limit=1, acquire_timeout=0.1)
            busy = asyncio.ensure_future(post(pool, wire.url, read_timeout=5.0))
            await asyncio.sleep(0.02)
            started = asyncio.get_running_loop().time()
            with pytest.raises(H1Error) as caught:
                await post(pool, wire.url)
            waited = asyncio.get_running_loop().time() - started
            assert caught.value.timeout
            assert caught.value.status == 0  # no head: the failover may try another channel
            assert 0.09 <= waited < 1.0
            assert not pool._waiters  # the timed-out waiter left the queue
            busy.cancel()
            with pytest.raises(asyncio.CancelledError):
                await busy
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_walks_its_states(loop: str) -> None:
    """NEW → WAITING → BODY → DONE → IDLE over one exchange, then WAITING again on reuse, and
    CLOSED once the upstream closes it in the pool (which lets it go at once)."""
    seen: list[State] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        for _ in range(2):
            await r.readuntil(b"\r\n\r\n")
            await r.readexactly(2)
            seen.append(conn().state)  # the request is in: its answer has not come
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await w.drain()
            await asyncio.sleep(0.05)
            seen.append(conn().state)  # the head was sent, the body not yet
            w.write(b"3\r\nabc\r\n0\r\n\r\n")
            await w.drain()
            await asyncio.sleep(0.05)

    pool = H1Pool(limit=1)

    def conn() -> Connection:
        return next(iter(pool._live))

    async def main() -> None:
        async with Wire(script) as wire:
            for _ in range(2):
                assert (await post(pool, wire.url)).body == b"abc"
                assert conn().state is State.IDLE
            held = conn()
            assert seen == [State.WAITING, State.BODY] * 2
        for _ in range(50):  # the server closed: the pool drops its idle connection
            if held.state is State.CLOSED and pool.open_connections == 0:
                break
            await asyncio.sleep(0.02)
        assert (held.state, pool.open_connections) == (State.CLOSED, 0)
        await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_close_waits_for_busy_connections_then_terminates(loop: str) -> None:
    """close(grace): idle connections close at once, a request waiting for a connection fails
    with PoolClosed, a busy one that ends within the grace finishes normally; one that does
    not is cut when the grace is over."""

    async def answer_after(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        await r.readexactly(2)
        await asyncio.sleep(0.2 if n == 1 else 30)  # the 2nd connection never answers
        w.write(OK)
        await w.drain()
        await r.read()

    async def main() -> None:
        loop_ = asyncio.get_running_loop()
        async with Wire(answer_after) as wire:
            pool = H1Pool(limit=2)
            quick = asyncio.ensure_future(post(pool, wire.url, read_timeout=60.0))
            stuck = asyncio.ensure_future(post(pool, wire.url, read_timeout=60.0))
            await asyncio.sleep(0.05)
            waiting = asyncio.ensure_future(post(pool, wire.url))  # over the cap: it queues
            await asyncio.sleep(0.02)
            started = loop_.time()
            await pool.close(grace=0.6)
            took = loop_.time() - started
            assert 0.5 <= took < 2.0  # it waited out the grace for the stuck one
            assert (await quick).status == 200  # finished within the grace
            with pytest.raises(PoolClosed):
                await waiting
            with pytest.raises(H1Error):  # cut at the end of the grace
                await stuck
            assert pool.open_connections == 0
            with pytest.raises(PoolClosed):
                await post(pool, wire.url)

    run_on(loop, main)


def test_close_without_busy_connections_does_not_wait() -> None:
    async def main() -> None:
        async with serve(answer_each(OK)) as wire:
            pool = H1Pool(limit=2)
            await post(pool, wire.url)
            started = asyncio.get_running_loop().time()
            await pool.close(grace=5.0)
            assert asyncio.get_running_loop().time() - started < 0.5
            assert pool.open_connections == 0

    asyncio.run(main())
