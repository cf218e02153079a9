"""Token counting: `POST /v1/messages/count_tokens` and `POST /v1/responses/input_tokens`.

authenticate → admit (the count bucket) → route → relay to a channel of the caller's protocol,
or count with the bundled tokenizer (`x-proxyd-estimated: true`) where no such channel serves the
model or its provider does not offer counting. One row per call, endpoint named, cost 0.
"""

from __future__ import annotations

import asyncio
import functools
import time

import orjson
from aiohttp import web

from proxyd.admission.authenticate import authenticate
from proxyd.errors import ProxydError
from proxyd.protocol.call import Call
from proxyd.protocol.endpoints import COUNTING, Endpoint
from proxyd.relay.outcome import Outcome
from proxyd.relay.relay import relay
from proxyd.routing.route import route_call
from proxyd.server.handlers import (
    error_response,
    new_request_id,
    read_call,
    send_now,
)
from proxyd.server.pipeline import Arrival, Pipeline
from proxyd.server.respond import WholeResponse, as_response

ESTIMATED_HEADER = "x-proxyd-estimated"
# Upstream answers meaning "this provider has no token counting": count offline instead.
NOT_OFFERED = frozenset({404, 405, 501})
# Prompts above this many bytes are counted in a thread, off the event loop.
_THREAD_BYTES = 64 * 1024


def count_routes(p: Pipeline) -> list[web.RouteDef]:
    """The count endpoints' routes on the client listener."""

    return [web.post(e.path, functools.partial(count, p, endpoint=e)) for e in COUNTING]


async def count(p: Pipeline, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """One count call, answered by the provider or by the bundled tokenizer; never billed."""
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
    try:
        call = await read_call(request, endpoint)
        call.query = request.rel_url.raw_query_string
        route = route_call(state, key, call, offline=True)
        p.admission.admit_count(key, model=call.model, client_ip=arrival.client_ip or "")
        response: web.StreamResponse | None = None
        if route.channels:
            # follows the conversation's channel, never moves it (no admission to ride with)
            session = p.open_session(key.id, call, request.headers, route.channels, track=False)
            response = as_response(
                await relay(
                    request,
                    call,
                    route.channels,
                    p.relay,
                    outcome,
                    request_id=request_id,
                    extra_headers={},
                    session=await p.shared_pin(session) if session is not None else None,
                )
            )
        if response is None or response.status in NOT_OFFERED:
            outcome = Outcome()  # what the relay recorded of the refusal is not this answer's
            response = await estimated(p, call, request_id, outcome)
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
        p.finish(arrival, outcome, call, None, loop.time(), state)
        p.metrics.request_finished()


async def estimated(p: Pipeline, call: Call, request_id: str, outcome: Outcome) -> WholeResponse:
    """The count from the bundled tokenizer, in the caller's format, marked as an estimate."""
    kind = "messages" if call.endpoint.protocol == "anthropic" else "responses"
    if len(call.raw) > _THREAD_BYTES:
        tokens = await asyncio.to_thread(p.tokenizer.prompt_tokens, kind, call.body)
    else:
        tokens = p.tokenizer.prompt_tokens(kind, call.body)
    if call.endpoint.protocol == "anthropic":
        body: dict[str, object] = {"input_tokens": tokens}
    else:
        body = {"object": "response.input_tokens", "input_tokens": tokens}
    outcome.answered_offline(200)
    outcome.first_byte(asyncio.get_running_loop().time())
    headers = {
        "Content-Type": "application/json",
        "x-request-id": request_id,
        ESTIMATED_HEADER: "true",
    }
    return WholeResponse(200, orjson.dumps(body), headers.items())
