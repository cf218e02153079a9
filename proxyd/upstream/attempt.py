"""One attempt on one channel, through proxyd's own HTTP/1.1 client (`proxyd.upstream.h1`).

Every upstream call goes through here: direct, through an HTTP CONNECT proxy or through SOCKS5.
Whatever fails reaches the caller as an `AttemptFailed` (`proxyd.upstream.failures`, the one
table from the client's exceptions to proxyd's words). Never keeps or logs a body.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from proxyd.config import UpstreamSettings
from proxyd.state.store import Channel
from proxyd.upstream.failures import AttemptFailed, AttemptKind, failed
from proxyd.upstream.h1 import BadTarget, H1Error, H1Pool, ReadTimeout, Stream

MAX_ERROR_BODY = 1 << 20


class Upstream:
    """The shared upstream pool (proxyd's own HTTP/1.1 client) and its TLS contexts."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.h1 = H1Pool(
            limit=settings.pool_size,
            limit_per_host=settings.pool_size_per_host,
            keepalive_seconds=settings.keepalive_seconds,
            acquire_timeout=settings.pool_acquire_timeout_seconds,
        )
        # Verifies nothing, so it needs no CA store (loading one takes ~20 ms of CPU).
        self._insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._insecure.check_hostname = False
        self._insecure.verify_mode = ssl.CERT_NONE
        self._verifying: ssl.SSLContext | None = None

    async def start(self) -> None:
        """Build the verifying TLS context, in a thread: loading the system's CA store on the
        first request instead would stall every request and stream in flight."""
        self._verifying = await asyncio.to_thread(ssl.create_default_context)

    async def close(self, grace: float = 1.0) -> None:
        """Close the pool: connections still in use get `grace` seconds, then are cut."""
        await self.h1.close(grace)

    def ssl_context_for(self, channel: Channel) -> ssl.SSLContext:
        """The TLS context of `channel` (verifying unless the channel turns it off)."""
        if not channel.verify_tls:
            return self._insecure
        if self._verifying is None:
            self._verifying = ssl.create_default_context()
        return self._verifying

    def limits(self, channel: Channel) -> dict[str, Any]:
        """The TLS context, proxy and timeouts of a call on `channel` (first_byte_timeout
        bounds the head, and each read of a whole answer)."""
        return {
            "ssl_context": self.ssl_context_for(channel),
            "connect_timeout": channel.connect_timeout,
            "read_timeout": channel.first_byte_timeout,
            "proxy": channel.proxy,
        }


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
    """A whole (non-stream) answer; `broken` when it broke after its head."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    broken: AttemptFailed | None = None


class Streaming:
    """A stream call's answer, its head in and its body still to come.

    What the relay sees of an upstream body: every failure it reports is an `AttemptFailed`.
    """

    __slots__ = ("_body", "headers", "status")

    def __init__(self, body: Stream) -> None:
        self._body = body
        self.status = body.status
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(body.headers))

    def attach(
        self, on_data: Callable[[bytes], None], on_end: Callable[[AttemptFailed | None], None]
    ) -> None:
        """Every read of the body to `on_data`, from the client's parser as it arrives; then
        its end to `on_end`, once (None when the body ended cleanly)."""

        def end(error: H1Error | None) -> None:
            on_end(None if error is None else failed(error))

        self._body.attach(on_data, end)

    def pause_reading(self) -> None:
        """Stop reading from the upstream (the client is not keeping up)."""
        self._body.pause_reading()

    def resume_reading(self) -> None:
        self._body.resume_reading()

    async def read(self, within: float) -> bytes:
        """The whole body (a stream call answered without SSE), within `within` seconds."""
        try:
            async with asyncio.timeout(within):
                return await self._body.read_all()
        except H1Error as exc:
            raise failed(exc) from None
        except TimeoutError:
            raise AttemptFailed(AttemptKind.STALLED) from None

    async def error_body(self, within: float) -> bytes:
        """The start of an error answer's body (what arrives within `within` seconds; empty
        if it broke off), for failover to judge; the stream is released."""
        try:
            async with asyncio.timeout(within):
                return await self._body.read_all(MAX_ERROR_BODY)
        except (H1Error, TimeoutError):
            return b""
        finally:
            self.release()

    def stall(self) -> None:
        """End the body as stalled: nothing arrived for too long (its sink learns STALLED)."""
        self._body.abort(ReadTimeout("no data from the upstream", status=self.status))

    def close(self) -> None:
        """Drop the connection, whatever was left unread."""
        self._body.abort()

    def release(self) -> None:
        """Back to the pool if the body was read to its end, else closed."""
        self._body.release()


Answered = Whole | Streaming


async def open_attempt(
    upstream: Upstream,
    channel: Channel,
    request: tuple[str, dict[str, str], bytes],
    *,
    stream: bool,
) -> Answered:
    """Send `request` (URL, headers, body) on `channel` and wait for the answer: a whole answer
    comes back complete, a stream with its head in. Raises AttemptFailed on no answer or on an
    error answer (400 and above, its body read)."""
    url, headers, body = request
    pool, limits = upstream.h1, upstream.limits(channel)
    if not stream:
        try:
            answer = await pool.post(url, headers, body, **limits)
        except (BadTarget, H1Error) as exc:
            if not isinstance(exc, H1Error) or not exc.head_arrived:
                raise failed(exc) from None
            if exc.status >= 400:  # an error answer whose body broke off: judged by its status
                raise _refused(exc.status, _NO_HEADERS, b"") from None
            return Whole(exc.status, _NO_HEADERS, b"", broken=failed(exc))
        answer_headers = CIMultiDictProxy(CIMultiDict(answer.headers))
        if answer.status >= 400:
            raise _refused(answer.status, answer_headers, answer.body[:MAX_ERROR_BODY])
        return Whole(answer.status, answer_headers, answer.body)
    try:
        streaming = Streaming(await pool.open(url, headers, body, **limits))
    except (BadTarget, H1Error) as exc:
        raise failed(exc) from None
    if streaming.status >= 400:
        data = await streaming.error_body(channel.first_byte_timeout)
        raise _refused(streaming.status, streaming.headers, data)
    return streaming


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def _refused(status: int, headers: CIMultiDictProxy[str], data: bytes) -> AttemptFailed:
    """An upstream error answer (400 and above), its body as the provider sent it: failover
    decides from it whether another channel is tried, the relay what the client sees."""
    return AttemptFailed(
        AttemptKind.RESPONSE, status, data, headers, retry_after_seconds(headers, time.time())
    )
