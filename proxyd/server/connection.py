"""Client connections: a deadline per phase, a cap per process, and JSON for bad HTTP.

One of the two modules that reach into aiohttp's server internals: this one subclasses the
protocol (`RequestHandler`'s `_waiter`, `_messages`, `_request_factory`, `_request_handler`,
`_lingering_time`, `_current_request`, `_process_keepalive`, `handle_error`, `Server._kwargs`,
`Server.pre_shutdown`); the other, `proxyd/server/respond.py`, holds the response writer and
flow control. Guarded by
tests/test_connection_internals.py, which fails loudly, naming the attribute, when aiohttp
changes any of them, and by tests/test_client_deadlines.py and tests/test_server_errors.py
(black-box, against a real proxyd process). Never reads a body.

Phases of a connection and what bounds each (one timer per connection, moved only when the
phase changes, never per read):

- head: from accept (or the first byte after a response) to the end of the request head;
  `head_timeout`; past it the connection is closed (a 408 first if some of a head came).
- body: from the end of the head to the end of the body; `body_timeout`; past it the handler's
  read fails with RequestTimeout (408 in the caller's format) and the connection closes.
- idle: between a response and the next request's first byte; `idle_timeout` (aiohttp's own
  keep-alive timer, counted here).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxyd.errors import ErrorType, InvalidRequest, ProxydError, RequestTimeout
from proxyd.observability import metric_sources
from proxyd.observability.metrics import Metrics
from proxyd.server import server_errors

if TYPE_CHECKING:
    from proxyd.config import ServerSettings

Cut = Literal["head", "body", "idle"]
PHASES: tuple[Cut, ...] = ("head", "body", "idle")


_HANDSHAKE_POLL: Final = 0.01  # seconds between looks at the handshakes left, at drain only

# Where a connection is in its request cycle. Plain ints, not an Enum: they are read on every
# read of the socket, and an Enum member costs a class-attribute lookup (~150 ns) each time.
FRESH: Final = 0  # accepted, no byte yet
HEAD: Final = 1  # some of a request head came, not all of it
BODY: Final = 2  # the head is in, the body is still coming
ACTIVE: Final = 3  # the request is with its handler, or the connection waits for the next


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """The deadlines and caps of the client listener (`server.*` in the configuration)."""

    head_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 75.0
    max_connections: int = 10_000
    max_head_bytes: int = 65_536
    server_header: str | None = None

    @classmethod
    def from_config(cls, server: ServerSettings) -> ConnectionSettings:
        """The settings of `server.*`."""
        return cls(
            head_timeout=server.head_timeout_seconds,
            body_timeout=server.body_timeout_seconds,
            idle_timeout=server.idle_timeout_seconds,
            max_connections=server.max_connections,
            max_head_bytes=server.max_head_bytes,
            server_header=server.server_header,
        )


@dataclass(slots=True)
class ConnectionStats:
    """Plain numbers of one process's client listener, read by the metrics at scrape time."""

    open: int = 0
    refused: int = 0  # connections answered 503 because the process was at its cap
    cut: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    errors: dict[str, int] = field(default_factory=dict)  # server-made errors, by status

    def error(self, status: int) -> None:
        key = str(status)
        self.errors[key] = self.errors.get(key, 0) + 1

    def cut_samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        return [((phase,), float(n)) for phase, n in self.cut.items()]

    def error_samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        return [((status,), float(n)) for status, n in sorted(self.errors.items())]


_parse = RequestHandler.data_received  # called directly: no super() object on every read


