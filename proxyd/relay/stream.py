"""Stream relay: one upstream SSE answer to the client, event by event, as the provider sends it.

Each upstream read is split, transformed and written to the client's transport from inside the
upstream parser's callback (the h1 client's, or aiohttp's through `_Tap`); nothing is buffered,
parsed beyond the usage scan, or kept past it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.helpers import _EXC_SENTINEL
from multidict import CIMultiDict

from proxyd.errors import ErrorType
from proxyd.protocol.sse import EventSplitter, framing
from proxyd.relay.exchange import Exchange, StreamTransform, stream_failure
from proxyd.upstream.attempt import Streaming, as_os_error
from proxyd.upstream.h1 import H1Error

if TYPE_CHECKING:
    from proxyd.relay.outcome import Outcome


class _IdleWatch:
    """Breaks a stream whose upstream sent nothing for `timeout` seconds.

    One timer per stream, re-armed only when it fires: a read costs one store of the loop time
    (aiohttp's own read timeout cancels and re-creates a timer on every read).
    """

    __slots__ = ("_expire", "_handle", "_loop", "_timeout", "last")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float, expire: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._timeout = timeout
        self._expire = expire  # ends the stream with a timeout
        self.last = loop.time()
        self._handle: asyncio.TimerHandle | None = loop.call_at(self.last + timeout, self._check)

    def _check(self) -> None:
        due = self.last + self._timeout
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self._handle = None
        self._expire()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _ClientGone(ConnectionResetError):
    """The client's connection closed while its stream was being relayed."""


class _Pipe:
    """Carries one stream from the upstream's body to the client's transport, a read at a time.

    `feed` is the whole per-read path: split into events, transform, frame and write. It runs
    either from aiohttp's response parser directly (`_Tap`) or from the relay task's read loop.
    It never raises: how the stream ended (`error`, `client_gone`) is kept for the task, which
    is woken through `waiter` when the stream ends or the client stops reading.
    """

    __slots__ = (
        "client_gone",
        "ended",
        "error",
        "frame",
        "loop",
        "outcome",
        "paused",
        "protocol",
        "splitter",
        "transform",
        "transport",
        "upstream",
        "waiter",
        "watch",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transform: StreamTransform,
        outcome: Outcome,
        transport: asyncio.Transport,
        protocol: Any,
        watch: _IdleWatch,
        frame: Callable[[bytes], bytes],
    ) -> None:
        self.loop = loop
        self.frame = frame  # chunked for HTTP/1.1, as is for 1.0 (chosen once per response)
        self.transform = transform
        self.splitter = EventSplitter()
        self.outcome = outcome
        self.transport = transport
        self.protocol = protocol  # the client connection's aiohttp protocol (its write pause)
        self.watch = watch
        self.upstream: Any = None  # the upstream connection's protocol, when fed by `_Tap`
        self.waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.paused = False
        self.client_gone = False
        self.error: BaseException | None = None

    def feed(self, data: bytes) -> None:
        if self.ended:
            return
        self.watch.last = now = self.loop.time()
        try:
            events = self.transform.feed(self.splitter.feed(data))
        except Exception as exc:  # noqa: BLE001 - not swallowed: the relay task re-raises it
            self.end(exc)
            return
        if not events:
            return
        if self.outcome.first_byte_at is None:
            self.outcome.first_byte(now)
        transport = self.transport
        if transport.is_closing():
            self.client_gone = True
            self.end(_ClientGone("the client left"))
            return
        transport.write(self.frame(events[0] if len(events) == 1 else b"".join(events)))
        if self.protocol.writing_paused and not self.paused:  # the client is not reading
            self.paused = True
            if self.upstream is not None:
                self.upstream.pause_reading()
            self._wake()

    def end(self, error: BaseException | None) -> None:
        if not self.ended:
            self.ended = True
            self.error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until the stream ends or the client stops reading."""
        if self.ended or self.paused:
            return
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


# Every stream being relayed through `_Tap`, by the id of its aiohttp reader.
_PIPES: dict[int, _Pipe] = {}


class _Tap(aiohttp.StreamReader):
    """aiohttp's body reader turned into a pipe: each decoded read goes to the stream's `_Pipe`.

    A stream's reader is switched to this class once its headers are in, so every later read is
    relayed from inside aiohttp's parser callback: no buffering, no future and no task wake-up
    per read. End of body and errors still take aiohttp's own path (the connection goes back to
    the pool as usual); only the buffering is bypassed. The relay falls back to reading with
    `readany` whenever the reader is not exactly aiohttp's `StreamReader`.
    """

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        pipe = _PIPES.get(id(self))
        if pipe is not None and data:
            pipe.feed(data)
        return False

    def begin_http_chunk_receiving(self) -> None:
        """Chunk boundaries only matter to a buffered reader."""

    def end_http_chunk_receiving(self) -> None:
        """Chunk boundaries only matter to a buffered reader."""

    def feed_eof(self) -> None:
        super().feed_eof()
        pipe = _PIPES.get(id(self))
        if pipe is not None:
            pipe.end(None)

    def set_exception(self, exc: BaseException, exc_cause: BaseException = _EXC_SENTINEL) -> None:
        super().set_exception(exc, exc_cause)
        pipe = _PIPES.get(id(self))
        if pipe is not None:
            pipe.end(exc)


def _expiry(resp: aiohttp.ClientResponse | Streaming) -> Callable[[], None]:
    """How the idle watch ends this stream with a timeout."""
    if isinstance(resp, Streaming):
        body = resp.body
        return lambda: body.abort(H1Error("no data from the upstream", timeout=True))
    content = resp.content
    return lambda: content.set_exception(aiohttp.ServerTimeoutError("no data from the upstream"))


def can_tap(resp: aiohttp.ClientResponse) -> bool:
    """Whether the response's reader can become a `_Tap` (aiohttp's plain, undecoded reader)."""
    return type(resp.content) is aiohttp.StreamReader and resp.connection is not None


def _ended_by(pipe: _Pipe) -> Callable[[H1Error | None], None]:
    """An h1 stream's end, handed to `pipe` in the terms the relay handles for either client."""

    def end(error: H1Error | None) -> None:
        pipe.end(None if error is None else as_os_error(error))

    return end


