"""HTTP/1.1 on one connection: the request head, and the answer parsed by httptools.

A connection is reusable only after a complete keep-alive answer with nothing more on the wire.
Never logs, keeps or inspects a body.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import cast
from urllib.parse import urlsplit

import httptools

from proxyd.upstream.h1.errors import H1Error, PoolClosed, ProtocolError, ReadTimeout


class BadTarget(ValueError):
    """A URL or header this client cannot send (not http(s), or a CR/LF in a header)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL's requests go: the pool key and the request line's fixed parts."""

    host: str
    port: int
    tls: bool
    path: bytes
    host_header: bytes


@dataclass(slots=True)
class Answer:
    """A complete upstream answer."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def target_of(url: str) -> Target:
    """The parsed `url`: host, port, TLS, path with query, Host header."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadTarget(f"not an http(s) URL: {parts.scheme}://{parts.hostname or ''}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == (443 if tls else 80) else f"{shown}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(host, port, tls, path.encode("ascii"), host_header.encode("idna"))


_OWN_HEADERS = frozenset(("host", "content-length", "transfer-encoding", "connection"))


def request_head(
    target: Target, headers: dict[str, str], length: int, *, absolute: bool = False
) -> bytes:
    """The request line and headers of a POST of `length` bytes; refuses CR/LF in a header.

    Header names are case-insensitive: of two that differ only in case the later wins. The
    framing headers are this client's own. `absolute` writes the request line's target in
    absolute form (`http://host/path`), as a plain-http request through an HTTP proxy needs.
    """
    merged: dict[str, tuple[str, str]] = {}
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise BadTarget(f"header {name!r} cannot be sent")
        lower = name.lower()
        if lower not in _OWN_HEADERS:
            merged[lower] = (name, value)
    path = b"http://" + target.host_header + target.path if absolute else target.path
    lines = [b"POST ", path, b" HTTP/1.1\r\nHost: ", target.host_header]
    for name, value in merged.values():
        lines += (b"\r\n", name.encode("latin-1"), b": ", value.encode("latin-1"))
    lines += (b"\r\nContent-Length: ", str(length).encode(), b"\r\n\r\n")
    return b"".join(lines)


# A pool key: host, port, the TLS context (None for plain HTTP) and the proxy URL (None for a
# direct connection). Connections made with one context (verifying, or not) or through one
# proxy are never handed to a request that asked for another.
Key = tuple[str, int, ssl.SSLContext | None, str | None]


class State(Enum):
    """Where a connection is in its life. One exchange runs NEW or IDLE → WAITING → BODY →
    DONE → IDLE (back in the pool); CLOSED is final, from anywhere."""

    NEW = "new"  # connected, no request yet
    WAITING = "waiting"  # a request was written; its answer's head has not arrived
    BODY = "body"  # the head is in; the body is arriving
    DONE = "done"  # the answer is complete; not yet given back
    IDLE = "idle"  # in the pool, waiting for the next request
    CLOSED = "closed"


# The most bytes read while an answer's head is incomplete (h11, httpcore's parser, allows
# 16 KiB; providers send 1-3 KiB). httptools buffers a header line however long it grows.
MAX_HEAD = 64 * 1024


class _PastTheAnswer(Exception):
    """Raised in the parser's callback when a second answer begins: httptools stops there and
    raises HttpParserCallbackError from feed_data. The exchange is complete; the connection,
    whose wire is not clean, closes."""


# The states data_received tests on every read, as module globals: in Python 3.11 an Enum
# member looked up on its class (State.BODY) costs ~60 ns, a global ~5. BODY is tested first.
_WAITING = State.WAITING
_BODY = State.BODY
_NEW, _DONE, _IDLE, _CLOSED = State.NEW, State.DONE, State.IDLE, State.CLOSED  # per exchange


class Connection(asyncio.Protocol):
    """One upstream connection: writes a request, parses the answer with httptools.

    Its life is one `State`; the per-answer facts beside it (keep-alive, a body that ends at
    close) are the HTTP parser's, reset for each exchange.
    """

    __slots__ = (
        "_body",
        "_end_error",
        "_ended",
        "_head_bytes",
        "_headers",
        "_keep_alive",
        "_last_read",
        "_lost_idle",
        "_on_data",
        "_on_end",
        "_parser",
        "_paused",
        "_read_timeout",
        "_status",
        "_stream",
        "_timer",
        "_until_close",
        "_waiter",
        "counted",
        "idle_since",
        "key",
        "loop",
        "state",
        "transport",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        key: Key,
        lost_idle: Callable[[Connection], None],
    ) -> None:
        self.loop = loop
        self.key = key
        self._lost_idle = lost_idle  # the pool's: an idle connection the upstream closed
        self.transport: asyncio.Transport | None = None
        self.state = _NEW
        self.counted = True  # still counted in the pool's open connections
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._paused = False  # reading paused for a client that fell behind
        self._waiter: asyncio.Future[Answer] | None = None
        self._reset()

    def _reset(self, stream: bool = False) -> None:
        self._stream = stream  # the waiter resolves at the head; the body goes to a sink
        self._on_data: Callable[[bytes], None] | None = None
        self._on_end: Callable[[H1Error | None], None] | None = None
        self._ended = False
        self._end_error: H1Error | None = None
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._keep_alive = False
        self._until_close = True  # no Content-Length and not chunked: the body ends at close
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout = 0.0
        self._head_bytes = 0  # bytes read while the head was awaited (1xx heads included)

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio subclass

    def data_received(self, data: bytes) -> None:
        state = self.state
        head = state is not _BODY
        if head:
            if state is not _WAITING:  # bytes nobody asked for
                self.close()
                return
            self._head_bytes += len(data)
        if self._timer is not None:  # only the head (or a whole answer) has a read timeout
            self._last_read = self.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:  # or _PastTheAnswer, from a callback
            self._fail(ProtocolError(f"malformed upstream answer: {exc}", status=self._status))
            self.close()
            return
        if head and self._head_bytes > MAX_HEAD and self.state is _WAITING:  # no end in sight
            self._fail(ProtocolError("the upstream's answer head is too large"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        was, self.state = self.state, _CLOSED
        self.transport = None
        if self._waiter is None:  # in the pool (or on its way out of it): out at once
            self._lost_idle(self)
            return
        if was is _DONE or was is _CLOSED:  # complete, or closed by us (who told it)
            return
        if was is _BODY and self._until_close:  # the upstream ended a read-until-close body
            self._finish()
            return
        self._fail(ProtocolError("the upstream closed the connection", status=self._status))

    # -- httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.state is _DONE:  # an answer past the answer, in the same read: stop the
            raise _PastTheAnswer  # parser before its headers or body reach the caller

    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.decode("latin-1")
        ln = n.lower()
        if ln == "content-length" or (ln == "transfer-encoding" and b"chunked" in value.lower()):
            self._until_close = False
        self._headers.append((n, value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._status = status = self._parser.get_status_code()
        if status >= 200 and self.state is _WAITING:
            self.state = _BODY
        if self._stream and status >= 200:  # the head is what a stream's caller waits for
            self._cancel_timer()
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(Answer(status, self._headers, b""))

    def on_body(self, body: bytes) -> None:
        on_data = self._on_data
        if on_data is not None:
            on_data(body)
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200:  # an interim 1xx answer: the real one follows
            self._reset_answer()
            return
        self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it after this call
        self._finish()

    # -- one exchange ---------------------------------------------------------------------------
    def _reset_answer(self) -> None:
        self._status = 0
        self._headers = []
        self._body = []
        self._until_close = True

    def _finish(self) -> None:
        if self.state is not _CLOSED:
            self.state = _DONE
        self._cancel_timer()
        if self._stream:
            self._end(None)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            waiter.set_result(Answer(self._status, self._headers, body))

    def _fail(self, exc: H1Error) -> None:
        self._cancel_timer()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        elif self._stream:
            self._end(exc)

    def _end(self, error: H1Error | None) -> None:
        """A stream's body ended (cleanly when `error` is None): tell the sink, once."""
        if self._ended:
            return
        self._ended = True
        self._end_error = error
        if self._on_end is not None:
            self._on_end(error)

    # -- a stream's body --------------------------------------------------------------------------
    def attach(
        self, on_data: Callable[[bytes], None], on_end: Callable[[H1Error | None], None]
    ) -> None:
        """Send the rest of a stream's body to `on_data`, what arrived with the head first, and
        its end to `on_end` (once)."""
        self._on_data, self._on_end = on_data, on_end
        if self._body:
            early = b"".join(self._body)
            self._body = []
            on_data(early)
        if self._ended:
            on_end(self._end_error)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and self._paused:
            self._paused = False
            self.transport.resume_reading()

    def abort(self, error: H1Error) -> None:
        """Give up on the exchange: the sink (or waiter) learns `error`; the connection closes."""
        self._fail(error)
        self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_read(self) -> None:
        """The per-read timer: re-armed while reads keep coming, else the request times out."""
        self._timer = None
        due = self._last_read + self._read_timeout
        if due > self.loop.time():
            self._timer = self.loop.call_at(due, self._check_read)
            return
        self._fail(ReadTimeout("the upstream did not answer in time", status=self._status))
        self.close()

    def send(
        self, head: bytes, body: bytes, read_timeout: float | None, *, stream: bool = False
    ) -> asyncio.Future[Answer]:
        """Write one request; the future resolves with the answer or an H1Error.

        With `stream` it resolves at the answer's head (its body empty; see `attach`), and
        `read_timeout` bounds only the wait for that head.
        """
        self._reset(stream)
        self.state = _WAITING
        if self._paused:  # a stream that ended in the read that paused it: read again
            self.resume_reading()
        waiter = self._waiter = self.loop.create_future()
        assert self.transport is not None
        self.transport.writelines((head, body))
        if read_timeout is not None:
            self._read_timeout = read_timeout
            self._last_read = now = self.loop.time()
            self._timer = self.loop.call_at(now + read_timeout, self._check_read)
        return waiter

    def reusable(self) -> bool:
        """Whether the last exchange ended cleanly on a connection both sides keep open."""
        return (
            self.state is _DONE
            and self._keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
        )

    @property
    def closed(self) -> bool:
        return self.state is _CLOSED

    def release(self) -> None:
        """The exchange is over: back to IDLE (the pool keeps it, or closes it)."""
        self._waiter = None
        if self.state is not _CLOSED:
            self.state = _IDLE

    def close(self) -> None:
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.close()

    def terminate(self) -> None:
        """Close at once, dropping whatever is unsent (a connection still busy at shutdown); an
        exchange in progress learns PoolClosed, never a clean end."""
        state = self.state
        if state is _WAITING or state is _BODY:
            self._fail(PoolClosed("the upstream pool was closed", status=self._status))
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()
