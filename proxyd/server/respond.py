"""The response writer: whole responses written in one transport write, and the flow control a
relayed stream writes through.

For answers whose body is known up front (refusals, errors, whole upstream answers): the status
line, headers and body go out in one write instead of aiohttp's header machinery. A stream is
aiohttp's StreamResponse whose events go straight to the transport through `FlowControl`.

With `proxyd/server/connection.py`, the only module that touches aiohttp's server internals:
here a response's sent flags (`StreamResponse._eof_sent`, `_keep_alive`) and the protocol's
write pause (`writing_paused`, `_drain_helper`): the first only in `WholeResponse.prepare`,
the second only in `FlowControl`; guarded by tests/test_connection_internals.py. Never logs
or keeps a body.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time

from proxyd.relay.relay import Reply, WholeReply

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


class FlowControl:
    """A client connection as a stream writer sees it, in uvicorn's FlowControl manner: write
    bytes, tell whether the client stopped reading (the transport's write buffer is over its
    high-water mark) or left, and wait until it drains.

    Built from a prepared response's request; `write` and `is_closing` are the transport's
    own bound methods, so a stream's per-event path pays no extra call for them.
    """

    __slots__ = ("_protocol", "is_closing", "write")

    def __init__(self, request: web.BaseRequest) -> None:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("the client left")
        self.write = transport.write
        self.is_closing = transport.is_closing
        self._protocol = request.protocol  # aiohttp's RequestHandler: its write pause

    @property
    def paused(self) -> bool:
        """Whether the client stopped reading (writing is paused on its connection)."""
        return bool(self._protocol.writing_paused)

    async def drain(self) -> None:
        """Until the client has read enough that writing may go on (what aiohttp's own
        writer awaits)."""
        await self._protocol._drain_helper()


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
        if self._eof_sent:  # aiohttp's own flag: its request loop prepares it again
            return
        keep_alive = request.keep_alive if self._keep_alive is None else self._keep_alive
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
        transport.write(head + (b"" if request.method == "HEAD" else self._whole_body))

    async def write_eof(self, data: bytes = b"") -> None:
        return


def as_response(reply: Reply) -> web.StreamResponse:
    """The relay's reply as aiohttp's response: a whole answer becomes a WholeResponse."""
    if isinstance(reply, WholeReply):
        return WholeResponse(reply.status, reply.body, reply.headers)
    return reply