async def _pump(resp: aiohttp.ClientResponse | Streaming, pipe: _Pipe) -> None:
    """Run the stream through `pipe` until its end; raise what ended it, if not a clean end."""
    if isinstance(resp, Streaming):  # the h1 client calls the pipe from its parser directly
        pipe.upstream = resp.body
        resp.body.attach(pipe.feed, _ended_by(pipe))
        await _follow(pipe)
        if pipe.error is not None:
            raise pipe.error
        return
    content = resp.content
    tapped = can_tap(resp)
    if tapped:
        # Switched synchronously with draining what aiohttp already buffered: nothing can
        # arrive in between, so order is kept.
        pipe.upstream = resp.connection.protocol if resp.connection is not None else None
        content.__class__ = _Tap
        _PIPES[id(content)] = pipe
        buffered = content.read_nowait(-1)
        if buffered:
            pipe.feed(buffered)
        if content.is_eof() or content.exception() is not None:
            pipe.end(content.exception())
    try:
        if tapped:
            await _follow(pipe)
        else:
            while not pipe.ended:
                data = await content.readany()
                if not data:
                    pipe.end(None)
                    break
                pipe.feed(data)
                await _unpause(pipe)
    finally:
        if tapped:
            del _PIPES[id(content)]
    if pipe.error is not None:
        raise pipe.error


async def _follow(pipe: _Pipe) -> None:
    """Wait while the upstream's parser feeds `pipe` itself; drain a client that fell behind."""
    while not pipe.ended:
        await pipe.wait()
        await _unpause(pipe)


async def _unpause(pipe: _Pipe) -> None:
    if pipe.paused and not pipe.ended:
        await pipe.protocol._drain_helper()  # what aiohttp's writer awaits to drain
        pipe.paused = False
        if pipe.upstream is not None:
            pipe.upstream.resume_reading()  # may feed held-back reads right here


async def relay_stream(
    request: web.Request,
    exchange: Exchange,
    resp: aiohttp.ClientResponse | Streaming,
    outcome: Outcome,
    headers: CIMultiDict[str],
) -> web.StreamResponse:
    """Relay an upstream SSE answer whose headers are in; `outcome` learns how it ended."""
    headers["Content-Type"] = (
        resp.headers["Content-Type"] if not exchange.translated else "text/event-stream"
    )
    headers["Cache-Control"] = "no-cache"
    headers["X-Accel-Buffering"] = "no"
    response = web.StreamResponse(status=resp.status, headers=headers)
    loop = asyncio.get_running_loop()
    transform = exchange.stream()
    outcome.streaming(transform.scanner)
    writing = False
    watch = _IdleWatch(loop, exchange.channel.chunk_timeout, _expiry(resp))
    pipe: _Pipe | None = None
    try:
        await response.prepare(request)
        outcome.deliver(resp.status)
        # Events go straight to the client's transport, framed as aiohttp would frame them;
        # aiohttp's writer still ends the response. A client that does not read pauses us.
        transport, protocol = request.transport, request.protocol
        if transport is None:
            raise ConnectionResetError("the client left")
        frame = framing(request.version >= (1, 1))  # what aiohttp's writer negotiated
        pipe = _Pipe(loop, transform, outcome, transport, protocol, watch, frame)
        await _pump(resp, pipe)
        if pipe.splitter.pending():
            raise aiohttp.ClientPayloadError("the stream ended inside an event")
        tail, complete = transform.finish()
        outcome.saw_usage(transform.usage())
        if not complete:
            outcome.fail(ErrorType.UPSTREAM_RESET, 502)
        writing = True
        if tail:
            await response.write(b"".join(tail))
        await response.write_eof()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        resp.close()
        gone = writing or (pipe is not None and pipe.client_gone)
        if gone or request.transport is None or request.transport.is_closing():
            outcome.client_left()
            return response
        err = stream_failure(isinstance(exc, TimeoutError))
        outcome.fail(err.error_type, err.status)
        try:
            await response.write(b"".join(transform.fail(err)))
            await response.write_eof()
        except (OSError, aiohttp.ClientError):
            pass
    finally:
        watch.cancel()
        resp.release()
    return response
