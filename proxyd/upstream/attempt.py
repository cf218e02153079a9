"""One attempt on one channel: send the request, wait for the answer's head, classify failure.

The only module besides `stream` that touches the aiohttp client, used for channels with an HTTP
proxy (or with upstream.fast_client off); everything else goes through proxyd's own client
(`proxyd.upstream.h1`). Never keeps or logs a body.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from proxyd.config import UpstreamSettings
from proxyd.errors import ErrorType
from proxyd.relay.exchange import Exchange
from proxyd.state.store import Channel
from proxyd.upstream.h1 import BadTarget, H1Error, H1Pool, Stream

MAX_ERROR_BODY = 1 << 20


class Upstream:
    """The shared upstream pools: proxyd's own HTTP/1.1 client (`h1`), and one aiohttp session
    for channels that go through an HTTP proxy (and for every call with fast_client off)."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self.h1: H1Pool | None = None
        self._timeouts: dict[tuple[float, float | None], aiohttp.ClientTimeout] = {}
        # Verifies nothing, so it needs no CA store (loading one takes ~20 ms of CPU).
        self._insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._insecure.check_hostname = False
        self._insecure.verify_mode = ssl.CERT_NONE
        self._verifying: ssl.SSLContext | None = None

    async def start(self) -> None:
        """Open the pool; call once from the app's cleanup context.

        The verifying TLS context is built here, in a thread: loading the system's CA store
        on the first request instead would stall every request and stream in flight.
        """
        self._verifying = await asyncio.to_thread(ssl.create_default_context)
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
        if self.settings.fast_client:
            self.h1 = H1Pool(
                limit=self.settings.pool_size,
                limit_per_host=self.settings.pool_size_per_host,
                keepalive_seconds=self.settings.keepalive_seconds,
                acquire_timeout=self.settings.pool_acquire_timeout_seconds,
            )

    async def close(self) -> None:
        """Close the pools (waits for the connections to close)."""
        if self.h1 is not None:
            await self.h1.close()
            self.h1 = None
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

    def ssl_context_for(self, channel: Channel) -> ssl.SSLContext:
        """The TLS context of `channel` for the h1 client (verifying unless turned off)."""
        if not channel.verify_tls:
            return self._insecure
        if self._verifying is None:
            self._verifying = ssl.create_default_context()
        return self._verifying


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


@dataclass(slots=True)
class Whole:
    """A whole (non-stream) answer read by the h1 client; `broken` when it broke after its head."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    broken: H1Error | None = None


class Streaming:
    """A stream call's answer from the h1 client, its head in and its body still to come."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, body: Stream) -> None:
        self.body = body
        self.status = body.status
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(body.headers))

    async def read(self) -> bytes:
        """The whole body (a stream call answered without SSE); raises OSError or TimeoutError."""
        try:
            return await self.body.read_all()
        except H1Error as exc:
            raise as_os_error(exc) from None

    def close(self) -> None:
        """Drop the connection, whatever was left unread."""
        self.body.abort()

    def release(self) -> None:
        """Back to the pool if the body was read to its end, else closed."""
        self.body.release()


def as_os_error(exc: H1Error) -> OSError:
    """An h1 failure in the terms the relay handles for either client."""
    return TimeoutError(str(exc)) if exc.timeout else ConnectionResetError(str(exc))


Answered = aiohttp.ClientResponse | Whole | Streaming


async def open_attempt(
    upstream: Upstream, exchange: Exchange, credential: str, client_headers: Mapping[str, str]
) -> Answered:
    """Send the request and wait for the response headers; raise AttemptFailed on no answer or
    an error answer (400 and above, its body read).

    On a channel without an HTTP proxy the h1 client carries the call: a whole answer comes back
    complete, a stream with its head in. Otherwise the aiohttp session does.
    """
    channel = exchange.channel
    url, headers, body = exchange.request(credential, client_headers)
    stream = exchange.call.stream
    if upstream.h1 is not None and channel.proxy is None:
        if stream:
            return await open_stream(upstream.h1, upstream, exchange, url, headers, body)
        return await fetch_whole(upstream.h1, upstream, exchange, url, headers, body)
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
    if resp.status >= 400:
        try:
            data = await resp.content.read(MAX_ERROR_BODY)
        except (aiohttp.ClientError, OSError, TimeoutError):
            data = b""
        finally:
            resp.close()
        raise _refused(exchange, resp.status, resp.headers, data)
    return resp


def _refused(
    exchange: Exchange, status: int, headers: CIMultiDictProxy[str], data: bytes
) -> AttemptFailed:
    """An upstream error answer (400 and above), its body as the provider sent it: failover
    decides from it whether another channel is tried, the relay what the client sees."""
    return AttemptFailed(
        ErrorType.UPSTREAM_ERROR,
        status,
        data,
        headers,
        retry_after_seconds(headers, time.time()),
    )


async def open_stream(
    pool: H1Pool,
    upstream: Upstream,
    exchange: Exchange,
    url: str,
    headers: dict[str, str],
    body: bytes,
) -> Streaming:
    """One stream attempt through the h1 client: its head, or AttemptFailed when retryable."""
    channel = exchange.channel
    try:
        answer = Streaming(await pool.open(url, headers, body, **_h1_limits(upstream, channel)))
    except (BadTarget, H1Error) as exc:
        raise _h1_failed(exc) from None
    if answer.status >= 400:
        try:
            async with asyncio.timeout(channel.first_byte_timeout):
                data = await answer.body.read_all(MAX_ERROR_BODY)
        except (H1Error, TimeoutError):
            data = b""
        finally:
            answer.release()
        raise _refused(exchange, answer.status, answer.headers, data)
    return answer


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


async def fetch_whole(
    pool: H1Pool,
    upstream: Upstream,
    exchange: Exchange,
    url: str,
    headers: dict[str, str],
    body: bytes,
) -> Whole:
    """One attempt through the h1 client: the whole answer, or AttemptFailed when retryable."""
    try:
        answer = await pool.post(url, headers, body, **_h1_limits(upstream, exchange.channel))
    except (BadTarget, H1Error) as exc:
        if not isinstance(exc, H1Error) or not exc.status:
            raise _h1_failed(exc) from None
        if exc.status >= 400:
            raise _refused(exchange, exc.status, _NO_HEADERS, b"") from None
        return Whole(exc.status, _NO_HEADERS, b"", broken=exc)
    answer_headers = CIMultiDictProxy(CIMultiDict(answer.headers))
    if answer.status >= 400:
        raise _refused(exchange, answer.status, answer_headers, answer.body[:MAX_ERROR_BODY])
    return Whole(answer.status, answer_headers, answer.body)


def _h1_limits(upstream: Upstream, channel: Channel) -> dict[str, Any]:
    """The TLS context and timeouts of an h1 call on `channel` (first_byte_timeout bounds the
    head, and each read of a whole answer)."""
    return {
        "ssl_context": upstream.ssl_context_for(channel),
        "connect_timeout": channel.connect_timeout,
        "read_timeout": channel.first_byte_timeout,
    }


def _h1_failed(exc: BadTarget | H1Error) -> AttemptFailed:
    """A call that got no answer's head: a timeout, or the upstream could not be reached (a
    channel whose URL or headers cannot be sent counts as that too)."""
    if isinstance(exc, H1Error) and exc.timeout:
        return AttemptFailed(ErrorType.UPSTREAM_TIMEOUT)
    return AttemptFailed(ErrorType.UPSTREAM_CONNECT)
