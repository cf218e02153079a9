"""Relay: send a call to a channel and pass its answer back, event by event, byte for byte.

The only module that touches the aiohttp client. It retries only while nothing has reached the
client, never reads on after the client left, and never keeps, logs or inspects a body beyond
the usage scan.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxyd.call import Call, injects_usage, native_body
from proxyd.config import UpstreamSettings
from proxyd.errors import ErrorType, ProxydError, UpstreamFailure
from proxyd.sse import EventSplitter
from proxyd.state import Channel
from proxyd.usage import StreamUsage, Usage, is_usage_only_chunk, usage_from_body
from proxyd.wire import anthropic as anthropic_wire
from proxyd.wire import openai as openai_wire

ANTHROPIC_VERSION = "2023-06-01"
_MAX_ERROR_BODY = 1 << 20
# Client request headers passed on to an Anthropic channel (the rest are the operator's business).
_ANTHROPIC_PASS = ("anthropic-version", "anthropic-beta")


@dataclass(slots=True)
class Outcome:
    """What happened to one request, filled in as it goes; the billing row is made from it."""

    channel_id: str | None = None
    upstream_model: str | None = None
    status: int = 0
    error_type: ErrorType | None = None
    usage: Usage | None = None
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

    def ssl_for(self, channel: Channel) -> ssl.SSLContext | bool:
        """TLS verification stays on unless the channel turns it off."""
        return True if channel.verify_tls else self._insecure


def upstream_request(
    call: Call, channel: Channel, credential: str, client_headers: Mapping[str, str]
) -> tuple[str, dict[str, str], bytes]:
    """URL, headers and body for one attempt on a channel of the client's own protocol."""
    upstream_model = channel.upstream_model(call.model)
    body = native_body(call, upstream_model)
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if channel.type == "anthropic":
        url = channel.base_url + "/v1/messages"
        headers["x-api-key"] = credential
        headers["anthropic-version"] = ANTHROPIC_VERSION
        headers.update({n: v for n in _ANTHROPIC_PASS if (v := client_headers.get(n))})
    else:
        url = channel.base_url + call.endpoint.upstream_suffix
        headers["Authorization"] = "Bearer " + credential
    if call.stream:
        headers["Accept"] = "text/event-stream"
    headers.update(channel.headers)
    return url, headers, body


def client_headers_for(upstream: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    """Response headers for the client: the content type and proxyd's own; nothing hop-by-hop."""
    out: CIMultiDict[str] = CIMultiDict()
    out["Content-Type"] = upstream.get("Content-Type", "application/json")
    out["x-request-id"] = request_id
    upstream_id = upstream.get("x-request-id") or upstream.get("request-id")
    if upstream_id:
        out["x-upstream-request-id"] = upstream_id
    return out


def render_error_event(call: Call, err: ProxydError) -> bytes:
    """An SSE error event in the client's wire format."""
    if call.endpoint.protocol == "anthropic":
        return anthropic_wire.error_event(err)
    return openai_wire.error_event(err)


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


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def open_attempt(
    upstream: Upstream,
    call: Call,
    channel: Channel,
    credential: str,
    client_headers: Mapping[str, str],
) -> aiohttp.ClientResponse:
    """Send the request and wait for the response headers; raise AttemptFailed when retryable."""
    url, headers, body = upstream_request(call, channel, credential, client_headers)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=channel.connect_timeout, sock_read=channel.chunk_timeout
    )
    try:
        async with asyncio.timeout(channel.first_byte_timeout):
            resp = await upstream.session.post(
                url,
                data=body,
                headers=headers,
                timeout=timeout,
                proxy=channel.proxy,
                ssl=upstream.ssl_for(channel),
                allow_redirects=False,
            )
    except TimeoutError:
        raise AttemptFailed(ErrorType.UPSTREAM_TIMEOUT) from None
    except aiohttp.ServerTimeoutError:
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
            ErrorType.UPSTREAM_ERROR, resp.status, data, resp.headers, _retry_after(resp.headers)
        )
    return resp


async def deliver(
    request: web.Request,
    call: Call,
    resp: aiohttp.ClientResponse,
    outcome: Outcome,
    request_id: str,
    extra_headers: Mapping[str, str],
) -> web.StreamResponse:
    """Pass a chosen upstream response to the client; `resp` is always released."""
    headers = client_headers_for(resp.headers, request_id)
    headers.update(extra_headers)
    outcome.status = resp.status
    if resp.status >= 400:
        outcome.error_type = ErrorType.UPSTREAM_CLIENT_ERROR
    is_sse = resp.headers.get("Content-Type", "").startswith("text/event-stream")
    if not (call.stream and is_sse and resp.status < 400):
        try:
            body = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            resp.close()
            kind = (
                ErrorType.UPSTREAM_TIMEOUT
                if isinstance(exc, TimeoutError)
                else ErrorType.UPSTREAM_RESET
            )
            raise UpstreamFailure(
                "The upstream provider failed while sending its response.",
                status=504 if kind is ErrorType.UPSTREAM_TIMEOUT else 502,
                error_type=kind,
            ) from None
        finally:
            resp.release()
        if resp.status < 400:
            outcome.usage = usage_from_body(body)
        outcome.first_byte_at = asyncio.get_running_loop().time()
        outcome.sent = True
        return web.Response(body=body, status=resp.status, headers=headers)
    return await _stream(request, call, resp, outcome, headers)