class GuardedRequestHandler(RequestHandler):
    """aiohttp's server protocol with phase deadlines, a connection cap and JSON errors."""

    __slots__ = (
        "__weakref__",  # GuardedServer.accepted
        "_accepted_at",
        "_close_due",
        "_deadline",
        "_factory",
        "_head",
        "_head_size",
        "_head_timeout",
        "_made",
        "_max_head_bytes",
        "_pending",
        "_phase",
        "_settings",
        "_started",
        "_stats",
        "_timer",
        "_timer_at",
        "server_line",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        settings: ConnectionSettings,
        stats: ConnectionStats,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, keepalive_timeout=settings.idle_timeout, **kwargs)
        self._settings = settings
        self._head_timeout = settings.head_timeout
        self._max_head_bytes = settings.max_head_bytes
        self._stats = stats
        self._phase = FRESH
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._head: list[bytes] = []
        self._head_size = 0
        self._pending: BaseRequest | None = None  # the request whose body is still coming
        self._close_due = False  # the listener closed; close once the request due has started
        self._started: asyncio.Future[None] | None = None  # set when that request starts
        self._accepted_at = self._loop.time()
        self._made = False  # connection_made: at once, or once a TLS handshake ended
        factory = self._request_factory
        assert factory is not None
        self._factory = factory
        self._request_factory = self._make_request
        # read by WholeResponse (proxyd/server/respond.py) for the configured Server header
        value = settings.server_header
        self.server_line = f"Server: {value}\r\n" if value else ""

    # -- phases -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made = True
        stats = self._stats
        stats.open += 1
        if stats.open > self._settings.max_connections:
            stats.refused += 1
            self._request_handler = self._over_capacity
        self._set_deadline(self._loop.time() + self._settings.head_timeout)
        super().connection_made(transport)
        manager = self._manager
        if isinstance(manager, GuardedServer) and manager.draining:  # a TLS handshake ended
            self.close()  # at drain: its one request answered with `Connection: close`

    def handshaking(self, now: float) -> bool:
        """Accepted, its TLS handshake not over (aiohttp meets a TLS connection only after it),
        and still within the head deadline counted from the accept."""
        return not self._made and now < self._accepted_at + self._head_timeout

    def _awaiting_request(self) -> bool:
        """Accepted, and its request has not started yet (no byte, or part of its head)."""
        return (
            (self._phase == FRESH or self._phase == HEAD)
            and not self._request_in_progress
            and self.transport is not None
        )

    def close(self) -> None:
        """aiohttp's graceful close (at drain: no more requests on this connection), kept back
        while the connection's request is on its way: see `shutdown`. A request with its
        handler now answers with `Connection: close` unless its response has started, so a
        keep-alive client does not reuse the connection this close ends."""
        if self._awaiting_request():
            self._close_due = True
            return
        request = self._current_request
        if request is not None:
            request._cache["keep_alive"] = False  # BaseRequest.keep_alive is a cached property
        super().close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 - aiohttp's
        """The listener closed (drain, or a reload retiring this worker): let a request that is
        on its way start before aiohttp's shutdown, which closes every connection not busy with
        a request at once.

        A connection accepted just before the listener closed has usually been sent its request
        already (the client wrote it after the handshake): closing it would drop that request
        (the client sees the connection closed with no answer). So a connection whose request
        has not started waits, within `timeout`, for the request to begin (its head deadline
        still applies); it is then served with `Connection: close`, aiohttp's shutdown letting
        it finish within what is left of `timeout`. An idle keep-alive connection is closed at
        once, as before.
        """
        loop = self._loop
        start = loop.time()
        if self._close_due and self._awaiting_request():
            started = self._started = loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await started
            except TimeoutError:
                pass
        if self._close_due:
            self._close_due = False
            super().close()
        if timeout is not None:
            timeout = max(0.0, timeout - (loop.time() - start))
        await super().shutdown(timeout)

    def _start_due(self) -> None:
        started = self._started
        if started is not None and not started.done():
            started.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._manager is not None:  # aiohttp's own once-only guard
            self._stats.open -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = None
        self._head = []
        self._start_due()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase != HEAD:
            if phase != FRESH:
                if self._waiter is None or not data:  # body bytes, a pipelined request, or
                    _parse(self, data)  # aiohttp re-parsing what it holds
                    return
                when = self._loop.time() + self._head_timeout  # the next request's head begins
                self._deadline = when
                if self._timer is None or self._timer_at > when:
                    self._arm(when)
            self._phase = HEAD
            self._head = [data]
            self._head_size = len(data)
        elif not self._close:
            self._head.append(data)
            self._head_size += len(data)
        _parse(self, data)
        limit = self._max_head_bytes
        if self._head_size > limit and self._phase == HEAD and not self._close:
            if not self._messages:  # still incomplete, and already too large
                self._refuse(_head_too_large())
            else:  # completed by this read (a big read: body bytes too): how much was head
                end = data.find(b"\r\n\r\n")
                if self._head_size - len(data) + (end + 4 if end >= 0 else 0) > limit:
                    self._refuse(_head_too_large())

    def _make_request(
        self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any
    ) -> BaseRequest:
        """aiohttp's request factory, then: the head is in; the body may still be coming."""
        request = self._factory(message, payload, protocol, writer, task)
        if self._close_due:  # the listener has closed: the one request served, then close
            request._cache["keep_alive"] = False  # BaseRequest.keep_alive is a cached property
            self._start_due()
        if message.method != "UNKNOWN":  # aiohttp's stand-in for a head it could not parse
            self._head = []  # kept for a parse error's handle_error, to guess the wire format
        if payload.is_eof():
            self._phase = ACTIVE
        else:
            self._phase = BODY
            self._pending = request
            self._set_deadline(self._loop.time() + self._settings.body_timeout)
        return request

    def _set_deadline(self, when: float) -> None:
        self._deadline = when
        if self._timer is None or self._timer_at > when:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        if self._loop.time() < self._deadline:  # the deadline moved on since this was armed
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._on_deadline)
            return
        phase = self._phase
        if phase == FRESH:
            self._cut("head")
            self.force_close()
        elif phase == HEAD and not self._messages:
            self._cut("head")
            err = ProxydError(
                "The request head did not arrive in time.",
                status=408,
                error_type=ErrorType.CLIENT_TIMEOUT,
            )
            self._refuse(err)
        elif phase == BODY:
            self._body_deadline()

    def _body_deadline(self) -> None:
        request = self._pending
        self._pending = None
        self._phase = ACTIVE
        if request is None or request.content.is_eof():
            return
        self._cut("body")
        if not self._request_in_progress:  # answered already; aiohttp is draining the body
            self.force_close()
            return
        # The handler is waiting for the body: its read fails with RequestTimeout, which it
        # answers (408, in the caller's format) without keep-alive; then aiohttp closes.
        request._cache["keep_alive"] = False  # BaseRequest.keep_alive is a cached property
        self._lingering_time = 0.0  # no reading on after the 408
        request.content.set_exception(
            RequestTimeout(
                f"The request body did not arrive within {self._settings.body_timeout:g} seconds."
            )
        )

    def _process_keepalive(self) -> None:
        """aiohttp's idle keep-alive deadline, counted when it closes the connection."""
        closing = self._force_close
        super()._process_keepalive()
        if self._force_close and not closing:
            self._cut("head" if self._phase == HEAD else "idle")

    def _cut(self, phase: Cut) -> None:
        self._stats.cut[phase] += 1

    # -- server-made answers ------------------------------------------------------------------

    def _refuse(self, err: ProxydError) -> None:
        """Answer `err` straight on the transport (no request object exists yet) and close."""
        protocol = server_errors.wire_for_head(b"".join(self._head))
        self._head = []
        self._messages.clear()  # a head completed by this read is not handled after all
        self._stats.error(err.status)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(server_errors.error_bytes(protocol, err, self._settings.server_header))
        self.force_close()

    async def _over_capacity(self, request: BaseRequest) -> web.StreamResponse:
        self._stats.error(503)
        err = ProxydError(
            "The server has too many open connections; retry shortly.",
            status=503,
            error_type=ErrorType.OVERLOADED,
            retry_after=1,
        )
        return server_errors.error_response(
            server_errors.wire_for(request.path, request.headers), err, close=True
        )

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's error page replaced: bad HTTP (400/431) and handler failures (500/504)."""
        if request.writer.output_size > 0:  # as aiohttp: too late for another response
            raise ConnectionError("the response has started; no error page can follow")
        if isinstance(exc, HttpProcessingError):
            protocol = server_errors.wire_for_head(b"".join(self._head))
            self._head = []
            err = _parse_error(exc)
        elif isinstance(exc, ProxydError):  # e.g. RequestTimeout from a handler's body read
            protocol = server_errors.wire_for(request.path, request.headers)
            err = exc
        else:
            if status >= 500:
                self.log_exception("Error handling request", exc_info=exc)
            protocol = server_errors.wire_for(request.path, request.headers)
            err = ProxydError(
                "The server had an error while processing your request.",
                status=status,
                error_type=ErrorType.UPSTREAM_TIMEOUT if status == 504 else ErrorType.INTERNAL,
            )
        self._stats.error(err.status)
        return server_errors.error_response(protocol, err, close=True)


