"""Whole responses written by proxyd itself: framing and keep-alive on the raw wire."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from proxyd.server.respond import UnsafeHeader, WholeResponse, head_bytes, header_lines


async def _server(aiohttp_server: Any, headers: list[tuple[str, str]] | None = None) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        count.append(1)
        n = len(count)
        return WholeResponse(
            429,
            b'{"n":%d}' % n,
            headers or [("Content-Type", "application/json"), ("Retry-After", "2")],
        )

    count: list[int] = []
    app = web.Application()
    app.router.add_post("/x", handle)
    return await aiohttp_server(app)


async def _exchange(port: int, raw: bytes) -> bytes:
    """Send `raw` on a fresh connection and read until the server closes it or goes quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 0.5):
            out += chunk
    except TimeoutError:
        out += b"<open>"
    writer.close()
    return out


POST = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"


async def test_keep_alive_carries_two_answers_on_one_connection(aiohttp_server: Any) -> None:
    """Two pipelined requests get two complete, correctly framed answers; the connection stays."""
    server = await _server(aiohttp_server)
    out = await _exchange(server.port, POST + POST)
    first, second = out.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"429 Too Many Requests\r\n")
    assert b"\r\nContent-Length: 7\r\n" in first
    assert b"\r\nRetry-After: 2\r\n" in first
    assert b"\r\nDate: " in first
    assert b"Connection" not in first
    assert first.endswith(b'\r\n\r\n{"n":1}')
    assert second.endswith(b'\r\n\r\n{"n":2}<open>')


async def test_connection_close_and_http10(aiohttp_server: Any) -> None:
    """`Connection: close` is answered with it, then closed; HTTP/1.0 is answered in kind."""
    server = await _server(aiohttp_server)
    closing = POST.replace(b"Host: t\r\n", b"Host: t\r\nConnection: close\r\n")
    out = await _exchange(server.port, closing)
    assert b"\r\nConnection: close\r\n" in out
    assert out.endswith(b'{"n":1}')  # closed by the server: no "<open>"
    http10 = POST.replace(b"HTTP/1.1", b"HTTP/1.0")
    out = await _exchange(server.port, http10)
    assert out.startswith(b"HTTP/1.0 429 ")
    assert out.endswith(b'{"n":2}')  # HTTP/1.0 without keep-alive: closed after the answer


async def test_unknown_status_and_unsafe_header() -> None:
    """A status without a phrase still frames; a header with CR/LF is refused, never written."""
    assert head_bytes(599, "", 0, http10=False, keep_alive=True).startswith(
        b"HTTP/1.1 599 Unknown\r\n"
    )
    with pytest.raises(UnsafeHeader):
        header_lines([("x", "a\r\nSet-Cookie: y")])


async def test_unsafe_header_becomes_a_500_not_a_split_response(aiohttp_server: Any) -> None:
    """A response that cannot be framed safely fails as aiohttp's 500, with nothing injected."""
    server = await _server(aiohttp_server, [("x-a", "1\r\nInjected: 1")])
    out = await _exchange(server.port, POST)
    assert out.startswith(b"HTTP/1.1 500 ")
    assert b"Injected" not in out
