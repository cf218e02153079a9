"""Stream relay: one upstream SSE answer to the client, event by event, as the provider sends it.

Each upstream read is split, transformed and written to the client's transport from inside the
h1 client's parser callback; nothing is buffered, parsed beyond the usage scan, or kept past it.
How a stream that breaks ends (an error event, or nothing more for a client that left) is
`failover.decide`'s call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from multidict import CIMultiDict

from proxyd.errors import ErrorType
from proxyd.protocol.sse import EventSplitter, framing
from proxyd.relay.exchange import Exchange, StreamTransform, stream_failure
from proxyd.relay.failover import Attempt, Verdict, decide
from proxyd.upstream.attempt import Streaming
from proxyd.upstream.failures import AttemptFailed, AttemptKind

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


class ClientFlow(Protocol):
    """The client's connection as the stream writes to it (`proxyd.server.respond.FlowControl`
    is the one proxyd uses; the relay never touches aiohttp's internals itself)."""

    def write(self, data: bytes) -> None: ...
    def is_closing(self) -> bool: ...
    @property
    def paused(self) -> bool: ...
    async def drain(self) -> None: ...


FlowFor = Callable[[web.BaseRequest], ClientFlow]
"""How the relay gets a prepared response's client flow (raises ConnectionError if it left)."""


class ClientGone(Exception):
    """The client's connection closed while its stream was being relayed."""


class _Pipe:
    """Carries one stream from the upstream's body to the client's transport, a read at a time.

    `feed` is the whole per-read path: split into events, transform, frame and write. It runs
    from the h1 client's parser callback. It never raises: how the stream ended (`error`,
    `client_gone`) is kept for the task, which is woken through `waiter` when the stream ends
    or the client stops reading.
    """

    __slots__ = (
        "client_gone",
        "ended",
        "error",
        "flow",
        "frame",
        "loop",
        "outcome",
        "paused",
        "splitter",
        "transform",
        "upstream",
        "waiter",
        "watch",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transform: StreamTransform,
        outcome: Outcome,
        flow: ClientFlow,
        watch: _IdleWatch,
        frame: Callable[[bytes], bytes],
    ) -> None:
        self.loop = loop
        self.frame = frame  # chunked for HTTP/1.1, as is for 1.0 (chosen once per response)
        self.transform = transform
        self.splitter = EventSplitter()
        self.outcome = outcome
        self.flow = flow  # the client's connection: write, its write pause, whether it left
        self.watch = watch
        self.upstream: Streaming | None = None  # paused while the client does not read
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
        flow = self.flow
        if flow.is_closing():
            self.client_gone = True
            self.end(ClientGone("the client left"))
            return
        flow.write(self.frame(events[0] if len(events) == 1 else b"".join(events)))
        if flow.paused and not self.paused:  # the client is not reading
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


async def _pump(resp: Streaming, pipe: _Pipe) -> None:
    """Relay `resp`'s body through `pipe` to its end; raise what broke it, if anything did."""
    pipe.upstream = resp
    resp.attach(pipe.feed, pipe.end)  # the h1 client calls the pipe from its parser
    while not pipe.ended:  # the parser feeds the pipe; this task only drains a slow client
        await pipe.wait()
        await _unpause(pipe)
    if pipe.error is not None:
        raise pipe.error
    if pipe.splitter.pending():
        raise AttemptFailed(AttemptKind.RESET)  # the stream ended inside an event


async def _unpause(pipe: _Pipe) -> None:
    if pipe.paused and not pipe.ended:
        await pipe.flow.drain()
        pipe.paused = False
        if pipe.upstream is not None:
            pipe.upstream.resume_reading()  # may feed held-back reads right here


async def relay_stream(
    request: web.Request,
    exchange: Exchange,
    resp: Streaming,
    outcome: Outcome,
    headers: CIMultiDict[str],
    flow_for: FlowFor,
) -> web.StreamResponse:
    """Relay an upstream SSE answer whose head is in; `outcome` learns how it ended."""
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
    watch = _IdleWatch(loop, exchange.channel.chunk_timeout, resp.stall)
    pipe: _Pipe | None = None
    try:
        await response.prepare(request)
        outcome.deliver(resp.status)
        # Events go straight to the client's transport, framed as aiohttp would frame them;
        # aiohttp's writer still ends the response. A client that does not read pauses us.
        frame = framing(request.version >= (1, 1))  # what aiohttp's writer negotiated
        pipe = _Pipe(loop, transform, outcome, flow_for(request), watch, frame)
        await _pump(resp, pipe)
        tail, complete = transform.finish()
        outcome.saw_usage(transform.usage())
        if not complete:
            outcome.fail(ErrorType.UPSTREAM_RESET, 502)
        writing = True
        if tail:
            await response.write(b"".join(tail))
        await response.write_eof()
    except (AttemptFailed, ClientGone, ConnectionError) as exc:
        # ConnectionError: aiohttp's own writes to a client that left
        resp.close()
        if writing or pipe is None or pipe.client_gone or pipe.flow.is_closing():
            kind = AttemptKind.CLIENT_GONE
        else:
            kind = exc.kind if isinstance(exc, AttemptFailed) else AttemptKind.CLIENT_GONE
        verdict = decide(Attempt(kind, resp.status, client_started=outcome.delivered))
        if verdict is Verdict.STOP:
            outcome.client_left()
            return response
        err = stream_failure(kind)  # END_STREAM: an error event ends what the client has
        outcome.fail(err.error_type, err.status)
        try:
            await response.write(b"".join(transform.fail(err)))
            await response.write_eof()
        except ConnectionError:
            pass
    finally:
        watch.cancel()
        resp.release()
    return response