def _head_too_large() -> ProxydError:
    return ProxydError(
        "The request line and headers are larger than the server accepts.",
        status=431,
        error_type=ErrorType.HEADER_TOO_LARGE,
    )


def _parse_error(exc: HttpProcessingError) -> ProxydError:
    """A parse failure as the client should see it; never echoes what it sent."""
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message
    ):
        return _head_too_large()
    return InvalidRequest("The request is not valid HTTP/1.1.")


class GuardedServer(web.Server):
    """aiohttp's connection factory, making GuardedRequestHandler protocols."""

    settings: ConnectionSettings
    stats: ConnectionStats
    accepted: weakref.WeakSet[GuardedRequestHandler]  # every protocol made, from the accept on
    draining: bool  # the listener closed: every connection is served its request, then closed

    def __call__(self) -> RequestHandler:
        handler = GuardedRequestHandler(
            self, loop=self._loop, settings=self.settings, stats=self.stats, **self._kwargs
        )
        self.accepted.add(handler)
        return handler

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - aiohttp's
        """The listener closed: first let the TLS handshakes under way end (each within the head
        deadline from its accept, all within `timeout`), then drain as aiohttp does.

        A TLS connection reaches aiohttp, and the drain, only once its handshake is over. One
        accepted just before the listener closed would otherwise be left out, and the process
        would exit under it: the client's handshake reset. Once over, it is drained like a
        plain connection accepted then: its request is answered once with `Connection: close`
        (`GuardedRequestHandler.shutdown`).
        """
        loop = self._loop
        start = loop.time()
        waiting = [h for h in self.accepted if h.handshaking(start)]
        if waiting:
            limit = start + (self.settings.head_timeout if timeout is None else timeout)
            # polled every 10 ms, at drain only, until they end or their deadlines pass; each
            # one closed itself (gracefully) as its handshake ended (`connection_made`)
            while loop.time() < limit and any(h.handshaking(loop.time()) for h in waiting):  # noqa: ASYNC110
                await asyncio.sleep(_HANDSHAKE_POLL)
            if timeout is not None:
                timeout = max(0.0, timeout - (loop.time() - start))
        await super().shutdown(timeout)

    def pre_shutdown(self) -> None:
        """The listener closed: from now on a connection met (a TLS handshake ending) is one
        of the drain's, then aiohttp's graceful close of every connection."""
        self.draining = True
        super().pre_shutdown()


