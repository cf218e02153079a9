"""Relay: send a call to a channel and pass its answer back, event by event, byte for byte.

Each attempt is made by `attempt`. The relay retries only while nothing has reached the client,
never reads on after the client left, and never keeps, logs or inspects a body beyond the usage
scan.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict

from proxyd.errors import ErrorType, ProxydError, UpstreamFailure
from proxyd.protocol.call import Call
from proxyd.protocol.usage import completion_text
from proxyd.relay.exchange import Exchange, stream_failure
from proxyd.relay.failover import (
    Attempt,
    AttemptKind,
    RetryBudget,
    Verdict,
    classify,
    decide,
    final_failure,
)
from proxyd.relay.outcome import Outcome
from proxyd.relay.provider_errors import (
    MESSAGES,
    Fault,
    fault_of,
    model_scoped,
    shows_provider_message,
)
from proxyd.relay.stream import FlowFor, relay_stream
from proxyd.routing.health import ChannelHealth
from proxyd.routing.route import Router
from proxyd.routing.sticky import Session
from proxyd.state.store import Channel
from proxyd.upstream.attempt import Answered, Upstream, Whole, open_attempt
from proxyd.upstream.failures import AttemptFailed


@dataclass(slots=True)
class WholeReply:
    """A whole answer for the client (status, body, headers), which the server writes in one
    go; the relay never writes to the client itself except a stream. (Not frozen: a frozen
    dataclass costs four times as much to make, on every request.)"""

    status: int
    body: bytes
    headers: Iterable[tuple[str, str]]


Reply = web.StreamResponse | WholeReply
"""What the relay hands back: a stream it already relayed, or a whole answer to write."""


def client_headers_for(upstream: Mapping[str, str], request_id: str) -> CIMultiDict[str]:
    """Response headers for the client: the content type and proxyd's own; nothing hop-by-hop."""
    out: CIMultiDict[str] = CIMultiDict()
    out["Content-Type"] = upstream.get("Content-Type", "application/json")
    out["x-request-id"] = request_id
    upstream_id = upstream.get("x-request-id") or upstream.get("request-id")
    if upstream_id:
        out["x-upstream-request-id"] = upstream_id
    return out


async def deliver(
    request: web.Request,
    exchange: Exchange,
    resp: Answered,
    outcome: Outcome,
    request_id: str,
    extra_headers: Mapping[str, str],
    flow_for: FlowFor,
) -> Reply:
    """Pass a chosen upstream answer to the client; `resp` is always released.

    An answer that broke after its head, before any byte was sent, is `decide`d (ABORT): the
    client gets proxyd's error, never a retry.
    """
    headers = client_headers_for(resp.headers, request_id)
    headers.update(extra_headers)
    if isinstance(resp, Whole):
        if resp.broken is not None:
            raise _broken(resp.broken, resp.status)
        return whole_response(exchange, resp.status, resp.body, headers, outcome)
    is_sse = resp.headers.get("Content-Type", "").startswith("text/event-stream")
    if exchange.call.stream and is_sse and resp.status < 400:
        return await relay_stream(request, exchange, resp, outcome, headers, flow_for)
    try:  # a stream call answered whole: no per-read timeout, so the whole body is bounded
        raw = await resp.read(exchange.channel.chunk_timeout)
    except AttemptFailed as failed:
        resp.close()
        raise _broken(failed, resp.status) from None
    finally:
        resp.release()
    return whole_response(exchange, resp.status, raw, headers, outcome)


def _broken(failed: AttemptFailed, status: int) -> ProxydError:
    """The error for an answer that broke after its head with nothing sent yet."""
    verdict = decide(Attempt(failed.kind, status))
    assert verdict is Verdict.ABORT, verdict  # after the head: never a retry
    return stream_failure(failed.kind)


def whole_response(
    exchange: Exchange, status: int, raw: bytes, headers: CIMultiDict[str], outcome: Outcome
) -> WholeReply:
    """A whole upstream answer for the client, converted when translated; usage noted or kept."""
    if status >= 400:
        outcome.fail(ErrorType.UPSTREAM_CLIENT_ERROR, status)
        body = exchange.error_body(status, raw)
        if exchange.translated:
            headers["Content-Type"] = "application/json"
    elif exchange.translated:
        body, usage = exchange.body(raw)
        outcome.saw_usage(usage)
        if usage is None:
            outcome.answer_text(completion_text(body))
        headers["Content-Type"] = "application/json"
    else:  # passed on as it is; the record step reads its usage after it was sent
        body = raw
        outcome.whole_answer(raw)
    outcome.deliver(status)
    outcome.first_byte(asyncio.get_running_loop().time())
    return WholeReply(status, body, headers.items())


def refused(
    exchange: Exchange,
    failed: AttemptFailed,
    fault: Fault,
    outcome: Outcome,
    request_id: str,
    extra_headers: Mapping[str, str],
) -> WholeReply:
    """An upstream error answer that is the client's: the provider's own body (in the client's
    format) only when it is about the client's request; otherwise proxyd's message, same status.
    """
    status = failed.status or 502
    if not shows_provider_message(fault):
        raise UpstreamFailure(
            MESSAGES[fault], status=status, error_type=ErrorType.UPSTREAM_CLIENT_ERROR
        )
    headers = client_headers_for(failed.headers or {}, request_id)
    headers.update(extra_headers)
    return whole_response(exchange, status, failed.body or b"", headers, outcome)


