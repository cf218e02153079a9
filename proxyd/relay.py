"""Relay: send a call to a channel and pass its answer back, event by event, byte for byte.

The only module that touches the aiohttp client. It retries only while nothing has reached the
client, never reads on after the client left, and never keeps, logs or inspects a body beyond
the usage scan.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from aiohttp.helpers import _EXC_SENTINEL
from multidict import CIMultiDict, CIMultiDictProxy

from proxyd.call import Call
from proxyd.config import UpstreamSettings
from proxyd.errors import ErrorType
from proxyd.exchange import Exchange, StreamTransform, stream_failure
from proxyd.failover import (
    Attempt,
    AttemptKind,
    RetryBudget,
    Verdict,
    classify,
    decide,
    final_failure,
)
from proxyd.health import ChannelHealth
from proxyd.route import Router
from proxyd.sse import EventSplitter
from proxyd.state import Channel
from proxyd.usage import StreamUsage, Usage, completion_text

_MAX_ERROR_BODY = 1 << 20


@dataclass(slots=True)
class Outcome:
    """What happened to one request, filled in as it goes; the billing row is made from it."""

    channel_id: str | None = None
    upstream_model: str | None = None
    status: int = 0
    error_type: ErrorType | None = None
    usage: Usage | None = None
    response_text: str | None = None  # a non-stream answer without usage, to count offline
    scanner: StreamUsage | None = None
    first_byte_at: float | None = None  # loop time when the first byte went to the client
    attempts: int = 0
    sent: bool = False  # whether anything reached the client
    tried: list[str] = field(default_factory=list)


class Upstream:
    """The one shared client session whose pool carries every upstream request."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, float | None], aiohttp.ClientTimeout] = {}
        self._insecure = ssl.create_default_context()
        self._insecure.check_hostname = False
        self._insecure.verify_mode = ssl.CERT_NONE

    async def start(self) -> None:
        """Open the pool; call once from the app's cleanup context."""
        connector = aiohttp.TCPConnector(
            limit=self.settings.pool_size,
            limit_per_host=self.settings.pool_size_per_host,
            keepalive_timeout=self.settings.keepalive_seconds,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("User-Agent",),
            # Many clients share this session: a cookie one provider answer sets must never
            # ride along on another client's request (and no jar is cheaper per request).
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        """Close the pool (waits for the connections to close)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream session is not started")
        return self._session

    def timeout_for(self, connect: float, read: float | None) -> aiohttp.ClientTimeout:
        """The client timeout for these limits, built once (channels share a handful of them)."""
        key = (connect, read)
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, sock_connect=connect, sock_read=read
            )
        return timeout

    def ssl_for(self, channel: Channel) -> ssl.SSLContext | bool:
        """TLS verification stays on unless the channel turns it off."""
        return True if channel.verify_tls else self._insecure


def client_headers_for(upstream: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    """Response headers for the client: the content type and proxyd's own; nothing hop-by-hop."""
    out: CIMultiDict[str] = CIMultiDict()
    out["Content-Type"] = upstream.get("Content-Type", "application/json")
    out["x-request-id"] = request_id
    upstream_id = upstream.get("x-request-id") or upstream.get("request-id")
    if upstream_id:
        out["x-upstream-request-id"] = upstream_id
    return out


class AttemptFailed(Exception):
    """One attempt failed before anything reached the client; another channel may serve."""

    def __init__(
        self,
        error_type: ErrorType,
        status: int | None = None,
        body: bytes | None = None,
        headers: CIMultiDictProxy[str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(error_type.value)
        self.error_type = error_type
        self.status = status
        self.body = body
        self.headers = headers
        self.retry_after = retry_after


def retry_after_seconds(headers: Mapping[str, str], now: float) -> float | None:
    """A provider's `Retry-After`, in seconds from `now` (unix time): delay-seconds or HTTP-date."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; an unzoned one is taken as such
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


async def open_attempt(
    upstream: Upstream, exchange: Exchange, credential: str, client_headers: Mapping[str, str]
) -> aiohttp.ClientResponse:
    """Send the request and wait for the response headers; raise AttemptFailed when retryable."""
    channel = exchange.channel
    url, headers, body = exchange.request(credential, client_headers)
    stream = exchange.call.stream
    # A stream's gaps are watched by `_IdleWatch` (one timer per stream, not one per read); a
    # whole answer is bounded per read by first_byte_timeout, which also covers its headers.
    timeout = upstream.timeout_for(
        channel.connect_timeout, None if stream else channel.first_byte_timeout
    )
    sending = upstream.session.post(
        url,
        data=body,
        headers=headers,
        timeout=timeout,
        proxy=channel.proxy,
        ssl=upstream.ssl_for(channel),
        allow_redirects=False,
    )
    try:
        if stream:
            async with asyncio.timeout(channel.first_byte_timeout):
                resp = await sending
        else:
            resp = await sending
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise AttemptFailed(ErrorType.UPSTREAM_TIMEOUT) from None
    except (aiohttp.ClientError, OSError):
        raise AttemptFailed(ErrorType.UPSTREAM_CONNECT) from None
    if resp.status == 429 or resp.status >= 500:
        try:
            data = await resp.content.read(_MAX_ERROR_BODY)
        except (aiohttp.ClientError, OSError, TimeoutError):
            data = b""
        finally:
            resp.close()
        raise AttemptFailed(
            ErrorType.UPSTREAM_ERROR,
            resp.status,
            exchange.error_body(resp.status, data),
            resp.headers,
            retry_after_seconds(resp.headers, time.time()),
        )
    return resp


async def deliver(
    request: web.Request,
    exchange: Exchange,
    resp: aiohttp.ClientResponse,
    outcome: Outcome,
    request_id: str,
    extra_headers: Mapping[str, str],
) -> web.StreamResponse:
    """Pass a chosen upstream response to the client; `resp` is always released."""
    headers = client_headers_for(resp.headers, request_id)
    headers.update(extra_headers)
    outcome.status = resp.status
    is_sse = resp.headers.get("Content-Type", "").startswith("text/event-stream")
    if exchange.call.stream and is_sse and resp.status < 400:
        return await _stream(request, exchange, resp, outcome, headers)
    try:
        if exchange.call.stream:  # no per-read timeout on stream calls: bound the whole body
            async with asyncio.timeout(exchange.channel.chunk_timeout):
                raw = await resp.read()
        else:
            raw = await resp.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        resp.close()
        raise stream_failure(isinstance(exc, TimeoutError)) from None
    finally:
        resp.release()
    if resp.status >= 400:
        outcome.error_type = ErrorType.UPSTREAM_CLIENT_ERROR
        body = exchange.error_body(resp.status, raw)
        if exchange.translated:
            headers["Content-Type"] = "application/json"
    else:
        body, outcome.usage = exchange.body(raw)
        if outcome.usage is None:
            outcome.response_text = completion_text(body)
        if exchange.translated:
            headers["Content-Type"] = "application/json"
    outcome.first_byte_at = asyncio.get_running_loop().time()
    outcome.sent = True
    return web.Response(body=body, status=resp.status, headers=headers)


class _IdleWatch:
    """Breaks a stream whose upstream sent nothing for `timeout` seconds.

    One timer per stream, re-armed only when it fires: a read costs one store of the loop time
    (aiohttp's own read timeout cancels and re-creates a timer on every read).
    """

    __slots__ = ("_content", "_handle", "_loop", "_timeout", "last")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float, content: aiohttp.StreamReader
    ) -> None:
        self._loop = loop
        self._timeout = timeout
        self._content = content
        self.last = loop.time()
        self._handle: asyncio.TimerHandle | None = loop.call_at(self.last + timeout, self._check)

    def _check(self) -> None:
        due = self.last + self._timeout
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self._handle = None
        self._content.set_exception(aiohttp.ServerTimeoutError("no data from the upstream"))

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunked-encoding frame (what aiohttp's writer would send for `data`)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


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
    ) -> None:
        self.loop = loop
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
            self.outcome.first_byte_at = now
        transport = self.transport
        if transport.is_closing():
            self.client_gone = True
            self.end(_ClientGone("the client left"))
            return
        transport.write(_frame(events[0] if len(events) == 1 else b"".join(events)))
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


def can_tap(resp: aiohttp.ClientResponse) -> bool:
    """Whether the response's reader can become a `_Tap` (aiohttp's plain, undecoded reader)."""
    return type(resp.content) is aiohttp.StreamReader and resp.connection is not None


async def _pump(resp: aiohttp.ClientResponse, pipe: _Pipe) -> None:
    """Run the stream through `pipe` until its end; raise what ended it, if not a clean end."""
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
        while not pipe.ended:
            if tapped:
                await pipe.wait()
            else:
                data = await content.readany()
                if not data:
                    pipe.end(None)
                    break
                pipe.feed(data)
            if pipe.paused and not pipe.ended:
                await pipe.protocol._drain_helper()  # what aiohttp's writer awaits to drain
                pipe.paused = False
                if pipe.upstream is not None:
                    pipe.upstream.resume_reading()  # may feed held-back reads right here
    finally:
        if tapped:
            del _PIPES[id(content)]
    if pipe.error is not None:
        raise pipe.error


async def _stream(
    request: web.Request,
    exchange: Exchange,
    resp: aiohttp.ClientResponse,
    outcome: Outcome,
    headers: CIMultiDict[str],
) -> web.StreamResponse:
    headers["Content-Type"] = (
        resp.headers["Content-Type"] if not exchange.translated else "text/event-stream"
    )
    headers["Cache-Control"] = "no-cache"
    headers["X-Accel-Buffering"] = "no"
    response = web.StreamResponse(status=resp.status, headers=headers)
    loop = asyncio.get_running_loop()
    transform = exchange.stream()
    outcome.scanner = transform.scanner
    writing = False
    watch = _IdleWatch(loop, exchange.channel.chunk_timeout, resp.content)
    pipe: _Pipe | None = None
    try:
        await response.prepare(request)
        outcome.sent = True
        # Events go straight to the client's transport, framed as aiohttp would frame them;
        # aiohttp's writer still ends the response. A client that does not read pauses us.
        transport, protocol = request.transport, request.protocol
        if transport is None:
            raise ConnectionResetError("the client left")
        pipe = _Pipe(loop, transform, outcome, transport, protocol, watch)
        await _pump(resp, pipe)
        if pipe.splitter.pending():
            raise aiohttp.ClientPayloadError("the stream ended inside an event")
        tail, complete = transform.finish()
        outcome.usage = transform.usage()
        if not complete:
            outcome.status, outcome.error_type = 502, ErrorType.UPSTREAM_RESET
        writing = True
        if tail:
            await response.write(b"".join(tail))
        await response.write_eof()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        resp.close()
        gone = writing or (pipe is not None and pipe.client_gone)
        if gone or request.transport is None or request.transport.is_closing():
            outcome.status = 499
            outcome.error_type = ErrorType.CLIENT_DISCONNECT
            return response
        err = stream_failure(isinstance(exc, TimeoutError))
        outcome.status = err.status
        outcome.error_type = err.error_type
        try:
            await response.write(b"".join(transform.fail(err)))
            await response.write_eof()
        except (OSError, aiohttp.ClientError):
            pass
    finally:
        watch.cancel()
        resp.release()
    return response


def passthrough_error(
    last: AttemptFailed, request_id: str, extra_headers: Mapping[str, str]
) -> web.Response:
    """The last upstream error response, as the provider sent it (in the client's format)."""
    assert last.status is not None
    content_type = "application/json"
    if last.headers is not None:
        content_type = last.headers.get("Content-Type", content_type)
    headers: dict[str, Any] = {"Content-Type": content_type, "x-request-id": request_id}
    headers.update(extra_headers)
    if last.retry_after is not None:
        headers["Retry-After"] = str(int(last.retry_after + 0.999))
    return web.Response(body=last.body or b"", status=last.status, headers=headers)


class RelayObserver(Protocol):
    """Where the relay reports attempts: the metrics."""

    def failover(self, from_channel: str, reason: str) -> None: ...
    def upstream_observe(self, channel_id: str, status_class: str, seconds: float) -> None: ...


@dataclass(slots=True)
class Relay:
    """The long-lived parts the relay uses: the pool, channel health, the router, metrics."""

    upstream: Upstream
    health: ChannelHealth
    router: Router
    observer: RelayObserver


def _attempt_of(failed: AttemptFailed) -> Attempt:
    if failed.status is not None:
        return Attempt(AttemptKind.RESPONSE, failed.status)
    if failed.error_type is ErrorType.UPSTREAM_TIMEOUT:
        return Attempt(AttemptKind.TIMEOUT)
    return Attempt(AttemptKind.CONNECT_ERROR)


async def relay(
    request: web.Request,
    call: Call,
    route: tuple[Channel, ...],
    parts: Relay,
    outcome: Outcome,
    *,
    request_id: str,
    extra_headers: Mapping[str, str],
) -> web.StreamResponse:
    """Try the planned channels until one answers; failover only before the first byte.

    Whether to move on is decided in one place, `failover.decide`; channel health learns the
    outcome of every attempt, including a stream that breaks after it started.
    """
    loop = asyncio.get_running_loop()
    settings = parts.upstream.settings
    budget = RetryBudget(settings.max_attempts)
    deadline = loop.time() + settings.deadline_seconds
    health, router = parts.health, parts.router
    now = health.clock()
    only = None if call.endpoint.translatable else call.endpoint.protocol
    attempts: list[Attempt] = []
    failures: list[AttemptFailed] = []
    for channel in router.plan(route, now, health, only_type=only):
        permit = health.acquire(channel, health.clock())
        if permit is None:
            continue
        exchange = Exchange(call, channel, settings.default_anthropic_max_tokens)
        outcome.attempts += 1
        outcome.channel_id = channel.id
        outcome.upstream_model = exchange.upstream_model
        outcome.tried.append(channel.id)
        started = loop.time()
        try:
            try:
                resp = await open_attempt(
                    parts.upstream, exchange, router.next_credential(channel), request.headers
                )
            except AttemptFailed as failed:
                attempt = _attempt_of(failed)
                kind = classify(attempt) or ErrorType.UPSTREAM_ERROR
                permit.failure(kind, failed.retry_after)
                parts.observer.upstream_observe(
                    channel.id, _status_class(failed.status), loop.time() - started
                )
                attempts.append(attempt)
                failures.append(failed)
                verdict = decide(
                    attempt, attempts=len(attempts), time_left=deadline - loop.time(), budget=budget
                )
                if verdict is Verdict.RETRY:
                    parts.observer.failover(channel.id, kind.value)
                    continue
                break
            permit.success()
            parts.observer.upstream_observe(
                channel.id, _status_class(resp.status), loop.time() - started
            )
            response = await deliver(request, exchange, resp, outcome, request_id, extra_headers)
            if outcome.error_type in (ErrorType.UPSTREAM_RESET, ErrorType.UPSTREAM_TIMEOUT):
                permit.failure(outcome.error_type)
            return response
        finally:
            permit.release()
    final = final_failure(attempts)
    if final.upstream_index is not None:
        last = failures[final.upstream_index]
        outcome.status = last.status or 502
        outcome.error_type = ErrorType.UPSTREAM_ERROR
        return passthrough_error(last, request_id, extra_headers)
    err = final.error()
    if final.error_type is ErrorType.NO_CHANNEL:
        err.retry_after = health.soonest(route, health.clock())
    raise err


def _status_class(status: int | None) -> str:
    return "error" if status is None else f"{status // 100}xx"