class ClientRunner(web.AppRunner):
    """The client listener's runner: aiohttp's AppRunner serving through GuardedServer."""

    __slots__ = ("_settings", "_stats")

    def __init__(
        self,
        app: web.Application,
        settings: ConnectionSettings,
        stats: ConnectionStats,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._settings = settings
        self._stats = stats

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = GuardedServer  # same object, our protocol factory
        assert isinstance(server, GuardedServer)
        server.settings = self._settings
        server.stats = self._stats
        server.accepted = weakref.WeakSet()
        server.draining = False
        return server


def install(
    app: web.Application, metrics: Metrics, stats: ConnectionStats, server_header: str | None
) -> None:
    """Wire the client app for this module: JSON 404/405 for unmatched requests, the `Server`
    header as configured (absent by default), and the connection metrics."""

    async def unmatched_last(app: web.Application) -> None:  # after every factory route
        server_errors.add_unmatched_route(app)

    app.on_startup.append(unmatched_last)
    app.on_response_prepare.append(server_errors.server_header_hook(server_header))
    metrics.add_source(metric_sources.CLIENT_CONNECTIONS, lambda: [((), float(stats.open))])
    metrics.add_source(metric_sources.CLIENT_CONNECTIONS_CUT, stats.cut_samples)
    metrics.add_source(
        metric_sources.CLIENT_CONNECTIONS_REFUSED, lambda: [((), float(stats.refused))]
    )
    metrics.add_source(metric_sources.CLIENT_ERRORS, stats.error_samples)