async def _stream(
    request: web.Request,
    call: Call,
    resp: aiohttp.ClientResponse,
    outcome: Outcome,
    headers: CIMultiDict[str],
) -> web.StreamResponse:
    headers["Cache-Control"] = "no-cache"
    headers["X-Accel-Buffering"] = "no"
    response = web.StreamResponse(status=resp.status, headers=headers)
    loop = asyncio.get_running_loop()
    splitter = EventSplitter()
    scanner = outcome.scanner = StreamUsage()
    strip = injects_usage(call)
    content = resp.content
    writing = False
    try:
        await response.prepare(request)
        outcome.sent = True
        while True:
            data = await content.readany()
            if not data:
                break
            events = splitter.feed(data)
            if not events:
                continue
            for event in events:
                scanner.feed(event)
            if strip:
                events = [e for e in events if not is_usage_only_chunk(e)]
                if not events:
                    continue
            if outcome.first_byte_at is None:
                outcome.first_byte_at = loop.time()
            writing = True
            await response.write(events[0] if len(events) == 1 else b"".join(events))
            writing = False
        if splitter.pending():
            raise aiohttp.ClientPayloadError("stream ended inside an event")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        resp.close()
        if writing or request.transport is None or request.transport.is_closing():
            outcome.status = 499
            outcome.error_type = ErrorType.CLIENT_DISCONNECT
            return response
        timeout = isinstance(exc, TimeoutError)
        err = UpstreamFailure(
            "The upstream provider stopped responding mid-stream."
            if timeout
            else "The upstream provider closed the stream before it was complete.",
            status=504 if timeout else 502,
            error_type=ErrorType.UPSTREAM_TIMEOUT if timeout else ErrorType.UPSTREAM_RESET,
        )
        outcome.status = err.status
        outcome.error_type = err.error_type
        try:
            await response.write(render_error_event(call, err))
            await response.write_eof()
        except (OSError, aiohttp.ClientError):
            pass
        return response
    finally:
        resp.release()
    try:
        await response.write_eof()
    except (OSError, aiohttp.ClientError):
        outcome.status = 499
        outcome.error_type = ErrorType.CLIENT_DISCONNECT
    return response


def final_failure(last: AttemptFailed | None) -> ProxydError | AttemptFailed:
    """What the client gets when no channel served: the last upstream answer, or 502/503/504."""
    if last is None:
        return UpstreamFailure(
            "No channel is available for this model right now.",
            status=503,
            error_type=ErrorType.NO_CHANNEL,
        )
    if last.status is not None:
        return last
    if last.error_type is ErrorType.UPSTREAM_TIMEOUT:
        return UpstreamFailure(
            "The upstream provider did not respond in time.",
            status=504,
            error_type=ErrorType.UPSTREAM_TIMEOUT,
        )
    return UpstreamFailure(
        "Could not connect to any upstream provider for this model.",
        status=503,
        error_type=ErrorType.UPSTREAM_CONNECT,
    )


def passthrough_error(
    last: AttemptFailed, request_id: str, extra_headers: Mapping[str, str]
) -> web.Response:
    """The last upstream error response, as the provider sent it."""
    assert last.status is not None
    content_type = "application/json"
    if last.headers is not None:
        content_type = last.headers.get("Content-Type", content_type)
    headers: dict[str, Any] = {"Content-Type": content_type, "x-request-id": request_id}
    headers.update(extra_headers)
    if last.retry_after is not None:
        headers["Retry-After"] = str(int(last.retry_after + 0.999))
    return web.Response(body=last.body or b"", status=last.status, headers=headers)


async def relay(
    request: web.Request,
    call: Call,
    channels: list[Channel],
    upstream: Upstream,
    outcome: Outcome,
    *,
    credential: Any,
    request_id: str,
    extra_headers: Mapping[str, str],
) -> web.StreamResponse:
    """Try the channels in order until one answers; failover only before the first byte."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + upstream.settings.deadline_seconds
    last: AttemptFailed | None = None
    for channel in channels:
        if outcome.attempts >= upstream.settings.max_attempts or loop.time() >= deadline:
            break
        outcome.attempts += 1
        outcome.channel_id = channel.id
        outcome.upstream_model = channel.upstream_model(call.model)
        outcome.tried.append(channel.id)
        try:
            resp = await open_attempt(upstream, call, channel, credential(channel), request.headers)
        except AttemptFailed as failed:
            last = failed
            continue
        return await deliver(request, call, resp, outcome, request_id, extra_headers)
    result = final_failure(last)
    if isinstance(result, ProxydError):
        raise result
    outcome.status = result.status or 502
    outcome.error_type = result.error_type
    return passthrough_error(result, request_id, extra_headers)
