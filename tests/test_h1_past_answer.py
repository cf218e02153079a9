"""Bytes past a complete answer (an upstream that sends two answers to one request) never reach
the caller: not the headers of the answer it got, not a stream's sink after its end."""

from __future__ import annotations

import asyncio

import pytest

from proxyd.upstream.h1 import H1Error, H1Pool
from tests.test_h1 import LOOPS, SSE_HEAD, _chunk, _open, answer_each, post, run_on, serve

SECOND = b"HTTP/1.1 200 OK\r\nX-Second: yes\r\nContent-Length: 5\r\n\r\nextra"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_second_answer_in_the_same_read_is_dropped(loop: str) -> None:
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + SECOND
    stream = SSE_HEAD + _chunk(b"data: 1\n\n") + b"0\r\n\r\n" + SECOND

    async def main() -> None:
        async with serve(answer_each(whole, keep=False)) as wire:
            pool = H1Pool(limit=10)
            got = await post(pool, wire.url)
            assert (got.status, got.body) == (200, b"ok")
            assert got.headers == [("Content-Length", "2")]
            assert pool.open_connections == 0  # not reused
            await pool.close()
        async with serve(answer_each(stream, keep=False)) as wire:
            pool = H1Pool(limit=10)
            s = await _open(pool, wire.url)
            head = list(s.headers)
            seen: list[object] = []
            ended: asyncio.Future[H1Error | None] = asyncio.get_running_loop().create_future()

            def on_end(error: H1Error | None) -> None:
                seen.append("end")
                ended.set_result(error)

            await asyncio.sleep(0.05)  # all of it, the second answer too, is in
            s.attach(seen.append, on_end)
            assert await asyncio.wait_for(ended, 2) is None
            await asyncio.sleep(0.05)
            assert seen == [b"data: 1\n\n", "end"]
            assert s.headers == head
            s.release()
            assert pool.open_connections == 0
            await pool.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_second_answer_while_a_stream_is_attached_is_dropped(loop: str) -> None:
    """The same with the sink attached before the last read arrives."""

    async def main() -> None:
        go = asyncio.Event()

        def make(wire: object) -> object:
            async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
                await r.readuntil(b"\r\n\r\n")
                await r.readexactly(2)
                w.write(SSE_HEAD)
                await go.wait()
                w.write(_chunk(b"data: 1\n\n") + b"0\r\n\r\n" + SECOND)
                await r.read()

            return script

        async with serve(make) as wire:  # type: ignore[arg-type]
            pool = H1Pool(limit=10)
            s = await _open(pool, wire.url)
            seen: list[object] = []
            ended: asyncio.Future[H1Error | None] = asyncio.get_running_loop().create_future()

            def on_end(error: H1Error | None) -> None:
                seen.append("end")
                ended.set_result(error)

            s.attach(seen.append, on_end)
            go.set()
            assert await asyncio.wait_for(ended, 2) is None
            await asyncio.sleep(0.05)
            assert seen == [b"data: 1\n\n", "end"]
            s.release()
            assert pool.open_connections == 0
            await pool.close()

    run_on(loop, main)