ATTEMPTS_HEADER = "x-proxyd-attempts"
"""On an upstream failure: how many upstream attempts proxyd made (and failed over) already."""


class RelayObserver(Protocol):
    """Where the relay reports attempts: the metrics."""

    def failover(self, from_channel: str, reason: str) -> None: ...
    def upstream_observe(self, channel_id: str, status_class: str, seconds: float) -> None: ...


@dataclass(slots=True)
class Relay:
    """The long-lived parts the relay uses: the pool, channel health, the router, metrics, and
    how a prepared response's client connection is written to (`FlowControl`)."""

    upstream: Upstream
    health: ChannelHealth
    router: Router
    observer: RelayObserver
    flow_for: FlowFor
    budget: RetryBudget = field(init=False)

    def __post_init__(self) -> None:
        self.budget = RetryBudget(self.upstream.settings.max_attempts)


def _attempt_of(failed: AttemptFailed) -> Attempt:
    if failed.kind is AttemptKind.RESPONSE and failed.status is not None:
        fault = fault_of(failed.status, failed.body or b"")
        return Attempt(AttemptKind.RESPONSE, failed.status, fault=fault)
    return Attempt(failed.kind)


async def relay(
    request: web.Request,
    call: Call,
    route: tuple[Channel, ...],
    parts: Relay,
    outcome: Outcome,
    *,
    request_id: str,
    extra_headers: Mapping[str, str],
    session: Session | None = None,
) -> Reply:
    """Try the planned channels until one answers; failover only before the first byte.

    A sticky `session` puts its channel first and its credential in use; the channel that
    answers becomes the session's (it moves with a failover).

    Whether to move on is decided in one place, `failover.decide`; channel health learns the
    outcome of every attempt, including a stream that breaks after it started.
    """
    loop = asyncio.get_running_loop()
    settings = parts.upstream.settings
    budget = parts.budget
    deadline = loop.time() + settings.deadline_seconds
    health, router = parts.health, parts.router
    now = health.clock()
    attempts: list[Attempt] = []
    failures: list[AttemptFailed] = []
    first = session.channel_id if session is not None else None
    model = call.model
    for channel in router.plan(route, now, health, first=first):
        if health.model_refused(channel.id, model, now):
            continue  # the channel's credential may not use this model (a 403), for a while
        permit = health.acquire(channel, health.clock())
        if permit is None:
            continue
        exchange = Exchange(call, channel, settings.default_anthropic_max_tokens)
        outcome.trying(channel.id, exchange.upstream_model)
        started = loop.time()
        try:
            try:
                pinned = (
                    session.pinned
                    if session is not None and session.channel_id == channel.id
                    else None
                )
                credential = router.next_credential(channel, pinned)
                resp = await open_attempt(
                    parts.upstream,
                    channel,
                    exchange.request(credential, request.headers),
                    stream=call.stream,
                )
            except AttemptFailed as failed:
                attempt = _attempt_of(failed)
                kind = classify(attempt) or ErrorType.UPSTREAM_ERROR
                if attempt.judged is Fault.CREDENTIAL and model_scoped(
                    failed.status or 0, failed.body or b""
                ):  # refused this model only: the channel serves its others
                    health.refuse_model(channel.id, model)
                else:
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
                if verdict is Verdict.DELIVER and attempt.judged is not None:
                    return refused(
                        exchange, failed, attempt.judged, outcome, request_id, extra_headers
                    )
                break
            permit.success()
            health.model_served(channel.id, model)
            if session is not None:
                placing = session.settle(channel.id, channel.api_keys.index(credential))
                if placing is not None:  # a shared store learns it before the client can
                    try:  # send the next turn elsewhere (never raises but for a cancel)
                        await placing
                    except BaseException:
                        if not isinstance(resp, Whole):
                            resp.close()
                        raise
            parts.observer.upstream_observe(
                channel.id, _status_class(resp.status), loop.time() - started
            )
            try:
                response = await deliver(
                    request, exchange, resp, outcome, request_id, extra_headers, parts.flow_for
                )
            except ProxydError as broke:  # broke after its head, before a byte was sent
                permit.failure(broke.error_type)
                raise
            if outcome.error_type in (ErrorType.UPSTREAM_RESET, ErrorType.UPSTREAM_TIMEOUT):
                permit.failure(outcome.error_type)
            return response
        finally:
            permit.release()
    final = final_failure(attempts)
    tried = {ATTEMPTS_HEADER: str(len(attempts))} if attempts else {}
    err = final.error()
    err.headers.update(tried)
    if final.upstream_index is not None:  # its status and Retry-After, never its message
        err.retry_after = failures[final.upstream_index].retry_after
    if final.error_type is ErrorType.NO_CHANNEL:
        err.retry_after = health.soonest(route, health.clock())
    raise err


def _status_class(status: int | None) -> str:
    return "error" if status is None else f"{status // 100}xx"
