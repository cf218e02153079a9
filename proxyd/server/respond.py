"""Whole responses to the client, serialised by proxyd and written in one transport write.

For answers whose body is known up front (refusals, errors, whole upstream answers): the status
line, headers and body go out in one write instead of aiohttp's header machinery. Streams use
aiohttp's StreamResponse. Never logs or keeps a body.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time

_REASONS = {s.value: s.phrase for s in HTTPStatus}


class UnsafeHeader(ValueError):
    """A header name or value with CR or LF: it would split the response."""


def header_lines(headers: Iterable[tuple[str, str]]) -> str:
    """`Name: value` lines, each ending in CRLF; raises UnsafeHeader on a CR or LF."""
    lines = []
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise UnsafeHeader(f"header {name!r} cannot be sent")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


def head_bytes(status: int, lines: str, length: int, *, http10: bool, keep_alive: bool) -> bytes:
    """The status line and headers (`lines` from header_lines) of a `length`-byte response."""
    version = "HTTP/1.0" if http10 else "HTTP/1.1"
    if not keep_alive:
        connection = "Connection: close\r\n"
    else:
        connection = "Connection: keep-alive\r\n" if http10 else ""
    return (
        f"{version} {status} {_REASONS.get(status, 'Unknown')}\r\n{lines}"
        f"Content-Length: {length}\r\nDate: {rfc822_formatted_time()}\r\n{connection}\r\n"
    ).encode("latin-1")


class WholeResponse(web.StreamResponse):
    """A complete response (status, headers, body) written in one go when aiohttp prepares it.

    aiohttp's request loop calls `prepare` then `write_eof`; `prepare` writes everything and
    marks the response sent, so `write_eof` has nothing left to do. Keep-alive follows the
    request, as with aiohttp's own responses.
    """

    def __init__(self, status: int, body: bytes, headers: Iterable[tuple[str, str]]) -> None:
        super().__init__(status=status)
        self._whole_body = body
        self._whole_lines = header_lines(headers)  # checked here: a bad one fails the handler

    @property
    def body(self) -> bytes:
        """The body this response sends."""
        return self._whole_body

    async def prepare(self, request: web.BaseRequest) -> None:
        if self._eof_sent:  # aiohttp's own flag for a response already written
            return
        keep_alive = request.keep_alive if self._keep_alive is None else self._keep_alive
        body = b"" if request.method == "HEAD" else self._whole_body
        head = head_bytes(
            self.status,
            # the configured Server header line, "" by default (proxyd/server/connection.py)
            self._whole_lines + getattr(request.protocol, "server_line", ""),
            len(self._whole_body),
            http10=request.version < (1, 1),
            keep_alive=keep_alive,
        )
        self._keep_alive = keep_alive
        self._eof_sent = True
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away before the response")
        transport.write(head + body)

    async def write_eof(self, data: bytes = b"") -> None:
        return
