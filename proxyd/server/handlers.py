"""Client handlers: each request is one pass, authenticate → admit → route → relay → record.

Every request that passed authentication yields exactly one usage record, handed to the billing
queue in `finally`. Errors are rendered in the wire format of the endpoint that was called.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time

from aiohttp import web

from proxyd.admission.authenticate import authenticate
from proxyd.errors import BodyTooLarge, ProxydError
from proxyd.protocol import anthropic as anthropic_wire
from proxyd.protocol import openai as openai_wire
from proxyd.protocol.call import Call, parse_call
from proxyd.protocol.endpoints import ALL, Endpoint
from proxyd.relay.outcome import Outcome
from proxyd.relay.relay import relay
from proxyd.routing.route import route_call
from proxyd.server.pipeline import Arrival, Pipeline
from proxyd.server.respond import WholeResponse, as_response


def new_request_id() -> str:
    """A fresh request id; it is also the billing row's key (128 random bits, 32 hex digits)."""
    return "req_" + os.urandom(16).hex()  # as unique as uuid4().hex, at a quarter of the cost


def error_response(protocol: str, err: ProxydError, request_id: str) -> WholeResponse:
    """`err` rendered in the caller's wire format, with Retry-After and extra headers."""
    body = (
        anthropic_wire.error_body(err) if protocol == "anthropic" else openai_wire.error_body(err)
    )
    headers = {
        "Content-Type": "application/json",
        "x-request-id": request_id,
        "x-should-retry": "true" if err.should_retry else "false",
        **err.headers,
    }
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(-(-err.retry_after // 1))))
    return WholeResponse(err.status, body, headers.items())


class ClientHandlers:
    """The client API: one method per kind of endpoint."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.p = pipeline

    def routes(self) -> list[web.RouteDef]:
        """The route table of the client listener."""
        # partial, not a wrapper coroutine: one frame (and one coroutine) less per request
        table = [web.post(e.path, functools.partial(self.completion, endpoint=e)) for e in ALL]
        table.append(web.get("/v1/models", self.models))
        return table

    async def completion(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        """authenticate → admit → route → relay → record (after the answer is on its way)."""
        p = self.p
        loop = asyncio.get_running_loop()
        request_id, wall, start = new_request_id(), time.time(), loop.time()
        state = p.store.current
        try:
            key = authenticate(request.headers, state, wall)
        except ProxydError as err:
            p.metrics.refused(err.error_type.value)
            return error_response(endpoint.protocol, err, request_id)
        p.metrics.request_started()
        arrival = Arrival(
            request_id, wall, start, key.id, key.account_id, endpoint.name, p.client_ip(request)
        )
        outcome = Outcome()
        call: Call | None = None
        ticket = None
        try:
            call = await read_call(request, endpoint)
            call.query = request.rel_url.raw_query_string
            route = route_call(state, key, call)
            session = p.open_session(key.id, call, request.headers, route.channels)
            ticket = await p.admission.admit(
                key,
                model=call.model,
                client_ip=arrival.client_ip or "",
                user_agent=request.headers.get("User-Agent", ""),
                est_tokens=p.estimate_tokens(call),
                max_cost_nanos=p.max_cost(route.price, call),
            )
            if call.stream:
                p.metrics.stream_opened()
            try:
                reply = await relay(
                    request,
                    call,
                    route.channels,
                    p.relay,
                    outcome,
                    request_id=request_id,
                    extra_headers=ticket.headers,
                    session=session
                    if session is None or session.pin is not None
                    else await p.shared_pin(session),
                )
            finally:
                if call.stream:
                    p.metrics.stream_closed()
            response = as_response(reply)
            await send_now(request, response, outcome)
            return response
        except ProxydError as err:
            outcome.fail(err.error_type, err.status)
            if err.status in (403, 429):
                p.metrics.refused(err.error_type.value)
            response = error_response(endpoint.protocol, err, request_id)
            await send_now(request, response, outcome)
            return response
        except asyncio.CancelledError:
            if not outcome.left:
                outcome.client_left()
            raise
        finally:
            p.finish(arrival, outcome, call, ticket, loop.time(), state)
            p.metrics.request_finished()

    async def models(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/models: the models the calling key may use, in the caller's format."""
        request_id = new_request_id()
        anthropic = "anthropic-version" in request.headers
        state = self.p.store.current
        try:
            key = authenticate(request.headers, state, time.time())
        except ProxydError as err:
            return error_response("anthropic" if anthropic else "openai", err, request_id)
        names = [m for m in state.models() if key.allows_model(m)]
        if anthropic:
            data: object = {
                "data": [
                    {
                        "type": "model",
                        "id": m,
                        "display_name": m,
                        "created_at": "1970-01-01T00:00:00Z",
                    }
                    for m in names
                ],
                "has_more": False,
                "first_id": names[0] if names else None,
                "last_id": names[-1] if names else None,
            }
        else:
            data = {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "proxyd"} for m in names
                ],
            }
        return web.json_response(data, headers={"x-request-id": request_id}, dumps=_dumps)


async def send_now(request: web.Request, response: web.StreamResponse, outcome: Outcome) -> None:
    """Write a whole response before the record step, so the client never waits for the row.

    A stream is complete when the relay returns it. A client gone by now is recorded as 499.
    """
    if isinstance(response, WholeResponse):
        try:
            await response.prepare(request)
        except ConnectionResetError:
            outcome.client_left()


def _dumps(obj: object) -> str:
    import orjson

    return orjson.dumps(obj).decode()


async def read_call(request: web.Request, endpoint: Endpoint) -> Call:
    """Read the body within the size limit and parse it; 413 without reading an oversized one."""
    limit = request.app[MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    content = request.content
    if content.is_eof():  # the whole body came with the headers (most requests): take it as is
        raw = content.read_nowait()
        if len(raw) > limit:
            raise _too_large(limit)
    else:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(limit) from None
    return parse_call(endpoint, raw)


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"The request body is larger than the limit of {limit} bytes.")


MAX_BODY = web.AppKey("max_body_bytes", int)
